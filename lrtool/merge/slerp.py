"""slerp: spherical linear interpolation of two adapters' flattened updates, with mergekit's conventions
(mergekit/merge_methods/slerp.py).

Per module, with v0 = dW_1 and v1 = dW_2 (zero where an adapter lacks the module): the cosine of the angle
between them is dot = <v0, v1> / (||v0|| ||v1||), each norm taken as 1 when it is at most 1e-8 (mergekit's
normalize); when |dot| > 0.9995 the two are nearly colinear and the result is lerp, (1 - t) v0 + t v1;
otherwise, with theta = arccos(dot),

    result = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1.

Factored and exact: the result is a combination of the two updates, stored as one LoRA of rank r_1 + r_2
(the factors concatenated, as linear stores them), and the norms and the inner product come from Gram
matrices of the factors (lrtool.lowrank), never a dense update (mergekit computes them in float32 on the
dense tensors; here in float64). A module only one adapter has is that update times sin(t pi / 2) (lrtool's
convention: the other counts as zero, at a right angle), where mergekit passes the one tensor through.

slerp takes --t, not --weights: the receipt records lerp's weights (1 - t, t), and its from_linear is the
distance from lerp.
"""

import math

from lrtool.merge.base import Method, ModuleInputs, Parameter, Settings, Update

DOT_THRESHOLD = 0.9995  # mergekit's: above it the updates count as colinear and slerp falls back to lerp
EPS = 1e-8  # mergekit's: a norm at most this is not divided by

T = Parameter(
    "t",
    0.5,
    "where between the two adapters: 0 gives the first, 1 the second (mergekit's t)",
    check=lambda value: None if math.isfinite(value) else "must be a finite number",
)


def coefficients(norm0: float, norm1: float, inner: float, t: float) -> tuple[float, float]:
    """(s0, s1) with slerp(v0, v1) = s0 v0 + s1 v1, from the norms and the inner product of v0 and v1."""
    dot = inner / ((norm0 if norm0 > EPS else 1.0) * (norm1 if norm1 > EPS else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(dot)
    return math.sin(theta - theta * t) / math.sin(theta), math.sin(theta * t) / math.sin(theta)


def slerp(module: ModuleInputs, settings: Settings) -> Update:
    import torch

    from lrtool import lowrank

    factors = [module.scaled_factors(i) for i in (0, 1)]
    norms = [lowrank.norm(*f) if f is not None else 0.0 for f in factors]
    inner = lowrank.inner(*factors[0], *factors[1]) if None not in factors else 0.0
    scales = coefficients(*norms, inner, settings.t)
    present = [(s, f) for s, f in zip(scales, factors) if f is not None]
    B = torch.cat([s * B for s, (B, _) in present], dim=1)
    return Update.factored(B, torch.cat([A for _, (_, A) in present], dim=0))


METHOD = Method(
    name="slerp",
    summary="spherical interpolation of two adapters' flattened updates at --t, lerp when nearly colinear "
    "(factored, rank r_1 + r_2)",
    compute=slerp,
    parameters=(T,),
    adapters=2,
    fixed_weights=lambda settings: (1 - settings.t, settings.t),
    notes=("slerp takes --t, not --weights: weights are lerp's (1 - t, t), which from_linear compares with",),
)
