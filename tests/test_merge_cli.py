"""`lrtool merge` on the command line: outputs peft loads, a base model with the update added (equal to peft's
merge_and_unload), the receipt, byte-identical reruns, and one-line refusals that write nothing."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import REPO
from helpers import kohya_tensors, make_adapter_dirs, tiny_llama
from lrtool.adapters import Adapter, LoraModule, load_adapter, save_adapter
from lrtool.io import sha256_path
from lrtool.merge import REGISTRY

torch.set_num_threads(1)
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict:
    return make_adapter_dirs(tmp_path_factory.mktemp("adapters"))


def save_base(directory, model=None, shard_size="60KB"):
    """A tiny Llama saved as sharded safetensors, with tokenizer files beside it."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # its bar would land in the stderr the tests read
    (model or tiny_llama()).save_pretrained(directory, max_shard_size=shard_size)
    (directory / "tokenizer.json").write_text('{"model": {"type": "Unigram"}}\n')
    (directory / "tokenizer.model").write_bytes(b"\x00sentencepiece")
    (directory / "lrtool.json").write_text("{}\n")  # the base's own manifest is not copied
    return directory


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base") / "base")


def args(adapter_dirs, *names):
    return [str(adapter_dirs[name]) for name in names]


def assert_refused(result, code, fragment, outputs):
    """Exit `code`, one `Error:` line containing `fragment`, nothing on stdout, nothing written."""
    exit_code, stdout, stderr = result
    assert exit_code == code, stderr
    assert stdout == ""
    assert stderr.startswith("Error: ") and stderr.count("\n") == 1, stderr
    assert fragment in stderr, stderr
    assert not outputs.exists() or list(outputs.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Listing and writing


def test_list_prints_one_json_object_per_method(cli):
    code, out, err = cli("merge", "--list")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and err == ""
    assert [line["name"] for line in lines] == list(REGISTRY)
    assert all(set(line) == {"name", "summary", "parameters"} for line in lines)


def test_merge_help_imports_no_torch():
    probe = (
        "import sys\nfrom lrtool.cli import main\n"
        "try:\n    main(['merge', '--help'])\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'peft', 'safetensors') if m in sys.modules)\n"
        "print(code, heavy, file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert result.stderr.strip().splitlines()[-1] == "0 []"
    assert "dare-ties" in result.stdout  # the registry's names are the --method choices


def test_merge_writes_a_peft_adapter_receipt_and_manifest_and_prints_its_path(cli, adapter_dirs, tmp_path):
    out = tmp_path / "merged"
    inputs = args(adapter_dirs, "a1", "a2", "a3")
    code, stdout, stderr = cli(
        "merge", *inputs, "--method", "linear", "--weights", "1,0.5,-1", "-o", str(out)
    )
    assert code == 0 and stdout == f"{out}\n"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lrtool.json",
        "merge_report.json",
    ]
    report = json.loads((out / "merge_report.json").read_text())
    assert (report["method"], report["weights"], report["parameters"], report["seed"]) == (
        "linear",
        [1.0, 0.5, -1.0],
        {},
        None,
    )
    assert [i["sha256"] for i in report["inputs"]] == [sha256_path(p) for p in inputs]
    assert report["modules"][Q0]["rank"] == 14 and report["modules"][Q0]["error"] < 1e-6
    assert (
        report["summary"]["exact_modules"] == report["summary"]["modules"] == len(load_adapter(out).modules)
    )
    manifest = json.loads((out / "lrtool.json").read_text())
    assert manifest["command"][:2] == ["lrtool", "merge"] and set(manifest["inputs"]) == set(inputs)
    assert "merged 3 adapters into one adapter with linear" in stderr
    assert "stored vs exact: relative error max" in stderr


def test_quiet_prints_only_the_path(cli, adapter_dirs, tmp_path):
    code, stdout, stderr = cli(
        "merge", *args(adapter_dirs, "a1", "a2"), "--method", "svd", "-o", str(tmp_path / "m"), "-q"
    )
    assert (code, stdout, stderr) == (0, f"{tmp_path / 'm'}\n", "")


def test_same_seed_gives_the_same_bytes_and_another_seed_other_bytes(cli, adapter_dirs, tmp_path):
    def run(seed, name):
        base = ["merge", *args(adapter_dirs, "a1", "a2", "a3"), "--method", "dare-ties", "--density", "0.5"]
        assert cli(*base, "--seed", seed, "-o", str(tmp_path / name))[0] == 0
        return {p.name: p.read_bytes() for p in (tmp_path / name).iterdir() if p.name != "lrtool.json"}

    first, again, other = run("3", "one"), run("3", "two"), run("4", "three")
    assert first == again
    assert first["adapter_model.safetensors"] != other["adapter_model.safetensors"]
    assert json.loads(first["merge_report.json"])["seed"] == 3


def test_the_new_methods_parameters_reach_the_receipt(cli, adapter_dirs, tmp_path):
    common = [*args(adapter_dirs, "a1", "a2"), "-q"]
    della = ["--method", "della", "--epsilon", "0.1", "--lambda", "2", "--seed", "5"]
    assert cli("merge", *common, *della, "-o", str(tmp_path / "della"))[0] == 0
    report = json.loads((tmp_path / "della" / "merge_report.json").read_text())
    assert report["parameters"] == {"density": 0.5, "epsilon": 0.1, "lambda": 2.0, "seed": 5, "rank": None}
    assert cli("merge", *common, "--method", "slerp", "--t", "0.25", "-o", str(tmp_path / "slerp"))[0] == 0
    report = json.loads((tmp_path / "slerp" / "merge_report.json").read_text())
    assert (report["parameters"], report["weights"]) == ({"t": 0.25}, [0.75, 0.25])
    assert any("slerp takes --t, not --weights" in note for note in report["notes"])


def test_slerp_of_three_adapters_is_a_usage_error(cli, adapter_dirs, tmp_path):
    result = cli(
        "merge", *args(adapter_dirs, "a1", "a2", "a3"), "--method", "slerp", "-o", str(tmp_path / "o" / "m")
    )
    assert_refused(result, 2, "slerp merges exactly 2 adapters, got 3", tmp_path / "o")


def kohya_copy(adapter_dir, path):
    """The adapter as a kohya-style file, module names underscore-mangled with a text-encoder prefix."""
    tensors = kohya_tensors(load_adapter(adapter_dir), lambda name: "lora_te_" + name.replace(".", "_"))
    save_file(tensors, path)
    return str(path)


def test_a_kohya_file_merges_as_its_peft_twin(cli, adapter_dirs, tmp_path):
    kohya = kohya_copy(adapter_dirs["a1"], tmp_path / "a1.safetensors")
    for name, first in (("from-kohya", kohya), ("from-peft", str(adapter_dirs["a1"]))):
        out = str(tmp_path / name)
        code, _, err = cli("merge", first, str(adapter_dirs["a1"]), "--method", "svd", "-o", out)
        assert code == 0, err
    ours, twin = load_adapter(tmp_path / "from-kohya"), load_adapter(tmp_path / "from-peft")
    assert list(ours.modules) == list(twin.modules)
    for name, module in twin.modules.items():
        torch.testing.assert_close(ours.modules[name].delta(), module.delta())


def test_kohya_names_no_input_matches_are_refused_but_a_base_matches_them(
    cli, adapter_dirs, base_dir, tmp_path
):
    kohya = kohya_copy(adapter_dirs["a1"], tmp_path / "a1.safetensors")
    outs = tmp_path / "outs"
    result = cli("merge", kohya, str(adapter_dirs["a2"]), "--method", "linear", "-o", str(outs / "m"))
    assert_refused(result, 1, "module 'lora_te_model_layers_0_mlp_up_proj' matches no module path", outs)
    for name, first in (("from-kohya", kohya), ("from-peft", str(adapter_dirs["a1"]))):
        code, _, err = cli(
            "merge",
            first,
            str(adapter_dirs["a2"]),
            "--method",
            "linear",
            "--into-base",
            str(base_dir),
            "-o",
            str(tmp_path / name),
        )
        assert code == 0, err
    for shard in base_dir.glob("*.safetensors"):
        kohya_bytes = (tmp_path / "from-kohya" / shard.name).read_bytes()
        assert kohya_bytes == (tmp_path / "from-peft" / shard.name).read_bytes()


# ---------------------------------------------------------------------------------------------------------
# --into-base


@pytest.mark.parametrize("method, rank", [("linear", []), ("ties", ["--rank", "64"])])
def test_into_base_equals_peft_merge_and_unload_of_the_adapter_output(
    cli, adapter_dirs, base_dir, tmp_path, method, rank
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    common = ["merge", *args(adapter_dirs, "a1", "a2", "a3"), "--method", method, "--weights", "0.7,0.4,-0.5"]
    assert cli(*common, *rank, "-o", str(tmp_path / "adapter"))[0] == 0
    code, stdout, stderr = cli(*common, "--into-base", str(base_dir), "-o", str(tmp_path / "model"))
    assert code == 0 and stdout == f"{tmp_path / 'model'}\n", stderr

    expected = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    assert set(merged) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(merged[key], tensor, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(merged[key], t) for key, t in tiny_llama().state_dict().items())

    files = sorted(p.name for p in (tmp_path / "model").iterdir())
    shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
    assert len(shards) > 1 and set(shards) <= set(files)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model"):
        assert (tmp_path / "model" / name).read_bytes() == (base_dir / name).read_bytes()
    assert json.loads((tmp_path / "model" / "lrtool.json").read_text())["command"][1] == "merge"
    report = json.loads((tmp_path / "model" / "merge_report.json").read_text())
    assert report["output"]["kind"] == "model" and report["summary"]["error_max"] < 1e-5
    assert report["into_base"] == {"path": str(base_dir), "sha256": sha256_path(base_dir)}


def test_into_base_keeps_the_base_dtype_and_reports_its_rounding(cli, adapter_dirs, tmp_path):
    base = save_base(tmp_path / "bf16", tiny_llama().to(torch.bfloat16), shard_size="10GB")
    out = tmp_path / "model"
    assert (
        cli(
            "merge", *args(adapter_dirs, "a1"), "--method", "linear", "--into-base", str(base), "-o", str(out)
        )[0]
        == 0
    )
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        weight = f.get_tensor(f"{Q0}.weight")
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        original = f.get_tensor(f"{Q0}.weight")
    delta = load_adapter(adapter_dirs["a1"]).modules[Q0].delta()
    torch.testing.assert_close(weight.double(), (original.double() + delta).bfloat16().double())
    error = json.loads((out / "merge_report.json").read_text())["modules"][Q0]["error"]
    written = weight.double() - original.double()
    assert error == pytest.approx(
        (torch.linalg.matrix_norm(written - delta) / torch.linalg.matrix_norm(delta)).item(), rel=1e-4
    )
    assert error > 1e-3  # bf16 rounding of the weights, said as it is


# ---------------------------------------------------------------------------------------------------------
# Refusals: one line, the right exit code, nothing written


def write_adapter(directory, modules, base=None):
    save_adapter(Adapter(modules=modules, base=base), directory)
    return str(directory)


def random_module(out_features, in_features, rank=2):
    generator = torch.Generator().manual_seed(0)
    return LoraModule(
        A=torch.randn(rank, in_features, generator=generator),
        B=torch.randn(out_features, rank, generator=generator),
        scale=1.0,
    )


def test_an_existing_output_is_kept_without_force(cli, adapter_dirs, tmp_path):
    out = tmp_path / "out"
    assert cli("merge", *args(adapter_dirs, "a1", "a2"), "--method", "svd", "-o", str(out))[0] == 0
    (out / "mine.txt").write_text("keep me")
    result = cli("merge", *args(adapter_dirs, "a1", "a2"), "--method", "linear", "-o", str(out))
    assert result[0] == 1 and "--force" in result[2]
    assert (out / "mine.txt").read_text() == "keep me"
    assert (
        cli("merge", *args(adapter_dirs, "a1", "a2"), "--method", "linear", "-o", str(out), "--force")[0] == 0
    )
    assert not (out / "mine.txt").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    result = cli("merge", *args(adapter_dirs, "a1", "a2"), "--method", "linear", "-o", str(mine), "--force")
    assert result[0] == 1 and "lrtool did not write" in result[2] and (mine / "notes.txt").exists()


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--method", "average"], "'average' is not one of 'linear', 'svd', 'factor-avg'"),
        ([], "give --method, one of: linear, svd"),
        (["--method", "linear", "--weights", "1,2,3"], "--weights has 3 values for 2 adapters"),
        (["--method", "ties", "--density", "0"], "--density must be in (0, 1]"),
        (["--method", "linear", "--rank", "4"], "--rank does not apply to method linear"),
        (["--method", "linear", "--t", "0.3"], "--t does not apply to method linear"),
        (["--method", "slerp", "--weights", "1,2"], "slerp takes no --weights"),
        (["--method", "breadcrumbs", "--gamma", "1"], "--gamma must be in [0, 1)"),
        (["--method", "della", "--epsilon", "0.6"], "D - epsilon and D + epsilon must lie in (0, 1)"),
    ],
)
def test_usage_errors_exit_2(cli, adapter_dirs, tmp_path, extra, fragment):
    out = tmp_path / "outs" / "merged"
    result = cli("merge", *args(adapter_dirs, "a1", "a2"), *extra, "-o", str(out))
    assert_refused(result, 2, fragment, tmp_path / "outs")


