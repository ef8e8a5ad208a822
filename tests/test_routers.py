"""Routers compute their definitions: Arrow's prototypes are exact top singular vectors, its per-token mix
equals dense references (outputs and factors), uniform is the mean of the outputs, oracle routes as its map
says, centroid finds each adapter's own examples, LoraHub finds the known best weights; router directories
are reproducible and refuse what they cannot use."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from helpers import peft_model, random_ids, save_random_peft_adapter, save_tiny_llama
from lrtool.adapters import load_adapter
from lrtool.engine import AdapterEngine, OneAdapter, Plan

torch.set_num_threads(1)

LORAS = {
    "a1": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "a2": dict(r=8, lora_alpha=3, use_rslora=True, target_modules="all-linear"),
    "a3": dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"]),
    "a4": dict(r=4, lora_alpha=16, target_modules="all-linear"),  # a1's ranks: LoraHub adds factors
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from lrtool.cli import main
    from lrtool.models import texts_of

    root = tmp_path_factory.mktemp("routers")
    with pytest.raises(SystemExit) as done:
        main(["gen-data", "two-hop", "--size", "tiny", "--seed", "5", "-q", "-o", str(root / "world")])
    assert done.value.code == 0
    base = save_tiny_llama(root / "base", list(texts_of([root / "world"])))
    adapters = {
        name: save_random_peft_adapter(base, root / name, seed=i, **config)
        for i, (name, config) in enumerate(LORAS.items(), start=1)
    }
    return SimpleNamespace(root=root, world=root / "world", base=base, adapters=adapters)


def route(cli, env, out: Path, *args):
    code, stdout, err = cli("route", *args, "-o", str(out), "-q")
    assert code == 0, err
    return out


def adapters(env, *names):
    return [str(env.adapters[n]) for n in names]


def test_arrow_prototypes_are_the_exact_top_right_singular_vectors(cli, env, tmp_path):
    from safetensors.torch import load_file

    out = route(cli, env, tmp_path / "arrow", *adapters(env, "a1", "a2", "a3"), "--method", "arrow")
    tensors = load_file(out / "router.safetensors")
    loaded = [load_adapter(env.adapters[n]) for n in ("a1", "a2", "a3")]
    for key, prototypes in tensors.items():
        module = key.removeprefix("prototypes.")
        for row, adapter in zip(prototypes, loaded):
            if module not in adapter.modules:
                assert torch.count_nonzero(row) == 0
                continue
            dense = adapter.modules[module].delta(torch.float64)
            top = torch.linalg.svd(dense)[2][0]  # the top right singular vector, sign free
            assert min((row.double() - top).norm(), (row.double() + top).norm()) < 1e-5


def eval_predictions(cli, env, tmp_path, *systems, data=None):
    predictions = tmp_path / "p.jsonl"
    data = data or [env.world / "twohop.jsonl"]
    code, _, err = cli(
        "eval", *map(str, data), "--base", str(env.base), *systems, "--predictions", str(predictions),
        "--score", "exact,loglik", "--limit", "24", "-q", "-o", str(tmp_path / "r.json"), "--force",
    )  # fmt: skip
    assert code == 0, err
    lines = [json.loads(x) for x in predictions.read_text().splitlines()]
    predictions.unlink()
    return {name: [x for x in lines if x["system"] == name] for name in {x["system"] for x in lines}}


def same(lines, others):
    assert [x["prediction"] for x in lines] == [x["prediction"] for x in others]
    for a, b in zip(lines, others):
        assert a["loglik"] == pytest.approx(b["loglik"], rel=1e-4, abs=1e-4)


def hop2_examples(env, tmp_path, count=8):
    path = tmp_path / "examples.jsonl"
    path.write_text("".join((env.world / "hop2.jsonl").read_text().splitlines(keepends=True)[:count]))
    return str(path)


# Each registered router's flags when it routes over the one adapter a2 (one row per router: a new router
# must add its row, see the test below the table).
ONE_ADAPTER = {
    "arrow": lambda env, tmp_path: [],
    "uniform": lambda env, tmp_path: [],
    "centroid": lambda env, tmp_path: [
        "--examples",
        f"a2={hop2_examples(env, tmp_path)}",
        "--base",
        str(env.base),
    ],
    "oracle": lambda env, tmp_path: ["--by", "familiarity", "--map", "R=a2,H=a2,F=a2"],
    "lorahub": lambda env, tmp_path: [
        "--examples",
        hop2_examples(env, tmp_path),
        "--base",
        str(env.base),
        "--budget",
        "12",
    ],
}


def test_every_registered_router_has_its_row():
    from lrtool import routers

    assert sorted(ONE_ADAPTER) == sorted(routers.REGISTRY)


@pytest.mark.parametrize("method", sorted(ONE_ADAPTER))
def test_a_router_over_one_adapter_computes_its_definition(cli, env, tmp_path, method):
    """Over one adapter, every router but lorahub is that adapter on every row and token (top-k of one,
    weight 1). lorahub combines the factors, (w A, w s B): over one adapter that is w^2 times its update,
    which merge's linear computes independently."""
    flags = ONE_ADAPTER[method](env, tmp_path)
    router = route(cli, env, tmp_path / method, *adapters(env, "a2"), "--method", method, *flags)
    reference = env.adapters["a2"]
    if method == "lorahub":
        (weight,) = json.loads((router / "router.json").read_text())["parameters"]["weights"]
        assert abs(weight - 1) > 0.05  # far enough from 1 that the adapter alone would not pass
        reference = tmp_path / "weighted"
        code, _, err = cli(
            "merge", str(env.adapters["a2"]), "--method", "linear", "--weights", repr(weight * weight),
            "-o", str(reference), "-q",
        )  # fmt: skip
        assert code == 0, err
    got = eval_predictions(
        cli, env, tmp_path, f"--system=one=adapter:{reference}", f"--system=r=router:{router}"
    )
    same(got["r"], got["one"])


