"""lrtool diagnose: every finding code fires on an adapter built to have it and a clean adapter fires none;
spectra, norms and pairwise figures equal their dense float64 definitions; a file that cannot be read is a
finding, never a crash; --fail-on sets the exit code."""

import json
import math
import pathlib
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_lrtool
from lrtool.diagnose import FINDINGS, diagnose

torch.set_num_threads(1)

HIDDEN, INTERMEDIATE, KV = 32, 64, 16  # the tiny Llama's widths (2 key/value heads of 8)
SHAPES = {  # module suffix -> (out_features, in_features)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
Q0, V0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
GATE0, DOWN0 = "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"


def factors(name: str, rank: int = 2, seed: int = 0, b_std: float = 0.01):
    """(A [r, in], B [out, r]) for a module of the tiny Llama, seeded; small enough to be a typical update."""
    out_features, in_features = SHAPES[name.split(".", 3)[3]]
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rank, in_features, generator=generator) * 0.1,
        torch.randn(out_features, rank, generator=generator) * b_std,
    )


def write_peft(directory: pathlib.Path, modules: dict, config: dict | None = None, extra: dict | None = None):
    """A hand-made PEFT directory: {module: (A, B)} plus extra tensors; `config` overrides the defaults."""
    directory.mkdir(parents=True, exist_ok=True)
    fields = {
        "peft_type": "LORA",
        "r": max((A.shape[0] for A, _ in modules.values()), default=2),
        "lora_alpha": 4,
        "target_modules": sorted({name.rsplit(".", 1)[1] for name in modules}) or ["q_proj"],
        "base_model_name_or_path": "tiny-llama",
        **(config or {}),
    }
    (directory / "adapter_config.json").write_text(json.dumps(fields))
    tensors = {}
    for name, (A, B) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    save_file({**tensors, **(extra or {})}, directory / "adapter_model.safetensors")
    return directory


def write_kohya(path: pathlib.Path, modules: dict, alpha: float | None = None, metadata: dict | None = None):
    tensors = {}
    for name, (A, B) in modules.items():
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = A, B
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path, metadata=metadata)
    return path


def dense(A, B, scale) -> torch.Tensor:
    return scale * (B.double() @ A.double())


def only(report: dict) -> dict:
    (entry,) = report["adapters"]
    return entry


def with_code(entry: dict, code: str) -> list[dict]:
    return [f for f in entry["findings"] if f["code"] == code]


def module(entry: dict, name: str) -> dict:
    return next(m for m in entry["modules"] if m["name"] == name)


