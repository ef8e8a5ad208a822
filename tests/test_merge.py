"""Merge methods compute their definitions exactly: each is checked against an independent dense float64
computation (numpy, written here) on adapters with mixed ranks, alphas, rsLoRA, rank_pattern and target
modules; linear and svd also against peft's add_weighted_adapter; properties hold for random adapters."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import make_adapter_dirs, peft_layers, tiny_llama
from lrtool.adapters import Adapter, LoraModule, load_adapter
from lrtool.errors import IncompatibleError, InputError, UnsupportedFeatureError, UsageError
from lrtool.merge import REGISTRY, describe_methods, get
from lrtool.merge.base import parse_weights
from lrtool.merge.plan import plan_merge
from lrtool.merge.receipt import rounded
from lrtool.merge.sparsify import DROP_NOTE

torch.set_num_threads(1)

WEIGHTS = (0.7, 0.4, -0.5)
FULL = 64  # a rank at least every module's min(out, in): dense results are stored exactly
PROPERTY = settings(max_examples=20, deadline=None)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict:
    return make_adapter_dirs(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def loaded(adapter_dirs) -> dict:
    return {name: load_adapter(path) for name, path in adapter_dirs.items()}


# ---------------------------------------------------------------------------------------------------------
# The definitions, written again with numpy on dense float64 updates


def dense_updates(adapters, name):
    """dW_i = scale_i B_i A_i of every adapter for module `name` (zeros where it lacks it)."""
    shape = next(a.modules[name].delta().shape for a in adapters if name in a.modules)
    return [a.modules[name].delta().numpy() if name in a.modules else np.zeros(shape) for a in adapters]


def ref_keep_largest(delta, density):
    flat = delta.ravel()
    k = int(density * flat.size)
    kept = np.zeros_like(flat)
    order = np.argsort(-np.abs(flat), kind="stable")[:k]
    kept[order] = flat[order]
    return kept.reshape(delta.shape)


def ref_ties_mean(tensors, weights):
    """mergekit's sign election and disjoint mean, one entry at a time."""
    result = np.zeros_like(tensors[0])
    for index in np.ndindex(result.shape):
        values = [w * t[index] for w, t in zip(weights, tensors)]
        elected = 1 if sum(values) >= 0 else -1
        agreeing = [i for i, v in enumerate(values) if v != 0 and np.sign(v) == elected]
        divisor = sum(weights[i] for i in agreeing)
        result[index] = sum(values[i] for i in agreeing) / (divisor if divisor != 0 else 1)
    return result


def ref_lowbias32(x):
    """Wellons' lowbias32 on numpy uint32 words (multiplication wraps modulo 2^32)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def ref_drop(delta, density, seed, module, index):
    """DARE's keep mask as dare_linear.py documents it: the key is the start of a sha256 digest, an entry at
    row-major position p (< 2^32 here) is kept where lowbias32(lowbias32(p ^ k0) ^ k1) < round(D * 2^32)."""
    digest = hashlib.sha256(f"lrtool-dare\0{seed}\0{module}\0{index}".encode()).digest()
    k0, k1 = (np.uint32(int.from_bytes(digest[i : i + 4], "little")) for i in (0, 4))
    positions = np.arange(delta.size, dtype=np.uint32)
    with np.errstate(over="ignore"):
        words = ref_lowbias32(ref_lowbias32(positions ^ k0) ^ k1)
    keep = (words.astype(np.uint64) < round(density * 2**32)).reshape(delta.shape)
    return np.where(keep, delta / density, 0.0)


def ref_best_rank(matrix, k):
    U, S, Vh = np.linalg.svd(matrix, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def ref_keep_middle(delta, density, gamma):
    """Model Breadcrumbs' mask as mergekit's magnitude_outliers has it: drop the int(gamma n) largest, keep
    the next int(D n) (fewer dropped from the top when they do not fit); earlier ones first among equals."""
    if density >= 1:
        return delta
    flat = delta.ravel()
    kept, top = int(density * flat.size), int(gamma * flat.size)
    top = min(top, flat.size - kept)
    order = np.argsort(-np.abs(flat), kind="stable")[top : top + kept]
    result = np.zeros_like(flat)
    result[order] = flat[order]
    return result.reshape(delta.shape)


def ref_ties_sum(tensors, weights):
    """mergekit's consensus "sum" without normalising: the weighted values agreeing with the elected sign."""
    weighted = np.stack([w * t for w, t in zip(weights, tensors)])
    elected = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
    return np.where(np.sign(weighted) == elected, weighted, 0.0).sum(axis=0)


