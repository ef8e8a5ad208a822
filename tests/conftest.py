"""Shared test setup: cap torch's threads (tests run serially on 2 cores) and keep everything offline."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Set before torch is imported anywhere in the session; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("LRTOOL_TEST_THREADS", "1"))
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("LRTOOL_DEBUG", None)
# Without a GPU, Triton's interpreter runs the kernels (tests/test_kernels.py). It is chosen when triton is
# first imported, which importing transformers or peft already does: so here, before any test module.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent


def run_lrtool(*args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m lrtool ARGS` in a real subprocess (for pipes, exit codes and import checks)."""
    return subprocess.run(
        [sys.executable, "-m", "lrtool", *args],
        input=input,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def cli(capsys):
    """Call lrtool in-process: cli("gen-data", ...) -> (exit code, stdout, stderr)."""
    from lrtool.cli import main

    def call(*args: str):
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return call