def routed_logits(env, part_of, rows=3, length=6, seed=0):
    """Logits of `rows` random prompts with the router part `part_of(engine)` on every row."""
    model = peft_model(env.base)
    engine = AdapterEngine(model, [load_adapter(env.adapters[n]) for n in ("a1", "a2", "a3")])
    ids = random_ids(rows, length, seed)
    with torch.no_grad(), engine.routing(Plan.by_row([part_of(engine)] * rows)):
        logits = model(input_ids=ids).logits
    engine.close()
    return logits


def arrow_part(env, tmp_path, cli, *extra):
    from lrtool.routers.base import Router, RoutingContext
    from lrtool.routers.build import load_for_eval

    router_dir = route(
        cli, env, tmp_path / "arrow", *adapters(env, "a1", "a2", "a3"), "--method", "arrow", *extra
    )
    router, _, make_routing = load_for_eval(str(router_dir))
    assert isinstance(router, Router)
    return lambda engine: make_routing([0, 1, 2], RoutingContext(engine, engine.model, None)).part([])


def test_arrow_top_all_at_a_huge_temperature_equals_uniform(cli, env, tmp_path):
    from lrtool.routers.uniform import UniformRouter

    arrow = arrow_part(env, tmp_path, cli, "--top-k", "3", "--temperature", "1e12")
    torch.testing.assert_close(
        routed_logits(env, arrow),
        routed_logits(env, lambda e: UniformRouter(torch.tensor([0, 1, 2]))),
        rtol=1e-5,
        atol=1e-5,
    )


def dense_hooked_logits(env, ids, contribution):
    """Reference: each target layer's output + contribution(module name, its dense updates, x) in float64."""
    model = peft_model(env.base)
    loaded = [load_adapter(env.adapters[n]) for n in ("a1", "a2", "a3")]
    modules, handles = dict(model.named_modules()), []
    for name in sorted({n for a in loaded for n in a.modules}):
        deltas = [a.modules[name] if name in a.modules else None for a in loaded]

        def hook(module, inputs, output, name=name, deltas=deltas):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            extra = contribution(name, deltas, x)
            return output + extra.reshape(output.shape).to(output.dtype)

        handles.append(modules[name].register_forward_hook(hook))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for handle in handles:
        handle.remove()
    return logits


