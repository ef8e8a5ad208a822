"""Kernel or reference: decides which implementation serves a call of a kernel module.

A Triton kernel serves a call when its tensors are on a CUDA device, Triton can be imported and the
environment variable LRTOOL_KERNELS is not `off`; otherwise the torch reference beside it does (the CPU
path). LRTOOL_KERNELS values:

    auto (or unset)  kernels for CUDA tensors
    off              the references everywhere (to compare, or to work around a kernel)
    interpret        kernels for CPU tensors too, through Triton's interpreter: tests and the CPU dry run of
                     benchmarks/gpu.sh (TRITON_INTERPRET=1 must be set before the kernel modules are imported)

A kernel that fails (to compile, or in its launcher) is reported once, as a warning on the "lrtool" logger,
and its reference serves that call and every later one: a failed kernel never crashes a run. Kernels that
write into an existing tensor compile before their first write, so the reference starts from intact inputs.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable

from lrtool.errors import UsageError, one_line

log = logging.getLogger("lrtool")

MODES = ("auto", "off", "interpret")
_failed: set[str] = set()  # kernels that failed once in this process


def mode() -> str:
    """LRTOOL_KERNELS, checked: auto, off or interpret."""
    value = os.environ.get("LRTOOL_KERNELS", "").strip().lower() or "auto"
    if value not in MODES:
        raise UsageError(f"LRTOOL_KERNELS must be one of {', '.join(MODES)}, got {value!r}")
    return value


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def wanted(where) -> bool:
    """Whether kernels should compute on `where`, a tensor or a device (before any kernel has failed)."""
    chosen = mode()
    if chosen == "off" or not triton_installed():
        return False
    kind = getattr(where, "device", where)
    kind = getattr(kind, "type", str(kind).split(":")[0])
    return kind == "cuda" or (chosen == "interpret" and kind == "cpu")


def kernel_device():
    """Where kernels would compute work that is on no device yet (merge reads factors on the CPU): the
    current CUDA device when there is one, the CPU under LRTOOL_KERNELS=interpret; None: the references."""
    import torch

    if torch.cuda.is_available() and wanted("cuda"):
        return torch.device("cuda")
    if wanted("cpu"):
        return torch.device("cpu")
    return None


def failed() -> frozenset[str]:
    """The kernels that failed in this process and are served by their references."""
    return frozenset(_failed)


def run(name: str, kernel: Callable, reference: Callable, *args, **kwargs):
    """kernel(*args, **kwargs) when kernels are wanted for the first tensor argument's device and kernel
    `name` has not failed; reference(*args, **kwargs) otherwise, or when the kernel raises."""
    tensor = next(a for a in args if hasattr(a, "device"))
    if name not in _failed and wanted(tensor):
        try:
            return kernel(*args, **kwargs)
        except Exception as error:  # a compile error, an unsupported GPU, a bug: never a crash
            _failed.add(name)
            log.warning("kernel %s failed, its torch reference serves from now on: %s", name, one_line(error))
    return reference(*args, **kwargs)
