"""Channel sets and region groupings of public EEG emotion datasets.

Regions by lobe and hemisphere (``lobe_hemisphere_groups``, used for DEAP and SEED): the
lobe comes from the 10-05 name's letters (Fp/AF prefrontal; F frontal; FT/T/TP temporal;
FC/C central; CP/P parietal; PO/O/CB/I occipital), the side from its number (odd left, even
right, z midline). Midline electrodes form their own region per lobe rather than being split
between hemispheres, so no electrode is counted twice and left/right stay symmetric.
"""

from __future__ import annotations

import re
from typing import Sequence

# Channel orders as the datasets store them (the readers in affectkit.data own them).
from ..data.deap import CHANNELS as DEAP_CHANNELS  # (32, Biosemi 10-20)
from ..data.dreamer import CHANNELS as DREAMER_CHANNELS  # (14, Emotiv EPOC)
from ..data.seed import CHANNELS as SEED_CHANNELS  # (62, Neuroscan Quik-Cap)

# HiSTN's four scalp regions of the Emotiv channels, in ring order (each touches the next
# and the last touches the first): left frontal, left posterior, right posterior, right frontal.
HISTN_REGIONS = {
    "left_frontal": ["AF3", "F7", "F3", "FC5"],
    "left_posterior": ["T7", "P7", "O1"],
    "right_posterior": ["O2", "P8", "T8"],
    "right_frontal": ["FC6", "F4", "F8", "AF4"],
}

LOBES = ("prefrontal", "frontal", "central", "temporal", "parietal", "occipital")
_LOBE_OF_PREFIX = {
    "FP": "prefrontal", "AF": "prefrontal", "F": "frontal", "FT": "temporal", "T": "temporal",
    "TP": "temporal", "FC": "central", "C": "central", "CP": "parietal", "P": "parietal",
    "PO": "occipital", "O": "occipital", "CB": "occipital", "I": "occipital",
}


def lobe_and_side(channel: str) -> tuple[str, str]:
    """("frontal", "left") for "F3": the lobe from the letters, the side from the number."""
    m = re.fullmatch(r"([A-Za-z]+?)(z|Z|\d+)", channel)
    prefix = m.group(1).upper() if m else None
    if prefix not in _LOBE_OF_PREFIX:
        raise ValueError(f"channel: expected a 10-05 name such as 'F3' or 'Cz', got {channel!r}")
    tag = m.group(2)
    side = "midline" if tag in "zZ" else ("left" if int(tag) % 2 else "right")
    return _LOBE_OF_PREFIX[prefix], side


def lobe_hemisphere_groups(channels: Sequence[str]) -> dict[str, list[str]]:
    """Regions ``"<lobe>_<side>"`` (left, midline, right), front to back, empty ones left out."""
    groups: dict[str, list[str]] = {}
    for lobe in LOBES:
        for side in ("left", "midline", "right"):
            members = [c for c in channels if lobe_and_side(c) == (lobe, side)]
            if members:
                groups[f"{lobe}_{side}"] = members
    return groups


PRESETS = {
    "dreamer": dict(channels=DREAMER_CHANNELS, groups=HISTN_REGIONS, electrode_adjacency="within_group",
                    region_adjacency="ring"),
    "deap": dict(channels=DEAP_CHANNELS, groups=lobe_hemisphere_groups(DEAP_CHANNELS), electrode_adjacency="knn",
                 region_adjacency="knn"),
    "seed": dict(channels=SEED_CHANNELS, groups=lobe_hemisphere_groups(SEED_CHANNELS), electrode_adjacency="knn",
                 region_adjacency="knn"),
}
"""Keyword arguments of ``build_hierarchy`` for each dataset name."""
