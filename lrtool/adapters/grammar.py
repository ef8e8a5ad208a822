"""The key grammar of LoRA files and the features beyond plain LoRA, one table each for every reader.

Reads and writes nothing: names and patterns. How PEFT, kohya, diffusers (current and the older
attention-processor layout) and mlx-lm name the two factors and alphas; which tensor keys and config fields
carry more than delta W = scale * B @ A; how peft resolves rank_pattern / alpha_pattern keys.

The factors' layouts: A / down / lora_a is [r, in] and B / up / lora_b is [out, r], except mlx-lm's, which
stores them transposed (lora_a [in, r], lora_b [r, out]: its update is scale * lora_b.T @ lora_a.T, see
mlx_lm/tuner/lora.py, LoRALinear.fuse). A conv layer's factors are [r, in, *kernel] and [out, r, 1, ...]
(kohya's networks/lora.py, peft's lora.Conv2d, LyCORIS' LoCon): its update is the product over the flattened
kernel, B [out, r] @ A [r, in * prod(kernel)], reshaped to the weight's [out, in, *kernel].
"""

from __future__ import annotations

import re
from typing import NamedTuple

# re-exported: the adapter readers and writers use them
from lrtool.formats import WRITTEN
from lrtool.model_files import DIFFUSERS_COMPONENTS, PICKLE_SUFFIXES  # noqa: F401

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
MLX_WEIGHTS = "adapters.safetensors"  # beside an adapter_config.json with lora_parameters (mlx_lm/lora.py)
KOHYA_WEIGHTS = "lora.safetensors"  # what lrtool names a kohya file it writes into a directory
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
# diffusers' save_lora_weights: a JSON of each component's LoraConfig fields, keys "<component>.<field>"
# (loaders/lora_base.py, LORA_ADAPTER_METADATA_KEY); a model's save_lora_adapter writes the fields unprefixed.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# kohya's sd-scripts prefix module names with the component they adapt (text encoders, unet, DiT), each the
# mangled form of a diffusers component (lora_te_ on one text encoder, lora_te1_ / lora_te2_ on SDXL's two).
KOHYA_COMPONENTS = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lora_te_": "text_encoder",
    "lora_transformer_": "transformer",
}
KOHYA_BASE_KEYS = ("ss_sd_model_name", "ss_base_model_version")
FORMATS = WRITTEN  # what lrtool writes

# The key grammar: how each naming family writes the two factors; `role` A / down / a is the first factor
# (applied to the input), B / up / b the second.
PEFT_FACTOR_KEY = re.compile(r"(?P<module>.+?)\.lora_(?P<role>A|B)(?:\.(?P<adapter>[^.]+))?\.weight")
KOHYA_FACTOR_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<role>down|up)\.weight")
DIFFUSERS_FACTOR_KEY = re.compile(r"(?P<module>.+)\.(?:lora|lora_linear_layer)\.(?P<role>down|up)\.weight")
# diffusers' attention processors before peft (diffusers <= 0.20, still loaded: utils/state_dict_utils.py,
# UNET_TO_DIFFUSERS and DIFFUSERS_OLD_TO_DIFFUSERS): `<attention>.processor.to_q_lora.down.weight`.
DIFFUSERS_OLD_FACTOR_KEY = re.compile(
    r"(?P<module>.+?)(?:\.processor)?\.(?P<projection>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight"
)
MLX_FACTOR_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<role>a|b)")
FACTOR_KEYS = (
    ("peft", PEFT_FACTOR_KEY),
    ("kohya", KOHYA_FACTOR_KEY),
    ("diffusers-old", DIFFUSERS_OLD_FACTOR_KEY),
    ("diffusers", DIFFUSERS_FACTOR_KEY),
    ("mlx", MLX_FACTOR_KEY),
)
ALPHA_KEY = re.compile(r"(?P<module>.+)\.alpha")
FACTOR_ROLES = {"A": "A", "down": "A", "a": "A", "B": "B", "up": "B", "b": "B"}
# The old processors' projections, as the module paths diffusers loads them into: a UNet's attention
# (to_out is the first of to_out's layers) or a text encoder's (CLIP's q_proj ... out_proj).
OLD_PROJECTIONS = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}

