"""Outputs that never cost the user a file: ownership checks up front, atomic writes, markers.

The rule every command follows (docs/errors.md): a command writes only to a path that does not exist yet, an
empty folder, or something it made itself — a folder carrying its marker file (`MARKER`, which lists the files it
wrote), a file carrying its `made_by` signature — unless the user passes `--overwrite`. Inputs are never outputs.
`claim_folder` / `claim_file` check that before any work starts; `atomic_path` writes under a temporary name and
renames only on success; `output_folder` removes a folder it created if the command fails before writing to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import UserInputError

MARKER = ".kaleido-s2v.json"  # in every folder a command made: {"made_by": ..., "files": [...] or null}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------ ownership
def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def folder_owner(folder: str | os.PathLike) -> str | None:
    """The command that made `folder` (from its marker), or None."""
    data = _read_json(Path(folder) / MARKER)
    return data.get("made_by") if isinstance(data, dict) and isinstance(data.get("made_by"), str) else None


def _listed_files(folder: Path) -> set[str] | None:
    data = _read_json(folder / MARKER)
    files = data.get("files") if isinstance(data, dict) else None
    return set(files) if isinstance(files, list) else None


def _tree_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir() and p.name != MARKER)


def write_marker(folder: str | os.PathLike, made_by: str, files: Iterable[str] | None = None) -> None:
    """Mark `folder` as made by `made_by`; `files` (relative paths) are the files it wrote (None: not tracked)."""
    record = {"made_by": made_by, "files": sorted(files) if files is not None else None}
    (Path(folder) / MARKER).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def record_files(folder: str | os.PathLike) -> None:
    """After a command rewrote parts of a folder it owns: list every file now in it as the owner's."""
    folder = Path(folder)
    owner = folder_owner(folder)
    if owner is not None:
        write_marker(folder, owner, _tree_files(folder))


def file_signed_by(path: str | os.PathLike, made_by: str) -> bool:
    """Whether `path` is a file `made_by` wrote: a JSON object with that `made_by`, or a first line `# made_by: …`."""
    path = Path(path)
    if path.suffix == ".json":
        data = _read_json(path)
        return isinstance(data, dict) and data.get("made_by") == made_by
    try:
        with path.open(encoding="utf-8") as f:
            return f.readline().strip() == f"# made_by: {made_by}"
    except (OSError, UnicodeDecodeError):
        return False


# ------------------------------------------------------------------------------------------------ checks
def path_text(path: str | os.PathLike) -> str:
    """A path as valid UTF-8 text (for JSON and messages): bytes that are not UTF-8 are shown as \\xNN escapes."""
    return os.fsdecode(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """`path` is to be created: its nearest existing ancestor must be a folder this process can write in."""
    path = Path(path).absolute()
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserInputError(f"{flag} '{path_text(path)}': '{path_text(ancestor)}' is a file, not a folder: "
                             "choose a location inside a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise UserInputError(f"{flag} '{path_text(path)}': cannot write in '{path_text(ancestor)}' "
                             f"({e.strerror or type(e).__name__}): choose a writable location") from None


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def claim_folder(path: str | os.PathLike, flag: str, made_by: str, *, overwrite: bool = False,
                 replace: bool = False, accept: Iterable[str] = ()) -> bool:
    """Check that `made_by` may write the folder `path`; True if it exists already. Raises `UserInputError`.

    Allowed: a new path, an empty folder, a folder made by `made_by` (or a command in `accept`), or anything with
    `overwrite`. `replace`: the folder will be replaced whole, so it must also hold only files its maker wrote, and
    it may never be, or contain, the current folder.
    """
    path = Path(path)
    where = f"{flag} '{path_text(path)}'"
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{where} is a file: give a folder")
    if not path.exists():
        check_writable(path, flag)
        return False
    cwd = Path.cwd().resolve()
    if replace and path.resolve() in (cwd, *cwd.parents):
        raise UserInputError(f"{where} is (or contains) the current folder: give a folder of its own")
    check_writable(path / "x", flag)
    if overwrite or not any(path.iterdir()):
        return True
    owner = folder_owner(path)
    fix = f"choose a new or empty folder, or pass --overwrite to {'replace it' if replace else 'write into it anyway'}"
    if owner is None:
        raise UserInputError(f"{where} already exists and was not made by {made_by}: {fix}")
    if owner != made_by and owner not in set(accept):
        raise UserInputError(f"{where} was made by {owner}, not {made_by}: {fix}")
    if replace:
        listed = _listed_files(path)
        foreign = [f for f in _tree_files(path) if listed is None or f not in listed]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else "")
            raise UserInputError(f"{where} holds files {made_by} did not write ({shown}): move them away, "
                                 "or pass --overwrite to replace the folder with them")
    return True


