"""Read a LoRA adapter's files into the canonical Adapter, or refuse them in one line that names the file.

Reads a PEFT directory (or its .safetensors beside adapter_config.json; torchtune's PEFT export too), a
kohya-style .safetensors (`lora_down` / `lora_up` / `alpha`), a diffusers one (current or the older
attention-processor layout) or an mlx-lm directory (adapters.safetensors + adapter_config.json), through
lrtool.adapters.files' survey: the first problem the survey marks as refusing (DoRA, LoHa, LoKr, lora bias,
modules_to_save, embedding LoRA, pickles, malformed factors, ...) is raised, nothing is dropped silently.
Then the factors are read with safetensors into the canonical layout (mlx-lm's transposed back, a conv's
flattened, its kernel kept on the module) and each module gets the scale its writer applies it with, and
where that came from (`scale_of`). Writes nothing.

The scale rules, each its writer's:
- PEFT and torchtune: lora_alpha / r (/ sqrt(r) with use_rslora), rank_pattern and alpha_pattern resolved
  as peft resolves them;
- diffusers with lora_adapter_metadata: the same, from each component's LoraConfig fields;
- kohya, LyCORIS, diffusers with alpha tensors: alpha / r per module (kohya and LyCORIS read an alpha of 0
  as r: networks/lora.py, `alpha = self.lora_dim if alpha is None or alpha == 0`);
- mlx-lm: lora_parameters.scale as it is (mlx-lm ignores any alpha);
- no alpha anywhere: 1, what kohya (alpha = r) and diffusers (lora_alpha = r) apply then.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from safetensors import SafetensorError, safe_open

from lrtool.adapters.adapter import Adapter, LoraModule
from lrtool.adapters.files import survey
from lrtool.adapters.grammar import (
    DIFFUSERS_METADATA_KEY,
    KOHYA_BASE_KEYS,
    KOHYA_COMPONENTS,
    PEFT_CONFIG,
    pattern_key,
)
from lrtool.adapters.survey import Problem, Survey
from lrtool.errors import IncompatibleError, InputError, UnsupportedFeatureError, one_line


def load_adapter(path: str | Path) -> Adapter:
    """Read a PEFT, torchtune or mlx-lm directory or a LoRA .safetensors file (PEFT, kohya, diffusers or
    mlx-lm naming) into an Adapter."""
    found = survey(path)
    if found.refusal is not None:
        raise refusal_error(found.refusal, path)
    return adapter_of(found, set(found.groups))


def refusal_error(problem: Problem, path: str | Path) -> InputError:
    """The exception the canonical reader raises for `problem`: a feature it cannot represent, or bad
    input."""
    kind = UnsupportedFeatureError if problem.unsupported else InputError
    return kind(problem.error_text(path))


def adapter_of(found: Survey, modules: Iterable[str]) -> Adapter:
    """The Adapter of a survey's `modules` (well-formed ones: diagnose reads those of a file the reader
    refuses), each with the scale its writer applies it with."""
    names = sorted(modules)
    keys = [found.groups[name][role] for name in names for role in ("A", "B")]
    try:
        with safe_open(str(found.weights), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in keys}
    except (SafetensorError, OSError) as error:
        raise InputError(f"{found.weights}: not a readable safetensors file ({one_line(error)})") from error
    result, sources = {}, {}
    for name in names:
        A, B = (_canonical(found, found.groups[name][role], tensors) for role in ("A", "B"))
        rank, kernel = A.shape[0], found.kernels.get(name)
        if kernel is not None:  # a conv layer's: the product over the flattened kernel
            A, B = A.reshape(rank, -1), B.reshape(B.shape[0], rank)
        scale, sources[name] = scale_of(found, name, rank)
        result[name] = LoraModule(A=A, B=B, scale=scale, kernel=kernel)
    used = [source for source in SCALE_SOURCES if source in sources.values()]
    metadata = {
        "fan_in_fan_out": bool((found.config or {}).get("fan_in_fan_out", False)),
        "scale_source": "+".join(used) or None,
        "scale_detail": "; ".join(scale_detail(found, source) for source in used) or None,
    }
    if found.config is not None and found.format == "mlx":
        metadata["alpha_source"] = f"{PEFT_CONFIG} lora_parameters.scale"
    elif found.config is not None:
        metadata.update(alpha_source=PEFT_CONFIG, task_type=found.config.get("task_type"))
    elif found.component_configs:
        metadata["alpha_source"] = DIFFUSERS_METADATA_KEY
    else:
        with_alpha = len(found.alphas)
        metadata["alpha_source"] = (
            "alpha tensor"
            if with_alpha == len(names)
            else "none: scale 1 assumed"
            if with_alpha == 0
            else "alpha tensor where present, else scale 1 assumed"
        )
        metadata.update({key: found.metadata[key] for key in KOHYA_BASE_KEYS if found.metadata.get(key)})
    return Adapter(
        modules=result,
        base=found.base,
        format=found.format or "peft",
        source=found.path,
        metadata=metadata,
    )


def _canonical(found: Survey, key: str, tensors: dict):
    """The factor `key` in the canonical layout: mlx-lm's lora_a [in, r] and lora_b [r, out] transposed to
    [r, in] and [out, r] (copied, so that it is stored as it reads)."""
    tensor = tensors[key]
    return tensor.T.contiguous() if key in found.transposed else tensor


SCALE_SOURCES = ("config", "metadata", "alpha", "default")  # where a module's scale came from


def scale_of(found: Survey, name: str, rank: int) -> tuple[float, str]:
    """(the scale module `name` of rank `rank` is applied with, where it came from: one of SCALE_SOURCES)."""
    if found.format == "mlx" and found.config is not None:
        return float(found.config["lora_parameters"]["scale"]), "config"
    if found.config is not None:
        return lora_config_scale(found.config, name, rank), "config"
    covered = found.component_config(name)
    if covered is not None:
        return lora_config_scale(covered[1], covered[0], rank), "metadata"
    if name in found.alphas:
        alpha = found.alphas[name]
        if alpha == 0 and found.format == "kohya":  # kohya's and LyCORIS' "no scaling"
            return 1.0, "alpha"
        return alpha / rank, "alpha"
    return 1.0, "default"


def lora_config_scale(config: dict, name: str, rank: int) -> float:
    """peft's scale for module `name` (its path as the config's patterns name it) of rank `rank`: lora_alpha
    / r, or lora_alpha / sqrt(r) with use_rslora, alpha_pattern resolved as peft resolves it."""
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(pattern_key(alpha_pattern, name), config.get("lora_alpha", 8))
    # rsLoRA scales by alpha / sqrt(r), not alpha / r; resolved here so no one downstream has to know.
    return alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank


def scale_detail(found: Survey, source: str) -> str:
    """Where the scales of `source` came from, in words a user can check against what they expect."""
    if source == "config" and found.format == "mlx":
        scale = found.config["lora_parameters"]["scale"]
        return f"{PEFT_CONFIG} lora_parameters.scale = {scale:g} (mlx-lm applies it as it is, ignoring alpha)"
    if source == "config":
        rule = "lora_alpha / sqrt(r) (use_rslora)" if found.rslora else "lora_alpha / r"
        patterns = [p for p in ("rank_pattern", "alpha_pattern") if found.config.get(p)]
        return f"{PEFT_CONFIG}: {rule}" + (f", with {' and '.join(patterns)}" if patterns else "")
    if source == "metadata":
        components = ", ".join(sorted(c for c in found.component_configs if c)) or "one model"
        return f"{DIFFUSERS_METADATA_KEY} in the safetensors header ({components}): lora_alpha / r per module"
    if source == "alpha":
        zero = " (0 meaning r, as kohya reads it)" if found.format == "kohya" else ""
        return f"each module's alpha tensor: alpha / r{zero}"
    writer = {
        "kohya": "as kohya applies it (alpha = r)",
        "diffusers": "as diffusers applies it (lora_alpha = r)",
        "diffusers-old": "as diffusers applies it (lora_alpha = r)",
    }.get(found.format or "", f"assumed: no {PEFT_CONFIG}")
    return f"no alpha in the file: scale 1, {writer}"


def match_module_names(adapter: Adapter, base_module_names: Iterable[str]) -> Adapter:
    """Rename underscore-mangled module names (kohya's) to the base's dotted module paths.

    A name matches a base path p when it equals p.replace(".", "_"), either as it is, or after removing a
    kohya prefix (lora_unet_, lora_te_, lora_te1_, ...), or with that prefix read as the diffusers component
    it stands for (lora_unet_x matches unet.x, lora_te2_x matches text_encoder_2.x). Names already dotted, or
    matching nothing, stay.
    """
    where = adapter.source or "adapter"
    dotted = {name for name in base_module_names if name}
    by_mangled: dict[str, list[str]] = {}
    for name in sorted(dotted):
        by_mangled.setdefault(name.replace(".", "_"), []).append(name)

    def base_name(name: str) -> str:
        if name in dotted:
            return name
        candidates = [name]
        for prefix, component in KOHYA_COMPONENTS.items():
            if name.startswith(prefix):
                candidates += [name[len(prefix) :], f"{component}_{name[len(prefix) :]}"]
        for candidate in candidates:
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
