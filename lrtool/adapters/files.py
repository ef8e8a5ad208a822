"""Survey a LoRA adapter's files without refusing anything: what they hold and every problem, with a code.

Reads a PEFT directory (adapter_config.json + adapter_model.safetensors; torchtune's export is one), an
mlx-lm directory (adapter_config.json + adapters.safetensors), a bare .safetensors beside its config, or a
kohya / diffusers .safetensors: the config and the safetensors header (key names, shapes, dtypes, metadata)
and the scalar alpha tensors, never a factor and never a pickle. It names the format (Survey.format) and
gives each well-formed module's factors their canonical shapes (mlx-lm's transposed, a conv's flattened).
Writes nothing. The key grammar and the features beyond plain LoRA are lrtool.adapters.grammar's, the
config's problems lrtool.adapters.checks'; lrtool.adapters.read turns a survey into an Adapter (raising its
first refusing problem) and diagnose turns the problems into findings.

A problem's code is one of diagnose's finding codes (unreadable, malformed, unsupported-feature,
shape-mismatch, config-mismatch, non-finite, dtype-mixed); `refuses` says whether the canonical reader
refuses the file for it (a config-mismatch warning does not; a feature beyond plain LoRA does).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import SafetensorError, safe_open

from lrtool.adapters.checks import check_loose_file, check_mlx_config, check_peft_config, is_mlx_config
from lrtool.adapters.grammar import (
    KOHYA_BASE_KEYS,
    MLX_WEIGHTS,
    NAMED_METHODS,
    PEFT_CONFIG,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    PICKLE_SUFFIXES,
    TORCHTUNE_CONFIG_KEYS,
    parse_key,
    tensor_feature,
)
from lrtool.adapters.survey import Problem, Survey
from lrtool.errors import one_line
from lrtool.model_files import dtype_name


def survey(path: str | Path) -> Survey:
    """Every fact and problem of the adapter at `path` that its config and safetensors header tell."""
    item = Survey(path=str(path))
    config_path, weights = _locate(Path(path), item)
    if item.unreadable:
        return item
    item.config_path, item.weights = config_path, weights
    item.size_bytes = weights.stat().st_size + (config_path.stat().st_size if config_path else 0)
    if config_path is not None and not _read_config(item, config_path):
        return item
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            item.shapes = {key: list(f.get_slice(key).get_shape()) for key in keys}
            item.dtypes = {key: dtype_name(f.get_slice(key).get_dtype()) for key in keys}
            item.metadata = f.metadata() or {}
    except (SafetensorError, OSError) as error:
        item.add("unreadable", _not_safetensors(weights, error), file=weights, **_pickle_kind(weights))
        return item
    _group_keys(item)
    if not any({"A", "B"} & set(slots) for slots in item.groups.values()):
        _no_factors(item)
        return item
    _check_structure(item)
    factor_dtypes = sorted({item.dtypes[k] for s in item.groups.values() for r, k in s.items() if r in "AB"})
    item.dtype = factor_dtypes[0] if len(factor_dtypes) == 1 else "mixed"
    if len(factor_dtypes) > 1:
        item.add(
            "dtype-mixed",
            f"factors are stored as {', '.join(factor_dtypes)}",
            severity="warning",
            refuses=False,
        )
    if item.config is not None and is_mlx_config(item.config):
        item.format = "mlx"
        check_mlx_config(item)
    elif item.config is not None:
        item.format = "torchtune" if _written_by_torchtune(item) else "peft"
        check_peft_config(item)
    else:
        families = item.families
        item.format = next(
            (name for name in ("kohya", "diffusers-old", "mlx") if name in families),
            "peft" if "peft-prefixed" in families else "diffusers",
        )
        item.base = next((item.metadata[k] for k in KOHYA_BASE_KEYS if item.metadata.get(k)), None)
        check_loose_file(item)
    return item


def _written_by_torchtune(item: Survey) -> bool:
    """torchtune's HF checkpointer writes a PEFT export (adapter_config.json with only r, lora_alpha,
    target_modules, peft_type and the base; recipes/lora_finetune_single_device.py) beside its own
    adapter_model.pt (torchtune/training/checkpointing/_checkpointer.py)."""
    return (
        set(item.config) <= TORCHTUNE_CONFIG_KEYS and (item.config_path.parent / "adapter_model.pt").is_file()
    )


def _no_factors(item: Survey) -> None:
    """A file with no LoRA factor: a method lrtool cannot represent (LoHa, LoKr, ...) when its tensors name
    one, else unreadable."""
    item.problems = [p for p in item.problems if p.code != "malformed"]
    methods = " / ".join(sorted({f for f in item.features.values() if f in NAMED_METHODS}))
    peft_type = (item.config or {}).get("peft_type")
    if peft_type not in (None, "LORA"):
        methods = (
            f"{methods} adapter (peft_type {peft_type})" if methods else f"peft_type {peft_type} adapter"
        )
    elif methods:
        methods += " adapter"
    if methods:
        message = f"a {methods}, with no plain LoRA factors: lrtool reads LoRA only"
        item.problems.insert(
            0, Problem("unsupported-feature", message, "error", file=item.weights, unsupported=True)
        )
    elif not any(p.unsupported for p in item.problems):
        item.add(
            "unreadable",
            "holds no LoRA tensors (lora_A / lora_B, lora_down / lora_up, lora_a / lora_b, ...)",
            file=item.weights,
        )


# ---------------------------------------------------------------------------------------------------------
# Where the adapter is


def _pickled_message() -> str:
    # Unpickling runs arbitrary code (DESIGN.md: never unpickle), so these are refused unread.
    return "pickled weights (which can run code when loaded) are never unpickled; convert to safetensors"


def _pickle_kind(path: Path) -> dict:
    """A pickled file is refused as a feature (never unpickled), not as broken input."""
    return {"unsupported": _looks_pickled(path)}


def _looks_pickled(path: Path) -> bool:
    if path.suffix in PICKLE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _locate(path: Path, item: Survey) -> tuple[Path | None, Path | None]:
    """(adapter_config.json or None, the weights file); an unreadable problem when there is no adapter."""

    def nothing(message: str, file: Path | None = None, unsupported: bool = False):
        item.add("unreadable", message, file=file, unsupported=unsupported)
        return None, None

    if not path.exists():
        return nothing("no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
        if (path / PEFT_CONFIG).is_file():
            for weights in (PEFT_WEIGHTS, MLX_WEIGHTS):
                if (path / weights).is_file():
                    return path / PEFT_CONFIG, path / weights
            if pickled:
                return nothing(_pickled_message(), pickled[0], unsupported=True)
            return nothing(f"has {PEFT_CONFIG} but no {PEFT_WEIGHTS} (nor mlx-lm's {MLX_WEIGHTS})")
        candidates = [p for p in files if p.suffix == ".safetensors"]
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            return nothing(f"holds several .safetensors files ({names}); name the one to read")
        if candidates:
            return None, candidates[0]
        if pickled:
            return nothing(_pickled_message(), pickled[0], unsupported=True)
        # peft saves an adapter with a name other than "default" into a folder of that name
        named = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / PEFT_CONFIG).is_file())
        if named:
            where = ", ".join(f"{name}/" for name in named)
            return nothing(
                f"no adapter here, but {where} {'holds one' if len(named) == 1 else 'hold one each'} (peft "
                f"saves a named adapter in a folder of its name): give {path / named[0]}"
            )
        return nothing(
            f"no adapter here: expected {PEFT_CONFIG} + {PEFT_WEIGHTS}, or a LoRA .safetensors file"
        )
    if path.suffix in PICKLE_SUFFIXES:
        return nothing(_pickled_message(), path, unsupported=True)
    if path.name == PEFT_CONFIG:
        return _locate(path.parent, item)
    if path.suffix != ".safetensors":
        return nothing("not a LoRA adapter: expected a PEFT directory or a .safetensors file")
    config = path.parent / PEFT_CONFIG
    return (config if config.is_file() else None), path


def _read_config(item: Survey, config_path: Path) -> bool:
    try:
        item.config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        item.add("unreadable", f"invalid JSON ({one_line(error)})", file=config_path)
        return False
    except (OSError, UnicodeDecodeError) as error:
        item.add("unreadable", f"cannot read ({one_line(error)})", file=config_path)
        return False
    if not isinstance(item.config, dict):
        item.config = None
        item.add("unreadable", "expected a JSON object", file=config_path)
        return False
    return True


def _not_safetensors(path: Path, error: Exception) -> str:
    """Why safetensors cannot open `path`, naming pickles by their first bytes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        head = b""
    if head.startswith(b"PK\x03\x04"):
        return "a torch.save zip archive (pickled), never unpickled; convert to safetensors"
    if head[:1] == b"\x80":
        return "a pickle, never unpickled; convert to safetensors"
    return f"not a readable safetensors file ({one_line(error)})"