def ref_della_drop(delta, density, epsilon, seed, module, index):
    """mergekit's della_magprune on one update: per row, probabilities from D - e (smallest) to D + e
    (largest) by magnitude rank; drawn as lrtool's counter-based bits with DELLA's key; the l1 rescale."""
    if density >= 1:
        return delta
    ranks = np.argsort(np.argsort(np.abs(delta), axis=1, kind="stable"), axis=1)  # 0 = smallest
    probabilities = (density - epsilon) + (ranks / (delta.shape[1] - 1)) * (2 * epsilon)
    digest = hashlib.sha256(f"lrtool-della\0{seed}\0{module}\0{index}".encode()).digest()
    k0, k1 = (np.uint32(int.from_bytes(digest[i : i + 4], "little")) for i in (0, 4))
    positions = np.arange(delta.size, dtype=np.uint32)
    with np.errstate(over="ignore"):
        words = ref_lowbias32(ref_lowbias32(positions ^ k0) ^ k1).astype(np.int64).reshape(delta.shape)
    kept = np.where(words < np.round(probabilities * 2.0**32).astype(np.int64), delta, 0.0)
    before, after = np.abs(delta).sum(), np.abs(kept).sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def ref_sce(deltas, weights, density):
    """mergekit's sce (select by variance, weight by mean square, erase by sign), --weights scaling each
    adapter's weight; the election on the w-weighted sum."""
    values = np.stack(deltas)
    if density < 1:
        variance = values.var(axis=0).ravel()
        k = int(np.count_nonzero(variance) * density)
        mask = np.zeros(variance.size)
        mask[np.argsort(-variance, kind="stable")[:k]] = 1
        values = values * mask.reshape(values.shape[1:])
    w = np.asarray(weights)[:, None, None]
    omega = (values**2).mean(axis=(1, 2))[:, None, None] * w
    agrees = np.sign(values * w) == np.where((values * w).sum(axis=0) >= 0, 1.0, -1.0)
    divisor = np.where(agrees, omega, 0.0).sum(axis=0)
    total = np.where(agrees, values * omega, 0.0).sum(axis=0)
    return total / np.where(divisor == 0, 1.0, divisor)


def ref_slerp(v0, v1, t):
    """mergekit's slerp, on float64 dense updates."""
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    dot = np.sum((v0 / n0 if n0 > 1e-8 else v0) * (v1 / n1 if n1 > 1e-8 else v1))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(dot)
    return (np.sin(theta - theta * t) * v0 + np.sin(theta * t) * v1) / np.sin(theta)


def ref_karcher(deltas, weights, max_iter=10, tol=1e-5):
    """mergekit's karcher_merge_tensors on dense float64 updates, alphas |w_i|, u_i negated where w_i < 0."""
    norms = [np.linalg.norm(d) for d in deltas]
    valid = [i for i, n in enumerate(norms) if n > tol]
    alphas = [abs(weights[i]) / sum(abs(weights[j]) for j in valid) for i in valid]
    units = [np.sign(weights[i]) * deltas[i] / norms[i] for i in valid]
    u = sum(a * x for a, x in zip(alphas, units))
    u = units[0] if np.linalg.norm(u) < tol else u / np.linalg.norm(u)
    for _ in range(max_iter):
        step = np.zeros_like(u)
        for a, x in zip(alphas, units):
            dot = np.clip(np.sum(u * x), -1.0, 1.0)
            theta = np.arccos(dot)
            if theta >= tol:
                step += a * (theta / np.sin(theta)) * (x - dot * u)
        length = np.linalg.norm(step)
        if length < tol:
            break
        u = np.cos(length) * u + np.sin(length) * step / length
        if np.linalg.norm(u) > tol:
            u = u / np.linalg.norm(u)
    return sum(abs(w) * n for w, n in zip(weights, norms)) * u


def ref_rank(S, shape, scale=None):
    return int((S > (S[0] if scale is None else scale) * max(shape) * np.finfo(float).eps).sum())


def ref_polar(X):
    P, _, Qh = np.linalg.svd(X, full_matrices=False)
    return P @ Qh


