"""Language-model adapters beyond plain peft: torchtune's PEFT export (a directory written by hand after its
recipes and checkpointer; torchtune 0.6.1 needs torchao 0.10, which peft 0.21 refuses to share a process
with, so torchtune itself is not run here) is read exactly and named;
a base saved without its class prefix (GPT-2 as GPT2Model) is matched through base_model_prefix by diagnose
--base and merge --into-base, as transformers loads it; the messages that point a user to what they meant."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import randomise_lora, tiny_llama
from lrtool.adapters import FORMATS, load_adapter
from lrtool.diagnose import diagnose
from lrtool.errors import InputError

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------
# torchtune


def torchtune_dir(directory, seed: int = 0):
    """The epoch folder torchtune's FullModelHFCheckpointer writes with adapter_only: adapter_model.pt (its
    own format, pickled: never opened here), adapter_model.safetensors (PEFT keys, HF names) and the
    adapter_config.json its recipes build (r, lora_alpha, target_modules, peft_type and nothing else;
    recipes/lora_finetune_single_device.py, torchtune/models/convert_weights.py)."""
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_features, in_features) in {"q_proj": (32, 32), "v_proj": (16, 32)}.items():
        prefix = f"base_model.model.model.layers.0.self_attn.{name}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, in_features, generator=generator)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, 4, generator=generator)
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    (directory / "adapter_model.pt").write_bytes(b"torchtune's own copy: lrtool never opens it")
    return directory


def test_a_torchtune_export_is_named_and_read_with_its_config_scale(tmp_path):
    adapter = load_adapter(torchtune_dir(tmp_path / "epoch_0"))
    assert (adapter.format, adapter.metadata["scale_source"]) == ("torchtune", "config")
    assert {module.scale for module in adapter.modules.values()} == {2.0}  # torchtune: alpha / rank
    (entry,) = diagnose([str(tmp_path / "epoch_0")])["adapters"]
    assert (entry["format"], entry["scale_source"], entry["findings"]) == ("torchtune", "config", [])


# ---------------------------------------------------------------------------------------------------------
# A base saved without its class prefix


def tiny_gpt2(bare: bool = False):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
    return (GPT2Model if bare else GPT2LMHeadModel)(config).eval()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(a GPT-2 saved as GPT2Model, keys h.0...; the same saved as GPT2LMHeadModel, keys transformer.h.0...;
    an adapter of GPT2LMHeadModel, names transformer.h.0...; an adapter of GPT2Model, names h.0...)"""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2(bare=True).save_pretrained(root / "bare")
    tiny_gpt2().save_pretrained(root / "full")
    for name, bare in (("lm-adapter", False), ("bare-adapter", True)):
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
        randomise_lora(get_peft_model(tiny_gpt2(bare), lora)).save_pretrained(root / name)
    return root


@pytest.mark.parametrize("base, adapter", [("bare", "lm-adapter"), ("full", "bare-adapter")])
def test_diagnose_base_resolves_names_through_base_model_prefix(gpt2, base, adapter):
    (entry,) = diagnose([str(gpt2 / adapter)], base=str(gpt2 / base))["adapters"]
    misfits = [f for f in entry["findings"] if f["code"] in ("missing-in-base", "base-shape-mismatch")]
    assert misfits == [] and len(entry["modules"]) == 6  # c_attn, attn.c_proj, mlp.c_proj per layer
    assert all(module["relative_norm"] is not None for module in entry["modules"])


def test_merge_into_a_base_saved_without_its_prefix_loads_as_peft_merges_it(cli, gpt2, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    out = tmp_path / "merged"
    code, _, err = cli(
        "merge",
        str(gpt2 / "lm-adapter"),
        "--method",
        "linear",
        "--into-base",
        str(gpt2 / "bare"),
        "-o",
        str(out),
    )
    assert code == 0, err
    assert set(load_file(out / "model.safetensors")) == set(load_file(gpt2 / "bare" / "model.safetensors"))
    ours = GPT2LMHeadModel.from_pretrained(out).eval()
    peft_merged = PeftModel.from_pretrained(tiny_gpt2(), gpt2 / "lm-adapter").merge_and_unload().eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_merged(ids).logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Messages


def test_a_folder_holding_a_named_peft_adapter_points_to_it(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="style")
    model.save_pretrained(tmp_path / "out")  # peft writes out/style/ for an adapter not named "default"
    with pytest.raises(InputError, match="style/ holds one .*: give .*out/style"):
        load_adapter(tmp_path / "out")
    assert load_adapter(tmp_path / "out" / "style").format == "peft"


def test_the_merge_commands_format_choices_are_the_writers(cli):
    from lrtool.cli import AdapterFormat

    assert tuple(choice.value for choice in AdapterFormat) == FORMATS


def test_format_is_refused_with_into_base(cli, tmp_path):
    adapter = torchtune_dir(tmp_path / "a")
    code, out, err = cli(
        "merge",
        str(adapter),
        "--method",
        "linear",
        "--format",
        "kohya",
        "--into-base",
        str(tmp_path),
        "-o",
        str(tmp_path / "m"),
    )
    assert (code, out) == (2, "") and "drop --format" in err


def test_the_readmes_format_table_is_the_one_the_man_page_shows():
    from conftest import REPO
    from lrtool.formats import markdown_table

    assert markdown_table() in (REPO / "README.md").read_text()


def test_a_classifiers_saved_score_weight_is_worded_alike_by_merge_and_diagnose(cli, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=64,
        num_labels=3,
    )
    classifier = LlamaForSequenceClassification(config)
    lora = LoraConfig(
        task_type="SEQ_CLS", r=2, target_modules=["q_proj"]
    )  # peft adds score to modules_to_save
    get_peft_model(classifier, lora).save_pretrained(tmp_path / "cls")
    code, _, err = cli("merge", str(tmp_path / "cls"), "--method", "linear", "-o", str(tmp_path / "m"))
    (entry,) = diagnose([str(tmp_path / "cls")])["adapters"]
    (finding,) = [f for f in entry["findings"] if f["module"] == "score"]
    assert code == 1 and finding["message"].startswith("modules_to_save (a full weight)")
    assert f"module 'score' {finding['message']}" in err
