"""Each Triton kernel of lrtool.kernels computes what its torch reference does, and each reference what the
definition it stands for says: in Triton's interpreter on the CPU (marked `kernels`; TRITON_INTERPRET=1 is
set before the kernel modules are imported) and on a CUDA device when there is one (marked `gpu` too).

Inputs are fresh random tensors at small shapes (the interpreter costs ~1 ms per program instance); outputs
the kernels write are filled with NaN first, so an element a kernel forgets to write fails the comparison.
The interpreter's bfloat16 tl.dot is wrong, so the interpreter runs float32 and float16.
"""

import importlib
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from helpers import save_random_peft_adapter, save_tiny_llama
from lrtool.kernels import counter_rng, dispatch

torch.set_num_threads(1)
pytestmark = pytest.mark.kernels

CUDA = torch.cuda.is_available()
# One process runs the kernels one way: interpreted on the CPU (no GPU, or TRITON_INTERPRET=1 asked for),
# or compiled on the GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" or not CUDA
KERNEL_MODULES = ("_rng_triton", "lora_apply", "dense_merge", "lora_linear")
DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(not INTERPRET, reason="a GPU is present: set TRITON_INTERPRET=1 for this"),
    ),
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(INTERPRET, reason="needs a CUDA device")]
    ),
]
DTYPES = [torch.float32, torch.float16] if INTERPRET else [torch.float32, torch.float16, torch.bfloat16]
# relative Frobenius error allowed between a kernel and its reference, by dtype
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules, imported in the mode this process runs them (interpreted on the CPU)."""
    # TRITON_INTERPRET is read when @triton.jit decorates a function, Triton's own library included: when
    # triton is first imported (conftest.py sets it before anything can import triton).
    if INTERPRET and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    triton = pytest.importorskip("triton")
    if INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(triton.language.cdiv, InterpretedFunction):
            pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1")
    return {name: importlib.import_module(f"lrtool.kernels.{name}") for name in KERNEL_MODULES}


@pytest.fixture(params=DEVICES)
def device(request, kernels):
    return request.param


def use_kernels_on(device: str, monkeypatch) -> None:
    """Let dispatch pick the kernels for `device`'s tensors (the CPU's through the interpreter)."""
    monkeypatch.setenv("LRTOOL_KERNELS", "interpret" if device == "cpu" else "auto")


def count_calls(monkeypatch, module, name: str) -> list:
    """Record the calls of module.name (a kernel's launcher), still calling it."""
    calls, launcher = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), "the kernel left unwritten (NaN) or non-finite entries"
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------
# The counter-based generator


def python_bits(key, position):
    """counter_rng's definition on Python integers."""
    mix = counter_rng.mix
    return mix(mix((position & 0xFFFFFFFF) ^ key[0] ^ mix(position >> 32)) ^ key[1])


@pytest.mark.parametrize("start", [0, 12345, 2**31 - 7, 2**32 - 9, 5 * 2**32 + 3])
def test_counter_bits_follow_their_definition_on_python_integers(start):
    key = (0xDEADBEEF, 0x0BADF00D)
    assert counter_rng.bits(key, start, 20).tolist() == [python_bits(key, start + i) for i in range(20)]


def test_counter_bits_keep_the_density_asked_and_do_not_depend_on_chunks(monkeypatch):
    key = (7, 11)
    kept = counter_rng.keep(key, 0, 200_000, 0.3)
    assert abs(float(kept.double().mean()) - 0.3) < 0.005
    monkeypatch.setattr(counter_rng, "CHUNK", 999)  # another split of the same positions
    assert torch.equal(counter_rng.keep(key, 0, 200_000, 0.3), kept)
    assert torch.equal(counter_rng.keep(key, 1000, 5000, 0.3), kept[1000:6000])
    assert counter_rng.keep(key, 0, 100, 1.0).all()


