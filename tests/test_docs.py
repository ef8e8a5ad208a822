"""man/ and completions/ are generated from the typer app (`make docs`, i.e. `python -m lrtool.docs .`).

These tests walk typer's command tree themselves, so an option the generator dropped is caught here.
"""

import os
import re
import shutil
import subprocess
import sys
from enum import Enum
from pathlib import Path

import pytest
import typer

from lrtool import docs
from lrtool.cli import app
from lrtool.errors import EXIT_GATE, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE

REPO = Path(__file__).resolve().parent.parent
GENERATED_DIRS = ("man", "completions")


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    docs.generate(out)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for folder in GENERATED_DIRS
        for path in sorted((root / folder).rglob("*"))
        if path.is_file()
    }


def _commands() -> list[tuple[tuple[str, ...], object]]:
    """(words after `lrtool`, click command) for every visible command, straight from typer's tree."""

    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            if not sub.hidden:
                yield from walk(sub, (*path, name))

    return list(walk(typer.main.get_command(app), ()))


COMMANDS = _commands()
IDS = [" ".join(("lrtool", *path)) for path, _ in COMMANDS]


def _options(cmd) -> list:
    return [p for p in cmd.params if p.param_type_name == "option" and not p.hidden]


def _spellings(param) -> list[str]:
    return [*param.opts, *param.secondary_opts]


def _choices(param) -> list[str]:
    return [str(c.value) if isinstance(c, Enum) else str(c) for c in param.type_descriptor.choices or ()]


def _roff(text: str) -> str:
    return text.replace("-", r"\-")


def _man_section(root: Path, path: tuple[str, ...]) -> str:
    """The part of the man pages that documents the command at `path`."""
    if not path:
        return (root / "man/lrtool.1").read_text()
    page = (root / f"man/lrtool-{path[0]}.1").read_text()
    if len(path) == 1:
        return page.partition("\n.SH COMMANDS\n")[0]
    heading = f'.SS "{_roff(" ".join(("lrtool", *path)))}"\n'
    assert heading in page, f"no section {heading.strip()} in man/lrtool-{path[0]}.1"
    return re.split(r"\n\.S[SH] ", page.partition(heading)[2])[0]


def _bash_complete(script: Path, line: str) -> list[str]:
    """COMPREPLY of the bash completion for a command line typed up to the cursor."""
    program = (
        'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _lrtool; printf "%s\\n" '
        '"${COMPREPLY[@]}"'
    )
    words = line.split(" ")
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program, "bash", str(script), *words],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


# ---------------------------------------------------------------------------------------------- in step


def test_committed_man_pages_and_completions_match_the_app(generated):
    committed, fresh = _files(REPO), _files(generated)
    problems = [
        f"  differs:           {name}"
        for name in sorted(committed.keys() & fresh.keys())
        if committed[name] != fresh[name]
    ]
    problems += [f"  no longer made:    {name}" for name in sorted(committed.keys() - fresh.keys())]
    problems += [f"  missing from repo: {name}" for name in sorted(fresh.keys() - committed.keys())]
    assert not problems, (
        "man/ and completions/ are out of step with lrtool/cli.py: run `make docs` and commit the result.\n"
        + "\n".join(problems)
    )


def test_generation_is_byte_identical_across_processes(generated, tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run(
        [sys.executable, "-m", "lrtool.docs", str(tmp_path)],
        check=True,
        env=env,
        cwd=REPO,
        capture_output=True,
    )
    assert _files(tmp_path) == _files(generated)


def test_documenting_the_app_imports_no_heavy_library(tmp_path):
    program = (
        "import sys, lrtool.docs; lrtool.docs.generate(sys.argv[1]); "
        "heavy = {'torch', 'transformers', 'peft'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", program, str(tmp_path)], check=True, cwd=REPO)


def test_every_top_level_verb_has_a_page_and_lrtool_1_refers_to_it(generated):
    root_page = (generated / "man/lrtool.1").read_text()
    see_also = root_page.partition(".SH SEE ALSO\n")[2]
    for path, _ in COMMANDS:
        if len(path) == 1:
            assert (generated / f"man/lrtool-{path[0]}.1").is_file()
            assert rf"\fB{_roff('lrtool-' + path[0])}\fR(1)" in see_also


