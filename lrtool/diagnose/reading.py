"""Read LoRA adapters for diagnose without refusing anything: what their files hold, as findings, and the
modules the figures can cover. Two stages per input, so that a file the canonical loader refuses is still
reported in full:

1. inspect: adapter_config.json and the safetensors header (key names, shapes, dtypes, metadata), parsed with
   adapters.py's key grammar (FACTOR_KEYS, ALPHA_KEY). This yields the format and the findings about the
   config, shapes, dtypes and unsupported features, per module.
2. load: `adapters.load_adapter` when it accepts the file (the exact scales merge would apply); when it
   refuses, the well-formed modules are built from the raw tensors with the same scale rules. Integer
   (quantised) factors are an unsupported feature, left out; float8 factors are read in float64, as torch
   computes nothing in float8.

A base model's weights, the renaming of kohya's mangled module names to the base's paths and the findings of
an adapter against its base are in base_check.py.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lrtool.adapters import (
    ALPHA_KEY,
    BASE_REWRITING_INITS,
    FACTOR_KEYS,
    FACTOR_ROLES,
    LORA_BIAS_KEY,
    PEFT_CONFIG,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    PICKLE_SUFFIXES,
    TENSOR_FEATURES,
    LoraModule,
    check_computable,
    load_adapter,
    pattern_key,
)
from lrtool.diagnose.findings import finding
from lrtool.errors import LrtoolError, UnsupportedFeatureError, one_line


@dataclass
class AdapterInput:
    """One ADAPTER argument: what stage 1 found in its files and stage 2 could load."""

    path: str
    format: str | None = None
    base: str | None = None
    alpha: float | None = None
    rslora: bool | None = None
    dtype: str | None = None
    size_bytes: int = 0
    config: dict | None = None
    weights: Path | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    groups: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> {"A"|"B"|"alpha": key}
    well_formed: set[str] = field(default_factory=set)  # modules whose factors form a LoRA
    findings: list[dict] = field(default_factory=list)
    refused: str | None = None  # why load_adapter refuses it, or None
    lora: dict[str, LoraModule] = field(default_factory=dict)  # the modules the figures cover
    modules: dict[str, dict] = field(default_factory=dict)  # module -> its report entry

    @property
    def unreadable(self) -> bool:
        return any(f["code"] == "unreadable" for f in self.findings)

    def add(self, *args, **kwargs) -> None:
        self.findings.append(finding(*args, **kwargs))


def read_adapter(path: str) -> AdapterInput:
    """Both stages: the findings about the files at `path`, and the modules the figures can cover."""
    item = _inspect(path)
    _load(item)
    return item


# ---------------------------------------------------------------------------------------------------------
# Stage 1: inspect the files without refusing anything

# safetensors' dtype codes, named as torch names them.
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}

# adapter_config.json fields that make an adapter more than dW = scale * B @ A (load_adapter refuses more;
# what it refuses beyond these still becomes a finding, from its message).
_CONFIG_FEATURES = (
    ("use_dora", "DoRA"),
    ("lora_bias", "lora bias"),
    ("modules_to_save", "modules_to_save"),
    ("trainable_token_indices", "trainable tokens"),
    ("layer_replication", "layer replication"),
    ("target_parameters", "LoRA on parameters (target_parameters)"),
)
_KOHYA_BASE_KEYS = ("ss_sd_model_name", "ss_base_model_version")


def _pickled(path: Path) -> str:
    return (
        f"{path.name}: pickled weights (can run code when loaded) are never unpickled; convert to safetensors"
    )


def _locate(path: Path) -> tuple[Path | None, Path | None, str | None]:
    """(adapter_config.json or None, the weights file, None) or (.., .., why there is no adapter here)."""
    if not path.exists():
        return None, None, "no such file or directory"
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
        if (path / PEFT_CONFIG).is_file():
            if (path / PEFT_WEIGHTS).is_file():
                return path / PEFT_CONFIG, path / PEFT_WEIGHTS, None
            return None, None, _pickled(pickled[0]) if pickled else f"has {PEFT_CONFIG} but no {PEFT_WEIGHTS}"
        candidates = [p for p in files if p.suffix == ".safetensors"]
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            return None, None, f"holds several .safetensors files ({names}); name the one to diagnose"
        if candidates:
            return None, candidates[0], None
        if pickled:
            return None, None, _pickled(pickled[0])
        return None, None, f"no adapter here: expected {PEFT_CONFIG} + {PEFT_WEIGHTS}, or a LoRA .safetensors"
    if path.suffix in PICKLE_SUFFIXES:
        return None, None, _pickled(path)
    if path.name == PEFT_CONFIG:
        return _locate(path.parent)
    if path.suffix != ".safetensors":
        return None, None, "not a LoRA adapter: expected a PEFT directory or a .safetensors file"
    config = path.parent / PEFT_CONFIG
    return (config if config.is_file() else None), path, None


def _not_safetensors(path: Path, error: Exception) -> str:
    """Why safetensors cannot open `path`, naming pickles by their first bytes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        head = b""
    if head.startswith(b"PK\x03\x04"):
        return f"{path.name}: a torch.save zip archive (pickled), never unpickled; convert to safetensors"
    if head[:1] == b"\x80":
        return f"{path.name}: a pickle, never unpickled; convert to safetensors"
    return f"{path.name}: not a readable safetensors file ({' '.join(str(error).split())})"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _inspect(path: str) -> AdapterInput:
    """Stage 1: the format, config, shapes and dtypes of an adapter, as findings; nothing is refused."""
    item = AdapterInput(path=path)
    config_path, weights, problem = _locate(Path(path))
    if problem is not None:
        item.add("unreadable", problem)
        return item
    item.weights = weights
    item.size_bytes = weights.stat().st_size + (config_path.stat().st_size if config_path else 0)
    if config_path is not None:
        try:
            item.config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            item.add("unreadable", f"{config_path.name}: invalid JSON ({' '.join(str(error).split())})")
            return item
        if not isinstance(item.config, dict):
            item.add("unreadable", f"{config_path.name}: expected a JSON object")
            return item
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            item.shapes = {key: list(f.get_slice(key).get_shape()) for key in keys}
            dtypes = {key: f.get_slice(key).get_dtype() for key in keys}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as error:
        item.add("unreadable", _not_safetensors(weights, error))
        return item

    families = _group_keys(item)
    if not item.groups or not any({"A", "B"} & set(slots) for slots in item.groups.values()):
        item.add(
            "unreadable", f"{weights.name}: holds no LoRA tensors (lora_A / lora_B, lora_down / lora_up, ...)"
        )
        return item
    _check_structure(item)

    factor_dtypes = sorted(
        {
            _DTYPES.get(dtypes[key], dtypes[key].lower())
            for s in item.groups.values()
            for r, key in s.items()
            if r != "alpha"
        }
    )
    item.dtype = factor_dtypes[0] if len(factor_dtypes) == 1 else "mixed"
    if len(factor_dtypes) > 1:
        item.add("dtype-mixed", f"factors are stored as {', '.join(factor_dtypes)}")

    if item.config is not None:
        item.format = "peft"
        _check_peft_config(item, config_path.name)
    else:
        item.format = (
            "kohya" if "kohya" in families else "peft" if "peft-prefixed" in families else "diffusers"
        )
        item.base = next((metadata[k] for k in _KOHYA_BASE_KEYS if metadata.get(k)), None)
        _check_loose_file(item, metadata)
    return item


