"""The evaluation's optional packages (the ``eval`` extra): ROUGE-L's scorer and the plotting
library. The product runs without them; what needs one says how to install it."""

from __future__ import annotations

import importlib
from types import ModuleType

from chunkcache.errors import InvalidInputError

INSTALL = "pip install 'chunkcache[eval]'"


def require(module: str, what: str) -> ModuleType:
    """``module`` imported, or a clear error naming ``what`` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InvalidInputError(f"{what} needs the {module.split('.')[0]} package: {INSTALL}") from None


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the file-only backend (benches write PNGs; no screen needed)."""
    matplotlib = require("matplotlib", "plotting")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "plotting")