# Tensors that carry more than plain LoRA, recognised by a fragment of their key: (fragment, feature).
TENSOR_FEATURES = (
    ("lora_magnitude_vector", "DoRA"),
    ("dora_scale", "DoRA"),
    ("lora_embedding_", "embedding LoRA"),
    ("modules_to_save", "modules_to_save"),
    ("token_adapter", "trainable tokens"),
    ("trainable_tokens", "trainable tokens"),
    ("hada_", "LoHa (LyCORIS)"),
    ("lokr_", "LoKr (LyCORIS)"),
    ("oft_blocks", "OFT / BOFT (LyCORIS)"),
    ("oft_diag", "OFT (LyCORIS)"),
    ("lora_mid", "conv LoRA with a Tucker mid factor (LyCORIS LoCon use_tucker, lora_mid)"),
    ("lora_diag", "KaSA"),
    ("lora_velora", "VeLoRA"),
)
# Methods other than LoRA whose tensors make a whole file (LyCORIS' and peft's LoHa, LoKr, OFT).
NAMED_METHODS = ("LoHa (LyCORIS)", "LoKr (LyCORIS)", "OFT / BOFT (LyCORIS)", "OFT (LyCORIS)")
LORA_BIAS_KEY = re.compile(
    r"(?P<module>.+?)\.(?:lora_B|lora_up|lora\.up|lora_linear_layer\.up)(?:\.[^.]+)?\.bias"
)
# adapter_config.json fields that, when set, make the adapter more than delta W = scale * B @ A.
CONFIG_FEATURES = (
    ("use_dora", "DoRA"),
    ("lora_bias", "lora bias"),
    ("modules_to_save", "modules_to_save"),
    ("trainable_token_indices", "trainable tokens"),
    ("layer_replication", "layer replication"),
    ("target_parameters", "LoRA on parameters (target_parameters)"),
    ("use_qalora", "QA-LoRA (use_qalora)"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
    ("velora_config", "VeLoRA (velora_config)"),
    ("monteclora_config", "MonteCLoRA (monteclora_config)"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("arrow_config", "Arrow routing (arrow_config)"),
    ("kasa_config", "KaSA (kasa_config)"),
    ("megatron_config", "Megatron parallel layers (megatron_config)"),
)
# The only fields of the adapter_config.json torchtune's recipes write (peft writes all of LoraConfig's).
TORCHTUNE_CONFIG_KEYS = {
    "r",
    "lora_alpha",
    "target_modules",
    "peft_type",
    "base_model_name_or_path",
    "use_dora",
}
# Inits that rewrite the base weights, so the adapter is not a delta on the original base.
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


class KeyParts(NamedTuple):
    """What a LoRA factor or alpha key says: its naming family, module (as the key names it, PEFT's prefix
    kept), role ("A", "B" or "alpha") and, in PEFT keys that carry one, the adapter's name."""

    family: str
    module: str
    role: str
    adapter: str | None = None


def parse_key(key: str) -> KeyParts | None:
    """The parts of a LoRA factor or alpha key; None for any other tensor."""
    for family, pattern in FACTOR_KEYS:
        match = pattern.fullmatch(key)
        if match:
            module = match["module"]
            if family == "diffusers-old":
                module = f"{module}.{old_projection(module, match['projection'])}"
            adapter = match["adapter"] if family == "peft" else None
            return KeyParts(family, module, FACTOR_ROLES[match["role"]], adapter)
    match = ALPHA_KEY.fullmatch(key)
    return KeyParts("alpha", match["module"], "alpha") if match else None


def old_projection(attention: str, projection: str) -> str:
    """The module an old diffusers processor's `to_q` / ... / `to_out` LoRA adapts, as diffusers maps it:
    a text encoder's (a path under text_encoder*) CLIP projection, else a UNet attention's."""
    component = "text_encoder" if attention.split(".")[0].startswith("text_encoder") else "unet"
    return OLD_PROJECTIONS[component][projection]


def tensor_feature(key: str, saved_layers=()) -> tuple[str, str]:
    """(module, what it is) for a tensor that is not a LoRA factor or alpha; `saved_layers` is the config's
    modules_to_save (peft saves such a layer's full weight under the layer's own name)."""
    for fragment, feature in TENSOR_FEATURES:
        if fragment in key:
            return key[: key.index(fragment)].rstrip(".").removeprefix(PEFT_PREFIX), feature
    match = LORA_BIAS_KEY.fullmatch(key)
    if match:
        return match["module"].removeprefix(PEFT_PREFIX), "lora bias"
    module, _, last = key.rpartition(".")
    module = module.removeprefix(PEFT_PREFIX).removesuffix(".base_layer")
    if last == "weight" and module.endswith((".lora_a", ".lora_b")):
        return (
            module.rpartition(".")[0],
            "torchtune's own naming (lora_a / lora_b .weight), whose alpha is in its recipe; read the PEFT "
            "export its HF checkpointer writes (adapter_config.json + adapter_model.safetensors)",
        )
    if last in ("weight", "bias") and any(module == s or module.endswith("." + s) for s in saved_layers):
        return module, "modules_to_save (a full weight)"
    if last == "weight":
        return module, "a full weight (a modules_to_save copy or a saved embedding layer), not a LoRA factor"
    if last == "bias":
        return module, "a trained bias"
    if last in ("diff", "diff_b"):
        return module, "a full weight difference"
    return module, f"a tensor lrtool does not recognise ({last}), not a LoRA factor"


def pattern_key(patterns, module: str) -> str:
    """The rank_pattern / alpha_pattern key that applies to `module`, resolved as peft does.

    Mirrors peft.utils.other.get_pattern_key: the first key k, in the file's order, such that
    re.match(rf"(.*\\.)?({k})$", module) matches; the module path itself when none does.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module
