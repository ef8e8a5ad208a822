"""karcher: the Riemannian (Karcher) mean of the adapters' normalised updates on the unit sphere, scaled
back, with mergekit's iteration and tolerance (mergekit/merge_methods/karcher.py, karcher_merge_tensors:
max_iter 10, tol 1e-5).

Per module, with dW_i flattened (zero where an adapter lacks the module), n_i = ||dW_i||, u_i = dW_i / n_i
and a_i = |w_i| / sum_j |w_j| over the updates with n_j > tol:
1. start at u = sum_i a_i u_i, normalised (u_1 when that sum has norm below tol);
2. up to 10 times: T = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) u) over the u_i at an angle
   theta_i = arccos(<u, u_i>) of at least tol; stop when ||T|| < tol; else step along the great circle,
   u = cos(||T||) u + sin(||T||) T / ||T||, normalised;
3. result = (sum_i |w_i| n_i) u.
With the default weights, mergekit's (its alphas are 1/N each). A negative weight negates its adapter (u_i
becomes -u_i, with |w_i| as its weight), so scaling every weight by any c scales the result by c.

Factored and exact: u and T are always combinations of the dW_i, so the iteration runs on their
coefficients, with inner products from the N x N Gram matrix of the updates (lrtool.lowrank.inner on the
factors, float64; mergekit works on the dense tensors in their dtype). The result is stored as one LoRA of
rank sum_i r_i (the factors concatenated, B scaled by the coefficients).
"""

import math

from lrtool.merge.base import Method, ModuleInputs, Settings, Update

MAX_ITER = 10  # mergekit's default max_iter
TOL = 1e-5  # mergekit's default tol: for norms, angles and the step


def karcher_coefficients(gram, weights: list[float]) -> list[float]:
    """c with result = sum_j c_j dW_j, from the Gram matrix G_ij = <dW_i, dW_j> (a float64 tensor) and the
    weights; all zero when no update has a norm above TOL."""
    import torch

    count = len(weights)
    norms = [math.sqrt(max(float(gram[i, i]), 0.0)) for i in range(count)]
    valid = [i for i in range(count) if norms[i] > TOL]
    total = sum(abs(weights[i]) for i in valid)
    if not valid or total == 0:
        return [0.0] * count
    alphas = {i: abs(weights[i]) / total for i in valid}
    units = {}
    for i in valid:
        unit = torch.zeros(count, dtype=torch.float64)
        unit[i] = math.copysign(1.0, weights[i]) / norms[i]
        units[i] = unit

    def inner(x, y) -> float:
        return float(x @ gram @ y)

    def norm(x) -> float:
        return math.sqrt(max(inner(x, x), 0.0))

    u = sum(alphas[i] * units[i] for i in valid)
    size = norm(u)
    u = units[valid[0]].clone() if size < TOL else u / size
    for _ in range(MAX_ITER):
        step = torch.zeros(count, dtype=torch.float64)
        for i in valid:
            dot = min(max(inner(u, units[i]), -1.0), 1.0)
            theta = math.acos(dot)
            if theta >= TOL:
                step += alphas[i] * (theta / math.sin(theta)) * (units[i] - dot * u)
        length = norm(step)
        if length < TOL:
            break
        u = math.cos(length) * u + math.sin(length) * (step / length)
        size = norm(u)
        if size > TOL:
            u = u / size
    scale = sum(abs(w) * n for w, n in zip(weights, norms))
    return [scale * float(c) for c in u]


def karcher(module: ModuleInputs, settings: Settings) -> Update:
    import torch

    from lrtool import lowrank

    present = [
        (w, module.scaled_factors(i)) for i, w in enumerate(module.weights) if module.modules[i] is not None
    ]
    gram = torch.tensor(
        [[lowrank.inner(*f, *g) for _, g in present] for _, f in present], dtype=torch.float64
    )
    coefficients = karcher_coefficients(gram, [w for w, _ in present])
    B = torch.cat([c * B for c, (_, (B, _)) in zip(coefficients, present)], dim=1)
    return Update.factored(B, torch.cat([A for _, (_, A) in present], dim=0))


METHOD = Method(
    name="karcher",
    summary="the Karcher mean of the normalised updates on the sphere, times the weighted sum of their "
    "norms (factored, rank sum_i r_i)",
    compute=karcher,
)
