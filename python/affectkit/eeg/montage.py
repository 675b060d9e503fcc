"""Electrode positions by channel name, taken from MNE-Python's standard montages."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

# Electrodes of common caps that the 10-05 system does not name. Neuroscan's 62-channel
# Quik-Cap (SEED) has two cerebellar electrodes 10% below O1/O2, where 10-05 puts I1/I2.
CHANNEL_ALIASES: dict[str, str] = {"CB1": "I1", "CB2": "I2"}


@dataclass(frozen=True)
class Montage:
    """Channel names and their 3-D positions (metres, MNE head coordinates)."""

    channels: tuple[str, ...]
    positions: np.ndarray  # (C, 3) float64
    source: str

    def __len__(self) -> int:
        return len(self.channels)

    def distances(self) -> np.ndarray:
        """(C, C) Euclidean distances between electrodes."""
        d = self.positions[:, None, :] - self.positions[None, :, :]
        return np.sqrt((d * d).sum(-1))

    def index(self, channel: str) -> int:
        key = channel.upper()
        for i, name in enumerate(self.channels):
            if name.upper() == key:
                return i
        raise ValueError(f"channel: expected one of this montage's channels, got {channel!r}")


def _mne_positions(kind: str) -> dict[str, np.ndarray]:
    try:
        import mne
    except ImportError as err:  # pragma: no cover - mne is a dependency
        raise ImportError("affectkit.eeg needs MNE-Python for electrode positions: pip install mne") from err
    # MNE 1.13 renamed standard_10xx to colin27_10xx (same positions); use the new name when present.
    builtin = set(mne.channels.get_builtin_montages())
    renamed = kind.replace("standard_", "colin27_")
    name = renamed if renamed in builtin else kind
    if name not in builtin:
        raise ValueError(f"kind: expected an MNE built-in montage such as 'standard_1005', got {kind!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        montage = mne.channels.make_standard_montage(name)
    return {k.upper(): np.asarray(v, dtype=np.float64) for k, v in montage.get_positions()["ch_pos"].items()}


def standard_montage(
    channels: Sequence[str], kind: str = "standard_1005", aliases: Mapping[str, str] | None = None
) -> Montage:
    """Positions of ``channels`` (matched case-insensitively) from an MNE standard montage.

    Args:
        channels: channel names in the order of the data, e.g. ``["AF3", "F7", ...]``.
        kind: MNE montage name: "standard_1005" (default, 343 positions) or "standard_1020".
        aliases: names to look up under another name; default ``CHANNEL_ALIASES`` (CB1/CB2).

    Example:
        >>> m = standard_montage(["Fp1", "Fz", "O2"])
        >>> m.positions.shape
        (3, 3)
    """
    if isinstance(channels, str) or not all(isinstance(c, str) for c in channels):
        raise TypeError("channels: expected a sequence of channel names (str)")
    if len({c.upper() for c in channels}) != len(channels):
        raise ValueError(f"channels: expected distinct names, got {list(channels)}")
    aliases = {k.upper(): v.upper() for k, v in (CHANNEL_ALIASES if aliases is None else aliases).items()}
    table = _mne_positions(kind)
    missing = [c for c in channels if aliases.get(c.upper(), c.upper()) not in table]
    if missing:
        raise ValueError(f"channels: expected names of the {kind} montage, got unknown {missing}")
    positions = np.stack([table[aliases.get(c.upper(), c.upper())] for c in channels]) if channels else np.zeros((0, 3))
    return Montage(tuple(channels), positions, kind)
