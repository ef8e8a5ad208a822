"""The problems of an adapter's config: a PEFT adapter_config.json against its tensors, or a kohya /
diffusers file's metadata (ss_network_dim, ss_network_alpha) and alpha tensors.

Reads adapter_config.json's content as surveyed and the files' scalar alpha tensors; adds Problems to the
Survey (lrtool.adapters.files), never raises for content.
"""

from __future__ import annotations

import math
import re

from safetensors import safe_open

from lrtool.adapters.grammar import (
    BASE_REWRITING_INITS,
    CONFIG_FEATURES,
    PEFT_CONFIG,
    PEFT_PREFIX,
    pattern_key,
)
from lrtool.adapters.survey import Survey


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_peft_config(item: Survey) -> None:
    """Problems of a PEFT adapter's config: features beyond LoRA, and r, alpha, target_modules vs tensors."""
    config, name = item.config, item.config_path
    item.base = config.get("base_model_name_or_path") or None
    item.rslora = bool(config.get("use_rslora", False))
    foreign = sorted(item.families & {"kohya", "diffusers"})
    if foreign:  # peft applies only lora_A / lora_B beside its config; the others would be dropped
        key = next(
            k
            for slots in item.groups.values()
            for r, k in slots.items()
            if r in "AB" and "lora_" + r not in k
        )
        message = (
            f"{' and '.join(foreign)} factor keys (e.g. '{key}') beside {name.name}: peft does not apply them"
        )
        item.add("config-mismatch", message, severity="error", file=item.weights, unsupported=True)
    peft_type = config.get("peft_type")
    if peft_type is None:
        message = "has no peft_type, so it may not be a PEFT LoRA config (diagnose reads it as LORA)"
        item.add("config-mismatch", message, severity="warning", file=name)
    elif peft_type != "LORA":
        item.add(
            "unsupported-feature", f"peft_type {peft_type} (LORA adapters only)", file=name, unsupported=True
        )
    named = {p.message.split(":")[0] for p in item.problems if p.code == "unsupported-feature"}
    bias = config.get("bias", "none")
    features = [(f, feature) for f, feature in CONFIG_FEATURES if config.get(f)]
    features += [("bias", "lora bias")] if bias not in ("none", None) else []
    for field_name, feature in features:
        reported = feature in named  # the tensors' problems already name it, per module
        item.add(
            "unsupported-feature",
            f"{feature}: sets {field_name}={config[field_name]!r}, which lrtool cannot represent",
            severity="warning",
            file=name,
            unsupported=True,
            refuses=not reported,
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        item.add(
            "unsupported-feature",
            f"init_lora_weights={init!r} rewrites the base weights, so this adapter is no delta on the "
            "original base; save it with peft's path_initial_model_for_weight_conversion first",
            severity="warning",
            file=name,
            unsupported=True,
        )
    r, lora_alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    problems = [
        f"{k} must be a number, got {v!r}"
        for k, v in (("r", r), ("lora_alpha", lora_alpha))
        if not _number(v)
    ]
    for pattern_name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pattern, dict):
            problems.append(f"{pattern_name} must be an object, got {pattern!r}")
            continue
        for key, value in pattern.items():
            if not _number(value):
                problems.append(f"{pattern_name}[{key!r}] must be a number, got {value!r}")
            try:
                re.compile(key)
            except re.error as error:
                problems.append(f"{pattern_name} key {key!r} is not a regex ({error})")
    if problems:
        item.add("unreadable", "; ".join(problems), file=name)
        return
    item.alpha = lora_alpha
    if not all(math.isfinite(v) for v in (lora_alpha, *alpha_pattern.values())):
        item.add(
            "non-finite", "lora_alpha or alpha_pattern holds a NaN or infinity", file=name, refuses=False
        )
    for module in sorted(item.groups):
        slots = item.groups[module]
        if "A" in slots and len(item.shapes[slots["A"]]) == 2:
            rank, expected = (
                item.shapes[slots["A"]][0],
                rank_pattern.get(pattern_key(rank_pattern, module), r),
            )
            if rank != expected:
                item.add("config-mismatch", f"rank {rank} but {name.name} says r={expected}", module, "error")
        if "alpha" in slots:
            item.add(
                "config-mismatch",
                f"an alpha tensor ({slots['alpha']}) beside {name.name}, which sets alpha (peft ignores "
                "tensors)",
                module,
                "warning",
                refuses=False,
            )
    _check_targets(item)


