"""Hostile but realistic input: no silent wrong result, no stray file, every refusal names what to fix.

One test (or row) per finding of the hostile-input review: lost reports, diverging training, bytes that
change with the hash seed, seeds and numbers out of range, --force on what is not lrtool's, outputs inside
inputs, huge lines, stale temporaries, pickled checkpoints, messages without the file, overflowing adapters.
"""

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, run_lrtool
from helpers import save_random_peft_adapter, save_tiny_llama

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny world, a random tiny base over its words and two LoRAs of it."""
    from lrtool.cli import main
    from lrtool.models import texts_of

    root = tmp_path_factory.mktemp("hostile")
    with pytest.raises(SystemExit) as done:
        main(["gen-data", "two-hop", "--size", "tiny", "--seed", "4", "-q", "-o", str(root / "world")])
    assert done.value.code == 0
    base = save_tiny_llama(root / "base", list(texts_of([root / "world"])))
    (root / "base" / "lrtool.json").write_text("{}")  # as train --full writes it
    one = save_random_peft_adapter(base, root / "one", seed=1, r=4, lora_alpha=8, target_modules="all-linear")
    two = save_random_peft_adapter(base, root / "two", seed=2, r=4, lora_alpha=8, target_modules="all-linear")
    return SimpleNamespace(root=root, world=root / "world", base=base, one=one, two=two)


def train_args(env, *extra):
    return ["train", str(env.world / "hop1.jsonl"), "--base", str(env.base), "--max-steps", "2", "-q", *extra]


def one_error_line(err: str) -> bool:
    return err.startswith("Error: ") and err.count("\n") == 1


def siblings(path: Path) -> list[str]:
    """What is left beside `path` (temporaries and such), by name."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}"))


# ------------------------------------------------------------------------------ 1. stdout


@pytest.mark.parametrize(
    "args",
    [
        ["gen-data", "two-hop", "--split", "twohop", "--size", "tiny"],
        ["merge", "--list"],
        ["diagnose", "{one}"],
        ["eval", "{hop1}", "--base", "{base}", "--limit", "2", "--bootstrap", "0"],
    ],
)
def test_a_report_that_cannot_be_written_to_stdout_is_an_error_not_exit_0(env, args):
    args = [a.format(one=env.one, hop1=env.world / "hop1.jsonl", base=env.base) for a in args]
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "lrtool", *args], stdout=full, stderr=subprocess.PIPE, text=True, cwd=REPO
        )
    assert result.returncode == 1
    assert "Error: cannot write stdout: No space left on device" in result.stderr


# ------------------------------------------------------------------------------ 2. divergence


def test_a_diverging_run_stops_at_the_step_with_one_line_and_writes_nothing(cli, env, tmp_path):
    out = tmp_path / "nan"
    code, stdout, err = cli(*train_args(env, "--lr", "1e6", "--max-steps", "8", "-o", str(out)))
    assert code == 1 and stdout == "" and one_error_line(err)
    assert "training diverged" in err and "at step" in err and "lower --lr" in err
    assert not out.exists() and siblings(out) == []


@pytest.mark.parametrize("flag", ["--lr", "--alpha", "--weight-decay", "--epochs", "--dropout"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_numbers_are_usage_errors(cli, env, tmp_path, flag, value):
    code, _, err = cli(*train_args(env, flag, value, "-o", str(tmp_path / "x")))
    assert code == 2 and "finite" in err and one_error_line(err)


def test_resume_refuses_a_checkpoint_with_non_finite_weights(cli, env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 1)
    assert cli(*train_args(env, "--max-steps", "4", "-o", str(out)))[0] == 130
    monkeypatch.undo()
    ckpt = tmp_path / "run.ckpt"
    weights = load_file(ckpt / "trainable.safetensors")
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in weights.items()}, ckpt / "trainable.safetensors"
    )
    code, _, err = cli(*train_args(env, "--max-steps", "4", "--resume", "-o", str(out)))
    assert code == 1 and "non-finite" in err and str(ckpt) in err and not out.exists()


