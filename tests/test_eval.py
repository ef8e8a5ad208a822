"""lrtool eval: predictions equal plain transformers + peft generation, log-likelihoods equal hand-computed
sums, numbers do not depend on batching or on the other systems, intervals are reproducible, merges as
adapters equal merges into the base, bad input is one error line and nothing written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO
from helpers import peft_model, save_random_peft_adapter, save_tiny_llama
from lrtool.encoding import answer_ids, decode_answer, prompt_ids

torch.set_num_threads(1)

LORAS = {
    "a1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "a2": dict(r=8, lora_alpha=3, use_rslora=True, target_modules="all-linear"),
    "a3": dict(r=2, lora_alpha=5, target_modules=["o_proj", "down_proj"]),
}


def head(source: Path, target: Path, n: int, per: str | None = None) -> Path:
    """The first n lines of `source`, or with `per`, the first n of each value of meta[per]."""
    lines = source.read_text().splitlines(keepends=True)
    if per is None:
        kept = lines[:n]
    else:
        counts: dict = {}
        kept = []
        for line in lines:
            value = json.loads(line)["meta"][per]
            counts[value] = counts.get(value, 0) + 1
            if counts[value] <= n:
                kept.append(line)
    target.write_text("".join(kept))
    return target


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny world's questions, a random tiny base over its words, three adapters unlike each other."""
    from lrtool.cli import main
    from lrtool.models import texts_of

    root = tmp_path_factory.mktemp("eval")
    with pytest.raises(SystemExit) as done:
        main(["gen-data", "two-hop", "--size", "tiny", "--seed", "2", "-q", "-o", str(root / "world")])
    assert done.value.code == 0
    base = save_tiny_llama(root / "base", list(texts_of([root / "world"])))
    adapters = {
        name: save_random_peft_adapter(base, root / name, seed=i, **config)
        for i, (name, config) in enumerate(LORAS.items(), start=1)
    }
    twohop = head(root / "world" / "twohop.jsonl", root / "twohop.jsonl", 6, per="familiarity")  # 18 lines
    hop1 = head(root / "world" / "hop1.jsonl", root / "hop1.jsonl", 12)
    return SimpleNamespace(root=root, base=base, adapters=adapters, twohop=twohop, hop1=hop1)


def evaluate(cli, env, *args):
    """(exit code, report or None, stderr) of `lrtool eval` on env's base."""
    code, out, err = cli("eval", *map(str, args), "--base", str(env.base), "-q")
    return code, (json.loads(out) if out.strip() else None), err


def systems(env, *names):
    return [f"--system={n}={'base' if n == 'base' else 'adapter:' + str(env.adapters[n])}" for n in names]


def rows_of(report, **where):
    return [r for r in report["rows"] if all(r.get(k) == v for k, v in where.items())]


