"""diffusers LoRA files, checked against diffusers 0.42 itself: lrtool reads a file written by
save_lora_weights (with its lora_adapter_metadata) and the older attention-processor layout exactly as
diffusers applies them, conv LoRA included; a merge of diffusers files is a diffusers file load_lora_weights
loads; a kohya file lrtool writes loads through diffusers' kohya converter; diagnose --base and merge
--into-base take a pipeline directory or one component's."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lrtool.adapters import load_adapter
from lrtool.diagnose import diagnose

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

torch.set_num_threads(1)

# SD1.x's layout at toy size: proj_in / proj_out are 1x1 convs, the resnets' conv1 / conv2 3x3 convs.
UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=8,
    attention_head_dim=4,
)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TO_Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET).eval()


def lora_unet(seed: int, **lora) -> UNet2DConditionModel:
    """A tiny UNet with a peft LoRA of random factors (diffusers' training scripts add it this way)."""
    unet = tiny_unet()
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **lora}
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(**config))
    return unet


def save_as_training_scripts_do(unet, directory):
    """What train_dreambooth_lora.py saves: the LoRA state and its LoraConfig as lora_adapter_metadata."""
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    return directory


def diffusers_deltas(unet) -> dict[str, torch.Tensor]:
    """{module path as the file names it: the update diffusers (its peft layers) applies}."""
    return {
        f"unet.{name}": layer.get_delta_weight(next(iter(layer.scaling))).detach().double()
        for name, layer in unet.named_modules()
        if isinstance(layer, LoraLayer)
    }


def loaded_by_diffusers(directory) -> UNet2DConditionModel:
    """A fresh UNet with the LoRA at `directory` loaded by a pipeline's load_lora_weights."""
    pipeline = StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=tiny_unet(),
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.load_lora_weights(directory)
    return pipeline.unet


