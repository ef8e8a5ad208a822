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


def write_claim_plot(report: dict, titles: list[str], handle) -> None:
    """Bars of the columns `titles` (claims.COLUMNS) for every system, systems grouped as claims.GROUPS:
    one cluster of bars per system, one colour per column, 95% whiskers, chance as a dotted line."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lrtool.evaluate.claims import Cells, group_of

    cells = Cells(report)
    systems = [s for s in cells.systems if any(cells(s, t) for t in titles)]
    positions, x = [], 0.0
    for index, system in enumerate(systems):
        if index and group_of(system) != group_of(systems[index - 1]):
            x += 0.6  # a gap between groups
        positions.append(x)
        x += 1
    figure, ax = plt.subplots(figsize=(2.2 + 0.62 * x, 4.4))
    width = 0.8 / len(titles)
    colours = plt.get_cmap("tab10").colors
    for t, title in enumerate(titles):
        xs, heights, low, high = [], [], [], []
        for position, system in zip(positions, systems):
            cell = cells(system, title)
            if cell is None:
                continue
            value, (lo, hi) = cell
            xs.append(position - 0.4 + width * (t + 0.5))
            heights.append(value)
            low.append(max(0.0, value - lo))
            high.append(max(0.0, hi - value))
        ax.bar(xs, heights, width, yerr=[low, high], capsize=2, label=title, color=colours[t % len(colours)])
    if cells.chance and any(t.startswith("two-hop") for t in titles):
        ax.axhline(cells.chance, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(positions, systems, rotation=40, ha="right")
    for group in dict.fromkeys(group_of(system) for system in systems):
        mine = [p for p, system in zip(positions, systems) if group_of(system) == group]
        ax.text(sum(mine) / len(mine), 1.07, group, fontsize="small", style="italic", ha="center")
        if mine[0] > 0:
            ax.axvline(mine[0] - 0.8, color="lightgrey", linewidth=0.8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("exact match")
    ax.legend(fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
    figure.tight_layout()
    figure.savefig(handle, format="png", dpi=110, metadata={"Software": outputs.PNG_SOFTWARE})
    plt.close(figure)