def read_predictions(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_predictions_equal_transformers_generate_with_each_adapter_applied_by_peft(cli, env, tmp_path):
    predictions = tmp_path / "p.jsonl"
    code, report, _ = evaluate(
        cli, env, env.twohop, *systems(env, "base", "a1", "a2", "a3"), "--predictions", predictions
    )
    assert code == 0
    max_new = report["settings"]["max_new_tokens"]
    lines = read_predictions(predictions)
    assert len(lines) == 4 * 18
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(env.base)
    for name in ("base", "a1", "a2", "a3"):
        model = peft_model(env.base, None if name == "base" else env.adapters[name])
        for line in (x for x in lines if x["system"] == name):
            ids = torch.tensor([prompt_ids(tokenizer, line["prompt"])])
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            expected = decode_answer(tokenizer, out[0, ids.shape[1] :].tolist())
            assert line["prediction"] == expected, (name, line["line"])
            assert line["correct"] == (expected == line["answer"].strip())


def test_exact_match_counts_predictions_equal_to_the_answer(cli, env, tmp_path):
    # A dataset whose answers are the base's own greedy predictions (padded with spaces, which the rule
    # strips), except every third: the base scores exactly 2/3. (A random base rarely says EOS, so its
    # predictions are as long as --max-new-tokens allows: the same in both runs.)
    predictions = tmp_path / "p.jsonl"
    assert evaluate(cli, env, env.twohop, "--predictions", predictions, "--max-new-tokens", 5)[0] == 0
    own = tmp_path / "own.jsonl"
    lines = []
    for i, p in enumerate(read_predictions(predictions)):
        answer = f"  {p['prediction']} " if i % 3 else "definitely not this"
        lines.append(json.dumps({"prompt": p["prompt"], "answer": answer, "meta": p["meta"]}))
    own.write_text("\n".join(lines) + "\n")
    code, report, _ = evaluate(cli, env, own, "--by", "familiarity", "--max-new-tokens", 5)
    assert code == 0
    assert rows_of(report, group={})[0]["exact_match"] == pytest.approx(12 / 18, abs=1e-6)


def test_logliks_and_choice_accuracy_equal_hand_computed_sums_of_log_softmax(cli, env, tmp_path):
    predictions = tmp_path / "p.jsonl"
    code, report, _ = evaluate(
        cli, env, env.hop1, *systems(env, "a2"), "--score", "loglik", "--predictions", predictions
    )
    assert code == 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(env.base)
    model = peft_model(env.base, env.adapters["a2"])
    lines = read_predictions(predictions)
    pool = sorted({line["answer"] for line in lines})

    def loglik(prompt: str, answer: str) -> float:
        head_ids = prompt_ids(tokenizer, prompt)
        tail = answer_ids(tokenizer, prompt, answer)[:-1]  # EOS excluded
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([head_ids + tail])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        return sum(float(logprobs[len(head_ids) - 1 + t, token]) for t, token in enumerate(tail))

    for line in lines:
        mine = loglik(line["prompt"], line["answer"])
        assert line["loglik"] == pytest.approx(mine, rel=1e-5, abs=1e-5)
        others = [loglik(line["prompt"], c) for c in pool if c != line["answer"]]
        assert line["choice_correct"] == all(mine > other for other in others)
        assert "prediction" not in line
    whole = rows_of(report, group={})[0]
    assert whole["loglik"] == pytest.approx(sum(x["loglik"] for x in lines) / len(lines), rel=1e-5)
    assert whole["choice_accuracy"] == pytest.approx(sum(x["choice_correct"] for x in lines) / len(lines))


def test_a_merged_adapter_scores_as_the_same_merge_written_into_the_base(cli, env, tmp_path):
    adapters = [str(env.adapters["a1"]), str(env.adapters["a3"])]
    assert cli("merge", *adapters, "--method", "linear", "-o", str(tmp_path / "sum"), "-q")[0] == 0
    merged_model = tmp_path / "sum-model"
    assert (
        cli(
            "merge",
            *adapters,
            "--method",
            "linear",
            "--into-base",
            str(env.base),
            "-o",
            str(merged_model),
            "-q",
        )[0]
        == 0
    )
    predictions = tmp_path / "p.jsonl"
    code, report, _ = evaluate(
        cli,
        env,
        env.twohop,
        f"--system=as-adapter=adapter:{tmp_path / 'sum'}",
        f"--system=as-model=model:{merged_model}",
        "--score",
        "exact,loglik",
        "--predictions",
        predictions,
    )
    assert code == 0
    lines = read_predictions(predictions)
    adapter_lines = [x for x in lines if x["system"] == "as-adapter"]
    model_lines = [x for x in lines if x["system"] == "as-model"]
    assert [x["prediction"] for x in adapter_lines] == [x["prediction"] for x in model_lines]
    for a, m in zip(adapter_lines, model_lines):
        assert a["loglik"] == pytest.approx(m["loglik"], rel=1e-4, abs=1e-4)
    for a, m in zip(rows_of(report, system="as-adapter"), rows_of(report, system="as-model")):
        assert a["exact_match"] == m["exact_match"] and a["choice_accuracy"] == m["choice_accuracy"]


def assert_same_numbers(rows, others):
    """Equal rows: counts and accuracies exactly, log-likelihoods up to float rounding."""
    assert len(rows) == len(others)
    for row, other in zip(rows, others):
        assert row.keys() == other.keys()
        for key, value in row.items():
            if key.startswith("loglik"):
                assert value == pytest.approx(other[key], rel=1e-5, abs=1e-5), key
            else:
                assert value == other[key], key


def test_a_system_alone_scores_as_it_does_among_other_systems(cli, env, tmp_path):
    args = [env.twohop, env.hop1, "--score", "exact,loglik"]
    alone_predictions, together_predictions = tmp_path / "alone.jsonl", tmp_path / "together.jsonl"
    _, alone, _ = evaluate(cli, env, *args, *systems(env, "a2"), "--predictions", alone_predictions)
    _, together, _ = evaluate(
        cli, env, *args, *systems(env, "base", "a1", "a2", "a3"), "--predictions", together_predictions
    )
    assert_same_numbers(rows_of(alone, system="a2"), rows_of(together, system="a2"))
    mine = [x for x in read_predictions(together_predictions) if x["system"] == "a2"]
    theirs = read_predictions(alone_predictions)
    assert [x["prediction"] for x in mine] == [x["prediction"] for x in theirs]


def test_scores_do_not_depend_on_the_batch_size(cli, env, tmp_path):
    runs = {}
    for size in (1, 5, 64):
        predictions = tmp_path / f"p{size}.jsonl"
        args = [env.twohop, env.hop1, *systems(env, "base", "a1", "a2"), "--score", "exact,loglik"]
        code, report, _ = evaluate(cli, env, *args, "--batch-size", size, "--predictions", predictions)
        assert code == 0
        runs[size] = (report, [x["prediction"] for x in read_predictions(predictions)])
    for size in (5, 64):
        assert runs[size][1] == runs[1][1]
        assert_same_numbers(runs[size][0]["rows"], runs[1][0]["rows"])


def test_the_report_is_byte_identical_across_runs_and_intervals_are_seeded(cli, env):
    args = [
        "eval",
        str(env.twohop),
        "--base",
        str(env.base),
        *systems(env, "base", "a1"),
        "--reference",
        "base",
        "--score",
        "exact,loglik",
    ]
    first, second = cli(*args), cli(*args)
    assert first[0] == 0 and first[1] == second[1]
    other_seed = cli(*args, "--seed", "7")[1]
    assert json.loads(other_seed)["rows"] != json.loads(first[1])["rows"]


def test_every_interval_holds_its_estimate_and_rows_cover_each_group(cli, env):
    code, report, _ = evaluate(cli, env, env.twohop, *systems(env, "base", "a1"), "--score", "exact,loglik")
    assert code == 0
    familiarities = {
        r["group"]["familiarity"] for r in rows_of(report, system="a1") if "familiarity" in r["group"]
    }
    assert familiarities == {"R", "H", "F"}
    for row in report["rows"]:
        for metric in report["settings"]["metrics"]:
            low, high = row[f"{metric}_ci95"]
            assert low <= row[metric] <= high
    by_group = [r for r in rows_of(report, system="a1") if list(r["group"]) == ["familiarity"]]
    assert sum(r["n"] for r in by_group) == rows_of(report, system="a1", group={})[0]["n"] == 18


def test_a_paired_difference_of_a_system_with_itself_is_exactly_zero(env):
    from lrtool.evaluate.datasets import read_datasets
    from lrtool.evaluate.report import build_rows
    from lrtool.evaluate.run import Outcome

    datasets = read_datasets([str(env.twohop)])
    outcomes = {}
    for e in range(18):
        outcome = Outcome(
            prediction="x", correct=e % 2 == 0, loglik=-0.1 * e, answer_tokens=1, choice_correct=e % 3 == 0
        )
        outcomes[(0, 0, e)] = outcomes[(1, 0, e)] = outcome
    rows = build_rows(["a", "b"], datasets, outcomes, ["exact", "loglik"], [[("familiarity",)]], 200, 0, "a")
    differences = [r for r in rows if "reference" in r]
    assert len(differences) == 4  # the whole dataset and R, H, F
    for row in differences:
        for metric in ("exact_match", "loglik", "loglik_per_token", "choice_accuracy"):
            assert row[f"{metric}_difference"] == 0 and row[f"{metric}_difference_ci95"] == [0, 0]


def test_fail_under_exits_3_after_writing_the_report(cli, env, tmp_path):
    out = tmp_path / "report.json"
    code, _, err = cli(
        "eval", str(env.twohop), "--base", str(env.base), "--fail-under", "0.99", "-o", str(out)
    )
    assert code == 3 and "below --fail-under 0.99" in err and json.loads(out.read_text())["rows"]
    code, _, _ = cli("eval", str(env.twohop), "--base", str(env.base), "--fail-under", "0", "-q")
    assert code == 0


def test_table_and_plot_are_written_beside_the_report(cli, env, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "bars.png"
    code, out, err = cli(
        "eval",
        str(env.twohop),
        "--base",
        str(env.base),
        *systems(env, "base", "a1"),
        "--reference",
        "base",
        "--table",
        "--plot",
        str(plot),
    )
    assert code == 0 and json.loads(out)["rows"]
    assert "lrtool eval" in err and "difference to base" in err and "familiarity=R" in err
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"prompt": "p"}\n', "twohop-bad.jsonl:1: missing field 'answer'"),
        ('{"prompt": "p", "answer": "a"}\n{"answer": "a"}\n', "twohop-bad.jsonl:2: missing field 'prompt'"),
        ("", "twohop-bad.jsonl: no examples"),
        (
            '{"prompt": "p", "answer": "a", "meta": [1]}\n',
            "twohop-bad.jsonl:1: field 'meta' must be an object",
        ),
    ],
)
def test_a_bad_dataset_is_one_error_line_naming_file_and_line(cli, env, tmp_path, content, needle):
    bad = tmp_path / "twohop-bad.jsonl"
    bad.write_text(content)
    predictions = tmp_path / "p.jsonl"
    code, out, err = cli("eval", str(bad), "--base", str(env.base), "--predictions", str(predictions))
    assert code == 1 and out == "" and needle in err
    assert err.startswith("Error: ") and err.count("\n") == 1
    assert not predictions.exists() and not list(tmp_path.glob(".p.jsonl*"))


