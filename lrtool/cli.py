"""The `lrtool` command line: parse flags, call the core, print, map errors to exit codes.

Nothing here computes anything. Conventions (DESIGN.md): stdout carries data only; logs go to stderr
through the `lrtool` logger; errors print one `Error: ...` line (a traceback only with --debug or
LRTOOL_DEBUG=1); exit codes 0 ok, 1 runtime error, 2 usage error, 3 quality gate, 130 interrupted.
Heavy libraries (torch, transformers, peft) are imported inside the commands that need them.
"""

import contextlib
import inspect
import logging
import math
import os
import signal
import sys
import traceback
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Annotated, get_origin

import typer
from typer._click import exceptions as click_exceptions  # typer >= 0.26 carries its own click

from lrtool import __version__, formats, io, outputs
from lrtool.data import math as math_problems
from lrtool.data import twohop
from lrtool.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, LrtoolError, UsageError
from lrtool.evaluate.claims import CLAIM_SETS
from lrtool.train.settings import DTYPES, FLAG, MAX_SEED, Flag, TrainSettings

log = logging.getLogger("lrtool")


@dataclass
class _Session:
    """What main() knows about this invocation: the command line (for manifests) and --debug."""

    argv: list[str] = field(default_factory=lambda: sys.argv[1:])
    debug: bool = field(default_factory=lambda: os.environ.get("LRTOOL_DEBUG", "") not in ("", "0"))


SESSION = _Session()