def test_the_triton_counter_bits_are_the_torch_ones(device, kernels, monkeypatch):
    import triton
    import triton.language as tl

    # a kernel sees module globals only (the interpreter drops closures)
    monkeypatch.setitem(globals(), "rng_triton", kernels["_rng_triton"])

    @triton.jit
    def draw(out_ptr, key0, key1, start, count, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        words = rng_triton.bits(key0, key1, start + offsets.to(tl.int64))  # noqa: F821
        tl.store(out_ptr + offsets, words.to(tl.int64), mask=offsets < count)

    key = (0x9E3779B9, 0x7F4A7C15)
    for start in (0, 2**32 - 100):  # one range crosses into the next 32-bit block
        out = torch.full((300,), -1, dtype=torch.int64, device=device)
        draw[(3,)](out, counter_rng._signed(key[0]), counter_rng._signed(key[1]), start, 300, BLOCK=128)
        assert torch.equal(out.cpu(), counter_rng.bits(key, start, 300))


# ---------------------------------------------------------------------------------------------------------
# Multi-adapter LoRA apply

# (tokens, slots k, adapters, in, out, ranks of the adapters (padded to the largest), weighted)
APPLY_CASES = {
    "one adapter per token, ragged": (37, 1, 4, 24, 40, (8, 8, 8, 8), False),
    "mixed ranks padded": (21, 1, 3, 32, 20, (2, 16, 5), False),
    "top-2 with weights": (19, 2, 4, 20, 36, (4, 8, 8, 3), True),
    "top-3 of 3, an adapter nobody uses": (11, 3, 5, 16, 16, (3, 3, 3, 3, 3), True),
    "no tokens": (0, 1, 2, 16, 24, (4, 4), False),
    "no token has an adapter": (9, 2, 2, 16, 24, (4, 4), True),
}


def apply_inputs(case, dtype, device, seed):
    tokens, k, adapters, features, out_features, ranks, weighted = APPLY_CASES[case]
    g = generator(seed)
    rank = max(ranks)
    A_all = torch.zeros(adapters, features, rank)
    B_all = torch.zeros(adapters, rank, out_features)
    for e, r in enumerate(ranks):
        A_all[e, :, :r] = torch.randn(features, r, generator=g) / features**0.5
        B_all[e, :r] = torch.randn(r, out_features, generator=g)
    indices = torch.zeros(tokens, k, dtype=torch.int64)
    for t in range(tokens):  # k distinct adapters per token
        indices[t] = torch.randperm(adapters, generator=g)[:k]
    if case.startswith("top-3"):
        indices[indices == 4] = -1  # adapter 4 gets no token: its segments are empty
    indices[torch.rand(tokens, k, generator=g) < 0.2] = -1
    if case == "no token has an adapter":
        indices[:] = -1
    weights = torch.rand(tokens, k, generator=g) if weighted else None
    x = torch.randn(tokens, features, generator=g)
    y = torch.randn(tokens, out_features, generator=g)
    on = lambda t: t if t is None else t.to(device)  # noqa: E731
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return cast(x), cast(y), cast(A_all), cast(B_all), on(indices), on(weights)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(APPLY_CASES))
def test_lora_apply_adds_what_the_reference_adds(device, kernels, dtype, case):
    lora_apply = kernels["lora_apply"]
    x, y, A_all, B_all, indices, weights = apply_inputs(case, dtype, device, seed=len(case))
    tokens, k = indices.shape
    expected = y.double().clone()
    lora_apply.apply_reference(
        x.double(),
        expected,
        A_all.double(),
        B_all.double(),
        indices,
        None if weights is None else weights.double(),
    )
    h = torch.full((k, tokens, A_all.shape[2]), float("nan"), device=device)  # read only where written
    actual = y.clone()
    lora_apply.apply_triton(x, actual, A_all, B_all, indices, weights, h=h)
    untouched = (indices < 0).all(dim=1)
    assert torch.equal(actual[untouched], y[untouched]), "rows without an adapter were written"
    if tokens and not untouched.all():
        assert relative_error(actual - y, expected - y.double()) < TOLERANCE[dtype] * 5


def test_lora_apply_reference_is_the_engine_definition(kernels):
    """The reference adds sum_j w_j x A_e B_e per token, as written out here one token at a time."""
    x, y, A_all, B_all, indices, weights = apply_inputs("top-2 with weights", torch.float64, "cpu", seed=3)
    actual = y.clone()
    kernels["lora_apply"].apply_reference(x, actual, A_all, B_all, indices, weights)
    expected = y.clone()
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            if e >= 0:
                expected[t] += weights[t, j] * (x[t] @ A_all[e] @ B_all[e])
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Fused dense merge


