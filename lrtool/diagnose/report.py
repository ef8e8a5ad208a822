"""The report of `lrtool diagnose`: read every input, compute every module's figures and every pair's,
module by module (so that only one module's SVDs are held at a time), and gather them with the findings
into plain JSON-ready data, floats rounded to PRECISION significant digits.
"""

from __future__ import annotations

import logging
import math

import torch

from lrtool import io
from lrtool.adapters import same_base
from lrtool.diagnose.base_check import BaseWeights, check_base, rename_modules
from lrtool.diagnose.figures import (
    AGREEING_COSINE,
    EXACT_SIGN_ENTRIES,
    LOSSY_FACTOR_AVG,
    OPPOSED_COSINE,
    SHARED_SUBSPACE,
    PairFigures,
    is_zero_update,
    spectral_figures,
    spectrum,
    verdict,
    wilson_interval,
)
from lrtool.diagnose.findings import (
    LARGE_UPDATE,
    RANK_COLLAPSE_FRACTION,
    SEVERITIES,
    ZERO_UPDATE_TOLERANCE,
)
from lrtool.diagnose.reading import AdapterInput, read_adapter
from lrtool.diagnose.render import pair_order
from lrtool.errors import InputError, one_line

log = logging.getLogger(__name__)

PRECISION = 6  # significant digits of every float in the report
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def diagnose(paths: list[str], base: str | None = None, exact_sign_conflicts: bool = False) -> dict:
    """The diagnosis of each adapter in `paths` and of each pair of them, as the JSON-ready report.

    A pair of more than figures.EXACT_SIGN_ENTRIES common dense entries gets an estimated sign-conflict rate
    (labelled, with its 95% interval) unless `exact_sign_conflicts`. An unreadable adapter is a finding, not
    an error. Raises InputError only when diagnose cannot run:
    no paths, or a `base` that is not a readable model directory. `pairs` come in the order (1, 2), (1, 3),
    ..., (2, 3), ... of the inputs.
    """
    if not paths:
        raise InputError("no adapters to diagnose")
    base_weights = BaseWeights.read(base) if base is not None else None
    inputs = []
    for path in paths:
        item = read_adapter(path)
        inputs.append(item)
        log.debug("%s: %s, %d modules, %d findings", path, item.format, len(item.groups), len(item.findings))
    if base_weights is not None:
        reference = set(base_weights.shapes)
    else:  # only to pair kohya names with other inputs' dotted paths
        reference = {name for item in inputs for name in item.groups if "." in name}
    for item in inputs:
        rename_modules(item, reference, base_weights)
        if base_weights is not None and not item.unreadable:
            check_base(item, base_weights)
        item.modules = {
            name: _module_entry(item, name) for name in item.groups if {"A", "B"} & set(item.groups[name])
        }

    pairs = [PairFigures(i, j) for i, j in pair_order(len(inputs))]
    if not exact_sign_conflicts:
        for pair in pairs:
            entries = _common_entries(inputs[pair.a], inputs[pair.b])
            pair.sign_entries = entries if entries > EXACT_SIGN_ENTRIES else None
    for name in sorted(set().union(*(item.lora for item in inputs))):
        spectra = {}
        for i, item in enumerate(inputs):
            if name in item.lora:
                try:
                    found = spectrum(item.lora[name])
                except (ArithmeticError, ValueError, RuntimeError) as error:  # this adapter's problem only
                    item.add("malformed", f"its spectrum cannot be computed ({one_line(error)})", name)
                    del item.lora[name]
                    continue
                top = float(found[1][0]) if len(found[1]) else 0.0
                if top > FLOAT32_MAX:
                    item.add(
                        "overflow",
                        f"the update reaches {top:.3g} (scale {item.lora[name].scale:.3g}), beyond float32's "
                        f"range ({FLOAT32_MAX:.3g}): in float32 or bfloat16 it is infinite",
                        name,
                    )
                    del item.lora[name]
                    continue
                spectra[i] = found
                _add_figures(item, name, spectra[i][1], base_weights)
        for pair in pairs:
            if pair.a in spectra and pair.b in spectra:
                a, b = inputs[pair.a], inputs[pair.b]
                pair.add(name, a.lora[name], b.lora[name], spectra[pair.a], spectra[pair.b])

    for item in inputs:
        overflowing = next((f for f in item.findings if f["code"] == "overflow"), None)
        if overflowing is not None and item.refused is None:  # merge and eval refuse such an update
            item.refused = f"module '{overflowing['module']}' overflows float32: {overflowing['message']}"
    report = {
        "adapters": [_adapter_entry(item) for item in inputs],
        "base": base,
        "pairs": [_pair_entry(pair, inputs) for pair in pairs],
        "thresholds": {
            "large_update": LARGE_UPDATE,
            "rank_collapse_fraction": RANK_COLLAPSE_FRACTION,
            "zero_update_tolerance": ZERO_UPDATE_TOLERANCE,
            "verdict": {  # figures.verdict: [moderate, high]
                "opposed_cosine": list(OPPOSED_COSINE),
                "shared_subspace": list(SHARED_SUBSPACE),
                "agreeing_cosine": AGREEING_COSINE,
                "lossy_factor_avg": LOSSY_FACTOR_AVG,
            },
        },
    }
    report["counts"] = {
        s: sum(f["severity"] == s for a in report["adapters"] for f in a["findings"]) for s in SEVERITIES
    }
    return _rounded(report)


