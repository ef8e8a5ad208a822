"""Write the canonical Adapter in a format its own tool loads unchanged: a PEFT directory (what
`peft.PeftModel.from_pretrained` loads), a kohya file, a diffusers file (`load_lora_weights`) or an mlx-lm
directory (`mlx_lm.tuner.utils.load_adapters`). `save_as` picks the writer by name (grammar.FORMATS).

Reads nothing from disk; writes into a directory the caller provides (making it atomic is the caller's
job: lrtool.outputs.atomic_output_dir). The same adapter gives the same bytes. Each writer keeps every
module's exact update:

- peft: adapter_config.json + adapter_model.safetensors; every module's scale baked into r and lora_alpha
  (rank_pattern / alpha_pattern for the modules that differ from the most common), never rsLoRA, so peft
  applies exactly scale * B @ A. A conv module's factors get back their shapes [r, in, *kernel] and
  [out, r, 1, ...] (peft's lora.Conv2d).
- kohya: lora.safetensors with `<name>.lora_down.weight`, `.lora_up.weight` (a conv's shapes restored) and
  `.alpha` = scale * r per module (kohya's networks/lora.py applies alpha / r); dotted names are mangled as
  kohya names them (unet. -> lora_unet_, text_encoder. -> lora_te_, ..., the dots as underscores).
- diffusers: pytorch_lora_weights.safetensors with `<component>.<path>.lora_A.weight` / `.lora_B.weight`
  and each component's LoraConfig fields in lora_adapter_metadata, as diffusers' save_lora_weights writes
  them (so load_lora_weights applies lora_alpha / r per module); modules under no component are written
  unprefixed with one config, as a model's save_lora_adapter writes them.
- mlx: adapters.safetensors (lora_a [in, r], lora_b [r, out]) + adapter_config.json (fine_tune_type lora,
  lora_parameters rank, scale and keys: the module paths). mlx-lm builds every layer at one rank and one
  scale: smaller ranks are padded with zeros (which add nothing) and a module whose scale differs from the
  most common has B multiplied by the ratio, in float64 before the cast.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from lrtool.adapters.adapter import Adapter, LoraModule
from lrtool.adapters.grammar import (
    DIFFUSERS_COMPONENTS,
    DIFFUSERS_METADATA_KEY,
    DIFFUSERS_WEIGHTS,
    FORMATS,
    KOHYA_WEIGHTS,
    MLX_WEIGHTS,
    PEFT_CONFIG,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
)
from lrtool.errors import IncompatibleError


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


def save_as(
    adapter: Adapter, directory: Path, format: str = "peft", dtype: torch.dtype | None = None
) -> None:
    """Write `adapter` into `directory` in `format` (one of FORMATS); `dtype` casts the factors."""
    writers = {"peft": save_adapter, "kohya": save_kohya, "diffusers": save_diffusers, "mlx": save_mlx}
    if format not in writers:
        raise ValueError(f"unknown adapter format {format!r}; lrtool writes {', '.join(FORMATS)}")
    writers[format](adapter, Path(directory), dtype=dtype)


def _checked(adapter: Adapter, directory: Path) -> Path:
    if not adapter.modules:
        raise ValueError("an adapter with no modules cannot be saved")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _stored(tensor: torch.Tensor, shape, dtype: torch.dtype | None) -> torch.Tensor:
    # A copy: safetensors refuses factors that share storage (slices of one SVD, say).
    tensor = tensor.detach().to("cpu", dtype=dtype or tensor.dtype).reshape(shape)
    return tensor.clone(memory_format=torch.contiguous_format)


def stored_factors(module: LoraModule, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as a file stores them: [r, in] and [out, r], or a conv layer's [r, in, *kernel] and
    [out, r, 1, ...]."""
    kernel = module.kernel or ()
    a_shape = (module.rank, *module.weight_shape[1:])
    b_shape = (module.out_features, module.rank, *(1 for _ in kernel))
    return _stored(module.A, a_shape, dtype), _stored(module.B, b_shape, dtype)


