"""The problems of an adapter's config: a PEFT (or torchtune) adapter_config.json against its tensors, an
mlx-lm adapter_config.json (lora_parameters), or a kohya / diffusers file's metadata (ss_network_dim,
ss_network_alpha, diffusers' lora_adapter_metadata) and alpha tensors.

Reads the config's content as surveyed and the files' scalar alpha tensors; adds Problems to the Survey
(lrtool.adapters.files), never raises for content.
"""

from __future__ import annotations

import json
import math
import re

from safetensors import safe_open

from lrtool.adapters.grammar import (
    BASE_REWRITING_INITS,
    CONFIG_FEATURES,
    DIFFUSERS_METADATA_KEY,
    MLX_WEIGHTS,
    PEFT_CONFIG,
    PEFT_PREFIX,
    pattern_key,
)
from lrtool.adapters.survey import Survey
from lrtool.errors import one_line


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_peft_config(item: Survey) -> None:
    """Problems of a PEFT adapter's config: features beyond LoRA, and r, alpha, target_modules vs tensors."""
    config, name = item.config, item.config_path
    item.base = config.get("base_model_name_or_path") or None
    item.rslora = bool(config.get("use_rslora", False))
    foreign = sorted(item.families - {"peft", "peft-prefixed", "alpha"})
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
    check_lora_config(item, config, name.name, file=name)
    _check_targets(item)


