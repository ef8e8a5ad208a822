"""Write the canonical Adapter as a PEFT directory that `peft.PeftModel.from_pretrained` loads unchanged.

Reads nothing from disk; writes adapter_config.json and adapter_model.safetensors into a directory the
caller provides (making it atomic is the caller's job: lrtool.io). Every module's scale is baked into r
and lora_alpha (rank_pattern / alpha_pattern for the modules that differ from the most common), never
rsLoRA, so peft applies exactly scale * B @ A. The same adapter gives the same bytes.
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

from lrtool.adapters.adapter import Adapter
from lrtool.adapters.grammar import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS


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