@pytest.mark.parametrize("general", [0, 2])
def test_arrow_routes_as_peft_arrow_does(cli, env, tmp_path, monkeypatch, general):
    """Against peft's own Arrow (create_arrow_model; with general adapters, its GenKnowSub): the same logits.
    peft finds each prototype by 15 steps of power iteration; run to convergence here (lrtool's prototypes
    are exact SVDs), the two agree to float32 rounding."""
    peft_module = pytest.importorskip("peft")
    if not hasattr(peft_module, "create_arrow_model"):
        pytest.skip("this peft has no Arrow (create_arrow_model)")
    from peft import ArrowConfig, create_arrow_model
    from peft.tuners.lora import arrow as peft_arrow
    from transformers import AutoModelForCausalLM

    from lrtool.routers.base import RoutingContext
    from lrtool.routers.build import load_for_eval

    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])  # peft: one rank
    tasks = [
        str(save_random_peft_adapter(env.base, tmp_path / f"t{i}", seed=20 + i, **config)) for i in range(3)
    ]
    generals = [
        str(save_random_peft_adapter(env.base, tmp_path / f"g{i}", seed=40 + i, scale=0.1, **config))
        for i in range(general)
    ]
    power_iteration = peft_arrow.ArrowLoraLinearLayer.top_right_singular_vec_from_BA
    monkeypatch.setattr(
        peft_arrow.ArrowLoraLinearLayer,
        "top_right_singular_vec_from_BA",
        lambda self, A, B: power_iteration(self, A.double(), B.double(), iters=2000),
    )
    peft = create_arrow_model(
        AutoModelForCausalLM.from_pretrained(env.base),
        tasks,
        ArrowConfig(top_k=2, router_temperature=1.0, use_gks=bool(generals), rng_seed=0),
        general_adapter_paths=generals or None,
    ).eval()
    ids = random_ids(3, 7, seed=5)
    with torch.no_grad():
        expected = peft(input_ids=ids).logits

    flags = [flag for path in generals for flag in ("--general", path)]
    router_dir = route(cli, env, tmp_path / "arrow", *tasks, "--method", "arrow", "--top-k", "2", *flags)
    _, held, make_routing = load_for_eval(str(router_dir))
    model = peft_model(env.base)
    engine = AdapterEngine(model, held)
    part = make_routing(list(range(len(held))), RoutingContext(engine, model, None)).part([])
    with torch.no_grad(), engine.routing(Plan.by_row([part] * len(ids))):
        got = model(input_ids=ids).logits
    engine.close()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_uniform_is_the_mean_of_the_adapters_outputs(env):
    from lrtool.routers.uniform import UniformRouter

    ours = routed_logits(env, lambda e: UniformRouter(torch.tensor([0, 1, 2])))

    def mean_output(name, modules, x):
        return sum(m.delta() @ x.T for m in modules if m is not None).T / 3

    torch.testing.assert_close(
        ours, dense_hooked_logits(env, random_ids(3, 6, 0), mean_output), rtol=1e-4, atol=1e-4
    )


def arrow_reference(prototypes, top_k, temperature, mix):
    """Dense float64 Arrow: per token, top-k by |<x, p>|, softmax; mixed outputs or mixed factors."""

    def contribution(name, modules, x):
        P = prototypes[name].double()
        scores = (x @ P.T).abs()
        top, chosen = scores.topk(top_k, dim=1)
        w = torch.softmax(top / temperature, dim=1)
        out = torch.zeros(
            x.shape[0], next(m for m in modules if m is not None).out_features, dtype=torch.float64
        )
        rank = max(m.rank for m in modules if m is not None)
        for t in range(x.shape[0]):
            if mix == "outputs":
                for j in range(top_k):
                    m = modules[int(chosen[t, j])]
                    if m is not None:
                        out[t] += w[t, j] * (m.delta() @ x[t])
            else:  # factors, ranks zero-padded as the engine stacks them
                A = torch.zeros(rank, x.shape[1], dtype=torch.float64)
                B = torch.zeros(out.shape[1], rank, dtype=torch.float64)
                for j in range(top_k):
                    m = modules[int(chosen[t, j])]
                    if m is not None:
                        A[: m.rank] += w[t, j] * m.A.double()
                        B[:, : m.rank] += w[t, j] * m.scale * m.B.double()
                out[t] = B @ (A @ x[t])
        return out

    return contribution


@pytest.mark.parametrize("mix", ["outputs", "factors"])
def test_arrow_mixes_per_token_as_the_dense_definition_says(cli, env, tmp_path, mix):
    from safetensors.torch import load_file

    part = arrow_part(env, tmp_path, cli, "--top-k", "2", "--temperature", "0.5", "--mix", mix)
    prototypes = {
        k.removeprefix("prototypes."): v
        for k, v in load_file(tmp_path / "arrow" / "router.safetensors").items()
    }
    ours = routed_logits(env, part)
    reference = dense_hooked_logits(env, random_ids(3, 6, 0), arrow_reference(prototypes, 2, 0.5, mix))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-3)  # float32 against float64