def test_json_lines_never_carry_a_bare_nan():
    from lrtool import io

    assert io.dumps_line({"loss": float("nan"), "x": [float("inf"), 1.5]}) == '{"loss":null,"x":[null,1.5]}'
    assert "NaN" not in io.dumps_report({"loss": float("nan")})


# ------------------------------------------------------------------------------ 3. bytes


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_training_gives_the_same_bytes_under_different_hash_seeds(env, tmp_path, kind):
    args = (
        train_args(env)
        if kind == "lora"
        else [
            "train",
            str(env.world / "pretrain.jsonl"),
            "--base",
            "tiny:micro",
            "--full",
            "--max-steps",
            "2",
        ]
        + ["--vocab-from", str(env.world), "-q"]
    )
    outputs = []
    out = tmp_path / "out"  # one output path: lrtool.json records the command line
    for hash_seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-m", "lrtool", *args, "-o", str(out)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, result.stderr
        outputs.append(out.rename(tmp_path / f"hash{hash_seed}"))
    names = sorted(p.name for p in outputs[0].iterdir() if p.name != "train_log.jsonl")
    assert names == sorted(p.name for p in outputs[1].iterdir() if p.name != "train_log.jsonl")
    for name in names:
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name
    if kind == "lora":
        modules = json.loads((outputs[0] / "adapter_config.json").read_text())["target_modules"]
        assert modules == sorted(modules)


# ------------------------------------------------------------------------------ 4, 9. numbers


@pytest.mark.parametrize(
    "args",
    [
        ["gen-data", "two-hop", "--split", "hop1", "--seed", "-5"],
        ["gen-data", "two-hop", "--split", "hop1", "--seed", str(2**70)],
        ["train", "x.jsonl", "--base", "b", "-o", "o", "--seed", str(2**70)],
        ["merge", "a", "b", "--method", "dare-linear", "-o", "o", "--seed", "-1"],
        ["train", "x.jsonl", "--base", "b", "-o", "o", "--epochs", "inf"],
        ["eval", "x.jsonl", "--base", "b", "--fail-under", "nan"],
    ],
)
def test_out_of_range_numbers_are_usage_errors_at_parse_time(cli, args):
    code, out, err = cli(*args)
    assert code == 2 and out == "" and one_error_line(err)


# ------------------------------------------------------------------------------ 5. bases


def declare_base(adapter: Path, base: str) -> None:
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": base}))


def test_merge_takes_one_base_spelled_two_ways_and_refuses_two_bases_unless_told(
    cli, env, tmp_path, monkeypatch
):
    import shutil

    a, b = shutil.copytree(env.one, tmp_path / "a"), shutil.copytree(env.two, tmp_path / "b")
    monkeypatch.chdir(env.root)
    declare_base(a, "./base")
    declare_base(b, str(env.base.resolve()) + "/")
    assert cli("merge", str(a), str(b), "--method", "linear", "-o", str(tmp_path / "m1"), "-q")[0] == 0
    assert json.loads(cli("diagnose", str(a), str(b))[1])["pairs"][0]["base_mismatch"] is False
    declare_base(b, "someone/another-model")
    code, _, err = cli("merge", str(a), str(b), "--method", "linear", "-o", str(tmp_path / "m2"))
    assert code == 1 and "different bases" in err and "--allow-base-mismatch" in err
    pair = json.loads(cli("diagnose", str(a), str(b))[1])["pairs"][0]  # diagnose says what merge does
    assert pair["base_mismatch"] is True and "--allow-base-mismatch" in pair["verdict"]
    extra = ["--allow-base-mismatch", "-q"]
    assert cli("merge", str(a), str(b), "--method", "linear", "-o", str(tmp_path / "m3"), *extra)[0] == 0


# ------------------------------------------------------------------------------ 6, 15. bad adapters


def with_alpha(source: Path, target: Path, alpha: float) -> Path:
    import shutil

    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))
    return target


