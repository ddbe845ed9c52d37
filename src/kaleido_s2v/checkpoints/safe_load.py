"""Loading `.pt`/`.pth` pickles without running their code.

Unpickling can execute arbitrary code, and the official release is a DeepSpeed pickle. We load with
`torch.load(weights_only=True, mmap=True)`: only tensors, containers, numbers, strings and a small
allowlist are reconstructed, tensor storages stay memory-mapped (nothing is read until used).

The allowlist is deliberately tiny: `argparse.Namespace` (SAT/DeepSpeed store the run's arguments under
`args`; a Namespace is a plain attribute bag, rebuilt from a dict without calling user code). Everything
torch already trusts (`OrderedDict`, `torch.Size`, tensors, dtypes) stays allowed. Any other global is
refused with its name; `trust_pickle=True` (`--trust-pickle`) loads the file with full unpickling.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

from ..errors import UserInputError

ALLOWED_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


def load_torch_file(path: str | os.PathLike, trust_pickle: bool = False, mmap: bool = True):
    """`torch.load` a checkpoint safely (see module docstring); storages memory-mapped when the file allows it."""
    import torch

    path = Path(path)
    if trust_pickle:
        warnings.warn(f"{path}: loading with full unpickling (--trust-pickle): the file can run code", stacklevel=2)
    # Only torch's zip format (the default since torch 1.6) can be memory-mapped; older files load fully.
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not found:
            detail = re.search(r"WeightsUnpickler error: (.+?)(?:\n\n|$)", str(e), re.S)
            reason = detail.group(1).strip() if detail else str(e).splitlines()[0][:200]
            raise UserInputError(f"{path}: not a readable torch checkpoint ({reason})") from None
        raise UserInputError(
            f"{path}: refused to unpickle {found.group(1)} (not a plain tensor/container type, so loading it could "
            "run code); if you trust where this file comes from, pass --trust-pickle"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserInputError(f"{path}: not a readable torch checkpoint ({msg})") from None
    if not mmap:
        warnings.warn(f"{path}: old torch.save format (not zip): loaded fully into memory", stacklevel=2)
    return obj