# ---------------------------------------------------------------------------------------------- every option


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=IDS)
def test_every_option_is_in_the_man_page_of_its_command(generated, path, cmd):
    section = _man_section(generated, path)
    for param in _options(cmd):
        for spelling in _spellings(param):
            assert rf"\fB{_roff(spelling)}\fR" in section, f"{spelling} of {' '.join(path)}"
    for param in cmd.params:
        if param.param_type_name == "argument" and not param.hidden:
            assert (param.metavar or param.name.upper()) in section


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=IDS)
def test_bash_offers_every_option_of_a_command_after_a_dash(generated, path, cmd):
    offered = _bash_complete(generated / "completions/lrtool.bash", " ".join(("lrtool", *path, "-")))
    expected = {"-h", "--help", *(s for param in _options(cmd) for s in _spellings(param))}
    assert expected <= set(offered), expected - set(offered)


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=IDS)
def test_zsh_and_fish_know_every_option_of_a_command(generated, path, cmd):
    zsh = (generated / "completions/lrtool.zsh").read_text()
    fish = (generated / "completions/lrtool.fish").read_text()
    function = "_" + "_".join(re.sub(r"\W", "_", w) for w in ("lrtool", *path))
    body = zsh.partition(f"\n{function}() {{\n")[2].partition("\n}\n")[0]
    for param in _options(cmd):
        for spelling in _spellings(param):
            assert re.search(rf"[{{',*]{re.escape(spelling)}[=+\[',}}]", body), f"zsh: {spelling}"
            flag = f"-l {spelling[2:]}" if spelling.startswith("--") else f"-s {spelling[1:]}"
            assert re.search(rf" {re.escape(flag)}( |$)", fish, re.M), f"fish: {spelling}"


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=IDS)
def test_every_choice_is_documented_and_completed(generated, path, cmd):
    section = _man_section(generated, path)
    bash = generated / "completions/lrtool.bash"
    zsh = (generated / "completions/lrtool.zsh").read_text()
    fish = (generated / "completions/lrtool.fish").read_text()
    for param in _options(cmd):
        choices = _choices(param)
        if not choices:
            continue
        for value in choices:
            assert rf"\fB{_roff(value)}\fR" in section
        for spelling in _spellings(param):
            line = " ".join(("lrtool", *path, spelling, ""))
            assert _bash_complete(bash, line) == choices, line
        assert f":({' '.join(choices)})'" in zsh
        assert f"-a '{' '.join(choices)}'" in fish


# ---------------------------------------------------------------------------------------------- exit status


def test_every_page_lists_the_exit_codes(generated):
    for page in sorted((generated / "man").glob("*.1")):
        section = page.read_text().partition("\n.SH EXIT STATUS\n")[2].partition("\n.SH ")[0]
        for code in (EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_GATE, EXIT_INTERRUPTED):
            assert f".TP\n\\fB{code}\\fR\n" in section, f"exit {code} in {page.name}"


def test_lrtool_1_documents_the_environment(generated):
    section = (generated / "man/lrtool.1").read_text().partition("\n.SH ENVIRONMENT\n")[2]
    assert r"\fBLRTOOL_DEBUG\fR" in section and r"\fBNO_COLOR\fR" in section


# ---------------------------------------------------------------------------------------------- shells


def test_bash_script_parses_and_registers_with_default_file_completion(generated):
    script = generated / "completions/lrtool.bash"
    subprocess.run(["bash", "-n", str(script)], check=True)
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", f"source {script}; complete -p lrtool"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "-F _lrtool" in done.stdout and "-o default" in done.stdout


def test_bash_completes_verbs_subcommands_and_options(generated):
    script = generated / "completions/lrtool.bash"
    assert "gen-data" in _bash_complete(script, "lrtool ")
    assert "two-hop" in _bash_complete(script, "lrtool -q gen-data ")
    assert _bash_complete(script, "lrtool gen-data two-hop --sp") == ["--split"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("lrtool gen-data two-hop --split ", ["pretrain", "hop1", "hop2", "direct", "twohop"]),
        ("lrtool gen-data two-hop --seed 3 -o out.jsonl --split tw", ["twohop"]),
        ("lrtool gen-data two-hop --split=tw", ["--split=twohop"]),  # COMP_WORDBREAKS without '='
        ("lrtool gen-data two-hop --split = tw", ["twohop"]),  # ... and with it
        ("lrtool gen-data two-hop --size ", ["tiny", "small", "gpu"]),
        ("lrtool gen-data two-hop --out ", []),  # a path: bash's own file names (-o default)
        ("lrtool gen-data two-hop -- ", []),
    ],
)
def test_bash_completes_option_values(generated, line, expected):
    assert _bash_complete(generated / "completions/lrtool.bash", line) == expected


def test_zsh_script_parses(generated):
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed")
    subprocess.run(["zsh", "-n", str(generated / "completions/lrtool.zsh")], check=True)


