"""The LoRA file formats lrtool reads and writes, and what each was checked against: one table, shown by the
README and by the diagnose man page (a test checks the README's copy). No imports: the CLI reads it to
build its help.

The readers and writers themselves are lrtool.adapters' (grammar, files, read, write).
"""

# What `merge --format` writes (lrtool.adapters.write.save_as).
WRITTEN = ("peft", "kohya", "diffusers", "mlx")

# (format as diagnose names it, what it is, read, written, checked against)
TABLE = (
    (
        "peft",
        "adapter_config.json + adapter_model.safetensors: LoRA with rsLoRA, rank_pattern, alpha_pattern, "
        "GPT-2's Conv1D (fan_in_fan_out), Conv2d",
        "yes",
        "yes (mixed inputs too)",
        "peft 0.21.2 (from_pretrained, get_delta_weight)",
    ),
    (
        "torchtune",
        "torchtune's PEFT export (its config's four fields, adapter_model.pt beside it)",
        "yes",
        "as peft",
        "files after torchtune 0.6.1's recipes and HF checkpointer",
    ),
    (
        "kohya",
        "lora_down / lora_up / alpha per module (lora_unet_, lora_te_ names), linear and conv (1x1, kxk); "
        "LyCORIS LoCon",
        "yes",
        "yes",
        "files after sd-scripts' networks/lora.py; lycoris-lora 4.1.3; diffusers 0.42.1 loads what lrtool "
        "writes",
    ),
    (
        "diffusers",
        "unet. / transformer. / text_encoder. + lora_A / lora_B (or lora.down / lora.up), "
        "lora_adapter_metadata",
        "yes",
        "yes",
        "diffusers 0.42.1 (save_lora_weights, load_lora_weights)",
    ),
    (
        "diffusers-old",
        "attention processors: ...processor.to_q_lora.down.weight",
        "yes",
        "as diffusers",
        "diffusers 0.42.1 (load_lora_weights)",
    ),
    (
        "mlx",
        "adapters.safetensors (lora_a [in, r], lora_b [r, out]) + adapter_config.json "
        "(lora_parameters.scale)",
        "yes",
        "yes",
        "mlx-lm 0.32.2 (load_adapters, LoRALinear.fuse)",
    ),
)

# Refused with the code unsupported-feature and the method's name, never read wrongly.
REFUSED = (
    "DoRA, LoHa, LoKr, OFT, lora bias, modules_to_save, embedding LoRA, mixture-of-experts LoRA, Tucker conv "
    "(lora_mid), several adapters in one file; pickled weights (.bin, .pt, .ckpt) are never unpickled"
)


def markdown_table() -> str:
    """The table as the README shows it."""
    rows = ["| format | files | read | written | checked against |", "|---|---|---|---|---|"]
    rows += [
        f"| `{name}` | {files} | {read} | {written} | {checked} |"
        for name, files, read, written, checked in TABLE
    ]
    return "\n".join(rows) + f"\n\nRefused, by name: {REFUSED}."


def text_table() -> str:
    """The table as the man page shows it: one paragraph per format."""
    rows = [
        f"- {name}: {files}. Read: {read}; written: {written}; checked against {checked}."
        for name, files, read, written, checked in TABLE
    ]
    return "\n".join(rows) + f"\n\nRefused, by name: {REFUSED}."