def merge_inputs(dtype, device, seed, adapters=3, shape=(37, 45)):
    g = generator(seed)
    deltas = torch.randn(adapters, *shape, generator=g, dtype=torch.float64)
    deltas[1, :4] = 0  # a block an adapter leaves at zero
    deltas[2, 3, :12] = deltas[2, 3, 0]  # equal magnitudes: the trimming threshold falls among ties
    weights = [0.7, -0.4, 0.5][:adapters]
    keys = [(11 * i + 1, 2**32 - 5 * i - 1) for i in range(adapters)]
    base = torch.randn(shape[1], shape[0], generator=g)  # stored [in, out]: the update goes in transposed
    return deltas.to(dtype).to(device), weights, keys, base.to(device)


MERGE_DTYPES = [torch.float64, *DTYPES]


@pytest.mark.parametrize("into_base", [False, True], ids=["update", "into base"])
@pytest.mark.parametrize("dtype", MERGE_DTYPES, ids=str)
@pytest.mark.parametrize("method", ["linear", "magnitude-prune", "ties", "dare-linear", "dare-ties"])
def test_dense_merge_writes_what_the_reference_computes(device, kernels, method, dtype, into_base):
    dense_merge = kernels["dense_merge"]
    deltas, weights, keys, base = merge_inputs(dtype, device, seed=len(method))
    # a bfloat16 base takes float64 and float32 results (cast through float32, as torch does)
    base = base.to(torch.float16 if dtype == torch.float16 else torch.bfloat16).T if into_base else None
    rule = dense_merge.keep_rule(deltas, method, 0.3, keys)
    expected, expected_sums = dense_merge.merge_reference(deltas, weights, rule, base=base, sums=True)
    out = torch.full_like(expected, float("nan"))
    actual, sums = dense_merge.merge_triton(deltas, weights, rule, base=base, out=out, sums=True)
    assert actual is out
    tolerance = TOLERANCE[base.dtype if into_base else dtype]
    assert relative_error(actual, expected) < tolerance
    assert relative_error(sums, expected_sums) < max(tolerance, 1e-6)


@pytest.mark.parametrize("method", ["linear", "magnitude-prune", "ties", "dare-linear", "dare-ties"])
def test_dense_merge_reference_is_the_merge_methods_definition(kernels, method):
    from lrtool.adapters import LoraModule
    from lrtool.merge import get
    from lrtool.merge.base import ModuleInputs
    from lrtool.merge.sparsify import drop_key

    g = generator(5)
    modules = (
        LoraModule(torch.randn(4, 30, generator=g), torch.randn(20, 4, generator=g), 0.5),
        None,  # an adapter without the module
        LoraModule(torch.randn(2, 30, generator=g), torch.randn(20, 2, generator=g), 2.0),
    )
    weights = (0.6, 0.3, -0.2)
    inputs = ModuleInputs("layer.q_proj", (20, 30), modules, weights, ("a", "b", "c"))
    merge = get(method)
    settings = merge.settings(weights, density=0.4 if merge.parameter("density") else None)
    expected = merge.compute(inputs, settings).to_dense()
    keys = [drop_key(settings.seed, inputs.name, i) for i in range(3)] if method.startswith("dare") else None
    deltas = torch.stack(inputs.deltas())
    rule = kernels["dense_merge"].keep_rule(deltas, method, settings.density or 1.0, keys)
    actual, _ = kernels["dense_merge"].merge_reference(deltas, weights, rule)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_a_merge_plan_uses_the_kernel_where_kernels_run(device, kernels, monkeypatch, tmp_path):
    """exact() and --into-base through the kernel give what the methods' own files give."""
    from lrtool.adapters import load_adapter
    from lrtool.merge import fused
    from lrtool.merge.plan import plan_merge

    base_dir = save_tiny_llama(tmp_path / "base", ["a b c d e f g h"], hidden=32, layers=1)
    adapters = [
        load_adapter(
            save_random_peft_adapter(base_dir, tmp_path / f"a{i}", seed=i, r=4, target_modules=targets)
        )
        for i, targets in enumerate((["q_proj", "v_proj"], ["q_proj", "o_proj"]))
    ]
    launches = count_calls(monkeypatch, kernels["dense_merge"], "merge_triton")
    for method in ("ties", "dare-ties", "linear"):
        plan = plan_merge(
            adapters, method, weights=[0.8, 0.5], **({} if method == "linear" else {"density": 0.5})
        )
        monkeypatch.setenv("LRTOOL_KERNELS", "off")
        assert fused.device_for(plan, into_base=True) is None
        expected = {name: plan.exact(name).to_dense() for name in plan.inputs}
        use_kernels_on(device, monkeypatch)
        where = fused.device_for(plan, into_base=True)
        assert where is not None and where.type == device
        assert (fused.device_for(plan, into_base=False) is None) == (
            method == "linear"
        )  # linear stays factored
        for name in plan.inputs:
            if method != "linear":
                torch.testing.assert_close(
                    plan.exact(name).to_dense(), expected[name], rtol=1e-12, atol=1e-12
                )
            weight = torch.randn(plan.inputs[name].shape, generator=generator(1))
            merged, row = fused.into_base(plan, name, weight, where)
            exact_sum = weight.double() + expected[name]
            torch.testing.assert_close(merged, exact_sum.float(), rtol=1e-6, atol=1e-7)
            assert row["norm"] == pytest.approx(float(expected[name].norm()), rel=1e-12)
            # what the cast to float32 lost: a norm of rounding errors, so only roughly the same
            assert row["error"] == pytest.approx(
                float((exact_sum - merged.double()).norm()) / row["norm"], rel=0.05
            )
    assert len(launches) == 2 * 3 + 2 * 3 + 3  # exact and into-base per module; linear into-base only
    assert not dispatch.failed()