def test_one_overflowing_adapter_is_its_own_finding_and_the_others_are_still_reported(cli, env, tmp_path):
    huge = with_alpha(env.one, tmp_path / "huge", 1e308)
    code, out, err = cli("diagnose", str(huge), str(env.two))
    assert code == 0, err
    report = json.loads(out)
    bad, good = report["adapters"]
    assert {f["code"] for f in bad["findings"]} == {"overflow"} and "overflows" in bad["refused"]
    assert good["findings"] == [] and good["refused"] is None
    assert all(m["norm"] is not None for m in good["modules"])


def test_overflow_is_refused_by_merge_and_eval_without_wrong_advice(cli, env, tmp_path):
    huge = with_alpha(env.one, tmp_path / "huge", 1e308)
    for args in (
        ["merge", str(huge), str(env.two), "--method", "linear", "-o", str(tmp_path / "m")],
        [
            "merge",
            str(env.one),
            str(env.two),
            "--method",
            "linear",
            "--weights",
            "1e308,1e308",
            "-o",
            str(tmp_path / "m"),
        ],
        [
            "eval",
            str(env.world / "hop1.jsonl"),
            "--base",
            str(env.base),
            "--adapter",
            str(huge),
            "--limit",
            "2",
        ],
    ):
        code, out, err = cli(*args)
        assert code == 1 and out == "" and one_error_line(err) and "overflows" in err
        assert "convert the adapters to float32" not in err
    assert not (tmp_path / "m").exists() and siblings(tmp_path / "m") == []


def zero_width_adapter(env, root: Path) -> Path:
    from lrtool.adapters import PEFT_PREFIX

    (root / "zero").mkdir()
    (root / "zero" / "adapter_config.json").write_text((env.one / "adapter_config.json").read_text())
    name = f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj"
    tensors = {f"{name}.lora_A.weight": torch.zeros(4, 0), f"{name}.lora_B.weight": torch.zeros(32, 4)}
    save_file(tensors, root / "zero" / "adapter_model.safetensors")
    return root / "zero"


def test_a_factor_with_a_zero_dimension_is_malformed(cli, env, tmp_path):
    zero = zero_width_adapter(env, tmp_path)
    code, _, err = cli("merge", str(zero), str(env.two), "--method", "linear", "-o", str(tmp_path / "m"))
    assert code == 1 and "zero dimension" in err
    report = json.loads(cli("diagnose", str(zero))[1])
    assert "zero dimension" in report["adapters"][0]["refused"]
    assert "malformed" in {f["code"] for f in report["adapters"][0]["findings"]}


