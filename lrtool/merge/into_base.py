"""--into-base: add a merge's exact update to the weights of a Hugging Face model directory.

Reads the base's safetensors (model.safetensors, or the shards a *.safetensors.index.json lists) and writes
each file anew, with the same name, tensor by tensor: tensors the merge does not touch are copied byte for
byte, and each target weight `<module>.weight` is read, gets the method's exact update (computed when its
turn comes, transposed for fan_in_fan_out bases) added in float64 and is cast back to its own dtype. Peak
memory is about three float64 copies of the largest target weight, whatever the model's or a shard's size
(weights are read with plain reads, not through a memory map whose pages would stay resident). A sharded
base gets a new index; the config, generation config, tokenizer and chat-template files are copied.

The safetensors format written here: an 8-byte little-endian header length, a JSON header (each tensor's
dtype, shape and data_offsets; `__metadata__`), padded with spaces to 8 bytes, then the tensors' bytes, laid
out by decreasing element size so that every tensor is aligned, as the safetensors library does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lrtool.adapters import PICKLE_SUFFIXES, all_finite
from lrtool.errors import IncompatibleError, InputError, UnsupportedFeatureError, one_line
from lrtool.merge import fused
from lrtool.merge.base import MergePlan, overflow_message, relative

# The files of a model directory that are neither weights nor ours, copied as they are.
COPIED_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken", ".py")
NOT_COPIED = ("lrtool.json", "merge_report.json")
ITEM_SIZES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
}
CHUNK = 1 << 24  # bytes copied at a time
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _copy_bytes(reader, out, size: int, truncated: str) -> None:
    while size:
        block = reader.read(min(CHUNK, size))
        if not block:
            raise InputError(truncated)
        out.write(block)
        size -= len(block)


def _read_header(path: Path) -> tuple[int, dict]:
    """(where the data starts, the JSON header) of a safetensors file, checked by the library first."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise InputError(f"{path}: not a readable safetensors file ({one_line(error)})") from error
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return 8 + size, json.loads(handle.read(size))


