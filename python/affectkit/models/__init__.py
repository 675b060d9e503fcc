"""Models loadable by name: `affectkit.load("text-emotion" | "vad" | "empathy" | "erc-meld")`, or by
the folder `affectkit train ... --out DIR` wrote (or its model.safetensors file)."""

from __future__ import annotations

from pathlib import Path

from .base import WEIGHTS_FILE, read_weights
from .dgcnn import DGCNN
from .histn import HiSTN, gaussian_ordinal_loss, gaussian_ordinal_targets
from .m2fnet import M2FNet
from .mult import MulT

NAMES = ("text-emotion", "vad", "empathy", "erc-meld")
# What `affectkit train KIND` builds (erc trains the model shipped as erc-meld).
TRAIN_KINDS = ("text-emotion", "vad", "empathy", "erc")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def resolve(name_or_path) -> Path:
    """The model.safetensors file a name or path stands for; clear errors otherwise."""
    if isinstance(name_or_path, str) and name_or_path in NAMES:
        path = WEIGHTS_DIR / name_or_path / WEIGHTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"the shipped weights of {name_or_path!r} are missing at {path}; reinstall affectkit")
        return path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(
            f"model: expected one of {list(NAMES)} or a folder/file written by `affectkit train`, got {str(name_or_path)!r}"
        )
    return path


def load(name_or_path, *, features=None):
    """A TextEmotionModel (`text-emotion`), RegressionModel (`vad`, `empathy`) or ERCModel
    (`erc-meld`)."""
    tensors, config = read_weights(resolve(name_or_path))
    if config.get("kind") == "erc":
        from .erc import ERCModel

        return ERCModel(tensors, config)
    if config.get("kind") == "text-emotion":
        from .emotion import TextEmotionModel

        return TextEmotionModel(tensors, config, features)
    from .regression import RegressionModel

    return RegressionModel(tensors, config, features)


__all__ = ["DGCNN", "M2FNet", "MulT", "NAMES", "TRAIN_KINDS", "WEIGHTS_DIR", "HiSTN", "gaussian_ordinal_loss",
           "gaussian_ordinal_targets", "load", "resolve"]