def dora_adapter(env, root):
    config = json.loads((env.adapters["a1"] / "adapter_config.json").read_text())
    shutil.copytree(env.adapters["a1"], root / "dora")
    (root / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    return root / "dora"


def wrong_base_adapter(root):
    from lrtool.adapters import Adapter, LoraModule, save_adapter

    module = LoraModule(torch.ones(2, 48), torch.ones(32, 2), 1.0)
    save_adapter(Adapter({"model.layers.0.self_attn.q_proj": module}), root / "wrong")
    return root / "wrong"


def missing_module_adapter(root):
    from lrtool.adapters import Adapter, LoraModule, save_adapter

    module = LoraModule(torch.ones(2, 32), torch.ones(32, 2), 1.0)
    save_adapter(Adapter({"model.layers.7.self_attn.q_proj": module}), root / "missing")
    return root / "missing"


@pytest.mark.parametrize(
    "make_args, code, needle",
    [
        (lambda env, root: ["--system", "oops"], 2, "NAME=SPEC"),
        (lambda env, root: ["--system", "a=adapter:"], 2, "NAME=SPEC"),
        (lambda env, root: ["--system", "a=weights:x"], 2, "NAME=SPEC"),
        (lambda env, root: ["--system", "a=base", "--system", "a=base"], 2, "two systems are named 'a'"),
        (lambda env, root: ["--system", "r=router:somewhere"], 1, "not a router (no router.json)"),
        (lambda env, root: ["--by", "colour"], 2, "--by colour: no example has meta key 'colour'"),
        (lambda env, root: ["--reference", "nobody"], 2, "--reference nobody: no system"),
        (lambda env, root: ["--score", "bleu"], 2, "--score takes exact, loglik"),
        (lambda env, root: ["--choices", str(env.twohop)], 2, "add loglik to --score"),
        (lambda env, root: ["--adapter", str(dora_adapter(env, root))], 1, "DoRA"),
        (lambda env, root: ["--adapter", str(wrong_base_adapter(root))], 1, "48 -> 32"),
        (lambda env, root: ["--adapter", str(missing_module_adapter(root))], 1, "layers.7.self_attn.q_proj"),
        (lambda env, root: ["--adapter", str(root / "nowhere")], 1, "no such file"),
        (lambda env, root: ["--model", str(env.twohop.parent / "world")], 1, "not a model directory"),
        (lambda env, root: ["--plot", "-"], 2, "--plot takes a file name"),
    ],
)
def test_bad_systems_and_options_are_one_error_line_and_write_nothing(
    cli, env, tmp_path, make_args, code, needle
):
    predictions = tmp_path / "p.jsonl"
    got, out, err = cli(
        "eval",
        str(env.twohop),
        "--base",
        str(env.base),
        "--predictions",
        str(predictions),
        *make_args(env, tmp_path),
    )
    assert (got, out) == (code, "") and needle in err, err
    assert err.startswith("Error: ") and err.count("\n") == 1
    assert not predictions.exists()


def test_a_choices_file_without_an_answer_is_refused_naming_the_example(cli, env, tmp_path):
    choices = tmp_path / "cities.txt"
    choices.write_text("Nowhere\nElsewhere\n")
    code, out, err = cli(
        "eval", str(env.twohop), "--base", str(env.base), "--score", "loglik", "--choices", str(choices)
    )
    assert code == 1 and out == "" and "twohop.jsonl:1: the answer" in err and "cities.txt" in err


def test_limit_scores_the_first_lines_and_choices_can_come_from_a_file(cli, env, tmp_path):
    answers = sorted({json.loads(line)["answer"] for line in env.twohop.read_text().splitlines()})
    choices = tmp_path / "cities.txt"
    choices.write_text("\n".join(answers + ["Atlantis"]) + "\n")
    code, report, _ = evaluate(
        cli, env, env.twohop, "--limit", "5", "--score", "loglik", "--choices", choices
    )
    assert code == 0 and rows_of(report, group={})[0]["n"] == 5
    assert report["settings"]["choices"] == str(choices)


@pytest.mark.skipif(
    not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun is not installed"
)
def test_torchrun_with_two_processes_writes_the_single_process_report(env, tmp_path):
    args = [
        "eval",
        str(env.twohop),
        str(env.hop1),
        "--base",
        str(env.base),
        *systems(env, "base", "a1", "a2"),
        "--score",
        "exact,loglik",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--reference",
        "base",
        "-q",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "lrtool", *args, "-o", str(tmp_path / "one.json")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
    )
    assert single.returncode == 0, single.stderr
    torchrun = str(Path(sys.executable).parent / "torchrun")
    double = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "lrtool",
            *args,
            "-o",
            str(tmp_path / "two.json"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
        timeout=600,
    )
    assert double.returncode == 0, double.stderr
    assert (tmp_path / "two.json").read_bytes() == (tmp_path / "one.json").read_bytes()
