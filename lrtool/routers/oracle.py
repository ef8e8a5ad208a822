"""Oracle: each example goes to the adapter its label names (mttl's TaskNameSelector).

`by` names a meta key and `map` takes its values to adapters: an example whose meta[by] is mapped gets
that adapter alone; any other example gets none (the base), which --explain reports. The upper bound for
data-free routers. Reads the adapters' names; writes no tensor.
"""

from __future__ import annotations

import torch

from lrtool.errors import UsageError
from lrtool.routers.base import (
    BuildInputs,
    Parameter,
    Router,
    RouterMethod,
    Routing,
    RoutingContext,
    RowMixture,
    adapter_named,
)


def parse_map(text: str, names: list[str]) -> dict[str, str]:
    """`VALUE=ADAPTER,...` -> {value: adapter name}; an adapter may be named by its name or its path."""
    mapping = {}
    for item in (part.strip() for part in text.split(",")):
        value, equals, adapter = item.partition("=")
        if not equals or not value.strip() or not adapter.strip():
            raise UsageError(f"--map takes VALUE=ADAPTER,...; got {item!r}")
        mapping[value.strip()] = adapter_named(adapter, names, f"--map {item}")
    return mapping


def build(inputs: BuildInputs) -> tuple[dict, dict[str, torch.Tensor]]:
    key, text = inputs.option("by"), inputs.option("map")
    if not key or not text:
        raise UsageError("router oracle needs --by KEY and --map VALUE=ADAPTER,...")
    key = key.removeprefix("meta.")
    return {"by": key, "map": parse_map(text, [ref.name for ref in inputs.refs])}, {}


class OracleRouting(Routing):
    def __init__(self, key: str, slot_of: dict[str, int]):
        self.key, self.slot_of = key, slot_of

    def choice(self, meta: dict) -> int:
        """The engine slot of an example's adapter, -1 when its label is not mapped."""
        value = meta.get(self.key)
        return self.slot_of.get(str(value), -1) if value is not None else -1

    def part(self, examples):
        indices = torch.tensor([[self.choice(example.meta)] for example in examples])
        return RowMixture(indices, torch.ones(indices.shape, dtype=torch.float32))


def routing(router: Router, slots: list[int], context: RoutingContext):
    slot_of_name = dict(zip(router.names, slots))
    return OracleRouting(
        router.parameters["by"], {v: slot_of_name[n] for v, n in router.parameters["map"].items()}
    )


METHOD = RouterMethod(
    name="oracle",
    summary="each example to the adapter its meta label names (an upper bound for data-free routers)",
    parameters=(
        Parameter("by", None, "the meta key that labels examples (meta.KEY or KEY)"),
        Parameter("map", None, "VALUE=ADAPTER,...: which adapter each label goes to"),
    ),
    build=build,
    routing=routing,
    per_token=False,
)