class BaseModel:
    """A Hugging Face model directory's safetensors weights, read header by header (no tensor loaded)."""

    def __init__(self, directory: Path, index: Path | None, shards: list[Path]):
        self.directory = directory
        self.index = index  # the *.safetensors.index.json, None for a single file
        self.shards = shards
        self.headers = {shard: _read_header(shard) for shard in shards}
        self.tensors = {}  # key -> (shard, dtype, shape)
        for shard, (_, header) in self.headers.items():
            for key, info in header.items():
                if key != "__metadata__":
                    self.tensors[key] = (shard, info["dtype"], list(info["shape"]))

    @property
    def source(self) -> str:
        return str(self.directory)

    @property
    def module_names(self) -> list[str]:
        return sorted(key.removesuffix(".weight") for key in self.tensors if key.endswith(".weight"))

    @classmethod
    def open(cls, path: str | Path) -> BaseModel:
        directory = Path(path)
        if not directory.is_dir():
            raise InputError(
                f"{directory}: --into-base needs a Hugging Face model directory (config.json, safetensors "
                "weights); download a hub model first"
            )
        indexes = sorted(directory.glob("*.safetensors.index.json"))
        preferred = directory / "model.safetensors.index.json"
        if indexes:
            index = preferred if preferred in indexes else indexes[0]
            if len(indexes) > 1 and preferred not in indexes:
                names = ", ".join(p.name for p in indexes)
                raise InputError(f"{directory}: holds several safetensors indexes ({names})")
            return cls(directory, index, cls._shards(index))
        files = sorted(directory.glob("*.safetensors"))
        if (directory / "model.safetensors").is_file():
            return cls(directory, None, [directory / "model.safetensors"])
        if len(files) == 1:
            return cls(directory, None, files)
        if files:
            raise InputError(f"{directory}: holds several .safetensors files and no index naming the shards")
        if any(p.suffix in PICKLE_SUFFIXES for p in directory.iterdir()):
            raise UnsupportedFeatureError(
                f"{directory}: has only pickled weights (which can run code when loaded); lrtool never "
                "unpickles: convert the base to safetensors"
            )
        raise InputError(f"{directory}: no safetensors weights (model.safetensors or an index of shards)")

    @staticmethod
    def _shards(index: Path) -> list[Path]:
        try:
            content = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{index}: not a safetensors index ({one_line(error)})") from error
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(key, str) and isinstance(name, str) for key, name in weight_map.items()
        ):
            raise InputError(
                f"{index}: not a safetensors index (its weight_map must map tensor names to shard file names)"
            )
        names = sorted(set(weight_map.values()))
        shards = [index.parent / name for name in names]
        for shard in shards:
            if not shard.is_file():
                raise InputError(f"{index}: names shard {shard.name}, which is not in {index.parent}")
        return shards

    def check(self, plan: MergePlan) -> None:
        """Every merged module must be a floating-point weight of the base, shaped as the adapters say."""
        for name, inputs in plan.inputs.items():
            key = f"{name}.weight"
            if key not in self.tensors:
                raise IncompatibleError(
                    f"module '{name}' of the adapters is not in the base {self.directory} (no tensor '{key}')"
                )
            shard, dtype, shape = self.tensors[key]
            out_features, in_features = inputs.shape
            expected = (
                [in_features, out_features]
                if plan.metadata["fan_in_fan_out"]
                else [out_features, in_features]
            )
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
            if dtype not in DTYPES:
                raise UnsupportedFeatureError(
                    f"{shard}: '{key}' is {dtype}; only floating-point (unquantised) weights can take "
                    "an update"
                )

    def write(self, plan: MergePlan, directory: Path) -> dict[str, dict]:
        """Write the merged model into `directory`; return the receipt's row for every module."""
        targets = {f"{name}.weight": name for name in plan.inputs}
        rows: dict[str, dict] = {}
        weight_map = {}
        total = 0
        for shard in self.shards:
            total += self._write_shard(plan, shard, directory / shard.name, targets, rows)
            weight_map.update({key: shard.name for key in self.headers[shard][1] if key != "__metadata__"})
        if self.index is not None:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (directory / self.index.name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        for path in sorted(self.directory.iterdir()):
            if (
                path.is_file()
                and path.suffix in COPIED_SUFFIXES
                and path.name not in NOT_COPIED
                and not path.name.endswith(".safetensors.index.json")
            ):
                shutil.copyfile(path, directory / path.name)
        return {name: rows[name] for name in sorted(rows)}

    def _write_shard(
        self, plan: MergePlan, source: Path, target: Path, targets: dict[str, str], rows: dict[str, dict]
    ) -> int:
        data_start, header = self.headers[source]
        entries = sorted(
            ((key, info) for key, info in header.items() if key != "__metadata__"),
            key=lambda item: (-ITEM_SIZES.get(item[1]["dtype"], 1), item[0]),
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
                begin, end = info["data_offsets"]
                reader.seek(data_start + begin)
                if key not in targets:
                    _copy_bytes(reader, out, end - begin, f"{source}: ends inside tensor '{key}'")
                    continue
                # Read into memory of our own rather than through safe_open's memory map, whose pages
                # would stay resident and make the peak grow with the shard.
                buffer = bytearray(end - begin)
                if reader.readinto(buffer) != len(buffer):
                    raise InputError(f"{source}: ends inside tensor '{key}'")
                weight = torch.frombuffer(buffer, dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
                try:
                    merged = self._merged_weight(plan, targets[key], weight, source, rows)
                finally:
                    plan.inputs[targets[key]].forget()
                del weight, buffer
                out.write(merged.contiguous().reshape(-1).view(torch.uint8).numpy())
        return offset

    @staticmethod
    def _merged_weight(
        plan: MergePlan, name: str, weight: torch.Tensor, shard: Path, rows: dict
    ) -> torch.Tensor:
        """weight + the exact update, cast to the weight's dtype; records the receipt's row. Float64
        temporaries are freed as soon as possible: the peak is about three float64 copies of one weight."""
        if not all_finite(weight):
            raise InputError(f"{shard}: '{name}.weight' has non-finite values (NaN or inf)")
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
            raise InputError(
                overflow_message(name, what, weight.dtype, "merge into a float32 copy of the base")
            )
        # ||(merged - W) - delta|| = ||merged - (W + delta)||: what casting to the base's dtype lost
        row["error"] = relative(float(torch.linalg.matrix_norm(exact_sum.sub_(merged))), row["norm"])
        rows[name] = {key: row[key] for key in ("error", "from_linear", "norm")}
        return merged
