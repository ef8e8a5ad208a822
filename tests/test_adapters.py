"""The canonical adapter: lrtool reads PEFT, kohya and diffusers LoRA files exactly as peft applies them,
writes PEFT directories that peft loads unchanged, and refuses what it cannot represent."""

import json
import math
import pathlib
import pickle

import pytest
import torch
from safetensors.torch import save_file

from helpers import kohya_tensors, peft_layers, randomise_lora, tiny_llama
from lrtool.adapters import (
    Adapter,
    LoraModule,
    load_adapter,
    match_module_names,
    pattern_key,
    save_adapter,
)
from lrtool.errors import IncompatibleError, InputError, UnsupportedFeatureError

torch.set_num_threads(1)

LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Q0 = "model.layers.0.self_attn.q_proj"


def peft_deltas(model) -> dict[str, torch.Tensor]:
    return {name: layer.get_delta_weight("default") for name, layer in peft_layers(model).items()}


def assert_same_delta(ours: torch.Tensor, theirs: torch.Tensor):
    """Equal up to float32 rounding: ours is computed in float64, peft's in float32."""
    theirs = theirs.to(torch.float64)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * theirs.abs().max().item())


def random_ids(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """(PeftModel, its directory): an adapter made by peft with rsLoRA, rank_pattern and alpha_pattern."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        rank_pattern={"q_proj": 8},
        alpha_pattern={"v_proj": 3},
        target_modules=LINEAR_LAYERS,
        task_type="CAUSAL_LM",
    )
    model = randomise_lora(get_peft_model(tiny_llama(), config)).eval()
    directory = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def loaded(peft_adapter) -> Adapter:
    return load_adapter(peft_adapter[1])


def small_module(
    rank: int = 2, in_features: int = 5, out_features: int = 4, scale: float = 1.0, seed: int = 0
):
    generator = torch.Generator().manual_seed(seed)
    return LoraModule(
        A=torch.randn(rank, in_features, generator=generator),
        B=torch.randn(out_features, rank, generator=generator),
        scale=scale,
    )


def write_peft_dir(
    directory: pathlib.Path, config: dict | None = None, extra: dict | None = None, rank: int = 2
):
    """A hand-made PEFT directory with one module (q_proj of layer 0); config fields and tensors added."""
    directory.mkdir(parents=True, exist_ok=True)
    module = small_module(rank=rank)
    fields = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **(config or {})}
    (directory / "adapter_config.json").write_text(json.dumps(fields))
    tensors = {
        f"base_model.model.{Q0}.lora_A.weight": module.A,
        f"base_model.model.{Q0}.lora_B.weight": module.B,
        **(extra or {}),
    }
    save_file(tensors, directory / "adapter_model.safetensors")
    return directory


def assert_refused(error_class, path, fragment: str, call=load_adapter):
    """`call(path)` raises exactly `error_class`, in one line that names `path` and contains `fragment`."""
    with pytest.raises(error_class) as caught:
        call(path)
    message = str(caught.value)
    assert type(caught.value) is error_class
    assert str(path) in message
    assert fragment in message
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------
# PEFT


def test_peft_adapter_reads_as_peft_applies_it(peft_adapter, loaded):
    model, _ = peft_adapter
    deltas = peft_deltas(model)
    assert set(loaded.modules) == set(deltas)
    assert len(deltas) == 21
    for name, delta in deltas.items():
        assert_same_delta(loaded.modules[name].delta(), delta)


def test_rslora_rank_pattern_and_alpha_pattern_give_peft_scale_per_module(peft_adapter, loaded):
    layers = peft_layers(peft_adapter[0])
    for name, module in loaded.modules.items():
        assert module.scale == layers[name].scaling["default"]
        assert module.rank == layers[name].r["default"]
    assert loaded.modules[Q0].scale == 6 / math.sqrt(8)
    assert loaded.modules["model.layers.0.self_attn.v_proj"].scale == 3 / math.sqrt(4)
    assert loaded.modules["model.layers.0.mlp.up_proj"].scale == 6 / math.sqrt(4)


def test_peft_adapter_keeps_what_the_writer_needs(loaded, peft_adapter):
    assert loaded.format == "peft"
    assert loaded.source == str(peft_adapter[1])
    assert loaded.metadata["task_type"] == "CAUSAL_LM"
    assert loaded.metadata["fan_in_fan_out"] is False
    assert loaded.rank == 8
    assert loaded.dtypes == {torch.float32}
    assert loaded.num_parameters == sum(m.A.numel() + m.B.numel() for m in loaded.modules.values())
    assert list(loaded.modules) == sorted(loaded.modules)


def test_a_bare_peft_safetensors_file_reads_with_its_config(peft_adapter, loaded):
    bare = load_adapter(peft_adapter[1] / "adapter_model.safetensors")
    assert bare.format == "peft"
    assert {n: m.scale for n, m in bare.modules.items()} == {n: m.scale for n, m in loaded.modules.items()}


@pytest.mark.parametrize(
    "patterns, module",
    [
        ({"q_proj": 1}, Q0),
        ({"self_attn.q_proj": 1, "q_proj": 2}, Q0),
        ({"proj": 1}, Q0),  # a bare suffix must follow a dot: no match
        ({r"^model\.layers\.0\.self_attn\.q_proj": 1}, Q0),
        ({r"^model\.layers\.0\.self_attn\.q_proj": 1}, "x.model.layers.0.self_attn.q_proj"),
        ({r"model\.layers\.1\.self_attn\.q_proj": 1}, "model.layers.11.self_attn.q_proj"),
        ({"layers.1.self_attn.q_proj": 1}, "model.layers.1.self_attn.q_proj"),
        ({"model.layers.[01].mlp.(up|down)_proj": 1, "up_proj": 2}, "model.layers.1.mlp.up_proj"),
        ({"v_proj|q_proj": 1}, Q0),
        ({}, Q0),
    ],
)
def test_pattern_keys_resolve_as_in_peft(patterns, module):
    from peft.utils.other import get_pattern_key

    assert pattern_key(patterns.keys(), module) == get_pattern_key(patterns.keys(), module)


def test_rank_disagreeing_with_config_is_an_input_error(tmp_path):
    directory = write_peft_dir(tmp_path / "adapter", config={"r": 4}, rank=2)
    message = assert_refused(InputError, directory, "rank 2")
    assert "r=4" in message


# ---------------------------------------------------------------------------------------------------------
# Writing PEFT


def test_saved_adapter_loads_in_peft_unchanged(peft_adapter, loaded, tmp_path):
    from peft import PeftModel

    original, _ = peft_adapter
    save_adapter(loaded, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "out").eval()
    theirs, ours = peft_layers(original), peft_layers(reloaded)
    assert set(ours) == set(theirs)
    for name, layer in ours.items():
        assert layer.scaling["default"] == theirs[name].scaling["default"]
        torch.testing.assert_close(
            layer.get_delta_weight("default"), theirs[name].get_delta_weight("default")
        )
    with torch.no_grad():
        ids = random_ids()
        torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)


def test_saved_adapter_reads_back_the_same(loaded, tmp_path):
    save_adapter(loaded, tmp_path / "out")
    again = load_adapter(tmp_path / "out")
    assert list(again.modules) == list(loaded.modules)
    for name, module in loaded.modules.items():
        assert torch.equal(again.modules[name].A, module.A)
        assert torch.equal(again.modules[name].B, module.B)
        assert again.modules[name].scale == module.scale
    assert (again.base, again.metadata["task_type"]) == (loaded.base, "CAUSAL_LM")


def test_saving_twice_gives_identical_bytes(loaded, tmp_path):
    save_adapter(loaded, tmp_path / "one")
    save_adapter(loaded, tmp_path / "two")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert (tmp_path / "one" / "adapter_config.json").read_text().endswith("}\n")


def test_save_can_cast_dtype(loaded, tmp_path):
    save_adapter(loaded, tmp_path / "half", dtype=torch.bfloat16)
    assert load_adapter(tmp_path / "half").dtypes == {torch.bfloat16}


def test_factors_sharing_storage_save(tmp_path):
    u, _, vh = torch.linalg.svd(torch.randn(6, 5))
    module = LoraModule(A=vh[:2], B=u[:, :2], scale=0.5)  # views into the SVD's outputs
    save_adapter(Adapter(modules={"model.layers.0.mlp.up_proj": module}), tmp_path / "out")
    assert torch.equal(load_adapter(tmp_path / "out").modules["model.layers.0.mlp.up_proj"].B, u[:, :2])


def test_mixed_ranks_and_scales_save_as_patterns_peft_applies_exactly(tmp_path):
    from peft import PeftModel
    from peft.utils.other import get_pattern_key

    def q_proj(rank, scale, seed):
        return small_module(rank=rank, in_features=32, out_features=32, scale=scale, seed=seed)

    def v_proj(rank, scale, seed):
        return small_module(rank=rank, in_features=32, out_features=16, scale=scale, seed=seed)

    wanted = {
        Q0: q_proj(rank=8, scale=16 / math.sqrt(8), seed=1),  # an rsLoRA scale
        "model.layers.0.self_attn.v_proj": v_proj(rank=4, scale=0.3, seed=2),
        "model.layers.1.self_attn.q_proj": q_proj(rank=4, scale=2.0, seed=3),
        "model.layers.1.self_attn.v_proj": v_proj(rank=4, scale=2.0, seed=4),
        "model.layers.2.self_attn.q_proj": q_proj(rank=2, scale=1 / 3, seed=5),
    }
    save_adapter(Adapter(modules=wanted, base="tiny-llama"), tmp_path / "out")

    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, False)
    assert config["target_modules"] == sorted(wanted)
    base = tiny_llama()
    base_names = [name for name, _ in base.named_modules()]
    assert len(config["rank_pattern"]) == 2 and len(config["alpha_pattern"]) == 3
    for patterns in (config["rank_pattern"], config["alpha_pattern"]):
        for key in patterns:  # each pattern reaches exactly one module of the base
            assert sum(get_pattern_key([key], name) == key for name in base_names) == 1

    layers = peft_layers(PeftModel.from_pretrained(base, tmp_path / "out"))
    assert set(layers) == set(wanted)
    for name, module in wanted.items():
        assert layers[name].scaling["default"] == module.scale
        assert_same_delta(module.delta(), layers[name].get_delta_weight("default"))


def test_fan_in_fan_out_is_kept_and_written_back(tmp_path):
    """GPT-2 stores Conv1D weights [in, out]: the canonical delta stays [out, in]; the flag travels."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    def tiny_gpt2():
        torch.manual_seed(0)
        config = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16)
        return GPT2LMHeadModel(config).eval()

    lora = LoraConfig(
        r=2, lora_alpha=5, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    original = randomise_lora(get_peft_model(tiny_gpt2(), lora))
    original.save_pretrained(tmp_path / "gpt2")
    adapter = load_adapter(tmp_path / "gpt2")
    assert adapter.metadata["fan_in_fan_out"] is True
    ((name, module),) = adapter.modules.items()
    assert module.delta().shape == (96, 32)
    assert_same_delta(module.delta(), peft_deltas(original)[name].T)

    save_adapter(adapter, tmp_path / "out")
    reloaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(random_ids()).logits, original.eval()(random_ids()).logits)


