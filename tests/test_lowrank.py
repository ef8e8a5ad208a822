"""Factored linear algebra agrees with dense float64 computations."""

import torch

from lrtool import lowrank


def factors(out=12, inp=9, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, r, generator=g, dtype=torch.float64), torch.randn(
        r, inp, generator=g, dtype=torch.float64
    )


def test_factored_svd_reconstructs_the_product_and_matches_dense_singular_values():
    B, A = factors()
    U, S, Vh = lowrank.factored_svd(B, A)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, B @ A)
    torch.testing.assert_close(S, torch.linalg.svdvals(B @ A)[:3])
    torch.testing.assert_close(U.T @ U, torch.eye(3, dtype=torch.float64))


def test_inner_norm_and_distance_equal_their_dense_definitions():
    (B1, A1), (B2, A2) = factors(seed=1), factors(r=5, seed=2)
    dense1, dense2 = B1 @ A1, B2 @ A2
    assert abs(lowrank.inner(B1, A1, B2, A2) - float((dense1 * dense2).sum())) < 1e-9
    assert abs(lowrank.norm(B1, A1) - float(dense1.norm())) < 1e-9
    assert abs(lowrank.distance(B1, A1, B2, A2) - float((dense1 - dense2).norm())) < 1e-9


def test_stacked_factors_represent_the_sum_of_updates():
    (B1, A1), (B2, A2) = factors(seed=3), factors(r=2, seed=4)
    B, A = torch.cat([B1, B2], 1), torch.cat([A1, A2], 0)
    torch.testing.assert_close(B @ A, B1 @ A1 + B2 @ A2)
    _, S, _ = lowrank.factored_svd(B, A)
    torch.testing.assert_close(S, torch.linalg.svdvals(B1 @ A1 + B2 @ A2)[:5])


def test_the_distance_between_identical_updates_is_zero_to_float64_precision():
    B, A = factors(out=300, inp=200, r=8, seed=5)
    assert lowrank.distance(B, A, B.clone(), A.clone()) < 1e-12 * lowrank.norm(B, A)


def test_the_distance_to_a_float32_copy_is_measured_at_its_true_size():
    B, A = factors(out=400, inp=300, r=8, seed=6)
    B32, A32 = B.float().double(), A.float().double()
    dense = float((B @ A - B32 @ A32).norm())
    assert abs(lowrank.distance(B, A, B32, A32) - dense) < 1e-3 * dense
    B3, A3 = factors(out=400, inp=300, r=5, seed=7)  # unequal ranks: the stacked form
    dense = float((B @ A - B3 @ A3).norm())
    assert abs(lowrank.distance(B, A, B3, A3) - dense) < 1e-9 * dense
