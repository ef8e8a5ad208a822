"""eval's report: per (system, dataset, group) cell the metrics with 95% bootstrap intervals, and paired
differences to a reference system.

Reads the outcomes of lrtool.evaluate.run; returns plain JSON-ready data (floats to 6 significant digits) with
a flat `rows` list. An interval is the 2.5th and 97.5th percentile of the metric over `resamples` bootstrap
resamples of the cell's examples; each cell draws from its own seed (the run's seed and the cell's names),
so a cell's interval does not depend on which other systems or datasets were evaluated, and a paired
difference resamples the examples of both systems jointly (it is the bootstrap of per-example differences).
"""

from __future__ import annotations

import hashlib

from lrtool import io
from lrtool.evaluate.datasets import Dataset, groups
from lrtool.evaluate.run import Outcome

DIGITS = 6
# Metric name -> (the score that produces it, its per-example value).
METRICS = {
    "exact_match": ("exact", lambda o: float(o.correct)),
    "loglik": ("loglik", lambda o: o.loglik),
    "loglik_per_token": ("loglik", lambda o: o.loglik / max(1, o.answer_tokens)),
    "choice_accuracy": ("loglik", lambda o: float(o.choice_correct)),
}


def metric_names(scores: list[str]) -> list[str]:
    return [name for name, (score, _) in METRICS.items() if score in scores]


def primary_metric(scores: list[str]) -> str:
    """The metric --fail-under and the plot use: exact match when scored, else choice accuracy."""
    return "exact_match" if "exact" in scores else "choice_accuracy"


def build_rows(
    system_names: list[str],
    datasets: list[Dataset],
    outcomes: dict[tuple[int, int, int], Outcome],
    scores: list[str],
    breakdowns: list[list[tuple[str, ...]]],
    resamples: int,
    seed: int,
    reference: str | None,
) -> list[dict]:
    """Every cell's row, then (with a reference) every other system's paired-difference row."""
    import numpy as np

    metrics = metric_names(scores)
    extract = [METRICS[m][1] for m in metrics]
    values = {  # (system, dataset) -> [metric, example] array
        (s, d): np.array(
            [[f(outcomes[(s, d, e)]) for e in range(len(dataset.examples))] for f in extract],
            dtype=np.float64,
        )
        for s in range(len(system_names))
        for d, dataset in enumerate(datasets)
    }
    cells = []  # (dataset index, group, example indices)
    for d, dataset in enumerate(datasets):
        cells.append((d, {}, list(range(len(dataset.examples)))))
        for keys in breakdowns[d]:
            cells.extend((d, group, indices) for group, indices in groups(dataset, keys))
    rows = []
    for s, system in enumerate(system_names):
        for d, group, indices in cells:
            row = {"system": system, "dataset": datasets[d].name, "group": group, "n": len(indices)}
            cell = values[(s, d)][:, indices]
            key = [system, datasets[d].name, io.dumps_line(group)]
            row.update(_summaries(metrics, cell, resamples, seed, key, suffix=""))
            rows.append(row)
    if reference is not None:
        r = system_names.index(reference)
        for s, system in enumerate(system_names):
            if s == r:
                continue
            for d, group, indices in cells:
                row = {
                    "system": system,
                    "reference": reference,
                    "dataset": datasets[d].name,
                    "group": group,
                    "n": len(indices),
                }
                cell = values[(s, d)][:, indices] - values[(r, d)][:, indices]
                key = [system, reference, datasets[d].name, io.dumps_line(group)]
                row.update(_summaries(metrics, cell, resamples, seed, key, suffix="_difference"))
                rows.append(row)
    return rows


def _summaries(metrics, cell, resamples: int, seed: int, key: list[str], suffix: str) -> dict:
    """Each metric's mean over the cell's examples and, with resamples, its percentile interval."""
    out = {}
    means = cell.mean(axis=1)
    intervals = bootstrap_intervals(cell, resamples, seed, key) if resamples else None
    for m, name in enumerate(metrics):
        out[f"{name}{suffix}"] = float(means[m])
        if intervals is not None:
            out[f"{name}{suffix}_ci95"] = [float(intervals[m, 0]), float(intervals[m, 1])]
    return out


def bootstrap_intervals(values, resamples: int, seed: int, key: list[str]):
    """[metric, (lo, hi)]: the 2.5th and 97.5th percentiles of the mean of each row of `values` [metric, n]
    over `resamples` resamples of its n columns with replacement (the same resamples for every metric)."""
    import numpy as np

    digest = hashlib.sha256("\0".join(key).encode()).digest()
    rng = np.random.default_rng(
        [seed, *(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4))]
    )
    n = values.shape[1]
    per_chunk = max(1, 4_000_000 // n)  # bounds the [resample, n] counts' memory
    means = []
    for start in range(0, resamples, per_chunk):
        chunk = min(per_chunk, resamples - start)
        picks = rng.integers(0, n, size=(chunk, n))
        # How often each example was drawn in each resample: a resample's mean is counts @ values / n.
        counts = np.bincount((picks + n * np.arange(chunk)[:, None]).ravel(), minlength=chunk * n)
        means.append(counts.reshape(chunk, n) @ values.T / n)
    return np.percentile(np.concatenate(means, axis=0), [2.5, 97.5], axis=0).T


def prediction_lines(
    system_names: list[str], datasets: list[Dataset], outcomes: dict[tuple[int, int, int], Outcome]
):
    """--predictions: one JSON object per (system, example), systems and datasets in the command's order."""
    for s, system in enumerate(system_names):
        for d, dataset in enumerate(datasets):
            for e, example in enumerate(dataset.examples):
                outcome = outcomes[(s, d, e)]
                line = {
                    "system": system,
                    "dataset": dataset.name,
                    "line": example.line,
                    "prompt": example.prompt,
                    "answer": example.answer,
                    "meta": example.meta,
                }
                if outcome.prediction is not None:
                    line.update(prediction=outcome.prediction, correct=outcome.correct)
                if outcome.loglik is not None:
                    line.update(
                        loglik=outcome.loglik,
                        loglik_per_token=outcome.loglik / max(1, outcome.answer_tokens),
                        answer_tokens=outcome.answer_tokens,
                        choice_correct=outcome.choice_correct,
                    )
                yield io.rounded(line, DIGITS)
