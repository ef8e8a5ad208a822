"""The `lrtool` command line: parse flags, call the core, print, map errors to exit codes.

Nothing here computes anything. Conventions (DESIGN.md): stdout carries data only; logs go to stderr
through the `lrtool` logger; errors print one `Error: ...` line (a traceback only with --debug or
LRTOOL_DEBUG=1); exit codes 0 ok, 1 runtime error, 2 usage error, 3 quality gate, 130 interrupted.
Heavy libraries (torch, transformers, peft) are imported inside the commands that need them.
"""

import logging
import os
import signal
import sys
import traceback
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated

import typer
from typer._click import exceptions as click_exceptions  # typer >= 0.26 carries its own click

from lrtool import __version__, io
from lrtool.data import math as math_problems
from lrtool.data import twohop
from lrtool.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, LrtoolError, UsageError

log = logging.getLogger("lrtool")


@dataclass
class _Session:
    """What main() knows about this invocation: the command line (for manifests) and --debug."""

    argv: list[str] = field(default_factory=lambda: sys.argv[1:])
    debug: bool = field(default_factory=lambda: os.environ.get("LRTOOL_DEBUG", "") not in ("", "0"))


SESSION = _Session()

app = typer.Typer(
    name="lrtool",
    help="Recycle LoRA adapters (merge, route) and measure whether recycling works.",
    no_args_is_help=True,
    add_completion=False,  # completions/ holds generated scripts (make docs)
    rich_markup_mode="markdown",  # reflows docstring paragraphs
    context_settings={"help_option_names": ["-h", "--help"]},
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but data and errors.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail to stderr.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]


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
    int, typer.Option("--seed", help="Seed of the world: the same arguments give the same bytes.")
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
    if split is not None:
        records = module.generate(config, split, seed=seed, templates=templates)
        with io.atomic_output_file(out or io.STDIO, force) as handle:
            io.write_jsonl(records, handle)
        if out not in (None, io.STDIO):
            print(out)
        return
    if out is None:
        raise UsageError("give --split NAME (one split to stdout) or -o DIR (every split)")
    if templates != "train":
        raise UsageError("--templates applies to --split; -o DIR writes both template sets")
    with io.atomic_output_dir(out, force) as tmp:
        counts = write_dataset_dir(module, config, seed, tmp)
        io.write_manifest(
            tmp, ["lrtool", *SESSION.argv], seed, extra={"task": task, "config": counts["config"]}
        )
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


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `lrtool` console script: run the app and turn failures into exit codes."""
    SESSION.argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        command = typer.main.get_command(app)
        code = command.main(args=SESSION.argv, prog_name="lrtool", standalone_mode=False)
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
