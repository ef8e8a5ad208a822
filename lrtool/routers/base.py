"""What every router shares: the router directory's format, the method API, and per-row routing parts.

A router is a directory (documented in `lrtool route --help` and the man page, meant to be read by other
programs too):

    router.json          {"format": "lrtool-router", "format_version": 1, "method": NAME,
                          "adapters": [{"name", "path", "sha256"}...], "general": [...same...],
                          "parameters": {...}}  (paths relative to the router directory when they can be)
    router.safetensors   the method's tensors (Arrow's prototypes, centroids, LoraHub's weights; may be empty)
    lrtool.json          the manifest every lrtool output carries

`Router.load` reads and checks one (format version, every tensor the method needs, each adapter's sha256
unchanged since the router was built); `Router.save` writes the two files into a directory the caller makes
atomic. A `RouterMethod` builds a router's parameters and tensors from adapters (lrtool route) and turns a
loaded router into the engine's routing for eval (`RowRouting` when it picks per example, a TokenRouter
when per token).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lrtool.adapters import Adapter
from lrtool.engine import Part, TokenRouter
from lrtool.errors import InputError, UsageError, one_line
from lrtool.io import dumps_report, sha256_path

FORMAT = "lrtool-router"
FORMAT_VERSION = 1
ROUTER_JSON = "router.json"
ROUTER_TENSORS = "router.safetensors"


@dataclass(frozen=True)
class Parameter:
    """A parameter a router method takes (a flag of `lrtool route`): its name, default and help."""

    name: str
    default: object
    help: str


# The routers that run the base on examples (centroid, lorahub) format their prompts as train and eval do.
CHAT_TEMPLATE = Parameter(
    "chat_template",
    False,
    "format the examples' prompts with the base's chat template (as train and eval --chat-template)",
)


@dataclass
class AdapterRef:
    """An adapter a router uses: the name routing decisions call it by, where it is, its sha256."""

    name: str
    path: str  # as given to lrtool route, or resolved against the router directory when loaded
    sha256: str


@dataclass
class Router:
    """A router in memory: its method, the adapters it routes between (and general ones), its parameters
    and tensors."""

    method: str
    adapters: list[AdapterRef]
    parameters: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    general: list[AdapterRef] = field(default_factory=list)
    directory: Path | None = None

    @property
    def names(self) -> list[str]:
        return [ref.name for ref in self.adapters]

    def save(self, directory: str | Path) -> None:
        """Write router.json and router.safetensors into `directory` (atomicity is the caller's)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        final = directory  # adapter paths are written relative to where the router will live
        content = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "adapters": [_ref_entry(ref, self.directory or final) for ref in self.adapters],
            "general": [_ref_entry(ref, self.directory or final) for ref in self.general],
            "parameters": self.parameters,
        }
        (directory / ROUTER_JSON).write_text(dumps_report(content), encoding="utf-8")
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in sorted(self.tensors.items())}
        save_file(tensors, str(directory / ROUTER_TENSORS), metadata={"format": "pt"})

    @classmethod
    def load(cls, directory: str | Path, check_hashes: bool = True) -> Router:
        """Read a router directory; InputError naming the file and what to do when it cannot be used."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        spec = directory / ROUTER_JSON
        if not spec.is_file():
            raise InputError(f"{directory}: not a router (no {ROUTER_JSON}); build one with lrtool route")
        try:
            content = json.loads(spec.read_text(encoding="utf-8"))
            if content.get("format") != FORMAT:
                raise ValueError(f"format is {content.get('format')!r}, not {FORMAT!r}")
            version = content["format_version"]
            if not isinstance(version, int) or version > FORMAT_VERSION:
                raise InputError(
                    f"{spec}: router format version {version} is newer than this lrtool reads "
                    f"({FORMAT_VERSION}); upgrade lrtool"
                )
            refs = [_ref_of(entry, directory) for entry in content["adapters"]]
            general = [_ref_of(entry, directory) for entry in content.get("general", [])]
            router = cls(
                content["method"], refs, dict(content["parameters"]), general=general, directory=directory
            )
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(
                f"{spec}: not a valid router ({one_line(error)}); rebuild it with lrtool route"
            ) from None
        try:
            router.tensors = load_file(str(directory / ROUTER_TENSORS))
        except (SafetensorError, OSError) as error:
            raise InputError(
                f"{directory / ROUTER_TENSORS}: cannot be read ({one_line(error)}); rebuild the router"
            ) from None
        if check_hashes:
            for ref in [*router.adapters, *router.general]:
                if not Path(ref.path).exists():
                    raise InputError(f"{directory}: its adapter {ref.name} is missing ({ref.path})")
                if sha256_path(ref.path) != ref.sha256:
                    raise InputError(
                        f"{directory}: its adapter {ref.name} ({ref.path}) changed since the router was "
                        "built; rebuild the router with lrtool route"
                    )
        return router

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise InputError(f"{self.directory}: {ROUTER_TENSORS} lacks tensor '{name}'; rebuild the router")
        return self.tensors[name]


def _ref_entry(ref: AdapterRef, directory: Path) -> dict:
    """An adapter as router.json records it: its path relative to the router directory when both are
    local, so a folder of router and adapters can move as one."""
    path = Path(ref.path)
    try:
        relative = os.path.relpath(path.resolve(), Path(directory).resolve())
    except ValueError:  # another drive
        relative = str(path.resolve())
    return {"name": ref.name, "path": relative, "sha256": ref.sha256}


def _ref_of(entry: dict, directory: Path) -> AdapterRef:
    path = Path(entry["path"])
    return AdapterRef(
        str(entry["name"]), str(path if path.is_absolute() else directory / path), str(entry["sha256"])
    )


def adapter_refs(paths: Sequence[str]) -> list[AdapterRef]:
    """Refs of adapters given on the command line, named by their paths' stems (made unique by index)."""
    stems = [Path(p.rstrip("/")).name.removesuffix(".safetensors") or p for p in paths]
    names = [stem if stems.count(stem) == 1 else f"{stem}-{i + 1}" for i, stem in enumerate(stems)]
    return [AdapterRef(name, path, sha256_path(path)) for name, path in zip(names, paths)]