def lora_config_fields(modules: dict[str, LoraModule]) -> dict:
    """The LoraConfig fields under which peft applies exactly each module's scale * B @ A: r and lora_alpha
    the most common, rank_pattern and alpha_pattern for the modules that differ, target_modules."""
    ranks = {name: module.rank for name, module in modules.items()}
    alphas = {name: _alpha_for(module.scale, module.rank) for name, module in modules.items()}
    r, lora_alpha = _most_common(ranks.values()), _most_common(alphas.values())
    return {
        "alpha_pattern": {_exact_pattern(n): a for n, a in alphas.items() if a != lora_alpha},
        "bias": "none",
        "init_lora_weights": True,
        "lora_alpha": lora_alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {_exact_pattern(n): rank for n, rank in ranks.items() if rank != r},
        "target_modules": sorted(modules),
        "use_dora": False,
        "use_rslora": False,
    }


def save_adapter(adapter: Adapter, directory: Path, dtype: torch.dtype | None = None) -> None:
    """Write `adapter` as a PEFT directory (adapter_config.json + adapter_model.safetensors) in `directory`.

    The config never sets use_rslora: every module's scale is baked into r and lora_alpha (rank_pattern and
    alpha_pattern for the modules that differ from the most common), so peft applies exactly scale * B @ A.
    Same adapter, same bytes. `dtype` casts the factors. Writing atomically is the caller's job.
    """
    directory = _checked(adapter, directory)
    config = {
        **lora_config_fields(adapter.modules),
        "base_model_name_or_path": adapter.base,
        "fan_in_fan_out": bool(adapter.metadata.get("fan_in_fan_out", False)),
        "inference_mode": True,
        "task_type": adapter.metadata.get("task_type", "CAUSAL_LM"),
    }
    tensors = {}
    for name, module in adapter.modules.items():
        A, B = stored_factors(module, dtype)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B
    _write_json(directory / PEFT_CONFIG, config)
    save_file(tensors, str(directory / PEFT_WEIGHTS), metadata={"format": "pt"})


def _write_json(path: Path, content: dict) -> None:
    text = json.dumps(content, indent=2, sort_keys=True, allow_nan=False) + "\n"
    path.write_bytes(text.encode("utf-8"))


def kohya_name(name: str, two_text_encoders: bool = False) -> str:
    """A module path as kohya names it: the diffusers component as kohya's prefix (lora_unet_, lora_te_, or
    lora_te1_ / lora_te2_ beside a second text encoder, ...), every dot an underscore; kohya names stay."""
    if "." not in name:
        return name
    component, _, rest = name.partition(".")
    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_" if two_text_encoders else "lora_te_",
        "text_encoder_2": "lora_te2_",
        "text_encoder_3": "lora_te3_",
        "transformer": "lora_transformer_",
    }
    if component in prefixes:
        return prefixes[component] + rest.replace(".", "_")
    return name.replace(".", "_")


def save_kohya(adapter: Adapter, directory: Path, dtype: torch.dtype | None = None) -> None:
    """Write `adapter` as a kohya file (lora.safetensors) in `directory`: per module lora_down, lora_up
    (a conv's shapes restored) and alpha = scale * r, which kohya's networks/lora.py applies as alpha / r."""
    directory = _checked(adapter, directory)
    two = any(name.startswith("text_encoder_2.") for name in adapter.modules)
    names = {name: kohya_name(name, two) for name in adapter.modules}
    if len(set(names.values())) < len(names):
        raise IncompatibleError(
            "two modules get one kohya name (their paths differ only in dots and underscores)"
        )
    tensors = {}
    for name, module in adapter.modules.items():
        A, B = stored_factors(module, dtype)
        tensors[f"{names[name]}.lora_down.weight"] = A
        tensors[f"{names[name]}.lora_up.weight"] = B
        tensors[f"{names[name]}.alpha"] = torch.tensor(module.scale * module.rank, dtype=torch.float32)
    ranks = {module.rank for module in adapter.modules.values()}
    alphas = {float(t) for key, t in tensors.items() if key.endswith(".alpha")}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic",
    }
    if adapter.base:
        metadata["ss_sd_model_name"] = adapter.base
    save_file(dict(sorted(tensors.items())), str(directory / KOHYA_WEIGHTS), metadata=metadata)


