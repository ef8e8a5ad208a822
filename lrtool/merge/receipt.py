"""The receipt of a merge, merge_report.json: what was merged, how, and how exact the stored result is.

Built from the plan and the rows its modules gave (plan.py stores an adapter's, into_base.py a model's);
written into the output directory beside the merge. Per module: `error` = ||stored - exact||_F /
||exact||_F (what storage lost: dtype rounding, truncation; 0 when exact is 0) and `from_linear` =
||exact - linear||_F / ||linear||_F (how far the method's definition is from the weighted sum of the
updates), both computed in float64 from factors where the result is factored (lrtool.lowrank), densely
otherwise; `norm` = ||exact||_F. Floats are rounded to DIGITS significant digits by lrtool.io.rounded
(non-finite ones written as null; these figures are norms and their ratios, never -0.0, which it would
write as 0.0). Also here: the lines the CLI logs for people, and the inputs' sha256 for lrtool.json.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from lrtool.io import dumps_report, rounded, sha256_path
from lrtool.model_files import ModelFiles

REPORT = "merge_report.json"
DIGITS = 6  # significant digits of the receipt's floats
EXACT = 1e-6  # a stored module whose relative error is below this is reported as exact (float rounding)


def input_hash(adapter) -> str | None:
    """sha256 of the file or directory an adapter was read from (None: not read from one)."""
    path = Path(adapter.source) if adapter.source else None
    return sha256_path(path) if path is not None and path.exists() else None


@contextmanager
def hashing_in_background(adapters: Sequence) -> Iterator[Callable[[], list[str | None]]]:
    """Hash the adapters' inputs in a thread while the merge computes (hashlib and file reads release the
    GIL, so the hashes cost little of the merge's time); yields a function that waits for them."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(lambda: [input_hash(adapter) for adapter in adapters])
        yield pending.result


def build(
    plan, rows: dict[str, dict], into_base: ModelFiles | None = None, hashes: list[str | None] | None = None
) -> dict:
    """The receipt of `plan` (a plan.MergePlan) whose modules gave `rows`, stored as an adapter or, with
    `into_base`, added to that base's weights: method, weights, parameters, seed, inputs (with sha256;
    `hashes` when already computed, one per adapter), per-module rows, summary."""
    output = "adapter" if into_base is None else "model"
    parameters = {p.name: getattr(plan.settings, p.attribute) for p in plan.method.parameters}
    hashes = [input_hash(adapter) for adapter in plan.adapters] if hashes is None else hashes
    inputs = []
    for adapter, sha256 in zip(plan.adapters, hashes):
        inputs.append(
            {
                "path": adapter.source or None,
                "sha256": sha256,
                "format": adapter.format,
                "base": adapter.base,
                "modules": len(adapter.modules),
                "rank": adapter.rank,
            }
        )
    errors = {name: row["error"] for name, row in rows.items()}
    worst = max(errors, key=lambda name: (errors[name], name))
    departures = [row["from_linear"] for row in rows.values()]
    summary = {
        "modules": len(rows),
        "error_max": errors[worst],
        "error_max_module": worst,
        "error_mean": sum(errors.values()) / len(errors),
        "exact_modules": sum(error < EXACT for error in errors.values()),
        "from_linear_max": max(departures),
        "from_linear_mean": sum(departures) / len(departures),
    }
    if output == "adapter":
        summary["rank_max"] = max(row["rank"] for row in rows.values())
        summary["stored_parameters"] = sum(
            row["rank"] * sum(plan.inputs[name].shape) for name, row in rows.items()
        )
    report = {
        "method": plan.method.name,
        "parameters": parameters,
        "weights": list(plan.settings.weights),
        "seed": plan.settings.seed,
        "inputs": inputs,
        "output": {
            "kind": "peft-adapter" if output == "adapter" else "model",
            "dtype": str(plan.dtype).removeprefix("torch.") if output == "adapter" else None,
            "base": plan.base,
        },
        "modules": rounded(rows, DIGITS),
        "summary": rounded(summary, DIGITS),
        "notes": plan.notes + _result_notes(rows, output),
        "precision": f"floats rounded to {DIGITS} significant digits",
    }
    if into_base is not None:
        report["into_base"] = {"path": into_base.source, "sha256": sha256_path(into_base.source)}
    return report


def _result_notes(rows: dict[str, dict], output: str) -> list[str]:
    notes = []
    truncated = [name for name, row in rows.items() if row.get("truncated") and row["error"] >= EXACT]
    if truncated:
        worst = max(truncated, key=lambda name: rows[name]["error"])
        notes.append(
            f"{len(truncated)} of {len(rows)} modules are stored at a rank below their full rank, an "
            f"approximation of the method's result (largest error {rounded(rows[worst]['error'], DIGITS)} in "
            f"{worst}); a --rank at least min(out, in) stores them exactly, --into-base adds the exact "
            "update"
        )
    if output == "model":
        notes.append(
            "error compares the change written into each base weight (after casting to its dtype) "
            "with the method's exact update"
        )
    return notes


def write(report: dict, directory: str | Path) -> None:
    """merge_report.json in `directory`."""
    (Path(directory) / REPORT).write_text(dumps_report(report), encoding="utf-8")


def input_hashes(report: dict, into_base: str | None = None) -> dict[str, str | None]:
    """path -> sha256 of every input, as the receipt hashed them (once): the adapters, and with --into-base
    the base under `into_base`, its path as given."""
    hashes = {item["path"]: item["sha256"] for item in report["inputs"]}
    if into_base:
        hashes[into_base] = report["into_base"]["sha256"]
    return hashes


def summary_lines(report: dict) -> list[str]:
    """A few lines for people (the CLI logs them to stderr): what was merged, how exact it is, notes."""
    result = report["summary"]
    parameters = ", ".join(f"{k} {v}" for k, v in report["parameters"].items() if v is not None)
    weights = ", ".join(f"{w:g}" for w in report["weights"])
    what = "adapter" if report["output"]["kind"] == "peft-adapter" else "model"
    lines = [
        f"merged {len(report['inputs'])} adapters into one {what} with {report['method']} "
        f"(weights {weights}{'; ' + parameters if parameters else ''}): {result['modules']} modules"
        + (f", rank up to {result['rank_max']}" if "rank_max" in result else ""),
        f"stored vs exact: relative error max {result['error_max']:.3g} ({result['error_max_module']}), "
        f"mean {result['error_mean']:.3g}; {result['exact_modules']} of {result['modules']} modules exact",
        f"distance from the linear sum: mean {result['from_linear_mean']:.3g}, "
        f"max {result['from_linear_max']:.3g}",
    ]
    return lines + [f"note: {note}" for note in report["notes"]]
