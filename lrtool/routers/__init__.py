"""Routers: pick or mix adapters per input or per token instead of averaging their parameters.

Each router is one small file in this package that defines `METHOD` (a `base.RouterMethod`: name, summary,
parameters, how it is built from adapters and how eval applies it), registered by name in `REGISTRY`. The
router directory's format and the shared parts are in `base.py`.

    arrow      per token and layer, top-k adapters by alignment with their top singular vectors
    uniform    every adapter's output with weight 1/E
    centroid   per example, the adapters whose examples' hidden states are nearest
    lorahub    one weight per adapter, searched gradient-free on a few examples
    oracle     each example to the adapter its meta label names

Importing this package is cheap (no torch): `REGISTRY` lists the names without importing the router files.
"""

import importlib
from collections.abc import Iterator, Mapping

from lrtool.errors import UsageError

_FILES = {name: name for name in ("arrow", "uniform", "centroid", "lorahub", "oracle")}


class _Registry(Mapping):
    """name -> RouterMethod, importing a router's file (and with it torch) only when it is looked up."""

    def __getitem__(self, name: str):
        return importlib.import_module(f"{__name__}.{_FILES[name]}").METHOD

    def __iter__(self) -> Iterator[str]:
        return iter(_FILES)

    def __len__(self) -> int:
        return len(_FILES)


REGISTRY = _Registry()


def get(name: str):
    """The registered router called `name`; a usage error listing the valid names when there is none."""
    if name not in REGISTRY:
        raise UsageError(f"unknown router {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def describe_routers() -> list[dict]:
    """Each router's name, summary and parameters, as `lrtool route --list` prints them."""
    return [REGISTRY[name].describe() for name in REGISTRY]
