"""`lrtool eval`: score base, adapters, merges and models side by side on JSONL datasets.

Reads datasets (lrtool.evaluate.datasets), the base and the systems (lrtool.evaluate.systems, run); returns
the report (lrtool.evaluate.report): settings, inputs with their sha256, datasets, systems, and a flat list
of rows, one per (system, dataset, group) with n, each metric and its 95% bootstrap interval, plus paired
differences to a reference system. The CLI prints it; `prediction_lines` gives --predictions' lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lrtool import __version__, io
from lrtool.errors import UsageError
from lrtool.evaluate.datasets import Dataset, breakdowns, read_datasets
from lrtool.evaluate.report import DIGITS, build_rows, metric_names, prediction_lines, primary_metric
from lrtool.evaluate.run import RunSettings, score
from lrtool.evaluate.systems import SystemSpec, gather_systems, parse_system

SCORES = ("exact", "loglik")

__all__ = [
    "SCORES",
    "EvalSettings",
    "Evaluation",
    "SystemSpec",
    "below",
    "evaluate",
    "gather_systems",
    "parse_scores",
    "parse_system",
    "primary_metric",
]


@dataclass
class EvalSettings:
    datasets: list[str]
    base: str
    systems: list[SystemSpec]
    scores: list[str] = field(default_factory=lambda: ["exact"])
    by: list[str] | None = None  # None: the default breakdowns
    bootstrap: int = 1000
    reference: str | None = None
    limit: int | None = None
    run: RunSettings = field(default_factory=RunSettings)

    def check(self) -> None:
        """Usage errors that need no file read: reference, choices, counts."""
        names = [s.name for s in self.systems]
        if self.reference is not None and self.reference not in names:
            raise UsageError(
                f"--reference {self.reference}: no system has that name (systems: {', '.join(names)})"
            )
        if self.run.choices is not None and "loglik" not in self.scores:
            raise UsageError("--choices sets the candidates of --score loglik; add loglik to --score")
        if self.run.max_choices < 2:
            raise UsageError("--max-choices must be at least 2 (the answer and one other candidate)")


@dataclass
class Evaluation:
    report: dict | None  # None on the processes of a distributed run that do not write
    datasets: list[Dataset]
    system_names: list[str]
    outcomes: dict

    def prediction_lines(self):
        return prediction_lines(self.system_names, self.datasets, self.outcomes)


def parse_scores(text: str) -> list[str]:
    scores = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in scores if s not in SCORES]
    if not scores or unknown:
        raise UsageError(f"--score takes exact, loglik or exact,loglik; got {text!r}")
    return [s for s in SCORES if s in scores]


def evaluate(settings: EvalSettings, on_progress: Callable[[int, int], None] | None = None) -> Evaluation:
    """Read, score and report (see the module's docstring). Inputs are checked before any model is loaded."""
    settings.check()
    datasets = read_datasets(settings.datasets, settings.limit)
    chosen = breakdowns(datasets, settings.by)
    run = settings.run
    run.exact, run.loglik = "exact" in settings.scores, "loglik" in settings.scores
    scored = score(settings.base, settings.systems, datasets, run, on_progress)
    names = [s.name for s in settings.systems]
    evaluation = Evaluation(None, datasets, names, scored.outcomes)
    from lrtool.train import Distributed

    if not Distributed.from_env().is_main:
        return evaluation
    rows = build_rows(
        names,
        datasets,
        scored.outcomes,
        settings.scores,
        chosen,
        settings.bootstrap,
        run.seed,
        settings.reference,
    )
    inputs = [d.path for d in datasets if d.path != io.STDIO]
    inputs += [s.path for s in settings.systems if s.path is not None]
    if Path(settings.base).exists():
        inputs.append(settings.base)
    report = {
        "lrtool": __version__,
        "settings": {
            "base": settings.base,
            "batch_size": run.batch_size,
            "bootstrap": settings.bootstrap,
            "by": settings.by,
            "chat_template": run.chat_template,
            "choices": run.choices,
            "device": run.device,
            "dtype": run.dtype,
            "limit": settings.limit,
            "max_choices": run.max_choices if run.loglik else None,
            "max_new_tokens": scored.max_new_tokens,
            "metrics": metric_names(settings.scores),
            "reference": settings.reference,
            "score": settings.scores,
            "seed": run.seed,
        },
        "inputs": {path: io.sha256_path(path) for path in dict.fromkeys(inputs)},
        "datasets": [
            {
                "name": d.name,
                "path": d.path,
                "examples": len(d.examples),
                "answers": len({example.answer.strip() for example in d.examples}),
                "by": [list(keys) for keys in by],
            }
            for d, by in zip(datasets, chosen)
        ],
        "systems": [
            {"name": spec.name, "spec": spec.spec, "path": _resolved(spec.path), **described}
            for spec, described in zip(settings.systems, scored.described)
        ],
        "rows": rows,
    }
    evaluation.report = io.rounded(report, DIGITS)
    return evaluation


def below(report: dict, threshold: float) -> list[dict]:
    """The whole-dataset rows whose primary metric is below `threshold` (the --fail-under gate)."""
    metric = primary_metric(report["settings"]["score"])
    return [
        row
        for row in report["rows"]
        if "reference" not in row and not row["group"] and row[metric] is not None and row[metric] < threshold
    ]


def _resolved(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())
