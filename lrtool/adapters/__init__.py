"""The canonical LoRA adapter: survey its files, read them into an Adapter, write PEFT directories.

Everything that touches LoRA weights goes through here (DESIGN.md, "The canonical adapter"):

- `adapter`: the Adapter / LoraModule model (delta W = scale * B @ A) and the checks every consumer needs;
- `grammar`: how PEFT, kohya, diffusers and mlx-lm name factors and alphas, and the features beyond plain
  LoRA;
- `files` (with `survey`, `checks`): what a file holds and every problem with a code, never refusing;
- `read`: the Adapter of a file, or its first refusing problem raised in one line;
- `write`: a PEFT directory peft loads unchanged, or a kohya, diffusers or mlx-lm file its tool loads.
"""

from lrtool.adapters.adapter import Adapter, LoraModule, all_finite, check_computable, same_base
from lrtool.adapters.files import survey
from lrtool.adapters.grammar import (
    FORMATS,
    PEFT_CONFIG,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    PICKLE_SUFFIXES,
    pattern_key,
)
from lrtool.adapters.read import load_adapter, match_module_names
from lrtool.adapters.survey import Problem, Survey
from lrtool.adapters.write import save_adapter, save_as

__all__ = [
    "FORMATS",
    "PEFT_CONFIG",
    "PEFT_PREFIX",
    "PEFT_WEIGHTS",
    "PICKLE_SUFFIXES",
    "Adapter",
    "LoraModule",
    "Problem",
    "Survey",
    "all_finite",
    "check_computable",
    "load_adapter",
    "match_module_names",
    "pattern_key",
    "same_base",
    "save_adapter",
    "save_as",
    "survey",
]
