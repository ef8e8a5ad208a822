"""The demo's pipeline (examples/two-hop/Makefile) end to end at the micro size, one seed: every system is
trained, built and evaluated through the CLI, the seeds combine with intervals, and the summary states every
claim with a verdict. The demo's full size is not a test (make demo; README "What the demo shows")."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from lrtool.evaluate import claims

VERDICTS = ("supported", "mixed", "not supported", "not measured", "measured")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_the_two_hop_pipeline_runs_and_reports_every_system_and_claim(tmp_path):
    lrtool = Path(sys.executable).parent / "lrtool"
    out = tmp_path / "demo"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        ["make", "-C", str(REPO / "examples" / "two-hop"), "SEEDS=1", "SIZE=micro", "UNTIL=",
         f"OUT={out}", f"LRTOOL={lrtool}"],
        capture_output=True, text=True, env=environment, timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    evaluated = json.loads((out / "seed-1" / "eval.json").read_text())
    names = [s["name"] for s in evaluated["systems"]]
    assert sorted(names) == sorted(s for group in claims.GROUPS.values() for s in group)
    kinds = {s["name"]: s["kind"] for s in evaluated["systems"]}
    assert kinds["rows"] == "peft" and kinds["arrow"] == "router" and kinds["sum"] == "adapter"
    datasets = {d["name"] for d in evaluated["datasets"]}
    assert datasets == {"twohop", "twohop.eval", "hop1", "hop2", "pretrain"}
    for name in names:
        for dataset in datasets:
            row = next(
                r for r in evaluated["rows"] if (r["system"], r["dataset"], r["group"]) == (name, dataset, {})
            )
            assert len(row["exact_match_ci95"]) == 2 and "loglik" in row
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["reports"] == 1
    assert all("exact_match_ci95" in r for r in report["rows"] if "reference" not in r)
    summary = (out / "summary.md").read_text()
    for claim in claims.check(report):
        assert claim["verdict"] in VERDICTS
        assert f"{claim['id']}. {claim['claim']} **{claim['verdict']}**" in summary
    assert {p.name for p in (out / "figures").iterdir()} >= {"two-hop.png", "single-hop.png"}
    assert "Exact match, mean" in run.stdout  # the summary, table included, printed at the end
    rerun = subprocess.run(
        ["make", "-C", str(REPO / "examples" / "two-hop"), "-q", "SEEDS=1", "SIZE=micro", "UNTIL=",
         f"OUT={out}", f"LRTOOL={lrtool}", str(out / "report.json")],
        capture_output=True, text=True, env=environment,
    )  # fmt: skip
    assert rerun.returncode == 0, "make -q: every file target is up to date after a run"
