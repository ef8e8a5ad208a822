"""lrtool train: the tiny base learns its corpus, LoRAs learn their facts, outputs load in peft/transformers,
runs are reproducible, interrupted runs resume, bad input is refused, and torchrun gives the same adapter."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from lrtool.encoding import word_ids

torch.set_num_threads(1)

FAST = ["--batch-size", "32", "--check-every", "10"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from lrtool.cli import main

    out = tmp_path_factory.mktemp("train") / "world"
    with pytest.raises(SystemExit) as done:
        main(["gen-data", "two-hop", "--size", "tiny", "--seed", "3", "-q", "-o", str(out)])
    assert done.value.code == 0
    return out


@pytest.fixture(scope="module")
def base(world):
    """The tiny base pretrained on the tiny world's corpus (the spine of every other test here)."""
    from lrtool.cli import main

    out = world.parent / "base"
    with pytest.raises(SystemExit) as done:
        main(
            [
                "train",
                str(world / "pretrain.jsonl"),
                "--base",
                "tiny",
                "--full",
                "--vocab-from",
                str(world),
                "--until-accuracy",
                "0.95",
                *FAST,
                "-q",
                "-o",
                str(out),
            ]
        )
    assert done.value.code == 0
    return out


def assert_same_updates(dir_a, dir_b, atol: float, rtol: float = 0.0):
    """Two saved adapters apply the same update to every module (same modules, deltas within tolerance)."""
    from lrtool.adapters import load_adapter

    a, b = load_adapter(dir_a), load_adapter(dir_b)
    assert set(a.modules) == set(b.modules)
    for name, module in a.modules.items():
        torch.testing.assert_close(module.delta(), b.modules[name].delta(), atol=atol, rtol=rtol)


def lines(path, n=None):
    rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
    return rows[:n] if n else rows


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 4) -> str:
    """Plain transformers generation, independent of lrtool's teacher-forced scoring."""
    from lrtool.encoding import decode_answer, prompt_ids

    ids = torch.tensor([prompt_ids(tokenizer, prompt)])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return decode_answer(tokenizer, out[0, ids.shape[1] :].tolist())