@pytest.mark.parametrize("poison", ["int8", "nan"])
def test_diagnose_says_why_merge_refuses_integer_or_nan_factors(cli, env, tmp_path, poison):
    import shutil

    bad = shutil.copytree(env.one, tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = (
        tensors[first].to(torch.int8) if poison == "int8" else torch.full_like(tensors[first], float("nan"))
    )
    save_file(tensors, bad / "adapter_model.safetensors")
    merged = cli("merge", str(bad), str(env.two), "--method", "linear", "-o", str(tmp_path / "m"))
    assert merged[0] == 1
    refused = json.loads(cli("diagnose", str(bad))[1])["adapters"][0]["refused"]
    assert refused and refused in merged[2]


def test_a_fan_in_fan_out_mismatch_names_both_layouts_with_different_shapes(cli, env, tmp_path):
    import shutil

    gpt2_style = shutil.copytree(env.one, tmp_path / "gpt2")
    config = json.loads((gpt2_style / "adapter_config.json").read_text())
    (gpt2_style / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    out = tmp_path / "m"
    code, _, err = cli(
        "merge", str(gpt2_style), "--method", "linear", "--into-base", str(env.base), "-o", str(out)
    )
    assert code == 1 and "fan_in_fan_out" in err
    shapes = [part for part in err.split() if part.startswith("[")]
    assert len(set(shapes)) > 1 or "[in, out]" in err


# ------------------------------------------------------------------------------ 7, 8. outputs


def test_force_replaces_only_what_lrtool_wrote(cli, env, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    args = ["gen-data", "two-hop", "--split", "hop1", "--size", "tiny", "--force", "-o"]
    code, _, err = cli(*args, str(notes))
    assert code == 1 and "lrtool did not write" in err and notes.read_text() == "my notes\n"
    ours = tmp_path / "hop1.jsonl"
    assert cli(*args, str(ours))[0] == 0 and cli(*args, str(ours))[0] == 0  # its own output: replaced
    report = tmp_path / "report.json"
    report.write_text('{"results": 1}\n')
    code, _, err = cli(
        "eval", str(ours), "--base", str(env.base), "--limit", "1", "--force", "-o", str(report)
    )
    assert code == 1 and "lrtool did not write" in err


@pytest.mark.parametrize("target, needle", [("fifo", "not a regular file"), ("link", "symbolic link")])
def test_links_and_devices_are_never_outputs(cli, tmp_path, target, needle):
    # Made here, never /dev/null itself: a regression would replace a machine's device with a file.
    if target == "link":
        os.symlink("/proc/self/fd/1", tmp_path / "link")
    else:
        os.mkfifo(tmp_path / "fifo")
    path = tmp_path / target
    code, out, err = cli(
        "gen-data", "two-hop", "--split", "hop1", "--size", "tiny", "--force", "-o", str(path)
    )
    assert code == 2 and out == "" and needle in err
    assert path.is_symlink() or stat.S_ISFIFO(path.stat().st_mode)


def test_dev_stdout_as_an_output_points_to_dash():
    from lrtool import outputs
    from lrtool.errors import UsageError

    for path in ("/dev/stdout", "/proc/self/fd/1"):  # checked only: nothing is written
        with pytest.raises(UsageError, match="with '-'"):
            outputs.check_output_free(path, force=True)


def test_an_output_inside_or_equal_to_an_input_is_a_usage_error(cli, env, tmp_path):
    import shutil

    base = shutil.copytree(env.base, tmp_path / "base")
    code, _, err = cli(*train_args(env, "--force", "-o", str(base)), "--base", str(base))
    assert code == 2 and "input" in err and (base / "config.json").is_file()
    code, _, err = cli("merge", str(env.one), "--method", "linear", "-o", str(env.one / "inside"))
    assert code == 2 and "input" in err
    data = env.world / "hop1.jsonl"
    code, _, err = cli("eval", str(data), "--base", str(env.base), "--predictions", str(data), "--force")
    assert code == 2 and "input" in err


@pytest.mark.parametrize("verb", ["train", "merge"])
def test_a_directory_output_cannot_be_stdout(cli, env, tmp_path, monkeypatch, verb):
    monkeypatch.chdir(tmp_path)
    args = (
        train_args(env, "-o", "-")
        if verb == "train"
        else ["merge", str(env.one), "--method", "linear", "-o", "-"]
    )
    code, _, err = cli(*args)
    assert code == 2 and "cannot go to stdout" in err and not (tmp_path / "-").exists()


# ------------------------------------------------------------------------------ 10. huge lines


def test_a_huge_prompt_is_cut_to_the_tail_truncation_keeps_before_tokenizing(env, monkeypatch):
    import lrtool.train.setup as training  # where encode_line looks up encode_example
    from lrtool.encoding import CHARS_PER_TOKEN, encode_example
    from lrtool.models import load_base

    _, tokenizer = load_base(str(env.base))
    settings = training.TrainSettings(data=["x"], base=str(env.base), max_length=16).resolved()
    prompt = " ".join(["Brehur's mentor is"] * 20_000) + " The mentor of Brehur is"
    seen = []
    monkeypatch.setattr(
        training, "encode_example", lambda tok, p, *a, **k: seen.append(p) or encode_example(tok, p, *a, **k)
    )
    ids, labels = training.encode_line(tokenizer, prompt, "Hureim", "x:1", settings, False)
    assert len(seen[0]) <= CHARS_PER_TOKEN * 16
    full_ids, full_labels = encode_example(tokenizer, prompt, "Hureim")
    assert ids[-16:] == full_ids[-16:] and labels[-16:] == full_labels[-16:]


def test_eval_refuses_a_prompt_the_model_cannot_read_without_tokenizing_a_huge_one(
    cli, env, tmp_path, monkeypatch
):
    """The tiny base reads 256 positions. A 300-word prompt, and a 10 MB one judged by its first 32 x 256
    characters, are refused; a 250-word one (252 tokens) fits only with room for its answer: not with the
    default --max-new-tokens (the answer's 3 tokens + 16), but with 4. Each
    refusal names FILE:LINE and writes nothing."""
    import lrtool.encoding as encoding

    tokenized = []
    real_prompt_ids = encoding.prompt_ids

    def counting(tokenizer, prompt, *args):
        tokenized.append(len(prompt))
        return real_prompt_ids(tokenizer, prompt, *args)

    monkeypatch.setattr(encoding, "prompt_ids", counting)
    for words, flags, needle in (
        (300, [], "the prompt has 256 tokens or more"),
        (2_000_000, [], "the prompt has 256 tokens or more"),
        (250, [], "the prompt's 252 tokens and the 19 its answer may take exceed the 256 positions"),
        (250, ["--max-new-tokens", "4"], None),
    ):
        data = tmp_path / f"long{words}.jsonl"
        lines = [
            {"prompt": "Who is Brehur's mentor?", "answer": "x"},
            {"prompt": "mentor " * words, "answer": "x"},
        ]
        data.write_text("".join(json.dumps(line) + "\n" for line in lines))
        report = tmp_path / f"r{words}{len(flags)}.json"
        code, out, err = cli("eval", str(data), "--base", str(env.base), *flags, "-o", str(report))
        if needle is None:
            assert code == 0 and report.exists(), err
            continue
        assert (code, out) == (1, "") and one_error_line(err), err
        assert f"{data}:2: {needle}" in err, err
        assert not report.exists()
    assert max(tokenized) <= encoding.CHARS_PER_TOKEN * 256  # the huge prompt never reached it whole


def test_an_answer_too_long_for_max_length_is_refused_with_file_and_line(cli, env, tmp_path):
    second = tmp_path / "second.jsonl"
    lines = [json.dumps({"prompt": "p", "answer": "short"})] * 3 + [
        json.dumps({"prompt": "p", "answer": "x " * 40})
    ]
    second.write_text("\n".join(lines) + "\n")
    args = [
        "train",
        str(env.world / "hop1.jsonl"),
        str(second),
        "--base",
        str(env.base),
        "--max-length",
        "20",
    ]
    code, _, err = cli(*args, "-o", str(tmp_path / "o"))
    assert code == 2 and f"{second}:4" in err and "--max-length" in err


def test_max_length_that_leaves_no_prompt_token_is_refused(cli, env, tmp_path):
    code, _, err = cli(*train_args(env, "--max-length", "2", "-o", str(tmp_path / "o")))
    assert code == 2 and "no room for the prompt" in err and "hop1.jsonl:1" in err


# ------------------------------------------------------------------------------ 11, 12. leftovers


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_later_run_removes_the_temporaries_of_killed_runs_but_not_of_live_ones(cli, tmp_path):
    out = tmp_path / "world"
    stale_dir = tmp_path / f".world.{dead_pid()}.abc.tmp"
    stale_dir.mkdir()
    (stale_dir / "big.bin").write_bytes(b"0" * 1000)
    stale_old = tmp_path / f".world.old-{dead_pid()}"
    stale_old.mkdir()
    live = tmp_path / f".world.{os.getpid()}.xyz.tmp"
    live.mkdir()
    assert cli("gen-data", "two-hop", "--size", "tiny", "-q", "-o", str(out))[0] == 0
    assert not stale_dir.exists() and not stale_old.exists() and live.exists()


def test_a_finished_training_run_removes_what_killed_checkpoint_saves_left(cli, env, tmp_path):
    stale = [tmp_path / f".o.ckpt.{dead_pid()}.abc.tmp", tmp_path / f".o.ckpt.old-{dead_pid()}"]
    for path in stale:
        path.mkdir()
        (path / "trainable.safetensors").write_bytes(b"0" * 100)
    assert cli(*train_args(env, "-o", str(tmp_path / "o")))[0] == 0
    assert not any(path.exists() for path in stale) and (tmp_path / "o").is_dir()


def interrupt_at(monkeypatch, at_step: int) -> None:
    import lrtool.train as training

    real_train = training.train

    def interrupted(*args, **kwargs):
        def on_step(step):
            if step == at_step:
                raise KeyboardInterrupt

        return real_train(*args, on_step=on_step, **kwargs)

    monkeypatch.setattr(training, "train", interrupted)


def test_the_checkpoint_is_safetensors_and_json_and_survives_a_kill_between_renames(
    cli, env, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 1)
    assert cli(*train_args(env, "--max-steps", "3", "-o", str(out)))[0] == 130
    monkeypatch.undo()
    ckpt = tmp_path / "run.ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "checkpoint.json",
        "state.safetensors",
        "trainable.safetensors",
    ]
    # A kill after the old checkpoint moved aside and before the new one moved in:
    os.replace(ckpt, tmp_path / f".run.ckpt.old-{dead_pid()}")
    assert cli(*train_args(env, "--max-steps", "3", "--resume", "-o", str(out)))[0] == 0
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda c: (c / "checkpoint.json").write_text("{not json"), "is damaged"),
        (lambda c: (c / "checkpoint.json").write_text("{}"), "is damaged"),
        (lambda c: (c / "state.safetensors").write_bytes(b"garbage"), "is damaged"),
        (
            lambda c: ((c / "state.safetensors").unlink(), (c / "state.pt").write_bytes(b"pickle")),
            "never unpickles",
        ),
    ],
)
def test_a_damaged_or_pickled_checkpoint_is_named_with_what_to_do(
    cli, env, tmp_path, monkeypatch, damage, needle
):
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 1)
    assert cli(*train_args(env, "--max-steps", "3", "-o", str(out)))[0] == 130
    monkeypatch.undo()
    ckpt = tmp_path / "run.ckpt"
    damage(ckpt)
    code, _, err = cli(*train_args(env, "--max-steps", "3", "--resume", "-o", str(out)))
    assert code == 1 and needle in err and str(ckpt) in err and one_error_line(err)
    assert "weights_only" not in err


