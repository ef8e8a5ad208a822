"""eval --plot: grouped bars with 95% interval whiskers, one panel per dataset.

Reads an eval report (lrtool.evaluate); writes a PNG to an open binary handle. Bars are the primary metric
(exact match, else choice accuracy) of each system, grouped by the values of the first breakdown (the whole
dataset when there is none). Needs matplotlib (the `plot` extra).
"""

from __future__ import annotations

from lrtool import outputs
from lrtool.errors import InputError
from lrtool.evaluate.report import primary_metric


def check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(
            "--plot needs matplotlib: pip install 'lrtool[plot]' (or pip install matplotlib)"
        ) from None


def write_plot(report: dict, handle) -> None:
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = primary_metric(report["settings"]["score"])
    systems = [s["name"] for s in report["systems"]]
    datasets = [d["name"] for d in report["datasets"]]
    rows = [r for r in report["rows"] if "reference" not in r]
    figure, axes = plt.subplots(
        1,
        len(datasets),
        figsize=(max(4.0, 1.2 + 0.35 * len(systems) * 3) * len(datasets) ** 0.5 + 2, 4.2),
        squeeze=False,
        sharey=True,
    )
    colours = plt.get_cmap("tab10" if len(systems) <= 10 else "tab20").colors
    for ax, entry in zip(axes[0], report["datasets"]):
        dataset, keys = entry["name"], entry["by"][0] if entry["by"] else []
        mine = [r for r in rows if r["dataset"] == dataset]
        cells = [r for r in mine if keys and list(r["group"]) == keys]
        if not cells:  # no breakdown here: the whole dataset
            keys, cells = [], [r for r in mine if not r["group"]]
        labels = list(dict.fromkeys(_label(r["group"], keys) for r in cells))
        width = 0.8 / max(1, len(systems))
        for s, system in enumerate(systems):
            xs, heights, low, high = [], [], [], []
            for g, label in enumerate(labels):
                row = next(
                    (r for r in cells if r["system"] == system and _label(r["group"], keys) == label), None
                )
                if row is None or row.get(metric) is None:
                    continue
                value = row[metric]
                interval = row.get(f"{metric}_ci95") or [value, value]
                xs.append(g - 0.4 + width * (s + 0.5))
                heights.append(value)
                low.append(value - interval[0])
                high.append(interval[1] - value)
            ax.bar(
                xs, heights, width, yerr=[low, high], capsize=2, label=system, color=colours[s % len(colours)]
            )
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(dataset)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel(",".join(keys) if keys else "")
    axes[0][0].set_ylabel(metric.replace("_", " "))
    axes[0][-1].legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    figure.tight_layout()
    figure.savefig(handle, format="png", dpi=110, metadata={"Software": outputs.PNG_SOFTWARE})
    plt.close(figure)


def _label(group: dict, keys: list[str]) -> str:
    if not group:
        return "all"
    return ",".join("null" if group.get(k) is None else str(group.get(k)) for k in keys)