# ---------------------------------------------------------------------------------------------------------
# kohya and diffusers


def test_kohya_file_applies_as_its_peft_twin(loaded, tmp_path):
    save_file(kohya_tensors(loaded), tmp_path / "lora.safetensors", metadata={"ss_sd_model_name": "tiny"})
    kohya = load_adapter(tmp_path / "lora.safetensors")
    assert (kohya.format, kohya.base, kohya.metadata["alpha_source"]) == ("kohya", "tiny", "alpha tensor")
    assert set(kohya.modules) == set(loaded.modules)
    for name, module in loaded.modules.items():
        assert_same_delta(kohya.modules[name].delta(), module.delta())


def test_kohya_without_alpha_applies_scale_one(loaded, tmp_path):
    save_file(kohya_tensors(loaded, alpha=False), tmp_path / "lora.safetensors")
    kohya = load_adapter(tmp_path / "lora.safetensors")
    assert {module.scale for module in kohya.modules.values()} == {1.0}
    assert kohya.metadata["alpha_source"] == "none: scale 1 assumed"


@pytest.mark.parametrize("prefix", ["", "lora_te_"])
def test_mangled_kohya_names_match_the_base_module_paths(loaded, tmp_path, prefix):
    save_file(
        kohya_tensors(loaded, lambda name: prefix + name.replace(".", "_")), tmp_path / "lora.safetensors"
    )
    kohya = load_adapter(tmp_path / "lora.safetensors")
    assert f"{prefix}model_layers_0_self_attn_q_proj" in kohya.modules  # kept as stored until matched
    matched = match_module_names(kohya, [name for name, _ in tiny_llama().named_modules()])
    assert set(matched.modules) == set(loaded.modules)
    for name, module in loaded.modules.items():
        assert_same_delta(matched.modules[name].delta(), module.delta())


