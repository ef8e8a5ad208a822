"""A model directory's safetensors weights, read without loading the model: the one reader merge
--into-base and diagnose --base share (and the one table of safetensors' dtype codes, DTYPES).

`ModelFiles` knows which files hold the weights (one shard rule), each tensor's shard, dtype, shape and
bytes from the headers, reads one tensor at a time, and resolves a module path to its weight as the
libraries that load the model do: through the architecture's base_model_prefix (transformers) and a
diffusers pipeline's component folders. Writes nothing.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from lrtool.errors import InputError, UnsupportedFeatureError, one_line

# safetensors' dtype codes: the torch dtype each one is (by torch's name for it) and its bytes per element.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # pickled weights: refused unread, never unpickled
DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
FLOATING = tuple(code for code, (name, _) in DTYPES.items() if "float" in name)
# The weight files' stems, preferred in this order: transformers' model, a diffusers component's model.
WEIGHT_STEMS = ("model", "diffusion_pytorch_model")
# The components of a diffusers pipeline that LoRA files name as the first part of a module path.
DIFFUSERS_COMPONENTS = (
    "unet",
    "transformer",
    "transformer_2",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
)


def dtype_name(code: str) -> str:
    """torch's name for a safetensors dtype code ("BF16" -> "bfloat16"); an unknown code in lower case."""
    return DTYPES[code][0] if code in DTYPES else code.lower()


