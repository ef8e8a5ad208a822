"""kohya LoRA files (sd-scripts is not on the package registry: the fixtures are written by hand after its
networks/lora.py, LoRAModule and create_network_from_weights) and LyCORIS' (lycoris-lora 4.1.3, the writer
itself where it installs): every module reads as kohya applies it, linear and conv, alpha per module; two
kohya files merge by their names into a kohya file; LoHa and LoKr are refused by name."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import tiny_llama
from lrtool.adapters import load_adapter
from lrtool.diagnose import diagnose
from lrtool.errors import UnsupportedFeatureError

torch.set_num_threads(1)

# A default sd-scripts LoRA of an SD1.x model at toy widths: the text encoder's and the UNet's attention
# projections are linear; the UNet transformers' proj_in / proj_out are 1x1 convs; with conv_dim set,
# the resnets' 3x3 convs too. {kohya name: (out, in, kernel or None)}
MODULES = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, 32, None),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (64, 32, None),
    "lora_unet_down_blocks_1_attentions_0_proj_in": (64, 64, (1, 1)),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (64, 32, None),
    "lora_unet_down_blocks_1_attentions_0_proj_out": (64, 64, (1, 1)),
    "lora_unet_down_blocks_0_resnets_0_conv1": (32, 32, (3, 3)),
}


def sd_scripts_file(path, seed: int, alphas: dict | None = None, dim: int = 4, dtype=torch.float16):
    """What sd-scripts' train_network.py saves: per module lora_down [r, in(, k, k)], lora_up [out, r(, 1,
    1)] and the alpha buffer, every tensor cast to the save dtype; ss_* metadata."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_features, in_features, kernel) in MODULES.items():
        kernel_shape = kernel or ()
        down = torch.randn(dim, in_features, *kernel_shape, generator=generator) * 0.1
        up = torch.randn(out_features, dim, *(1 for _ in kernel_shape), generator=generator) * 0.1
        alpha = (alphas or {}).get(name, 2.0)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha).to(dtype)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": "2.0"}
    save_file(tensors, path, metadata=metadata)
    return path


def kohya_delta(path, name: str) -> torch.Tensor:
    """The update sd-scripts adds to module `name` (networks/lora.py, LoRAModule.get_weight): scale =
    alpha / lora_dim with an alpha of 0 or none read as lora_dim (LoRAModule.__init__,
    create_network_from_weights)."""
    with safe_open(str(path), framework="pt") as f:
        down = f.get_tensor(f"{name}.lora_down.weight").double()
        up = f.get_tensor(f"{name}.lora_up.weight").double()
        alpha = float(f.get_tensor(f"{name}.alpha")) if f"{name}.alpha" in f.keys() else 0.0
    dim = down.shape[0]
    scale = (alpha or dim) / dim
    if down.dim() == 2:  # linear
        return (up @ down) * scale
    if down.shape[2:4] == (1, 1):  # conv2d 1x1
        return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
    return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale  # 3x3


def assert_reads_as_kohya(path, adapter=None):
    adapter = adapter or load_adapter(path)
    assert set(adapter.modules) == set(MODULES)
    for name, module in adapter.modules.items():
        expected = kohya_delta(path, name)
        ours = module.delta().reshape(module.weight_shape)
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-9)


def test_a_default_sd_scripts_file_reads_as_kohya_applies_it_conv_included(tmp_path):
    path = sd_scripts_file(tmp_path / "lora.safetensors", seed=0)
    adapter = load_adapter(path)
    assert adapter.format == "kohya" and adapter.metadata["scale_source"] == "alpha"
    assert adapter.modules["lora_unet_down_blocks_1_attentions_0_proj_in"].kernel == (1, 1)
    assert adapter.modules["lora_unet_down_blocks_0_resnets_0_conv1"].weight_shape == (32, 32, 3, 3)
    assert_reads_as_kohya(path, adapter)


