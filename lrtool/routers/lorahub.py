"""LoraHub (Huang et al., 2023): one weight per adapter, found gradient-free on a few examples.

The combined adapter is sum_i w_i A_i and sum_i w_i scale_i B_i (LoraHub weights the factors separately;
the scales are folded into B, so adapters of different alphas combine as applied), with w in [-1.5, 1.5]
searched by nevergrad's NGOpt (the original's choice) from w = 0 in `budget` evaluations of the loss: the
mean cross-entropy of the examples' answers (and EOS) + 0.05 * mean |w| (the original's L1). The search is
seeded. Needs equal ranks per module (the factors are added). Reads the base, the adapters and the examples;
writes `weights` [adapters] and the search's trace (router.json's parameters.search). Applied at eval as
the one combined adapter.
"""

from __future__ import annotations

import torch

from lrtool.adapters import Adapter, LoraModule
from lrtool.engine import OneAdapter
from lrtool.errors import IncompatibleError, InputError, UsageError
from lrtool.routers.base import (
    CHAT_TEMPLATE,
    BuildInputs,
    FixedRouting,
    Parameter,
    Router,
    RouterMethod,
    RoutingContext,
)

BOUND = 1.5  # weights live in [-BOUND, BOUND], as in LoraHub
L1 = 0.05  # the weight of mean |w| in the objective, as in LoraHub


def combined(adapters: list[Adapter], weights: list[float]) -> Adapter:
    """The adapter sum_i w_i A_i, sum_i w_i scale_i B_i (scale 1), module by module."""
    modules = {}
    for name in sorted({n for a in adapters for n in a.modules}):
        parts = [(w, a.modules[name]) for w, a in zip(weights, adapters) if name in a.modules]
        if len({m.rank for _, m in parts}) > 1:
            ranks = ", ".join(str(m.rank) for _, m in parts)
            raise IncompatibleError(
                f"module '{name}' has ranks {ranks}: LoraHub adds the factors, which needs equal ranks"
            )
        A = sum(w * m.A.double() for w, m in parts)
        B = sum(w * m.scale * m.B.double() for w, m in parts)
        dtype = parts[0][1].A.dtype
        modules[name] = LoraModule(A=A.to(dtype), B=B.to(dtype), scale=1.0)
    return Adapter(modules, base=adapters[0].base, source="lorahub")


def build(inputs: BuildInputs) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        import nevergrad as ng
    except ImportError:
        raise InputError(
            "router lorahub needs nevergrad: pip install 'lrtool[lorahub]' (or nevergrad)"
        ) from None
    import numpy as np

    examples = inputs.option("examples", [])
    if len(examples) != 1 or "=" in examples[0]:
        raise UsageError("router lorahub takes --examples FILE.jsonl: a few examples of the task to fit")
    budget, seed = int(inputs.option("budget", 40)), int(inputs.option("seed", 0))
    if budget < 1:
        raise UsageError("--budget must be at least 1")
    combined(inputs.adapters, [1.0] * len(inputs.adapters))  # the rank check, before the base loads
    chat_template = bool(inputs.option("chat_template", False))
    loss = _objective(inputs.adapters, examples[0], inputs.base, chat_template)
    start = [0.0] * len(inputs.adapters)
    trace = []

    def score(weights) -> float:
        value = loss([float(w) for w in weights]) + L1 * float(np.abs(weights).mean())
        trace.append({"weights": [float(w) for w in weights], "objective": value})
        inputs.log(f"lorahub {len(trace)}/{budget}: objective {value:.4f}")
        return value

    start_value = score(np.array(start))
    parametrization = ng.p.Array(init=np.array(start), lower=-BOUND, upper=BOUND)
    parametrization.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
    for _ in range(budget):
        candidate = optimizer.ask()
        optimizer.tell(candidate, score(candidate.value))
    best = min(trace, key=lambda entry: entry["objective"])
    parameters = {
        "budget": budget,
        "seed": seed,
        "examples": examples[0],
        "start_objective": start_value,
        "objective": best["objective"],
        "weights": best["weights"],
        "search": trace,
    }
    if chat_template:  # recorded only when used: routers built without it keep their bytes
        parameters["chat_template"] = True
    return parameters, {"weights": torch.tensor(best["weights"], dtype=torch.float64)}


def _objective(adapters: list[Adapter], examples: str, base: str, chat_template: bool = False):
    """w -> mean cross-entropy per answer token (EOS included) of the examples under the combined adapter."""
    from lrtool.decoding import continuation_logliks
    from lrtool.encoding import answers_after, check_chat_template, prompt_ids
    from lrtool.engine import AdapterEngine, Plan
    from lrtool.io import read_jsonl
    from lrtool.models import load_base

    model, tokenizer = load_base(base)
    check_chat_template(tokenizer, chat_template, base)
    model.eval()
    rows = []
    for obj in read_jsonl(examples):
        head = prompt_ids(tokenizer, obj["prompt"], chat_template)
        rows.append((head, answers_after(tokenizer, head, obj["prompt"], [obj["answer"]], chat_template)[0]))
    if not rows:
        raise InputError(f"{examples}: no examples")
    tokens = sum(len(answer) for _, answer in rows)

    def loss(weights: list[float]) -> float:
        engine = AdapterEngine(model, [combined(adapters, weights)])
        try:
            with torch.inference_mode():
                total = 0.0
                for start in range(0, len(rows), 64):
                    batch = rows[start : start + 64]
                    plan = Plan.by_row([OneAdapter(0)] * len(batch))
                    total += sum(
                        continuation_logliks(
                            model, batch, pad_id=tokenizer.pad_token_id, engine=engine, plan=plan
                        )
                    )
        finally:
            engine.close()
        return -total / tokens

    return loss


def prepare(router: Router, adapters: list[Adapter], general: list[Adapter]) -> list[Adapter]:
    return [combined(adapters, router.tensor("weights").tolist())]


def routing(router: Router, slots: list[int], context: RoutingContext):
    return FixedRouting(OneAdapter(slots[0]))


METHOD = RouterMethod(
    name="lorahub",
    summary="one weight per adapter, searched gradient-free (NGOpt) on a few examples; factors combined",
    parameters=(
        Parameter("examples", [], "FILE.jsonl: a few examples of the task the weights are fitted to"),
        Parameter("budget", 40, "evaluations of the objective"),
        Parameter("seed", 0, "seed of the search"),
        CHAT_TEMPLATE,
    ),
    build=build,
    prepare=prepare,
    routing=routing,
    needs_base=True,
    per_token=False,
)
