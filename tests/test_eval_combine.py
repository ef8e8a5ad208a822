"""eval --combine pools per-seed reports (means and t intervals checked against a hand computation), --claims
two-hop states each claim with a verdict that follows the numbers, and peft:DIR scores what the canonical
reader refuses (trainable token rows) exactly as peft applies it."""

import json
import math
import statistics

import pytest
import torch

from helpers import peft_model, save_tiny_llama
from lrtool.encoding import decode_answer, prompt_ids
from lrtool.evaluate import claims
from lrtool.evaluate.combine import combine

torch.set_num_threads(1)

COLUMN_CELLS = {  # column title -> (dataset, group) as claims.COLUMNS has them
    title: (dataset, group) for title, dataset, group in claims.COLUMNS
}


def report(values: dict, seed: int = 0) -> dict:
    """An eval report whose rows give each (system, column title) its exact match, with a made-up interval."""
    rows = []
    for (system, title), value in values.items():
        dataset, group = COLUMN_CELLS[title]
        rows.append(
            {
                "system": system,
                "dataset": dataset,
                "group": group,
                "n": 10,
                "exact_match": value,
                "exact_match_ci95": [max(0.0, value - 0.05), min(1.0, value + 0.05)],
            }
        )
    systems = sorted({system for system, _ in values})
    return {
        "settings": {"metrics": ["exact_match"], "seed": seed},
        "systems": [{"name": s} for s in systems],
        "datasets": [{"name": "twohop", "answers": 30}],
        "rows": rows,
    }


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return str(path)


def test_combine_takes_the_mean_and_the_student_t_interval_over_reports(tmp_path):
    seeds = [0.4, 0.5, 0.45]
    paths = [
        write(tmp_path, f"s{i}.json", report({("base", "two-hop R"): v}, i)) for i, v in enumerate(seeds)
    ]
    row = combine(paths)["rows"][0]
    mean, sd = statistics.mean(seeds), statistics.stdev(seeds)
    half = 4.302653 * sd / math.sqrt(3)  # t(0.975, df=2)
    assert row["exact_match"] == pytest.approx(mean, rel=1e-5)
    assert row["exact_match_ci95"] == pytest.approx([mean - half, mean + half], rel=1e-3)
    assert row["exact_match_seeds"] == pytest.approx(seeds)
    assert row["n"] == 30 and row["seeds"] == 3


def test_an_interval_of_a_rate_is_clipped_to_its_range(tmp_path):
    paths = [
        write(tmp_path, f"s{i}.json", report({("base", "two-hop R"): v})) for i, v in enumerate([1, 0.8, 1])
    ]
    row = combine(paths)["rows"][0]
    assert row["exact_match_ci95"][1] == 1.0 and 0 < row["exact_match_ci95"][0] < row["exact_match"]


def test_one_report_keeps_its_own_bootstrap_interval_and_rows_missing_from_a_seed_count_once(tmp_path):
    one = write(tmp_path, "a.json", report({("base", "two-hop R"): 0.4, ("hop1", "two-hop R"): 0.6}))
    other = write(tmp_path, "b.json", report({("base", "two-hop R"): 0.6}))
    rows = {r["system"]: r for r in combine([one, other])["rows"]}
    assert rows["hop1"]["exact_match_ci95"] == pytest.approx([0.55, 0.65])
    assert rows["hop1"]["seeds"] == 1
    assert rows["base"]["seeds"] == 2 and rows["base"]["exact_match"] == pytest.approx(0.5)


def library(f_pair: float, f_direct: float, f_lib: float, h_rows: float, h_lora: float) -> dict:
    values = {}
    for system in ("base", "hop1", "hop2", "direct", "factor-avg", "sum", "lib-sum", "multitask", "rows"):
        values[(system, "two-hop R")] = 0.8
        values[(system, "two-hop H")] = 0.1
        values[(system, "two-hop F")] = f_pair
        values[(system, "hop 1 (new)")] = 0.9 if system != "factor-avg" else 0.3
        values[(system, "hop 2 (new)")] = 0.9 if system != "factor-avg" else 0.5
        values[(system, "familiar kept")] = 0.95 if system == "base" else 0.7
    values[("direct", "two-hop F")] = f_direct
    values[("lib-sum", "two-hop F")] = f_lib
    values[("rows", "two-hop H")] = h_rows
    values[("hop1", "two-hop H")] = h_lora
    return values


def verdicts(values: dict) -> list[str]:
    return [claim["verdict"] for claim in claims.check(report(values))]