# ---------------------------------------------------------------------------------------------------------
# Fixtures: a tiny Llama base directory and a peft-made adapter for it


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> pathlib.Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    directory = tmp_path_factory.mktemp("base") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def peft_dirs(base_dir, tmp_path_factory) -> dict[str, pathlib.Path]:
    """Adapters saved by peft on the base: "trained" (seeded small factors) and "untrained" (B = 0)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=[s.rsplit(".", 1)[1] for s in SHAPES])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora)
    assert isinstance(model, PeftModel)
    model.save_pretrained(root / "untrained")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                std = 0.1 if "lora_A" in name else 0.01
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    model.save_pretrained(root / "trained")
    return {"trained": root / "trained", "untrained": root / "untrained"}


# ---------------------------------------------------------------------------------------------------------
# A clean adapter


def test_a_clean_peft_adapter_fires_no_finding_and_reports_what_it_is(peft_dirs, base_dir):
    entry = only(diagnose([str(peft_dirs["trained"])], base=str(base_dir)))
    assert entry["findings"] == []
    assert entry["refused"] is None
    files = ("adapter_config.json", "adapter_model.safetensors")
    assert entry["size_bytes"] == sum((peft_dirs["trained"] / name).stat().st_size for name in files)
    assert (entry["format"], entry["base"], entry["rank"], entry["alpha"]) == ("peft", str(base_dir), 4, 8)
    assert (entry["rslora"], entry["dtype"]) == (False, "float32")
    assert len(entry["modules"]) == 2 * len(SHAPES)
    q = module(entry, Q0)
    assert set(q) == {
        "name",
        "shape",
        "rank",
        "scale",
        "norm",
        "singular_values",
        "effective_rank",
        "stable_rank",
        "top_energy",
        "relative_norm",
    }
    assert (q["shape"], q["rank"], q["scale"], len(q["singular_values"])) == ([32, 32], 4, 2.0, 4)
    assert 0 < q["relative_norm"] < 0.5


def test_an_untrained_peft_adapter_is_a_zero_update_in_every_module(peft_dirs):
    entry = only(diagnose([str(peft_dirs["untrained"])]))
    zero = with_code(entry, "zero-update")
    assert {f["module"] for f in zero} == {m["name"] for m in entry["modules"]}
    assert all(f["severity"] == "warning" and "B is all zeros" in f["message"] for f in zero)
    assert module(entry, Q0)["norm"] == 0 and module(entry, Q0)["effective_rank"] is None


# ---------------------------------------------------------------------------------------------------------
# One adapter per finding code


def malformed(tmp):
    A, _ = factors(Q0)
    return write_peft(tmp / "a", {}, extra={f"base_model.model.{Q0}.lora_A.weight": A}), Q0


def non_finite(tmp):
    A, B = factors(Q0)
    B[3, 1] = math.nan
    return write_peft(tmp / "a", {Q0: (A, B)}), Q0


def overflow(tmp):
    return write_peft(tmp / "a", {Q0: factors(Q0)}, config={"lora_alpha": 1e308}), Q0


def shape_mismatch(tmp):
    A, _ = factors(Q0, rank=2)
    _, B = factors(Q0, rank=3)
    return write_peft(tmp / "a", {Q0: (A, B)}, config={"r": 2}), Q0


def config_rank(tmp):
    return write_peft(tmp / "a", {Q0: factors(Q0, rank=2)}, config={"r": 4}), Q0


def config_targets(tmp):
    return write_peft(tmp / "a", {Q0: factors(Q0)}, config={"target_modules": ["q_proj.weight"]}), Q0


def config_alpha(tmp):
    name = "lora_te_model_layers_0_self_attn_q_proj"
    metadata = {"ss_network_dim": "2", "ss_network_alpha": "8"}
    return write_kohya(tmp / "lora.safetensors", {name: factors(Q0)}, alpha=4.0, metadata=metadata), name


def missing_in_base(tmp):
    name = "model.layers.5.self_attn.q_proj"
    return write_peft(tmp / "a", {name: factors(Q0)}), name


def base_shape_mismatch(tmp):
    A, B = factors(Q0)
    return write_peft(tmp / "a", {Q0: (A[:, :16].contiguous(), B)}), Q0


def zero_update(tmp):
    A, B = factors(Q0)
    return write_peft(tmp / "a", {Q0: (A, torch.zeros_like(B))}), Q0


def rank_collapse(tmp):
    A, B = factors(Q0, rank=8)
    B = B[:, :1].repeat(1, 8)  # eight equal columns: dW has rank 1, effective rank 1 < 0.25 x 8
    return write_peft(tmp / "a", {Q0: (A, B)}), Q0


def large_update(tmp):
    A, B = factors(Q0)
    return write_peft(tmp / "a", {Q0: (A, B * 100)}), Q0


def dtype_mixed(tmp):
    A, B = factors(Q0)
    return write_peft(tmp / "a", {Q0: (A, B.to(torch.bfloat16))}), None


BUILT = [  # (builder, the code it must fire, its severity, whether it needs --base)
    (malformed, "malformed", "error", False),
    (non_finite, "non-finite", "error", False),
    (overflow, "overflow", "error", False),
    (shape_mismatch, "shape-mismatch", "error", False),
    (config_rank, "config-mismatch", "error", False),
    (config_targets, "config-mismatch", "warning", False),
    (config_alpha, "config-mismatch", "warning", False),
    (missing_in_base, "missing-in-base", "error", True),
    (base_shape_mismatch, "base-shape-mismatch", "error", True),
    (zero_update, "zero-update", "warning", False),
    (rank_collapse, "rank-collapse", "warning", False),
    (large_update, "large-update", "warning", True),
    (dtype_mixed, "dtype-mixed", "warning", False),
]


def test_every_finding_code_has_an_adapter_built_to_fire_it():
    tested_elsewhere = {"unreadable", "unsupported-feature"}  # below, several inputs each
    assert {code for code, _, _ in FINDINGS} == {code for _, code, _, _ in BUILT} | tested_elsewhere


@pytest.mark.parametrize("build, code, severity, needs_base", BUILT, ids=[b.__name__ for b, *_ in BUILT])
def test_each_finding_code_fires_on_an_adapter_built_to_have_it(
    tmp_path, base_dir, build, code, severity, needs_base
):
    path, name = build(tmp_path)
    entry = only(diagnose([str(path)], base=str(base_dir) if needs_base else None))
    assert (severity, name) in [(f["severity"], f["module"]) for f in with_code(entry, code)]
    problems = {f["code"] for f in entry["findings"] if f["severity"] in ("error", "warning")}
    assert problems <= {code, "config-mismatch"}, entry["findings"]  # it fires for that one reason


def with_spectrum(name: str, singular_values: list[float], seed: int = 0):
    """Factors whose update has exactly these singular values (times the scale)."""
    out_features, in_features = SHAPES[name.split(".", 3)[3]]
    generator = torch.Generator().manual_seed(seed)
    rank = len(singular_values)
    left, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(in_features, rank, generator=generator, dtype=torch.float64))
    return right.T.contiguous(), (left * torch.tensor(singular_values, dtype=torch.float64)).contiguous()


@pytest.mark.parametrize(
    "spectrum, fires",
    [
        ([1.0] + [0.0] * 7, True),  # effective rank 1 of r = 8
        ([1.0, 0.3, 0.02, 0.02, 0, 0, 0, 0], True),  # 1.97 < 0.25 x 8
        ([1.0, 0.5, 0.05, 0.05, 0, 0, 0, 0], False),  # 2.40
        ([1.0] * 4, False),  # r = 4 never collapses: an effective rank is at least 1
    ],
)
def test_rank_collapse_fires_below_a_quarter_of_the_rank(tmp_path, spectrum, fires):
    entry = only(diagnose([str(write_peft(tmp_path / "a", {Q0: with_spectrum(Q0, spectrum)}))]))
    p = torch.tensor([s for s in spectrum if s]) / sum(spectrum)
    assert module(entry, Q0)["effective_rank"] == pytest.approx(
        math.exp(float(-(p * p.log()).sum())), rel=1e-5
    )
    assert bool(with_code(entry, "rank-collapse")) is fires


@pytest.mark.parametrize(
    "extra, config, name, feature",
    [
        ({f"base_model.model.{Q0}.lora_magnitude_vector": torch.ones(32)}, {"use_dora": True}, Q0, "DoRA"),
        ({f"base_model.model.{Q0}.lora_B.bias": torch.ones(32)}, {"lora_bias": True}, Q0, "lora bias"),
        (
            {"base_model.model.lm_head.weight": torch.ones(64, 32)},
            {"modules_to_save": ["lm_head"]},
            "lm_head",
            "full weight",
        ),
        (
            {
                "base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(2, 64),
                "base_model.model.model.embed_tokens.lora_embedding_B": torch.ones(32, 2),
            },
            {"target_modules": ["q_proj", "embed_tokens"]},
            "model.embed_tokens",
            "embedding LoRA",
        ),
    ],
    ids=["dora", "lora-bias", "modules-to-save", "embedding"],
)
def test_features_beyond_plain_lora_are_unsupported_features_named_by_module(
    tmp_path, extra, config, name, feature
):
    path = write_peft(tmp_path / "a", {Q0: factors(Q0)}, config=config, extra=extra)
    entry = only(diagnose([str(path)]))
    found = with_code(entry, "unsupported-feature")
    assert any(f["module"] == name and feature in f["message"] for f in found), found
    assert all(f["severity"] == "warning" for f in found)
    assert entry["refused"] and module(entry, Q0)["singular_values"]  # merge refuses; the LoRA is still read


def test_a_refusal_the_inspection_does_not_explain_still_becomes_a_finding(tmp_path):
    path = write_peft(tmp_path / "a", {Q0: factors(Q0)}, config={"use_qalora": True})
    entry = only(diagnose([str(path)]))
    (found,) = with_code(entry, "unsupported-feature")
    assert "QA-LoRA" in found["message"] and entry["refused"] == found["message"]


def test_modules_of_a_refused_file_read_as_the_canonical_loader_reads_them(tmp_path):
    """rsLoRA, rank_pattern and alpha_pattern give the same scales whether load_adapter reads the file or
    diagnose reads the modules of a file load_adapter refuses (here for its DoRA magnitude) through the
    survey."""
    modules = {Q0: factors(Q0, rank=4, seed=1), V0: factors(V0, rank=2, seed=2), GATE0: factors(GATE0, 2, 3)}
    config = {
        "r": 2,
        "lora_alpha": 6,
        "use_rslora": True,
        "rank_pattern": {"q_proj": 4},
        "alpha_pattern": {"v_proj": 3},
    }
    clean = only(diagnose([str(write_peft(tmp_path / "clean", modules, config=config))]))
    extra = {f"base_model.model.{GATE0}.lora_magnitude_vector": torch.ones(64)}
    refused = only(diagnose([str(write_peft(tmp_path / "dora", modules, config=config, extra=extra))]))
    assert clean["refused"] is None and "DoRA" in refused["refused"]
    assert refused["modules"] == clean["modules"]
    assert module(clean, Q0)["scale"] == pytest.approx(6 / 2) and module(clean, V0)["scale"] == pytest.approx(
        3 / math.sqrt(2)
    )


# ---------------------------------------------------------------------------------------------------------
# Figures against their dense float64 definitions


def test_spectra_and_norms_equal_the_dense_computation(tmp_path, base_dir):
    modules = {Q0: factors(Q0, rank=6, seed=4), DOWN0: factors(DOWN0, rank=6, seed=5)}
    config = {"lora_alpha": 5, "use_rslora": True}
    entry = only(diagnose([str(write_peft(tmp_path / "a", modules, config=config))], base=str(base_dir)))
    from safetensors import safe_open

    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as f:
        weights = {name: f.get_tensor(name + ".weight").double() for name in modules}
    for name, (A, B) in modules.items():
        s = torch.linalg.svdvals(dense(A, B, 5 / math.sqrt(6)))[:6]
        p = s / s.sum()
        expected = {
            "singular_values": s.tolist(),
            "norm": float(s.pow(2).sum().sqrt()),
            "effective_rank": math.exp(float(-(p * p.log()).sum())),
            "stable_rank": float(s.pow(2).sum() / s[0] ** 2),
            "top_energy": float(s[0] ** 2 / s.pow(2).sum()),
            "relative_norm": float(s.pow(2).sum().sqrt() / weights[name].norm()),
        }
        got = module(entry, name)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5), key
    assert entry["norm"] == pytest.approx(math.hypot(*(module(entry, n)["norm"] for n in modules)), rel=1e-5)


def principal_overlap(Da: torch.Tensor, Db: torch.Tensor, rank_a: int, rank_b: int, rows: bool) -> float:
    """Mean squared cosine of the principal angles between the column (or row) spaces, from dense SVDs."""
    Ua, _, Vha = torch.linalg.svd(Da)
    Ub, _, Vhb = torch.linalg.svd(Db)
    Qa, Qb = (Vha[:rank_a].T, Vhb[:rank_b].T) if rows else (Ua[:, :rank_a], Ub[:, :rank_b])
    return float(torch.linalg.svdvals(Qa.T @ Qb).pow(2).mean())


def test_pair_figures_equal_the_dense_computation(tmp_path):
    a_modules = {
        Q0: factors(Q0, 4, seed=1),
        GATE0: factors(GATE0, 4, seed=2),
        DOWN0: factors(DOWN0, 4, seed=3),
    }
    b_modules = {Q0: factors(Q0, 4, seed=4), GATE0: factors(GATE0, 3, seed=5), V0: factors(V0, 2, seed=6)}
    a = write_peft(tmp_path / "a", a_modules, config={"r": 4, "lora_alpha": 8, "rank_pattern": {}})
    b = write_peft(
        tmp_path / "b",
        b_modules,
        config={"r": 4, "lora_alpha": 4, "rank_pattern": {"gate_proj": 3, "v_proj": 2}},
    )
    report = diagnose([str(a), str(b)])
    (pair,) = report["pairs"]
    scale_a = {name: 8 / 4 for name in a_modules}
    scale_b = {Q0: 4 / 4, GATE0: 4 / 3, V0: 4 / 2}
    Da = {name: dense(A, B, scale_a[name]) for name, (A, B) in a_modules.items()}
    Db = {name: dense(A, B, scale_b[name]) for name, (A, B) in b_modules.items()}

    common = [Q0, GATE0]
    inner = sum(float((Da[n] * Db[n]).sum()) for n in common)
    energy = [sum(float(d.pow(2).sum()) for d in D.values()) for D in (Da, Db)]
    assert pair["cosine"] == pytest.approx(inner / math.sqrt(energy[0] * energy[1]), rel=1e-5)
    both = sum(int(((Da[n] != 0) & (Db[n] != 0)).sum()) for n in common)
    conflicts = sum(int(((Da[n] != 0) & (Db[n] != 0) & (Da[n].sign() != Db[n].sign())).sum()) for n in common)
    assert pair["sign_conflict"] == pytest.approx(conflicts / both, rel=1e-5)
    assert (pair["common_modules"], pair["only_in_a"], pair["only_in_b"]) == (2, 1, 1)

    ranks = {Q0: (4, 4), GATE0: (4, 3)}
    for got in pair["modules"]:
        n = got["name"]
        cosine = float((Da[n] * Db[n]).sum() / (Da[n].norm() * Db[n].norm()))
        assert got["cosine"] == pytest.approx(cosine, rel=1e-5)
        for key, rows in (("column_overlap", False), ("row_overlap", True)):
            assert got[key] == pytest.approx(principal_overlap(Da[n], Db[n], *ranks[n], rows=rows), rel=1e-5)
    # factor-avg: A and B averaged separately (scale folded into B), against the exact average of the updates.
    (A1, B1), (A2, B2) = a_modules[Q0], b_modules[Q0]
    merged = ((scale_a[Q0] * B1.double() + scale_b[Q0] * B2.double()) / 2) @ ((A1.double() + A2.double()) / 2)
    exact = (Da[Q0] + Db[Q0]) / 2
    error = float((merged - exact).norm() / exact.norm())
    assert module(pair, Q0)["factor_avg_error"] == pytest.approx(error, rel=1e-5)
    assert module(pair, GATE0)["factor_avg_error"] is None  # ranks 4 and 3: factor-avg cannot average them
    assert pair["factor_avg_error"] == pytest.approx(error, rel=1e-5)


def test_identical_adapters_have_cosine_one_and_an_adapter_and_its_negation_minus_one(tmp_path):
    modules = {Q0: factors(Q0, 4, seed=1), GATE0: factors(GATE0, 4, seed=2)}
    original = write_peft(tmp_path / "a", modules)
    copy = shutil.copytree(original, tmp_path / "copy")
    negation = write_peft(tmp_path / "neg", {name: (A, -B) for name, (A, B) in modules.items()})
    same, opposite, _ = diagnose([str(original), str(copy), str(negation)])["pairs"]
    assert same["cosine"] == 1.0 and opposite["cosine"] == -1.0
    assert (same["column_overlap"], same["row_overlap"], same["sign_conflict"]) == (1.0, 1.0, 0.0)
    assert same["factor_avg_error"] == pytest.approx(0, abs=1e-6)
    assert opposite["sign_conflict"] == 1.0
    assert same["verdict"].startswith("low") and opposite["verdict"].startswith("high")


def test_unrelated_adapters_get_a_low_interference_verdict(tmp_path):
    a = write_peft(tmp_path / "a", {GATE0: factors(GATE0, 2, seed=1)})
    b = write_peft(tmp_path / "b", {GATE0: factors(GATE0, 2, seed=2)})
    (pair,) = diagnose([str(a), str(b)])["pairs"]
    assert abs(pair["cosine"]) < 0.1 and pair["verdict"].startswith("low")


def test_kohya_names_are_matched_to_the_base_and_to_their_peft_twin(tmp_path, base_dir):
    modules = {Q0: factors(Q0, seed=1), DOWN0: factors(DOWN0, seed=2)}
    peft = write_peft(tmp_path / "peft", modules, config={"lora_alpha": 2})
    mangled = {"lora_te_" + name.replace(".", "_"): f for name, f in modules.items()}
    kohya = write_kohya(tmp_path / "lora.safetensors", mangled, alpha=2.0)
    entry = only(diagnose([str(kohya)], base=str(base_dir)))
    assert entry["format"] == "kohya" and entry["alpha"] == 2.0 and entry["findings"] == []
    assert sorted(m["name"] for m in entry["modules"]) == sorted(modules)
    assert all(m["relative_norm"] > 0 for m in entry["modules"])
    (pair,) = diagnose([str(peft), str(kohya)])["pairs"]
    assert pair["cosine"] == 1.0 and pair["common_modules"] == 2


# ---------------------------------------------------------------------------------------------------------
# Unreadable inputs are findings


class RunsCodeWhenUnpickled:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_unreadable_inputs_are_findings_and_the_rest_is_still_reported(cli, tmp_path):
    good = write_peft(tmp_path / "good", {Q0: factors(Q0)})
    data = (good / "adapter_model.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file\n")
    marker = tmp_path / "marker"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps({"w": RunsCodeWhenUnpickled(marker)}))
    paths = [truncated, text, pickled, tmp_path / "nowhere", good]

    code, out, err = cli("diagnose", *map(str, paths))
    assert code == 0 and "Traceback" not in err
    report = json.loads(out)
    entries = report["adapters"]
    assert [e["path"] for e in entries] == list(map(str, paths))
    for entry, fragment in zip(
        entries, ["not a readable safetensors", "not a readable safetensors", "pickled", "no such"]
    ):
        (found,) = entry["findings"]
        assert found["code"] == "unreadable" and fragment in found["message"] and entry["modules"] == []
    assert entries[-1]["findings"] == [] and module(entries[-1], Q0)["singular_values"]
    assert not marker.exists()
    assert report["counts"] == {"error": 4, "warning": 0, "info": 0}


# ---------------------------------------------------------------------------------------------------------
# The command line


def test_fail_on_sets_exit_3_after_writing_the_report(cli, tmp_path):
    clean = str(write_peft(tmp_path / "clean", {Q0: factors(Q0)}))
    warned = str(zero_update(tmp_path / "w")[0])
    broken = str(non_finite(tmp_path / "e")[0])
    assert cli("diagnose", clean, "--fail-on", "warning")[0] == 0
    assert cli("diagnose", warned, "--fail-on", "error")[0] == 0
    code, out, err = cli("diagnose", warned, "--fail-on", "warning")
    assert code == 3 and json.loads(out)["counts"]["warning"] == 1
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("Error: 1 finding(s) at or above warning, first zero-update")
    assert cli("diagnose", clean, broken, "--fail-on", "error")[0] == 3
    assert cli("diagnose", broken)[0] == 0  # without --fail-on, a written report is success
    assert cli("diagnose", clean, "--fail-on", "info")[0] == 2


def test_a_real_run_pipes_identical_json_and_fails_the_gate_without_a_traceback(tmp_path):
    broken = tmp_path / "lora.safetensors"
    broken.write_bytes(b"\x80\x04garbage")
    good = write_peft(tmp_path / "good", {Q0: factors(Q0)})
    args = ("diagnose", str(good), str(broken), "--fail-on", "error")
    first, second = run_lrtool(*args), run_lrtool(*args)
    assert first.returncode == 3 and first.stdout == second.stdout
    assert "Traceback" not in first.stderr and first.stderr.strip().splitlines()[-1].startswith("Error: ")
    report = json.loads(first.stdout)
    assert report["adapters"][1]["findings"][0]["message"].endswith(
        "a pickle, never unpickled; convert to safetensors"
    )
    for value in _floats(report):
        assert value == float(f"{value:.6g}")


def _floats(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _floats(item)
    elif isinstance(value, list):
        for item in value:
            yield from _floats(item)


def test_diagnose_cannot_run_without_adapters_or_with_an_unreadable_base(cli, tmp_path, monkeypatch):
    adapter = str(write_peft(tmp_path / "a", {Q0: factors(Q0)}))
    (tmp_path / "not-a-model").mkdir()
    code, out, err = cli("diagnose", adapter, "--base", str(tmp_path / "not-a-model"))
    assert (code, out) == (1, "") and "no config.json" in err
    (tmp_path / "not-a-model" / "config.json").write_text("{}")
    code, _, err = cli("diagnose", adapter, "--base", str(tmp_path / "not-a-model"))
    assert code == 1 and "no weights" in err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("\n"))
    code, out, err = cli("diagnose", "-")
    assert (code, out) == (1, "") and err.strip() == "Error: no adapters to diagnose"
    assert cli("diagnose")[0] == 2


def test_paths_can_come_from_stdin(cli, tmp_path, monkeypatch):
    paths = [str(write_peft(tmp_path / name, {Q0: factors(Q0)})) for name in ("a", "b")]
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("\n".join(paths) + "\n"))
    code, out, _ = cli("diagnose", "-")
    assert code == 0 and [e["path"] for e in json.loads(out)["adapters"]] == paths


def test_table_goes_to_stderr_and_leaves_stdout_the_same(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # rich's width off a terminal: no wrapped paths
    clean = str(write_peft(tmp_path / "clean", {Q0: factors(Q0)}))
    warned = str(zero_update(tmp_path / "w")[0])
    plain = cli("diagnose", clean, warned)
    code, out, err = cli("diagnose", clean, warned, "--table")
    assert code == 0 and out == plain[1]
    assert "zero-update" in err and "verdict" in err and "clean" in err


def test_plot_without_matplotlib_is_a_one_line_error(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # makes `import matplotlib` fail
    adapter = str(write_peft(tmp_path / "a", {Q0: factors(Q0)}))
    code, out, err = cli("diagnose", adapter, "--plot", str(tmp_path / "spectra.png"))
    assert (code, out) == (1, "") and err.startswith("Error: --plot needs matplotlib")
    assert not (tmp_path / "spectra.png").exists()


def test_plot_draws_a_png(cli, tmp_path):
    pytest.importorskip("matplotlib")
    adapters = [str(write_peft(tmp_path / name, {Q0: factors(Q0, seed=n)})) for n, name in enumerate("ab")]
    code, _, _ = cli("diagnose", *adapters, "--plot", str(tmp_path / "spectra.png"))
    assert code == 0 and (tmp_path / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli("diagnose", *adapters, "--plot", str(tmp_path / "spectra.png"))[0] == 1  # exists: --force


def test_plot_to_stdout_is_a_usage_error_before_any_work(cli, tmp_path):
    """stdout carries the JSON report: PNG bytes after it would corrupt it."""
    code, out, err = cli("diagnose", str(tmp_path / "nowhere"), "--plot", "-")
    assert (code, out) == (2, "") and "--plot" in err


# ---------------------------------------------------------------------------------------------------------
# Factors and weights in dtypes torch cannot compute with directly


def test_integer_factors_are_an_unsupported_feature_left_out_of_the_spectra(tmp_path):
    A, B = factors(Q0)
    quantised = {Q0: ((A * 100).to(torch.int8), (B * 1000).to(torch.int8)), V0: factors(V0)}
    entry = only(diagnose([str(write_peft(tmp_path / "a", quantised))]))
    (found,) = with_code(entry, "unsupported-feature")
    assert found["module"] == Q0 and found["severity"] == "warning" and "int8" in found["message"]
    assert module(entry, Q0)["singular_values"] is None
    assert module(entry, V0)["singular_values"] is not None


def test_float8_factors_and_base_weights_are_read_in_float64(tmp_path):
    A, B = (t.to(torch.float8_e4m3fn) for t in factors(Q0, b_std=0.1))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    weight = (torch.randn(32, 32, generator=torch.Generator().manual_seed(0)) * 0.1).to(torch.float8_e5m2)
    save_file({f"{Q0}.weight": weight}, base / "model.safetensors")
    entry = only(diagnose([str(write_peft(tmp_path / "a", {Q0: (A, B)}))], base=str(base)))
    assert entry["dtype"] == "float8_e4m3fn" and entry["findings"] == []
    s = torch.linalg.svdvals(dense(A, B, 4 / 2))[:2]
    got = module(entry, Q0)
    assert got["singular_values"] == pytest.approx(s.tolist(), rel=1e-5)
    assert got["relative_norm"] == pytest.approx(float(s.norm() / weight.double().norm()), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Sign conflicts: exact in float32 blocks, estimated for large pairs


def dense_sign_conflicts(a, b) -> tuple[int, int]:
    """The definition on the dense float64 updates."""
    da, db = a.delta(), b.delta()
    both = (da != 0) & (db != 0)
    return int((both & (da.sign() != db.sign())).sum()), int(both.sum())


def lora(out, inp, rank, scale, seed, dtype=torch.float32):
    from lrtool.adapters import LoraModule

    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g) * 0.01
    return LoraModule(A=A.to(dtype), B=B.to(dtype), scale=scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_sign_conflicts_counted_in_float32_blocks_equal_the_dense_float64_count(dtype):
    """Mixed ranks, a negative scale, zero rows and columns, and entries exactly zero or within rounding of
    zero (a row of B orthogonal to a column of A): the certified float32 count is the float64 one."""
    from lrtool.diagnose.figures import _sign_conflicts

    a, b = lora(70, 300, 4, 2.0, 1, dtype), lora(70, 300, 7, -0.5, 2, dtype)
    a.B[3] = 0  # a zero row: nothing there is non-zero in both
    b.A[:, 10] = 0  # a zero column
    a.B[5, :2], a.A[:2, 20] = torch.tensor([1.0, 1.0]).to(dtype), torch.tensor([1.0, -1.0]).to(dtype)
    a.B[5, 2:], a.A[2:, 20] = 0, 0  # entry (5, 20) of a's update is 1 - 1 = 0 exactly
    a.A[:2, 21], a.A[2:, 21] = torch.tensor([1.0, 2.0**-23 - 1.0]).to(dtype), 0  # (5, 21): 2^-23, or 0 where
    # the dtype rounds it away
    assert _sign_conflicts(a, b) == dense_sign_conflicts(a, b)
    assert _sign_conflicts(a, a) == (0, dense_sign_conflicts(a, a)[1])


def test_a_large_pairs_sign_conflict_rate_is_a_labelled_estimate_whose_interval_holds_the_exact_one(
    tmp_path, monkeypatch
):
    from lrtool.diagnose import figures, report

    modules = {Q0: factors(Q0, 4, seed=1), GATE0: factors(GATE0, 4, seed=2)}
    a = write_peft(tmp_path / "a", modules)
    b = write_peft(tmp_path / "b", {name: factors(name, 4, seed=s) for name, s in ((Q0, 3), (GATE0, 4))})
    exact = diagnose([str(a), str(b)])["pairs"][0]
    assert exact["sign_conflict_estimate"] is None
    monkeypatch.setattr(report, "EXACT_SIGN_ENTRIES", 100)  # these modules share far more entries
    monkeypatch.setattr(figures, "SIGN_SAMPLES", 20_000)
    estimated, again = (diagnose([str(a), str(b)])["pairs"][0] for _ in range(2))
    label = estimated["sign_conflict_estimate"]
    entries = sum(math.prod(SHAPES[name.split(".", 3)[3]]) for name in modules)
    assert label["sampled_entries"] >= 20_000 and label["of_entries"] == entries
    low, high = label["ci95"]
    assert low < exact["sign_conflict"] < high and high - low < 0.03
    assert estimated == again  # drawn from seeds: the same on every run
    assert diagnose([str(a), str(b)], exact_sign_conflicts=True)["pairs"][0] == exact