def test_per_token_routing_in_a_mixed_batch_equals_each_row_alone(cli, env, tmp_path):
    part = arrow_part(env, tmp_path, cli)
    model = peft_model(env.base)
    engine = AdapterEngine(model, [load_adapter(env.adapters[n]) for n in ("a1", "a2", "a3")])
    ids = random_ids(4, 5, 3)
    router = part(engine)
    parts = [OneAdapter(0), router, router, None]
    with torch.no_grad(), engine.routing(Plan.by_row(parts)):
        mixed = model(input_ids=ids).logits
    for row, row_part in enumerate(parts):
        with torch.no_grad(), engine.routing(Plan.by_row([row_part])):
            alone = model(input_ids=ids[row : row + 1]).logits[0]
        torch.testing.assert_close(mixed[row], alone, rtol=1e-4, atol=1e-4)
    engine.close()


def test_oracle_sends_each_labelled_example_to_its_adapter_and_the_others_to_the_base(cli, env, tmp_path):
    router = route(
        cli,
        env,
        tmp_path / "oracle",
        *adapters(env, "a1", "a3"),
        "--method",
        "oracle",
        "--by",
        "familiarity",
        "--map",
        "R=a1,F=a3",
    )
    got = eval_predictions(
        cli, env, tmp_path, "--system=base=base", f"--system=a1=adapter:{env.adapters['a1']}",
        f"--system=a3=adapter:{env.adapters['a3']}", f"--system=oracle=router:{router}",
        data=[env.world / "twohop.jsonl"],
    )  # fmt: skip
    target = {"R": "a1", "F": "a3", "H": "base"}
    for i, line in enumerate(got["oracle"]):
        expected = got[target[line["meta"]["familiarity"]]][i]
        assert line["prediction"] == expected["prediction"]
        assert line["loglik"] == pytest.approx(expected["loglik"], rel=1e-4, abs=1e-4)


def test_centroid_sends_each_adapter_its_own_kind_of_example(cli, env, tmp_path):
    # A toy problem: a1's examples are questions about mentors, a2's about birthplaces, in one template each.
    kinds = {"a1": ("hop1.jsonl", "mentor.train.0"), "a2": ("hop2.jsonl", "birthplace.train.0")}
    files = {}
    for name, (source, template) in kinds.items():
        lines = [
            x
            for x in (env.world / source).read_text().splitlines()
            if json.loads(x)["meta"]["template"] == template
        ]
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("\n".join(lines) + "\n")
    router = route(
        cli, env, tmp_path / "centroid", *adapters(env, "a1", "a2"), "--method", "centroid",
        "--examples", f"a1={files['a1']}", "--examples", f"a2={files['a2']}", "--base", str(env.base),
        "--layer", "0",  # the embeddings: on a random base, the layer at which the two kinds are apart
    )  # fmt: skip
    code, out, err = cli(
        "route", "--explain", str(router), str(files["a1"]), str(files["a2"]), "--base", str(env.base)
    )
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert len(lines) == sum(len(f.read_text().splitlines()) for f in files.values())
    for line in lines:
        assert line["chosen"][0]["adapter"] == line["dataset"]
        assert line["chosen"][0]["weight"] == pytest.approx(1.0)


