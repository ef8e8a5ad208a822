"""mlx-lm adapters (adapters.safetensors + adapter_config.json): lrtool reads them as mlx-lm applies them,
scale * lora_b.T @ lora_a.T with lora_parameters.scale, whatever alpha says; and writes them so that mlx-lm's
load_adapters takes them. Fixtures written by hand follow mlx_lm/tuner/lora.py (LoRALinear) and
mlx_lm/lora.py (CONFIG_DEFAULTS, save_config); where mlx-lm 0.32 installs (mlx runs on the CPU), the tests
use it itself."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import make_adapter_dirs
from lrtool.adapters import load_adapter
from lrtool.diagnose import diagnose
from lrtool.errors import InputError, UnsupportedFeatureError

torch.set_num_threads(1)

# The tiny Llama of helpers.tiny_llama: {module suffix: (out, in)}
SHAPES = {"self_attn.q_proj": (32, 32), "self_attn.v_proj": (16, 32), "mlp.down_proj": (32, 64)}


def mlx_dir(directory, seed: int = 0, rank: int = 4, scale: float = 20.0, **config):
    """What mlx_lm.lora writes: adapters.safetensors (each LoRALinear's lora_a [in, r] and lora_b [r, out])
    and adapter_config.json (its arguments: fine_tune_type, num_layers, lora_parameters, model, ...)."""
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for suffix, (out_features, in_features) in SHAPES.items():
            name = f"model.layers.{layer}.{suffix}"
            tensors[f"{name}.lora_a"] = torch.randn(in_features, rank, generator=generator) * 0.1
            tensors[f"{name}.lora_b"] = torch.randn(rank, out_features, generator=generator) * 0.1
    save_file(tensors, directory / "adapters.safetensors", metadata={"format": "mlx"})
    fields = {
        "fine_tune_type": "lora",
        "num_layers": 16,
        "lora_parameters": {"rank": rank, "dropout": 0.0, "scale": scale},
        "model": "mlx-community/tiny",
        **config,
    }
    (directory / "adapter_config.json").write_text(json.dumps(fields))
    return directory


def mlx_delta(directory, name: str) -> torch.Tensor:
    """LoRALinear.fuse's update: (scale * lora_b.T) @ lora_a.T."""
    from safetensors.torch import load_file

    tensors = load_file(directory / "adapters.safetensors")
    scale = json.loads((directory / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    return scale * tensors[f"{name}.lora_b"].double().T @ tensors[f"{name}.lora_a"].double().T


def test_an_mlx_adapter_reads_as_mlx_lm_applies_it(tmp_path):
    directory = mlx_dir(tmp_path / "adapters", lora_parameters={"rank": 4, "scale": 20.0, "alpha": 8})
    adapter = load_adapter(directory)
    assert (adapter.format, adapter.base, adapter.metadata["scale_source"]) == (
        "mlx",
        "mlx-community/tiny",
        "config",
    )
    assert len(adapter.modules) == 6 and {m.scale for m in adapter.modules.values()} == {
        20.0
    }  # alpha ignored
    for name, module in adapter.modules.items():
        assert (module.A.shape[0], module.B.shape[1]) == (4, 4)
        torch.testing.assert_close(module.delta(), mlx_delta(directory, name))


def test_diagnose_reports_an_mlx_adapter_with_its_config_scale(tmp_path):
    (entry,) = diagnose([str(mlx_dir(tmp_path / "adapters"))])["adapters"]
    assert (entry["format"], entry["scale_source"], entry["findings"]) == ("mlx", "config", [])
    assert "lora_parameters.scale = 20" in entry["scale_detail"]
    q = next(m for m in entry["modules"] if m["name"] == "model.layers.0.self_attn.q_proj")
    assert (q["shape"], q["rank"], q["scale"]) == ([32, 32], 4, 20.0)


@pytest.mark.parametrize(
    "config, error, fragment",
    [
        ({"lora_parameters": {"rank": 4, "alpha": 16}}, InputError, "not an alpha"),
        ({"fine_tune_type": "dora"}, UnsupportedFeatureError, "DoRA"),
        ({"fine_tune_type": "full"}, UnsupportedFeatureError, "fine_tune_type 'full'"),
        ({"lora_parameters": {"rank": 8, "scale": 2.0}}, InputError, "lora_parameters.rank=8"),
    ],
)
def test_what_mlx_lm_itself_refuses_or_lrtool_cannot_represent_is_refused(tmp_path, config, error, fragment):
    directory = mlx_dir(tmp_path / "adapters", **config)
    with pytest.raises(error, match=fragment.replace("(", "\\(")):
        load_adapter(directory)


def test_two_mlx_adapters_merge_into_an_mlx_adapter(cli, tmp_path):
    first, second = mlx_dir(tmp_path / "a", seed=1), mlx_dir(tmp_path / "b", seed=2, rank=2, scale=5.0)
    out = tmp_path / "merged"
    code, _, err = cli("merge", str(first), str(second), "--method", "linear", "-o", str(out))
    assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 6
    merged = load_adapter(out)
    for name, module in merged.modules.items():
        expected = 0.5 * (mlx_delta(first, name) + mlx_delta(second, name))
        torch.testing.assert_close(module.delta(), mlx_delta(out, name))
        torch.testing.assert_close(module.delta(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# mlx-lm itself


def mlx_model():
    """mlx-lm's Llama at helpers.tiny_llama's shape (the same module paths as transformers')."""
    pytest.importorskip("mlx_lm")
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=3,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=64,
    )
    model = llama.Model(args)
    model.freeze()
    return model


def fused_deltas(model) -> dict[str, torch.Tensor]:
    """{module path: what LoRALinear.fuse adds to its weight} of every LoRA layer of an mlx model."""
    from mlx_lm.tuner.lora import LoRALinear

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            delta = (module.scale * module.lora_b.T) @ module.lora_a.T
            deltas[name] = torch.from_numpy(np.array(delta)).double()
    return deltas


def test_an_adapter_mlx_lm_trains_and_saves_reads_as_it_fuses(tmp_path):
    model = mlx_model()
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import save_config

    parameters = {"rank": 4, "dropout": 0.0, "scale": 12.5}
    linear_to_lora_layers(model, 2, parameters)
    mx.random.seed(0)
    trainable = tree_flatten(model.trainable_parameters())
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.1) for k, v in trainable]))
    directory = tmp_path / "adapters"
    directory.mkdir()
    # as mlx_lm/tuner/trainer.py and mlx_lm/lora.py save them
    mx.save_safetensors(
        str(directory / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    save_config(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": parameters},
        directory / "adapter_config.json",
    )

    adapter = load_adapter(directory)
    deltas = fused_deltas(model)
    assert set(adapter.modules) == set(deltas) and len(deltas) == 14  # 7 layers in each of the last 2 blocks
    for name, delta in deltas.items():
        torch.testing.assert_close(adapter.modules[name].delta(), delta, rtol=1e-5, atol=1e-6)


def test_a_peft_adapter_written_as_mlx_loads_in_mlx_lm_with_its_exact_update(cli, tmp_path):
    """Different ranks and scales per module: mlx-lm takes one of each (padded ranks, folded scales)."""
    model = mlx_model()
    from mlx_lm.tuner.utils import load_adapters

    peft_dir = make_adapter_dirs(tmp_path)["a1"]  # rank_pattern: v_proj has rank 2, the others 4
    out = tmp_path / "as-mlx"
    code, _, err = cli("merge", str(peft_dir), "--method", "linear", "--format", "mlx", "-o", str(out))
    assert code == 0, err
    deltas = fused_deltas(load_adapters(model, str(out)))
    original = load_adapter(peft_dir)
    assert set(deltas) == set(original.modules)
    for name, module in original.modules.items():
        torch.testing.assert_close(deltas[name], module.delta(), rtol=1e-5, atol=1e-6)
