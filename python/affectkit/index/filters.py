"""Filter expressions over an index's attribute table.

Every filter evaluates to a boolean row mask with vectorised numpy (no per-row Python) and
estimates its selectivity from the table's statistics alone (for the planner).

Build filters with the functions below or with the dict form accepted by
``EmbeddingIndex.search(where=...)``::

    {"label": 3}                 equality
    {"label": [2, 3]}            membership
    {"ts": (lo, hi)}             lo <= ts < hi, None for an open end
    several keys                 AND

and combine with ``&``, ``|`` and ``~``::

    (eq("label", "joy") | any_of("emotions", ["joy", "love"])) & ~between("ts", None, 10)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .attributes import AttributeTable


class Filter:
    """Base class: ``mask(table, id_lookup)`` -> bool (n,), ``estimate(table)`` -> [0, 1]."""

    def mask(self, table: "AttributeTable", ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def estimate(self, table: "AttributeTable", ids: np.ndarray) -> float:
        raise NotImplementedError

    def key(self) -> str:
        """A hashable description: equal keys select equal rows (groups per-query filters)."""
        return repr(self)

    def __and__(self, other: "Filter") -> "Filter":
        return And((self, as_filter(other)))

    def __or__(self, other: "Filter") -> "Filter":
        return Or((self, as_filter(other)))

    def __invert__(self) -> "Filter":
        return Not(self)


@dataclass(frozen=True, repr=True)
class Eq(Filter):
    name: str
    value: Any

    def mask(self, table, ids):
        return table.column(self.name).isin([self.value])

    def estimate(self, table, ids):
        return table.column(self.name).estimate_isin([self.value])


@dataclass(frozen=True, repr=True)
class In(Filter):
    name: str
    values: tuple

    def mask(self, table, ids):
        return table.column(self.name).isin(list(self.values))

    def estimate(self, table, ids):
        return table.column(self.name).estimate_isin(list(self.values))


@dataclass(frozen=True, repr=True)
class Range(Filter):
    name: str
    lo: Any = None
    hi: Any = None

    def mask(self, table, ids):
        return table.column(self.name).in_range(self.lo, self.hi)

    def estimate(self, table, ids):
        return table.column(self.name).estimate_range(self.lo, self.hi)


@dataclass(frozen=True, repr=True)
class AnyOf(Filter):
    """Rows whose label set shares at least one label with ``labels``."""

    name: str
    labels: tuple

    def mask(self, table, ids):
        return table.column(self.name).any_of(list(self.labels))

    def estimate(self, table, ids):
        return table.column(self.name).estimate_any_of(list(self.labels))


@dataclass(frozen=True, repr=True)
class AllOf(Filter):
    """Rows whose label set contains every label in ``labels``."""

    name: str
    labels: tuple

    def mask(self, table, ids):
        return table.column(self.name).all_of(list(self.labels))

    def estimate(self, table, ids):
        return table.column(self.name).estimate_all_of(list(self.labels))


@dataclass(frozen=True, repr=True)
class And(Filter):
    parts: tuple

    def mask(self, table, ids):
        out = np.ones(table.n, dtype=bool)
        for p in self.parts:
            out &= p.mask(table, ids)
        return out

    def estimate(self, table, ids):  # independence assumption
        s = 1.0
        for p in self.parts:
            s *= p.estimate(table, ids)
        return s


@dataclass(frozen=True, repr=True)
class Or(Filter):
    parts: tuple

    def mask(self, table, ids):
        out = np.zeros(table.n, dtype=bool)
        for p in self.parts:
            out |= p.mask(table, ids)
        return out

    def estimate(self, table, ids):
        miss = 1.0
        for p in self.parts:
            miss *= 1.0 - p.estimate(table, ids)
        return 1.0 - miss


@dataclass(frozen=True, repr=True)
class Not(Filter):
    part: Filter

    def mask(self, table, ids):
        return ~self.part.mask(table, ids)

    def estimate(self, table, ids):
        return 1.0 - self.part.estimate(table, ids)


class RowMask(Filter):
    """A caller-given boolean mask aligned with ``EmbeddingIndex.stored_ids`` (storage order)."""

    def __init__(self, mask):
        self.values = np.asarray(mask)
        if self.values.dtype != bool or self.values.ndim != 1:
            raise TypeError(f"mask: expected a 1-D boolean array, got dtype {self.values.dtype} "
                            f"with shape {self.values.shape}")

    def mask(self, table, ids):
        if self.values.shape[0] != table.n:
            raise ValueError(f"mask: expected {table.n} entries (one per stored row), got {self.values.shape[0]}")
        return self.values.copy()

    def estimate(self, table, ids):
        return float(self.values.mean()) if self.values.size else 0.0

    def key(self):
        return f"RowMask@{id(self)}"


class IdAllowList(Filter):
    """Only the given ids (unknown ids are ignored)."""

    def __init__(self, ids):
        self.ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))

    def mask(self, table, ids):
        return np.isin(ids, self.ids)

    def estimate(self, table, ids):
        return min(1.0, len(self.ids) / max(table.n, 1))

    def key(self):
        return f"IdAllowList@{id(self)}"


# ---- constructors -------------------------------------------------------------------------

def eq(name: str, value) -> Filter:
    return Eq(name, value)


def isin(name: str, values: Sequence) -> Filter:
    return In(name, tuple(values))


def between(name: str, lo=None, hi=None) -> Filter:
    """lo <= x < hi; None leaves that end open."""
    return Range(name, lo, hi)


def any_of(name: str, labels: Sequence) -> Filter:
    return AnyOf(name, tuple(labels))


def all_of(name: str, labels: Sequence) -> Filter:
    return AllOf(name, tuple(labels))


def row_mask(mask) -> Filter:
    return RowMask(mask)


def ids_in(ids) -> Filter:
    return IdAllowList(ids)


def as_filter(where) -> Filter:
    """Turn the dict form (or a Filter) into a Filter; anything else is a TypeError."""
    if isinstance(where, Filter):
        return where
    if isinstance(where, dict):
        parts = []
        for name, cond in where.items():
            if not isinstance(name, str):
                raise TypeError(f"where: expected attribute names as str keys, got {name!r}")
            if isinstance(cond, tuple):
                if len(cond) != 2:
                    raise ValueError(f"where[{name!r}]: expected a (lo, hi) range tuple, got {cond!r}")
                parts.append(Range(name, cond[0], cond[1]))
            elif isinstance(cond, (list, set, frozenset, np.ndarray)):
                parts.append(In(name, tuple(np.asarray(list(cond)).tolist())))
            elif isinstance(cond, Filter):
                raise TypeError(f"where[{name!r}]: expected a value, list or (lo, hi) tuple, got a Filter; "
                                "combine Filters with & instead")
            else:
                parts.append(Eq(name, cond.item() if isinstance(cond, np.generic) else cond))
        return And(tuple(parts))
    if isinstance(where, np.ndarray) and where.dtype == bool:
        return RowMask(where)
    raise TypeError(f"where: expected None, a dict, a Filter or a list of those (one per query), "
                    f"got {type(where).__name__}")