# ---------------------------------------------------------------------------------------------------------
# Fused LoRA linear for training


@pytest.mark.parametrize("operand", [None, "a", "b", "out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_matmul_writes_what_the_reference_computes(device, kernels, dtype, operand):
    lora_linear = kernels["lora_linear"]
    g = generator(3)
    dropout = lora_linear.Dropout(0.25, (1234, 5678))
    x_rows, x_columns = 18, 40
    shapes = {
        None: ((18, 40), (40, 6)),
        "a": ((18, 40), (40, 6)),
        "b": ((6, 18), (18, 40)),
        "out": ((18, 5), (5, 40)),
    }
    (m, k), (_, n) = shapes[operand]
    a = torch.randn(m, k, generator=g).to(dtype).to(device)
    b = torch.randn(k, n, generator=g).to(dtype).to(device)
    mask = lora_linear.Masked(operand, dropout, x_columns) if operand else None
    expected = torch.zeros(m, n, dtype=torch.float64)
    lora_linear._matmul_reference(a.cpu(), b.cpu(), expected, 0.5, False, mask, dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    lora_linear._matmul_triton(a, b, out, 0.5, False, mask, dtype)
    assert relative_error(out, expected) < TOLERANCE[dtype] * 5
    dropped = float((~dropout.mask(x_rows, x_columns, "cpu")).double().mean())
    assert abs(dropped - 0.25) < 0.05  # the mask does drop about p of x's entries


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no dropout", "dropout"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_lora_linear_forward_and_backward_match_torch_autograd(device, kernels, monkeypatch, dtype, p):
    """The autograd Function through the kernels against torch's autograd of the reference in float64."""
    lora_linear = kernels["lora_linear"]
    use_kernels_on(device, monkeypatch)
    launches = count_calls(monkeypatch, lora_linear, "_matmul_triton")
    g = generator(7)
    x = torch.randn(2, 9, 40, generator=g).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(24, 40, generator=g) / 6).to(dtype).to(device)
    bias = torch.randn(24, generator=g).to(dtype).to(device)
    A = (
        (torch.randn(6, 40, generator=g) / 6).to(device).requires_grad_()
    )  # float32, as peft keeps LoRA factors
    B = torch.randn(24, 6, generator=g).to(device).requires_grad_()
    dropout = lora_linear.Dropout(p, (99, 2**32 - 99) if p else None)
    y = lora_linear.lora_linear(x, weight, bias, A, B, 0.75, dropout)
    upstream = torch.randn(y.shape, generator=g).to(dtype).to(device)
    grads = torch.autograd.grad(y, (x, A, B), upstream)
    exact = [t.detach().cpu().double().requires_grad_() for t in (x, A, B)]
    reference = lora_linear.lora_linear_reference(
        exact[0], weight.cpu().double(), bias.cpu().double(), exact[1], exact[2], 0.75, dropout
    )
    expected = torch.autograd.grad(reference, exact, upstream.cpu().double())
    tolerance = TOLERANCE[dtype] * 5
    assert y.dtype == dtype and relative_error(y, reference.detach()) < tolerance
    for name, actual, wanted in zip(("x", "A", "B"), grads, expected):
        assert relative_error(actual, wanted) < tolerance, name
    assert len(launches) == 2 + 4  # forward: shrink, expand; backward: gh, gB, gA, gx
    assert not dispatch.failed()


def test_lrtool_train_routes_peft_layers_through_the_fused_function(device, kernels, monkeypatch, tmp_path):
    """A peft LoRA model with its layers fused gives peft's loss and gradients (dropout 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_llama(tmp_path / "base", ["a b c d e f g h"], hidden=32, layers=1)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator(2)) * 0.3)
    model.to(device)
    ids = torch.randint(4, 10, (2, 7), generator=generator(3)).to(device)

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n]

    expected_loss, expected_grads = loss_and_grads()
    assert kernels["lora_linear"].fuse_peft_layers(model) == 2
    monkeypatch.setenv("LRTOOL_KERNELS", "off")  # the fused layers hand over to peft's forward
    torch.testing.assert_close(loss_and_grads()[0], expected_loss, rtol=0, atol=0)
    use_kernels_on(device, monkeypatch)
    launches = count_calls(monkeypatch, kernels["lora_linear"], "_matmul_triton")
    loss, grads = loss_and_grads()
    assert len(launches) == 2 * 6 - 1  # q_proj's input needs no gradient (the embedding is frozen)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for actual, wanted in zip(grads, expected_grads):
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-6)
    assert not dispatch.failed()


# ---------------------------------------------------------------------------------------------------------
# The engine (eval) on the kernels' path


def base_and_adapters(tmp_path):
    """A one-layer tiny Llama and helpers.LORAS's three adapters on it (mixed ranks, alphas, targets)."""
    from helpers import LORAS, TEXTS
    from lrtool.adapters import load_adapter

    base_dir = save_tiny_llama(tmp_path / "base", TEXTS, layers=1)
    adapters = [
        load_adapter(save_random_peft_adapter(base_dir, tmp_path / f"a{i}", seed=i + 1, **config))
        for i, config in enumerate(LORAS)
    ]
    return base_dir, adapters


def engine_logits(mode, device, monkeypatch, base_dir, adapters, ids, rows_of):
    """The logits of `ids` under the engine's plan `rows_of(engine)` (one part per row), with the kernels
    switched `mode` ("off" or "on"); and the engine, closed."""
    from helpers import peft_model
    from lrtool.engine import AdapterEngine, Plan

    if mode == "off":
        monkeypatch.setenv("LRTOOL_KERNELS", "off")
    else:
        use_kernels_on(device, monkeypatch)
    model = peft_model(base_dir).to(device)
    engine = AdapterEngine(model, adapters)
    with torch.no_grad(), engine.routing(Plan.by_row(rows_of(engine))):
        logits = model(input_ids=ids).logits
    engine.close()
    return logits, engine


def test_the_engine_gives_the_same_logits_through_the_kernels(device, kernels, monkeypatch, tmp_path):
    """Rows of single adapters, of the base and of a top-2 router in one batch: the kernels' path gives the
    logits of the engine's own (CPU) path."""
    from helpers import FixedRouter, random_ids
    from lrtool.engine import OneAdapter

    base_dir, adapters = base_and_adapters(tmp_path)
    ids = random_ids(7, 5).to(device)
    g = generator(4)
    indices = torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(2 * 5)]).to(device)
    router = FixedRouter(indices, torch.rand(2 * 5, 2, generator=g).to(device))
    rows = [OneAdapter(2), OneAdapter(0), None, router, router, OneAdapter(1), OneAdapter(0)]
    launches = count_calls(monkeypatch, kernels["lora_apply"], "apply_triton")
    logits = {}
    for mode in ("off", "on"):
        logits[mode], engine = engine_logits(
            mode, device, monkeypatch, base_dir, adapters, ids, lambda engine: rows
        )
    modules = len(engine.stacks)
    assert len(launches) == 2 * modules  # per module: one for the single adapters' rows, one for the router's
    torch.testing.assert_close(logits["on"], logits["off"], rtol=1e-5, atol=1e-5)
    assert not dispatch.failed()


