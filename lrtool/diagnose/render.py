"""What `lrtool diagnose` shows people besides the JSON report: the rows of --table (the CLI renders them
with rich) and the picture of --plot. matplotlib is optional, not a dependency of lrtool: without it,
--plot is a one-line error.
"""

import math
from pathlib import Path

from lrtool import outputs
from lrtool.errors import LrtoolError


def pair_order(count: int) -> list[tuple[int, int]]:
    """The pairs of `count` inputs (0-based indices) in the order the report lists them: (0, 1), (0, 2),
    ..., (1, 2), ... One definition for the report, its table and its picture."""
    return [(i, j) for i in range(count) for j in range(i + 1, count)]


def summary_rows(report: dict) -> list[dict]:
    """One row per adapter for a table: its figures and its findings' codes, counted, worst first."""
    rows = []
    for entry in report["adapters"]:
        counts: dict[tuple[str, str], int] = {}
        for f in entry["findings"]:
            counts[f["severity"], f["code"]] = counts.get((f["severity"], f["code"]), 0) + 1
        rows.append(
            {
                "path": entry["path"],
                "format": entry["format"] or "-",
                "rank": entry["rank"],
                "alpha": entry["alpha"],
                "scale from": entry.get("scale_source") or "-",
                "modules": len(entry["modules"]),
                "norm": entry["norm"],
                "findings": [(severity, code, n) for (severity, code), n in counts.items()],
            }
        )
    return rows


def check_plot_available() -> None:
    """Raise LrtoolError (exit 1) when matplotlib, which --plot needs, is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LrtoolError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None


def write_plot(report: dict, handle) -> None:
    """Draw the report as a PNG into a binary `handle`: each adapter's spectra (every module's singular
    values over its largest, faint, and their mean, bold) and, for two or more adapters, the cosine matrix."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    adapters = report["adapters"]
    labels = [f"{n}. {Path(entry['path']).name}" for n, entry in enumerate(adapters, start=1)]
    with_matrix = len(adapters) > 1
    figure, axes = plt.subplots(
        1, 2 if with_matrix else 1, figsize=(12 if with_matrix else 6.5, 5), squeeze=False
    )
    spectra = axes[0][0]
    for n, entry in enumerate(adapters):
        curves = [
            [s / m["singular_values"][0] for s in m["singular_values"]]
            for m in entry["modules"]
            if m["singular_values"] and m["singular_values"][0]
        ]
        for curve in curves:
            spectra.plot(range(1, len(curve) + 1), curve, color=f"C{n % 10}", alpha=0.15, linewidth=0.7)
        if curves:
            columns = [[c[i] for c in curves if i < len(c)] for i in range(max(map(len, curves)))]
            mean = [sum(column) / len(column) for column in columns]
            spectra.plot(range(1, len(mean) + 1), mean, color=f"C{n % 10}", linewidth=2, label=labels[n])
    spectra.set(
        title="Spectra of dW (singular values / largest)", xlabel="i", ylabel="s_i / s_1", yscale="log"
    )
    spectra.xaxis.set_major_locator(MaxNLocator(integer=True))
    if spectra.lines:
        spectra.legend(fontsize="small")
    if with_matrix:
        # The diagonal is 1 for a non-zero update.
        matrix = [[math.nan] * len(adapters) for _ in adapters]
        for i, entry in enumerate(adapters):
            matrix[i][i] = 1.0 if entry["norm"] else math.nan
        for (i, j), pair in zip(pair_order(len(adapters)), report["pairs"]):
            cosine = pair["cosine"]
            matrix[i][j] = matrix[j][i] = math.nan if cosine is None else cosine
        cosines = axes[0][1]
        image = cosines.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
        ticks = range(len(adapters))
        cosines.set(title="Cosine of the whole updates", xticks=ticks, yticks=ticks)
        cosines.set_xticklabels(labels, rotation=45, ha="right", fontsize="small")
        cosines.set_yticklabels(labels, fontsize="small")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    colour = "white" if abs(value) > 0.6 else "black"
                    cosines.text(
                        j, i, f"{value:.2f}", ha="center", va="center", fontsize="small", color=colour
                    )
        figure.colorbar(image, ax=cosines)
    figure.tight_layout()
    figure.savefig(
        handle, format="png", dpi=100, bbox_inches="tight", metadata={"Software": outputs.PNG_SOFTWARE}
    )
    plt.close(figure)
