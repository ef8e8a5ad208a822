"""gen-data generators: synthetic datasets whose test sets need composition. One module per task.

Every task module exposes the same small interface, which the CLI drives:

    SPLITS            the split names, in the order `-o DIR` writes them
    HELDOUT_SPLITS    the splits that also come in held-out (evaluation) templates
    SIZES             preset name -> dict of Config field values (`--size`)
    Config            a frozen dataclass of the world's knobs; `Config.for_size(size, **overrides)`
    generate(config, split, *, seed, templates) -> list of records (dicts)
    describe(config)  the world's knobs and sizes (logged with -v)
    warnings_for(config)  legal settings that are probably not what was meant (logged as warnings)

A record is `{"prompt": str, "answer": str, "meta": {...}}` (see `record`). Generators are pure Python
(no torch) and deterministic: the same config, split, seed and templates give the same records in the
same order.
"""

import importlib

TASKS = {"two-hop": "lrtool.data.twohop", "math": "lrtool.data.math"}
TEMPLATE_SETS = ("train", "eval")


def task_module(task: str):
    """The generator module for a task name (`two-hop`, `math`)."""
    return importlib.import_module(TASKS[task])


def check_request(splits: tuple[str, ...], split: str, templates: str) -> None:
    """Refuse an unknown split or template set, and held-out templates for pretrain (which has none)."""
    from lrtool.errors import UsageError

    if split not in splits:
        raise UsageError(f"unknown split {split!r}; choose one of {', '.join(splits)}")
    if templates not in TEMPLATE_SETS:
        raise UsageError(f"unknown template set {templates!r}; choose one of {', '.join(TEMPLATE_SETS)}")
    if split == "pretrain" and templates != "train":
        raise UsageError("the pretrain split uses the training templates only (drop --templates eval)")


def record(prompt: str, answer: str, meta: dict) -> dict:
    """One dataset line. `answer` is what a model must produce after `prompt` and one space."""
    return {"prompt": prompt, "answer": answer, "meta": meta}


def write_dataset_dir(module, config, seed: int, directory) -> dict:
    """Write every split of a task into `directory`: `<split>.jsonl` in the training templates and
    `<split>.eval.jsonl` in the held-out ones. Returns {"files": {name: lines}, "config": {...}}."""
    from dataclasses import asdict
    from pathlib import Path

    from lrtool.io import write_jsonl

    files = {}
    jobs = [(s, "train", f"{s}.jsonl") for s in module.SPLITS]
    jobs += [(s, "eval", f"{s}.eval.jsonl") for s in module.HELDOUT_SPLITS]
    for split, templates, name in jobs:
        with open(Path(directory) / name, "w", encoding="utf-8", newline="\n") as handle:
            files[name] = write_jsonl(module.generate(config, split, seed=seed, templates=templates), handle)
    return {"files": files, "config": asdict(config)}
