"""The canonical LoRA adapter: read PEFT, kohya and diffusers LoRA files, write PEFT directories.

Everything that touches LoRA weights goes through `Adapter` (DESIGN.md, "The canonical adapter"): per
module path the factors A [r, in] and B [out, r] and the scale the update is applied with, so that
delta W = scale * B @ A. `load_adapter` reads

- a PEFT directory (adapter_config.json + adapter_model.safetensors), or that .safetensors file;
- a kohya-style .safetensors (`<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`);
- a diffusers-style .safetensors (`lora.down` / `lora.up`, `lora_linear_layer.down` / `.up`, or
  `lora_A` / `lora_B` without PEFT's `base_model.model.` prefix, optional `.alpha`);

and refuses, in one line naming the file, what it cannot represent exactly (DoRA, lora bias, modules_to_save,
embedding or conv LoRA, pickled weights, ...): nothing is dropped silently. `save_adapter` writes a PEFT
directory that `peft.PeftModel.from_pretrained` loads unchanged. Weights are only read with safetensors.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lrtool.errors import IncompatibleError, InputError, UnsupportedFeatureError, one_line

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# kohya's sd-scripts prefix module names with the component they adapt (text encoders, unet, DiT).
KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_")


@dataclass(eq=False)
class LoraModule:
    """One adapted linear layer. Its update is delta W = scale * B @ A, shaped [out_features, in_features]."""

    A: torch.Tensor  # [r, in_features]
    B: torch.Tensor  # [out_features, r]
    scale: float  # the factor the update is applied with: alpha / r, or alpha / sqrt(r) with rsLoRA

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """scale * B @ A in `dtype`, in nn.Linear's [out, in] layout (also for fan_in_fan_out bases)."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass(eq=False)
class Adapter:
    """A LoRA adapter: module path (as the base's named_modules() gives it) -> LoraModule, sorted by path."""

    modules: dict[str, LoraModule] = field(repr=False)
    base: str | None = None  # base model name or path, when the file declares one
    format: str = "peft"  # what it was read from: "peft" | "kohya" | "diffusers"
    source: str = ""  # the path it was loaded from
    metadata: dict = field(default_factory=dict)  # fan_in_fan_out, task_type, alpha_source, ...

    def __post_init__(self) -> None:
        self.modules = dict(sorted(self.modules.items()))

    @property
    def dtypes(self) -> set[torch.dtype]:
        return {t.dtype for m in self.modules.values() for t in (m.A, m.B)}

    @property
    def rank(self) -> int:
        """The largest rank of any module."""
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def num_parameters(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())


# ---------------------------------------------------------------------------------------------------------
# Reading


def load_adapter(path: str | Path) -> Adapter:
    """Read a PEFT directory or a LoRA .safetensors file (PEFT, kohya or diffusers naming) into an Adapter."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    source = str(path)
    if path.is_dir():
        return _load_directory(path, source)
    if path.suffix in PICKLE_SUFFIXES:
        raise _pickled(path)
    if path.name == PEFT_CONFIG:
        return _load_directory(path.parent, source)
    if path.suffix != ".safetensors":
        raise InputError(f"{path}: not a LoRA adapter: expected a PEFT directory or a .safetensors file")
    if (path.parent / PEFT_CONFIG).is_file():
        return _load_peft(path.parent / PEFT_CONFIG, path, source)
    return _load_loose_file(path, source)


def _load_directory(directory: Path, source: str) -> Adapter:
    files = sorted(p for p in directory.iterdir() if p.is_file())
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if (directory / PEFT_CONFIG).is_file():
        if (directory / PEFT_WEIGHTS).is_file():
            return _load_peft(directory / PEFT_CONFIG, directory / PEFT_WEIGHTS, source)
        if pickled:
            raise _pickled(pickled[0])
        raise InputError(f"{directory}: has {PEFT_CONFIG} but no {PEFT_WEIGHTS}")
    candidates = [p for p in files if p.suffix == ".safetensors"]
    if len(candidates) == 1:
        return _load_loose_file(candidates[0], source)
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise InputError(f"{directory}: holds several .safetensors files ({names}); name the one to read")
    if pickled:
        raise _pickled(pickled[0])
    raise InputError(
        f"{directory}: no adapter here: expected {PEFT_CONFIG} + {PEFT_WEIGHTS}, or a LoRA .safetensors file"
    )


def _pickled(path: Path) -> UnsupportedFeatureError:
    # Unpickling runs arbitrary code (DESIGN.md: never unpickle), so these are refused unread.
    return UnsupportedFeatureError(
        f"{path}: pickled weights (which can run code when loaded) are never unpickled; "
        "convert to safetensors"
    )


def _index(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """The shape of every tensor in a safetensors file, and its metadata, without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_slice(key).get_shape() for key in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise InputError(f"{path}: not a readable safetensors file ({one_line(error)})") from error


