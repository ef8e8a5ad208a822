"""Dense merges where kernels run (a CUDA device): the fused kernel of lrtool.kernels.dense_merge.

The dense methods (ties, dare-linear, dare-ties, magnitude-prune) and, with --into-base, linear are computed
in one pass over a module's stacked updates dW_i, formed on the device in float64; with --into-base the same
pass adds the update to the base weight, casts it to the weight's dtype and sums the squares the receipt
needs, so neither the float64 update nor the float64 sum is written. Elsewhere (the CPU), the methods' own
files compute them: they are the reference the kernel is tested against, and they draw DARE's drops from the
same counter-based generator, so both paths keep the same entries for one seed. The other dense methods
(della*, breadcrumbs*, sce) have no kernel: their own files compute them wherever lrtool runs.

Reads and writes tensors only. `plan` is a plan.MergePlan (which calls this module: it is not imported here).
"""

from __future__ import annotations

import math

import torch

from lrtool.errors import InputError
from lrtool.kernels import dispatch
from lrtool.merge.base import ModuleInputs, Update, overflow_message, relative
from lrtool.merge.sparsify import drop_key


def device_for(plan, into_base: bool) -> torch.device | None:
    """The device the fused kernel merges `plan` on; None when the method's own file computes it. linear
    goes through the kernel only into a base: stored as an adapter it is factored, with no dense pass."""
    if plan.method.name == "linear" and not into_base:
        return None
    device = dispatch.kernel_device()
    if device is None:  # (the kernel module, which imports Triton, is not imported on the CPU path)
        return None
    from lrtool.kernels.dense_merge import METHODS

    return device if plan.method.name in METHODS else None


def stacked_updates(inputs: ModuleInputs, device: torch.device) -> torch.Tensor:
    """dW_i = s_i B_i A_i of every adapter, [N, out, in] float64 on `device` (zeros where one lacks it)."""
    deltas = torch.zeros(len(inputs.modules), *inputs.shape, dtype=torch.float64, device=device)
    for i, module in enumerate(inputs.modules):
        if module is not None:
            torch.mm(module.B.to(device, torch.float64), module.A.to(device, torch.float64), out=deltas[i])
            deltas[i] *= module.scale
    return deltas


def _merge(plan, inputs: ModuleInputs, device: torch.device, **kwargs):
    from lrtool.kernels.dense_merge import dense_merge

    settings = plan.settings
    keys = None
    if plan.method.name.startswith("dare"):
        keys = [drop_key(settings.seed, inputs.name, i) for i in range(len(inputs.modules))]
    density = settings.density if settings.density is not None else 1.0
    deltas = stacked_updates(inputs, device)
    return dense_merge(deltas, settings.weights, plan.method.name, density, keys, **kwargs)


def exact(plan, name: str, device: torch.device) -> Update:
    """The method's result for module `name`, computed by the kernel (float64, back on the CPU)."""
    update, _ = _merge(plan, plan.inputs[name], device)
    return Update.dense(update.cpu())


def into_base(plan, name: str, weight: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict]:
    """(weight + the update, cast to the weight's dtype; the receipt's row), in one pass of the kernel."""
    base = weight.to(device)
    merged = torch.empty_like(base)
    transposed = plan.metadata["fan_in_fan_out"]  # the weight is [in, out]: add the update transposed
    _, sums = _merge(
        plan,
        plan.inputs[name],
        device,
        base=base.T if transposed else base,
        out=merged.T if transposed else merged,
        sums=True,
    )
    if not bool(torch.isfinite(merged).all()):
        what = f"'{name}.weight' plus the update"
        raise InputError(overflow_message(name, what, weight.dtype, "merge into a float32 copy of the base"))
    update, from_linear, linear, lost = (math.sqrt(float(value)) for value in sums)
    row = {"error": relative(lost, update), "from_linear": relative(from_linear, linear), "norm": update}
    return merged.cpu(), row