def _feature_of(key: str) -> tuple[str, str]:
    """(module, what it is) for a tensor that is not a LoRA factor or alpha."""
    for fragment, feature, _ in TENSOR_FEATURES:
        if fragment in key:
            return key[: key.index(fragment)].rstrip(".").removeprefix(PEFT_PREFIX), feature
    match = LORA_BIAS_KEY.fullmatch(key)
    if match:
        return match["module"].removeprefix(PEFT_PREFIX), "lora bias"
    module, _, last = key.rpartition(".")
    module = module.removeprefix(PEFT_PREFIX).removesuffix(".base_layer")
    if last == "weight":
        return module, "a full weight (a modules_to_save copy or a saved embedding layer)"
    if last == "bias":
        return module, "a trained bias"
    return module, f"a tensor lrtool does not recognise ({last})"


def _parse_key(key: str) -> tuple[str, re.Match | None]:
    """(naming family, match) of a LoRA factor or alpha key; match None for any other tensor."""
    for family, pattern in FACTOR_KEYS:
        match = pattern.fullmatch(key)
        if match:
            return family, match
    return "alpha", ALPHA_KEY.fullmatch(key)


def _group_keys(item: AdapterInput) -> set[str]:
    """Fill item.groups ({module: {role: key}}) from the keys; report every other tensor; return families."""
    families: set[str] = set()
    adapter_names: set[str] = set()
    features: dict[tuple[str, str], list[str]] = {}
    for key in sorted(item.shapes):
        family, match = _parse_key(key)
        if match is None:
            features.setdefault(_feature_of(key), []).append(key)
            continue
        fields = match.groupdict()
        role = FACTOR_ROLES.get(fields.get("role"), "alpha")
        if fields.get("adapter"):
            adapter_names.add(fields["adapter"])
        if key.startswith(PEFT_PREFIX):
            families.add("peft-prefixed")
        families.add(family)
        module = fields["module"].removeprefix(PEFT_PREFIX)
        slots = item.groups.setdefault(module, {})
        if role in slots:
            item.add("malformed", f"'{slots[role]}' and '{key}' both hold {role}", module)
            slots[role + "-duplicate"] = key
            continue
        slots[role] = key
    for (module, feature), keys in sorted(features.items()):
        item.add("unsupported-feature", f"{feature}: {', '.join(keys)}", module or None)
    if len(adapter_names) > 1:
        item.add("unsupported-feature", f"holds several adapters ({', '.join(sorted(adapter_names))})")
    return families


