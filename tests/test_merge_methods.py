"""What the merge methods of mergekit and of recent papers do, stated one property at a time on small adapters
made here (their definitions, entry by entry, are checked against numpy references in test_merge.py): slerp,
karcher, tsv, iso-c, iso-cts, core-space, della, breadcrumbs, sce, the task-arithmetic alias; the factored
ones never form a dense update, and the receipt measures factored results exactly."""

import math
import re

import pytest
import torch

from lrtool.adapters import Adapter, LoraModule
from lrtool.errors import UsageError
from lrtool.merge.plan import plan_merge

torch.set_num_threads(1)


def module(out=24, inp=20, rank=3, scale=1.0, seed=0, dtype=torch.float32) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(
        A=torch.randn(rank, inp, generator=g).to(dtype),
        B=torch.randn(out, rank, generator=g).to(dtype),
        scale=scale,
    )


def adapter(**modules) -> Adapter:
    return Adapter(modules={name.replace("_", "."): m for name, m in modules.items()})


def exact(adapters, method, **params) -> dict:
    plan = plan_merge(adapters, method, **params)
    return {name: plan.exact(name).to_dense() for name in plan.inputs}


def close(actual, expected, rtol=1e-9):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    S = torch.linalg.svdvals(matrix)
    return S[S > S[0] * 1e-10]


A, B = adapter(m_q=module(seed=1)), adapter(m_q=module(rank=2, scale=0.5, seed=2))
DELTA_A, DELTA_B = A.modules["m.q"].delta(), B.modules["m.q"].delta()


# ---------------------------------------------------------------------------------------------------------
# slerp


def test_slerp_at_t_with_the_adapters_swapped_is_slerp_at_one_minus_t():
    close(exact([A, B], "slerp", t=0.3)["m.q"], exact([B, A], "slerp", t=0.7)["m.q"])


def test_slerp_starts_at_the_first_adapter_and_ends_at_the_second():
    close(exact([A, B], "slerp", t=0.0)["m.q"], DELTA_A)
    close(exact([A, B], "slerp", t=1.0)["m.q"], DELTA_B)


def test_slerp_keeps_the_angle_and_interpolates_it():
    """Unit updates at an angle theta: slerp at t is at angle t * theta from the first and has norm 1."""
    first, second = adapter(m_q=module(seed=3)), adapter(m_q=module(seed=4))
    u, v = (a.modules["m.q"].delta() for a in (first, second))
    first.modules["m.q"].scale, second.modules["m.q"].scale = 1 / float(u.norm()), 1 / float(v.norm())
    u, v = u / u.norm(), v / v.norm()
    theta = math.acos(float((u * v).sum()))
    result = exact([first, second], "slerp", t=0.25)["m.q"]
    assert float(result.norm()) == pytest.approx(1.0, rel=1e-9)
    assert math.acos(float((result * u).sum())) == pytest.approx(0.25 * theta, rel=1e-9)


def test_slerp_of_nearly_colinear_updates_is_lerp():
    doubled = adapter(m_q=LoraModule(A=A.modules["m.q"].A, B=A.modules["m.q"].B, scale=2.0))
    close(exact([A, doubled], "slerp", t=0.25)["m.q"], 0.75 * DELTA_A + 0.25 * 2 * DELTA_A)


def test_slerp_of_a_module_one_adapter_lacks_turns_a_right_angle():
    """The missing update counts as zero, at a right angle to the other: sin(t pi / 2) of it remains."""
    close(exact([A, adapter(m_k=module(seed=5))], "slerp", t=0.5)["m.q"], math.sin(math.pi / 4) * DELTA_A)


def test_slerp_takes_two_adapters_and_t_not_weights():
    with pytest.raises(UsageError, match="slerp merges exactly 2 adapters, got 3"):
        plan_merge([A, B, A], "slerp")
    with pytest.raises(UsageError, match="slerp takes no --weights"):
        plan_merge([A, B], "slerp", weights=[0.5, 0.5])
    with pytest.raises(UsageError, match="--t must be a finite number"):
        plan_merge([A, B], "slerp", t=float("nan"))