def save_diffusers(adapter: Adapter, directory: Path, dtype: torch.dtype | None = None) -> None:
    """Write `adapter` as diffusers saves a LoRA (pytorch_lora_weights.safetensors): PEFT factor keys under
    each component's name and each component's LoraConfig fields in lora_adapter_metadata."""
    directory = _checked(adapter, directory)
    components: dict[str, dict[str, LoraModule]] = {}
    for name, module in adapter.modules.items():
        component, _, within = name.partition(".")
        if component not in DIFFUSERS_COMPONENTS or not within:
            component, within = "", name
        components.setdefault(component, {})[within] = module
    if "" in components and len(components) > 1:
        lone = next(iter(components[""]))
        raise IncompatibleError(
            f"module '{lone}' is under no diffusers component ({', '.join(DIFFUSERS_COMPONENTS)}) but others "
            "are: a diffusers file cannot hold both; write --format peft"
        )
    tensors, fields = {}, {}
    for component, modules in sorted(components.items()):
        prefix = f"{component}." if component else ""
        for within, module in modules.items():
            A, B = stored_factors(module, dtype)
            tensors[f"{prefix}{within}.lora_A.weight"] = A
            tensors[f"{prefix}{within}.lora_B.weight"] = B
        fields.update({f"{prefix}{key}": value for key, value in lora_config_fields(modules).items()})
    text = json.dumps(fields, indent=2, sort_keys=True, allow_nan=False)
    metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: text}
    save_file(dict(sorted(tensors.items())), str(directory / DIFFUSERS_WEIGHTS), metadata=metadata)


def save_mlx(adapter: Adapter, directory: Path, dtype: torch.dtype | None = None) -> None:
    """Write `adapter` as an mlx-lm adapter directory (adapters.safetensors + adapter_config.json): one rank
    (smaller ones zero-padded) and one scale (a differing module's ratio folded into its lora_b)."""
    directory = _checked(adapter, directory)
    if any(module.kernel is not None for module in adapter.modules.values()):
        raise IncompatibleError("mlx-lm adapts linear layers only; this adapter has conv modules")
    rank = max(module.rank for module in adapter.modules.values())
    scale = _most_common(module.scale for module in adapter.modules.values())
    tensors = {}
    for name, module in adapter.modules.items():
        out_dtype = dtype or module.A.dtype
        out_dtype = torch.float32 if out_dtype == torch.float64 else out_dtype  # mlx stores no float64
        A = torch.zeros(rank, module.in_features, dtype=torch.float64)
        B = torch.zeros(module.out_features, rank, dtype=torch.float64)
        A[: module.rank] = module.A.detach().cpu().double()
        B[:, : module.rank] = module.B.detach().cpu().double() * (module.scale / scale)
        tensors[f"{name}.lora_a"] = A.T.to(out_dtype).contiguous()
        tensors[f"{name}.lora_b"] = B.T.to(out_dtype).contiguous()
    config = {
        "fine_tune_type": "lora",
        "lora_parameters": {"dropout": 0.0, "keys": sorted(adapter.modules), "rank": rank, "scale": scale},
        "model": adapter.base,
        "num_layers": -1,  # the keys are full module paths: mlx-lm matches them whatever num_layers says
    }
    _write_json(directory / PEFT_CONFIG, config)
    save_file(tensors, str(directory / MLX_WEIGHTS), metadata={"format": "mlx"})