def _module_entry(item: AdapterInput, name: str) -> dict:
    """A module's entry as its shapes give it; the figures are filled in by _add_figures."""
    module = item.lora.get(name)
    shapes = item.factor_shapes.get(name)
    if shapes is not None:  # [out, in], or a conv weight's [out, in, *kernel]
        kernel = item.kernels.get(name, ())
        inputs = shapes["A"][1] // math.prod(kernel) if kernel else shapes["A"][1]
        shape = [shapes["B"][0], inputs, *kernel]
    else:
        shape = None
    return {
        "name": name,
        "shape": shape,
        "rank": item.rank(name),
        "scale": module.scale if module is not None else None,
        "norm": None,
        "singular_values": None,
        "effective_rank": None,
        "stable_rank": None,
        "top_energy": None,
        "relative_norm": None,
    }


def _add_figures(item: AdapterInput, name: str, S: torch.Tensor, base: BaseWeights | None) -> None:
    """Fill a module's figures from its spectrum `S`; add its zero-update, rank-collapse and large-update
    findings."""
    module, entry = item.lora[name], item.modules[name]
    entry.update(spectral_figures(S), singular_values=S.tolist())
    misfits = {(f["code"], f["module"]) for f in item.findings} & {
        ("missing-in-base", name),
        ("base-shape-mismatch", name),
    }
    if base is not None and not misfits and base.norm(name):
        entry["relative_norm"] = entry["norm"] / base.norm(name)
    if is_zero_update(module, entry["norm"]):
        cause = (
            "B is all zeros (untrained?)" if not module.B.any() else "the factors cancel or the scale is 0"
        )
        item.add("zero-update", f"dW is zero: {cause}", name)
        return
    if entry["effective_rank"] < RANK_COLLAPSE_FRACTION * module.rank:
        rank = f"effective rank {entry['effective_rank']:.2f} of r={module.rank}"
        item.add("rank-collapse", f"{rank} (below {RANK_COLLAPSE_FRACTION:g} x r)", name)
    if entry["relative_norm"] is not None and entry["relative_norm"] > LARGE_UPDATE:
        ratio = f"||dW|| / ||W|| = {entry['relative_norm']:.3g}"
        item.add("large-update", f"{ratio} (above {LARGE_UPDATE:g})", name)


