"""A subpackage's face: its `__init__` names its public names and the module each lives in, and they are
imported from there on first use (PEP 562). So `from distill.losses import SparseTargets` works as in
torchtune's packages, while importing the package imports none of its modules: `python -m
distill.train.recipe` (torchrun), `python -m distill.eval.mtp_eval` and `python -m distill.config.reference`
run their module once, and `mmtp --help` stays free of torch. tests/test_import_graph.py reads the same
tables as arrows from the package to its modules."""

from __future__ import annotations

import importlib
import sys


def face(package: str, exports: dict[str, tuple[str, ...]]):
    """`__getattr__` and `__dir__` for the package `package`, from {module: its public names}."""
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        setattr(sys.modules[package], name, value)  # the next look-up is an ordinary attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(home))

    return __getattr__, __dir__
