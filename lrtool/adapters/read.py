"""Read a LoRA adapter's files into the canonical Adapter, or refuse them in one line that names the file.

Reads a PEFT directory (or its .safetensors beside adapter_config.json), a kohya-style .safetensors
(`lora_down` / `lora_up` / `alpha`) or a diffusers-style one, through lrtool.adapters.files' survey: the
first problem the survey marks as refusing (DoRA, lora bias, modules_to_save, embedding or conv LoRA,
pickles, malformed factors, ...) is raised, nothing is dropped silently. Then the factors are read with
safetensors and each module gets the scale it is applied with (rsLoRA, rank_pattern, alpha_pattern
resolved as peft resolves them; alpha / r for kohya and diffusers, scale 1 without an alpha). Writes
nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from safetensors import SafetensorError, safe_open

from lrtool.adapters.adapter import Adapter, LoraModule
from lrtool.adapters.files import survey
from lrtool.adapters.grammar import KOHYA_BASE_KEYS, KOHYA_PREFIXES, PEFT_CONFIG, pattern_key
from lrtool.adapters.survey import Problem, Survey
from lrtool.errors import IncompatibleError, InputError, UnsupportedFeatureError, one_line


def load_adapter(path: str | Path) -> Adapter:
    """Read a PEFT directory or a LoRA .safetensors file (PEFT, kohya or diffusers naming) into an Adapter."""
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
    refuses), each with the scale the file's config or alpha tensors give it."""
    names = sorted(modules)
    keys = [found.groups[name][role] for name in names for role in ("A", "B")]
    try:
        with safe_open(str(found.weights), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in keys}
    except (SafetensorError, OSError) as error:
        raise InputError(f"{found.weights}: not a readable safetensors file ({one_line(error)})") from error
    result = {}
    for name in names:
        A, B = tensors[found.groups[name]["A"]], tensors[found.groups[name]["B"]]
        result[name] = LoraModule(A=A, B=B, scale=module_scale(found, name, A.shape[0]))
    metadata = {"fan_in_fan_out": bool((found.config or {}).get("fan_in_fan_out", False))}
    if found.config is not None:
        metadata.update(alpha_source=PEFT_CONFIG, task_type=found.config.get("task_type"))
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


def module_scale(found: Survey, name: str, rank: int) -> float:
    """The scale module `name` (of rank `rank`) is applied with: PEFT's lora_alpha / r (or / sqrt(r) with
    rsLoRA), rank_pattern and alpha_pattern resolved; kohya's and diffusers' alpha / r, 1 without an alpha."""
    if found.config is not None:
        alpha_pattern = found.config.get("alpha_pattern") or {}
        alpha = alpha_pattern.get(pattern_key(alpha_pattern, name), found.config.get("lora_alpha", 8))
        # rsLoRA scales by alpha / sqrt(r), not alpha / r; resolved here so no one downstream has to know.
        return alpha / math.sqrt(rank) if found.rslora else alpha / rank
    return found.alphas[name] / rank if name in found.alphas else 1.0


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