def test_verdicts_follow_the_numbers():
    assert verdicts(library(0.03, 0.9, 0.8, 0.7, 0.1)) == [
        "supported",
        "supported",
        "supported",
        "supported",
        "supported",
        "measured",
    ]
    turned = verdicts(library(0.85, 0.9, 0.85, 0.1, 0.7))
    assert turned[0] == "not supported" and turned[2] == "not supported" and turned[4] == "not supported"
    assert turned[1] == "not supported"  # F as high as R: no drop


def test_missing_systems_make_a_claim_not_measured_and_the_summary_names_every_claim():
    values = {("base", "two-hop R"): 0.8, ("base", "two-hop F"): 0.05}
    assert set(verdicts(values)) == {"not measured"}
    text = claims.summary(report(values))
    for claim in claims.check(report(values)):
        assert f"{claim['id']}. {claim['claim']} **not measured**" in text
    assert "| base | base |" in text


def test_combine_and_claims_from_the_command_line_write_report_summary_and_figures(cli, tmp_path):
    pytest.importorskip("matplotlib")
    paths = [
        write(tmp_path, f"s{i}.json", report(library(0.03 + i / 100, 0.9, 0.8, 0.7, 0.1), i))
        for i in range(3)
    ]
    out, summary, figures = tmp_path / "report.json", tmp_path / "summary.md", tmp_path / "figures"
    code, stdout, err = cli(
        "eval", "--combine", *paths, "-o", str(out), "--claims", "two-hop", "--summary", str(summary),
        "--figures", str(figures), "-q",
    )  # fmt: skip
    assert code == 0, err
    assert stdout == ""
    pooled = json.loads(out.read_text())
    assert pooled["settings"]["reports"] == 3
    assert all(len(r["exact_match_ci95"]) == 2 for r in pooled["rows"])
    assert "**supported**" in summary.read_text()
    assert sorted(p.name for p in figures.iterdir()) == ["lrtool.json", "single-hop.png", "two-hop.png"]
    assert (figures / "two-hop.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--summary", "s.md"], "--summary and --figures need --claims"),
        (["--claims", "three-hop"], "unknown --claims"),
    ],
)
def test_claim_options_are_checked_before_anything_is_written(cli, tmp_path, args, needle):
    path = write(tmp_path, "r.json", report({("base", "two-hop R"): 0.5}))
    code, _, err = cli("eval", "--combine", path, "-o", str(tmp_path / "out.json"), *args)
    assert code == 2 and needle in err
    assert not (tmp_path / "out.json").exists()


def test_combine_refuses_a_file_that_is_not_a_report(cli, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"no": "rows"}')
    code, _, err = cli("eval", "--combine", str(bad), "-o", str(tmp_path / "out.json"))
    assert code == 1 and err.count("Error:") == 1 and "not an eval report" in err
    assert not (tmp_path / "out.json").exists()


def test_eval_without_base_or_combine_is_a_usage_error(cli, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "answer": "b"}\n')
    code, _, err = cli("eval", str(data))
    assert code == 2 and "--base is required" in err


def test_a_peft_adapter_with_trainable_token_rows_scores_as_peft_generates(cli, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    words = ["Ann's mentor is Bob", "Bob was born in Rome", "Cid's mentor is Dan", "Dan was born in Oslo"]
    base = save_tiny_llama(tmp_path / "base", words)
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = tokenizer.convert_tokens_to_ids(["Ann", "Cid"])
    config = LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": rows})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(tmp_path / "rows")
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in ["Ann's mentor is", "Cid's"])
    )
    predictions = tmp_path / "p.jsonl"
    code, out, err = cli(
        "eval", str(data), "--base", str(base), "--system", f"rows=peft:{tmp_path / 'rows'}",
        "--predictions", str(predictions), "--max-new-tokens", "3", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["systems"][0]["features"] == ["trainable tokens"]
    reference = peft_model(base, tmp_path / "rows")
    for line in map(json.loads, predictions.read_text().splitlines()):
        ids = torch.tensor([prompt_ids(tokenizer, line["prompt"])])
        with torch.no_grad():
            generated = reference.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        assert line["prediction"] == decode_answer(tokenizer, generated[0, ids.shape[1] :].tolist())


def test_force_replaces_a_report_lrtool_wrote_over_several_lines(cli, tmp_path):
    path = write(tmp_path, "r.json", report({("base", "two-hop R"): 0.5}))
    out = tmp_path / "out.json"
    assert cli("eval", "--combine", path, "-o", str(out), "-q")[0] == 0
    assert out.read_text().startswith("{\n")
    code, _, err = cli("eval", "--combine", path, "-o", str(out), "--force", "-q")
    assert code == 0, err
