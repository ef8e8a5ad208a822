"""Base models: load a Hugging Face causal LM, or make the embedded tiny default from scratch.

Reads a model directory (config.json, safetensors weights, tokenizer files) or a hub id that transformers
resolves (offline when the files are local); `tiny` / `tiny:PRESET` builds a new small Llama and a tokenizer
from the given texts instead, with no download. Writes nothing: `train --full` saves what it trained.

`ModelFiles`, the one reader of a model directory's safetensors without loading the model (merge
--into-base and diagnose --base), and `DTYPES`, the one table of safetensors' dtype codes, live in
model_files.py.

The tiny tokenizer is a Unigram model over whole words of the given texts (one token per word, as in the
pilot of ../shared/EXPERIMENT.md), single characters, and byte fallback: any text encodes losslessly, and a
name that the texts never held still tokenizes (as characters or bytes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from lrtool.errors import InputError, UsageError

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
