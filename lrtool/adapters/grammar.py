"""The key grammar of LoRA files and the features beyond plain LoRA, one table each for every reader.

Reads and writes nothing: names and patterns. How PEFT, kohya and diffusers name the two factors (A / down is
[r, in], B / up is [out, r]) and alphas; which tensor keys and adapter_config.json fields carry more than
delta W = scale * B @ A; how peft resolves rank_pattern / alpha_pattern keys.
"""

from __future__ import annotations

import re

from lrtool.models import PICKLE_SUFFIXES  # noqa: F401 (re-exported: the adapter readers use it)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# kohya's sd-scripts prefix module names with the component they adapt (text encoders, unet, DiT).
KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_")
KOHYA_BASE_KEYS = ("ss_sd_model_name", "ss_base_model_version")

# The key grammar: how each naming family writes the two factors; `role` A / down is [r, in], B / up is
# [out, r].
PEFT_FACTOR_KEY = re.compile(r"(?P<module>.+?)\.lora_(?P<role>A|B)(?:\.(?P<adapter>[^.]+))?\.weight")
KOHYA_FACTOR_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<role>down|up)\.weight")
DIFFUSERS_FACTOR_KEY = re.compile(r"(?P<module>.+)\.(?:lora|lora_linear_layer)\.(?P<role>down|up)\.weight")
FACTOR_KEYS = (("peft", PEFT_FACTOR_KEY), ("kohya", KOHYA_FACTOR_KEY), ("diffusers", DIFFUSERS_FACTOR_KEY))
ALPHA_KEY = re.compile(r"(?P<module>.+)\.alpha")
FACTOR_ROLES = {"A": "A", "down": "A", "B": "B", "up": "B"}

# Tensors that carry more than plain LoRA, recognised by a fragment of their key: (fragment, feature).
TENSOR_FEATURES = (
    ("lora_magnitude_vector", "DoRA"),
    ("dora_scale", "DoRA"),
    ("lora_embedding_", "embedding LoRA"),
    ("modules_to_save", "modules_to_save"),
    ("token_adapter", "trainable tokens"),
    ("trainable_tokens", "trainable tokens"),
    ("hada_", "LoHa"),
    ("lokr_", "LoKr"),
    ("lora_mid", "conv LoRA (LoCon / Tucker mid factor)"),
    ("lora_diag", "KaSA"),
    ("lora_velora", "VeLoRA"),
)
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
# Inits that rewrite the base weights, so the adapter is not a delta on the original base.
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def parse_key(key: str) -> tuple[str, re.Match | None]:
    """(naming family, match) of a LoRA factor or alpha key; match None for any other tensor."""
    for family, pattern in FACTOR_KEYS:
        match = pattern.fullmatch(key)
        if match:
            return family, match
    return "alpha", ALPHA_KEY.fullmatch(key)


def tensor_feature(key: str) -> tuple[str, str]:
    """(module, what it is) for a tensor that is not a LoRA factor or alpha."""
    for fragment, feature in TENSOR_FEATURES:
        if fragment in key:
            return key[: key.index(fragment)].rstrip(".").removeprefix(PEFT_PREFIX), feature
    match = LORA_BIAS_KEY.fullmatch(key)
    if match:
        return match["module"].removeprefix(PEFT_PREFIX), "lora bias"
    module, _, last = key.rpartition(".")
    module = module.removeprefix(PEFT_PREFIX).removesuffix(".base_layer")
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
