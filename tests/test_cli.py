"""The command line's manners: exit codes, one-line errors, stdout for data, atomic outputs, start-up."""

import ast
import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_lrtool
from lrtool import __version__

CLI_LAYER = {"cli.py", "docs.py", "__main__.py"}  # the only modules allowed to import typer or rich


def test_version_prints_the_package_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"lrtool {__version__}"


def test_python_dash_m_runs_the_tool():
    result = run_lrtool("--version")
    assert result.returncode == 0 and __version__ in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["gen-data", "two-hop", "--split", "twohop", "--size", "tiny"],
        ["gen-data", "math", "--split", "composed", "--size", "tiny"],
    ],
)
def test_help_and_gen_data_do_not_import_torch_or_other_heavy_libraries(args):
    probe = (
        "import sys\nfrom lrtool.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = ('torch', 'transformers', 'peft', 'numpy', 'safetensors')\n"
        "heavy = sorted(m for m in heavy if m in sys.modules)\n"
        "print(code, heavy, file=sys.stderr)\n"
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert result.stderr.strip().splitlines()[-1] == "0 []"


def test_core_modules_never_import_typer_or_rich():
    for path in sorted((REPO / "lrtool").rglob("*.py")):
        if path.name in CLI_LAYER and path.parent.name == "lrtool":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("typer", "rich", "click"), f"{path.name} imports {name}"


def test_gen_data_pipes_valid_jsonl_to_stdout():
    result = run_lrtool("gen-data", "two-hop", "--split", "twohop", "--seed", "1", "--size", "tiny")
    assert result.returncode == 0 and result.stderr == ""
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines and all(line["meta"]["split"] == "twohop" for line in lines)


def test_gen_data_stdout_is_byte_identical_across_runs_and_equals_the_file_output(cli, tmp_path):
    args = ("gen-data", "two-hop", "--split", "hop1", "--seed", "5", "--size", "tiny")
    first, second = cli(*args), cli(*args)
    assert first == second and first[0] == 0
    code, out, _ = cli(*args, "-o", str(tmp_path / "hop1.jsonl"))
    assert code == 0 and out.strip() == str(tmp_path / "hop1.jsonl")
    assert (tmp_path / "hop1.jsonl").read_text() == first[1]


def test_out_dir_holds_every_split_both_template_sets_and_a_manifest(cli, tmp_path):
    out = tmp_path / "world"
    code, stdout, _ = cli("gen-data", "two-hop", "--size", "tiny", "--seed", "2", "-o", str(out))
    assert code == 0 and stdout.strip() == str(out)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "pretrain.jsonl",
            "hop1.jsonl",
            "hop2.jsonl",
            "direct.jsonl",
            "twohop.jsonl",
            "hop1.eval.jsonl",
            "hop2.eval.jsonl",
            "twohop.eval.jsonl",
            "lrtool.json",
        ]
    )
    manifest = json.loads((out / "lrtool.json").read_text())
    assert manifest["lrtool"] == __version__ and manifest["seed"] == 2
    assert manifest["command"][:3] == ["lrtool", "gen-data", "two-hop"] and manifest["inputs"] == {}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary sibling left


def test_an_existing_output_is_kept_unless_forced(cli, tmp_path):
    out = tmp_path / "world"
    assert cli("gen-data", "two-hop", "--size", "tiny", "--seed", "1", "-o", str(out))[0] == 0
    (out / "mine.txt").write_text("keep me")
    code, stdout, err = cli("gen-data", "two-hop", "--size", "tiny", "-o", str(out))
    assert code == 1 and stdout == "" and err.startswith("Error: ") and "--force" in err
    assert (out / "mine.txt").read_text() == "keep me"
    code, _, _ = cli("gen-data", "two-hop", "--size", "tiny", "-o", str(out), "--force")
    assert code == 0 and not (out / "mine.txt").exists() and (out / "twohop.jsonl").exists()