def test_a_router_mixing_factors_keeps_its_definition_on_the_kernels_path(
    device, kernels, monkeypatch, tmp_path
):
    """Arrow's `mix factors` ((sum w B)(sum w A) x) is not a sum of outputs: the kernels' path must hand its
    rows to the router itself, not to lora_apply's weighted top-k (which would compute `mix outputs`)."""
    from helpers import random_ids
    from lrtool.engine import OneAdapter
    from lrtool.routers.arrow import ArrowFactorsRouter, ArrowRouter

    base_dir, adapters = base_and_adapters(tmp_path)
    ids = random_ids(3, 5).to(device)

    def rows_of(kind):
        def rows(engine):
            g = generator(5)
            prototypes = {
                name: torch.randn(len(adapters), A.shape[1], generator=g).to(device)
                for name, (A, _) in engine.stacks.items()
            }
            router = kind(prototypes, torch.arange(len(adapters)), 2, 1.0)
            return [OneAdapter(1), router, router]

        return rows

    logits = {}
    for kind in (ArrowFactorsRouter, ArrowRouter):
        for mode in ("off", "on"):
            logits[kind.__name__, mode], _ = engine_logits(
                mode, device, monkeypatch, base_dir, adapters, ids, rows_of(kind)
            )
    for kind in ("ArrowFactorsRouter", "ArrowRouter"):
        torch.testing.assert_close(logits[kind, "on"], logits[kind, "off"], rtol=1e-4, atol=1e-4)
    # the two mixes differ far beyond that tolerance, so the check above tells them apart
    assert (logits["ArrowFactorsRouter", "off"] - logits["ArrowRouter", "off"]).abs().max() > 1e-2
    assert not dispatch.failed()


