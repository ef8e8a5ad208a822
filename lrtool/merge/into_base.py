"""--into-base: add a merge's exact update to the weights of a Hugging Face model directory.

Reads the base's safetensors through lrtool.model_files.ModelFiles (its one rule for which files hold the
weights: model.safetensors, or the shards a *.safetensors.index.json lists) and writes each file anew, with
the same name, tensor by tensor: tensors the merge does not touch are copied byte for byte, and each target
weight `<module>.weight` is read, gets the method's exact update (computed when its turn comes, transposed
for fan_in_fan_out bases) added in float64 and is cast back to its own dtype. Peak memory is about three
float64 copies of the largest target weight, whatever the model's or a shard's size (weights are read with
plain reads, not through a memory map whose pages would stay resident). A sharded base gets a new index;
the config, generation config, tokenizer and chat-template files are copied.

The safetensors format written here: an 8-byte little-endian header length, a JSON header (each tensor's
dtype, shape and data_offsets; `__metadata__`), padded with spaces to 8 bytes, then the tensors' bytes, laid
out by decreasing element size so that every tensor is aligned, as the safetensors library does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lrtool.adapters import all_finite
from lrtool.errors import IncompatibleError, InputError, UnsupportedFeatureError
from lrtool.merge import fused
from lrtool.merge.base import overflow_message, relative
from lrtool.merge.plan import MergePlan
from lrtool.model_files import FLOATING, ModelFiles, item_size

# The files of a model directory that are neither weights nor ours, copied as they are.
COPIED_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken", ".py")
NOT_COPIED = ("lrtool.json", "merge_report.json")
CHUNK = 1 << 24  # bytes copied at a time


def _copy_bytes(reader, out, size: int, truncated: str) -> None:
    while size:
        block = reader.read(min(CHUNK, size))
        if not block:
            raise InputError(truncated)
        out.write(block)
        size -= len(block)


def open_base(path: str | Path) -> ModelFiles:
    """The safetensors weights of the --into-base directory (model_files.ModelFiles: its shard rule)."""
    if not Path(path).is_dir():
        raise InputError(
            f"{Path(path)}: --into-base needs a Hugging Face model directory (config.json, safetensors "
            "weights); download a hub model first"
        )
    return ModelFiles.open(path)


def check_fits(plan: MergePlan, base: ModelFiles) -> None:
    """Every merged module must be a floating-point weight of the base, shaped as the adapters say."""
    for name, inputs in plan.inputs.items():
        key = base.weight_key(name)
        if key is None:
            raise IncompatibleError(
                f"module '{name}' of the adapters is not in the base {base.directory} (no tensor "
                f"'{name}.weight')"
            )
        shard, dtype, shape = base.tensors[key].shard, base.tensors[key].dtype, base.tensors[key].shape
        out_features, in_features = inputs.shape
        expected = (
            [in_features, out_features] if plan.metadata["fan_in_fan_out"] else [out_features, in_features]
        )
        conv = next(m for m in inputs.modules if m is not None)
        if conv.kernel is not None:  # a conv weight [out, in, *kernel]
            expected = list(conv.weight_shape)
        if shape != expected and plan.metadata["fan_in_fan_out"] and shape == list(inputs.shape):
            raise IncompatibleError(
                f"the adapters set fan_in_fan_out (GPT-2's Conv1D stores weights [in, out]) but '{key}' "
                f"in {shard} is stored [out, in] = {shape}: the adapters were made for another layer type"
            )
        if shape != expected and plan.metadata["fan_in_fan_out"]:
            raise IncompatibleError(
                f"module '{name}' needs '{key}' stored [in, out] = {expected} (the adapters set "
                f"fan_in_fan_out) but '{key}' is {shape} in {shard}: adapters for a different base"
            )
        if shape != expected:
            raise IncompatibleError(
                f"module '{name}' is {list(inputs.shape)} (out, in) in the adapters but '{key}' is "
                f"{shape} in {shard}: adapters for a different base"
            )
        if dtype not in FLOATING or item_size(dtype) < 2:  # float8: torch has no arithmetic in it
            raise UnsupportedFeatureError(
                f"{shard}: '{key}' is {dtype}; only floating-point (unquantised) weights can take an update"
            )


def write_model(plan: MergePlan, base: ModelFiles, directory: Path) -> dict[str, dict]:
    """Write the merged model into `directory` (a pipeline's components into their folders); return the
    receipt's row for every module."""
    targets = {base.weight_key(name): name for name in plan.inputs}
    rows: dict[str, dict] = {}
    indexes: dict[Path, tuple[dict, int]] = {}  # index -> (its weight_map, total size)
    for shard in base.shards:
        target = directory / shard.relative_to(base.directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        size = _write_shard(plan, base, shard, target, targets, rows)
        index = base.index_of[shard]
        if index is not None:
            weight_map, total = indexes.get(index, ({}, 0))
            weight_map.update({key: shard.name for key in base.headers[shard][1] if key != "__metadata__"})
            indexes[index] = (weight_map, total + size)
    for index, (weight_map, total) in indexes.items():
        content = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        text = json.dumps(content, indent=2) + "\n"
        (directory / index.relative_to(base.directory)).write_text(text, encoding="utf-8")
    folders = [base.directory] + [
        p for p in sorted(base.directory.iterdir()) if base.components and p.is_dir()
    ]
    for folder in folders:  # a pipeline: its scheduler's, tokenizer's and components' files too
        for path in sorted(folder.iterdir()):
            if (
                path.is_file()
                and path.suffix in COPIED_SUFFIXES
                and path.name not in NOT_COPIED
                and not path.name.endswith(".safetensors.index.json")
            ):
                target = directory / path.relative_to(base.directory)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    return {name: rows[name] for name in sorted(rows)}


def _write_shard(
    plan: MergePlan,
    base: ModelFiles,
    source: Path,
    target: Path,
    targets: dict[str, str],
    rows: dict[str, dict],
) -> int:
    data_start, header = base.headers[source]
    entries = sorted(
        ((key, info) for key, info in header.items() if key != "__metadata__"),
        key=lambda item: (-item_size(item[1]["dtype"]), item[0]),
    )
    layout, offset = {}, 0
    for key, info in entries:
        begin, end = info["data_offsets"]
        layout[key] = {
            "dtype": info["dtype"],
            "shape": info["shape"],
            "data_offsets": [offset, offset + end - begin],
        }
        offset += end - begin
    if "__metadata__" in header:
        layout["__metadata__"] = header["__metadata__"]
    text = json.dumps(layout, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(source, "rb") as reader, open(target, "wb") as out:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        for key, info in entries:
            key = base.key_of(source, key)
            if key not in targets:
                begin, end = info["data_offsets"]
                reader.seek(data_start + begin)
                _copy_bytes(reader, out, end - begin, f"{source}: ends inside tensor '{key}'")
                continue
            weight = base.read(key)
            try:
                merged = _merged_weight(plan, targets[key], weight, source, rows)
            finally:
                plan.inputs[targets[key]].forget()
            del weight
            out.write(merged.contiguous().reshape(-1).view(torch.uint8).numpy())
    return offset


def _merged_weight(plan: MergePlan, name: str, weight: torch.Tensor, shard: Path, rows: dict) -> torch.Tensor:
    """weight + the exact update, cast to the weight's dtype; records the receipt's row. Float64
    temporaries are freed as soon as possible: the peak is about three float64 copies of one weight."""
    if not all_finite(weight):
        raise InputError(f"{shard}: '{name}.weight' has non-finite values (NaN or inf)")
    if weight.dim() > 2:  # a conv weight [out, in, *kernel]: the update is over the flattened kernel
        merged = _merged_weight(plan, name, weight.reshape(weight.shape[0], -1), shard, rows)
        return merged.reshape(weight.shape)
    device = fused.device_for(plan, into_base=True)
    if device is not None:  # the fused kernel: update, add and cast in one pass
        merged, rows[name] = fused.into_base(plan, name, weight, device)
        return merged
    exact = plan.exact(name)
    row = {"from_linear": plan.from_linear(plan.inputs[name], exact), "norm": exact.norm()}
    exact_sum = weight.to(torch.float64, copy=True)
    exact_sum.add_(exact.to_dense().T if plan.metadata["fan_in_fan_out"] else exact.to_dense())
    del exact
    merged = exact_sum.to(weight.dtype, copy=True)
    if not all_finite(merged):
        what = f"'{name}.weight' plus the update"
        raise InputError(overflow_message(name, what, weight.dtype, "merge into a float32 copy of the base"))
    # ||(merged - W) - delta|| = ||merged - (W + delta)||: what casting to the base's dtype lost
    row["error"] = relative(float(torch.linalg.matrix_norm(exact_sum.sub_(merged))), row["norm"])
    rows[name] = {key: row[key] for key in ("error", "from_linear", "norm")}
    return merged