def test_the_full_output_loads_offline_and_recalls_its_pretraining_facts(world, base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    facts = [x for x in lines(world / "pretrain.jsonl") if x["meta"]["kind"] in ("hop1", "hop2")][:50]
    assert len(facts) == 50
    hits = sum(greedy(model, tokenizer, x["prompt"]) == x["answer"] for x in facts)
    assert hits / 50 >= 0.9
    for name in ("train_log.jsonl", "lrtool.json", "tokenizer.json", "config.json", "model.safetensors"):
        assert (base / name).is_file()


def test_the_tiny_tokenizer_is_lossless_and_makes_each_world_name_one_token(world, base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    for text in ["Zq9 ünïcødé 😀\ttabs\nlines", "  two  spaces", "Q: Where was Xyzzy's mentor born? A:"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
    name = lines(world / "twohop.jsonl")[0]["meta"]["chain"][0]  # a person pretraining never saw
    assert len(word_ids(tokenizer, name)) == 1


def test_a_lora_learns_its_facts_until_accuracy_and_loads_in_peft_with_the_training_logits(
    world, base, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrtool.train import TrainSettings, train

    settings = TrainSettings(
        data=[str(world / "hop1.jsonl")],
        base=str(base),
        until_accuracy=0.95,
        batch_size=32,
        check_every=10,
        seed=1,
    )
    result = train(settings, tmp_path / "hop1")
    assert result.reached and result.accuracy >= 0.95

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "hop1").eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer(["Q: Who is Ava's mentor? A:"], return_tensors="pt")["input_ids"]
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model(ids).logits, atol=1e-5)
    facts = lines(world / "hop1.jsonl", 50)
    hits = sum(greedy(reloaded, tokenizer, x["prompt"]) == x["answer"] for x in facts)
    assert hits / len(facts) >= 0.9
    log = lines(tmp_path / "hop1" / "train_log.jsonl")
    assert any("accuracy" in x for x in log) and "final" in log[-1]


def test_the_adapter_is_what_lrtools_canonical_reader_sees(world, base, cli, tmp_path):
    from lrtool.adapters import load_adapter

    code, out, _ = cli(
        "train",
        str(world / "hop2.jsonl"),
        "--base",
        str(base),
        "--rank",
        "4",
        "--alpha",
        "3",
        "--rslora",
        "--targets",
        "q_proj,v_proj",
        "--max-steps",
        "3",
        "-q",
        "-o",
        str(tmp_path / "a"),
    )
    assert code == 0 and out.strip() == str(tmp_path / "a")
    adapter = load_adapter(tmp_path / "a")
    assert {name.rsplit(".", 1)[-1] for name in adapter.modules} == {"q_proj", "v_proj"}
    assert {m.rank for m in adapter.modules.values()} == {4}
    assert all(m.scale == pytest.approx(3 / 2) for m in adapter.modules.values())


def test_seeded_runs_give_the_same_adapter_bytes(world, base, cli, tmp_path):
    args = ["train", str(world / "hop1.jsonl"), "--base", str(base), "--max-steps", "5", "--seed", "7", "-q"]
    assert cli(*args, "-o", str(tmp_path / "a"))[0] == 0
    assert cli(*args, "-o", str(tmp_path / "b"))[0] == 0
    assert cli(*args[:-3], "--seed", "8", "-q", "-o", str(tmp_path / "c"))[0] == 0
    weights = [(tmp_path / d / "adapter_model.safetensors").read_bytes() for d in "abc"]
    assert weights[0] == weights[1] and weights[0] != weights[2]


def test_an_interrupted_run_keeps_a_checkpoint_and_resume_ends_where_an_uninterrupted_run_does(
    world, base, cli, tmp_path, monkeypatch
):
    import lrtool.train as training

    args = [
        "train",
        str(world / "hop1.jsonl"),
        "--base",
        str(base),
        "--max-steps",
        "12",
        "--dropout",
        "0.1",
        "--batch-size",
        "16",
        "-q",
    ]
    assert cli(*args, "-o", str(tmp_path / "straight"))[0] == 0

    real_train = training.train

    def interrupt_at_step_5(*a, **k):
        def on_step(step):
            if step == 5:
                raise KeyboardInterrupt

        return real_train(*a, **k, on_step=on_step)

    monkeypatch.setattr(training, "train", interrupt_at_step_5)
    code, out, err = cli(*args, "-o", str(tmp_path / "resumed"))
    assert code == 130 and out == "" and "Error: interrupted" in err
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.ckpt").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    monkeypatch.setattr(training, "train", real_train)
    code, _, _ = cli(*args, "--resume", "-o", str(tmp_path / "resumed"))
    assert code == 0 and not (tmp_path / "resumed.ckpt").exists()
    assert_same_updates(tmp_path / "straight", tmp_path / "resumed", atol=1e-7)
    steps = [x["step"] for x in lines(tmp_path / "resumed" / "train_log.jsonl") if "loss" in x]
    assert steps == [10, 12]


def test_resume_refuses_a_checkpoint_of_other_settings(world, base, cli, tmp_path, monkeypatch):
    import lrtool.train as training

    real_train = training.train
    monkeypatch.setattr(
        training,
        "train",
        lambda *a, **k: real_train(*a, **k, on_step=lambda step: (_ for _ in ()).throw(KeyboardInterrupt)),
    )
    args = ["train", str(world / "hop1.jsonl"), "--base", str(base), "--max-steps", "4", "-q", "-o"]
    assert cli(*args, str(tmp_path / "x"))[0] == 130
    monkeypatch.setattr(training, "train", real_train)
    code, _, err = cli(*args, str(tmp_path / "x"), "--resume", "--lr", "0.1")
    assert code == 2 and "other data or settings" in err


def test_sigterm_stops_cleanly_with_exit_130_and_a_checkpoint(world, base, tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lrtool",
            "train",
            str(world / "hop1.jsonl"),
            "--base",
            str(base),
            "--max-steps",
            "100000",
            "--batch-size",
            "8",
            "-o",
            str(tmp_path / "out"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.time() + 120
    while not any(p.name.startswith(".out.") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(8)  # past loading, into the loop
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and out == "", err
    assert err.strip().splitlines()[-1] == "Error: interrupted" and "Traceback" not in err
    assert not (tmp_path / "out").exists() and (tmp_path / "out.ckpt" / "checkpoint.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_several_datasets_train_one_adapter_on_their_union(world, base, cli, tmp_path):
    code, _, _ = cli(
        "train",
        str(world / "hop1.jsonl"),
        str(world / "hop2.jsonl"),
        "--base",
        str(base),
        "--max-steps",
        "2",
        "-q",
        "-o",
        str(tmp_path / "multi"),
    )
    assert code == 0
    final = lines(tmp_path / "multi" / "train_log.jsonl")[-1]["final"]
    assert final["examples"] == len(lines(world / "hop1.jsonl")) + len(lines(world / "hop2.jsonl"))
    manifest = json.loads((tmp_path / "multi" / "lrtool.json").read_text())
    assert set(manifest["inputs"]) >= {str(world / "hop1.jsonl"), str(world / "hop2.jsonl")}


def test_train_tokens_new_trains_only_the_rows_of_names_pretraining_never_saw(world, base, cli, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    code, _, err = cli(
        "train",
        str(world / "hop1.jsonl"),
        "--base",
        str(base),
        "--rank",
        "0",
        "--train-tokens",
        "new",
        "--max-steps",
        "3",
        "--lr",
        "0.01",
        "-q",
        "-o",
        str(tmp_path / "rows"),
    )
    assert code == 0, err
    config = json.loads((tmp_path / "rows" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRAINABLE_TOKENS"
    tokenizer = AutoTokenizer.from_pretrained(base)
    new_people = {x["meta"]["chain"][0] for x in lines(world / "hop1.jsonl") if not x["meta"]["in_pretrain"]}
    new_ids = {word_ids(tokenizer, p)[0] for p in new_people}
    assert new_ids <= set(config["token_indices"])
    seen = set(json.loads((base / "lrtool_seen_tokens.json").read_text())["token_ids"])
    assert not set(config["token_indices"]) & seen
    weights = load_file(tmp_path / "rows" / "adapter_model.safetensors")
    assert any(t.shape[0] == len(config["token_indices"]) for t in weights.values())


def test_new_names_do_not_start_from_collapsed_embedding_rows(world, base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    new_people = sorted(
        {x["meta"]["chain"][0] for x in lines(world / "hop1.jsonl") if not x["meta"]["in_pretrain"]}
    )
    rows = model.get_input_embeddings().weight[[word_ids(tokenizer, p)[0] for p in new_people]]
    cosine = torch.nn.functional.cosine_similarity(rows[:, None], rows[None], dim=-1)
    off_diagonal = cosine[~torch.eye(len(rows), dtype=torch.bool)]
    assert off_diagonal.abs().mean() < 0.5


@pytest.mark.parametrize(
    "make_input, args, code, needle",
    [
        (
            lambda d: d.joinpath("bad.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "x"}\n'),
            ["bad.jsonl"],
            1,
            "bad.jsonl:2: missing field 'answer'",
        ),
        (lambda d: d.joinpath("empty.jsonl").write_text(""), ["empty.jsonl"], 1, "empty.jsonl: no examples"),
        (lambda d: d.joinpath("notamodel").mkdir(), ["ok.jsonl", "--base", "notamodel"], 1, "not a model"),
        (None, ["ok.jsonl", "--targets", "nonexistent_proj"], 2, "nonexistent_proj"),
        (None, ["ok.jsonl", "--rank", "0"], 2, "--rank 0 trains nothing"),
        (None, ["ok.jsonl", "--base", "tiny"], 2, "pretrain it first"),
        (None, ["ok.jsonl", "--until-accuracy", "1.5"], 2, "--until-accuracy"),
        (None, ["missing.jsonl"], 1, "missing.jsonl: no such file"),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(
    base, cli, tmp_path, monkeypatch, make_input, args, code, needle
):
    monkeypatch.chdir(tmp_path)
    Path("ok.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    if make_input:
        make_input(tmp_path)
    if "--base" not in args:
        args = [*args, "--base", str(base)]
    got, out, err = cli("train", *args, "-o", "out")
    assert (got, out) == (code, "") and err.startswith("Error: ") and needle in err
    assert len(err.strip().splitlines()) == 1
    assert not Path("out").exists() and not [p for p in Path().iterdir() if p.name.startswith(".out")]


def test_an_existing_output_is_refused_before_any_training(base, cli, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    code, _, err = cli("train", str(tmp_path / "d.jsonl"), "--base", str(base), "-o", str(tmp_path / "out"))
    assert code == 1 and "--force" in err


def test_missing_the_accuracy_bar_writes_the_output_and_exits_3(world, base, cli, tmp_path):
    code, out, err = cli(
        "train",
        str(world / "hop1.jsonl"),
        "--base",
        str(base),
        "--max-steps",
        "2",
        "--until-accuracy",
        "1.0",
        "--check-every",
        "1",
        "-q",
        "-o",
        str(tmp_path / "weak"),
    )
    assert code == 3 and out.strip() == str(tmp_path / "weak") and "--until-accuracy" in err
    assert (tmp_path / "weak" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun is not installed",
)
def test_torchrun_with_two_processes_gives_the_single_process_adapter(world, base, tmp_path):

    common = [
        str(world / "hop1.jsonl"),
        "--base",
        str(base),
        "--max-steps",
        "4",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "-q",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "lrtool", "train", *common, "-o", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
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
            "train",
            *common,
            "-o",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert double.returncode == 0, double.stderr
    assert double.stdout.strip() == str(tmp_path / "two")  # reported once, by rank 0
    assert_same_updates(tmp_path / "one", tmp_path / "two", atol=1e-5, rtol=1e-4)


def test_a_signal_in_the_middle_of_a_step_stops_at_the_step_boundary_and_resumes_exactly(
    world, base, cli, tmp_path, monkeypatch
):
    import lrtool.train.loop as training  # the step loop's own _token_loss_sum

    args = [
        "train",
        str(world / "hop1.jsonl"),
        "--base",
        str(base),
        "--max-steps",
        "8",
        "--batch-size",
        "16",
        "--grad-accum",
        "2",
        "-q",
    ]
    assert cli(*args, "-o", str(tmp_path / "straight"))[0] == 0

    real_loss, calls = training._token_loss_sum, []

    def loss_with_a_signal_in_step_3(model, batch):
        calls.append(1)
        if len(calls) == 5:  # the first micro-batch of step 3: the signal lands mid-step
            signal.raise_signal(signal.SIGINT)
        return real_loss(model, batch)

    monkeypatch.setattr(training, "_token_loss_sum", loss_with_a_signal_in_step_3)
    code, _, _ = cli(*args, "-o", str(tmp_path / "resumed"))
    assert code == 130
    assert json.loads((tmp_path / "resumed.ckpt" / "checkpoint.json").read_text())["step"] == 3
    monkeypatch.setattr(training, "_token_loss_sum", real_loss)
    assert cli(*args, "--resume", "-o", str(tmp_path / "resumed"))[0] == 0
    assert_same_updates(tmp_path / "straight", tmp_path / "resumed", atol=1e-7)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["-"], "not '-'"),
        (["--vocab-from", "ok.jsonl"], "--vocab-from"),
        (["--max-length", "3"], "--max-length"),
        (["--chat-template"], "no chat template"),
    ],
)
def test_flags_that_cannot_apply_are_usage_errors(base, cli, tmp_path, monkeypatch, extra, needle):
    monkeypatch.chdir(tmp_path)
    Path("ok.jsonl").write_text(
        '{"prompt": "Q: Who is Ava\'s mentor? A:", "answer": "Bram Bram Bram Bram"}\n'
    )
    data = [] if extra == ["-"] else ["ok.jsonl"]
    code, out, err = cli("train", *data, *extra, "--base", str(base), "-o", "out")
    assert (code, out) == (2, "") and needle in err and not Path("out").exists()


def test_a_base_with_only_pickled_weights_is_refused_and_never_unpickled(base, cli, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(base, pickled)
    (pickled / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle

    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    code, _, err = cli(
        "train", str(tmp_path / "d.jsonl"), "--base", str(pickled), "-o", str(tmp_path / "out")
    )
    assert code == 1 and err.startswith("Error: cannot load base") and not marker.exists()


def test_every_settings_field_is_one_train_option_with_the_fields_default():
    """cli.py declares no train option of its own: each TrainSettings field is exactly one parameter of
    `lrtool train`, spelled and described as the field's Flag says, with the field's default."""
    from dataclasses import MISSING, fields

    import typer

    from lrtool.cli import app
    from lrtool.train import TrainSettings
    from lrtool.train.settings import FLAG

    command = typer.main.get_command(app).commands["train"]
    names = [p.name for p in command.params]
    own = {"out", "resume", "force", "quiet", "verbose"}  # options of the command line, not of training
    assert sorted(n for n in names if n not in own) == sorted(f.name for f in fields(TrainSettings))
    assert len(names) == len(set(names))
    for setting in fields(TrainSettings):
        param, flag = command.params[names.index(setting.name)], setting.metadata[FLAG]
        assert param.param_type_name == ("option" if flag.flags else "argument"), setting.name
        assert (tuple(param.opts) if flag.flags else ()) == flag.flags and param.help == flag.help
        if setting.default is MISSING and setting.default_factory is MISSING:
            assert param.required, setting.name
        else:
            default = setting.default if setting.default_factory is MISSING else setting.default_factory()
            assert getattr(param.default, "value", param.default) == default, setting.name  # choices by value


def test_resolved_settings_fill_the_defaults_that_depend_on_full_once():
    from lrtool.train import TrainSettings

    def defaults(s):
        return s.lr, s.weight_decay, s.batch_size, s.loss, s.epochs, s.alpha

    full = TrainSettings(data=["x.jsonl"], base="tiny", full=True).resolved()
    lora = TrainSettings(data=["x.jsonl"], base="base/", rank=8, max_steps=5).resolved()
    assert defaults(full) == (1e-3, 0.1, 128, "all", 20.0, 32.0)
    assert defaults(lora) == (5e-4, 0.0, 64, "answer", None, 16.0)
    assert lora.resolved() is lora
