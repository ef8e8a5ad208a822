"""Files in and out: JSONL streams ('-' = stdin/stdout), JSON reports, manifests, hashing.

Every verb reads its JSONL through here (FILE:LINE errors), writes JSON the same way (keys sorted, no NaN,
floats rounded where a report wants it) and describes its output directory in one `Manifest` (lrtool.json:
version, command line, seed, sha256 of the inputs). Where outputs go and how they appear complete or not
at all is lrtool.outputs'.
"""

import contextlib
import hashlib
import json
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lrtool import __version__
from lrtool.errors import InputError

MANIFEST = "lrtool.json"
STDIO = "-"


def dumps_line(obj) -> str:
    """One JSON line: keys sorted, compact, UTF-8 characters kept (so the same data gives the same bytes);
    NaN and infinities, which JSON lacks, as null."""
    return json.dumps(
        _json_safe(obj), sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )


def dumps_report(obj) -> str:
    """A report or manifest for people and machines: keys sorted, indented, newline-terminated."""
    return json.dumps(_json_safe(obj), sort_keys=True, ensure_ascii=False, indent=2, allow_nan=False) + "\n"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


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
    except RecursionError:
        raise InputError(f"{where}: nested too deeply to be a dataset line") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in required:
        if key not in obj:
            raise InputError(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], str):
            raise InputError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
        try:
            obj[key].encode("utf-8")
        except UnicodeEncodeError:  # JSON's \ud800-style escapes can spell half a character
            raise InputError(
                f"{where}: field {key!r} holds a lone surrogate (\\ud800-\\udfff), not text"
            ) from None
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


@dataclass
class Manifest:
    """What an output directory's lrtool.json says: the lrtool version, the command line, the seed, the
    sha256 of every input (`inputs`: paths, or a mapping path -> sha256 already computed, so that large
    inputs are not hashed twice) and verb-specific facts (`extra`: a dataset's config, a merge's method,
    train's settings; it cannot hide the four above). atomic_output_dir writes it, the one writer of
    lrtool.json; a verb fills `inputs` and `extra` while it works."""

    command: list[str]
    seed: int | None = None
    inputs: list | dict = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def write(self, directory: str | Path) -> Path:
        hashes = (
            dict(self.inputs)
            if isinstance(self.inputs, dict)
            else {str(p): sha256_path(p) for p in self.inputs}
        )
        content = {
            **self.extra,
            "lrtool": __version__,
            "command": self.command,
            "seed": self.seed,
            "inputs": hashes,
        }
        target = Path(directory) / MANIFEST
        target.write_text(dumps_report(content), encoding="utf-8")
        return target


def write_jsonl(records: Iterable[dict], handle) -> int:
    """Write records as JSON lines to an open text handle; return how many were written."""
    count = 0
    for obj in records:
        handle.write(dumps_line(obj))
        handle.write("\n")
        count += 1
    return count