def test_an_interrupted_run_exits_130_and_leaves_no_partial_output(cli, tmp_path, monkeypatch):
    from lrtool.data import twohop

    real = twohop.generate

    def interrupted(config, split, **kwargs):
        if split == "direct":
            raise KeyboardInterrupt
        return real(config, split, **kwargs)

    monkeypatch.setattr(twohop, "generate", interrupted)
    code, out, err = cli("gen-data", "two-hop", "--size", "tiny", "-o", str(tmp_path / "world"))
    assert code == 130 and out == "" and err.strip() == "Error: interrupted"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, needle",
    [
        (["gen-data", "two-hop", "--split", "hop3"], "--split"),
        (["gen-data", "two-hop", "--split", "hop1", "--cities", "-2"], "--cities"),
        (["gen-data", "two-hop", "--split", "hop1", "--bridge-fraction", "1.5"], "--bridge-fraction"),
        (["gen-data", "two-hop", "--split", "pretrain", "--templates", "eval"], "pretrain"),
        (["gen-data", "two-hop"], "--split"),
        (["gen-data", "two-hop", "--split", "hop1", "-q", "-v"], "--quiet"),
        (["gen-data", "two-hop", "--bogus"], "--bogus"),
        (["no-such-verb"], "no-such-verb"),
    ],
)
def test_bad_usage_exits_2_with_one_error_line(cli, args, needle):
    code, out, err = cli(*args)
    assert code == 2 and out == ""
    assert err.startswith("Error: ") and len(err.strip().splitlines()) == 1 and needle in err


def test_errors_carry_a_traceback_only_with_debug(tmp_path):
    (tmp_path / "x").mkdir()
    plain = run_lrtool("gen-data", "two-hop", "--size", "tiny", "-o", str(tmp_path / "x"))
    assert plain.returncode == 1 and plain.stderr.startswith("Error: ") and "Traceback" not in plain.stderr
    debug = run_lrtool("--debug", "gen-data", "two-hop", "--size", "tiny", "-o", str(tmp_path / "x"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "Error: " in debug.stderr
    env = run_lrtool(
        "gen-data", "two-hop", "--size", "tiny", "-o", str(tmp_path / "x"), env={"LRTOOL_DEBUG": "1"}
    )
    assert "Traceback" in env.stderr


def test_quiet_silences_the_log_and_verbose_is_accepted(cli, tmp_path):
    code, _, err = cli("gen-data", "two-hop", "--size", "tiny", "-o", str(tmp_path / "a"))
    assert code == 0 and "wrote" in err
    code, _, err = cli("gen-data", "two-hop", "--size", "tiny", "-q", "-o", str(tmp_path / "b"))
    assert code == 0 and err == ""
    code, _, err = cli("-q", "gen-data", "two-hop", "--size", "tiny", "-o", str(tmp_path / "c"))
    assert code == 0 and err == ""


def test_a_closed_pipe_stops_quietly():
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-m", "lrtool", "gen-data", "two-hop", "--split", "pretrain", "--size", "gpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait()
    assert "Traceback" not in err and "Exception ignored" not in err


def test_readme_starts_with_the_two_setup_commands():
    text = (REPO / "README.md").read_text()
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("make ")]
    assert commands[:2] == ["make demo", "make test"]
    assert Path(REPO / "Makefile").exists()


def test_force_never_replaces_a_directory_lrtool_did_not_write_nor_the_working_directory(
    cli, tmp_path, monkeypatch
):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    code, _, err = cli("gen-data", "two-hop", "--size", "tiny", "-o", str(mine), "--force")
    assert code == 1 and "lrtool did not write" in err and (mine / "notes.txt").read_text() == "precious"
    monkeypatch.chdir(mine)
    code, _, err = cli("gen-data", "two-hop", "--size", "tiny", "-o", ".", "--force")
    assert code == 1 and "working directory" in err and (mine / "notes.txt").exists()


def test_outputs_are_as_readable_as_any_file_the_user_makes(cli, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        assert cli("gen-data", "two-hop", "--size", "tiny", "-o", str(tmp_path / "w"))[0] == 0
        assert (
            cli("gen-data", "two-hop", "--size", "tiny", "--split", "hop1", "-o", str(tmp_path / "f"))[0] == 0
        )
    finally:
        os.umask(old)
    assert (tmp_path / "w").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644