app = typer.Typer(
    name="lrtool",
    no_args_is_help=True,
    add_completion=False,  # completions/ holds generated scripts (make docs)
    rich_markup_mode="markdown",  # reflows docstring paragraphs
    context_settings={"help_option_names": ["-h", "--help"]},
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but data and errors.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail to stderr.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output (only one lrtool wrote).")]


def _finite(value: float | None) -> float | None:
    """A float option's check: inf and nan parse as floats but are never a meaningful setting."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter("must be a finite number")
    return value


class _StderrHandler(logging.Handler):
    """Log lines to whatever sys.stderr is now (tests swap it), message only."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _configure_logging(quiet: bool = False, verbose: bool = False) -> None:
    if quiet and verbose:
        raise UsageError("--quiet and --verbose exclude each other")
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    if not log.handlers:
        log.addHandler(_StderrHandler())
        log.propagate = False
    # Root-level -q/-v set the level first; a verb's own flag may only make it quieter or louder.
    if quiet or verbose or log.level == logging.NOTSET:
        log.setLevel(level)
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """Keep transformers' and peft's progress bars and deprecation notices off stderr unless --verbose."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # peft 0.21 warns about tied embeddings for every adapter on them, although its trainable tokens do tie
    # the output layer (checked in tests/test_train.py); the warning would be noise on every run.
    warnings.filterwarnings("ignore", message=".*no implementation exists to tie the adapters")


def _version(value: bool) -> None:
    if value:
        print(f"lrtool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also LRTOOL_DEBUG=1).")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Recycle LoRA adapters (merge, route) and measure whether recycling works.

    Every verb reads and writes files, so verbs chain in shell pipelines and Makefiles. stdout carries
    data only; '-' means stdin or stdout. Exit codes: 0 success, 1 runtime error, 2 usage error,
    3 quality gate failed, 130 interrupted.
    """
    SESSION.debug = SESSION.debug or debug
    log.setLevel(logging.NOTSET)
    _configure_logging(quiet, verbose)


# ---------------------------------------------------------------------------------------------- gen-data

gen_data = typer.Typer(
    help="Generate synthetic datasets whose test sets need composition.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(gen_data, name="gen-data")


class Size(str, Enum):
    tiny = "tiny"
    small = "small"
    gpu = "gpu"


class Templates(str, Enum):
    train = "train"
    eval = "eval"


def _split_enum(name: str, splits: tuple[str, ...]) -> type[Enum]:
    return Enum(name, {s: s for s in splits}, type=str)


TwoHopSplit = _split_enum("TwoHopSplit", twohop.SPLITS)
MathSplit = _split_enum("MathSplit", math_problems.SPLITS)
AnswerFormat = _split_enum("AnswerFormat", math_problems.ANSWER_FORMATS)

Seed = Annotated[
    int,
    typer.Option(
        "--seed", min=0, max=MAX_SEED, help="Seed of the world: the same arguments give the same bytes."
    ),
]
SizeOpt = Annotated[Size, typer.Option("--size", help="Preset of every count below; flags override it.")]
TemplatesOpt = Annotated[
    Templates, typer.Option("--templates", help="Paraphrase set of --split: training or held-out evaluation.")
]
Out = Annotated[
    str | None,
    typer.Option(
        "--out",
        "-o",
        metavar="PATH",
        help="With --split: a JSONL file ('-' = stdout, the default). Without: a directory with every split "
        "(training and .eval templates) and lrtool.json.",
    ),
]


def _count(flag: str, help: str):
    """A non-negative count that overrides the --size preset when given."""
    return typer.Option(flag, min=0, help=help, show_default=False)


def _generate(task: str, config, split: str | None, templates: str, seed: int, out: str | None, force: bool):
    """Shared tail of the gen-data commands: one split to a stream, or every split to a directory."""
    from lrtool.data import task_module, write_dataset_dir

    module = task_module(task)
    log.debug("world: %s", io.dumps_line(module.describe(config)))
    for warning in module.warnings_for(config):
        log.warning("warning: %s", warning)
    if split is not None:
        records = module.generate(config, split, seed=seed, templates=templates)
        with outputs.atomic_output_file(out or io.STDIO, force) as handle:
            io.write_jsonl(records, handle)
        if out not in (None, io.STDIO):
            print(out)
        return
    if out is None or out == io.STDIO:
        raise UsageError("give --split NAME (one split to stdout) or -o DIR (every split)")
    if templates != "train":
        raise UsageError("--templates applies to --split; -o DIR writes both template sets")
    manifest = io.Manifest(["lrtool", *SESSION.argv], seed)
    with outputs.atomic_output_dir(out, force, manifest=manifest) as tmp:
        counts = write_dataset_dir(module, config, seed, tmp)
        manifest.extra = {"task": task, "config": counts["config"]}
    log.info("wrote %s", ", ".join(f"{name} ({n})" for name, n in counts["files"].items()))
    print(out)


@gen_data.command(
    "two-hop",
    epilog="Examples:\n\n"
    "  lrtool gen-data two-hop --split twohop --seed 1 | head -3\n\n"
    "  lrtool gen-data two-hop --split hop1 --templates eval -o hop1.eval.jsonl\n\n"
    "  lrtool gen-data two-hop --size tiny -o world/",
)
def two_hop(
    split: Annotated[TwoHopSplit | None, typer.Option("--split", help="Write one split as JSONL.")] = None,
    out: Out = None,
    templates: TemplatesOpt = Templates.train,
    seed: Seed = 0,
    size: SizeOpt = Size.small,
    cities: Annotated[int | None, _count("--cities", help="Birth cities (the answers).")] = None,
    familiar_mentors: Annotated[
        int | None, _count("--familiar-mentors", help="Mentors whose birth city is in pretrain.")
    ] = None,
    new_mentors: Annotated[int | None, _count("--new-mentors", help="Mentors never in pretrain.")] = None,
    familiar_people: Annotated[
        int | None,
        _count("--familiar-people", help="People whose mentor is in pretrain (bridge + R chains)."),
    ] = None,
    h_people: Annotated[
        int | None, _count("--h-people", help="New people with a familiar mentor (H).")
    ] = None,
    f_people: Annotated[int | None, _count("--f-people", help="New people with a new mentor (F).")] = None,
    bridge_fraction: Annotated[
        float | None,
        typer.Option(
            "--bridge-fraction",
            callback=_finite,
            help="Share of familiar people whose two-hop statement is in pretrain.",
            show_default=False,
        ),
    ] = None,
    filler: Annotated[int | None, _count("--filler", help="Filler lines about cities in pretrain.")] = None,
    force: Force = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Two-hop knowledge: "A's mentor is B", "B was born in C", and "where was A's mentor born?".

    Splits: pretrain (the base's corpus: facts of familiar entities, bridge two-hop statements, filler),
    hop1 (A -> B), hop2 (B -> C), direct (A -> C, the extra expert's data) and twohop (the test questions).
    Each two-hop question carries meta.familiarity: R (both hops in pretrain), H (only the second),
    F (neither). Training templates by default; --templates eval gives the held-out paraphrases.
    """
    _configure_logging(quiet, verbose)
    config = twohop.Config.for_size(
        size.value,
        cities=cities,
        familiar_mentors=familiar_mentors,
        new_mentors=new_mentors,
        familiar_people=familiar_people,
        h_people=h_people,
        f_people=f_people,
        bridge_fraction=bridge_fraction,
        filler=filler,
    )
    _generate("two-hop", config, split.value if split else None, templates.value, seed, out, force)


@gen_data.command(
    "math",
    epilog="Examples:\n\n"
    "  lrtool gen-data math --split composed --seed 1 | head -3\n\n"
    "  lrtool gen-data math --shared-template --answer-format solution -o math-bridge/",
)
def math_command(
    split: Annotated[MathSplit | None, typer.Option("--split", help="Write one split as JSONL.")] = None,
    out: Out = None,
    templates: TemplatesOpt = Templates.train,
    seed: Seed = 0,
    size: SizeOpt = Size.small,
    skill_problems: Annotated[
        int | None, _count("--skill-problems", help="Problems in each of skill1 and skill2.")
    ] = None,
    composed_problems: Annotated[
        int | None, _count("--composed-problems", help="Problems in composed.")
    ] = None,
    subtraction_facts: Annotated[
        int | None, _count("--subtraction-facts", help="Distinct subtractions in pretrain (two lines each).")
    ] = None,
    filler_sentences: Annotated[
        int | None, _count("--filler-sentences", help="Shopping sentences without arithmetic in pretrain.")
    ] = None,
    shared_template: Annotated[
        bool,
        typer.Option("--shared-template", help="Write both skills' solutions in one template (the bridge)."),
    ] = False,
    answer_format: Annotated[
        AnswerFormat,
        typer.Option(
            "--answer-format",
            help="number: the answer is the final number; solution: the worked "
            "solution, which ends with it (meta.final_answer keeps the number).",
        ),
    ] = "number",
    force: Force = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Math word problems: skill1 (cost = quantity x price), skill2 (change = paid - cost), composed (both).

    Splits: skill1, skill2, composed (two-step problems neither skill's data holds) and pretrain (every
    product 1..9 x 1..9, sampled subtractions and filler, so that a tiny base can do the arithmetic). Every
    problem carries its worked solution in meta.solution; --shared-template writes both skills' solutions in
    one template, the condition under which reuse is reported to work.
    """
    _configure_logging(quiet, verbose)
    config = math_problems.Config.for_size(
        size.value,
        skill_problems=skill_problems,
        composed_problems=composed_problems,
        subtraction_facts=subtraction_facts,
        filler_sentences=filler_sentences,
        shared_template=shared_template,
        answer_format=AnswerFormat(answer_format).value,
    )
    _generate("math", config, split.value if split else None, templates.value, seed, out, force)


# ---------------------------------------------------------------------------------------------- train


def _opt(*flags: str, help: str, **kwargs):
    return typer.Option(*flags, help=help, **kwargs)


def _setting_parameter(setting) -> inspect.Parameter:
    """The typer parameter of one settings field, every part of it read from the field's Flag."""
    flag: Flag = setting.metadata[FLAG]
    required = setting.default is MISSING and setting.default_factory is MISSING
    default = setting.default_factory() if setting.default_factory is not MISSING else setting.default
    kind = setting.type
    if flag.choices:
        kind = _split_enum(setting.name.title(), flag.choices)
        kind, default = (kind | None, None) if default is None else (kind, kind(default))
    elif flag.split:
        kind = str | None  # one string of items: the field's list comes from _setting_value
    if flag.flags:
        info = typer.Option(
            *flag.flags,
            help=flag.help,
            metavar=flag.metavar,
            min=flag.min,
            max=flag.max,
            callback=_finite if flag.finite else None,
            show_default=flag.show_default,
        )
    else:
        info = typer.Argument(metavar=flag.metavar, help=flag.help, show_default=flag.show_default)
    return inspect.Parameter(
        setting.name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[kind, info],
        default=inspect.Parameter.empty if required else default,
    )


def _setting_value(setting, value):
    """A parsed option's value as the settings field holds it: a choice's string, a list of items."""
    split = setting.metadata[FLAG].split
    if isinstance(value, Enum):
        return value.value
    if split:
        return [t.strip() for t in value.split(split) if t.strip()] if value else None
    if get_origin(setting.type) is list:
        return list(value or [])
    return value


def _options_from(settings_class, **after: str):
    """Give a command one option per field of a settings dataclass (lrtool/train/settings.py), in the
    fields' order, each built from the field's Flag: its flags, help, metavar, choices, range and default
    are declared there and nowhere here. The command's own parameters (-o, --force, ...) keep their
    declarations; `after` places one behind a field (out="base"), the others come last. The command is
    called with the fields gathered into one settings object, not yet resolved."""

    def decorate(command):
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(command).parameters.values()
            if p.name != "settings"
        ]
        parameters = []
        for setting in fields(settings_class):
            parameters.append(_setting_parameter(setting))
            parameters += [p for p in own if after.get(p.name) == setting.name]
        parameters += [p for p in own if p.name not in after]

        def run(**values):
            settings = settings_class(
                **{f.name: _setting_value(f, values.pop(f.name)) for f in fields(settings_class)}
            )
            return command(settings, **values)

        run.__name__, run.__doc__ = command.__name__, command.__doc__
        run.__signature__ = inspect.Signature(parameters)  # what typer reads to build the options
        return run

    return decorate


@app.command(
    epilog="Examples:\n\n"
    "  lrtool train world/pretrain.jsonl --base tiny --full --vocab-from world/ -o base/\n\n"
    "  lrtool train world/hop1.jsonl --base base/ -o hop1/ --until-accuracy 0.95\n\n"
    "  lrtool train world/hop1.jsonl world/hop2.jsonl --base base/ -o multitask/\n\n"
    "  lrtool train world/hop1.jsonl --base base/ --rank 0 --train-tokens new -o hop1-rows/\n\n"
    "  torchrun --nproc_per_node 4 -m lrtool train data.jsonl --base Qwen/Qwen2.5-0.5B-Instruct "
    "--chat-template -o expert/",
)
@_options_from(TrainSettings, out="base", resume="log_every")
def train(
    settings: TrainSettings,
    out: Annotated[str, _opt("--out", "-o", metavar="DIR", help="Output directory (printed on stdout).")],
    resume: Annotated[
        bool, _opt("--resume", help="Continue from the checkpoint an interrupted run left in OUT.ckpt/.")
    ] = False,
    force: Force = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Train a LoRA (or, with --full, every weight) of a causal LM on JSONL prompt/answer datasets.

    Writes a PEFT directory (LoRA) or a Hugging Face model directory with its tokenizer (--full), plus
    train_log.jsonl and lrtool.json, and prints its path. Loss covers the answer tokens (prompt + " " +
    answer + EOS) unless --loss all. Ctrl-C or SIGTERM stops with exit 130, writes no output and keeps
    OUT.ckpt/ for --resume. Runs unchanged under torchrun or accelerate launch (data-parallel; rank 0 writes).
    """
    _configure_logging(quiet, verbose)
    if not verbose:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # the env variable is read once, at import
        transformers_logging.set_verbosity_error()
    from lrtool.train import Distributed, check_reached, checkpoint_dir, recover_checkpoint, remove_checkpoint
    from lrtool.train import train as run_training

    settings = settings.resolved()
    is_main = Distributed.from_env().is_main
    inputs = [*settings.data, *settings.vocab_from, settings.base]
    outputs.check_output_free(out, force, inputs, directory=True)
    checkpoint = checkpoint_dir(Path(out))
    recover_checkpoint(checkpoint)
    if resume and not checkpoint.is_dir():
        raise UsageError(f"--resume: no checkpoint at {checkpoint}")
    existing = [path for path in inputs if Path(path).exists()]  # a hub id is no input file
    manifest = io.Manifest(["lrtool", *SESSION.argv], settings.seed, existing, {"settings": asdict(settings)})
    with (
        _progress(quiet or not is_main) as on_progress,
        outputs.atomic_output_dir(out, force, enabled=is_main, inputs=inputs, manifest=manifest) as tmp,
    ):
        result = run_training(
            settings,
            tmp,
            resume=resume,
            on_progress=on_progress,
            checkpoint=checkpoint,
        )
    if is_main:
        remove_checkpoint(checkpoint)
        accuracy = "" if result.accuracy is None else f", exact match {result.accuracy:.3f}"
        log.info(
            "trained %d steps on %d examples in %.1f s (%.0f tokens/s), loss %.4f%s",
            result.steps,
            result.examples,
            result.seconds,
            result.tokens_per_second,
            result.loss,
            accuracy,
        )
        print(out)
        check_reached(result, settings)


@contextlib.contextmanager
def _progress(disabled: bool, label: str = "train"):
    """A rich progress bar on stderr, only on a terminal; yields the callback the core calls with
    (done, total, metrics): train's steps, eval's rows."""
    if disabled or not sys.stderr.isatty() or log.level > logging.INFO:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=_stderr_console(), transient=True) as bar:
        task = bar.add_task(label, total=None, info="")

        def update(step: int, total: int, metrics: dict | None = None) -> None:
            info = f"loss {metrics['loss']:.4f}" if metrics and "loss" in metrics else ""
            if metrics and metrics.get("accuracy") is not None:
                info += f"  acc {metrics['accuracy']:.3f}"
            bar.update(task, completed=step, total=total, info=info)

        yield update


def _stderr_console(wide: bool = False):
    """A console on stderr; `wide` tables keep their rows on one line when stderr is a file or a pipe."""
    from rich.console import Console

    if wide and not sys.stderr.isatty():
        return Console(stderr=True, width=200)
    return Console(stderr=True)


# ---------------------------------------------------------------------------------------------- merge


def _merge_method_names() -> tuple[str, ...]:
    from lrtool.merge import REGISTRY  # the names only: importing the registry imports no torch

    return tuple(REGISTRY)


MergeMethod = _split_enum("MergeMethod", _merge_method_names())
AdapterFormat = _split_enum("AdapterFormat", formats.WRITTEN)


def _merge_epilog() -> str:
    """Every method, its summary and its flags with their defaults, from the registry (no torch)."""
    from lrtool.merge import describe_methods

    lines = []
    for method in describe_methods():
        flags = ", ".join(
            f"--{name}" + ("" if spec["default"] is None else f" {spec['default']:g}")
            for name, spec in method["parameters"].items()
        )
        lines.append(f"- {method['name']}: {method['summary']}" + (f"; takes {flags}" if flags else ""))
    return (
        "Methods (`lrtool merge --list` prints each as a JSON line, every parameter's meaning included):\n\n"
        + "\n".join(lines)
        + "\n\n"
    )


@app.command(
    "merge",
    epilog=_merge_epilog() + "Examples:\n\n"
    "  lrtool merge hop1/ hop2/ --method linear -o merged/\n\n"
    "  lrtool merge a/ b/ c/ --method svd --rank 16 -o abc-svd/\n\n"
    "  lrtool merge a/ b/ --method ties --density 0.3 --weights 1,0.5 -o ab-ties/\n\n"
    "  lrtool merge base-task/ toxic/ --method linear --weights 1,-1 -o detoxified/\n\n"
    "  lrtool merge a/ b/ --method dare-ties --seed 3 --into-base base/ -o merged-model/\n\n"
    "  lrtool merge style.safetensors detail.safetensors --method linear -o merged/\n\n"
    "  lrtool merge --list | jq -r .name",
)
def merge_command(
    adapters: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="ADAPTER",
            help="Adapters to merge: PEFT (or torchtune) or mlx-lm directories, or kohya / diffusers "
            ".safetensors files.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        str | None,
        _opt("--out", "-o", metavar="DIR", help="Output directory (printed on stdout).", show_default=False),
    ] = None,
    method: Annotated[
        MergeMethod | None, _opt("--method", help="Merge method (see --list).", show_default=False)
    ] = None,
    weights: Annotated[
        str | None,
        _opt(
            "--weights",
            metavar="W1,W2,...",
            help="One weight per adapter (default: 1/N each); negative weights negate.",
            show_default=False,
        ),
    ] = None,
    rank: Annotated[
        int | None,
        _opt(
            "--rank",
            "-r",
            min=1,
            help="svd: the rank kept; dense methods and knots: the rank the result is stored at "
            "(default: per module, the largest input rank; knots: exact).",
            show_default=False,
        ),
    ] = None,
    density: Annotated[
        float | None,
        _opt(
            "--density",
            callback=_finite,
            help="ties, dare-*, magnitude-prune, knots: fraction of entries kept, in (0, 1] (default 0.5).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        _opt(
            "--seed",
            min=0,
            max=MAX_SEED,
            help="dare-*: seed of the drop masks (default 0).",
            show_default=False,
        ),
    ] = None,
    epsilon: Annotated[
        float | None,
        _opt(
            "--epsilon",
            callback=_finite,
            help="della, della-linear: keep probabilities run from D - epsilon (a row's smallest entry) to "
            "D + epsilon (its largest) (default 0.15).",
            show_default=False,
        ),
    ] = None,
    lambda_: Annotated[
        float | None,
        _opt(
            "--lambda",
            callback=_finite,
            help="della, della-linear: multiply the merged update by lambda (default 1).",
            show_default=False,
        ),
    ] = None,
    gamma: Annotated[
        float | None,
        _opt(
            "--gamma",
            callback=_finite,
            help="breadcrumbs, breadcrumbs-ties: fraction of largest-magnitude entries dropped, in [0, 1) "
            "(default 0.01).",
            show_default=False,
        ),
    ] = None,
    t: Annotated[
        float | None,
        _opt(
            "--t",
            callback=_finite,
            help="slerp: where between its two adapters, 0 the first and 1 the second (default 0.5).",
            show_default=False,
        ),
    ] = None,
    into_base: Annotated[
        str | None,
        _opt(
            "--into-base",
            metavar="BASE",
            help="Add the exact update to this Hugging Face model directory's weights (or a diffusers "
            "pipeline's) and write the whole model instead of an adapter.",
            show_default=False,
        ),
    ] = None,
    allow_base_mismatch: Annotated[
        bool,
        _opt(
            "--allow-base-mismatch",
            help="Merge adapters whose configs name different bases (e.g. one model under two names).",
        ),
    ] = False,
    adapter_format: Annotated[
        AdapterFormat | None,
        _opt(
            "--format",
            help="The merged adapter's format (default: the inputs' own when they share one, else peft): "
            "peft (adapter_config.json + adapter_model.safetensors), kohya (lora.safetensors), diffusers "
            "(pytorch_lora_weights.safetensors) or mlx (mlx-lm's adapters.safetensors + "
            "adapter_config.json).",
            show_default=False,
        ),
    ] = None,
    list_methods: Annotated[
        bool, _opt("--list", help="Print the methods as JSON lines (name, summary, parameters) and exit.")
    ] = False,
    force: Force = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Merge LoRA adapters into one adapter, or into a base model's weights, exactly as each method defines.

    Takes any mix of ranks, alphas, rsLoRA and target modules; a module an adapter lacks counts as zero
    there. Writes the adapter in the inputs' format when they share one (two kohya files merge by their
    names into a kohya file, diffusers files into a file load_lora_weights loads), PEFT for mixed inputs
    (--format chooses); with --into-base, a Hugging Face model directory (or a diffusers pipeline's).
    Also writes merge_report.json (per module the relative error of what was stored against the method's
    exact result) and lrtool.json, and prints the output's path. Dense methods (ties, dare-*,
    magnitude-prune) are stored by truncated SVD at --rank. The same inputs and seed give the same bytes.
    """
    _configure_logging(quiet, verbose)
    import time

    from lrtool.merge import REGISTRY, describe_methods

    if list_methods:
        if adapters or out or method:
            raise UsageError("--list takes no adapters, -o or --method")
        with outputs.atomic_output_file(io.STDIO) as handle:
            io.write_jsonl(describe_methods(), handle)
        return
    if not adapters:
        raise UsageError("give the adapters to merge (or --list to see the methods)")
    if out is None:
        raise UsageError("give -o DIR, the output directory")
    if method is None:
        raise UsageError(f"give --method, one of: {', '.join(REGISTRY)}")
    from lrtool.merge.base import parse_weights
    from lrtool.merge.receipt import summary_lines
    from lrtool.merge.run import run

    started = time.perf_counter()
    report = run(
        adapters,
        method.value,
        out,
        weights=parse_weights(weights, len(adapters)),
        rank=rank,
        density=density,
        seed=seed,
        into_base=into_base,
        allow_base_mismatch=allow_base_mismatch,
        format=adapter_format.value if adapter_format else None,
        force=force,
        manifest=io.Manifest(["lrtool", *SESSION.argv], extra={"method": method.value}),
        epsilon=epsilon,
        lambda_=lambda_,
        gamma=gamma,
        t=t,
    )
    for line in summary_lines(report):
        log.info("%s", line)
    log.info("wrote %s in %.1f s", out, time.perf_counter() - started)
    print(out)


# ---------------------------------------------------------------------------------------------- diagnose
class FailOn(str, Enum):
    error = "error"
    warning = "warning"


def _diagnose_epilog() -> str:
    """The finding codes and exit statuses, from lrtool.diagnose's table (it imports no torch)."""
    from lrtool.diagnose import FINDINGS

    findings = "\n".join(f"- {code} ({severity}): {meaning}" for code, severity, meaning in FINDINGS)
    return (
        "Formats (diagnose names the one it read, and per module the scale it applied and where it came "
        "from: scale_source config, metadata, alpha or default):\n\n"
        f"{formats.text_table()}\n\n"
        "Findings (code, severity, meaning):\n\n"
        f"{findings}\n\n"
        "Exit status: 0 the report was written, whatever it found; 3 the report was written and a finding "
        "is at or above --fail-on; 1 diagnose could not run (no adapters, an unreadable --base, --plot "
        "without matplotlib); 2 a usage error.\n\n"
        "Examples:\n\n"
        "  lrtool diagnose downloaded-lora/ --table\n\n"
        "  lrtool diagnose hop1/ hop2/ --base base/ --fail-on error > diagnosis.json\n\n"
        "  lrtool diagnose lora.safetensors | jq '.adapters[0].findings'\n\n"
        "  find adapters/ -name adapter_config.json | lrtool diagnose - --plot spectra.png"
    )


@app.command("diagnose", epilog=_diagnose_epilog())
def diagnose_command(
    adapters: Annotated[
        list[str],
        typer.Argument(
            metavar="ADAPTER...",
            help="PEFT, torchtune or mlx-lm directories, or LoRA .safetensors files (PEFT, kohya, diffusers "
            "naming); '-' reads "
            "their paths from stdin, one a line.",
            show_default=False,
        ),
    ],
    base: Annotated[
        str | None,
        _opt(
            "--base",
            metavar="DIR",
            help="A local Hugging Face model directory, or a diffusers pipeline's (or one component's): "
            "report modules it lacks or shapes it disagrees with, and relative_norm = ||dW|| / ||W||. Module "
            "paths resolve as the model's loader resolves them (base_model_prefix, the pipeline's "
            "components). Reads the safetensors headers and only the weights the adapters touch.",
            show_default=False,
        ),
    ] = None,
    fail_on: Annotated[
        FailOn | None,
        _opt(
            "--fail-on",
            metavar="SEVERITY",
            help="Exit 3, after writing the report, when a finding is at or above this severity.",
            show_default=False,
        ),
    ] = None,
    table: Annotated[bool, _opt("--table", help="Also print a summary table to stderr.")] = False,
    exact_sign_conflicts: Annotated[
        bool,
        _opt(
            "--exact-sign-conflicts",
            help="Count sign conflicts over every entry of large pairs too (a 7B-sized pair: several times "
            "longer) instead of estimating them from 2^20 sampled entries.",
        ),
    ] = False,
    plot: Annotated[
        str | None,
        _opt(
            "--plot",
            metavar="FILE.png",
            help="Draw the spectra and the pairwise cosine matrix (needs matplotlib).",
            show_default=False,
        ),
    ] = None,
    force: Force = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Check LoRA adapters before using or merging them: intact, format, fit to a base, spectra, interference.

    Prints one JSON report on stdout, keys sorted, floats to 6 significant digits. adapters: one entry per
    input (path, format, base, rank, alpha, rslora, scale_source and scale_detail: where the modules' scales
    came from, dtype, size_bytes, norm, refused: why merge would refuse it, modules, findings). pairs: one
    entry per pair of inputs. counts: findings by severity. thresholds.

    Per module: the norm and all r singular values of dW = scale * B @ A, its effective rank (exp of the
    entropy of s_i / sum s), stable rank (sum s^2 / s_1^2), top_energy (s_1^2 / sum s^2) and, with --base,
    relative_norm. All come from the factors (QR of A and B, SVD of the r x r core), never a dense dW, so a
    7B-sized adapter takes seconds.

    Per pair: the cosine of the whole updates (every module's dW concatenated, missing ones as zero) and per
    module; column_overlap and row_overlap, the mean squared cosine of the principal angles between the
    updates' column (row) spaces; sign_conflict, the TIES sign-conflict rate (entries of the dense updates,
    among those non-zero in both, whose signs differ: exact, or for a pair sharing more than 2^28 entries an
    estimate from 2^20 entries drawn uniformly, reproducibly, with sign_conflict_estimate giving their number
    and the 95% interval; --exact-sign-conflicts counts all); factor_avg_error, the relative error of
    averaging A and B separately against the exact average of the updates (over common modules of equal rank);
    base_mismatch, whether the adapters declare different bases (as merge judges it: local paths resolved);
    and a verdict: low, moderate or high interference, or incompatible.

    A file that cannot be read is a finding (unreadable), not a failure: every other input is reported.
    """
    _configure_logging(quiet, verbose)
    if plot == io.STDIO:  # stdout carries the JSON report; PNG bytes after it would corrupt it
        raise UsageError("--plot takes a file name (FILE.png), not '-': stdout carries the JSON report")
    from lrtool import diagnose as diagnosis
    from lrtool.errors import QualityGateError

    paths = []
    for adapter in adapters:
        lines = sys.stdin.read().splitlines() if adapter == io.STDIO else [adapter]
        paths += [line.strip() for line in lines if line.strip()]
    inputs = [*paths, *([base] if base else [])]
    if plot is not None:
        diagnosis.check_plot_available()
        outputs.check_output_free(plot, force, inputs)
    report = diagnosis.diagnose(paths, base, exact_sign_conflicts=exact_sign_conflicts)
    with outputs.atomic_output_file(io.STDIO) as handle:
        handle.write(io.dumps_report(report))
    if table:
        _diagnose_table(report)
    if plot is not None:
        with outputs.atomic_output_file(plot, force, mode="wb", inputs=inputs) as handle:
            diagnosis.write_plot(report, handle)
        log.info("wrote %s", plot)
    counts = report["counts"]
    log.info(
        "diagnosed %d adapters; findings: %s", len(paths), ", ".join(f"{n} {s}" for s, n in counts.items())
    )
    failing = diagnosis.at_or_above(report, fail_on.value) if fail_on else []
    if failing:
        first = failing[0]
        where = f" ({first['module']})" if first["module"] else ""
        raise QualityGateError(
            f"{len(failing)} finding(s) at or above {fail_on.value}, first {first['code']}{where}: "
            f"{first['message']}"
        )


def _diagnose_table(report: dict) -> None:
    """The report for people, on stderr: one row per adapter with its findings, then one per pair."""
    from rich.table import Table
    from rich.text import Text

    from lrtool.diagnose import pair_order, summary_rows

    def number(value) -> str:
        return "-" if value is None else str(value) if isinstance(value, int) else f"{value:.3g}"

    styles = {"error": "bold red", "warning": "yellow", "info": "dim"}
    adapters = Table(title="lrtool diagnose", title_justify="left")
    adapters.add_column("#", justify="right")
    adapters.add_column("adapter", overflow="fold")
    adapters.add_column("format")
    adapters.add_column("scale")
    for column in ("rank", "alpha", "modules", "norm"):
        adapters.add_column(column, justify="right")
    adapters.add_column("findings")
    for n, row in enumerate(summary_rows(report), start=1):
        findings = Text()
        for severity, code, count in row["findings"]:
            findings.append(f"{code}{f' x{count}' if count > 1 else ''} ", style=styles[severity])
        cells = map(number, (row["rank"], row["alpha"], row["modules"], row["norm"]))
        cells = [row["format"], row["scale from"], *cells]
        adapters.add_row(str(n), row["path"], *cells, findings or Text("ok", "green"))
    console = _stderr_console()
    console.print(adapters)
    if report["pairs"]:
        pairs = Table(title="pairs (by #)", title_justify="left")
        for column in ("a", "b", "cosine", "overlap c/r", "signs differ", "factor-avg error"):
            pairs.add_column(column, justify="right", max_width=10)
        pairs.add_column("verdict", ratio=1)
        for (i, j), pair in zip(pair_order(len(report["adapters"])), report["pairs"]):
            pairs.add_row(
                str(i + 1),
                str(j + 1),
                number(pair["cosine"]),
                f"{number(pair['column_overlap'])}/{number(pair['row_overlap'])}",
                ("~" if pair.get("sign_conflict_estimate") else "") + number(pair["sign_conflict"]),
                number(pair["factor_avg_error"]),
                pair["verdict"],
            )
        console.print(pairs)


# ---------------------------------------------------------------------------------------------- eval


def _eval_epilog() -> str:
    paragraphs = [
        "Scores: exact (default): greedy generation from the prompt, formatted exactly as train formats it, "
        "until EOS or --max-new-tokens; correct when the generated text and the answer are equal once "
        "surrounding whitespace is stripped from both. loglik: the answer's log-likelihood after the prompt "
        "(its tokens, EOS excluded): loglik is the total, loglik_per_token the total over the answer's "
        "token count, choice_accuracy whether the answer's total beats (strictly) every other candidate's; "
        "the candidates are --choices' lines or the distinct answers of the same dataset and meta.task, at "
        "most --max-choices of them (a seeded draw per example, the same for every system).",
        "Report (stdout, or -o FILE): one JSON object, keys sorted, floats to 6 significant digits. "
        "settings; inputs (path -> sha256 of each dataset, system path and local base); datasets (name = "
        "the file's stem, path, examples); systems (name, spec, resolved path, kind, and for adapters "
        "format, modules, rank); rows, a flat list: one object per (system, dataset, group) with system, "
        "dataset, group (meta key -> value; {} for the whole dataset), n, each metric scored (exact_match, "
        "loglik, loglik_per_token, choice_accuracy) and <metric>_ci95 = [lo, hi], the 2.5th and 97.5th "
        "percentiles over --bootstrap resamples of the cell's examples. With --reference, rows that carry "
        "reference hold <metric>_difference (system minus reference on the same examples) and "
        "<metric>_difference_ci95, resampling the examples of both jointly.",
        "Combining (--combine REPORT.json...): the reports of one experiment run with several seeds pool "
        "into one report of the same shape, no model loaded. Each row (system, [reference,] dataset, group) "
        "holds n summed over the reports, each metric's mean over the reports that have the row (a seed "
        "counts once, whatever its n), <metric>_ci95 the 95% Student t interval over those reports (one "
        "report: its own bootstrap interval; a rate's interval clipped to [0, 1], a difference's to "
        "[-1, 1]), and <metric>_seeds, <metric>_ci95_seeds each report's value and interval, in order, "
        "for the spread within a seed. settings.reports counts the reports.",
        "Claims (--claims two-hop): the two-hop experiment's claims checked on the report (combined or "
        "not), for the systems named as the demo names them (base; hop1, hop2, direct; factor-avg, sum, "
        "ties, lib-factor-avg, lib-sum; arrow, uniform, lib-arrow, oracle; multitask, rows) on datasets "
        "twohop, twohop.eval (by familiarity), hop1, hop2 (by in_pretrain) and pretrain. --table prints "
        "the compact table (new single-hop facts, two-hop by familiarity, familiar facts kept); --summary "
        "writes it with each claim's verdict (supported when the 95% intervals separate, mixed, not "
        "supported, not measured when its systems are missing) and the numbers behind it; --figures DIR "
        "writes two-hop.png and single-hop.png.",
        "Exit status: 0 the report was written; 3 it was written and a system's exact_match (or, without "
        "exact, choice_accuracy) on a whole dataset is below --fail-under; 1 an input could not be used "
        "(a bad dataset line, an adapter the base cannot take); 2 a usage error.",
        "Examples:",
        "  lrtool eval twohop.jsonl --base base/ --adapter hop1/ --table",
        "  lrtool eval twohop.jsonl hop1.jsonl --base base/ --system base=base --system hop1=adapter:hop1/ "
        "--system sum=adapter:sum/ --reference base --score exact,loglik --table --plot out.png",
        "  lrtool eval data.jsonl --base base/ --model merged-model/ --fail-under 0.9 -o report.json",
        "  lrtool eval twohop.jsonl --base base/ --adapter hop1/ | jq '.rows[] | select(.group.familiarity)'",
        "  lrtool eval --combine seed1.json seed2.json seed3.json -o report.json --claims two-hop "
        "--summary summary.md --figures figures/ --table",
        "  torchrun --nproc_per_node 4 -m lrtool eval data.jsonl --base ./model --adapter expert/ "
        "-o report.json",
    ]
    return "\n\n".join(paragraphs)


Dtype = _split_enum("Dtype", DTYPES)  # eval loads the base in a dtype train offers


@app.command("eval", epilog=_eval_epilog())
def eval_command(
    data: Annotated[
        list[str],
        typer.Argument(
            metavar="DATA.jsonl...",
            help="JSONL datasets to score (with --combine: eval reports to pool).",
            show_default=False,
        ),
    ],
    base: Annotated[
        str | None,
        _opt(
            "--base",
            metavar="BASE",
            help="The base model: a Hugging Face model directory or hub id (required unless --combine).",
            show_default=False,
        ),
    ] = None,
    system: Annotated[
        list[str] | None,
        _opt(
            "--system",
            metavar="NAME=SPEC",
            help="A system to score; SPEC is base, adapter:PATH, model:DIR, peft:DIR or router:DIR. "
            "Repeat for several.",
            show_default=False,
        ),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        _opt(
            "--adapter", metavar="PATH", help="Shorthand for --system NAME=adapter:PATH.", show_default=False
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        _opt("--model", metavar="DIR", help="Shorthand for --system NAME=model:DIR.", show_default=False),
    ] = None,
    score_: Annotated[
        str,
        _opt(
            "--score",
            metavar="exact|loglik|exact,loglik",
            help="What to score: exact match, log-likelihoods, or both (see the description).",
        ),
    ] = "exact",
    choices: Annotated[
        str | None,
        _opt(
            "--choices",
            metavar="FILE",
            help="Candidate answers for choice_accuracy, one a line (default: each dataset's distinct "
            "answers of the same meta.task).",
            show_default=False,
        ),
    ] = None,
    max_choices: Annotated[
        int, _opt("--max-choices", min=2, help="At most this many candidates per example (answer included).")
    ] = 100,
    by: Annotated[
        list[str] | None,
        _opt(
            "--by",
            metavar="KEY[,KEY]",
            help="Break results down by meta keys; commas cross keys, repeat for several breakdowns "
            "(default: each meta key with 2 to 20 distinct values).",
            show_default=False,
        ),
    ] = None,
    bootstrap: Annotated[
        int, _opt("--bootstrap", min=0, help="Bootstrap resamples of each interval (0: no intervals).")
    ] = 1000,
    reference: Annotated[
        str | None,
        _opt(
            "--reference",
            metavar="NAME",
            help="Add each other system's paired difference to this one, with its interval.",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[
        int | None,
        _opt(
            "--limit",
            min=1,
            metavar="N",
            help="Score the first N examples of each dataset.",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int,
        _opt(
            "--batch-size",
            min=1,
            help="(system, example) rows per forward pass, rounded down to whole examples (every system "
            "that shares the base scores an example in the same batch).",
        ),
    ] = 64,
    max_new_tokens: Annotated[
        int | None,
        _opt(
            "--max-new-tokens",
            min=1,
            help="Longest generation (default: the longest answer plus 16 tokens).",
            show_default=False,
        ),
    ] = None,
    chat_template: Annotated[
        bool,
        _opt("--chat-template", help="Format prompts with the tokenizer's chat template (as train does)."),
    ] = False,
    device: Annotated[
        str, _opt("--device", metavar="auto|cpu|cuda[:N]", help="Where to run; auto picks CUDA when present.")
    ] = "auto",
    dtype: Annotated[
        Dtype | None, _opt("--dtype", help="Weights' dtype (default: the base's).", show_default=False)
    ] = None,
    seed: Annotated[
        int,
        _opt(
            "--seed",
            min=0,
            max=MAX_SEED,
            help="Seed of the bootstrap and of candidate draws: same seed, same bytes.",
        ),
    ] = 0,
    out: Annotated[
        str | None,
        _opt(
            "--out",
            "-o",
            metavar="FILE",
            help="Write the report to FILE instead of stdout.",
            show_default=False,
        ),
    ] = None,
    predictions: Annotated[
        str | None,
        _opt(
            "--predictions",
            metavar="FILE.jsonl",
            help="Write one line per (system, example): prompt, answer, prediction, correct, loglik, meta.",
            show_default=False,
        ),
    ] = None,
    table: Annotated[bool, _opt("--table", help="Also print the results as a table on stderr.")] = False,
    plot: Annotated[
        str | None,
        _opt(
            "--plot",
            metavar="FILE.png",
            help="Draw bars with intervals by system and the first --by key (needs matplotlib).",
            show_default=False,
        ),
    ] = None,
    fail_under: Annotated[
        float | None,
        _opt(
            "--fail-under",
            callback=_finite,
            metavar="X",
            help="Exit 3, after writing, when a system's metric on a whole dataset is below X.",
            show_default=False,
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool, _opt("--trust-remote-code", help="Allow the models' own Python code (off by default).")
    ] = False,
    combine: Annotated[
        bool,
        _opt(
            "--combine",
            help="Pool eval reports (the arguments) of one experiment run with several seeds: mean and 95% "
            "t interval over the reports, no model loaded.",
        ),
    ] = False,
    claims: Annotated[
        str | None,
        _opt(
            "--claims",
            metavar="two-hop",
            help="Check a claim set on the report: with --table the claim set's compact table; --summary "
            "and --figures write its text and pictures.",
            show_default=False,
        ),
    ] = None,
    summary: Annotated[
        str | None,
        _opt(
            "--summary",
            metavar="FILE.md",
            help="With --claims: write the table and each claim's verdict, in numbers, as Markdown.",
            show_default=False,
        ),
    ] = None,
    figures: Annotated[
        str | None,
        _opt(
            "--figures",
            metavar="DIR",
            help="With --claims: write the claim set's pictures (two-hop.png, single-hop.png) into DIR.",
            show_default=False,
        ),
    ] = None,
    force: Force = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Score base, adapters, merges and models side by side on JSONL datasets, with intervals.

    Holds the base once and applies every adapter system to its own rows of mixed batches in one forward
    pass; model systems (model:DIR) run as their own models. Prints one JSON report (rows per system,
    dataset and meta group, 95% bootstrap intervals, paired differences with --reference). The same inputs
    and seed give the same bytes; under torchrun each process scores a share of the batches and rank 0
    writes the report a single process would.
    """
    _configure_logging(quiet, verbose)
    for flag, path in (("--plot", plot), ("--predictions", predictions), ("--summary", summary)):
        if path == io.STDIO:
            raise UsageError(f"{flag} takes a file name, not '-': stdout carries the report")
    if fail_under is not None and not 0 <= fail_under <= 1:
        raise UsageError("--fail-under must be in [0, 1]")
    if claims is not None and claims not in CLAIM_SETS:
        raise UsageError(f"unknown --claims {claims!r}; choose one of {', '.join(CLAIM_SETS)}")
    if claims is None and (summary or figures):
        raise UsageError("--summary and --figures need --claims (the claim set they state)")
    if combine:
        _eval_combine(data, out, claims, summary, figures, table, force)
        return
    if base is None:
        raise UsageError("--base is required (the model every system shares), unless --combine")
    if not verbose:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    from lrtool import evaluate as evaluation
    from lrtool.errors import QualityGateError
    from lrtool.evaluate.figures import check_plot_available, write_plot
    from lrtool.evaluate.run import RunSettings
    from lrtool.train import Distributed

    scores = evaluation.parse_scores(score_)
    settings = evaluation.EvalSettings(
        datasets=data,
        base=base,
        systems=evaluation.gather_systems(system, adapter, model),
        scores=scores,
        by=by,
        bootstrap=bootstrap,
        reference=reference,
        limit=limit,
        run=RunSettings(
            choices=choices,
            max_choices=max_choices,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            chat_template=chat_template,
            device=device,
            dtype=dtype.value if dtype else None,
            seed=seed,
            trust_remote_code=trust_remote_code,
        ),
    )
    settings.check()
    if plot is not None:
        check_plot_available()
    is_main = Distributed.from_env().is_main
    inputs = [*data, base, *(spec.path for spec in settings.systems if spec.path)]
    files = [path for path in (out, predictions, plot) if path not in (None, io.STDIO)]
    if len({Path(path).resolve() for path in files}) < len(files):
        raise UsageError("-o, --predictions and --plot must name different files")
    for path in files:
        if is_main:
            outputs.check_output_free(path, force, inputs)
    with _progress(quiet or not is_main, "eval") as on_progress:
        result = evaluation.evaluate(settings, on_progress=on_progress)
    if not is_main:
        return
    report = result.report
    if predictions is not None:
        with outputs.atomic_output_file(predictions, force, inputs=inputs) as handle:
            io.write_jsonl(result.prediction_lines(), handle)
    if plot is not None:
        with outputs.atomic_output_file(plot, force, mode="wb", inputs=inputs) as handle:
            write_plot(report, handle)
    with outputs.atomic_output_file(out or io.STDIO, force, inputs=inputs) as handle:
        handle.write(io.dumps_report(report))
    _eval_claims(report, claims, summary, figures, force, inputs)
    if table:
        _claims_table(report) if claims else _eval_table(report)
    failing = evaluation.below(report, fail_under) if fail_under is not None else []
    if failing:
        metric = evaluation.primary_metric(scores)
        first = failing[0]
        raise QualityGateError(
            f"{len(failing)} system/dataset result(s) below --fail-under {fail_under}, first "
            f"{first['system']} on {first['dataset']}: {metric} {first[metric]}"
        )


def _eval_combine(
    reports: list[str], out: str | None, claims, summary, figures, table: bool, force: bool
) -> None:
    """eval --combine: the pooled report of `reports`, then what --claims asks for."""
    from lrtool.evaluate.combine import combine

    for path in [out, summary]:
        if path not in (None, io.STDIO):
            outputs.check_output_free(path, force, reports)
    if figures is not None:
        outputs.check_output_free(figures, force, reports, directory=True)
    report = combine(reports)
    with outputs.atomic_output_file(out or io.STDIO, force, inputs=reports) as handle:
        handle.write(io.dumps_report(report))
    _eval_claims(report, claims, summary, figures, force, reports)
    if table:
        _claims_table(report) if claims else _eval_table(report)


def _eval_claims(report: dict, claims, summary, figures, force: bool, inputs: list[str]) -> None:
    """--summary FILE.md and --figures DIR of the claim set `claims` (two-hop), each written atomically."""
    if claims is None:
        return
    from lrtool.evaluate import claims as claim_set

    if summary is not None:
        with outputs.atomic_output_file(summary, force, inputs=inputs) as handle:
            handle.write(claim_set.summary(report))
    if figures is not None:
        from lrtool.evaluate.figures import check_plot_available, write_claim_plot

        check_plot_available()
        manifest = io.Manifest(["lrtool", *SESSION.argv], inputs=list(inputs), extra={"claims": claims})
        with outputs.atomic_output_dir(figures, force, inputs=inputs, manifest=manifest) as folder:
            for name, titles in (
                ("two-hop.png", claim_set.TWO_HOP),
                ("single-hop.png", claim_set.SINGLE_HOP),
            ):
                with open(Path(folder) / name, "wb") as handle:
                    write_claim_plot(report, titles, handle)


def _claims_table(report: dict) -> None:
    """The claim set's compact table on stderr: a row per system, mean [95% interval] per column."""
    from rich.table import Table

    from lrtool.evaluate import claims as claim_set

    table = Table(title="two-hop claims: exact match, mean [95% interval]", title_justify="left")
    for column in ("group", "system", *(title for title, _, _ in claim_set.COLUMNS)):
        table.add_column(column, no_wrap=column in ("group", "system"))
    for row in claim_set.table_rows(report):
        table.add_row(*row)
    _stderr_console(wide=True).print(table)


def _eval_table(report: dict) -> None:
    """The rows for people, on stderr: one table of results, one of differences to the reference."""
    from rich.table import Table

    metrics = report["settings"]["metrics"]

    def cell(row: dict, name: str) -> str:
        value, interval = row.get(name), row.get(f"{name}_ci95")
        if value is None:
            return "-"
        digits = 3 if abs(value) < 10 else 1
        text = f"{value:.{digits}f}"
        return text + (f" [{interval[0]:.{digits - 1}f}, {interval[1]:.{digits - 1}f}]" if interval else "")

    def group(row: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in row["group"].items()) or "all"

    console = _stderr_console(wide=True)
    for title, suffix, rows in (
        ("lrtool eval", "", [r for r in report["rows"] if "reference" not in r]),
        (
            f"difference to {report['settings']['reference']}",
            "_difference",
            [r for r in report["rows"] if "reference" in r],
        ),
    ):
        if not rows:
            continue
        table = Table(title=title, title_justify="left")
        for column in ("system", "dataset", "group"):
            table.add_column(column, overflow="fold")
        table.add_column("n", justify="right")
        for name in metrics:
            table.add_column(name + (" diff" if suffix else ""), justify="right", no_wrap=True)
        previous = None
        for row in rows:
            if previous is not None and (row["system"], row["dataset"]) != previous:
                table.add_section()
            previous = (row["system"], row["dataset"])
            cells = (cell(row, m + suffix) for m in metrics)
            table.add_row(row["system"], row["dataset"], group(row), str(row["n"]), *cells)
        console.print(table)


# ---------------------------------------------------------------------------------------------- route


def _router_names() -> tuple[str, ...]:
    from lrtool.routers import REGISTRY  # the names only: importing the registry imports no torch

    return tuple(REGISTRY)


RouterMethodName = _split_enum("RouterMethodName", _router_names())
Mix = _split_enum("Mix", ("outputs", "factors"))


def _route_epilog() -> str:
    paragraphs = [
        "A router is a directory: router.json ({format: lrtool-router, format_version: 1, method, adapters: "
        "[{name, path, sha256}], general: [...], parameters}; adapter paths relative to the router when they "
        "can be), router.safetensors (the method's tensors: arrow's prototypes.<module> [adapters, in], "
        "centroid's centroids [adapters, hidden], lorahub's weights [adapters]) and lrtool.json. eval checks "
        "each adapter's sha256 and refuses a router whose adapters changed since it was built.",
        "Routers: arrow (per token and layer: the top-k adapters by |<h, prototype>|, the prototype being "
        "the exact top right singular vector of scale * B @ A; softmax of score / temperature over the kept; "
        "--mix outputs adds the chosen adapters' outputs, --mix factors mixes their A's and B's; --general "
        "subtracts general adapters' mean A and B first, peft's GenKnowSub); uniform (every adapter's output "
        "with weight 1/E); centroid (per example: the top-k adapters whose --examples' mean hidden state at "
        "--layer is nearest by cosine); lorahub (one weight per adapter in [-1.5, 1.5], searched with "
        "nevergrad's NGOpt for --budget evaluations of the answers' cross-entropy + 0.05 mean |w| on "
        "--examples FILE; the factors are combined); oracle (each example to the adapter its meta[--by] "
        "names in --map).",
        "--explain ROUTER DATA.jsonl... --base BASE prints one JSON line per example: dataset, line, and the "
        "adapters chosen with their weights (per-example routers) or, per layer, each adapter's mean weight "
        "over the prompt's tokens and its share of tokens as top-1 choice (per-token routers).",
        "Exit status: 0 written; 1 adapters that cannot be routed together, a damaged router, unreadable "
        "examples; 2 a usage error.",
        "Examples:",
        "  lrtool route hop1/ hop2/ --method arrow --top-k 2 -o arrow/",
        "  lrtool route hop1/ hop2/ direct/ --method uniform -o uniform/",
        "  lrtool route hop1/ hop2/ --method centroid --examples hop1=hop1.jsonl --examples hop2=hop2.jsonl "
        "--base base/ -o centroid/",
        "  lrtool route hop1/ hop2/ direct/ --method lorahub --examples dev.jsonl --base base/ -o lorahub/",
        "  lrtool route hop1/ hop2/ --method oracle --by split --map hop1=hop1,hop2=hop2 -o oracle/",
        "  lrtool route --explain arrow/ twohop.jsonl --base base/ | head -n 1",
        "  lrtool eval twohop.jsonl --base base/ --system arrow=router:arrow/",
    ]
    return "\n\n".join(paragraphs)


@app.command("route", epilog=_route_epilog())
def route_command(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="ADAPTER...|DATA.jsonl...",
            help="The adapters to route between (with --explain: the datasets whose routing to show).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        str | None,
        _opt(
            "--out", "-o", metavar="DIR", help="The router directory (printed on stdout).", show_default=False
        ),
    ] = None,
    method: Annotated[
        RouterMethodName | None, _opt("--method", help="Router (see --list).", show_default=False)
    ] = None,
    top_k: Annotated[
        int | None,
        _opt(
            "--top-k", min=1, help="arrow, centroid: adapters mixed per token or example.", show_default=False
        ),
    ] = None,
    temperature: Annotated[
        float | None,
        _opt(
            "--temperature",
            callback=_finite,
            help="arrow, centroid: softmax temperature (default 1).",
            show_default=False,
        ),
    ] = None,
    mix: Annotated[
        Mix | None, _opt("--mix", help="arrow: outputs (default) or factors.", show_default=False)
    ] = None,
    general: Annotated[
        list[str] | None,
        _opt(
            "--general",
            metavar="ADAPTER",
            help="arrow: general adapters to subtract (GenKnowSub); repeat.",
            show_default=False,
        ),
    ] = None,
    examples: Annotated[
        list[str] | None,
        _opt(
            "--examples",
            metavar="ADAPTER=FILE|FILE",
            help="centroid: ADAPTER=FILE.jsonl for each adapter; lorahub: FILE.jsonl of the task.",
            show_default=False,
        ),
    ] = None,
    layer: Annotated[
        int | None,
        _opt("--layer", help="centroid: hidden layer compared (default -1, the last).", show_default=False),
    ] = None,
    budget: Annotated[
        int | None,
        _opt(
            "--budget", min=1, help="lorahub: evaluations of the objective (default 40).", show_default=False
        ),
    ] = None,
    seed: Annotated[
        int | None,
        _opt(
            "--seed", min=0, max=MAX_SEED, help="lorahub: seed of the search (default 0).", show_default=False
        ),
    ] = None,
    by: Annotated[
        str | None,
        _opt("--by", metavar="KEY", help="oracle: the meta key that labels examples.", show_default=False),
    ] = None,
    map_: Annotated[
        str | None,
        _opt(
            "--map",
            metavar="VALUE=ADAPTER,...",
            help="oracle: which adapter each label goes to.",
            show_default=False,
        ),
    ] = None,
    base: Annotated[
        str | None,
        _opt(
            "--base",
            metavar="BASE",
            help="centroid, lorahub, --explain: the base model directory.",
            show_default=False,
        ),
    ] = None,
    explain_router: Annotated[
        str | None,
        _opt(
            "--explain",
            metavar="ROUTER",
            help="Print this router's decisions on DATA.jsonl... as JSON lines.",
            show_default=False,
        ),
    ] = None,
    chat_template: Annotated[
        bool,
        _opt(
            "--chat-template",
            help="centroid, lorahub, --explain: format prompts with the base's chat template (as train and "
            "eval do; give it where they were given it).",
        ),
    ] = False,
    allow_base_mismatch: Annotated[
        bool,
        _opt(
            "--allow-base-mismatch",
            help="Route between adapters whose configs name different bases (e.g. one model under two "
            "names); their shapes must still agree.",
        ),
    ] = False,
    batch_size: Annotated[
        int, _opt("--batch-size", min=1, help="--explain: examples per forward pass.")
    ] = 64,
    list_routers: Annotated[
        bool, _opt("--list", help="Print the routers as JSON lines (name, summary, parameters) and exit.")
    ] = False,
    force: Force = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Build a router: pick or mix adapters per input or per token instead of averaging their parameters.

    Writes a router directory (router.json, router.safetensors, lrtool.json) that `lrtool eval --system
    NAME=router:DIR` applies, and prints its path. The same inputs and seed give the same bytes.
    """
    _configure_logging(quiet, verbose)
    from lrtool import routers

    if list_routers:
        if args or out or method or explain_router or chat_template or allow_base_mismatch:
            raise UsageError(
                "--list takes no adapters, -o, --method, --explain, --chat-template or --allow-base-mismatch"
            )
        with outputs.atomic_output_file(io.STDIO) as handle:
            io.write_jsonl(routers.describe_routers(), handle)
        return
    if explain_router is not None:
        if not args or base is None:
            raise UsageError("--explain ROUTER needs the datasets (DATA.jsonl...) and --base BASE")
        if allow_base_mismatch:
            raise UsageError("--allow-base-mismatch applies when a router is built, not to --explain")
        from lrtool.routers.explain import explain

        with outputs.atomic_output_file(
            out or io.STDIO, force, inputs=[*args, explain_router, base]
        ) as handle:
            io.write_jsonl(
                explain(explain_router, args, base, batch_size=batch_size, chat_template=chat_template),
                handle,
            )
        return
    if not args:
        raise UsageError("give the adapters to route between (or --list to see the routers)")
    if out is None:
        raise UsageError("give -o DIR, the router directory")
    if method is None:
        raise UsageError(f"give --method, one of: {', '.join(routers.REGISTRY)}")
    from lrtool.routers.build import build_router

    options = {
        "top_k": top_k,
        "temperature": temperature,
        "mix": mix.value if mix else None,
        "examples": examples or [],
        "layer": layer,
        "budget": budget,
        "seed": seed,
        "by": by,
        "map": map_,
        "chat_template": chat_template or None,
    }
    files = [item.partition("=")[2] or item for item in examples or []]
    inputs = [*args, *(general or []), *files, *([base] if base else [])]
    outputs.check_output_free(out, force, inputs, directory=True)
    router = build_router(
        args,
        method.value,
        options,
        general=general,
        base=base,
        log=log.info,
        allow_base_mismatch=allow_base_mismatch,
    )
    existing = [path for path in inputs if Path(path).exists()]
    manifest = io.Manifest(["lrtool", *SESSION.argv], seed, existing, {"method": method.value})
    with outputs.atomic_output_dir(out, force, inputs=inputs, manifest=manifest) as tmp:
        router.save(tmp)
    log.info("wrote router %s (%s over %d adapters)", out, method.value, len(args))
    print(out)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `lrtool` console script: run the app and turn failures into exit codes."""
    SESSION.argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        command = typer.main.get_command(app)
        code = command.main(args=SESSION.argv, prog_name="lrtool", standalone_mode=False)
        with outputs.writing(
            io.STDIO
        ):  # what print() left in the buffer: a failed write is an error, not exit 0
            sys.stdout.flush()
    except LrtoolError as exc:
        _fail(exc, exc.exit_code, str(exc))
    except click_exceptions.NoArgsIsHelpError:  # typer has printed the help already
        code = EXIT_USAGE
    except click_exceptions.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        _fail(exc, EXIT_USAGE, exc.format_message() + hint)
    except click_exceptions.ClickException as exc:
        _fail(exc, exc.exit_code, exc.format_message())
    except (KeyboardInterrupt, typer.Abort) as exc:
        _fail(exc, EXIT_INTERRUPTED, "interrupted")
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_RUNTIME)
    except Exception as exc:  # a bug, or a failure no check foresaw: still one line
        _fail(exc, EXIT_RUNTIME, f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
    if code == EXIT_INTERRUPTED:  # typer turns KeyboardInterrupt into Exit(130) itself
        print("Error: interrupted", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _fail(exc: BaseException, code: int, message: str) -> None:
    if SESSION.debug:
        traceback.print_exception(exc, file=sys.stderr)
    message = " ".join(str(message).split()) or type(exc).__name__
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(code)