def _read(path: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in keys}
    except (SafetensorError, OSError) as error:
        raise InputError(f"{path}: not a readable safetensors file ({one_line(error)})") from error


# The key grammar, public because diagnose reads files this module refuses. How each naming family writes
# the two factors; `role` A / down is [r, in], B / up is [out, r].
PEFT_FACTOR_KEY = re.compile(r"(?P<module>.+?)\.lora_(?P<role>A|B)(?:\.(?P<adapter>[^.]+))?\.weight")
KOHYA_FACTOR_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<role>down|up)\.weight")
DIFFUSERS_FACTOR_KEY = re.compile(r"(?P<module>.+)\.(?:lora|lora_linear_layer)\.(?P<role>down|up)\.weight")
FACTOR_KEYS = (("peft", PEFT_FACTOR_KEY), ("kohya", KOHYA_FACTOR_KEY), ("diffusers", DIFFUSERS_FACTOR_KEY))
ALPHA_KEY = re.compile(r"(?P<module>.+)\.alpha")
FACTOR_ROLES = {"A": "A", "down": "A", "B": "B", "up": "B"}

# Tensors that carry more than plain LoRA, recognised by a fragment of their key: (fragment, feature, what
# the tensor is), so a refusal or a finding can say what they are. Checked in order; anything else that is
# not a LoRA factor is refused as unrecognised.
TENSOR_FEATURES = (
    ("lora_magnitude_vector", "DoRA", "a DoRA magnitude"),
    ("dora_scale", "DoRA", "a DoRA magnitude"),
    ("lora_embedding_", "embedding LoRA", "embedding LoRA"),
    ("modules_to_save", "modules_to_save", "a modules_to_save copy (a fully trained module)"),
    ("token_adapter", "trainable tokens", "trainable tokens"),
    ("trainable_tokens", "trainable tokens", "trainable tokens"),
    ("hada_", "LoHa", "LoHa"),
    ("lokr_", "LoKr", "LoKr"),
    ("lora_mid", "conv LoRA", "a conv LoRA mid factor (LoCon / Tucker)"),
    ("lora_diag", "KaSA", "KaSA"),
    ("lora_velora", "VeLoRA", "VeLoRA state"),
)
LORA_BIAS_KEY = re.compile(
    r"(?P<module>.+?)\.(?:lora_B|lora_up|lora\.up|lora_linear_layer\.up)(?:\.[^.]+)?\.bias"
)


def _tensor_feature(key: str) -> str:
    for fragment, _, what in TENSOR_FEATURES:
        if fragment in key:
            return what
    if LORA_BIAS_KEY.fullmatch(key):
        return "lora bias"
    if key.endswith(".bias"):
        return "a trained bias"
    if key.endswith((".diff", ".diff_b")):
        return "a full weight difference"
    return "not a LoRA factor lrtool recognises"


def _refuse_tensor(path: Path, key: str) -> UnsupportedFeatureError:
    return UnsupportedFeatureError(
        f"{path}: tensor '{key}' is {_tensor_feature(key)}, which lrtool cannot represent "
        "(plain LoRA only: delta W = scale * B @ A)"
    )


