"""Diagnose LoRA adapters: is each one intact, what format is it, does it fit a base, is it doing anything,
and will several of them interfere when merged. `diagnose(paths, base)` returns the report that
`lrtool diagnose` prints, as plain data.

    findings.py   the finding codes, their severities and thresholds (the table the help lists)
    reading.py    read adapters (PEFT, kohya, diffusers) without refusing anything: findings
    base_check.py an adapter against its --base (read through lrtool.model_files.ModelFiles): shapes, norms
    figures.py    spectra and pairwise figures from the factors, never a whole dense dW (but in blocks)
    report.py     the report: every input, every module, every pair
    render.py     for people: the rows of --table and the picture of --plot

This package imports no torch until `diagnose` runs: the CLI reads FINDINGS to build its help.
"""

from lrtool.diagnose.findings import FINDINGS, SEVERITIES, at_or_above, finding
from lrtool.diagnose.render import check_plot_available, pair_order, summary_rows, write_plot

__all__ = [
    "FINDINGS",
    "SEVERITIES",
    "at_or_above",
    "check_plot_available",
    "diagnose",
    "finding",
    "pair_order",
    "summary_rows",
    "write_plot",
]


def diagnose(paths: list[str], base: str | None = None, exact_sign_conflicts: bool = False) -> dict:
    """The report on each adapter in `paths` (and, with `base`, on its fit to that model directory) and on
    each pair of them: see report.diagnose."""
    from lrtool.diagnose.report import diagnose as report  # torch and safetensors: only when diagnosing

    return report(paths, base, exact_sign_conflicts=exact_sign_conflicts)
