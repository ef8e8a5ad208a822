"""The systems an evaluation compares: `NAME=SPEC` parsed, then loaded.

SPEC is `base`, `adapter:PATH` (anything lrtool.adapters reads: PEFT directory, bare safetensors, kohya,
diffusers; merges too), `model:DIR` (a whole Hugging Face model, e.g. `merge --into-base` output, loaded
beside the base and sharing nothing), `peft:DIR` (a PEFT adapter applied by peft itself to a copy of the
base and merged into it, for what the canonical reader refuses: trainable token rows, DoRA...) or
`router:DIR` (a router written by `lrtool route`). Reads adapters through lrtool.adapters and models through
lrtool.models; writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lrtool.errors import UsageError

KINDS = ("base", "adapter", "model", "peft", "router")


@dataclass(frozen=True)
class SystemSpec:
    name: str
    kind: str  # one of KINDS
    path: str | None = None  # None for the base

    @property
    def spec(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"

    @property
    def shares_base(self) -> bool:
        """Runs on the one base in memory (base, adapters, routers), not as a model of its own."""
        return self.kind not in ("model", "peft")


def parse_system(text: str) -> SystemSpec:
    """`NAME=SPEC` -> SystemSpec; a usage error says what a SPEC looks like."""
    name, equals, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    shape = "--system takes NAME=SPEC with SPEC base, adapter:PATH, model:DIR, peft:DIR or router:DIR"
    if not equals or not name:
        raise UsageError(f"{shape}; got {text!r}")
    kind, colon, path = spec.partition(":")
    if kind == "base" and not colon:
        return SystemSpec(name, "base")
    if kind not in KINDS or kind == "base" or not colon or not path:
        raise UsageError(f"{shape}; got {text!r}")
    return SystemSpec(name, kind, path)


def gather_systems(
    systems: list[str] | None, adapters: list[str] | None = None, models: list[str] | None = None
) -> list[SystemSpec]:
    """The systems of a command line: each --system, then each --adapter / --model (named after its path);
    none at all means the base alone. Names must be unique."""
    specs = [parse_system(text) for text in systems or []]
    specs += [SystemSpec(_name_of(path), "adapter", path) for path in adapters or []]
    specs += [SystemSpec(_name_of(path), "model", path) for path in models or []]
    if not specs:
        specs = [SystemSpec("base", "base")]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise UsageError(f"two systems are named {spec.name!r}; give each --system its own NAME")
        seen.add(spec.name)
    return specs


def _name_of(path: str) -> str:
    stem = Path(path.rstrip("/")).name
    return stem.removesuffix(".safetensors") or path
