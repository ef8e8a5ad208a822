"""The datasets an evaluation scores: examples with their line numbers, breakdowns, answer candidates.

Reads JSONL datasets through lrtool.io (`{"prompt", "answer", "meta"}` a line; FILE:LINE errors) and an
optional choices file (one candidate a line). Writes nothing. A breakdown is a tuple of meta keys: its
groups are the distinct combinations of their values (one key per breakdown by default: every key whose
values are plain and take 2 to 20 distinct values).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from lrtool import io
from lrtool.errors import InputError, UsageError

DEFAULT_GROUPS = (2, 20)  # a meta key is a default breakdown when it has this many distinct values


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line number in its file
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Dataset:
    name: str  # the file's stem, unique among the datasets of a run
    path: str
    examples: list[Example]


def read_datasets(paths: list[str], limit: int | None = None) -> list[Dataset]:
    """Each file's examples (its first `limit` ones), named by stem (by path where two stems agree)."""
    stems = [Path(p).name.removesuffix(".jsonl") for p in paths]
    datasets = []
    for path, stem in zip(paths, stems):
        if path != io.STDIO and Path(path).is_dir():
            raise InputError(f"{path}: is a directory; give the JSONL files to evaluate")
        examples = []
        for line, obj in io.read_jsonl_numbered(path):
            meta = obj.get("meta", {})
            if not isinstance(meta, dict):
                raise InputError(f"{path}:{line}: field 'meta' must be an object, got {type(meta).__name__}")
            examples.append(Example(line, obj["prompt"], obj["answer"], meta))
            if limit is not None and len(examples) >= limit:
                break
        if not examples:
            raise InputError(f"{path}: no examples (the file is empty)")
        datasets.append(Dataset(stem if stems.count(stem) == 1 else path, path, examples))
    if len({d.name for d in datasets}) < len(datasets):
        raise UsageError("a dataset is named twice; give each file once")
    return datasets


def prompt_too_long(
    dataset: Dataset, example: Example, positions: int, tokens: int | None = None, room: int = 0
) -> InputError:
    """The error, naming FILE:LINE, for a prompt the model cannot read: `positions` tokens or more
    (`tokens` None), or `tokens` that leave less than the `room` the answer may take."""
    where = f"{dataset.path}:{example.line}"
    if tokens is None:
        return InputError(
            f"{where}: the prompt has {positions} tokens or more, all the model reads; shorten it"
        )
    return InputError(
        f"{where}: the prompt's {tokens} tokens and the {room} its answer may take exceed the {positions} "
        "positions the model reads; shorten it, or lower --max-new-tokens"
    )


def group_value(value) -> str:
    """The key a meta value groups under (values are compared as JSON, so lists and numbers group too)."""
    return io.dumps_line(value)


def breakdowns(datasets: list[Dataset], requested: list[str] | None) -> list[list[tuple[str, ...]]]:
    """Each dataset's breakdowns: each `--by` value (comma-separated keys are crossed) for every dataset, or
    by default one per meta key whose plain values take 2 to 20 distinct values in that dataset."""
    present: dict[str, set[str]] = {}
    for dataset in datasets:
        for example in dataset.examples:
            for key, value in example.meta.items():
                present.setdefault(key, set()).add(group_value(value))
    if requested is None:
        return [_default_breakdowns(dataset) for dataset in datasets]
    chosen = []
    for text in requested:
        keys = tuple(k.strip() for k in text.split(",") if k.strip())
        if not keys:
            raise UsageError(f"--by {text!r}: give meta keys, e.g. --by familiarity or --by split,template")
        for key in keys:
            if key not in present:
                known = ", ".join(sorted(present)) or "none: the examples have no meta"
                raise UsageError(f"--by {key}: no example has meta key {key!r} (meta keys: {known})")
        if keys not in chosen:
            chosen.append(keys)
    return [list(chosen) for _ in datasets]


def _default_breakdowns(dataset: Dataset) -> list[tuple[str, ...]]:
    low, high = DEFAULT_GROUPS
    values: dict[str, set[str]] = {}
    plain: dict[str, bool] = {}
    for example in dataset.examples:
        for key, value in example.meta.items():
            values.setdefault(key, set()).add(group_value(value))
            plain[key] = plain.get(key, True) and _is_plain(value)
    return [(key,) for key in sorted(values) if plain[key] and low <= len(values[key]) <= high]


def _is_plain(value) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def groups(dataset: Dataset, keys: tuple[str, ...]) -> list[tuple[dict, list[int]]]:
    """(group, indices of its examples) for one breakdown of a dataset, groups in a stable order; examples
    lacking a key group under null. A dataset without any of the keys has no groups."""
    if not any(key in e.meta for e in dataset.examples for key in keys):
        return []
    found: dict[tuple[str, ...], list[int]] = {}
    values: dict[tuple[str, ...], dict] = {}
    for index, example in enumerate(dataset.examples):
        group = {key: example.meta.get(key) for key in keys}
        sort_key = tuple(group_value(group[key]) for key in keys)
        found.setdefault(sort_key, []).append(index)
        values[sort_key] = group
    return [(values[k], found[k]) for k in sorted(found)]


def candidate_pools(datasets: list[Dataset], choices_file: str | None) -> dict[tuple[str, str], list[str]]:
    """The candidate answers of each (dataset, meta.task): the choices file's lines, or the distinct
    answers of that dataset and task. Every answer must be among its candidates."""
    if choices_file is not None:
        try:
            lines = Path(choices_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"{choices_file}: cannot read the choices ({error})") from None
        choices = sorted({line.strip() for line in lines if line.strip()})
        if not choices:
            raise InputError(f"{choices_file}: no choices (one candidate answer a line)")
    pools: dict[tuple[str, str], set[str]] = {}
    for dataset in datasets:
        for example in dataset.examples:
            key = (dataset.name, task_of(example))
            pool = pools.setdefault(key, set())
            if choices_file is None:
                pool.add(example.answer.strip())
            elif example.answer.strip() not in choices:
                raise InputError(
                    f"{dataset.path}:{example.line}: the answer {example.answer.strip()!r} is not among the "
                    f"choices of {choices_file}; add it there"
                )
    if choices_file is not None:
        return {key: choices for key in pools}
    return {key: sorted(pool) for key, pool in pools.items()}


def task_of(example: Example) -> str:
    return str(example.meta.get("task", ""))


def candidates_for(
    dataset: Dataset, example: Example, pool: list[str], max_choices: int, seed: int
) -> list[str]:
    """The answer first, then the other candidates: all of the pool, or `max_choices - 1` of them drawn
    for this example from `seed` (the same for every system, so paired comparisons stay paired)."""
    answer = example.answer.strip()
    others = [c for c in pool if c != answer]
    if len(others) > max_choices - 1:
        key = f"{seed}\0{dataset.name}\0{example.line}".encode()
        draw = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        others = sorted(draw.sample(others, max_choices - 1))
    return [answer, *others]
