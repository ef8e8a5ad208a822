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

from lrtool.registry import Registry

_FILES = {name: name for name in ("arrow", "uniform", "centroid", "lorahub", "oracle")}
REGISTRY = Registry(__name__, _FILES, "router")
get = REGISTRY.get
describe_routers = REGISTRY.describe

__all__ = ["REGISTRY", "describe_routers", "get"]
