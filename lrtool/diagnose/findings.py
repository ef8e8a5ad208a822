"""The findings `lrtool diagnose` reports: each has a stable code, a severity and a message, and may name a
module. This table is the single source of the codes (the CLI's help and the man page list it) and of the
thresholds behind them. No heavy imports: the CLI reads it to build its help.
"""

SEVERITIES = ("error", "warning", "info")  # most severe first

# Thresholds of the findings (documented in FINDINGS, in the help text and in the report's `thresholds`).
ZERO_UPDATE_TOLERANCE = 1e-6  # ||dW|| <= this x |scale| ||B|| ||A|| counts as zero (exactly 0 when B = 0)
RANK_COLLAPSE_FRACTION = 0.25  # effective rank below this x r: most of the rank does nothing
LARGE_UPDATE = 0.5  # ||dW|| / ||W||: a LoRA adjusts a layer; at half the weight's norm it rewrites it

FINDINGS = (  # code, severity, meaning
    (
        "unreadable",
        "error",
        "The input cannot be opened or parsed as a LoRA adapter: missing, not safetensors, truncated, "
        "pickled (never unpickled), an invalid adapter_config.json, or no LoRA tensors.",
    ),
    (
        "malformed",
        "error",
        "A module's tensors do not form a LoRA: a factor without its partner, two tensors for one factor, "
        "a factor that is neither 2-D nor a conv's [r, in, *kernel] / [out, r, 1, ...], rank 0, an alpha "
        "that is not a scalar or belongs to no factors.",
    ),
    ("non-finite", "error", "NaN or infinity in a factor or in the scale (alpha)."),
    (
        "overflow",
        "error",
        "The update dW = scale * B @ A reaches values beyond float32's range (3.4e38; a lora_alpha of 1e308, "
        "say): in float32 or bfloat16 it is infinite, so merge and eval refuse it.",
    ),
    ("shape-mismatch", "error", "A [r, in] and B [out, r] disagree on the rank r."),
    (
        "config-mismatch",
        "error/warning",
        "The config (adapter_config.json, diffusers' lora_adapter_metadata, or kohya's ss_network_dim / "
        "ss_network_alpha) and the tensors disagree: an error when the rank disagrees; a warning for alpha, "
        "target_modules, or PEFT or mlx-lm keys without their adapter_config.json (scale unknown, 1 "
        "assumed).",
    ),
    (
        "missing-in-base",
        "error",
        "The base (--base) has no weight at this module path: the adapter would silently do nothing there.",
    ),
    ("base-shape-mismatch", "error", "The update's [out, in] differs from the base weight's shape."),
    (
        "zero-update",
        "warning",
        f"dW is zero (||dW|| <= {ZERO_UPDATE_TOLERANCE:g} x |scale| ||B|| ||A||): untrained (peft starts B "
        "at zero) or broken.",
    ),
    (
        "rank-collapse",
        "warning",
        f"Effective rank below {RANK_COLLAPSE_FRACTION:g} x r: most of the rank is unused (cannot fire "
        "below r = 5).",
    ),
    (
        "large-update",
        "warning",
        f"With --base: ||dW|| / ||W|| above {LARGE_UPDATE:g}: the update rewrites the layer rather than "
        "adjusting it (overtrained, a wrong alpha or scale, or the wrong base).",
    ),
    (
        "unsupported-feature",
        "warning",
        "More than plain LoRA, which lrtool merge refuses and these figures leave out: DoRA, lora bias, "
        "modules_to_save or other full weights, embedding LoRA, trainable tokens, LoHa, LoKr, OFT (an error "
        "when the file holds no plain LoRA at all).",
    ),
    ("dtype-mixed", "warning", "The factors are stored in more than one dtype."),
)
SEVERITY = {code: severity for code, severity, _ in FINDINGS}


def finding(code: str, message: str, module: str | None = None, severity: str | None = None) -> dict:
    """One finding: a stable `code`, its severity (the code's own unless given), the module, a message."""
    severity = severity or SEVERITY[code]
    if severity not in SEVERITIES:  # a code whose severity depends on the case ("error/warning")
        raise ValueError(f"finding {code!r} needs an explicit severity")
    return {"code": code, "severity": severity, "module": module, "message": message}


def at_or_above(report: dict, level: str) -> list[dict]:
    """Every finding of the report whose severity is `level` or worse."""
    worst = SEVERITIES.index(level)
    return [f for a in report["adapters"] for f in a["findings"] if SEVERITIES.index(f["severity"]) <= worst]