def ref_tsv(deltas, weights, present, k=None):
    """TSV-Merge on dense updates: each task's top k singular triplets (at most its numerical rank),
    concatenated, U and V orthogonalised by their polar factors, recombined with the weighted values."""
    k = k or min(deltas[0].shape) // len(present)
    Us, Ss, Vhs = [], [], []
    for i in present:
        U, S, Vh = np.linalg.svd(deltas[i], full_matrices=False)
        j = min(k, ref_rank(S, deltas[i].shape))
        Us.append(U[:, :j]), Ss.append(weights[i] * S[:j]), Vhs.append(Vh[:j])
    U, Vh = ref_polar(np.concatenate(Us, axis=1)), ref_polar(np.concatenate(Vhs, axis=0))
    return (U * np.concatenate(Ss)) @ Vh


def ref_iso_c(summed):
    U, S, Vh = np.linalg.svd(summed, full_matrices=False)
    k = ref_rank(S, summed.shape)
    return S[:k].mean() * U[:, :k] @ Vh[:k]


def ref_iso_cts(deltas, weights, present):
    """Iso-CTS on dense updates, the subspaces sized by the weighted sum's numerical rank k."""
    summed = sum(w * d for w, d in zip(weights, deltas))
    U, S, Vh = np.linalg.svd(summed, full_matrices=False)
    k = ref_rank(S, summed.shape)
    common = k - round((k - int(0.8 * k)) / len(present)) * len(present)
    per_task = (k - common) // len(present)
    Us, Ss, Vhs = [], [], []
    for i in present:
        weighted = weights[i] * deltas[i]
        Ut, St, Vht = np.linalg.svd(
            weighted - U[:, :common] @ (U[:, :common].T @ weighted), full_matrices=False
        )
        j = min(per_task, ref_rank(St, summed.shape, scale=np.linalg.norm(weighted)))
        Us.append(Ut[:, :j]), Ss.append(St[:j]), Vhs.append(Vht[:j])
    Us.append(U[:, :common]), Ss.append(S[:common]), Vhs.append(Vh[:common])
    values = np.concatenate(Ss)
    return values.mean() * ref_polar(np.concatenate(Us, axis=1)) @ ref_polar(np.concatenate(Vhs, axis=0))


def ref_core_space(adapters, name, weights, density):
    """TIES in the core space: bases from the SVDs of the stacked B's and A's (as stored), cores
    U_B^T dW_i V_A, TIES on the cores, mapped back."""
    modules = [a.modules.get(name) for a in adapters]
    Bs = [m.B.double().numpy() for m in modules if m is not None]
    As = [m.A.double().numpy() for m in modules if m is not None]
    U_B, S_B, _ = np.linalg.svd(np.concatenate(Bs, axis=1), full_matrices=False)
    _, S_A, Vh_A = np.linalg.svd(np.concatenate(As, axis=0), full_matrices=False)
    U_B = U_B[:, : ref_rank(S_B, U_B.shape)]
    Vh_A = Vh_A[: ref_rank(S_A, (len(S_A), Vh_A.shape[1]))]
    cores = [
        np.zeros((U_B.shape[1], Vh_A.shape[0])) if m is None else U_B.T @ m.delta().numpy() @ Vh_A.T
        for m in modules
    ]
    return U_B @ ref_ties_mean([ref_keep_largest(c, density) for c in cores], weights) @ Vh_A


