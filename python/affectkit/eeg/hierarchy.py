"""Electrode hierarchies: electrodes -> regions -> ... -> one global node, with a graph per level."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .adjacency import distance_adjacency, group_adjacency, knn_adjacency, ring_adjacency
from .montage import Montage, standard_montage

Groups = Mapping[str, Union[Sequence[str], "Groups"]]


@dataclass
class Level:
    """One level of the hierarchy: its nodes, their graph and their parents one level up."""

    names: tuple[str, ...]
    adjacency: torch.Tensor            # (n, n) raw, symmetric, no self-loops
    assignment: Optional[torch.Tensor]  # (n,) int64 parent index in the next level; None on top
    positions: np.ndarray              # (n, 3) mean position of the electrodes under each node

    @property
    def num_nodes(self) -> int:
        return len(self.names)


def _flatten_groups(groups: Groups, depth: int = 0) -> tuple[list[list], int]:
    """Per level, (name, parent-name) pairs from the leaves up; checks a uniform depth."""
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError("groups: expected a non-empty mapping of group name -> channel names or sub-groups")
    kinds = {isinstance(v, Mapping) for v in groups.values()}
    if len(kinds) != 1:
        raise ValueError("groups: expected every group at one level to hold either channel names or sub-groups, "
                         "got a mix")
    if kinds == {False}:
        pairs = [[(ch, name) for name, chans in groups.items() for ch in chans], [(name, None) for name in groups]]
        return pairs, 1
    sub = [(_flatten_groups(v, depth + 1), name) for name, v in groups.items()]
    depths = {d for (_, d), _ in sub}
    if len(depths) != 1:
        raise ValueError(f"groups: expected every branch to have the same depth, got depths {sorted(depths)}")
    d = depths.pop()
    levels = [[] for _ in range(d + 2)]
    for (pairs, _), name in sub:
        for lvl in range(d + 1):
            levels[lvl].extend(pairs[lvl] if lvl < d else [(n, name) for n, _ in pairs[lvl]])
        levels[d + 1].append((name, None))
    return levels, d + 1


def _level_adjacency(kind, positions: np.ndarray, assignment, k: int, threshold: Optional[float]) -> torch.Tensor:
    n = positions.shape[0]
    if isinstance(kind, torch.Tensor):
        if tuple(kind.shape) != (n, n):
            raise ValueError(f"adjacency: expected a ({n}, {n}) matrix for this level, got {tuple(kind.shape)}")
        return kind.float()
    if kind == "knn":
        return knn_adjacency(positions, k)
    if kind == "distance":
        if threshold is None:
            raise ValueError("threshold: expected a distance in metres for adjacency='distance', got None")
        return distance_adjacency(positions, threshold)
    if kind == "within_group":
        if assignment is None:
            raise ValueError("adjacency: 'within_group' needs a level with parents, got the top level")
        return group_adjacency(assignment.tolist())
    if kind == "ring":
        return ring_adjacency(n)
    if kind == "complete":
        return group_adjacency([0] * n)
    raise ValueError(f"adjacency: expected 'knn', 'distance', 'within_group', 'ring', 'complete' or a tensor, got {kind!r}")


def build_hierarchy(
    channels: Sequence[str],
    groups: Groups,
    montage: Union[str, Montage] = "standard_1005",
    electrode_adjacency="knn",
    region_adjacency="knn",
    k: int = 3,
    threshold: Optional[float] = None,
    global_node: bool = True,
) -> list[Level]:
    """Levels from electrodes (level 0, in ``channels`` order) up through nested ``groups``.

    Args:
        channels: channel names in the order of the data.
        groups: name -> channel names, or name -> sub-groups (any depth, the same in every
            branch). Every channel must appear in exactly one innermost group.
        montage: an MNE montage name or a ``Montage`` of these channels (positions).
        electrode_adjacency: graph of level 0: "knn" (k nearest), "distance" (threshold),
            "within_group" (complete inside each innermost group: HiSTN), "complete" or a tensor.
        region_adjacency: graph of every higher level: "knn" (on the mean positions), "ring",
            "complete", "distance" or a tensor (same for every level).
        global_node: add a last level with one node that every top group pools into.
    """
    channels = list(channels)
    if not isinstance(montage, Montage):
        montage = standard_montage(channels, montage)
    elif [c.upper() for c in montage.channels] != [c.upper() for c in channels]:
        raise ValueError("montage: expected a Montage of exactly these channels in this order")
    pairs, _ = _flatten_groups(groups)
    if global_node:
        pairs[-1] = [(name, "global") for name, _ in pairs[-1]]
        pairs.append([("global", None)])
    # Level 0 follows the data's channel order; higher levels follow the order of the groups.
    leaf_parent = {}
    for ch, parent in pairs[0]:
        if ch.upper() in leaf_parent:
            raise ValueError(f"groups: expected every channel in exactly one group, got {ch!r} twice")
        leaf_parent[ch.upper()] = parent
    unknown = sorted(set(leaf_parent) - {c.upper() for c in channels})
    missing = [c for c in channels if c.upper() not in leaf_parent]
    if unknown or missing:
        raise ValueError(f"groups: expected exactly the channels, got unknown {unknown} and ungrouped {missing}")
    names = [channels] + [[n for n, _ in lvl] for lvl in pairs[1:]]
    parents = [[leaf_parent[c.upper()] for c in channels]] + [[p for _, p in lvl] for lvl in pairs[1:]]
    positions = [montage.positions]
    levels = []
    for i, lvl_names in enumerate(names):
        if i > 0:  # a group sits at the mean of its members' positions
            prev = np.asarray(levels[-1].assignment)
            positions.append(np.stack([positions[-1][prev == j].mean(0) for j in range(len(lvl_names))]))
        assignment = None
        if parents[i][0] is not None:
            index = {n: j for j, n in enumerate(names[i + 1])}
            assignment = torch.tensor([index[p] for p in parents[i]], dtype=torch.int64)
        kind = electrode_adjacency if i == 0 else region_adjacency
        adjacency = _level_adjacency(kind, positions[i], assignment, k, threshold)
        levels.append(Level(tuple(lvl_names), adjacency, assignment, positions[i]))
    return levels
