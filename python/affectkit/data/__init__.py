"""Loaders for the emotion corpora affectkit trains and evaluates on.

Each loader reads a user-supplied copy of the corpus (an explicit path, or the folder named
by the AFFECTKIT_DATA environment variable holding one sub-folder per corpus) and returns a
pandas DataFrame with documented columns. Nothing is downloaded and nothing is bundled.
"""

from . import emobank, empathic_reactions, goemotions, meld
from ._io import data_root

__all__ = ["data_root", "emobank", "empathic_reactions", "goemotions", "meld"]
