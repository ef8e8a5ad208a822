"""`eval --combine`: pool eval reports of the same experiment run with different seeds into one report.

Reads eval reports (JSON, as `lrtool eval` writes them); returns a report of the same flat shape: one row per
(system, [reference,] dataset, group) found in any report, with n summed, each metric's mean over the
reports that have the row (each seed counts once), its 95% t interval over those reports (df = reports - 1;
the row's own bootstrap interval when only one report has it; a rate's interval clipped to [0, 1], a
difference of rates' to [-1, 1]), and, to read the variation within each
seed, `<metric>_seeds` and `<metric>_ci95_seeds` (each report's value and bootstrap interval, in order).
Writes nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lrtool import __version__, io
from lrtool.errors import InputError

DIGITS = 6
RATES = ("exact_match", "choice_accuracy")  # metrics that are shares of examples, within [0, 1]
# Two-sided 95% quantiles of Student's t by degrees of freedom (1..30); beyond, the normal's 1.96.
T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def read_report(path: str) -> dict:
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not an eval report ({io.dumps_line(str(error))[1:-1]})") from None
    if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
        raise InputError(f"{path}: not an eval report (no rows); give reports lrtool eval wrote")
    return report


def t_interval(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = (T975[len(values) - 2] if len(values) - 1 <= len(T975) else 1.96) * spread / math.sqrt(len(values))
    return [mean - half, mean + half]


def combine(paths: list[str]) -> dict:
    """The pooled report of the eval reports at `paths` (see the module's docstring)."""
    reports = [read_report(path) for path in paths]
    cells: dict[tuple, list[dict]] = {}
    for report in reports:
        for row in report["rows"]:
            key = (row["system"], row.get("reference"), row["dataset"], io.dumps_line(row["group"]))
            cells.setdefault(key, []).append(row)
    rows = []
    for (system, reference, dataset, _), found in cells.items():
        row = {
            "system": system,
            "dataset": dataset,
            "group": found[0]["group"],
            "n": sum(r["n"] for r in found),
        }
        if reference is not None:
            row["reference"] = reference
        row["seeds"] = len(found)
        for name in sorted({k for r in found for k in r if _is_metric(k, r)}):
            values = [r[name] for r in found if r.get(name) is not None]
            if not values:
                continue
            row[name] = sum(values) / len(values)
            row[f"{name}_seeds"] = values
            row[f"{name}_ci95_seeds"] = [r.get(f"{name}_ci95") for r in found if r.get(name) is not None]
            interval = t_interval(values) if len(values) > 1 else found[0].get(f"{name}_ci95")
            row[f"{name}_ci95"] = _clipped(name, interval)
        rows.append(row)
    systems, datasets = {}, {}
    for report in reports:
        for system in report.get("systems", []):
            systems.setdefault(system["name"], system)
        for dataset in report.get("datasets", []):
            datasets.setdefault(dataset["name"], dataset)
    combined = {
        "lrtool": __version__,
        "combined": list(paths),
        "settings": {
            "interval": "95% t interval over the reports (one per seed); one report: its bootstrap interval",
            "metrics": sorted({m for r in reports for m in r.get("settings", {}).get("metrics", [])}),
            "reference": next((r["settings"].get("reference") for r in reports if r.get("settings")), None),
            "reports": len(reports),
        },
        "systems": list(systems.values()),
        "datasets": list(datasets.values()),
        "rows": rows,
    }
    return io.rounded(combined, DIGITS)


def _clipped(name: str, interval: list[float] | None) -> list[float] | None:
    """A t interval of a rate (exact match, choice accuracy) kept within [0, 1], of a difference of rates
    within [-1, 1]: the normal approximation overshoots near the ends; other metrics are not bounded."""
    rate = name.split("_difference")[0] in RATES
    if interval is None or not rate:
        return interval
    low = -1.0 if name.endswith("_difference") else 0.0
    return [min(max(interval[0], low), 1.0), min(max(interval[1], low), 1.0)]


def _is_metric(key: str, row: dict) -> bool:
    """A metric field of a report row: a number that is not n, not an interval."""
    return (
        key not in ("n",)
        and not key.endswith("_ci95")
        and isinstance(row[key], (int, float))
        and not isinstance(row[key], bool)
    )
