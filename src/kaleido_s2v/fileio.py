"""Atomic outputs: nothing half-written is ever left under the final name."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; rename it onto `dst` only if the block succeeds.

    The temporary name keeps `dst`'s suffix (video writers pick the container from it). On error the
    temporary file or folder is removed and `dst` is left untouched. For folders an existing `dst` is
    replaced only after the new one is complete.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dst.stem}.tmp-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dst.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=dst.suffix, dir=dst.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
    try:
        yield tmp
        if is_dir:
            if dst.exists():
                old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
                os.replace(dst, old)
                os.replace(tmp, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dst)
        else:
            os.replace(tmp, dst)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def write_text_atomic(dst: str | os.PathLike, text: str) -> None:
    with atomic_path(dst) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_mapping(path: str | os.PathLike, what: str, shape: str) -> dict:
    """A YAML or JSON file (YAML parses JSON too) holding a mapping; {} for an empty file.

    `what` names the input in errors ("config 'x.yaml'"), `shape` says what the mapping should hold.
    Anything else is a `UserInputError` naming the file and the fix.
    """
    import yaml

    from .errors import UserInputError

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{what} '{path}' does not exist: check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserInputError(f"{what} '{path}' cannot be parsed ({type(e).__name__}): write YAML or JSON") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"{what} '{path}' must be a mapping of {shape}")
    return data
