"""eval --claims two-hop: the paper's claims, checked on a (combined) eval report of the two-hop experiment.

Reads an eval report whose systems follow the demo's names (base; experts hop1, hop2, direct; merges
factor-avg, sum, ties and the library's lib-factor-avg, lib-sum; routers arrow, uniform, lib-arrow, oracle;
controls multitask, rows) and datasets (twohop by familiarity, twohop.eval, hop1 and hop2 by in_pretrain,
pretrain); returns the compact table (`table_rows`), each claim's verdict with its numbers (`check`) and
summary.md's text (`summary`). A claim whose systems are missing is "not measured"; "supported" needs every
comparison of the claim to hold: 95% intervals that separate, except where a claim orders means (claim 2's
H >= F, claim 4's "keeps both hops"). Writes nothing: verdicts say what this run measured, whatever it is.
"""

from __future__ import annotations

GROUPS = {
    "base": ["base"],
    "experts": ["hop1", "hop2", "direct"],
    "merges": ["factor-avg", "sum", "ties", "lib-factor-avg", "lib-sum"],
    "routers": ["arrow", "uniform", "lib-arrow", "oracle"],
    "controls": ["multitask", "rows"],
}
PAIR_LIBRARY = ["factor-avg", "sum", "ties", "arrow", "uniform"]  # hop1 + hop2, merged or routed
WITH_DIRECT = ["lib-factor-avg", "lib-sum", "lib-arrow"]  # the library with the A -> C expert
# (column title, dataset, group): the table's columns and the cells the claims read.
COLUMNS = [
    ("hop 1 (new)", "hop1", {"in_pretrain": False}),
    ("hop 2 (new)", "hop2", {"in_pretrain": False}),
    ("two-hop R", "twohop", {"familiarity": "R"}),
    ("two-hop H", "twohop", {"familiarity": "H"}),
    ("two-hop F", "twohop", {"familiarity": "F"}),
    ("held-out R", "twohop.eval", {"familiarity": "R"}),
    ("held-out H", "twohop.eval", {"familiarity": "H"}),
    ("familiar kept", "pretrain", {}),
]
TWO_HOP = ["two-hop R", "two-hop H", "two-hop F"]
SINGLE_HOP = ["hop 1 (new)", "hop 2 (new)", "familiar kept"]
METRIC = "exact_match"
CLAIM_SETS = ("two-hop",)


class Cells:
    """A report's cells: (system, column title) -> (mean, [lo, hi]) of exact match, or None."""

    def __init__(self, report: dict):
        self.rows = {
            (r["system"], r["dataset"], tuple(sorted(r["group"].items()))): r
            for r in report["rows"]
            if "reference" not in r and r.get(METRIC) is not None
        }
        self.systems = ordered(
            [s["name"] for s in report.get("systems", [])] or sorted({k[0] for k in self.rows})
        )
        answers = {d["name"]: d.get("answers") for d in report.get("datasets", [])}
        self.chance = 1 / answers["twohop"] if answers.get("twohop") else None

    def __call__(self, system: str, title: str):
        _, dataset, group = next(c for c in COLUMNS if c[0] == title)
        row = self.rows.get((system, dataset, tuple(sorted(group.items()))))
        if row is None:
            return None
        return row[METRIC], row.get(f"{METRIC}_ci95") or [row[METRIC], row[METRIC]]

    def show(self, system: str, title: str) -> str:
        return show(self(system, title))

    def listing(self, systems: list[str], title: str) -> str:
        return "; ".join(f"{s} {self.show(s, title)}" for s in systems)


def show(cell) -> str:
    if cell is None:
        return "-"
    value, (low, high) = cell
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def group_of(system: str) -> str:
    return next((group for group, names in GROUPS.items() if system in names), "other")


def ordered(systems: list[str]) -> list[str]:
    """The systems grouped as base, experts, merges, routers, controls (others last), each group in order."""
    known = [s for names in GROUPS.values() for s in names if s in systems]
    return known + [s for s in systems if s not in known]