# ------------------------------------------------------------------------------ 13, 14. messages


def test_a_full_disk_names_the_output_and_leaves_nothing(cli, tmp_path, monkeypatch):
    import lrtool.io as io

    def full(records, handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "write_jsonl", full)
    out = tmp_path / "hop1.jsonl"
    code, _, err = cli("gen-data", "two-hop", "--split", "hop1", "--size", "tiny", "-o", str(out))
    assert code == 1 and f"cannot write {out}: No space left on device" in err
    assert not out.exists() and siblings(out) == []


def test_an_output_under_a_file_is_named(cli, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    code, _, err = cli("gen-data", "two-hop", "--size", "tiny", "-o", str(tmp_path / "file.txt" / "world"))
    assert code == 2 and "file.txt is a file, not a directory" in err


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "a"}', "nested too deeply"),
        ('{"prompt": "a \\ud800 b", "answer": "a"}', "lone surrogate"),
    ],
)
def test_unusual_json_lines_are_refused_with_file_and_line(cli, env, tmp_path, line, needle):
    data = tmp_path / "odd.jsonl"
    data.write_text('{"prompt": "p", "answer": "a"}\n' + line + "\n")
    code, _, err = cli(*train_args(env, "-o", str(tmp_path / "o")), str(data))
    assert code == 1 and f"{data}:2" in err and needle in err and one_error_line(err)


def test_a_directory_or_fifo_as_data_says_what_it_is(cli, env, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for data, needle in ((env.world, "is a directory"), (fifo, "not a regular file")):
        code, _, err = cli("train", str(data), "--base", str(env.base), "-o", str(tmp_path / "o"))
        assert code == 1 and needle in err


# ------------------------------------------------------------------------------ 16. modes


def test_every_file_of_a_train_output_follows_the_umask(cli, env, tmp_path):
    previous = os.umask(0o022)
    try:
        assert cli(*train_args(env, "-o", str(tmp_path / "o")))[0] == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "o").iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_python_dash_m_still_reports_errors_in_one_line():
    result = run_lrtool("gen-data", "two-hop", "--split", "hop1", "--seed", "-1")
    assert result.returncode == 2 and result.stdout == ""