def test_per_module_alphas_and_kohyas_alpha_zero_are_applied_as_kohya_does(tmp_path):
    alphas = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": 8.0,
        "lora_te_text_model_encoder_layers_0_mlp_fc1": 0.0,  # kohya: alpha 0 is lora_dim, scale 1
        "lora_unet_down_blocks_1_attentions_0_proj_in": None,  # no alpha: kohya uses lora_dim, scale 1
    }
    path = sd_scripts_file(tmp_path / "lora.safetensors", seed=1, alphas=alphas)
    adapter = load_adapter(path)
    scales = {name: module.scale for name, module in adapter.modules.items()}
    assert scales["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == 2.0
    assert scales["lora_te_text_model_encoder_layers_0_mlp_fc1"] == 1.0
    assert scales["lora_unet_down_blocks_1_attentions_0_proj_in"] == 1.0
    assert adapter.metadata["scale_source"] == "alpha+default"
    assert_reads_as_kohya(path, adapter)


def test_diagnose_reads_a_kohya_conv_file_with_no_finding_and_says_where_its_scale_came_from(tmp_path):
    path = sd_scripts_file(tmp_path / "lora.safetensors", seed=0)
    (entry,) = diagnose([str(path)])["adapters"]
    assert entry["findings"] == [] and entry["refused"] is None
    assert (entry["format"], entry["scale_source"], entry["alpha"]) == ("kohya", "alpha", 2.0)
    assert "alpha tensor" in entry["scale_detail"]
    conv = next(m for m in entry["modules"] if m["name"].endswith("resnets_0_conv1"))
    assert (conv["shape"], conv["rank"], conv["scale"]) == ([32, 32, 3, 3], 4, 0.5)


def test_two_kohya_files_merge_by_their_names_into_a_kohya_file(cli, tmp_path):
    first = sd_scripts_file(tmp_path / "a.safetensors", seed=2)
    second = sd_scripts_file(tmp_path / "b.safetensors", seed=3, alphas=dict.fromkeys(MODULES, 4.0))
    out = tmp_path / "merged"
    code, _, err = cli("merge", str(first), str(second), "--method", "linear", "-o", str(out))
    assert code == 0, err
    with safe_open(str(out / "lora.safetensors"), framework="pt") as f:
        shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
        metadata = f.metadata()
    for name, (out_features, in_features, kernel) in MODULES.items():
        rank = shapes[f"{name}.lora_down.weight"][0]  # the linear merge concatenates the ranks: 4 + 4
        extra = list(kernel or ())
        assert shapes[f"{name}.lora_down.weight"] == [rank, in_features, *extra]
        assert shapes[f"{name}.lora_up.weight"] == [out_features, rank, *(1 for _ in extra)]
        assert shapes[f"{name}.alpha"] == []  # kept per module: alpha / r is the stored scale (1 here)
    assert metadata["ss_network_module"] == "networks.lora"
    merged = load_adapter(out)
    assert merged.format == "kohya" and set(merged.modules) == set(MODULES)
    for name, module in merged.modules.items():
        expected = 0.5 * (kohya_delta(first, name) + kohya_delta(second, name))
        ours = module.delta().reshape(module.weight_shape)
        torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
        assert torch.equal(ours, kohya_delta(out / "lora.safetensors", name))  # kohya applies it the same


# LoHa's and LoKr's keys, as LyCORIS' modules/loha.py and modules/lokr.py save them.
OTHER_METHODS = {
    "LoHa": {"hada_w1_a": [16, 4], "hada_w1_b": [4, 16], "hada_w2_a": [16, 4], "hada_w2_b": [4, 16]},
    "LoKr": {"lokr_w1": [4, 4], "lokr_w2": [4, 4]},
}


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_loha_and_lokr_files_are_refused_as_unsupported_features_naming_the_method(tmp_path, method):
    tensors = {"lycoris_fc.alpha": torch.tensor(2.0)}
    tensors.update({f"lycoris_fc.{key}": torch.ones(shape) for key, shape in OTHER_METHODS[method].items()})
    save_file(tensors, tmp_path / "lycoris.safetensors")
    with pytest.raises(UnsupportedFeatureError, match=f"a {method} \\(LyCORIS\\) adapter"):
        load_adapter(tmp_path / "lycoris.safetensors")
    (entry,) = diagnose([str(tmp_path / "lycoris.safetensors")])["adapters"]
    codes = {f["code"] for f in entry["findings"]}
    assert codes == {"unsupported-feature"} and method in entry["refused"]
    assert any(f["severity"] == "error" and method in f["message"] for f in entry["findings"])


class Net(torch.nn.Module):
    """A 3x3 conv, a 1x1 conv and a linear layer: what LyCORIS adapts in a diffusion model."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.proj = torch.nn.Conv2d(16, 16, 1)
        self.fc = torch.nn.Linear(16, 12)


def lycoris_network(algo: str, tmp_path):
    """A LyCORIS network of `algo` on Net, random factors, saved by its own save_weights."""
    lycoris = pytest.importorskip("lycoris")
    torch.manual_seed(0)
    network = lycoris.create_lycoris(
        Net(), 1.0, linear_dim=4, linear_alpha=2, algo=algo, conv_dim=4, conv_alpha=3
    )
    network.apply_to()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, parameter in network.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    path = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    return network, path


def test_a_lycoris_locon_file_reads_as_lycoris_applies_it(tmp_path):
    network, path = lycoris_network("locon", tmp_path)
    adapter = load_adapter(path)
    assert adapter.format == "kohya"
    assert {name: module.kernel for name, module in adapter.modules.items()} == {
        "lycoris_conv": (3, 3),
        "lycoris_proj": (1, 1),
        "lycoris_fc": None,
    }
    for lora in network.loras:
        expected = lora.get_diff_weight()[0].detach().double()
        module = adapter.modules[lora.lora_name]
        assert module.scale == pytest.approx(lora.scale)
        ours = module.delta().reshape(module.weight_shape)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("algo, method", [("loha", "LoHa"), ("lokr", "LoKr")])
def test_lycoris_loha_and_lokr_files_are_refused_by_name(tmp_path, algo, method):
    _, path = lycoris_network(algo, tmp_path)
    with pytest.raises(UnsupportedFeatureError, match=method):
        load_adapter(path)


def test_a_conv_module_and_a_linear_one_of_one_name_do_not_merge(cli, tmp_path):
    """SD1.x's proj_in is a 1x1 conv, SD2.x's a linear layer: adapters of different bases."""
    name = "lora_unet_down_blocks_1_attentions_0_proj_in"
    conv = {
        f"{name}.lora_down.weight": torch.ones(2, 8, 1, 1),
        f"{name}.lora_up.weight": torch.ones(8, 2, 1, 1),
    }
    linear = {f"{name}.lora_down.weight": torch.ones(2, 8), f"{name}.lora_up.weight": torch.ones(8, 2)}
    save_file(conv, tmp_path / "sd1.safetensors")
    save_file(linear, tmp_path / "sd2.safetensors")
    paths = [str(tmp_path / "sd1.safetensors"), str(tmp_path / "sd2.safetensors")]
    code, out, err = cli("merge", *paths, "--method", "linear", "-o", str(tmp_path / "m"))
    assert code == 1 and out == "" and "[8, 8, 1, 1] (out, in, *kernel)" in err


@pytest.mark.parametrize("method", ["LoHa", "LoKr"])
def test_peft_loha_and_lokr_adapters_are_refused_by_name_too(tmp_path, method):
    import peft

    config = getattr(peft, f"{method}Config")(r=2, target_modules=["q_proj"])
    peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(
        UnsupportedFeatureError, match=f"a {method} \\(LyCORIS\\) adapter \\(peft_type {method.upper()}\\)"
    ):
        load_adapter(tmp_path / "adapter")


def test_eval_refuses_a_conv_module_clearly(tmp_path):
    from lrtool.adapters import Adapter, LoraModule
    from lrtool.engine import AdapterEngine
    from lrtool.errors import IncompatibleError

    conv = LoraModule(A=torch.ones(2, 32), B=torch.ones(32, 2), scale=1.0, kernel=(1, 1))
    adapter = Adapter(modules={"model.layers.0.self_attn.q_proj": conv}, source="sd.safetensors")
    with pytest.raises(IncompatibleError, match="is a conv layer's LoRA \\(kernel 1x1\\); eval applies LoRA"):
        AdapterEngine(tiny_llama(), [adapter])