def _adapter_entry(item: AdapterInput) -> dict:
    """An adapter's entry: what it is, its modules by name, its findings worst first."""
    order = {s: n for n, s in enumerate(SEVERITIES)}
    findings = sorted(
        item.findings, key=lambda f: (order[f["severity"]], f["module"] or "", f["code"], f["message"])
    )
    modules = [item.modules[name] for name in sorted(item.modules)]
    norms = [m["norm"] for m in modules if m["norm"] is not None]
    return {
        "path": item.path,
        "format": item.format,
        "base": item.base,
        "rank": max((m["rank"] for m in modules if m["rank"] is not None), default=None),
        "alpha": item.alpha,
        "rslora": item.rslora,
        "scale_source": item.scale_source,
        "scale_detail": item.scale_detail,
        "dtype": item.dtype,
        "size_bytes": item.size_bytes,
        "norm": math.sqrt(sum(n * n for n in norms)) if norms else None,
        "refused": item.refused,
        "modules": modules,
        "findings": findings,
    }


def _common_entries(a: AdapterInput, b: AdapterInput) -> int:
    """The dense entries of the modules two adapters share (equal shapes)."""
    total = 0
    for name in set(a.lora) & set(b.lora):
        shape = (a.lora[name].out_features, a.lora[name].in_features)
        if shape == (b.lora[name].out_features, b.lora[name].in_features):
            total += shape[0] * shape[1]
    return total


def _pair_entry(pair: PairFigures, inputs: list[AdapterInput]) -> dict:
    """A pair's entry: whole-update figures, per-module figures, and the verdict."""
    a, b = inputs[pair.a], inputs[pair.b]
    energy_a = sum(a.modules[n]["norm"] ** 2 for n in a.lora)
    energy_b = sum(b.modules[n]["norm"] ** 2 for n in b.lora)
    # The cosine of the whole updates: every module's dW concatenated, a module one adapter lacks as zero.
    cosine = pair.inner / math.sqrt(energy_a * energy_b) if energy_a > 0 and energy_b > 0 else None
    column = sum(pair.column_overlaps) / len(pair.column_overlaps) if pair.column_overlaps else None
    row = sum(pair.row_overlaps) / len(pair.row_overlaps) if pair.row_overlaps else None
    factor_avg_error = (
        math.sqrt(pair.factor_avg_error_sq / pair.factor_avg_reference_sq)
        if pair.factor_avg_reference_sq > 0
        else None
    )
    unusable = [item.path for item in (a, b) if not item.lora]
    # As merge decides: declared bases that differ (once local paths are resolved) make a pair merge refuses.
    base_mismatch = bool(a.base and b.base and not same_base(a.base, b.base))
    if unusable:
        text = f"unknown: no usable modules in {', '.join(unusable)}"
    elif base_mismatch:
        text = (
            f"incompatible: declared for different bases ('{a.base}', '{b.base}'); merge refuses them unless "
            "--allow-base-mismatch"
        )
    elif pair.shape_conflicts:
        text = f"incompatible: {len(pair.shape_conflicts)} common modules differ in shape (different bases?)"
    elif not pair.modules:
        text = "low: no module in common (the updates touch different layers)"
    else:
        overlaps = [x for x in (column, row) if x is not None]
        text = verdict(cosine, max(overlaps) if overlaps else None, factor_avg_error)
    return {
        "a": a.path,
        "b": b.path,
        "cosine": cosine,
        "column_overlap": column,
        "row_overlap": row,
        "sign_conflict": pair.conflicts / pair.both_nonzero if pair.both_nonzero else None,
        "sign_conflict_estimate": (
            None
            if pair.sign_entries is None
            else {
                "sampled_entries": pair.sign_sampled,
                "of_entries": pair.sign_entries,
                "ci95": list(wilson_interval(pair.conflicts, pair.both_nonzero)),
            }
        ),
        "factor_avg_error": factor_avg_error,
        "base_mismatch": base_mismatch,
        "verdict": text,
        "common_modules": len(pair.modules),
        "only_in_a": len(set(a.lora) - set(b.lora)),
        "only_in_b": len(set(b.lora) - set(a.lora)),
        "shape_conflicts": pair.shape_conflicts,
        "modules": pair.modules,
    }


def _rounded(value):
    """`value` with every float rounded to PRECISION significant digits (non-finite ones as null)."""
    return io.rounded(value, PRECISION)
