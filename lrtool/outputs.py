"""Outputs that appear complete or not at all, and only where lrtool may write.

Writes every output through a temporary sibling renamed into place when complete (`atomic_output_dir`,
`atomic_output_file`; the directory's lrtool.json is its io.Manifest), refuses what must not be written
(`check_output_free`: an existing output without --force, anything not lrtool's even with it, links,
devices, an input of the run), removes the temporaries of killed runs, and turns a full disk into one error
line naming the output. Reads only the first bytes of a file --force would replace.
"""

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from lrtool.errors import OutputError, OutputExistsError, UsageError
from lrtool.io import MANIFEST, STDIO, Manifest

# Errors that mean "the output could not be written" (a full disk, a quota, a read-only file system).
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
PNG_SOFTWARE = "lrtool"  # the tEXt "Software" of every PNG lrtool draws (how --force knows its plots)


def check_output_free(
    path: str | Path, force: bool, inputs: Iterable[str | Path] = (), directory: bool = False
) -> None:
    """Refuse an output path that must not be written (call before the work starts, so nothing is wasted).

    An existing output is replaced only with `force`, and even then only when it is lrtool's own: a
    directory that is empty or holds lrtool.json (never the working directory or one above it), or a file
    of a kind lrtool writes (a JSONL dataset or predictions, a report with an "lrtool" key, a PNG lrtool
    drew). Links, devices and other special files are never outputs. An output equal to, inside or holding
    one of `inputs` is a usage error: replacing it would destroy what the run reads.
    """
    if str(path) == STDIO and directory:
        raise UsageError("-o -: this output is a directory, it cannot go to stdout; give a directory")
    path = Path(path)
    if path.is_symlink() or (path.exists() and not (path.is_file() or path.is_dir())):
        if str(path) in ("/dev/stdout", "/dev/stderr") or str(path).startswith("/proc/self/fd/"):
            raise UsageError(f"-o {path}: write to stdout with '-' instead")
        what = "a symbolic link" if path.is_symlink() else "not a regular file or directory (a device?)"
        raise UsageError(f"{path} is {what}; lrtool writes only plain files and directories")
    _check_not_an_input(path, inputs)
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise UsageError(f"{path}: {parent} is a file, not a directory; choose another output")
        return
    if not force:
        raise OutputExistsError(f"{path} exists; pass --force to replace it")
    if path.is_dir():
        resolved, here = path.resolve(), Path.cwd().resolve()
        if resolved == here or resolved in here.parents:
            raise OutputExistsError(f"{path} is the working directory or holds it; choose another output")
        if any(path.iterdir()) and not (path / MANIFEST).is_file():
            raise OutputExistsError(
                f"{path} is a directory lrtool did not write (no {MANIFEST}); remove it yourself or choose "
                "another output"
            )
    elif not written_by_lrtool(path):
        raise OutputExistsError(
            f"{path} is a file lrtool did not write (not an lrtool dataset, predictions, report or plot); "
            "remove it yourself or choose another output"
        )


def _check_not_an_input(path: Path, inputs: Iterable[str | Path]) -> None:
    target = path.resolve()
    for given in inputs:
        if str(given) == STDIO or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise UsageError(
                f"the output {path} is, holds or lies inside the input {given}; choose another output"
            )


def written_by_lrtool(path: str | Path) -> bool:
    """Whether a file looks like one lrtool writes: empty; a JSONL file whose first line is a dataset line
    (prompt, answer) or a prediction (system, line); a JSON object with an "lrtool" key; a PNG whose
    Software text is lrtool's."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    if not head.strip():
        return True
    if head.startswith(b"\x89PNG"):
        return b"Software\x00" + PNG_SOFTWARE.encode() in head
    try:
        first = json.loads(head.split(b"\n", 1)[0])
    except (ValueError, RecursionError):
        first = None  # a report written over several lines: its first line is "{"
    if isinstance(first, dict) and (
        {"prompt", "answer"} <= first.keys() or {"system", "line"} <= first.keys()
    ):
        return True
    try:
        whole = json.loads(Path(path).read_bytes()) if Path(path).stat().st_size < (64 << 20) else None
    except (ValueError, RecursionError):
        return False
    return isinstance(whole, dict) and "lrtool" in whole


def _temporary_prefix(path: Path) -> str:
    """`.NAME.PID.`: a temporary sibling names the process that owns it, so later runs can tell stale ones."""
    return f".{path.name}.{os.getpid()}."


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary siblings of `path` that lrtool's processes left when they were killed (named
    `.NAME.PID.*.tmp` or `.NAME.old-PID`, PID no longer running); return what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for sibling in path.parent.iterdir():
        owner = _temporary_owner(sibling.name, path.name)
        if owner is None or owner == os.getpid() or _running(owner):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


def _temporary_owner(name: str, output: str) -> int | None:
    prefix = f".{output}."
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix) :]
    if rest.startswith("old-") and rest[4:].isdigit():
        return int(rest[4:])
    pid, _, tail = rest.partition(".")
    return int(pid) if pid.isdigit() and tail.endswith(".tmp") else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a full disk, a quota or a read-only file system met while writing `path` into one error line."""
    try:
        yield
    except OSError as error:
        if error.errno not in WRITE_ERRORS:
            raise
        where = "stdout" if str(path) == STDIO else str(path)
        raise OutputError(f"cannot write {where}: {error.strerror or error}") from None


@contextlib.contextmanager
def atomic_output_dir(
    path: str | Path,
    force: bool = False,
    enabled: bool = True,
    inputs: Iterable[str | Path] = (),
    manifest: Manifest | None = None,
) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it gets `manifest` as lrtool.json and is renamed to
    `path`; on failure it is removed.

    With `force`, an existing `path` is replaced only once the new output is complete. `enabled=False`
    (the processes of a distributed run that do not write) yields `path` itself and touches nothing.
    Every file in the output gets the umask's permissions (libraries write some private).
    """
    check_output_free(path, force, inputs, directory=True)
    path = Path(path)
    if not enabled:
        yield path
        return
    remove_stale_temporaries(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        with writing(path):
            yield tmp
            if manifest is not None:
                manifest.write(tmp)
            _share(tmp)
            _replace(tmp, path, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _share(directory: Path) -> None:
    """Give a finished output directory and everything in it the permissions the umask allows."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_output_file(
    path: str | Path, force: bool = False, mode: str = "w", inputs: Iterable[str | Path] = ()
) -> Iterator:
    """Yield a handle on a temporary sibling file that becomes `path` when the block succeeds.

    `path` '-' yields stdout (binary modes get stdout's buffer), flushed at the end so that a failed write
    is an error here and not a lost tail.
    """
    if str(path) == STDIO:
        handle = sys.stdout.buffer if "b" in mode else sys.stdout
        with writing(STDIO):
            yield handle
            handle.flush()
        return
    check_output_free(path, force, inputs)
    path = Path(path)
    remove_stale_temporaries(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        encoding = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with writing(path), open(fd, mode, **encoding) as handle:
            yield handle
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
        _replace(tmp, path, force)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: Path, path: Path, force: bool) -> None:
    """Move a finished temporary output into place, replacing an old one only when forced."""
    if path.exists() or path.is_symlink():
        if not force:  # appeared while we worked
            raise OutputExistsError(f"{path} exists; pass --force to replace it")
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, path)