def reference(method, adapters, name, weights, params):
    deltas = dense_updates(adapters, name)
    density = params.get("density", 0.5)
    if method == "linear":
        return sum(w * d for w, d in zip(weights, deltas))
    if method == "svd":
        return ref_best_rank(sum(w * d for w, d in zip(weights, deltas)), params["rank"])
    if method == "factor-avg":
        present = [a.modules[name] for a in adapters if name in a.modules]
        A = sum(
            w * a.modules[name].A.double().numpy() for w, a in zip(weights, adapters) if name in a.modules
        )
        B = sum(
            w * a.modules[name].scale * a.modules[name].B.double().numpy()
            for w, a in zip(weights, adapters)
            if name in a.modules
        )
        assert len({m.rank for m in present}) == 1
        return B @ A
    if method == "ties":
        return ref_ties_mean([ref_keep_largest(d, density) for d in deltas], weights)
    if method == "magnitude-prune":
        return sum(w * ref_keep_largest(d, density) for w, d in zip(weights, deltas))
    if method in ("dare-linear", "dare-ties"):
        dropped = [ref_drop(d, density, params["seed"], name, i) for i, d in enumerate(deltas)]
        if method == "dare-linear":
            return sum(w * d for w, d in zip(weights, dropped))
        return ref_ties_mean(dropped, weights)
    if method == "task-arithmetic":
        return sum(w * d for w, d in zip(weights, deltas))
    if method in ("della", "della-linear"):
        epsilon, scale, seed = params.get("epsilon", 0.15), params.get("lambda_", 1.0), params.get("seed", 0)
        dropped = [ref_della_drop(d, density, epsilon, seed, name, i) for i, d in enumerate(deltas)]
        if method == "della":
            return scale * ref_ties_mean(dropped, weights)
        return scale * sum(w * d for w, d in zip(weights, dropped))
    if method in ("breadcrumbs", "breadcrumbs-ties"):
        kept = [ref_keep_middle(d, density, params.get("gamma", 0.01)) for d in deltas]
        if method == "breadcrumbs":
            return sum(w * d for w, d in zip(weights, kept))
        return ref_ties_sum(kept, weights)
    if method == "sce":
        return ref_sce(deltas, weights, density)
    if method == "slerp":
        return ref_slerp(deltas[0], deltas[1], params.get("t", 0.5))
    if method == "karcher":
        present = [i for i, a in enumerate(adapters) if name in a.modules]
        return ref_karcher([deltas[i] for i in present], [weights[i] for i in present])
    present = [i for i, a in enumerate(adapters) if name in a.modules]
    if method == "tsv":
        return ref_tsv(deltas, weights, present, params.get("rank"))
    if method == "iso-c":
        return ref_iso_c(sum(w * d for w, d in zip(weights, deltas)))
    if method == "iso-cts":
        return ref_iso_cts(deltas, weights, present)
    if method == "core-space":
        return ref_core_space(adapters, name, weights, density)
    if method == "knots":
        concatenated = np.concatenate(deltas, axis=1)
        U, S, Vh = np.linalg.svd(concatenated, full_matrices=False)
        k = int((S > S.max() * max(concatenated.shape) * np.finfo(float).eps).sum())
        # V_i^T = diag(S)^-1 U^T dW_i: exactly zero for an adapter lacking the module (the SVD's own blocks
        # of V^T hold rounding noise there, which TIES' divisor would count as entries)
        coordinates = [(U[:, :k].T @ d) / S[:k, None] for d in deltas]
        merged = ref_ties_mean([ref_keep_largest(v, density) for v in coordinates], weights)
        return (U[:, :k] * S[:k]) @ merged
    raise AssertionError(f"no reference for {method}")


# One row per registered method: (method, adapters, parameters). A new method needs a row here.
ROWS = [
    ("linear", ("a1", "a2", "a3"), {}),
    ("svd", ("a1", "a2", "a3"), {"rank": 3}),
    ("factor-avg", ("a1", "a4"), {}),
    ("ties", ("a1", "a2", "a3"), {"density": 0.3, "rank": FULL}),
    ("dare-linear", ("a1", "a2", "a3"), {"density": 0.6, "seed": 7, "rank": FULL}),
    ("dare-ties", ("a1", "a2", "a3"), {"density": 0.6, "seed": 7, "rank": FULL}),
    ("magnitude-prune", ("a1", "a2", "a3"), {"density": 0.4, "rank": FULL}),
    ("knots", ("a1", "a2", "a3"), {"density": 0.5}),
    ("task-arithmetic", ("a1", "a2", "a3"), {}),
    ("della", ("a1", "a2", "a3"), {"density": 0.5, "epsilon": 0.2, "lambda_": 1.5, "seed": 3, "rank": FULL}),
    ("della-linear", ("a1", "a2", "a3"), {"density": 0.6, "epsilon": 0.1, "seed": 4, "rank": FULL}),
    ("breadcrumbs", ("a1", "a2", "a3"), {"density": 0.6, "gamma": 0.05, "rank": FULL}),
    ("breadcrumbs-ties", ("a1", "a2", "a3"), {"density": 0.5, "gamma": 0.1, "rank": FULL}),
    ("sce", ("a1", "a2", "a3"), {"density": 0.7, "rank": FULL}),
    ("slerp", ("a1", "a2"), {"t": 0.3}),
    ("karcher", ("a1", "a2", "a3"), {}),
    ("tsv", ("a1", "a2", "a3"), {}),
    ("iso-c", ("a1", "a2", "a3"), {}),
    ("iso-cts", ("a1", "a2", "a3"), {}),
    ("core-space", ("a1", "a2", "a3"), {"density": 0.4}),
]


