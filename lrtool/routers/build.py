"""`lrtool route`, top-down: read the adapters, check they belong together, build the router, and load one
back for eval.

Reads adapters through lrtool.adapters (and, for routers that need it, the base through lrtool.models);
returns a `Router` for the caller to save into its (atomic) output directory. `load_for_eval` reads a
router directory and gives eval the adapters its engine must hold and how to route between them.
"""

from __future__ import annotations

from collections.abc import Callable

from lrtool.adapters import Adapter, check_computable, load_adapter, match_module_names, same_base
from lrtool.errors import IncompatibleError, UsageError
from lrtool.routers import get
from lrtool.routers.base import (
    CHAT_TEMPLATE,
    BuildInputs,
    Router,
    RoutingContext,
    adapter_refs,
    check_options,
)


def build_router(
    paths: list[str],
    method_name: str,
    options: dict,
    general: list[str] | None = None,
    base: str | None = None,
    log: Callable[[str], None] = lambda message: None,
    allow_base_mismatch: bool = False,
) -> Router:
    """The router `method_name` over the adapters at `paths` (see each router's module for what it builds)."""
    method = get(method_name)
    check_options(method, {**options, "general": general})
    if method.needs_base and base is None:
        raise UsageError(f"router {method.name} needs --base BASE (it runs the base on examples)")
    if len(set(paths)) < len(paths):
        raise UsageError("an adapter is given twice; give each once")
    refs = adapter_refs(paths)
    adapters = _load([ref.path for ref in refs])
    general_adapters = _load(general or [])
    _check_together([*adapters, *general_adapters], allow_base_mismatch)
    inputs = BuildInputs(adapters, refs, options, general=general_adapters, base=base, log=log)
    parameters, tensors = method.build(inputs)
    return Router(method.name, refs, parameters, tensors, general=adapter_refs(general or []))


def _load(paths: list[str]) -> list[Adapter]:
    adapters = [load_adapter(path) for path in paths]
    dotted = sorted({name for a in adapters for name in a.modules if "." in name})
    adapters = [match_module_names(adapter, dotted) for adapter in adapters]
    for adapter in adapters:
        check_computable(adapter)
    return adapters


def _check_together(adapters: list[Adapter], allow_base_mismatch: bool = False) -> None:
    """Adapters one router can route between: one declared base (unless allowed otherwise), one shape per
    module (always)."""
    declared = [(a.base, a.source) for a in adapters if a.base]
    for base, source in declared[1:]:
        if not allow_base_mismatch and not same_base(base, declared[0][0]):
            raise IncompatibleError(
                f"adapters for different bases: {declared[0][1]} is for '{declared[0][0]}' but {source} is "
                f"for '{base}'; if these name one model, pass --allow-base-mismatch"
            )
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for adapter in adapters:
        for name, module in adapter.modules.items():
            shape = (module.out_features, module.in_features)
            first = shapes.setdefault(name, (shape, adapter.source))
            if first[0] != shape:
                raise IncompatibleError(
                    f"module '{name}' is {list(first[0])} (out, in) in {first[1]} but {list(shape)} in "
                    f"{adapter.source}: adapters for different bases"
                )


def prompt_format_mismatch(router: Router, chat_template: bool) -> str | None:
    """Why a router built from prompts (centroid, lorahub) would route prompts formatted unlike its
    examples: its --chat-template differs from the one it is applied with; None when they agree."""
    if CHAT_TEMPLATE not in get(router.method).parameters:
        return None
    built = bool(router.parameters.get("chat_template", False))
    if built == chat_template:
        return None
    return (
        f"the router was built {'with' if built else 'without'} --chat-template and is applied "
        f"{'with' if chat_template else 'without'} it: it saw its examples' prompts formatted otherwise"
    )


def load_for_eval(
    directory: str,
) -> tuple[Router, list[Adapter], Callable[[list[int], RoutingContext], object]]:
    """(the router, the adapters eval's engine must hold for it, routing(slots, context) -> Routing)."""
    router = Router.load(directory)
    method = get(router.method)
    adapters = _load([ref.path for ref in router.adapters])
    general = _load([ref.path for ref in router.general])
    held = method.prepare(router, adapters, general)
    return router, held, lambda slots, context: method.routing(router, slots, context)
