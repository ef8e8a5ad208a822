#!/usr/bin/env bash
# lrtool's Triton kernels on a GPU: correctness against their torch references, then timings against the
# references and the machine's measured ceilings; the table goes to benchmarks/results/ (see gpu.py).
# Installs nothing: it needs a Python with lrtool's dependencies and triton (pip install -e '.[gpu]').
#
#   bash benchmarks/gpu.sh             a CUDA machine (under 8 minutes on an H200)
#   bash benchmarks/gpu.sh --dry-run   the CPU: Triton's interpreter, tiny shapes (correctness only)
#
# PYTHON picks the interpreter (default: .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ "${1:-}" = "--dry-run" ]; then
    # chosen when triton is first imported (importing torch's friends may do it): set before Python starts
    export TRITON_INTERPRET=1 LRTOOL_KERNELS=interpret
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
if ! "$PYTHON" -c "import torch, triton, peft" 2>/dev/null; then
    echo "benchmarks/gpu.sh: $PYTHON lacks torch, triton or peft (pip install -e '.[gpu]')" >&2
    exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 470 "$PYTHON" benchmarks/gpu.py "$@"
