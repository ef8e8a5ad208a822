"""diagnose --base: an adapter against the model it is for.

Reads the base directory's safetensors through model_files.ModelFiles, the reader merge --into-base uses
(the same rule for which files hold the weights): the weights' shapes from the headers, and a weight's
values only when its norm is asked for. Writes nothing. Also here: the renaming of kohya's mangled module
names to the base's module paths (or the other adapters'), and the findings missing-in-base and
base-shape-mismatch.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lrtool.adapters import Adapter, LoraModule, match_module_names
from lrtool.diagnose.reading import AdapterInput
from lrtool.errors import IncompatibleError, InputError
from lrtool.model_files import FLOATING, ModelFiles


class BaseWeights:
    """A Hugging Face model directory's weights, known by their safetensors headers; norms read on demand."""

    def __init__(self, files: ModelFiles):
        self.files = files
        # module path -> the shape of `<module>.weight`
        self.shapes = {name: files.tensors[f"{name}.weight"].shape for name in files.module_names}
        self._norms: dict[str, float | None] = {}  # read on demand, kept

    def shape(self, module: str) -> list[int] | None:
        """The shape of the weight of module path `module` (resolved as ModelFiles.weight_key resolves it),
        None when the base has none."""
        key = self.files.weight_key(module)
        return None if key is None else self.files.tensors[key].shape

    @classmethod
    def read(cls, spec: str) -> BaseWeights:
        """Read the weight headers of a local model directory; InputError when it is not one."""
        path = Path(spec)
        if not path.is_dir():
            raise InputError(f"{spec}: no such directory; --base takes a local Hugging Face model directory")
        if not (path / "config.json").is_file() and not (path / "model_index.json").is_file():
            raise InputError(
                f"{spec}: not a model directory (no config.json, nor a pipeline's model_index.json)"
            )
        return cls(ModelFiles.open(path))

    def norm(self, module: str) -> float | None:
        """||W||_F of `<module>.weight` (None for integer, i.e. quantized, weights)."""
        if module not in self._norms:
            key = self.files.weight_key(module)
            norm = None
            if key is not None and self.files.tensors[key].dtype in FLOATING:
                weight = self.files.read(key)
                if weight.dtype.itemsize < 2:  # float8: no norm in torch on the CPU, so read in float64
                    weight = weight.to(torch.float64)
                norm = float(torch.linalg.vector_norm(weight, dtype=torch.float64))
            self._norms[module] = norm
        return self._norms[module]


def rename_modules(item: AdapterInput, reference: set[str], base: BaseWeights | None) -> None:
    """Rename kohya's underscore-mangled module names to the reference's dotted paths (adapters'
    match_module_names), in the modules, the findings and item.lora."""
    names = set(item.groups) | {f["module"] for f in item.findings if f["module"]}
    if not names or not reference:
        return
    # match_module_names renames an Adapter's modules; a placeholder per name tells which name went where.
    placeholders = {name: LoraModule(A=torch.empty(0, 0), B=torch.empty(0, 0), scale=0.0) for name in names}
    try:
        renamed = match_module_names(Adapter(modules=placeholders, source=item.path), reference)
    except IncompatibleError as error:
        if base is not None:
            item.add("missing-in-base", f"cannot match its modules to the base's: {error}")
        return
    new_name = {id(placeholder): name for name, placeholder in renamed.modules.items()}
    mapping = {name: new_name[id(placeholder)] for name, placeholder in placeholders.items()}
    item.rename(mapping)
    item.lora = {mapping[m]: module for m, module in item.lora.items()}
    for f in item.findings:
        f["module"] = mapping.get(f["module"], f["module"])


def check_base(item: AdapterInput, base: BaseWeights) -> None:
    """missing-in-base and base-shape-mismatch; modules that fail either get no relative norm."""
    transposed = bool((item.config or {}).get("fan_in_fan_out", False))  # GPT-2's Conv1D stores [in, out]
    for name in sorted(item.well_formed):
        out_features, in_features = item.factor_shapes[name]["B"][0], item.factor_shapes[name]["A"][1]
        shape = base.shape(name)
        if shape is None:
            item.add(
                "missing-in-base", f"the base has no weight {name}.weight: this update would do nothing", name
            )
            continue
        kernel = item.kernels.get(name)
        if kernel is not None:  # a conv weight: [out, in, *kernel], the update's in flattened with it
            expected = [out_features, in_features // math.prod(kernel), *kernel]
            what = f"[out, in, *kernel] = {expected}"
        else:
            expected = [in_features, out_features] if transposed else [out_features, in_features]
            what = f"[out, in] = [{out_features}, {in_features}]"
        if shape != expected:
            item.add("base-shape-mismatch", f"the update is {what} but the base weight is {shape}", name)
