"""Compression methods, one module each, found by name.

    from offline.methods import method_class, method_names
    method_class("moe-svd-stacked")  # -> the class; method_names() -> every registered name

Importing this package imports every module in it, so each `CompressionMethod` subclass with a `name`
registers itself (offline/methods/base.py): adding a method is adding one file here.

  default.py     "moe-svd-stacked" (the default): neuron selection, then the rank of shared bases
  paper.py       "moe-svd": the paper's bases of the most frequent expert (Eq. 5-6) and U-trimming (Eq. 7-8)
  per_expert.py  "svd", "whitened-svd": per-expert truncated SVD baselines (not servable)
  shared_basis.py, experts.py: what the shared-basis methods and every method share
"""

from __future__ import annotations

import importlib
import pkgutil

from offline.methods.base import CompressionMethod, CompressedLayer, LayerWork, TensorSink, registered_methods

__all__ = ["CompressedLayer", "CompressionMethod", "LayerWork", "TensorSink", "method_class", "method_names"]


def _import_every_method_module() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_every_method_module()


def method_names() -> tuple[str, ...]:
    return tuple(registered_methods())


def method_class(name: str) -> type[CompressionMethod]:
    methods = registered_methods()
    if name not in methods:
        raise KeyError(f"no compression method {name!r}; known: {list(methods)}")
    return methods[name]