def claim_file(path: str | os.PathLike, flag: str, *, overwrite: bool = False, made_by: str | None = None,
               inputs: Iterable[str | os.PathLike] = ()) -> bool:
    """Check that a command may write the file `path`; True if it exists already. Raises `UserInputError`.

    Never one of `inputs` (not even with `overwrite`). An existing file is replaced only with `overwrite` or when it
    carries `made_by`'s signature (`file_signed_by`).
    """
    path = Path(path)
    where = f"{flag} '{path_text(path)}'"
    if path.is_dir():
        raise UserInputError(f"{where} is a folder: give a file name")
    for source in inputs:
        if _same_path(path, Path(source)):
            raise UserInputError(f"{where} is also an input ('{path_text(Path(source))}'): write to another file")
    check_writable(path, flag)
    if path.exists() and not overwrite and not (made_by and file_signed_by(path, made_by)):
        raise UserInputError(f"{where} already exists: choose another name, or pass --overwrite to replace it")
    return path.exists()


# ------------------------------------------------------------------------------------------------ writing
def _missing_top(path: Path) -> Path | None:
    """The outermost ancestor of `path` (itself included) that does not exist yet."""
    top = None
    for p in (path, *path.parents):
        if p.exists():
            break
        top = p
    return top


def _remove_if_empty_tree(top: Path | None) -> None:
    """Remove `top` if it holds nothing but folders and markers (what a failed command created)."""
    if top is None or not top.is_dir():
        return
    if all(p.is_dir() or p.name == MARKER for p in top.rglob("*")):
        shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike, *, is_dir: bool = False, made_by: str | None = None,
                overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; rename it onto `dst` only if the block succeeds.

    The temporary name keeps `dst`'s suffix (video writers pick the container from it). On error the temporary
    file or folder, and any parent folder this call created, are removed and `dst` is left untouched. A folder
    written with `made_by` gets its marker (listing its files); an existing `dst` is then replaced only if
    `claim_folder(..., replace=True)` still allows it — callers claim up front, this re-checks at the end.
    Without `made_by`, replacing is the caller's decision (a part of a folder it owns).
    """
    dst = Path(dst)
    created = _missing_top(dst.parent)
    dst.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dst.stem}.tmp-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dst.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=dst.suffix, dir=dst.parent)
        os.close(fd)
        tmp = Path(name)
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())  # mkstemp/mkdtemp make private 0600/0700 paths
    try:
        yield tmp
        if is_dir:
            if made_by is not None:
                write_marker(tmp, made_by, _tree_files(tmp))
                if dst.exists():
                    claim_folder(dst, "output", made_by, overwrite=overwrite, replace=True)
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
        _remove_if_empty_tree(created)
        raise


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, made_by: str) -> Iterator[Path]:
    """A folder a command writes into file by file (a run, a data folder); claim it first (`claim_folder`).

    Created with its marker if new. If the block fails and the folder (or the parents this call made) holds
    nothing but markers and empty folders, they are removed: an early error leaves no output behind.
    """
    path = Path(path)
    created = _missing_top(path)
    path.mkdir(parents=True, exist_ok=True)
    marked = folder_owner(path) is None
    if marked:
        write_marker(path, made_by)
    try:
        yield path
    except BaseException:
        if created is not None:
            _remove_if_empty_tree(created)
        elif marked and [p.name for p in path.iterdir()] == [MARKER]:  # the user's folder, as it was
            (path / MARKER).unlink()
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
