"""affectkit.index: filtered nearest-neighbour search over embeddings.

``EmbeddingIndex`` keeps vectors, 64-bit ids and attribute columns (categorical, numeric,
multi-label sets); ``search`` answers queries under filters by an exact scan, a graph (HNSW)
walk, or a scan of each query's nearest k-means partitions (after ``build_partitions``),
chosen by a planner from attribute statistics. Filters are dicts or the expressions below.
"""

from .embedding_index import EmbeddingIndex
from .filters import Filter, all_of, any_of, between, eq, ids_in, isin, row_mask
from .planner import Plan, PlannerSettings
from .storage import IndexFormatError

__all__ = [
    "EmbeddingIndex",
    "Filter",
    "IndexFormatError",
    "Plan",
    "PlannerSettings",
    "all_of",
    "any_of",
    "between",
    "eq",
    "ids_in",
    "isin",
    "row_mask",
]