def table_rows(report: dict) -> list[list[str]]:
    """[group, system, one cell per column] for every system of the report."""
    cells = Cells(report)
    return [[group_of(s), s, *(cells.show(s, title) for title, _, _ in COLUMNS)] for s in cells.systems]


def _verdict(holds: list[bool]) -> str:
    return "supported" if holds and all(holds) else "mixed" if any(holds) else "not supported"


def check(report: dict) -> list[dict]:
    """Each claim: id, statement, verdict (supported, mixed, not supported, not measured; measured for the
    cost), evidence."""
    cells = Cells(report)
    present = set(cells.systems)
    pairs = [s for s in PAIR_LIBRARY if s in present and cells(s, "two-hop F")]
    withs = [s for s in WITH_DIRECT if s in present and cells(s, "two-hop F")]
    claims = []

    def add(statement: str, verdict: str, evidence: str) -> None:
        claims.append({"id": len(claims) + 1, "claim": statement, "verdict": verdict, "evidence": evidence})

    statement = "A 2-expert library (hop 1 + hop 2, merged or routed) is poor on two-hop questions about "
    statement += "unfamiliar chains."
    direct = cells("direct", "two-hop F")
    if not pairs or direct is None:
        add(
            statement,
            "not measured",
            "needs the merged or routed hop 1 + hop 2 systems and the direct expert",
        )
    else:
        add(
            statement,
            _verdict([cells(s, "two-hop F")[1][1] < direct[1][0] for s in pairs]),
            f"two-hop F: {cells.listing(pairs, 'two-hop F')}; the direct A -> C expert {show(direct)}"
            + (f"; chance {cells.chance:.2f}" if cells.chance else ""),
        )

    statement = "It gets worse as familiarity drops: R > H > F."
    if not pairs:
        add(statement, "not measured", "needs the merged or routed hop 1 + hop 2 systems")
    else:
        levels = {s: [cells(s, t) for t in TWO_HOP] for s in pairs}
        add(
            statement,
            _verdict([all(r) and r[0][1][0] > r[1][1][1] and r[1][0] >= r[2][0] for r in levels.values()]),
            "; ".join(f"{s}: R {show(r)}, H {show(h)}, F {show(f)}" for s, (r, h, f) in levels.items()),
        )

    statement = "Adding the A -> C expert to the library is needed for unfamiliar chains."
    if not withs or not pairs:
        add(statement, "not measured", "needs the library with the direct expert and without it")
    else:
        best_pair = max(cells(s, "two-hop F")[1][1] for s in pairs)
        add(
            statement,
            _verdict([cells(s, "two-hop F")[1][0] > best_pair for s in withs]),
            f"two-hop F with the direct expert: {cells.listing(withs, 'two-hop F')}; without it: "
            f"{cells.listing(pairs, 'two-hop F')}",
        )

    statement = "The exact sum composes no better than factor averaging, though it keeps both hops (so the "
    statement += "failure is not the merge's approximation)."
    if not all(cells(s, t) for s in ("sum", "factor-avg") for t in (*TWO_HOP, *SINGLE_HOP[:2])):
        add(statement, "not measured", "needs the sum and factor-avg merges")
    else:
        no_better = all(
            cells("sum", t)[1][0] <= cells("factor-avg", t)[1][1] for t in ("two-hop H", "two-hop F")
        )
        keeps = all(cells("sum", t)[0] > cells("factor-avg", t)[0] for t in SINGLE_HOP[:2])
        side_by_side = (
            f"{title}: sum {cells.show('sum', title)}, factor-avg {cells.show('factor-avg', title)}"
            for title in ("two-hop H", "two-hop F", "hop 1 (new)", "hop 2 (new)")
        )
        add(statement, _verdict([no_better, keeps]), "; ".join(side_by_side))

    statement = "The same hop-1 facts compose when trained into the new names' embedding rows, and not in a "
    statement += "LoRA (H chains: a new person whose mentor is familiar)."
    rows_h, lora_h = cells("rows", "two-hop H"), cells("hop1", "two-hop H")
    if rows_h is None or lora_h is None:
        add(statement, "not measured", "needs the embedding-row control and the hop-1 LoRA")
    else:
        add(
            statement,
            _verdict([rows_h[1][0] > lora_h[1][1]]),
            f"two-hop H: embedding rows {show(rows_h)}, hop-1 LoRA {show(lora_h)}; the new hop-1 facts "
            f"themselves: rows {cells.show('rows', 'hop 1 (new)')}, LoRA {cells.show('hop1', 'hop 1 (new)')}",
        )

    statement = "What adaptation costs on familiar knowledge (a sample of the base's pretraining facts)."
    kept = cells("base", "familiar kept")
    if kept is None:
        add(statement, "not measured", "needs the base scored on the pretrain sample")
    else:
        others = [s for s in cells.systems if s != "base" and cells(s, "familiar kept")]
        lost = [s for s in others if cells(s, "familiar kept")[1][1] < kept[1][0]]
        add(
            statement,
            "measured",
            f"base {show(kept)}; {cells.listing(others, 'familiar kept')}; below the base: "
            f"{', '.join(lost) or 'none'}",
        )
    return claims