@dataclass
class BuildInputs:
    """What `lrtool route` gives a method to build from: the adapters (loaded), their refs, the general
    adapters, the method's options, and a way to load the base when a method needs one."""

    adapters: list[Adapter]
    refs: list[AdapterRef]
    options: dict
    general: list[Adapter] = field(default_factory=list)
    base: str | None = None
    log: Callable[[str], None] = lambda message: None

    def option(self, name: str, default=None):
        value = self.options.get(name)
        return default if value is None else value


@dataclass
class RoutingContext:
    """What a router may use when eval applies it: the engine (and the base model in it) and the tokenizer."""

    engine: object
    model: object
    tokenizer: object


def task_adapters(router: Router, adapters: list[Adapter], general: list[Adapter]) -> list[Adapter]:
    """The adapters the engine holds for a router: by default the ones it routes between, as they are."""
    return adapters


@dataclass(frozen=True)
class RouterMethod:
    """A router: its name, summary, parameters (the route flags it takes), whether it needs a base, and its
    computations: `build` (adapters -> parameters and tensors), `prepare` (a loaded router's adapters -> the
    adapters the engine holds for it) and `routing` (the router and those adapters' engine indices -> what
    eval applies to its rows)."""

    name: str
    summary: str
    parameters: tuple[Parameter, ...]
    build: Callable[[BuildInputs], tuple[dict, dict[str, torch.Tensor]]]
    routing: Callable[[Router, list[int], RoutingContext], Routing]
    prepare: Callable[[Router, list[Adapter], list[Adapter]], list[Adapter]] = task_adapters
    needs_base: bool = False
    per_token: bool = True

    def describe(self) -> dict:
        return {
            "name": self.name,
            "summary": self.summary,
            "per_token": self.per_token,
            "needs_base": self.needs_base,
            "parameters": [{"name": p.name, "default": p.default, "help": p.help} for p in self.parameters],
        }


class Routing:
    """What eval applies for a router system: `part(examples)` is the engine Part for a batch's rows of this
    system (the examples in row order; a per-token router returns the same part for any rows)."""

    def part(self, examples: Sequence) -> Part:
        raise NotImplementedError


class FixedRouting(Routing):
    """The same part for every batch (per-token routers, fixed mixtures)."""

    def __init__(self, part: Part):
        self.fixed = part

    def part(self, examples: Sequence) -> Part:
        return self.fixed


class RowMixture(TokenRouter):
    """Per-row routing (per example): every token of row i gets adapters indices[i] with weights[i]."""

    def __init__(self, indices: torch.Tensor, weights: torch.Tensor):
        self.indices, self.row_weights = indices, weights  # [rows, k]

    def weights(self, module: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = x.shape[0] // self.indices.shape[0]  # x is the segment's rows flattened, row-major
        indices = self.indices.to(x.device).repeat_interleave(tokens, dim=0)
        return indices, self.row_weights.to(x.device).repeat_interleave(tokens, dim=0)

    def select(self, rows: torch.Tensor) -> Part:
        return RowMixture(self.indices[rows], self.row_weights[rows])


def adapter_named(text: str, names: list[str], flag: str) -> str:
    """The adapter a flag's value names, by its name or by its path; a usage error listing the names."""
    wanted = text.strip().rstrip("/")
    stem = wanted.rsplit("/", 1)[-1].removesuffix(".safetensors")
    for name in names:
        if name in (wanted, stem):
            return name
    raise UsageError(f"{flag}: no adapter is called {wanted!r} (adapters: {', '.join(names)})")


def check_options(method: RouterMethod, options: dict) -> None:
    """Refuse route options the method does not take (a usage error naming the method's parameters)."""
    taken = {p.name for p in method.parameters}
    extra = sorted(
        name for name, value in options.items() if value not in (None, [], ()) and name not in taken
    )
    if extra:
        flags = ", ".join("--" + name.replace("_", "-") for name in extra)
        takes = ", ".join("--" + p.name.replace("_", "-") for p in method.parameters) or "no options"
        raise UsageError(f"router {method.name} does not take {flags} (it takes {takes})")