# ---------------------------------------------------------------------------------------------------------
# Dispatch


def test_a_failing_kernel_falls_back_to_its_reference_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_failed", set())
    monkeypatch.setattr(dispatch, "triton_installed", lambda: True)
    monkeypatch.setenv("LRTOOL_KERNELS", "interpret")

    def broken(x):
        raise RuntimeError("does not compile")

    with caplog.at_level(logging.WARNING, logger="lrtool"):
        results = [dispatch.run("broken", broken, lambda x: x + 1, torch.zeros(2)) for _ in range(3)]
    assert all(torch.equal(r, torch.ones(2)) for r in results)
    assert [r.getMessage() for r in caplog.records] == [
        "kernel broken failed, its torch reference serves from now on: does not compile"
    ]
    assert dispatch.failed() == {"broken"}


def test_kernels_are_used_on_cuda_only_unless_switched_off_or_interpreted(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_installed", lambda: True)
    for mode, cpu, cuda in (
        ("", False, True),
        ("auto", False, True),
        ("off", False, False),
        ("interpret", True, True),
    ):
        monkeypatch.setenv("LRTOOL_KERNELS", mode)
        assert (dispatch.wanted(torch.device("cpu")), dispatch.wanted(torch.device("cuda", 0))) == (cpu, cuda)
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    monkeypatch.setenv("LRTOOL_KERNELS", "auto")
    assert not dispatch.wanted("cuda")
    monkeypatch.setenv("LRTOOL_KERNELS", "fast")
    from lrtool.errors import UsageError

    with pytest.raises(UsageError, match="LRTOOL_KERNELS must be one of auto, off, interpret"):
        dispatch.wanted("cuda")


def test_every_kernel_compiles_for_the_h200(kernels):
    """What the interpreter cannot tell: the compiler (through ptxas) accepts every kernel for sm_90."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "compile_kernels.py"), "90"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**environment, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = result.stdout.split("\n")
    for kernel in ("_shrink_kernel", "_expand_kernel", "_merge_kernel", "_masked_matmul_kernel"):
        assert any(line.startswith(f"sm_90 {kernel}(") for line in compiled), kernel


def test_lrtool_imports_without_triton_and_help_imports_neither_torch_nor_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # as if not installed
        "import lrtool.kernels.lora_apply as m, lrtool.kernels.dense_merge, lrtool.kernels.lora_linear\n"
        "assert m.triton is None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from lrtool.cli import app; print('torch' in sys.modules, 'triton' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.stdout.split() == ["False", "False"], result.stderr


def test_merge_drops_use_the_counter_generator():
    """dare-*'s drop mask on the CPU is counter_rng's for its key: written out with numpy here."""
    from lrtool.merge.sparsify import drop_and_rescale, drop_key

    key = drop_key(3, "model.layers.0.mlp.up_proj", 1)
    delta = torch.randn(16, 24, generator=generator(8), dtype=torch.float64)
    positions = np.arange(delta.numel(), dtype=np.uint64)
    words = np.array([python_bits(key, int(p)) for p in positions], dtype=np.uint64)
    keep = (words < round(0.4 * 2**32)).reshape(16, 24)
    expected = np.where(keep, delta.numpy() / 0.4, 0.0)
    np.testing.assert_array_equal(drop_and_rescale(delta, 0.4, key).numpy(), expected)
