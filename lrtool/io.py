"""Files in and out: JSONL streams ('-' = stdin/stdout), atomic outputs, manifests, hashing.

Every verb writes through here so that the conventions of DESIGN.md hold everywhere: an output appears
complete or not at all (written to a temporary sibling, renamed into place), an existing output is kept
unless the caller forces, and every output directory carries `lrtool.json` (version, command line, seed,
sha256 of the inputs).
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from lrtool import __version__
from lrtool.errors import InputError, OutputExistsError

MANIFEST = "lrtool.json"
STDIO = "-"


def dumps_line(obj) -> str:
    """One JSON line: keys sorted, compact, UTF-8 characters kept (so the same data gives the same bytes)."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def dumps_report(obj) -> str:
    """A report or manifest for people and machines: keys sorted, indented, newline-terminated."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=2) + "\n"


def rounded(value, digits: int = 6):
    """`value` with every float (in lists and dicts too) rounded to `digits` significant digits, so reports
    do not carry float noise; NaN and infinities, which JSON lacks, become None (null); -0.0 becomes 0.0."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.{digits}g}") + 0.0
    if isinstance(value, dict):
        return {key: rounded(v, digits) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- reading


def read_jsonl(path: str | Path, required: tuple[str, ...] = ("prompt", "answer")) -> Iterator[dict]:
    """Yield the objects of a JSONL file ('-' = stdin), checking each has the `required` string fields.

    Blank lines are skipped. A bad line raises InputError naming FILE:LINE and what is wrong.
    """
    for _, obj in read_jsonl_numbered(path, required):
        yield obj


def read_jsonl_numbered(
    path: str | Path, required: tuple[str, ...] = ("prompt", "answer")
) -> Iterator[tuple[int, dict]]:
    """As read_jsonl, with each object's 1-based line number in the file."""
    name = "<stdin>" if str(path) == STDIO else str(path)
    try:
        handle = sys.stdin if str(path) == STDIO else open(path, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{name}: cannot open: {exc.strerror or exc}") from None
    with contextlib.nullcontext(handle) if handle is sys.stdin else handle:
        try:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                yield lineno, _parse_line(line, f"{name}:{lineno}", required)
        except UnicodeDecodeError:
            raise InputError(f"{name}: not UTF-8 text") from None


def _parse_line(line: str, where: str, required: tuple[str, ...]) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in required:
        if key not in obj:
            raise InputError(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], str):
            raise InputError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
    return obj


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory as the hash of its files' relative paths and hashes."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_path(file)}\n".encode())
        return digest.hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- writing


def check_output_free(path: str | Path, force: bool) -> None:
    """Refuse an existing output unless forced (call before the work starts, so nothing is wasted).

    Even forced, a directory is replaced only when it is empty or an earlier lrtool output (it holds
    lrtool.json), and never the working directory or one above it: `-o . --force` must not empty a project.
    """
    path = Path(path)
    if not path.exists():
        return
    if not force:
        raise OutputExistsError(f"{path} exists; pass --force to replace it")
    if path.is_dir() and not path.is_symlink():
        resolved, here = path.resolve(), Path.cwd().resolve()
        if resolved == here or resolved in here.parents:
            raise OutputExistsError(f"{path} is the working directory or holds it; choose another output")
        if any(path.iterdir()) and not (path / MANIFEST).is_file():
            raise OutputExistsError(
                f"{path} is a directory lrtool did not write (no {MANIFEST}); remove it yourself or choose "
                "another output"
            )


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, force: bool = False, enabled: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it is renamed to `path`, on failure removed.

    With `force`, an existing `path` is replaced only once the new output is complete. `enabled=False`
    (the processes of a distributed run that do not write) yields `path` itself and touches nothing.
    """
    path = Path(path)
    check_output_free(path, force)
    if not enabled:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; an output is as shareable as any file
        _replace(tmp, path, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(path: str | Path, force: bool = False, mode: str = "w") -> Iterator:
    """Yield a handle on a temporary sibling file that becomes `path` when the block succeeds.

    `path` '-' yields stdout (binary modes get stdout's buffer) and needs no renaming.
    """
    if str(path) == STDIO:
        yield sys.stdout.buffer if "b" in mode else sys.stdout
        return
    path = Path(path)
    check_output_free(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with open(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as handle:
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


def write_jsonl(records: Iterable[dict], handle) -> int:
    """Write records as JSON lines to an open text handle; return how many were written."""
    count = 0
    for obj in records:
        handle.write(dumps_line(obj))
        handle.write("\n")
        count += 1
    return count


def write_manifest(
    directory: str | Path, command: list[str], seed: int | None, inputs=(), extra: dict | None = None
) -> Path:
    """Write lrtool.json into an output directory: version, command line, seed, sha256 of each input.

    `inputs` are paths, or a mapping of path -> sha256 the caller already computed (large inputs are not
    hashed twice). `extra` adds verb-specific facts (a dataset's config, a merge's method); it cannot hide
    the four above.
    """
    hashes = dict(inputs) if isinstance(inputs, dict) else {str(p): sha256_path(p) for p in inputs}
    manifest = {
        **(extra or {}),
        "lrtool": __version__,
        "command": command,
        "seed": seed,
        "inputs": hashes,
    }
    target = Path(directory) / MANIFEST
    target.write_text(dumps_report(manifest), encoding="utf-8")
    return target