# ---------------------------------------------------------------------------------------------------------
# The tensors


def _group_keys(item: Survey) -> None:
    """Fill item.groups ({module: {role: key}}) and item.families from the keys; every other tensor is an
    unsupported feature of its module (item.features)."""
    adapter_names: set[str] = set()
    features: dict[tuple[str, str], list[str]] = {}
    saved_layers = (item.config or {}).get("modules_to_save") or []
    saved_layers = [s for s in saved_layers if isinstance(s, str)] if isinstance(saved_layers, list) else []
    for key in sorted(item.shapes):
        parts = parse_key(key)
        if parts is None:
            features.setdefault(tensor_feature(key, saved_layers), []).append(key)
            continue
        if parts.adapter:
            adapter_names.add(parts.adapter)
        if key.startswith(PEFT_PREFIX):
            item.families.add("peft-prefixed")
        item.families.add(parts.family)
        if parts.family == "mlx":
            item.transposed.add(key)
        module = parts.module.removeprefix(PEFT_PREFIX)
        slots = item.groups.setdefault(module, {})
        if parts.role in slots:
            item.add("malformed", f"'{slots[parts.role]}' and '{key}' both hold {parts.role}", module)
            slots[parts.role + "-duplicate"] = key
            continue
        slots[parts.role] = key
    for (module, feature), keys in sorted(features.items()):
        item.features.setdefault(module, feature)
        message = f"{feature}: {', '.join(keys)}, which lrtool cannot represent (plain LoRA only)"
        item.add("unsupported-feature", message, module or None, "warning", unsupported=True)
    if len(adapter_names) > 1:
        names = ", ".join(sorted(adapter_names))
        item.add(
            "unsupported-feature",
            f"holds several adapters ({names}); lrtool reads one adapter per file",
            file=item.weights,
        )