def _check_structure(item: AdapterInput) -> None:
    """Findings about each module's factors; the modules that pass are item.well_formed."""
    for module, slots in item.groups.items():
        if any(role.endswith("-duplicate") for role in slots):
            continue
        shapes = {role: item.shapes[key] for role, key in slots.items()}
        if "A" not in slots and "B" not in slots:
            item.add("malformed", f"'{slots['alpha']}' is an alpha for a module without LoRA factors", module)
            continue
        if "A" not in slots or "B" not in slots:
            have, missing = ("A", "B") if "A" in slots else ("B", "A")
            item.add("malformed", f"has {have} ({slots[have]}) but no {missing} factor", module)
            continue
        if len(shapes["A"]) == 4 or len(shapes["B"]) == 4:
            item.add("unsupported-feature", f"conv LoRA: A is {shapes['A']}, B is {shapes['B']}", module)
            continue
        if len(shapes["A"]) != 2 or len(shapes["B"]) != 2:
            item.add("malformed", f"A is {shapes['A']} and B is {shapes['B']}; LoRA factors are 2-D", module)
            continue
        if "alpha" in slots and math.prod(shapes["alpha"]) != 1:
            item.add("malformed", f"alpha has shape {shapes['alpha']}; an alpha is a scalar", module)
            continue
        if shapes["A"][0] == 0:
            item.add("malformed", "rank 0", module)
            continue
        if 0 in shapes["A"] or 0 in shapes["B"]:
            item.add(
                "malformed",
                f"A is {shapes['A']} and B is {shapes['B']}: a factor with a zero dimension",
                module,
            )
            continue
        if shapes["A"][0] != shapes["B"][1]:
            item.add(
                "shape-mismatch",
                f"A is {shapes['A']} (r={shapes['A'][0]}) but B is {shapes['B']} (r={shapes['B'][1]}); "
                "expected A [r, in] and B [out, r]",
                module,
            )
            continue
        item.well_formed.add(module)