def _parse_key(key: str, grammar: list[tuple[str, re.Pattern]]) -> tuple[str | None, re.Match | None]:
    for family, pattern in grammar:
        match = pattern.fullmatch(key)
        if match:
            return family, match
    return None, None


def _group_tensors(
    path: Path, shapes: dict[str, list[int]], grammar: list[tuple[str, re.Pattern]]
) -> tuple[dict[str, dict[str, str]], set[str]]:
    """Group tensor keys by module: {module: {"A": key, "B": key, "alpha": key}}, and the families seen.

    `grammar` lists (family, pattern); a key no pattern matches is refused with what it is.
    """
    groups: dict[str, dict[str, str]] = {}
    families: set[str] = set()
    adapter_names: set[str] = set()
    parsed = {key: _parse_key(key, grammar) for key in shapes}
    if not any(match and match.groupdict().get("role") for _, match in parsed.values()):
        raise InputError(f"{path}: holds no LoRA tensors (lora_A / lora_B, lora_down / lora_up, ...)")
    for key, (family, match) in parsed.items():
        if match is None:
            raise _refuse_tensor(path, key)
        fields = match.groupdict()
        role = FACTOR_ROLES.get(fields.get("role"), "alpha")
        if role != "alpha" and len(shapes[key]) == 4:
            raise UnsupportedFeatureError(
                f"{path}: tensor '{key}' has shape {shapes[key]}: conv LoRA cannot be represented "
                "(linear layers only)"
            )
        if role != "alpha" and len(shapes[key]) != 2:
            raise InputError(f"{path}: tensor '{key}' has shape {shapes[key]}; LoRA factors are 2-D")
        if fields.get("adapter"):
            adapter_names.add(fields["adapter"])
        module = fields["module"].removeprefix(PEFT_PREFIX)
        slots = groups.setdefault(module, {})
        if role in slots:
            raise InputError(f"{path}: '{slots[role]}' and '{key}' both hold {role} of module '{module}'")
        slots[role] = key
        families.add(family)
    if len(adapter_names) > 1:
        names = ", ".join(sorted(adapter_names))
        raise InputError(f"{path}: holds several adapters ({names}); lrtool reads one adapter per file")
    for module, slots in groups.items():
        for role, other in (("A", "B"), ("B", "A")):
            if role in slots and other not in slots:
                raise InputError(f"{path}: module '{module}' has '{slots[role]}' but no {other} factor")
        if "A" not in slots:
            raise InputError(f"{path}: '{slots['alpha']}' is an alpha for a module without LoRA factors")
        a_shape, b_shape = shapes[slots["A"]], shapes[slots["B"]]
        if a_shape[0] == 0:
            raise InputError(f"{path}: module '{module}' has rank 0")
        if 0 in a_shape or 0 in b_shape:
            raise InputError(
                f"{path}: module '{module}' is malformed: A is {a_shape} and B is {b_shape}, a factor with "
                "no entries (a zero dimension)"
            )
        if b_shape[1] != a_shape[0]:
            raise InputError(
                f"{path}: module '{module}': A is {a_shape} (r={a_shape[0]}) but B is {b_shape} "
                f"(r={b_shape[1]}); expected A [r, in] and B [out, r]"
            )
        if "alpha" in slots and math.prod(shapes[slots["alpha"]]) != 1:
            alpha_shape = shapes[slots["alpha"]]
            raise InputError(f"{path}: '{slots['alpha']}' has shape {alpha_shape}; an alpha is a scalar")
    return groups, families


