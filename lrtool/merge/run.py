"""One merge, top down: load -> plan -> write -> receipt. What `lrtool merge` runs.

Reads the adapters (lrtool.adapters) and, with --into-base, the base's safetensors (model_files.ModelFiles);
writes the output directory atomically (lrtool.outputs): an adapter (plan.py) in the inputs' format when they
share one (peft, kohya, diffusers or mlx; `output_format`), PEFT otherwise, or the base model with the
update added (into_base.py), merge_report.json (receipt.py) and lrtool.json (the manifest the caller gives,
its seed and inputs' sha256 filled in here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lrtool import io, outputs
from lrtool.adapters import FORMATS, Adapter, load_adapter
from lrtool.errors import UsageError
from lrtool.merge import receipt
from lrtool.merge.base import Method
from lrtool.merge.into_base import check_fits, open_base, write_model
from lrtool.merge.plan import check_names_matched, match_names, plan_merge


def run(
    paths: Sequence[str],
    method: str | Method,
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
    into_base: str | None = None,
    allow_base_mismatch: bool = False,
    format: str | None = None,
    force: bool = False,
    manifest: io.Manifest | None = None,
    **parameters,
) -> dict:
    """Merge the adapters at `paths` with `method` into the directory `out` (into the weights of the model
    directory `into_base` when given) and return the receipt. Every check is done before anything is
    written; a failure leaves no output. `parameters`: the method's others, as plan_merge takes them. Raises
    UsageError, InputError or IncompatibleError (what plan_merge and into_base refuse) and OutputExistsError
    (an output that is not free: outputs.check_output_free). `format` is the adapter's format (FORMATS); None:
    the inputs' own when they share one, else peft."""
    if format is not None and into_base is not None:
        raise UsageError("--format sets the adapter's format; --into-base writes a model, so drop --format")
    if format is not None and format not in FORMATS:
        raise UsageError(f"unknown --format {format!r}; choose one of {', '.join(FORMATS)}")
    inputs = [*paths, *([into_base] if into_base else [])]
    outputs.check_output_free(out, force, inputs, directory=True)  # before the work, so none is wasted

    # load
    adapters = [load_adapter(path) for path in paths]
    base = open_base(into_base) if into_base is not None else None
    format = format or output_format(adapters)

    # plan: every check, nothing computed
    adapters = match_names(adapters, base)
    plan = plan_merge(
        adapters,
        method,
        weights,
        rank,
        density,
        seed,
        into_base=base is not None,
        allow_base_mismatch=allow_base_mismatch,
        **parameters,
    )
    check_names_matched(adapters, base, format)  # also when no name is dotted (only kohya inputs, no base)
    if base is not None:
        check_fits(plan, base)
    if manifest is not None:
        manifest.seed = plan.settings.seed

    # write, module by module, and the receipt
    with outputs.atomic_output_dir(out, force, inputs=inputs, manifest=manifest) as directory:
        if base is None:
            result = plan.to_adapter()  # every module computed and stored, and the receipt
            result.save(directory, format)
            report = result.report
        else:
            report = receipt.build(plan, write_model(plan, base, directory), into_base=base)
            receipt.write(report, directory)
        if manifest is not None:
            manifest.inputs = receipt.input_hashes(report, into_base)  # hashed once, for the receipt
    return report


def output_format(adapters: Sequence[Adapter]) -> str:
    """The format a merge of `adapters` is written in: theirs when they share one (torchtune's is PEFT, the
    older diffusers layout is written as today's), else PEFT."""
    same = {"torchtune": "peft", "diffusers-old": "diffusers"}
    formats = {same.get(a.format, a.format) for a in adapters}
    return formats.pop() if len(formats) == 1 and formats <= set(FORMATS) else "peft"