def check_lora_config(
    item: Survey, config: dict, where: str, file=None, component: str | None = None
) -> bool:
    """Problems of a peft LoraConfig's fields (`config`, from `where`): features beyond LoRA, r, lora_alpha
    and the patterns as numbers, each module's rank against r / rank_pattern. `component` (diffusers'
    metadata): only the modules under it, named within it. Whether the numbers could be read."""
    named = {p.message.split(":")[0] for p in item.problems if p.code == "unsupported-feature"}
    bias = config.get("bias", "none")
    features = [(f, feature) for f, feature in CONFIG_FEATURES if config.get(f)]
    features += [("bias", "lora bias")] if bias not in ("none", None) else []
    for field_name, feature in features:
        reported = any(n.startswith(feature) for n in named)  # the tensors' problems name it, per module
        item.add(
            "unsupported-feature",
            f"{feature}: {'' if file else where + ' '}sets {field_name}={config[field_name]!r}, which lrtool "
            "cannot represent",
            severity="warning",
            file=file,
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
            file=file,
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
        item.add("unreadable", ("" if file else f"{where}: ") + "; ".join(problems), file=file)
        return False
    if component is None or len(item.component_configs) == 1:
        item.alpha = lora_alpha
    if not all(math.isfinite(v) for v in (lora_alpha, *alpha_pattern.values())):
        item.add(
            "non-finite",
            f"lora_alpha or alpha_pattern in {where} holds a NaN or infinity",
            file=file,
            refuses=False,
        )
    for module in sorted(item.groups):
        slots = item.groups[module]
        within = module
        if component is not None:
            covered = item.component_config(module)
            if covered is None or covered[1] is not config:
                continue
            within = covered[0]
        rank = item.rank(module)
        if rank is not None:
            expected = rank_pattern.get(pattern_key(rank_pattern, within), r)
            if rank != expected:
                item.add("config-mismatch", f"rank {rank} but {where} says r={expected}", module, "error")
        if "alpha" in slots:
            item.add(
                "config-mismatch",
                f"an alpha tensor ({slots['alpha']}) beside {where}, which sets alpha (peft ignores tensors)",
                module,
                "warning",
                refuses=False,
            )
    return True


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


def is_mlx_config(config: dict) -> bool:
    """Whether an adapter_config.json is mlx-lm's (mlx_lm/lora.py saves its arguments: lora_parameters,
    fine_tune_type, ...) rather than peft's."""
    return "peft_type" not in config and ("lora_parameters" in config or "fine_tune_type" in config)


def check_mlx_config(item: Survey) -> None:
    """Problems of an mlx-lm adapter: what its config says (fine_tune_type, lora_parameters' rank and scale)
    against the tensors, as mlx_lm/tuner/utils.py's load_adapters would find them."""
    config, name = item.config, item.config_path.name
    item.base = config.get("model") if isinstance(config.get("model"), str) else None
    item.rslora = False
    foreign = sorted(item.families - {"mlx", "alpha"})
    if foreign:
        families = " and ".join(foreign)
        message = f"{families} factor keys beside an mlx-lm {name}: mlx-lm applies lora_a / lora_b only"
        item.add("config-mismatch", message, severity="error", file=item.weights, unsupported=True)
    kind = config.get("fine_tune_type", "lora")
    if kind == "dora":
        message = f"DoRA: {name} sets fine_tune_type='dora', which lrtool cannot represent"
        item.add("unsupported-feature", message, severity="warning", file=item.config_path, unsupported=True)
    elif kind != "lora":
        message = f"fine_tune_type {kind!r} (mlx-lm LoRA adapters only)"
        item.add("unsupported-feature", message, file=item.config_path, unsupported=True)
    parameters = config.get("lora_parameters")
    parameters = parameters if isinstance(parameters, dict) else {}
    scale = parameters.get("scale")
    if not _number(scale):
        hint = " (mlx-lm's scale is the factor itself, not an alpha)" if "alpha" in parameters else ""
        message = f"lora_parameters has no numeric scale{hint}; mlx-lm refuses such a config too"
        item.add("unreadable", message, file=item.config_path)
        return
    if not math.isfinite(scale):
        item.add("non-finite", f"lora_parameters.scale is {scale}", file=item.config_path, refuses=False)
    rank = parameters.get("rank")
    for module in sorted(item.well_formed):
        if _number(rank) and item.rank(module) != rank:
            message = (
                f"rank {item.rank(module)} but {name} says lora_parameters.rank={rank} (mlx-lm refuses it)"
            )
            item.add("config-mismatch", message, module, "error")
        if (
            "embed" in module.rpartition(".")[2]
        ):  # mlx-lm's LoRAEmbedding: lora_a [vocab, r] @ lora_b [r, dims]
            message = "embedding LoRA (mlx-lm's LoRAEmbedding), which lrtool cannot represent"
            item.add("unsupported-feature", message, module, "warning", unsupported=True)


def check_loose_file(item: Survey) -> None:
    """Problems of a file without a config (kohya, diffusers, ...): PEFT or mlx-lm keys without their
    config, ss_network_dim / _alpha, diffusers' lora_adapter_metadata."""
    item.rslora = False
    if item.format in ("peft", "mlx"):
        item.rslora = None
        what = (
            f"PEFT keys ({PEFT_PREFIX}...)"
            if item.format == "peft"
            else f"mlx-lm keys (lora_a / lora_b, as in {MLX_WEIGHTS})"
        )
        scale = "lora_alpha / r" if item.format == "peft" else "lora_parameters.scale"
        item.add(
            "config-mismatch",
            f"has {what} but no {PEFT_CONFIG} beside it: the scale {scale} is unknown without "
            f"{PEFT_CONFIG}; put it beside the file (scale 1 assumed)",
            severity="warning",
            file=item.weights,
        )
    dim = _metadata_number(item.metadata, "ss_network_dim")
    for module in sorted(item.well_formed):
        rank = item.rank(module)
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
    if DIFFUSERS_METADATA_KEY in item.metadata:
        _check_diffusers_metadata(item)


def _check_diffusers_metadata(item: Survey) -> None:
    """diffusers' lora_adapter_metadata: each component's LoraConfig fields (keys "<component>.<field>",
    from save_lora_weights), or one config's (unprefixed, from a model's save_lora_adapter). diffusers builds
    the LoraConfig it loads with from them (utils/peft_utils.py, _create_lora_config), so they set the
    scale: lora_alpha / r, with rank_pattern, alpha_pattern and use_rslora."""
    where = DIFFUSERS_METADATA_KEY
    try:
        fields = json.loads(item.metadata[DIFFUSERS_METADATA_KEY])
    except json.JSONDecodeError as error:
        item.add("unreadable", f"its {where} is not valid JSON ({one_line(error)})", file=item.weights)
        return
    if not isinstance(fields, dict):
        item.add("unreadable", f"its {where} is not a JSON object", file=item.weights)
        return
    if any(key in fields for key in ("r", "lora_alpha", "peft_type")):
        item.component_configs = {"": fields}
    else:
        for key, value in fields.items():
            component, _, field_name = key.partition(".")
            item.component_configs.setdefault(component, {})[field_name] = value
    for component, config in sorted(item.component_configs.items()):
        label = f"{where} ({component})" if component else where
        if not check_lora_config(item, config, label, component=component):
            item.component_configs = {}
            return
        if config.get("use_rslora"):
            item.rslora = True


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
