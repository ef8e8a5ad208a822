"""What a survey of an adapter's files finds: the facts (Survey) and the problems (Problem), with codes.

Reads and writes nothing: plain records that lrtool.adapters.files fills, lrtool.adapters.checks adds to,
lrtool.adapters.read turns into an Adapter or a refusal, and diagnose turns into findings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Problem:
    """Something wrong with (or beyond) a plain LoRA file. `message` names no path; `file` is the file it
    is about (its name prefixes the message in reports, its path in errors)."""

    code: str
    message: str
    severity: str | None = None  # None: the code's own (diagnose's table of findings)
    module: str | None = None
    file: Path | None = None
    refuses: bool = True  # whether the canonical reader refuses the file for it
    unsupported: bool = False  # refused as a feature lrtool cannot represent (not as broken input)

    @property
    def text(self) -> str:
        """The message as a report gives it (the file's name first when the problem is about a file)."""
        return (
            f"{self.file.name}: {self.message}"
            if self.file is not None and self.module is None
            else self.message
        )

    def error_text(self, path: str | Path) -> str:
        """The message as an error gives it: the file's path (or `path`), the module, the message."""
        where = str(self.file) if self.file is not None else str(path)
        module = f"module '{self.module}' " if self.module else ""
        return f"{where}: {module}{self.message}"


@dataclass
class Survey:
    """What the files of one adapter hold, as far as can be told without reading a tensor."""

    path: str
    config_path: Path | None = None
    weights: Path | None = None
    config: dict | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # tensor key -> torch dtype name
    metadata: dict[str, str] = field(default_factory=dict)  # the safetensors header's
    groups: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> {"A"|"B"|"alpha": key}
    # naming families seen: peft, peft-prefixed, kohya, diffusers, diffusers-old, mlx, alpha
    families: set[str] = field(default_factory=set)
    transposed: set[str] = field(default_factory=set)  # factor keys stored transposed (mlx-lm's)
    features: dict[str, str] = field(default_factory=dict)  # module -> what beyond LoRA its tensors hold
    well_formed: set[str] = field(default_factory=set)  # modules whose factors form a LoRA
    # module -> {"A": [r, in], "B": [out, r]}, the canonical shapes (a conv's A flattened), well-formed only
    factor_shapes: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    kernels: dict[str, tuple[int, ...]] = field(default_factory=dict)  # module -> a conv layer's kernel size
    # diffusers' lora_adapter_metadata: component ("" when unprefixed) -> its LoraConfig fields
    component_configs: dict[str, dict] = field(default_factory=dict)
    format: str | None = None  # peft | torchtune | kohya | diffusers | diffusers-old | mlx
    base: str | None = None
    rslora: bool | None = None
    alpha: float | None = None
    dtype: str | None = None  # of the factors, or "mixed"
    size_bytes: int = 0
    alphas: dict[str, float] = field(default_factory=dict)  # module -> its alpha tensor (kohya, diffusers)
    problems: list[Problem] = field(default_factory=list)

    def add(
        self, code: str, message: str, module: str | None = None, severity: str | None = None, **kw
    ) -> None:
        self.problems.append(Problem(code, message, severity, module, **kw))

    def component_config(self, module: str) -> tuple[str, dict] | None:
        """(the module's path within its diffusers component, the component's LoraConfig fields from
        lora_adapter_metadata), or None when the metadata does not cover the module."""
        if "" in self.component_configs:
            return module, self.component_configs[""]
        component, _, within = module.partition(".")
        if component in self.component_configs and within:
            return within, self.component_configs[component]
        return None

    def rank(self, module: str) -> int | None:
        """A module's rank: its canonical A's first dimension (or a 2-D A's, when it is malformed)."""
        if module in self.factor_shapes:
            return self.factor_shapes[module]["A"][0]
        key = self.groups.get(module, {}).get("A")
        if key is None or len(self.shapes[key]) != 2:
            return None
        return self.shapes[key][1 if key in self.transposed else 0]

    def rename(self, mapping: dict[str, str]) -> None:
        """Rename modules (old name -> new, every module named) in everything keyed by module."""
        self.groups = {mapping[m]: slots for m, slots in self.groups.items()}
        self.well_formed = {mapping[m] for m in self.well_formed}
        self.factor_shapes = {mapping[m]: shapes for m, shapes in self.factor_shapes.items()}
        self.kernels = {mapping[m]: kernel for m, kernel in self.kernels.items()}
        self.alphas = {mapping[m]: alpha for m, alpha in self.alphas.items()}
        self.features = {mapping.get(m, m): feature for m, feature in self.features.items()}

    @property
    def unreadable(self) -> bool:
        return any(p.code == "unreadable" for p in self.problems)

    @property
    def refusal(self) -> Problem | None:
        """The first problem the canonical reader refuses the file for, or None."""
        return next((p for p in self.problems if p.refuses), None)