def test_slerp_receipt_records_lerps_weights_and_the_distance_from_lerp():
    report = plan_merge([A, B], "slerp", t=0.25).to_adapter().report
    assert report["weights"] == [0.75, 0.25] and report["parameters"] == {"t": 0.25}
    result, lerp = exact([A, B], "slerp", t=0.25)["m.q"], 0.75 * DELTA_A + 0.25 * DELTA_B
    distance = float((result - lerp).norm() / lerp.norm())
    assert report["modules"]["m.q"]["from_linear"] == pytest.approx(distance, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# karcher


def test_karcher_of_an_update_and_a_multiple_of_it_is_their_weighted_norm_along_it():
    tripled = adapter(m_q=LoraModule(A=A.modules["m.q"].A, B=A.modules["m.q"].B, scale=3.0))
    close(exact([A, tripled], "karcher", weights=[0.5, 0.5])["m.q"], 2 * DELTA_A)


def test_karcher_of_two_updates_with_equal_weights_is_the_midpoint_of_their_arc():
    u, v = DELTA_A / DELTA_A.norm(), DELTA_B / DELTA_B.norm()
    scale = 0.5 * float(DELTA_A.norm() + DELTA_B.norm())
    close(exact([A, B], "karcher")["m.q"], scale * (u + v) / (u + v).norm(), rtol=1e-7)


def test_a_negative_karcher_weight_negates_its_adapter():
    close(exact([A], "karcher", weights=[-2.0])["m.q"], -2 * DELTA_A)


# ---------------------------------------------------------------------------------------------------------
# tsv, iso-c, iso-cts, core-space


def three() -> list[Adapter]:
    return [
        adapter(m_q=module(out=30, inp=26, rank=r, scale=s, seed=10 + r))
        for r, s in ((4, 1.0), (3, 0.7), (2, 2))
    ]


def test_tsv_result_is_an_svd_with_the_kept_weighted_singular_values():
    """Orthogonalised bases: the kept singular values, each times its adapter's weight, are the result's."""
    adapters, weights = three(), (0.5, 1.5, 2.0)
    result = exact(adapters, "tsv", weights=weights, rank=2)["m.q"]
    kept = torch.cat(
        [w * torch.linalg.svdvals(a.modules["m.q"].delta())[:2] for w, a in zip(weights, adapters)]
    )
    close(singular_values(result), kept.sort(descending=True).values)


def test_tsv_keeps_by_default_the_papers_share_of_the_spectrum():
    """min(out, in) // N per adapter: on a 7 x 26 module with three adapters, 2 each."""
    adapters = [adapter(m_q=module(out=7, inp=26, rank=4, seed=s)) for s in (1, 2, 3)]
    assert plan_merge(adapters, "tsv").to_adapter().report["modules"]["m.q"]["rank"] == 6


def test_iso_c_flattens_the_spectrum_of_the_weighted_sum_to_its_mean():
    adapters, weights = three(), (0.5, -1.0, 2.0)
    summed = sum(w * a.modules["m.q"].delta() for w, a in zip(weights, adapters))
    result = exact(adapters, "iso-c", weights=weights)["m.q"]
    S, U = singular_values(summed), torch.linalg.svd(summed)[0][:, :9]
    close(singular_values(result), torch.full_like(S, float(S.mean())))
    close(U @ (U.T @ result), result)  # the same column space


def test_iso_c_of_one_adapter_is_its_flattened_spectrum():
    U, S, Vh = torch.linalg.svd(DELTA_A, full_matrices=False)
    close(exact([A], "iso-c", weights=[1.0])["m.q"], float(S[:3].mean()) * U[:, :3] @ Vh[:3])


def test_iso_cts_is_isotropic_and_lives_in_the_span_of_the_adapters():
    adapters = three()
    result = exact(adapters, "iso-cts")["m.q"]
    S = singular_values(result)
    assert len(S) == 9 and torch.allclose(S, S.mean().expand_as(S), rtol=1e-9)
    stacked = torch.cat([a.modules["m.q"].B.double() for a in adapters], dim=1)
    Q = torch.linalg.qr(stacked)[0]
    close(Q @ (Q.T @ result), result)


def test_core_space_stays_in_the_span_of_the_stacked_factors_and_keeps_a_lone_adapter():
    adapters = three()
    result = exact(adapters, "core-space", density=0.3)["m.q"]
    Q_B = torch.linalg.qr(torch.cat([a.modules["m.q"].B.double() for a in adapters], dim=1))[0]
    Q_A = torch.linalg.qr(torch.cat([a.modules["m.q"].A.double() for a in adapters], dim=0).T)[0]
    close(Q_B @ (Q_B.T @ result) @ Q_A @ Q_A.T, result)
    close(
        exact(adapters[:1], "core-space", weights=[1.0], density=1.0)["m.q"],
        adapters[0].modules["m.q"].delta(),
    )


@pytest.mark.parametrize(
    "method, params",
    [
        ("task-arithmetic", {}),
        ("slerp", {"t": 0.4}),
        ("karcher", {}),
        ("tsv", {}),
        ("iso-c", {}),
        ("iso-cts", {}),
        ("core-space", {}),
    ],
)
def test_factored_methods_merge_a_module_whose_dense_update_would_not_fit_in_memory(method, params):
    """300000 x 200000 in float64 would be 480 GB: the method and its receipt work from the factors."""
    big = [adapter(m_q=module(out=300_000, inp=200_000, rank=r, seed=r)) for r in (2, 3)]
    result = plan_merge(big, method, **params).to_adapter()
    row = result.report["modules"]["m.q"]
    assert row["error"] < 1e-6 and row["norm"] > 0 and math.isfinite(row["from_linear"])
    assert result.adapter.modules["m.q"].rank <= 5


# ---------------------------------------------------------------------------------------------------------
# della, breadcrumbs, sce, task-arithmetic


def test_della_keeps_a_rows_larger_entries_more_often():
    """Keep probabilities D - e (a row's smallest) to D + e (its largest): with D 0.5 and e 0.4, the upper
    half of each row by magnitude is kept about 0.7 of the time, the lower half 0.3."""
    wide = adapter(m_q=module(out=64, inp=2000, rank=4, seed=7))
    delta = wide.modules["m.q"].delta()
    kept = exact([wide], "della-linear", weights=[1.0], density=0.5, epsilon=0.4)["m.q"] != 0
    upper = delta.abs() >= delta.abs().median(dim=1, keepdim=True).values
    assert float(kept[upper].double().mean()) == pytest.approx(0.7, abs=0.02)
    assert float(kept[~upper].double().mean()) == pytest.approx(0.3, abs=0.02)


def test_della_rescales_to_the_updates_l1_norm_and_reruns_give_the_same_bytes():
    result = exact([A], "della-linear", weights=[1.0], seed=5)["m.q"]
    assert float(result.abs().sum()) == pytest.approx(float(DELTA_A.abs().sum()), rel=1e-12)
    assert torch.equal(result, exact([A], "della-linear", weights=[1.0], seed=5)["m.q"])
    assert not torch.equal(result, exact([A], "della-linear", weights=[1.0], seed=6)["m.q"])


def test_della_at_density_one_is_ties_without_a_trim_times_lambda():
    close(
        exact([A, B], "della", density=1.0, lambda_=2.0)["m.q"], 2 * exact([A, B], "ties", density=1.0)["m.q"]
    )


@pytest.mark.parametrize(
    "params, message",
    [
        ({"density": 0.5, "epsilon": 0.5}, "D - epsilon and D + epsilon must lie in (0, 1)"),
        ({"epsilon": -0.1}, "--epsilon must be at least 0"),
    ],
)
def test_della_refuses_keep_probabilities_outside_zero_one(params, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        plan_merge([A, B], "della", **params)


def test_breadcrumbs_drops_the_largest_gamma_and_keeps_the_next_density():
    wide = adapter(m_q=module(out=40, inp=50, rank=4, seed=8))
    delta = wide.modules["m.q"].delta().flatten()
    result = exact([wide], "breadcrumbs", weights=[1.0], density=0.5, gamma=0.1)["m.q"].flatten()
    order = delta.abs().argsort(descending=True)
    assert torch.equal(result[order[:200]], torch.zeros(200, dtype=torch.float64))
    assert torch.equal(result[order[200:1200]], delta[order[200:1200]])
    assert int((result != 0).sum()) == 1000


def test_breadcrumbs_with_gamma_zero_is_magnitude_prune():
    assert torch.equal(
        exact([A, B], "breadcrumbs", gamma=0.0, density=0.3)["m.q"],
        exact([A, B], "magnitude-prune", density=0.3)["m.q"],
    )
    with pytest.raises(UsageError, match=r"--gamma must be in \[0, 1\)"):
        plan_merge([A, B], "breadcrumbs", gamma=1.0)


def test_sce_weighs_each_adapter_by_its_mean_square():
    """Two agreeing updates, the second 3 times the first: mean squares 1 : 9, so (1 + 9 * 3) / 10 = 2.8."""
    tripled = adapter(m_q=LoraModule(A=A.modules["m.q"].A, B=A.modules["m.q"].B, scale=3.0))
    close(exact([A, tripled], "sce", density=1.0)["m.q"], 2.8 * DELTA_A)


def test_task_arithmetic_is_linear_byte_for_byte():
    ours, linear = (
        plan_merge([A, B], m, weights=[0.3, -1.2]).to_adapter() for m in ("task-arithmetic", "linear")
    )
    for name, stored in linear.adapter.modules.items():
        assert torch.equal(ours.adapter.modules[name].A, stored.A) and torch.equal(
            ours.adapter.modules[name].B, stored.B
        )
    assert ours.report["modules"] == linear.report["modules"]


# ---------------------------------------------------------------------------------------------------------
# The receipt's figures of a factored result are exact, from the factors


@pytest.mark.parametrize(
    "method, params", [("linear", {}), ("svd", {"rank": 2}), ("karcher", {}), ("tsv", {})]
)
def test_the_receipt_error_of_a_factored_result_equals_the_dense_computation(method, params):
    """float16 storage rounds the factors: the receipt's error and norm, from Gram matrices of the factors,
    equal ||exact - stored|| / ||exact|| and ||exact|| computed densely in float64."""
    halves = [adapter(m_q=module(out=48, inp=40, rank=r, seed=r, dtype=torch.float16)) for r in (3, 4)]
    plan = plan_merge(halves, method, weights=[0.3, 0.7], **params)
    result = plan.to_adapter()
    exact_update = plan.exact("m.q").to_dense()
    stored = result.adapter.modules["m.q"].delta()
    row = result.report["modules"]["m.q"]
    assert row["error"] == pytest.approx(
        float((exact_update - stored).norm() / exact_update.norm()), rel=1e-5
    )
    assert row["norm"] == pytest.approx(float(exact_update.norm()), rel=1e-5)  # 6 significant digits
    assert 1e-6 < row["error"] < 1e-2  # float16 rounding, measured at its size