def pattern_key(patterns: Iterable[str], module: str) -> str:
    """The rank_pattern / alpha_pattern key that applies to `module`, resolved as peft does.

    Mirrors peft.utils.other.get_pattern_key: the first key k, in the file's order, such that
    re.match(rf"(.*\\.)?({k})$", module) matches; the module path itself when none does.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def _number(value, what: str, where: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: {what} must be a number, got {value!r}")
    return value


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: invalid JSON ({one_line(error)})") from error
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read ({one_line(error)})") from error
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object")
    return config


# adapter_config.json fields that, when set, mean the adapter is more than delta W = scale * B @ A.
_REFUSED_CONFIG_FIELDS = (
    ("use_dora", "DoRA"),
    ("lora_bias", "lora bias (lora_bias)"),
    ("modules_to_save", "modules_to_save (fully trained module copies)"),
    ("trainable_token_indices", "trainable tokens (trainable_token_indices), not supported yet"),
    ("layer_replication", "layer replication (layer_replication)"),
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
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")  # inits that change the base weights


def _check_peft_config(config: dict, path: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise InputError(f"{path}: no peft_type; not a PEFT adapter config")
    if peft_type != "LORA":
        raise UnsupportedFeatureError(f"{path}: peft_type {peft_type} is not supported (LORA adapters only)")
    bias = config.get("bias", "none")
    if bias != "none":
        raise UnsupportedFeatureError(
            f"{path}: uses lora bias (bias={bias!r}: trained bias terms), which lrtool cannot represent"
        )
    for name, feature in _REFUSED_CONFIG_FIELDS:
        if config.get(name):
            raise UnsupportedFeatureError(f"{path}: uses {feature}, which lrtool cannot represent")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise UnsupportedFeatureError(
            f"{path}: init_lora_weights={init!r} rewrites the base weights, so this adapter is no delta on "
            "the original base; save it with peft's path_initial_model_for_weight_conversion first"
        )


def _load_peft(config_path: Path, weights_path: Path, source: str) -> Adapter:
    config = _read_config(config_path)
    _check_peft_config(config, config_path)
    r = _number(config.get("r", 8), "r", config_path)
    lora_alpha = _number(config.get("lora_alpha", 8), "lora_alpha", config_path)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pattern, dict):
            raise InputError(f"{config_path}: {name} must be an object, got {pattern!r}")
        for key, value in pattern.items():
            _number(value, f"{name}[{key!r}]", config_path)
            try:
                re.compile(key)
            except re.error as error:
                raise InputError(f"{config_path}: {name} key {key!r} is not a regex ({error})") from error
    use_rslora = bool(config.get("use_rslora", False))

    shapes, _ = _index(weights_path)
    groups, _ = _group_tensors(weights_path, shapes, [("peft", PEFT_FACTOR_KEY)])
    tensors = _read(weights_path, [slots[role] for slots in groups.values() for role in ("A", "B")])
    modules = {}
    for module, slots in groups.items():
        A, B = tensors[slots["A"]], tensors[slots["B"]]
        rank = A.shape[0]
        expected = rank_pattern.get(pattern_key(rank_pattern, module), r)
        if rank != expected:
            raise InputError(
                f"{weights_path}: module '{module}' has rank {rank} but {config_path.name} says r={expected}"
            )
        alpha = alpha_pattern.get(pattern_key(alpha_pattern, module), lora_alpha)
        # rsLoRA scales by alpha / sqrt(r), not alpha / r; resolved here so no one downstream has to know.
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        modules[module] = LoraModule(A=A, B=B, scale=scale)
    return Adapter(
        modules=modules,
        base=config.get("base_model_name_or_path") or None,
        format="peft",
        source=source,
        metadata={
            "alpha_source": PEFT_CONFIG,
            "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
            "task_type": config.get("task_type"),
        },
    )


_LOOSE_GRAMMAR = [
    ("kohya", KOHYA_FACTOR_KEY),
    ("diffusers", DIFFUSERS_FACTOR_KEY),
    ("diffusers", PEFT_FACTOR_KEY),
    ("alpha", ALPHA_KEY),
]


def _load_loose_file(path: Path, source: str) -> Adapter:
    """A kohya or diffusers .safetensors file: no config, the scale comes from `.alpha` tensors."""
    shapes, file_metadata = _index(path)
    if any(key.startswith(PEFT_PREFIX) for key in shapes):
        raise InputError(
            f"{path}: has PEFT keys ({PEFT_PREFIX}...) but no {PEFT_CONFIG} beside it: the scale "
            f"lora_alpha/r is unknown without {PEFT_CONFIG}; put it beside the file"
        )
    groups, families = _group_tensors(path, shapes, _LOOSE_GRAMMAR)
    tensors = _read(path, [key for slots in groups.values() for key in slots.values()])
    modules = {}
    for module, slots in groups.items():
        A, B = tensors[slots["A"]], tensors[slots["B"]]
        # kohya and diffusers both apply alpha / r, with alpha = r (scale 1) when no alpha is stored.
        alpha = float(tensors[slots["alpha"]].item()) if "alpha" in slots else A.shape[0]
        modules[module] = LoraModule(A=A, B=B, scale=alpha / A.shape[0])
    with_alpha = sum("alpha" in slots for slots in groups.values())
    if with_alpha == len(groups):
        alpha_source = "alpha tensor"
    elif with_alpha == 0:
        alpha_source = "none: scale 1 assumed"
    else:
        alpha_source = "alpha tensor where present, else scale 1 assumed"
    base_keys = ("ss_sd_model_name", "ss_base_model_version")
    metadata = {"alpha_source": alpha_source, "fan_in_fan_out": False}
    metadata.update({key: file_metadata[key] for key in base_keys if file_metadata.get(key)})
    return Adapter(
        modules=modules,
        base=next((file_metadata[key] for key in base_keys if file_metadata.get(key)), None),
        format="kohya" if "kohya" in families else "diffusers",
        source=source,
        metadata=metadata,
    )


def check_computable(adapter: Adapter) -> None:
    """Refuse an adapter whose update cannot be computed with: integer (quantised) factors, NaN or infinity
    in a factor or a scale. merge and eval use its factors only after this; diagnose reports its message as
    what merge would refuse."""
    where = adapter.source or "adapter"
    for name, module in adapter.modules.items():
        if not math.isfinite(module.scale):
            raise InputError(f"{where}: module '{name}' has a non-finite scale ({module.scale})")
        for role, tensor in (("A", module.A), ("B", module.B)):
            if not tensor.is_floating_point():
                dtype = str(tensor.dtype).removeprefix("torch.")
                raise UnsupportedFeatureError(
                    f"{where}: module '{name}' stores its {role} factor as {dtype} (quantised?); only "
                    "floating-point factors can be used: dequantise the adapter first"
                )
            if not all_finite(tensor):
                raise InputError(
                    f"{where}: module '{name}' has non-finite values (NaN or inf) in its {role} factor"
                )


def all_finite(tensor: torch.Tensor) -> bool:
    # A float64 sum is NaN or inf exactly when an entry is, for inputs narrower than float64 (no overflow
    # possible), and ~10x cheaper than an elementwise isfinite on the CPU.
    if tensor.dtype != torch.float64 and bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(tensor).all())


def same_base(a: str, b: str) -> bool:
    """Whether two adapters' declared bases name one model: equal as written, or, for local paths (spelled
    ./base, base/ or /abs/base), the same directory once resolved."""
    if a.rstrip("/") == b.rstrip("/"):
        return True
    first, second = Path(a), Path(b)
    return first.exists() and second.exists() and first.resolve() == second.resolve()


def match_module_names(adapter: Adapter, base_module_names: Iterable[str]) -> Adapter:
    """Rename underscore-mangled module names (kohya's) to the base's dotted module paths.

    A name matches a base path p when it equals p.replace(".", "_"), either as it is or after removing a
    kohya prefix (lora_unet_, lora_te_, lora_te1_, ...). Names already dotted, or matching nothing, stay.
    """
    where = adapter.source or "adapter"
    dotted = {name for name in base_module_names if name}
    by_mangled: dict[str, list[str]] = {}
    for name in sorted(dotted):
        by_mangled.setdefault(name.replace(".", "_"), []).append(name)

    def base_name(name: str) -> str:
        if name in dotted:
            return name
        for candidate in [name] + [name[len(p) :] for p in KOHYA_PREFIXES if name.startswith(p)]:
            found = by_mangled.get(candidate)
            if found and len(found) > 1:
                choices = ", ".join(found)
                raise IncompatibleError(f"{where}: module '{name}' could be any of {choices}")
            if found:
                return found[0]
        return name

    renamed: dict[str, LoraModule] = {}
    origin: dict[str, str] = {}
    for name, module in adapter.modules.items():
        target = base_name(name)
        if target in renamed:
            raise IncompatibleError(
                f"{where}: modules '{origin[target]}' and '{name}' both match '{target}' of the base"
            )
        renamed[target], origin[target] = module, name
    return replace(adapter, modules=renamed, metadata=dict(adapter.metadata))


# ---------------------------------------------------------------------------------------------------------
# Writing


def _alpha_for(scale: float, rank: int) -> int | float:
    """The lora_alpha from which peft's lora_alpha / r gives back exactly `scale` (an int when one does)."""
    if not math.isfinite(scale):
        raise ValueError(f"scale {scale} cannot be saved")
    alpha = scale * rank
    if round(alpha) / rank == scale:
        return round(alpha)
    for candidate in (math.nextafter(alpha, math.inf), math.nextafter(alpha, -math.inf)):
        if candidate / rank == scale:
            return candidate
    return alpha


def _most_common(values: Iterable):
    """The most frequent value; among equally frequent ones, the smallest (so the choice is deterministic)."""
    counts = Counter(values)
    return min(counts, key=lambda value: (-counts[value], value))


def _exact_pattern(module: str) -> str:
    # peft matches a pattern key k as re.match(rf"(.*\.)?({k})$", path); the "^" keeps the optional
    # prefix from matching, so the key selects this one module and never a longer path that ends with it.
    return "^" + re.escape(module)


def save_adapter(adapter: Adapter, directory: Path, dtype: torch.dtype | None = None) -> None:
    """Write `adapter` as a PEFT directory (adapter_config.json + adapter_model.safetensors) in `directory`.

    The config never sets use_rslora: every module's scale is baked into r and lora_alpha (rank_pattern and
    alpha_pattern for the modules that differ from the most common), so peft applies exactly scale * B @ A.
    Same adapter, same bytes. `dtype` casts the factors. Writing atomically is the caller's job.
    """
    if not adapter.modules:
        raise ValueError("an adapter with no modules cannot be saved")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ranks = {name: module.rank for name, module in adapter.modules.items()}
    alphas = {name: _alpha_for(module.scale, module.rank) for name, module in adapter.modules.items()}
    r, lora_alpha = _most_common(ranks.values()), _most_common(alphas.values())
    config = {
        "alpha_pattern": {_exact_pattern(n): a for n, a in alphas.items() if a != lora_alpha},
        "base_model_name_or_path": adapter.base,
        "bias": "none",
        "fan_in_fan_out": bool(adapter.metadata.get("fan_in_fan_out", False)),
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": lora_alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {_exact_pattern(n): rank for n, rank in ranks.items() if rank != r},
        "target_modules": sorted(adapter.modules),
        "task_type": adapter.metadata.get("task_type", "CAUSAL_LM"),
        "use_dora": False,
        "use_rslora": False,
    }
    tensors = {}
    for name, module in adapter.modules.items():
        for role, tensor in (("A", module.A), ("B", module.B)):
            # A copy: safetensors refuses factors that share storage (slices of one SVD, say).
            tensor = (
                tensor.detach()
                .to("cpu", dtype=dtype or tensor.dtype)
                .clone(memory_format=torch.contiguous_format)
            )
            tensors[f"{PEFT_PREFIX}{name}.lora_{role}.weight"] = tensor
    text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    (directory / PEFT_CONFIG).write_bytes(text.encode("utf-8"))
    save_file(tensors, str(directory / PEFT_WEIGHTS), metadata={"format": "pt"})