def test_every_registered_method_has_a_row():
    assert [row[0] for row in ROWS] == list(REGISTRY)


def assert_update_close(ours, theirs, rtol=1e-5):
    """Equal up to float32 storage: relative to the update's largest entry."""
    theirs = torch.as_tensor(theirs, dtype=torch.float64)
    ours = torch.as_tensor(ours, dtype=torch.float64)
    scale = max(theirs.abs().max().item(), 1e-12)
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("method, names, params", ROWS, ids=[row[0] for row in ROWS])
def test_peft_applies_exactly_the_methods_definition(method, names, params, adapter_dirs, loaded, tmp_path):
    from peft import PeftModel

    adapters = [loaded[n] for n in names]
    fixed = get(method).fixed_weights  # slerp takes --t, not --weights
    weights = WEIGHTS[: len(names)] if fixed is None else None
    result = plan_merge(adapters, method, weights=weights, **params).to_adapter()
    result.save(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False
    layers = peft_layers(PeftModel.from_pretrained(tiny_llama(), tmp_path / "merged"))
    assert set(layers) == set().union(*(a.modules for a in adapters))
    for name, layer in layers.items():
        expected = reference(method, adapters, name, weights, params)
        assert np.isfinite(expected).all() and np.abs(expected).max() > 0
        assert_update_close(layer.get_delta_weight("default"), expected)
        row = result.report["modules"][name]
        assert row["error"] < 1e-6 and row["rank"] == layer.r["default"]


def test_linear_stores_concatenated_factors_of_rank_sum(loaded):
    adapters = [loaded["a1"], loaded["a2"], loaded["a3"]]
    result = plan_merge(adapters, "linear", weights=WEIGHTS).to_adapter()
    q0 = "model.layers.0.self_attn.q_proj"
    assert result.adapter.modules[q0].rank == 4 + 8 + 2
    assert result.adapter.modules["model.layers.0.self_attn.k_proj"].rank == 8  # only a2 has k_proj
    assert {m.scale for m in result.adapter.modules.values()} == {1.0}
    assert result.report["summary"]["exact_modules"] == len(result.adapter.modules)


def test_a_dense_result_below_full_rank_is_its_truncated_svd_and_the_receipt_says_how_far(loaded):
    adapters = [loaded["a1"], loaded["a2"]]
    result = plan_merge(adapters, "ties", weights=(1.0, 1.0), density=0.5, rank=2).to_adapter()
    for name, module in result.adapter.modules.items():
        exact = reference("ties", adapters, name, (1.0, 1.0), {"density": 0.5})
        assert module.rank == 2
        assert_update_close(module.delta(), ref_best_rank(exact, 2))
        error = np.linalg.norm(exact - ref_best_rank(exact, 2)) / np.linalg.norm(exact)
        assert result.report["modules"][name]["error"] == pytest.approx(error, rel=1e-4)
    assert any("below their full rank" in note for note in result.report["notes"])


def test_dense_methods_default_to_the_largest_input_rank_per_module(loaded):
    result = plan_merge([loaded["a1"], loaded["a3"]], "magnitude-prune").to_adapter()
    assert result.adapter.modules["model.layers.0.self_attn.q_proj"].rank == 4
    assert result.adapter.modules["model.layers.0.self_attn.v_proj"].rank == 2  # a1's rank_pattern
    assert result.adapter.modules["model.layers.0.self_attn.o_proj"].rank == 2  # only a3


def test_svd_drops_exactly_the_tail_of_the_linear_spectrum(loaded):
    adapters = [loaded["a1"], loaded["a2"]]
    result = plan_merge(adapters, "svd", weights=(0.5, 0.5), rank=3).to_adapter()
    q0 = "model.layers.0.self_attn.q_proj"
    linear = reference("linear", adapters, q0, (0.5, 0.5), {})
    S = np.linalg.svd(linear, compute_uv=False)
    tail = math.sqrt((S[3:] ** 2).sum() / (S**2).sum())
    assert result.report["modules"][q0]["from_linear"] == pytest.approx(tail, rel=1e-5)


def test_factor_avg_receipt_says_how_far_it_is_from_the_average_of_the_updates(loaded):
    adapters = [loaded["a1"], loaded["a4"]]
    result = plan_merge(adapters, "factor-avg").to_adapter()
    for name, row in result.report["modules"].items():
        ours = reference("factor-avg", adapters, name, (0.5, 0.5), {})
        linear = reference("linear", adapters, name, (0.5, 0.5), {})
        assert row["from_linear"] == pytest.approx(
            np.linalg.norm(ours - linear) / np.linalg.norm(linear), 1e-4
        )
    assert result.report["summary"]["from_linear_mean"] > 0.1


def test_factor_avg_refuses_unequal_ranks(loaded):
    with pytest.raises(IncompatibleError, match="factor-avg needs equal ranks: module '.*q_proj' has rank 4"):
        plan_merge([loaded["a1"], loaded["a2"]], "factor-avg")


# ---------------------------------------------------------------------------------------------------------
# Against peft's add_weighted_adapter, where peft is right


def peft_with(adapter_dirs, names):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    return model


def test_linear_equals_peft_cat(adapter_dirs, loaded):
    names = ["a1", "a2", "a3"]  # a1 first: peft's merged config inherits its (non-rsLoRA) scaling
    model = peft_with(adapter_dirs, names)
    model.add_weighted_adapter(names, list(WEIGHTS), "cat", combination_type="cat")
    ours = plan_merge([loaded[n] for n in names], "linear", weights=WEIGHTS).to_adapter().adapter
    for name, layer in peft_layers(model).items():
        assert_update_close(ours.modules[name].delta(), layer.get_delta_weight("cat"))


def test_peft_cat_is_off_by_sqrt_r_when_the_first_adapter_uses_rslora(adapter_dirs, loaded):
    """The trap lrtool avoids: peft's merged adapter inherits use_rslora and scales by r / sqrt(r)."""
    names = ["a2", "a1", "a3"]
    model = peft_with(adapter_dirs, names)
    model.add_weighted_adapter(names, [0.4, 0.7, -0.5], "cat", combination_type="cat")
    ours = plan_merge([loaded[n] for n in names], "linear", weights=(0.4, 0.7, -0.5)).to_adapter().adapter
    q0 = "model.layers.0.self_attn.q_proj"
    theirs = peft_layers(model)[q0].get_delta_weight("cat")
    assert_update_close(theirs, math.sqrt(8 + 4 + 2) * ours.modules[q0].delta())


def test_svd_equals_peft_svd(adapter_dirs, loaded):
    names = ["a1", "a2", "a3"]
    model = peft_with(adapter_dirs, names)
    model.add_weighted_adapter(names, list(WEIGHTS), "svd", combination_type="svd", svd_rank=3)
    ours = plan_merge([loaded[n] for n in names], "svd", weights=WEIGHTS, rank=3).to_adapter().adapter
    for name, layer in peft_layers(model).items():
        assert_update_close(ours.modules[name].delta(), layer.get_delta_weight("svd"), rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Registry, parameters, weights


def test_registry_lists_names_without_importing_the_methods():
    assert list(REGISTRY) == [
        "linear",
        "svd",
        "factor-avg",
        "ties",
        "dare-linear",
        "dare-ties",
        "magnitude-prune",
        "knots",
        "task-arithmetic",
        "della",
        "della-linear",
        "breadcrumbs",
        "breadcrumbs-ties",
        "sce",
        "slerp",
        "karcher",
        "tsv",
        "iso-c",
        "iso-cts",
        "core-space",
    ]
    assert all(get(name).name == name for name in REGISTRY)
    with pytest.raises(UsageError, match="unknown merge method 'avg'; choose one of: linear, svd"):
        get("avg")


def test_list_describes_every_method_with_its_parameters():
    descriptions = {d["name"]: d for d in describe_methods()}
    assert descriptions["linear"]["parameters"] == {}
    assert descriptions["ties"]["parameters"]["density"]["default"] == 0.5
    assert set(descriptions["dare-ties"]["parameters"]) == {"density", "seed", "rank"}
    assert all(d["summary"] for d in descriptions.values())


@pytest.mark.parametrize(
    "method, params, message",
    [
        ("linear", {"rank": 4}, "--rank does not apply to method linear"),
        ("ties", {"seed": 1}, "--seed does not apply to method ties"),
        ("ties", {"density": 0.0}, "--density must be in (0, 1]"),
        ("ties", {"density": 1.5}, "--density must be in (0, 1]"),
        ("svd", {"rank": 0}, "--rank must be at least 1"),
    ],
)
def test_parameters_a_method_does_not_take_or_out_of_range_are_usage_errors(loaded, method, params, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_merge([loaded["a1"], loaded["a2"]], method, **params)


def test_weights_default_to_the_average_and_must_match_the_adapters():
    assert parse_weights(None, 3) is None
    assert parse_weights("1,-0.5", 2) == (1.0, -0.5)
    with pytest.raises(UsageError, match="--weights has 3 values for 2 adapters"):
        parse_weights("1,2,3", 2)
    with pytest.raises(UsageError, match="comma-separated numbers"):
        parse_weights("1,x", 2)
    with pytest.raises(UsageError, match="finite"):
        parse_weights("1,nan", 2)


def test_negative_weights_with_a_normalising_method_get_a_note(loaded):
    plan = plan_merge([loaded["a1"], loaded["a2"]], "ties", weights=(1.0, -1.0))
    assert any("does not negate" in note for note in plan.notes)


@PROPERTY
@given(
    values=st.lists(st.integers(-3, 3), min_size=1, max_size=40),
    density=st.floats(0.01, 1.0),
)
def test_keep_largest_keeps_the_largest_entries_earlier_ones_first_among_equals(values, density):
    from lrtool.merge.sparsify import keep_largest

    delta = torch.tensor(values, dtype=torch.float64).reshape(1, -1)
    assert np.array_equal(keep_largest(delta, density).numpy(), ref_keep_largest(delta.numpy(), density))


# ---------------------------------------------------------------------------------------------------------
# Properties, on random hand-made adapters


@st.composite
def adapter_sets(draw):
    """2-3 adapters over modules m0..m2 of random shapes; each adapter holds a random non-empty subset."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shapes = [(draw(st.integers(2, 6)), draw(st.integers(2, 6))) for _ in range(3)]
    adapters = []
    for _ in range(draw(st.integers(2, 3))):
        held = draw(st.lists(st.sampled_from(range(3)), min_size=1, max_size=3, unique=True))
        modules = {}
        for m in held:
            rank = draw(st.integers(1, 3))
            modules[f"m{m}"] = LoraModule(
                A=torch.randn(rank, shapes[m][1], generator=generator),
                B=torch.randn(shapes[m][0], rank, generator=generator),
                scale=draw(st.sampled_from([0.5, 1.0, 2 / math.sqrt(3)])),
            )
        adapters.append(Adapter(modules=modules))
    weights = tuple(draw(st.lists(st.sampled_from([-1.0, -0.3, 0.25, 0.5, 1.5]), min_size=3, max_size=3)))
    return adapters, weights[: len(adapters)]


def exact(adapters, method, weights, **params):
    plan = plan_merge(adapters, method, weights=weights, **params)
    return {name: plan.exact(name).to_dense() for name in plan.inputs}


def same_ranks(adapters) -> bool:
    names = {n for a in adapters for n in a.modules}
    return all(len({a.modules[n].rank for a in adapters if n in a.modules}) == 1 for n in names)


# What the definitions of these do with one adapter is not the adapter: slerp merges exactly two, iso-c and
# iso-cts flatten its spectrum (tests of their own below). slerp takes no --weights.
NOT_THE_ADAPTER_ALONE = ("slerp", "iso-c", "iso-cts")
WEIGHTED = [m for m in REGISTRY if get(m).fixed_weights is None]


@pytest.mark.parametrize("method", [m for m in REGISTRY if m not in NOT_THE_ADAPTER_ALONE])
@PROPERTY
@given(data=adapter_sets())
def test_merging_one_adapter_with_weight_one_returns_it(method, data):
    adapter = data[0][0]
    params = {}
    if get(method).parameter("density") is not None:
        params["density"] = 1.0  # keep every entry
    if get(method).parameter("rank") is not None:
        params["rank"] = 10  # above every module's rank: stored exactly
    result = plan_merge([adapter], method, weights=(1.0,), **params).to_adapter()
    for name, module in adapter.modules.items():
        assert_update_close(result.adapter.modules[name].delta(), module.delta())


@pytest.mark.parametrize("method", WEIGHTED)
@PROPERTY
@given(data=adapter_sets(), factor=st.sampled_from([-2.0, 0.5, 3.0]))
def test_weights_scale_the_result_as_the_definition_says(method, data, factor):
    """Weighted sums scale linearly; TIES' disjoint mean ignores a positive scale of positive weights;
    factor-avg goes as c^2."""
    adapters, weights = data
    if method == "factor-avg" and not same_ranks(adapters):
        return
    normalised = get(method).divides_by_weights
    if normalised:  # with mixed signs the agreeing weights can sum to 0, where the divisor becomes 1
        factor, weights = abs(factor), tuple(abs(w) for w in weights)
    one = exact(adapters, method, weights)
    scaled = exact(adapters, method, tuple(factor * w for w in weights))
    expected = 1.0 if normalised else factor**2 if method == "factor-avg" else factor
    for name in one:
        assert_update_close(scaled[name], expected * one[name], rtol=1e-7)


@pytest.mark.parametrize(
    "method", [m for m in REGISTRY if DROP_NOTE not in get(m).notes and get(m).adapters is None]
)
@PROPERTY
@given(data=adapter_sets())
def test_the_order_of_the_adapters_does_not_matter(method, data):
    """(DARE and DELLA draw their masks per adapter index, so their results depend on the order by design;
    slerp merges exactly two: its own test swaps them.)"""
    adapters, weights = data
    if method == "factor-avg" and not same_ranks(adapters):
        return
    forward = exact(adapters, method, weights)
    backward = exact(adapters[::-1], method, weights[::-1])
    for name in forward:
        assert_update_close(backward[name], forward[name], rtol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Dtypes: what can be merged, what the result is stored in, and what does not fit it


def one_module_adapter(dtype, factor=1.0, source="q.safetensors", seed=0):
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(2, 16, generator=generator), torch.randn(12, 2, generator=generator)
    module = LoraModule(A=(factor * A).to(dtype), B=(factor * B).to(dtype), scale=2.0)
    return Adapter(modules={"m.q": module}, source=source)


def test_integer_factors_are_refused_naming_the_file_and_dtype():
    with pytest.raises(UnsupportedFeatureError, match=r"q\.safetensors: module 'm\.q'.*int8"):
        plan_merge([one_module_adapter(torch.int8)], "linear")


def test_float8_factors_are_stored_in_float32_without_loss():
    adapters = [one_module_adapter(torch.float8_e4m3fn, seed=n) for n in range(2)]
    result = plan_merge(adapters, "linear").to_adapter()
    module = result.adapter.modules["m.q"]
    assert module.A.dtype == module.B.dtype == torch.float32
    assert result.report["output"]["dtype"] == "float32"
    assert result.report["modules"]["m.q"]["error"] == 0.0


def test_a_dense_result_is_stored_as_balanced_factors_that_fit_float16():
    """U sqrt(S), sqrt(S) Vh: each factor carries the square root of the update's size, as the inputs do."""
    adapters = [one_module_adapter(torch.float16, factor=1e3, seed=n) for n in range(2)]
    result = plan_merge(adapters, "ties", rank=FULL).to_adapter()
    module = result.adapter.modules["m.q"]
    assert module.B.dtype == torch.float16
    assert torch.isfinite(module.B).all() and torch.isfinite(module.A).all()
    torch.testing.assert_close(
        torch.linalg.vector_norm(module.B.double(), dim=0),
        torch.linalg.vector_norm(module.A.double(), dim=1),
        rtol=1e-2,
        atol=0.0,
    )
    assert result.report["modules"]["m.q"]["error"] < 5e-3


def test_a_result_that_overflows_the_storage_dtype_is_refused():
    plan = plan_merge([one_module_adapter(torch.float16)], "linear", weights=[1e6])
    with pytest.raises(InputError, match="module 'm.q' overflows float16.*float32"):
        plan.to_adapter()


def test_the_receipt_reports_non_finite_numbers_as_null():
    assert [rounded(x) for x in (float("nan"), float("inf"), -float("inf"), 0.1234567)] == [
        None,
        None,
        None,
        0.123457,
    ]
