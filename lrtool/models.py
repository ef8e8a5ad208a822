"""Base models: load a Hugging Face causal LM, or make the embedded tiny default from scratch; and the one
reader of a model directory's safetensors files.

Reads a model directory (config.json, safetensors weights, tokenizer files) or a hub id that transformers
resolves (offline when the files are local); `tiny` / `tiny:PRESET` builds a new small Llama and a tokenizer
from the given texts instead, with no download. Writes nothing: `train --full` saves what it trained.

`ModelFiles` reads a model directory's safetensors without loading the model (merge --into-base and
diagnose --base): which files hold the weights (one shard rule), each tensor's shard, dtype, shape and bytes
from the headers, and one tensor at a time. `DTYPES` is the one table of safetensors' dtype codes.

The tiny tokenizer is a Unigram model over whole words of the given texts (one token per word, as in the
pilot of ../shared/EXPERIMENT.md), single characters, and byte fallback: any text encodes losslessly, and a
name that the texts never held still tokenizes (as characters or bytes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lrtool.errors import InputError, UnsupportedFeatureError, UsageError, one_line

# Llama shapes. `tiny` trains on a 2-core CPU in about a minute (the pilot's 2.8M parameters); `micro` is
# for tests; the larger ones are for a GPU.
TINY_PRESETS = {
    "micro": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8),
    "base": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16),
}
SPECIAL_TOKENS = {"unk": "<unk>", "pad": "<pad>", "bos": "<s>", "eos": "</s>"}
WORD = re.compile(r"\w+|[^\w\s]")
SPACE = "\u2581"  # sentencepiece's visible space: a word after a space is one piece with it


def tiny_preset(spec: str) -> str | None:
    """`tiny` -> "tiny", `tiny:micro` -> "micro"; None when `spec` names a real model."""
    if spec != "tiny" and not spec.startswith("tiny:"):
        return None
    preset = spec.partition(":")[2] or "tiny"
    if preset not in TINY_PRESETS:
        raise UsageError(f"unknown tiny preset {preset!r}; choose one of {', '.join(TINY_PRESETS)}")
    return preset


def vocabulary_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, and the .jsonl files inside directories named (a gen-data world), sorted."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(path.glob("*.jsonl")))
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    return files


def texts_of(paths: Iterable[str | Path]) -> Iterable[str]:
    """The text of each file for a vocabulary: prompt and answer of JSONL datasets, every line otherwise."""
    for path in vocabulary_files(paths):
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read as UTF-8 text ({exc})") from None
        for line in lines:
            obj = None
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    obj = None
            if isinstance(obj, dict) and "prompt" in obj:
                yield f"{obj.get('prompt', '')} {obj.get('answer', '')}"
            else:
                yield line


def build_tokenizer(texts: Iterable[str]):
    """A lossless tokenizer whose vocabulary holds every word of `texts` as one piece.

    Pieces: the special tokens, 256 byte-fallback tokens, every printable ASCII character, and each word both
    with and without the leading space marker. Unigram scores favour the fewest pieces, so a known word is
    one token; an unknown word falls back to characters, and a character outside the vocabulary to bytes.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in texts for w in WORD.findall(text)})
    pieces: dict[str, float] = {token: 0.0 for token in SPECIAL_TOKENS.values()}
    pieces.update({f"<0x{i:02X}>": -20.0 for i in range(256)})
    pieces[SPACE] = -5.0
    for char in map(chr, range(33, 127)):
        pieces.setdefault(char, -10.0)
    for word in words:
        pieces.setdefault(SPACE + word, -1.0)
        pieces.setdefault(word, -1.5)
    vocab = list(pieces.items())
    unk = vocab.index((SPECIAL_TOKENS["unk"], 0.0))
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=unk, byte_fallback=True))
    # As Llama's tokenizer: spaces become the marker and one marker is prepended to every text (so a word
    # is the same piece at the start and inside a sentence); decoding strips exactly that one.
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bos = SPECIAL_TOKENS["bos"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **{f"{role}_token": token for role, token in SPECIAL_TOKENS.items()},
        clean_up_tokenization_spaces=False,
    )


def make_tiny_model(preset: str, tokenizer, seed: int = 0):
    """A freshly initialised Llama of the preset's shape for `tokenizer` (tied embeddings, seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = TINY_PRESETS[preset]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def load_base(
    spec: str, *, vocab_texts: Iterable[str] = (), seed: int = 0, trust_remote_code: bool = False, dtype=None
):
    """(model, tokenizer) for a base spec: `tiny[:PRESET]`, a model directory, or a hub id."""
    preset = tiny_preset(spec)
    if preset is not None:
        tokenizer = build_tokenizer(vocab_texts)
        return make_tiny_model(preset, tokenizer, seed), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(
                f"{spec} is not a model directory (no config.json); give a Hugging Face model "
                "directory, a hub id, or tiny"
            )
    local = path.exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec, trust_remote_code=trust_remote_code, local_files_only=local
        )
        # safetensors only: a base shipped as pickled pytorch_model.bin is refused, never unpickled.
        model = AutoModelForCausalLM.from_pretrained(
            spec,
            trust_remote_code=trust_remote_code,
            local_files_only=local,
            dtype=dtype,
            use_safetensors=True,
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load base {spec}: {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def module_names(model) -> list[str]:
    """Every module path of a model, as adapters name them."""
    return [name for name, _ in model.named_modules() if name]


# ---------------------------------------------------------------------------------------------------------
# A model directory's safetensors files, read without loading the model (merge --into-base, diagnose --base)

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
    until `read` asks for one).

    Which files hold the weights, one rule: model.safetensors.index.json, else the only
    *.safetensors.index.json (the shards its weight_map names), else model.safetensors, else the only
    *.safetensors file. Several files and no index to tie them are refused, and so is a directory with only
    pickled weights (which it never opens).
    """

    def __init__(self, directory: Path, index: Path | None, shards: list[Path]):
        self.directory = directory
        self.index = index  # the *.safetensors.index.json, None for a single file
        self.shards = shards
        self.headers = {shard: _read_header(shard) for shard in shards}  # shard -> (data start, header)
        self.tensors: dict[str, StoredTensor] = {}
        for shard, (start, header) in self.headers.items():
            for key, info in header.items():
                if key != "__metadata__":
                    begin, end = info["data_offsets"]
                    self.tensors[key] = StoredTensor(
                        shard, info["dtype"], list(info["shape"]), start + begin, start + end
                    )

    @property
    def source(self) -> str:
        return str(self.directory)

    @property
    def module_names(self) -> list[str]:
        """The module paths that have a weight (`<module>.weight`), sorted."""
        return sorted(key.removesuffix(".weight") for key in self.tensors if key.endswith(".weight"))

    @classmethod
    def open(cls, path: str | Path) -> ModelFiles:
        """The weights of the model directory `path` (InputError when it holds none this reader takes)."""
        directory = Path(path)
        if not directory.is_dir():
            raise InputError(f"{directory}: not a directory; give a Hugging Face model directory")
        indexes = sorted(directory.glob("*.safetensors.index.json"))
        preferred = directory / "model.safetensors.index.json"
        if indexes:
            if len(indexes) > 1 and preferred not in indexes:
                names = ", ".join(p.name for p in indexes)
                raise InputError(f"{directory}: holds several safetensors indexes ({names})")
            index = preferred if preferred in indexes else indexes[0]
            return cls(directory, index, _shards(index))
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
        raise InputError(f"{directory}: no weights (model.safetensors or an index of safetensors shards)")

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