def item_size(code: str) -> int:
    """Bytes per element of a safetensors dtype code (1 for a code this table lacks)."""
    return DTYPES[code][1] if code in DTYPES else 1


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a model directory lies: its shard, dtype code, shape and absolute byte range."""

    shard: Path
    dtype: str  # safetensors' code, e.g. "BF16"
    shape: list[int]
    begin: int
    end: int


class ModelFiles:
    """A Hugging Face model directory's safetensors weights, known from their headers (no tensor loaded
    until `read` asks for one); or a diffusers pipeline directory's (model_index.json and one folder per
    component), each component's tensors named `<component>.<key>`, as diffusers LoRA files name them.

    Which files hold the weights, one rule (in a pipeline, per component folder): model.safetensors.index.json
    (or diffusion_pytorch_model.safetensors.index.json), else the only *.safetensors.index.json (the shards
    its weight_map names), else model.safetensors (or diffusion_pytorch_model.safetensors), else the only
    *.safetensors file. Several files and no index to tie them are refused, and so is a directory with only
    pickled weights (which it never opens).

    Module paths resolve as the libraries that load the model resolve them (`weight_key`): through the
    architecture's base_model_prefix as transformers does (a GPT-2 saved as GPT2Model holds h.0.attn.c_attn
    where adapters of GPT2LMHeadModel name transformer.h.0.attn.c_attn, and the other way round), and
    through the component a diffusers LoRA names first (unet.down_blocks... in the unet folder alone).
    """

    def __init__(self, directory: Path, index: Path | None, shards: list[Path]):
        self.directory = directory
        self.index = index  # the *.safetensors.index.json, None for a single file (or a pipeline)
        self.shards = shards
        self.headers = {shard: _read_header(shard) for shard in shards}  # shard -> (data start, header)
        self.prefixes = {shard: "" for shard in shards}  # shard -> what its keys get in front (pipelines)
        self.index_of = {shard: index for shard in shards}  # shard -> the index naming it, or None
        self.components: list[str] = []  # a pipeline's components with weights
        self.aliases: list[str] = []  # a lone diffusers component's name, which LoRA files put first
        self.tensors: dict[str, StoredTensor] = {}
        self._add_tensors(shards)

    def _add_tensors(self, shards: list[Path]) -> None:
        for shard in shards:
            start, header = self.headers[shard]
            for key, info in header.items():
                if key != "__metadata__":
                    begin, end = info["data_offsets"]
                    self.tensors[self.prefixes[shard] + key] = StoredTensor(
                        shard, info["dtype"], list(info["shape"]), start + begin, start + end
                    )

    @property
    def source(self) -> str:
        return str(self.directory)

    @property
    def module_names(self) -> list[str]:
        """The module paths that have a weight (`<module>.weight`), sorted."""
        return sorted(key.removesuffix(".weight") for key in self.tensors if key.endswith(".weight"))

    def key_of(self, shard: Path, key: str) -> str:
        """The name this reader gives tensor `key` of `shard` (a pipeline's: with its component first)."""
        return self.prefixes[shard] + key

    def weight_key(self, module: str) -> str | None:
        """The key of module path `module`'s weight here (`<module>.weight`, resolved through the
        architecture's base_model_prefix or a diffusers component's name), or None when there is none."""
        for name in self._spellings(module):
            if f"{name}.weight" in self.tensors:
                return f"{name}.weight"
        return None

    def _spellings(self, module: str):
        yield module
        for alias in self.aliases:
            if module.startswith(alias + "."):
                yield module[len(alias) + 1 :]
        prefix = self.base_model_prefix
        if prefix:
            yield module[len(prefix) + 1 :] if module.startswith(prefix + ".") else f"{prefix}.{module}"

    @functools.cached_property
    def base_model_prefix(self) -> str | None:
        """The base_model_prefix of the architecture config.json names (transformers' own table), or None."""
        return _base_model_prefix(self.directory / "config.json")

    @classmethod
    def open(cls, path: str | Path) -> ModelFiles:
        """The weights of the model directory `path` (InputError when it holds none this reader takes)."""
        directory = Path(path)
        if not directory.is_dir():
            raise InputError(f"{directory}: not a directory; give a Hugging Face model directory")
        if (directory / "model_index.json").is_file():
            return cls._pipeline(directory)
        files = cls._one(directory)
        config = _json_object(directory / "config.json")
        class_name = str(config.get("_class_name", ""))
        component = directory.name if directory.name in DIFFUSERS_COMPONENTS else None
        if component is None and class_name:  # a diffusers model folder under another name
            component = (
                "unet"
                if class_name.startswith("UNet")
                else "transformer"
                if "Transformer" in class_name
                else None
            )
        files.aliases = [component] if component else []
        return files

    @classmethod
    def _one(cls, directory: Path) -> ModelFiles:
        indexes = sorted(directory.glob("*.safetensors.index.json"))
        preferred = [directory / f"{stem}.safetensors.index.json" for stem in WEIGHT_STEMS]
        if indexes:
            first = next((p for p in preferred if p in indexes), None)
            if len(indexes) > 1 and first is None:
                names = ", ".join(p.name for p in indexes)
                raise InputError(f"{directory}: holds several safetensors indexes ({names})")
            index = first or indexes[0]
            return cls(directory, index, _shards(index))
        files = sorted(directory.glob("*.safetensors"))
        for stem in WEIGHT_STEMS:
            if (directory / f"{stem}.safetensors").is_file():
                return cls(directory, None, [directory / f"{stem}.safetensors"])
        if len(files) == 1:
            return cls(directory, None, files)
        if files:
            raise InputError(f"{directory}: holds several .safetensors files and no index naming the shards")
        if any(p.suffix in PICKLE_SUFFIXES for p in directory.iterdir()):
            raise UnsupportedFeatureError(
                f"{directory}: has only pickled weights (which can run code when loaded); lrtool never "
                "unpickles: convert the base to safetensors"
            )
        raise InputError(f"{directory}: no weights (model.safetensors or an index of safetensors shards)")

    @classmethod
    def _pipeline(cls, directory: Path) -> ModelFiles:
        """A diffusers pipeline: the weights of each component folder model_index.json lists that has some."""
        listed = _json_object(directory / "model_index.json")
        files = cls(directory, None, [])
        for component in sorted(
            k for k, v in listed.items() if not k.startswith("_") and isinstance(v, list)
        ):
            folder = directory / component
            if not folder.is_dir() or not any(
                p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()
            ):
                continue  # a scheduler, a tokenizer: no weights
            part = cls._one(folder)
            files.components.append(component)
            files.shards += part.shards
            files.headers.update(part.headers)
            files.prefixes.update({shard: f"{component}." for shard in part.shards})
            files.index_of.update(part.index_of)
            files._add_tensors(part.shards)
        if not files.shards:
            raise InputError(f"{directory}: a diffusers pipeline with no component weights in safetensors")
        return files

    def read(self, key: str):
        """The tensor `key` (a torch.Tensor in its own dtype), read with plain reads into memory of its own,
        not through a memory map whose pages would stay resident."""
        import torch

        tensor = self.tensors[key]
        buffer = bytearray(tensor.end - tensor.begin)
        with open(tensor.shard, "rb") as handle:
            handle.seek(tensor.begin)
            if handle.readinto(buffer) != len(buffer):
                raise InputError(f"{tensor.shard}: ends inside tensor '{key}'")
        dtype = getattr(torch, dtype_name(tensor.dtype))
        if not buffer:
            return torch.empty(tensor.shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(tensor.shape)


def _json_object(path: Path) -> dict:
    """A JSON file's object, {} when it is missing or not an object."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return content if isinstance(content, dict) else {}


def _base_model_prefix(config_path: Path) -> str | None:
    """The base_model_prefix transformers gives the bare model of config.json's model_type (GPT2Model's is
    "transformer", LlamaModel's "model"), read from transformers' own classes; None when it has none."""
    model_type = _json_object(config_path).get("model_type")
    if not isinstance(model_type, str):
        return None
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    except ImportError:
        return None
    name = MODEL_MAPPING_NAMES.get(model_type)
    name = name[0] if isinstance(name, (list, tuple)) else name
    try:
        prefix = getattr(getattr(transformers, name), "base_model_prefix", None) if name else None
    except (AttributeError, ImportError, RuntimeError):
        return None
    return prefix or None


def _read_header(path: Path) -> tuple[int, dict]:
    """(where the data starts, the JSON header) of a safetensors file, checked by the library first."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise InputError(f"{path}: not a readable safetensors file ({one_line(error)})") from error
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return 8 + size, json.loads(handle.read(size))


def _shards(index: Path) -> list[Path]:
    """The shard files a safetensors index names, each checked to exist beside it."""
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
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise InputError(f"{index}: names shard {shard.name}, which is not in {index.parent}")
    return shards