def test_names_matching_nothing_stay_as_they_are():
    adapter = Adapter(modules={"lora_unet_mid_block_to_q": small_module()}, format="kohya")
    assert list(match_module_names(adapter, ["model", "model.layers.0"]).modules) == [
        "lora_unet_mid_block_to_q"
    ]


def test_two_adapter_modules_for_one_base_module_are_incompatible():
    adapter = Adapter(
        modules={
            "lora_te1_model_layers_0_mlp_up_proj": small_module(),
            "lora_te2_model_layers_0_mlp_up_proj": small_module(),
        },
        source="sdxl.safetensors",
    )
    with pytest.raises(IncompatibleError, match="both match 'model.layers.0.mlp.up_proj'"):
        match_module_names(adapter, ["model.layers.0.mlp.up_proj"])


@pytest.mark.parametrize(
    "down, up",
    [
        ("lora.down.weight", "lora.up.weight"),
        ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"),
        ("lora_A.weight", "lora_B.weight"),
    ],
)
@pytest.mark.parametrize(
    "alpha, scale, source", [(3.0, 1.5, "alpha tensor"), (None, 1.0, "none: scale 1 assumed")]
)
def test_diffusers_naming_loads_with_the_alpha_scale(tmp_path, down, up, alpha, scale, source):
    module = small_module(rank=2)
    tensors = {f"unet.mid_block.attn.to_q.{down}": module.A, f"unet.mid_block.attn.to_q.{up}": module.B}
    if alpha is not None:
        tensors["unet.mid_block.attn.to_q.alpha"] = torch.tensor(alpha)
    save_file(tensors, tmp_path / "pytorch_lora_weights.safetensors")
    adapter = load_adapter(tmp_path)  # a directory holding one .safetensors file
    assert (adapter.format, adapter.metadata["alpha_source"]) == ("diffusers", source)
    ((name, loaded_module),) = adapter.modules.items()
    assert (name, loaded_module.scale) == ("unet.mid_block.attn.to_q", scale)
    assert torch.equal(loaded_module.A, module.A) and torch.equal(loaded_module.B, module.B)