def test_rank_with_into_base_is_a_usage_error_for_dense_methods(cli, adapter_dirs, base_dir, tmp_path):
    result = cli(
        "merge",
        *args(adapter_dirs, "a1", "a2"),
        "--method",
        "ties",
        "--rank",
        "4",
        "--into-base",
        str(base_dir),
        "-o",
        str(tmp_path / "outs" / "m"),
    )
    assert_refused(result, 2, "--into-base adds the exact update, so drop --rank", tmp_path / "outs")


def broken_inputs(adapter_dirs, tmp_path):
    """name -> (adapter arguments, method, message fragment): inputs merge must refuse with exit 1."""
    a1 = str(adapter_dirs["a1"])
    nan = load_adapter(a1)
    nan.modules[Q0].B[0, 0] = float("nan")
    save_adapter(nan, tmp_path / "nan")
    dora = shutil.copytree(a1, tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    truncated = shutil.copytree(a1, tmp_path / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    wider = write_adapter(tmp_path / "wider", {Q0: random_module(48, 48)})
    return {
        "different shapes": ([a1, wider], "linear", f"module '{Q0}' is [32, 32] (out, in) in"),
        "different base names": (
            [
                write_adapter(tmp_path / "x", {Q0: random_module(32, 32)}, base="org/llama-a"),
                write_adapter(tmp_path / "y", {Q0: random_module(32, 32)}, base="org/llama-b"),
            ],
            "linear",
            "adapters for different bases",
        ),
        "non-finite": ([a1, str(tmp_path / "nan")], "linear", f"module '{Q0}' has non-finite values"),
        "dora": ([a1, str(dora)], "svd", "DoRA"),
        "truncated": ([a1, str(truncated)], "linear", "not a readable safetensors file"),
        "unequal ranks": ([a1, str(adapter_dirs["a2"])], "factor-avg", "factor-avg needs equal ranks"),
        "missing": ([a1, str(tmp_path / "nowhere")], "linear", "no such file or directory"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "different shapes",
        "different base names",
        "non-finite",
        "dora",
        "truncated",
        "unequal ranks",
        "missing",
    ],
)
def test_inputs_that_cannot_be_merged_exit_1_and_write_nothing(cli, adapter_dirs, tmp_path, case):
    inputs, method, fragment = broken_inputs(adapter_dirs, tmp_path)[case]
    result = cli("merge", *inputs, "--method", method, "-o", str(tmp_path / "outs" / "merged"))
    assert_refused(result, 1, fragment, tmp_path / "outs")


def test_a_base_without_the_adapters_modules_or_shapes_is_refused(cli, adapter_dirs, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    shallow = tiny_llama()
    shallow.model.layers = shallow.model.layers[:2]
    shallow.config.num_hidden_layers = 2
    save_base(tmp_path / "shallow", shallow)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    save_base(tmp_path / "narrow", LlamaForCausalLM(config))
    outs = tmp_path / "outs"
    common = ["merge", *args(adapter_dirs, "a1"), "--method", "linear", "-o", str(outs / "m")]
    result = cli(*common, "--into-base", str(tmp_path / "shallow"))
    assert_refused(result, 1, "module 'model.layers.2.mlp.up_proj' of the adapters is not in the base", outs)
    result = cli(*common, "--into-base", str(tmp_path / "narrow"))
    assert_refused(result, 1, "'model.layers.0.mlp.up_proj.weight' is [48, 32]", outs)


def test_a_base_with_non_finite_weights_leaves_nothing_behind(cli, adapter_dirs, tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("inf")
    save_base(tmp_path / "base", model)
    outs = tmp_path / "outs"
    result = cli(
        "merge",
        *args(adapter_dirs, "a1"),
        "--method",
        "linear",
        "--into-base",
        str(tmp_path / "base"),
        "-o",
        str(outs / "m"),
    )
    assert_refused(result, 1, "'model.layers.1.self_attn.q_proj.weight' has non-finite values", outs)


def test_kohya_inputs_alone_are_refused_without_a_base(cli, adapter_dirs, tmp_path):
    """No input names a dotted module path to match the kohya names to: they would land in
    target_modules as names no model has."""
    kohya = [kohya_copy(adapter_dirs[name], tmp_path / f"{name}.safetensors") for name in ("a1", "a2")]
    outs = tmp_path / "outs"
    result = cli("merge", *kohya, "--method", "linear", "--format", "peft", "-o", str(outs / "m"))
    assert_refused(result, 1, "pass --into-base BASE", outs)


def test_a_merged_weight_that_overflows_the_base_dtype_is_refused(cli, adapter_dirs, tmp_path):
    base = save_base(tmp_path / "fp16", tiny_llama().to(torch.float16), shard_size="10GB")
    outs = tmp_path / "outs"
    common = ["merge", *args(adapter_dirs, "a1"), "--method", "linear", "--weights", "1e9"]
    result = cli(*common, "--into-base", str(base), "-o", str(outs / "m"))
    assert_refused(result, 1, "overflows float16", outs)


def test_a_base_index_whose_weight_map_is_not_names_to_files_is_refused(cli, adapter_dirs, tmp_path):
    outs = tmp_path / "outs"
    for name, weight_map in (("number", {f"{Q0}.weight": 5}), ("list", ["model.safetensors"])):
        base = save_base(tmp_path / name, shard_size="60KB")
        (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        result = cli(
            *["merge", *args(adapter_dirs, "a1"), "--method", "linear"],
            "--into-base",
            str(base),
            "-o",
            str(outs / "m"),
        )
        assert_refused(result, 1, f"{base / 'model.safetensors.index.json'}: not a safetensors index (", outs)