def attribution(report: dict) -> str:
    """Which failure is LoRA's and which the unseen middle entity's, in the run's numbers."""
    cells = Cells(report)
    if cells("base", "two-hop F") is None or cells.chance is None:
        return "Not measured: needs the base on the two-hop questions."
    floor = 2 * cells.chance  # "at chance": the interval reaches below twice the chance rate

    def at_chance(*systems: str) -> str:
        found = [s for s in systems if cells(s, "two-hop F")]
        low = [s for s in found if cells(s, "two-hop F")[1][0] < floor]
        return (
            "all at chance"
            if low == found
            else f"above chance: {', '.join(s for s in found if s not in low)}"
        )

    controls = ("base", "multitask", "sum", "direct")
    f_cells = cells.listing([s for s in controls if cells(s, "two-hop F")], "two-hop F")
    text = [
        "F chains' middle entity is a new mentor that never served as a middle entity in pretraining "
        f"(chance {cells.chance:.2f}): {f_cells}; {at_chance(*controls[:3])} without the A -> C expert. "
        "Where even the multitask LoRA, which saw both hops together, stays at chance, the failure belongs "
        "to the unseen middle entity, not to merging or routing.",
    ]
    rows, lora = cells("rows", "two-hop H"), cells("hop1", "two-hop H")
    if rows and lora and rows[1][0] > lora[1][1]:
        text.append(
            f"H chains' middle entity is familiar: the hop-1 fact composes from the new names' embedding "
            f"rows ({show(rows)}) and not from a LoRA ({show(lora)}), so that failure is LoRA's: the fact "
            "sits where the second hop does not read it."
        )
    elif rows and lora:
        text.append(
            f"H chains' middle entity is familiar: the hop-1 fact composes no better from the new names' "
            f"embedding rows ({show(rows)}) than from a LoRA ({show(lora)})."
        )
    text.append(
        "R chains (both hops familiar) measure the base's own composition "
        f"({cells.show('base', 'two-hop R')} on training templates, {cells.show('base', 'held-out R')} held "
        "out): the ceiling a recycled library starts from."
    )
    return " ".join(text)


def markdown_table(report: dict) -> str:
    header = ["group", "system", *(title for title, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    return "\n".join(lines)


def summary(report: dict) -> str:
    """summary.md: the table, each claim with its verdict and numbers, and whose failure is whose."""
    runs = report.get("settings", {}).get("reports", 1)
    interval = "95% t interval over seeds" if runs > 1 else "95% bootstrap interval over examples"
    text = [
        "# Two-hop knowledge from recycled LoRAs: what this run measured",
        "",
        f"Exact match, mean [{interval}], {runs} seed(s). `new` facts are the ones only the experts learned; "
        "`two-hop` uses the training templates and `held-out` the held-out paraphrases; `familiar kept` is a "
        "sample of the base's pretraining facts.",
        "",
        markdown_table(report),
        "",
        "## The claims",
        "",
    ]
    for claim in check(report):
        text += [f"{claim['id']}. {claim['claim']} **{claim['verdict']}**: {claim['evidence']}.", ""]
    text += ["## Whose failure", "", attribution(report), ""]
    return "\n".join(text)