def test_peft_keys_without_their_config_are_an_input_error(peft_adapter, tmp_path):
    lone = tmp_path / "adapter_model.safetensors"
    lone.write_bytes((peft_adapter[1] / "adapter_model.safetensors").read_bytes())
    assert_refused(InputError, lone, "put it beside the file")


# ---------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    "config, feature",
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "lora_only"}, "lora bias"),
        ({"bias": "all"}, "lora bias"),
        ({"lora_bias": True}, "lora bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"trainable_token_indices": [1, 2]}, "trainable tokens"),
        ({"layer_replication": [[0, 2], [1, 3]]}, "layer replication"),
        ({"init_lora_weights": "pissa_niter_4"}, "rewrites the base weights"),
        ({"peft_type": "IA3"}, "peft_type IA3"),
    ],
)
def test_peft_features_beyond_plain_lora_are_refused(tmp_path, config, feature):
    directory = write_peft_dir(tmp_path / "adapter", config=config)
    assert_refused(UnsupportedFeatureError, directory, feature)


@pytest.mark.parametrize(
    "key, shape, feature",
    [
        (f"base_model.model.{Q0}.lora_magnitude_vector", [4], "DoRA"),
        ("base_model.model.model.embed_tokens.lora_embedding_A", [2, 64], "embedding LoRA"),
        (f"base_model.model.{Q0}.lora_B.bias", [4], "lora bias"),
        ("base_model.model.lm_head.modules_to_save.default.weight", [64, 32], "modules_to_save"),
        (
            "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
            [2, 32],
            "trainable tokens",
        ),
        (f"base_model.model.{Q0}.something_else", [4], "not a LoRA factor"),
    ],
)
def test_peft_tensors_beyond_plain_lora_are_refused_by_name(tmp_path, key, shape, feature):
    directory = write_peft_dir(tmp_path / "adapter", extra={key: torch.zeros(shape)})
    message = assert_refused(UnsupportedFeatureError, directory, feature)
    assert key in message


