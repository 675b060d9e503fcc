"""EEG electrodes as graphs: montages, dataset presets, adjacency builders and hierarchies.

Positions come from MNE-Python's standard montages (never typed by hand). See
``affectkit.nn.ElectrodeHierarchy`` for the module that bundles a hierarchy for a model.
"""

from .adjacency import (
    LearnedAdjacency,
    distance_adjacency,
    edge_adjacency,
    gcn_normalize,
    group_adjacency,
    knn_adjacency,
    laplacian,
    rescaled_laplacian,
    ring_adjacency,
)
from .hierarchy import Level, build_hierarchy
from .montage import CHANNEL_ALIASES, Montage, standard_montage
from .presets import (
    DEAP_CHANNELS,
    DREAMER_CHANNELS,
    HISTN_REGIONS,
    PRESETS,
    SEED_CHANNELS,
    lobe_and_side,
    lobe_hemisphere_groups,
)

__all__ = [
    "CHANNEL_ALIASES", "DEAP_CHANNELS", "DREAMER_CHANNELS", "HISTN_REGIONS", "LearnedAdjacency", "Level",
    "Montage", "PRESETS", "SEED_CHANNELS", "build_hierarchy", "distance_adjacency", "edge_adjacency",
    "gcn_normalize", "group_adjacency", "knn_adjacency", "laplacian", "lobe_and_side", "lobe_hemisphere_groups",
    "rescaled_laplacian", "ring_adjacency", "standard_montage",
]