def test_centroid_with_chat_template_reads_prompts_as_eval_formats_them(cli, env, tmp_path):
    """--chat-template: the centroids are those of the prompts the chat template renders (here "Q: " before
    the question), the same as a router built from examples already written that way; a base without a
    template is refused before anything is written."""
    from transformers import AutoTokenizer

    chat_base = tmp_path / "chat-base"
    shutil.copytree(env.base, chat_base)
    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    tokenizer.chat_template = "{{ bos_token + 'Q: ' + messages[0]['content'] }}"  # BOS, as real templates
    tokenizer.save_pretrained(chat_base)
    lines = [json.loads(x) for x in (env.world / "hop1.jsonl").read_text().splitlines()[:6]]
    plain, rendered = tmp_path / "plain.jsonl", tmp_path / "rendered.jsonl"
    plain.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rendered.write_text("".join(json.dumps({**x, "prompt": "Q: " + x["prompt"]}) + "\n" for x in lines))

    def centroids(out, examples, base, *extra):
        route(
            cli, env, out, *adapters(env, "a1"), "--method", "centroid", "--examples", f"a1={examples}",
            "--base", str(base), *extra,
        )  # fmt: skip
        return load_file(out / "router.safetensors")["centroids"], json.loads(
            (out / "router.json").read_text()
        )

    templated, config = centroids(tmp_path / "templated", plain, chat_base, "--chat-template")
    written, _ = centroids(tmp_path / "written", rendered, chat_base)
    untemplated, plain_config = centroids(tmp_path / "untemplated", plain, chat_base)
    assert config["parameters"]["chat_template"] is True and "chat_template" not in plain_config["parameters"]
    torch.testing.assert_close(templated, written, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(templated, untemplated)
    for router, flags, warning in (
        ("templated", [], "built with --chat-template and is applied without it"),
        ("templated", ["--chat-template"], None),
        ("untemplated", ["--chat-template"], "built without --chat-template and is applied with it"),
        ("untemplated", [], None),
    ):
        code, _, err = cli(
            "eval", str(plain), "--base", str(chat_base), "--system", f"c=router:{tmp_path / router}",
            "--limit", "2", *flags, "-o", str(tmp_path / f"eval-{router}{len(flags)}.json"),
        )  # fmt: skip
        assert code == 0, err
        assert (warning in err) if warning else "--chat-template" not in err, err
    code, out, err = cli(
        "route",
        "--explain",
        str(tmp_path / "templated"),
        str(plain),
        "--base",
        str(chat_base),
        "--chat-template",
    )
    assert code == 0 and len(out.splitlines()) == len(lines) and "--chat-template" not in err, err

    code, out, err = cli(
        "route", *adapters(env, "a1"), "--method", "centroid", "--examples", f"a1={plain}",
        "--base", str(env.base), "--chat-template", "-o", str(tmp_path / "refused"),
    )  # fmt: skip
    assert (code, out) == (2, "") and "no chat template" in err and not (tmp_path / "refused").exists()
    code, _, err = cli("route", *adapters(env, "a1"), "--method", "arrow", "--chat-template", "-o", "x")
    assert code == 2 and "does not take --chat-template" in err


def test_lorahub_finds_the_adapter_that_wrote_the_examples_and_improves_on_its_start(cli, env, tmp_path):
    # Examples answered by a1's own greedy predictions: the weights (1, 0) fit them, (0, 0) does not.
    got = eval_predictions(
        cli, env, tmp_path, f"--system=a1=adapter:{env.adapters['a1']}", data=[env.world / "hop1.jsonl"]
    )
    examples = tmp_path / "examples.jsonl"
    examples.write_text(
        "".join(json.dumps({"prompt": x["prompt"], "answer": x["prediction"]}) + "\n" for x in got["a1"][:12])
    )
    router = route(
        cli, env, tmp_path / "lorahub", *adapters(env, "a1", "a4"), "--method", "lorahub",
        "--examples", str(examples), "--base", str(env.base), "--budget", "30", "--seed", "1",
    )  # fmt: skip
    parameters = json.loads((router / "router.json").read_text())["parameters"]
    assert parameters["objective"] < parameters["start_objective"]
    w1, w4 = parameters["weights"]
    # The combined update (sum w B)(sum w A) is even in w for one adapter: -w1 applies what w1 does.
    assert abs(w1) > 0.5 and abs(w4) < abs(w1)
    assert len(parameters["search"]) == 31  # the start and the budget


def test_routers_are_byte_reproducible_and_explain_is_jsonl(cli, env, tmp_path):
    args = [*adapters(env, "a1", "a2", "a3"), "--method", "arrow", "--top-k", "2"]
    first, second = route(cli, env, tmp_path / "one", *args), route(cli, env, tmp_path / "two", *args)
    for name in ("router.json", "router.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    code, out, _ = cli(
        "route", "--explain", str(first), str(env.world / "twohop.jsonl"), "--base", str(env.base)
    )
    assert code == 0
    lines = [json.loads(x) for x in out.splitlines()]
    assert len(lines) == len((env.world / "twohop.jsonl").read_text().splitlines())
    layer = lines[0]["layers"][0]
    assert set(layer["mean_weight"]) == {"a1", "a2", "a3"} and sum(
        layer["mean_weight"].values()
    ) == pytest.approx(1.0)
    assert sum(layer["top1_share"].values()) == pytest.approx(1.0)


def other_base_adapter(root):
    from lrtool.adapters import Adapter, LoraModule, save_adapter

    save_adapter(
        Adapter({"model.layers.0.self_attn.q_proj": LoraModule(torch.ones(2, 48), torch.ones(32, 2), 1.0)}),
        root / "wide",
    )
    return root / "wide"


@pytest.mark.parametrize(
    "make_args, code, needle",
    [
        (
            lambda env, root: [*adapters(env, "a1"), str(other_base_adapter(root)), "--method", "uniform"],
            1,
            "different bases",
        ),
        (
            lambda env, root: [
                *adapters(env, "a1", "a2"),
                "--method",
                "oracle",
                "--by",
                "x",
                "--map",
                "v=zz",
            ],
            2,
            "no adapter is called 'zz'",
        ),
        (
            lambda env, root: [*adapters(env, "a1"), "--method", "uniform", "--top-k", "2"],
            2,
            "does not take --top-k",
        ),
        (
            lambda env, root: [*adapters(env, "a1"), "--method", "centroid", "--examples", "a1=x.jsonl"],
            2,
            "needs --base",
        ),
        (lambda env, root: [*adapters(env, "a1", "a1"), "--method", "uniform"], 2, "given twice"),
    ],
)
def test_bad_route_input_is_one_error_line_and_writes_nothing(cli, env, tmp_path, make_args, code, needle):
    got, out, err = cli("route", *make_args(env, tmp_path), "-o", str(tmp_path / "r"))
    assert (got, out) == (code, "") and needle in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_examples_that_do_not_parse_are_named(cli, env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    args = [
        *adapters(env, "a1", "a2"),
        "--method",
        "centroid",
        "--examples",
        f"a1={bad}",
        "--examples",
        f"a2={bad}",
    ]
    code, _, err = cli("route", *args, "--base", str(env.base), "-o", str(tmp_path / "r"))
    assert code == 1 and f"{bad}:1" in err


@pytest.mark.parametrize(
    "damage, needle",
    [
        (
            lambda r: (r / "router.json").write_text(
                json.dumps({**json.loads((r / "router.json").read_text()), "format_version": 99})
            ),
            "newer",
        ),
        (
            lambda r: __import__("safetensors.torch").torch.save_file({}, str(r / "router.safetensors")),
            "lacks tensor",
        ),
        (
            lambda r: (
                Path(json.loads((r / "router.json").read_text())["adapters"][0]["path"]) if False else None
            ),
            None,
        ),
    ],
)
def test_a_router_that_cannot_be_used_is_refused_by_eval(cli, env, tmp_path, damage, needle):
    copies = tmp_path / "copies"
    for name in ("a1", "a2"):
        shutil.copytree(env.adapters[name], copies / name)
    router = route(cli, env, tmp_path / "arrow", str(copies / "a1"), str(copies / "a2"), "--method", "arrow")
    if needle is None:  # an adapter changed after the router was built
        (copies / "a1" / "adapter_config.json").write_text(
            (copies / "a1" / "adapter_config.json").read_text() + " "
        )
        needle = "changed since the router was built"
    else:
        damage(router)
    code, out, err = cli(
        "eval",
        str(env.world / "hop1.jsonl"),
        "--base",
        str(env.base),
        f"--system=r=router:{router}",
        "--limit",
        "2",
    )
    assert code == 1 and out == "" and needle in err and err.count("\n") == 1


def test_route_list_prints_every_router_with_its_parameters(cli):
    from lrtool import routers

    code, out, err = cli("route", "--list")
    assert code == 0, err
    listed = [json.loads(line) for line in out.splitlines()]
    assert [entry["name"] for entry in listed] == list(routers.REGISTRY)
    by_name = {entry["name"]: entry for entry in listed}
    assert {p["name"] for p in by_name["centroid"]["parameters"]} >= {"examples", "layer", "chat_template"}
    for extra in (["--method", "arrow"], ["--chat-template"], ["--allow-base-mismatch"]):
        code, out, err = cli("route", "--list", *extra)
        assert (code, out) == (2, "") and "--list takes no" in err


def test_adapters_declaring_different_bases_route_only_when_allowed(cli, env, tmp_path):
    """Two adapters of the same shapes whose configs name different bases: refused with the way out named,
    routed with --allow-base-mismatch (shapes are still checked, as the shape-mismatch row above shows)."""
    paths = []
    for name, declared in (("a1", "org/model"), ("a2", "elsewhere/model")):
        copy = tmp_path / name
        shutil.copytree(env.adapters["a1"], copy)
        config = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": declared}))
        paths.append(str(copy))
    code, out, err = cli("route", *paths, "--method", "uniform", "-o", str(tmp_path / "r"))
    assert (code, out) == (1, "") and "different bases" in err and "--allow-base-mismatch" in err
    assert not (tmp_path / "r").exists()
    code, out, err = cli(
        "route", *paths, "--method", "uniform", "--allow-base-mismatch", "-o", str(tmp_path / "r")
    )
    assert code == 0, err
    assert (tmp_path / "r" / "router.json").is_file()