def _targeted(module: str, targets) -> bool:
    """Whether peft's target_modules selects `module` (a regex string: full match; a list: name suffixes)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _check_peft_config(item: AdapterInput, name: str) -> None:
    """Config findings of a PEFT adapter: features beyond LoRA, and r, alpha, target_modules vs tensors."""
    config = item.config
    item.base = config.get("base_model_name_or_path") or None
    item.rslora = bool(config.get("use_rslora", False))
    peft_type = config.get("peft_type")
    if peft_type is None:
        item.add("config-mismatch", f"{name} has no peft_type; read as LORA", severity="warning")
    elif peft_type != "LORA":
        item.add("unsupported-feature", f"{name}: peft_type {peft_type} (LORA only)")
    seen = {f["message"].split(":")[0] for f in item.findings if f["code"] == "unsupported-feature"}
    bias = config.get("bias", "none")
    features = [(f, feature) for f, feature in _CONFIG_FEATURES if config.get(f)]
    features += [("bias", "lora bias")] if bias not in ("none", None) else []
    for field_name, feature in features:
        if feature not in seen:  # the tensors' findings already name it, per module
            item.add("unsupported-feature", f"{feature}: {name} sets {field_name}={config[field_name]!r}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        item.add(
            "unsupported-feature", f"init_lora_weights={init!r} rewrites the base weights: no delta on it"
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
            problems.append(f"{pattern_name} must be an object")
            continue
        for key, value in pattern.items():
            if not _number(value):
                problems.append(f"{pattern_name}[{key!r}] must be a number")
            try:
                re.compile(key)
            except re.error:
                problems.append(f"{pattern_name} key {key!r} is not a regex")
    if problems:
        item.add("unreadable", f"{name}: {'; '.join(problems)}")
        return
    item.alpha = lora_alpha
    if not all(math.isfinite(v) for v in (lora_alpha, *alpha_pattern.values())):
        item.add("non-finite", f"{name}: lora_alpha or alpha_pattern holds a NaN or infinity")
    for module in sorted(item.groups):
        slots = item.groups[module]
        if "A" in slots and len(item.shapes[slots["A"]]) == 2:
            rank, expected = (
                item.shapes[slots["A"]][0],
                rank_pattern.get(pattern_key(rank_pattern, module), r),
            )
            if rank != expected:
                item.add("config-mismatch", f"rank {rank} but {name} says r={expected}", module, "error")
        if "alpha" in slots:
            item.add(
                "config-mismatch",
                f"an alpha tensor ({slots['alpha']}) beside {name}, which sets alpha (peft ignores tensors)",
                module,
                "warning",
            )
    _check_targets(item, name)


def _check_targets(item: AdapterInput, name: str) -> None:
    """config-mismatch warnings: a module target_modules does not select, a target no tensor adapts."""
    targets = item.config.get("target_modules")
    if isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
        targets = None
    if targets in (None, "all-linear") or not isinstance(targets, (str, list)):
        return
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as error:
            item.add("config-mismatch", f"{name}'s target_modules is no regex ({error})", severity="warning")
            return
    factor_modules = sorted(m for m, slots in item.groups.items() if "A" in slots or "B" in slots)
    for module in factor_modules:
        if not _targeted(module, targets):
            item.add("config-mismatch", f"not selected by {name}'s target_modules", module, "warning")
    every_module = set(factor_modules) | {f["module"] for f in item.findings if f["module"]}
    for target in [targets] if isinstance(targets, str) else targets:
        if not any(
            _targeted(module, [target] if isinstance(targets, list) else target) for module in every_module
        ):
            message = f"{name}'s target_modules names {target!r}, which no tensor adapts"
            item.add("config-mismatch", message, severity="warning")


def _check_loose_file(item: AdapterInput, metadata: dict) -> None:
    """Config findings of a kohya / diffusers file: PEFT keys without a config, ss_network_dim / _alpha."""
    item.rslora = False
    if item.format == "peft":
        item.rslora = None
        item.add(
            "config-mismatch",
            f"PEFT keys but no {PEFT_CONFIG} beside the file: lora_alpha / r unknown, scale 1 assumed",
            severity="warning",
        )
    dim, alpha = _metadata_number(metadata, "ss_network_dim"), _metadata_number(metadata, "ss_network_alpha")
    for module in sorted(item.well_formed):
        rank = item.shapes[item.groups[module]["A"]][0]
        if dim is not None and rank != dim:
            item.add(
                "config-mismatch", f"rank {rank} but the file's ss_network_dim says {dim:g}", module, "error"
            )
    alphas = _alpha_values(item)
    if alpha is not None:
        for module, value in sorted(alphas.items()):
            if not math.isclose(value, alpha, rel_tol=1e-3):
                item.add(
                    "config-mismatch",
                    f"alpha tensor {value:g} but the file's ss_network_alpha says {alpha:g}",
                    module,
                    "warning",
                )
    values = set(alphas.values())
    if len(values) == 1 and len(alphas) == len(item.well_formed):
        item.alpha = values.pop()


def _metadata_number(metadata: dict, key: str) -> float | None:
    try:
        value = float(metadata.get(key, ""))
    except ValueError:  # absent, or kohya's "Dynamic" after a rank resize
        return None
    return value if math.isfinite(value) else None


def _alpha_values(item: AdapterInput) -> dict[str, float]:
    """{module: its alpha tensor's value} of the well-formed modules that have one."""
    keys = {m: item.groups[m]["alpha"] for m in item.well_formed if "alpha" in item.groups[m]}
    if not keys:
        return {}
    with safe_open(str(item.weights), framework="pt") as f:
        return {m: float(f.get_tensor(key).double().item()) for m, key in keys.items()}


# ---------------------------------------------------------------------------------------------------------
# Stage 2: the LoRA modules the figures cover


def _load(item: AdapterInput) -> None:
    """Fill item.lora with the finite, well-formed modules: load_adapter's when it accepts the file."""
    try:
        adapter = load_adapter(item.path)
    except (LrtoolError, OSError, ValueError, RuntimeError) as error:
        item.refused = one_line(error)
        if not any(f["severity"] in ("error", "warning") for f in item.findings):
            # Stage 1 missed what the loader refuses: report it rather than pass the file as clean.
            code = "unsupported-feature" if isinstance(error, UnsupportedFeatureError) else "malformed"
            item.add(code, item.refused)
        adapter = None
    else:
        try:  # integer or non-finite factors: merge and eval refuse them; the findings below say where
            check_computable(adapter)
        except LrtoolError as error:
            item.refused = one_line(error)
    if item.unreadable:
        return
    if adapter is not None:
        modules = {name: m for name, m in adapter.modules.items() if name in item.well_formed}
    else:
        modules = _build_raw(item)
    for name, module in modules.items():
        integer = sorted({_dtype_name(t) for t in (module.A, module.B) if not t.is_floating_point()})
        if integer:
            message = f"integer (quantised?) factors ({', '.join(integer)}): left out of the figures"
            item.add("unsupported-feature", message, name)
            continue
        module = LoraModule(A=_computable(module.A), B=_computable(module.B), scale=module.scale)
        problem = _non_finite(module)
        if problem:
            item.add("non-finite", problem, name)
        else:
            item.lora[name] = module


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _computable(tensor: torch.Tensor) -> torch.Tensor:
    """A floating-point tensor in a dtype torch computes with: float8 (which has no isfinite, norm or
    matmul on the CPU) as float64, others as they are."""
    return tensor.to(torch.float64) if tensor.dtype.itemsize < 2 else tensor


def _build_raw(item: AdapterInput) -> dict[str, LoraModule]:
    """The well-formed modules of a file load_adapter refuses, scaled as it would scale them."""
    config = item.config or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules = {}
    with safe_open(str(item.weights), framework="pt") as f:
        for name in sorted(item.well_formed):
            slots = item.groups[name]
            A, B = f.get_tensor(slots["A"]), f.get_tensor(slots["B"])
            rank = A.shape[0]
            if item.config is not None:  # peft: lora_alpha / r (or / sqrt(r): rsLoRA), patterns resolved
                alpha = alpha_pattern.get(pattern_key(alpha_pattern, name), config.get("lora_alpha", 8))
                scale = alpha / math.sqrt(rank) if item.rslora else alpha / rank
            else:  # kohya and diffusers: alpha / r, scale 1 without an alpha
                scale = (
                    float(f.get_tensor(slots["alpha"]).double().item()) / rank if "alpha" in slots else 1.0
                )
            modules[name] = LoraModule(A=A, B=B, scale=scale)
    return modules


def _non_finite(module: LoraModule) -> str | None:
    """What is not finite in a module (its factors, its scale), or None."""
    bad = [
        f"{role} holds {int((~torch.isfinite(t)).sum())} NaN or infinite values"
        for role, t in (("A", module.A), ("B", module.B))
        if not torch.isfinite(t).all()
    ]
    if not math.isfinite(module.scale):
        bad.append(f"the scale is {module.scale}")
    return "; ".join(bad) or None