@pytest.mark.parametrize(
    "key, feature",
    [("dora_scale", "DoRA"), ("hada_w1_a", "LoHa"), ("lokr_w1", "LoKr"), ("lora_mid.weight", "lora_mid")],
)
def test_kohya_features_beyond_plain_lora_are_refused(tmp_path, key, feature):
    module = small_module()
    name = "lora_unet_mid_block_attentions_0_to_q"
    tensors = {f"{name}.lora_down.weight": module.A, f"{name}.lora_up.weight": module.B}
    save_file({**tensors, f"{name}.{key}": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    assert_refused(UnsupportedFeatureError, tmp_path / "lora.safetensors", feature)


def kohya_conv_delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """The update kohya's sd-scripts adds to a Conv2d weight (networks/lora.py, LoRAModule.get_weight)."""
    down, up, scale = down.double(), up.double(), alpha / down.shape[0]
    if down.shape[2:4] == (1, 1):  # "conv2d 1x1"
        return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
    return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale  # "3x3"


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3)])
def test_kohya_conv_lora_reads_as_kohya_applies_it(tmp_path, kernel):
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 8, *kernel, generator=generator), torch.randn(16, 4, 1, 1, generator=generator)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {
        f"{name}.lora_down.weight": down,
        f"{name}.lora_up.weight": up,
        f"{name}.alpha": torch.tensor(2.0),
    }
    save_file(tensors, tmp_path / "lora.safetensors")
    module = load_adapter(tmp_path / "lora.safetensors").modules[name]
    assert (module.kernel, module.A.shape, module.B.shape) == (kernel, (4, 8 * math.prod(kernel)), (16, 4))
    assert module.weight_shape == (16, 8, *kernel) and module.scale == 0.5
    torch.testing.assert_close(module.delta().reshape(module.weight_shape), kohya_conv_delta(down, up, 2.0))


class RunsCodeWhenUnpickled:
    """Unpickling this creates `marker`: proof that a file was unpickled."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize(
    "layout", ["adapter_config.json + adapter_model.bin", "adapter_model.bin only", "lora.pt", "lora.ckpt"]
)
def test_pickled_weights_are_refused_without_unpickling(tmp_path, layout):
    sanity = tmp_path / "sanity-marker"
    pickle.loads(pickle.dumps(RunsCodeWhenUnpickled(sanity)))
    assert sanity.exists(), "the payload must run code when unpickled, or this test proves nothing"

    marker = tmp_path / "marker"
    payload = pickle.dumps({"weights": RunsCodeWhenUnpickled(marker)})
    directory = tmp_path / "adapter"
    directory.mkdir()
    if layout.startswith("adapter_config.json"):
        (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    if "adapter_model.bin" in layout:
        (directory / "adapter_model.bin").write_bytes(payload)
        path = directory
    else:
        path = directory / layout
        path.write_bytes(payload)
    with pytest.raises(UnsupportedFeatureError, match="never unpickled; convert to safetensors"):
        load_adapter(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# Broken inputs


def test_truncated_safetensors_is_an_input_error(peft_adapter, tmp_path):
    data = (peft_adapter[1] / "adapter_model.safetensors").read_bytes()
    truncated = tmp_path / "lora.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    assert_refused(InputError, truncated, "not a readable safetensors file")


def test_text_renamed_safetensors_is_an_input_error(tmp_path):
    fake = tmp_path / "lora.safetensors"
    fake.write_text("this is not a tensor file\n")
    assert_refused(InputError, fake, "not a readable safetensors file")


def test_invalid_config_json_is_an_input_error(tmp_path):
    directory = write_peft_dir(tmp_path / "adapter")
    (directory / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2,')
    assert_refused(InputError, directory, "invalid JSON")


@pytest.mark.parametrize(
    "tensors, problem",
    [
        ({"m.lora_down.weight": torch.zeros(2, 5)}, "no B factor"),
        (
            {"m.lora_down.weight": torch.zeros(2, 5), "m.lora_up.weight": torch.zeros(4, 3)},
            "expected A [r, in]",
        ),
        ({"m.lora_down.weight": torch.zeros(2, 5, 1), "m.lora_up.weight": torch.zeros(4, 2)}, "2-D"),
        ({"m.alpha": torch.tensor(1.0)}, "no LoRA tensors"),
        ({}, "no LoRA tensors"),
    ],
)
def test_malformed_lora_files_are_input_errors(tmp_path, tensors, problem):
    save_file(tensors, tmp_path / "lora.safetensors")
    assert_refused(InputError, tmp_path / "lora.safetensors", problem)


def test_missing_paths_and_empty_directories_are_input_errors(tmp_path):
    assert_refused(InputError, tmp_path / "nowhere", "no such file or directory")
    (tmp_path / "empty").mkdir()
    assert_refused(InputError, tmp_path / "empty", "no adapter here")
    (tmp_path / "notes.txt").write_text("hello")
    assert_refused(InputError, tmp_path / "notes.txt", "not a LoRA adapter")
