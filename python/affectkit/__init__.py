"""affectkit: fast, correct building blocks for emotion recognition.

`affectkit._C` is the compiled core (no torch needed to import it); `affectkit.ops`
exposes its kernels as torch custom ops (imported lazily, so `import affectkit`
works without torch).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

# torch, where installed, is loaded before the compiled core: on the H100 machine (torch
# 2.11+cu130, the core built there with gcc 13.3 and linked to the system libgomp), importing
# torch after affectkit._C crashed the process (SIGSEGV inside torch's import), while the other
# order works. The core itself never needs torch.
if importlib.util.find_spec("torch") is not None:
    import torch  # noqa: F401

from ._C import __version__
from ._info import info

__all__ = ["__version__", "info", "load", "ops"]

if TYPE_CHECKING:  # pragma: no cover
    from . import index, nn, ops


def load(name_or_path):
    """A text model by name ("text-emotion", "vad", "empathy") or by a folder `affectkit train` wrote."""
    from .models import load as _load

    return _load(name_or_path)


def __getattr__(name: str):
    # Submodules that need torch load on first use.
    if name in {"ops", "nn", "index"}:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'affectkit' has no attribute {name!r}")