def _targeted(module: str, targets) -> bool:
    """Whether peft's target_modules selects `module` (a regex string: full match; a list: name suffixes)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _check_targets(item: Survey) -> None:
    """config-mismatch warnings: a module target_modules does not select, a target no tensor adapts."""
    name = item.config_path.name
    targets = item.config.get("target_modules")
    if isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
        targets = None
    if targets in (None, "all-linear") or not isinstance(targets, (str, list)):
        return
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as error:
            item.add(
                "config-mismatch",
                f"{name}'s target_modules is no regex ({error})",
                severity="warning",
                refuses=False,
            )
            return
    factor_modules = sorted(m for m, slots in item.groups.items() if "A" in slots or "B" in slots)
    for module in factor_modules:
        if not _targeted(module, targets):
            item.add(
                "config-mismatch",
                f"not selected by {name}'s target_modules",
                module,
                "warning",
                refuses=False,
            )
    every_module = set(factor_modules) | {p.module for p in item.problems if p.module}
    for target in [targets] if isinstance(targets, str) else targets:
        if not any(
            _targeted(module, [target] if isinstance(targets, list) else target) for module in every_module
        ):
            message = f"{name}'s target_modules names {target!r}, which no tensor adapts"
            item.add("config-mismatch", message, severity="warning", refuses=False)


def check_loose_file(item: Survey) -> None:
    """Problems of a kohya / diffusers file: PEFT keys without a config, ss_network_dim / _alpha."""
    item.rslora = False
    if item.format == "peft":
        item.rslora = None
        item.add(
            "config-mismatch",
            f"has PEFT keys ({PEFT_PREFIX}...) but no {PEFT_CONFIG} beside it: the scale lora_alpha / r is "
            f"unknown without {PEFT_CONFIG}; put it beside the file (scale 1 assumed)",
            severity="warning",
            file=item.weights,
        )
    dim = _metadata_number(item.metadata, "ss_network_dim")
    for module in sorted(item.well_formed):
        rank = item.shapes[item.groups[module]["A"]][0]
        if dim is not None and rank != dim:
            message = f"rank {rank} but the file's ss_network_dim says {dim:g}"
            item.add("config-mismatch", message, module, "error", refuses=False)
    item.alphas = _alpha_values(item)
    alpha = _metadata_number(item.metadata, "ss_network_alpha")
    if alpha is not None:
        for module, value in sorted(item.alphas.items()):
            if not math.isclose(value, alpha, rel_tol=1e-3):
                message = f"alpha tensor {value:g} but the file's ss_network_alpha says {alpha:g}"
                item.add("config-mismatch", message, module, "warning", refuses=False)
    values = set(item.alphas.values())
    if len(values) == 1 and len(item.alphas) == len(item.well_formed):
        item.alpha = values.pop()


def _alpha_values(item: Survey) -> dict[str, float]:
    """{module: its alpha tensor's value} of the well-formed modules that have one (cheap: scalars)."""
    keys = {m: item.groups[m]["alpha"] for m in item.well_formed if "alpha" in item.groups[m]}
    if not keys:
        return {}
    with safe_open(str(item.weights), framework="pt") as f:
        return {m: float(f.get_tensor(key).double().item()) for m, key in keys.items()}


def _metadata_number(metadata: dict, key: str) -> float | None:
    try:
        value = float(metadata.get(key, ""))
    except ValueError:  # absent, or kohya's "Dynamic" after a rank resize
        return None
    return value if math.isfinite(value) else None