def _check_structure(item: Survey) -> None:
    """Problems with each module's factors; the modules that pass are item.well_formed, with their factors'
    shapes in the canonical layout (item.factor_shapes: A [r, in], B [out, r]; a conv layer's kernel in
    item.kernels, its A flattened to [r, in * prod(kernel)])."""
    for module, slots in item.groups.items():
        if any(role.endswith("-duplicate") for role in slots):
            continue
        shapes = {role: item.shapes[key] for role, key in slots.items()}
        if "A" not in slots and "B" not in slots:
            if module not in item.features:  # LoHa's and LoKr's alphas: their method is the problem
                message = f"'{slots['alpha']}' is an alpha for a module without LoRA factors"
                item.add("malformed", message, module)
            continue
        if any(
            slots[role] in item.transposed and len(shapes[role]) != 2 for role in ("A", "B") if role in slots
        ):
            described = ", ".join(f"{role} is {shapes[role]}" for role in ("A", "B") if role in slots)
            message = (
                f"mixture-of-experts LoRA (mlx-lm's LoRASwitchLinear: {described}), which lrtool cannot "
                "represent"
            )
            item.add("unsupported-feature", message, module, "warning", unsupported=True)
            continue
        if "A" not in slots or "B" not in slots:
            have, missing = ("A", "B") if "A" in slots else ("B", "A")
            item.add("malformed", f"has {have} ({slots[have]}) but no {missing} factor", module)
            continue
        A, B = (shapes[role][::-1] if slots[role] in item.transposed else shapes[role] for role in ("A", "B"))
        kernel = None
        if len(A) == len(B) and 3 <= len(A) <= 5 and all(size == 1 for size in B[2:]):
            kernel = tuple(A[2:])  # a conv layer's LoRA: the product over the flattened kernel
            A, B = [A[0], math.prod(A[1:])], B[:2]
        if len(A) != 2 or len(B) != 2:
            message = (
                f"A is {shapes['A']} and B is {shapes['B']}; LoRA factors are 2-D (a conv layer's are "
                "[r, in, *kernel] and [out, r, 1, ...])"
            )
            item.add("malformed", message, module)
            continue
        if "alpha" in slots and math.prod(shapes["alpha"]) != 1:
            item.add("malformed", f"alpha has shape {shapes['alpha']}; an alpha is a scalar", module)
            continue
        if A[0] == 0:
            item.add("malformed", "rank 0", module)
            continue
        if 0 in A or 0 in B:
            message = f"A is {shapes['A']} and B is {shapes['B']}: a factor with a zero dimension"
            item.add("malformed", message, module)
            continue
        if A[0] != B[1]:
            expected = (
                "lora_a [in, r] and lora_b [r, out]"
                if slots["A"] in item.transposed
                else "A [r, in] and B [out, r]"
            )
            item.add(
                "shape-mismatch",
                f"A is {shapes['A']} (r={A[0]}) but B is {shapes['B']} (r={B[1]}); expected {expected}",
                module,
            )
            continue
        item.factor_shapes[module] = {"A": A, "B": B}
        if kernel is not None:
            item.kernels[module] = kernel
        item.well_formed.add(module)
