"""Arrow (Ostapenko et al., 2024): route each token, at each layer, to the adapters whose top singular
direction it aligns with.

Per target module and adapter, the prototype is the top right singular vector of dW = scale * B @ A,
computed exactly from the factors (a QR of each factor and the SVD of the r x r core: lowrank.factored_svd;
no dense dW, no power iteration, signs fixed so the largest entry is positive). Per token and layer: the
score |<h, prototype>| of every adapter, the `top_k` best kept, softmax of score / temperature over them.
`mix outputs` (default, as peft's ArrowLinearVariant) adds the chosen adapters' outputs with those weights;
`mix factors` (as mttl's SkilledLoRA) applies the per-token weighted sums of their A's and B's. `general`
adapters give peft's GenKnowSub: their mean A and mean B are subtracted from every adapter before the
prototypes and in the applied adapters. Only the chosen adapters are computed: cost grows with top_k, not
with the number of adapters. Reads the adapters; writes `prototypes.<module>` [adapters, in] (float32).
"""

from __future__ import annotations

import torch

from lrtool import lowrank
from lrtool.adapters import Adapter, LoraModule
from lrtool.engine import TokenRouter
from lrtool.errors import IncompatibleError, UsageError
from lrtool.routers.base import BuildInputs, FixedRouting, Parameter, Router, RouterMethod, RoutingContext

MIXES = ("outputs", "factors")


def prototype(module: LoraModule) -> torch.Tensor:
    """The top right singular vector of scale * B @ A (float64), its largest entry positive; zeros for a
    zero update."""
    _, S, Vh = lowrank.factored_svd(module.B, module.A)
    if len(S) == 0 or float(S[0]) == 0.0:
        return torch.zeros(module.in_features, dtype=torch.float64)
    vector = Vh[0]
    return vector if vector[vector.abs().argmax()] >= 0 else -vector


def subtract_general(adapters: list[Adapter], general: list[Adapter]) -> list[Adapter]:
    """GenKnowSub (peft's gen_know_sub): each adapter's A and B minus the general adapters' mean A and mean B,
    module by module (equal ranks needed, as in peft); the scale stays."""
    result = []
    for adapter in adapters:
        modules = {}
        for name, module in adapter.modules.items():
            others = [g.modules[name] for g in general if name in g.modules]
            if not others:
                modules[name] = module
                continue
            if any(o.rank != module.rank for o in others):
                raise IncompatibleError(
                    f"{adapter.source}: module '{name}' has rank {module.rank} but a general adapter's "
                    "differs: GenKnowSub subtracts factors, which needs equal ranks"
                )
            mean_A = torch.stack([o.A.double() for o in others]).mean(0)
            mean_B = torch.stack([o.B.double() for o in others]).mean(0)
            A = (module.A.double() - mean_A).to(module.A.dtype)
            modules[name] = LoraModule(
                A=A, B=(module.B.double() - mean_B).to(module.B.dtype), scale=module.scale
            )
        result.append(Adapter(modules, base=adapter.base, format=adapter.format, source=adapter.source))
    return result


def build(inputs: BuildInputs) -> tuple[dict, dict[str, torch.Tensor]]:
    top_k = int(inputs.option("top_k", min(2, len(inputs.adapters))))
    temperature = float(inputs.option("temperature", 1.0))
    mix = inputs.option("mix", "outputs")
    if not 1 <= top_k <= len(inputs.adapters):
        raise UsageError(f"--top-k must be between 1 and the {len(inputs.adapters)} adapters, got {top_k}")
    if not temperature > 0:
        raise UsageError("--temperature must be positive")
    if mix not in MIXES:
        raise UsageError(f"--mix must be one of {', '.join(MIXES)}")
    adapters = subtract_general(inputs.adapters, inputs.general) if inputs.general else inputs.adapters
    tensors = {}
    for name in sorted({name for adapter in adapters for name in adapter.modules}):
        in_features = next(a.modules[name].in_features for a in adapters if name in a.modules)
        rows = [
            prototype(a.modules[name]) if name in a.modules else torch.zeros(in_features, dtype=torch.float64)
            for a in adapters
        ]
        tensors[f"prototypes.{name}"] = torch.stack(rows).to(torch.float32)
    parameters = {
        "top_k": top_k,
        "temperature": temperature,
        "mix": mix,
        "general_knowledge_subtraction": bool(inputs.general),
    }
    return parameters, tensors