def test_fish_script_parses_and_completes(generated):
    if shutil.which("fish") is None:
        pytest.skip("fish is not installed")
    script = generated / "completions/lrtool.fish"
    subprocess.run(["fish", "--no-execute", str(script)], check=True)
    done = subprocess.run(
        ["fish", "--no-config", "-c", f"source {script}; complete -C 'lrtool gen-data two-hop --split '"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [line.split("\t")[0] for line in done.stdout.splitlines()] == sorted(
        ["pretrain", "hop1", "hop2", "direct", "twohop"]
    )


# ---------------------------------------------------------------------------------------------- rendering


def _render_warnings(page: Path) -> str:
    warnings = ""
    if shutil.which("groff"):
        done = subprocess.run(["groff", "-man", "-ww", "-z", "-t", str(page)], capture_output=True, text=True)
        warnings += done.stderr
    if shutil.which("man"):
        env = {**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat"}
        done = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True, env=env)
        warnings += done.stderr
    return warnings


REQUEST = re.compile(r'\.(\\"|TH|SH|SS|TP|PP|IP|RS|RE|nf|fi|br|nh|ad)( |$)')


def _requests_are_ours(page: Path) -> list[str]:
    """Lines roff reads as a request that the generator does not write: help text escaped wrongly."""
    lines = page.read_text().splitlines()
    return [line for line in lines if line[:1] in (".", "'") and not REQUEST.match(line)]


def test_no_help_text_line_is_read_as_a_roff_request(generated):
    for page in sorted((generated / "man").glob("*.1")):
        assert _requests_are_ours(page) == [], page.name


def test_man_pages_render_without_warnings(generated):
    if not (shutil.which("groff") or shutil.which("man")):
        pytest.skip("neither groff nor man is installed")
    for page in sorted((generated / "man").glob("*.1")):
        assert _render_warnings(page) == "", page.name


class Speed(str, Enum):
    fast = "fast"
    slow = "s:low"


def _awkward_app() -> typer.Typer:
    """An app whose help texts hold everything roff and the shells treat specially."""
    awkward = typer.Typer(
        help="Tool with \\back\\slashes, 'quotes', \"doubles\", [brackets]: and colons.",
        rich_markup_mode="markdown",
    )

    @awkward.command(epilog="Examples:\n\n  tool run --speed fast 'a b' \\\n    --dry-run\n\n  .dot-first")
    def run(
        paths: list[Path] = typer.Argument(..., help="Inputs."),
        speed: Speed = typer.Option(Speed.slow, "--speed", "-s", help="How fast [x:y] it runs."),
        dry_run: bool = typer.Option(False, "--dry-run/--no-dry-run", help="'Plan' only."),
        secret: str = typer.Option("", "--secret", hidden=True),
        token: str = typer.Option(None, "--token", envvar="TOOL_TOKEN", help=".dot\n\n- item\n- ünï ≥ 1"),
    ) -> None:
        """Run it: see [docs] and `code`.

        'Quoted' paragraph ending in a backslash \\

            an indented code block
        """

    group = typer.Typer(help="A nested group.")
    awkward.add_typer(group, name="grp")

    @group.command("leaf")
    def leaf(level: int = typer.Option(1, "--level", min=0, max=9, help="Level.")) -> None:
        """A leaf."""

    return awkward


def test_awkward_help_texts_still_give_clean_pages_and_scripts(tmp_path):
    docs.generate(tmp_path, _awkward_app())
    everything = "".join(p.read_text() for p in sorted(tmp_path.rglob("*")) if p.is_file())
    assert "--secret" not in everything
    run_page = (tmp_path / "man/lrtool-run.1").read_text()
    assert r"Default: \fBs:low\fR." in run_page
    assert r"\fB\-\-dry\-run\fR, \fB\-\-no\-dry\-run\fR" in run_page
    assert r"\fB\-\-speed\fR" in run_page and r"\fIPATHS\fR..." in run_page
    assert r"\fBTOOL_TOKEN\fR" in (tmp_path / "man/lrtool.1").read_text()
    assert r"Range: 0 to 9." in (tmp_path / "man/lrtool-grp.1").read_text()
    for page in sorted((tmp_path / "man").glob("*.1")):
        assert _requests_are_ours(page) == [], page.name
    if shutil.which("groff") or shutil.which("man"):
        for page in sorted((tmp_path / "man").glob("*.1")):
            assert _render_warnings(page) == "", page.name
    subprocess.run(["bash", "-n", str(tmp_path / "completions/lrtool.bash")], check=True)
    assert _bash_complete(tmp_path / "completions/lrtool.bash", "lrtool run --speed ") == ["fast", "s:low"]
    if shutil.which("zsh"):
        subprocess.run(["zsh", "-n", str(tmp_path / "completions/lrtool.zsh")], check=True)
    if shutil.which("fish"):
        subprocess.run(["fish", "--no-execute", str(tmp_path / "completions/lrtool.fish")], check=True)


def test_the_page_of_a_verb_that_is_gone_is_removed(tmp_path):
    docs.generate(tmp_path)
    docs.generate(tmp_path, _awkward_app())
    pages = sorted(p.name for p in (tmp_path / "man").iterdir())
    assert pages == ["lrtool-grp.1", "lrtool-run.1", "lrtool.1"]
