"""Uniform: every adapter's output with equal weight 1/E at every token of every layer.

Output-space averaging, the counterpart of merge's factor-avg and the paper's "uniform" routing baseline:
y = W x + (1/E) sum_e scale_e B_e A_e x. Reads the adapters; writes no tensor (router.safetensors empty).
"""

from __future__ import annotations

import torch

from lrtool.engine import TokenRouter
from lrtool.routers.base import BuildInputs, FixedRouting, Router, RouterMethod, RoutingContext


class UniformRouter(TokenRouter):
    """Every token gets every adapter, each with weight 1/E."""

    def __init__(self, slots: torch.Tensor):
        self.slots = slots

    def weights(self, module: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = len(self.slots)
        indices = self.slots.to(x.device).expand(x.shape[0], count)
        return indices, torch.full((x.shape[0], count), 1.0 / count, dtype=torch.float32, device=x.device)


def build(inputs: BuildInputs) -> tuple[dict, dict[str, torch.Tensor]]:
    return {"weight": 1.0 / len(inputs.adapters)}, {}


def routing(router: Router, slots: list[int], context: RoutingContext):
    return FixedRouting(UniformRouter(torch.tensor(slots)))


METHOD = RouterMethod(
    name="uniform",
    summary="every adapter's output with weight 1/E at every token (output-space averaging)",
    parameters=(),
    build=build,
    routing=routing,
)