class ArrowRouter(TokenRouter):
    """Per token and module: the top_k adapters by |<x, prototype>|, softmax(score / temperature) weights."""

    def __init__(
        self, prototypes: dict[str, torch.Tensor], slots: torch.Tensor, top_k: int, temperature: float
    ):
        self.prototypes, self.slots = prototypes, slots
        self.top_k, self.temperature = top_k, temperature

    def weights(self, module: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prototypes = self.prototypes.get(module)
        if prototypes is None:  # no adapter of this router adapts the module
            none = torch.full((x.shape[0], 1), -1, dtype=torch.long, device=x.device)
            return none, torch.zeros((x.shape[0], 1), dtype=x.dtype, device=x.device)
        scores = (x @ prototypes.to(x.dtype).T).abs()
        top, chosen = scores.topk(min(self.top_k, scores.shape[1]), dim=1)
        weights = torch.softmax(top.float() / self.temperature, dim=1)
        return self.slots.to(x.device)[chosen], weights


class ArrowFactorsRouter(ArrowRouter):
    """`mix factors`: per token, (sum_j w_j scale_j B_j) (sum_j w_j A_j) x over the chosen adapters j (ranks
    zero-padded to the largest, as the engine stacks them)."""

    def apply(self, engine, module, x, y):
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        indices, weights = self.weights(module, flat_x)
        if module not in engine.stacks:
            return
        A_all, B_all = engine.stacks[module]
        slots = torch.where(indices < 0, torch.full_like(indices, A_all.shape[0] - 1), indices)
        # Pass 1: h = sum_j w_j A_j x; pass 2: y += sum_j w_j B_j h. Both over (token, slot) pairs grouped by
        # adapter, so each chosen adapter computes only its tokens.
        h = torch.zeros(flat_x.shape[0], A_all.shape[2], dtype=flat_x.dtype, device=flat_x.device)
        for adapter, tokens, pair_weights in _groups(slots, weights):
            h.index_add_(0, tokens, (flat_x[tokens] @ A_all[adapter]) * pair_weights[:, None].to(h.dtype))
        for adapter, tokens, pair_weights in _groups(slots, weights):
            flat_y.index_add_(0, tokens, (h[tokens] * pair_weights[:, None].to(h.dtype)) @ B_all[adapter])


def _groups(slots: torch.Tensor, weights: torch.Tensor):
    """(adapter, its tokens, their weights) for each adapter some (token, slot) pair chose."""
    flat = slots.reshape(-1)
    order = torch.argsort(flat, stable=True)
    chosen, counts = torch.unique_consecutive(flat[order], return_counts=True)
    start, k = 0, slots.shape[1]
    for adapter, count in zip(chosen.tolist(), counts.tolist()):
        pairs = order[start : start + count]
        start += count
        yield adapter, pairs // k, weights.reshape(-1)[pairs]


def prepare(router: Router, adapters: list[Adapter], general: list[Adapter]) -> list[Adapter]:
    return subtract_general(adapters, general) if general else adapters


def routing(router: Router, slots: list[int], context: RoutingContext):
    parameters = router.parameters
    prefix = "prototypes."
    prototypes = {
        name[len(prefix) :]: tensor.to(next(context.model.parameters()).device)
        for name, tensor in router.tensors.items()
        if name.startswith(prefix)
    }
    if not prototypes:
        router.tensor("prototypes.<module>")  # the error naming what is missing
    kind = ArrowFactorsRouter if parameters.get("mix") == "factors" else ArrowRouter
    part = kind(prototypes, torch.tensor(slots), int(parameters["top_k"]), float(parameters["temperature"]))
    return FixedRouting(part)


METHOD = RouterMethod(
    name="arrow",
    summary="per token and layer, the top-k adapters by alignment with each adapter's top singular vector",
    parameters=(
        Parameter("top_k", 2, "adapters mixed per token (at most the number of adapters)"),
        Parameter("temperature", 1.0, "softmax temperature over the kept scores"),
        Parameter(
            "mix", "outputs", "outputs (sum of the chosen adapters' outputs) or factors (mixed A and B)"
        ),
        Parameter("general", [], "general adapters whose mean is subtracted first (GenKnowSub)"),
    ),
    build=build,
    prepare=prepare,
    routing=routing,
)