def assert_reads_as(adapter, deltas: dict[str, torch.Tensor]):
    assert set(adapter.modules) == set(deltas)
    for name, delta in deltas.items():
        module = adapter.modules[name]
        ours = module.delta().reshape(module.weight_shape)
        torch.testing.assert_close(ours, delta, rtol=1e-5, atol=1e-6 * float(delta.abs().max()))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(the UNet with its LoRA, the directory diffusers saved it to): alpha 8, r 4 (2 for to_v)."""
    unet = lora_unet(seed=1, rank_pattern={"to_v": 2})
    return unet, save_as_training_scripts_do(unet, tmp_path_factory.mktemp("diffusers") / "lora")


def test_a_file_with_lora_adapter_metadata_reads_as_diffusers_applies_it(written):
    unet, directory = written
    adapter = load_adapter(directory)
    assert adapter.format == "diffusers" and adapter.metadata["scale_source"] == "metadata"
    assert adapter.modules[TO_Q].scale == 2.0  # lora_alpha / r = 8 / 4, not 1
    assert adapter.modules[TO_Q.replace("to_q", "to_v")].scale == 4.0  # rank_pattern: r = 2
    conv = adapter.modules["unet.down_blocks.0.resnets.0.conv1"]
    assert (conv.kernel, conv.weight_shape) == ((3, 3), (32, 32, 3, 3))
    assert adapter.modules["unet.down_blocks.1.attentions.0.proj_in"].kernel == (1, 1)
    assert_reads_as(adapter, diffusers_deltas(unet))


def test_diagnose_names_the_format_and_where_the_scale_came_from(written):
    (entry,) = diagnose([str(written[1])])["adapters"]
    assert (entry["format"], entry["scale_source"], entry["alpha"]) == ("diffusers", "metadata", 8)
    assert "lora_adapter_metadata" in entry["scale_detail"]
    assert not [f for f in entry["findings"] if f["severity"] == "error"], entry["findings"]
    conv = next(m for m in entry["modules"] if m["name"] == "unet.down_blocks.0.resnets.0.conv1")
    assert (conv["shape"], conv["rank"], conv["scale"]) == ([32, 32, 3, 3], 4, 2.0)


def test_the_older_attention_processor_layout_reads_as_diffusers_loads_it(tmp_path):
    """diffusers <= 0.20 saved `<attention>.processor.to_q_lora.down.weight`; today's diffusers still loads
    it (utils/state_dict_utils.py, UNET_TO_DIFFUSERS), to_out into to_out.0, at scale 1."""
    generator = torch.Generator().manual_seed(0)
    attention = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    widths = {"to_q": (64, 64), "to_k": (64, 64), "to_v": (64, 64), "to_out": (64, 64)}
    tensors = {}
    for projection, (out_features, in_features) in widths.items():
        key = f"{attention}.processor.{projection}_lora"
        tensors[f"{key}.down.weight"] = torch.randn(4, in_features, generator=generator)
        tensors[f"{key}.up.weight"] = torch.randn(out_features, 4, generator=generator)
    save_file(tensors, tmp_path / "pytorch_lora_weights.safetensors")

    adapter = load_adapter(tmp_path)
    assert adapter.format == "diffusers-old" and adapter.metadata["scale_source"] == "default"
    assert f"{attention}.to_out.0" in adapter.modules
    assert_reads_as(adapter, diffusers_deltas(loaded_by_diffusers(tmp_path)))
    (entry,) = diagnose([str(tmp_path)])["adapters"]
    assert entry["format"] == "diffusers-old" and entry["findings"] == []


@pytest.mark.parametrize(
    "key, module",
    [
        (
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight",
            "attn2.to_out.0",
        ),
        ("text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight", "self_attn.q_proj"),
    ],
)
def test_old_processor_keys_name_the_modules_diffusers_loads_them_into(key, module):
    """UNet attentions' to_out is to_out.0; a text encoder's projections are CLIP's q_proj ... out_proj
    (utils/state_dict_utils.py: UNET_TO_DIFFUSERS, DIFFUSERS_OLD_TO_PEFT)."""
    from lrtool.adapters.grammar import parse_key

    parts = parse_key(key)
    assert (parts.family, parts.module.endswith(module)) == ("diffusers-old", True)


def test_a_merge_of_diffusers_files_is_a_diffusers_file_load_lora_weights_loads(cli, written, tmp_path):
    other = save_as_training_scripts_do(lora_unet(seed=2, lora_alpha=4), tmp_path / "other")
    out = tmp_path / "merged"
    code, _, err = cli("merge", str(written[1]), str(other), "--method", "linear", "-o", str(out))
    assert code == 0, err
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "adapter_config.json").exists()
    ours, theirs = load_adapter(written[1]), load_adapter(other)
    expected = {
        name: 0.5 * (module.delta() + theirs.modules[name].delta()).reshape(module.weight_shape)
        for name, module in ours.modules.items()
    }
    assert_reads_as(load_adapter(out), expected)
    loaded = loaded_by_diffusers(out)  # every module injected, with the merge's exact update
    assert_reads_as(load_adapter(out), diffusers_deltas(loaded))
    assert set(diffusers_deltas(loaded)) == set(expected)


def test_a_kohya_file_lrtool_writes_loads_through_diffusers_kohya_converter(cli, tmp_path):
    # One rank: diffusers' kohya converter drops the alpha_pattern of attention modules whose alpha differs
    # from the most common (it keys them `...processor.to_k_lora.down.weight`, no module's name).
    source = save_as_training_scripts_do(lora_unet(seed=3), tmp_path / "lora")
    out = tmp_path / "kohya"
    code, _, err = cli("merge", str(source), "--method", "linear", "--format", "kohya", "-o", str(out))
    assert code == 0, err
    kohya = load_adapter(out)
    assert kohya.format == "kohya" and "lora_unet_down_blocks_0_resnets_0_conv1" in kohya.modules
    assert kohya.modules["lora_unet_down_blocks_0_resnets_0_conv1"].kernel == (3, 3)
    # diffusers converts lora_unet_ keys and their alphas (loaders/lora_conversion_utils.py)
    deltas = diffusers_deltas(loaded_by_diffusers(out))
    original = load_adapter(source)
    assert set(deltas) == set(original.modules)
    for name, module in original.modules.items():
        expected = module.delta().reshape(module.weight_shape)
        torch.testing.assert_close(deltas[name], expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A diffusers pipeline directory: model_index.json, unet/ (weights) and scheduler/ (none)."""
    directory = tmp_path_factory.mktemp("pipeline") / "sd"
    tiny_unet().save_pretrained(directory / "unet")
    DDIMScheduler().save_pretrained(directory / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (directory / "model_index.json").write_text(json.dumps(index))
    return directory


@pytest.mark.parametrize("component", [None, "unet"])
def test_diagnose_base_finds_every_module_in_a_pipeline_or_its_component(written, pipeline, component):
    base = pipeline / component if component else pipeline
    (entry,) = diagnose([str(written[1])], base=str(base))["adapters"]
    misses = [f for f in entry["findings"] if f["code"] in ("missing-in-base", "base-shape-mismatch")]
    assert misses == [] and all(m["relative_norm"] is not None for m in entry["modules"])


def test_merge_into_a_pipeline_adds_the_update_diffusers_would(cli, written, pipeline, tmp_path):
    out = tmp_path / "merged-pipeline"
    code, _, err = cli(
        "merge", str(written[1]), "--method", "linear", "--into-base", str(pipeline), "-o", str(out)
    )
    assert code == 0, err
    assert (out / "model_index.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    merged = UNet2DConditionModel.from_pretrained(out / "unet")
    weights, base = dict(merged.named_parameters()), dict(tiny_unet().named_parameters())
    for name, delta in diffusers_deltas(written[0]).items():
        key = name.removeprefix("unet.") + ".weight"
        change = (weights[key].detach() - base[key].detach()).double()
        torch.testing.assert_close(change, delta, rtol=1e-4, atol=1e-5 * float(delta.abs().max()))
