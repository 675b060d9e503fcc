"""Choosing between an exact scan of the passing rows, a filtered graph search, and a scan of
the passing rows in each query's nearest partitions (when the index has partitions).

Cost model (per query, in units of one d-dimensional distance):
    exact  ~ passing rows, at matrix-product speed (about `exact_speedup` times cheaper
             per distance than a graph step, which chases links through scattered rows);
    graph  ~ ef(s) * M / s * sqrt(max(ef(s), k) / ef(s)): the beam must see about 1/s nodes
             per allowed one, since it walks through filtered-out nodes without collecting
             them; ef(s) shrinks for selective filters (see PlannerSettings.ef_for). The C++
             search widens the beam to k, and a wider beam costs more, though less than in
             proportion (its expansions share neighbours): 1,000 queries on 200,000 x 384
             clustered rows took 54 / 100 / 253 ms at k = 100 / 300 / 1,000 unfiltered, and
             92 / 265 / 1,067 ms at 24 % (recall 0.93 at k = 1,000, where the scan took
             172 ms). The square root puts 8 of those 9 cases (k = 100, 300, 1,000 at 24, 50
             and 100 %) on the faster path; the ninth, k = 100 at 24 %, goes to the scan
             (139 ms, recall 1.0, against the graph's 92 ms and 0.988);
    partitions ~ the centroids at scan speed, plus the passing rows of the probed partitions
             (probes / partitions of them), at `candidate_cost` graph units a row: each
             partition's rows meet all of its queries at once, ~26-34 ns a (query, row) pair
             on 200,000 x 384 rows with 2 threads, where a graph unit took ~27 ns at 50 %.
             The probes come from the partitions' calibration (partitions.py), so on data
             without cluster structure this path comes out expensive and is not taken.
The estimate comes from the attribute statistics (value counts, histograms, per-label
frequencies, independence across AND-ed conditions); the exact count of passing rows,
which the index knows once the filter's bitmask is built, then confirms the choice.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class Plan:
    mode: str                    # "exact", "approx" (graph) or "partition"
    estimated_selectivity: float  # from the attribute statistics
    estimated_rows: int
    matching_rows: int           # exact count of live rows passing the filter
    live_rows: int
    reason: str
    ef: int = 0                  # graph beam width used (approx mode)
    probes: int = 0              # partitions probed per query (partition mode)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PlannerSettings:
    exact_max_rows: int = 2_000      # at or below this many passing rows, never the graph
    graph_min_rows: int = 20_000     # below this many live rows a graph is never worth it
    # Scanned distance vs graph cost unit (ef * M / s), as a speed ratio. 12 since the walk
    # reads 8-bit codes: 2.4 ns a scanned row and 12-28 ns a unit on 200,000 x 384 and on
    # GoEmotions (43,410 x 384), putting the switch between 10 and 16 % (synthetic: scan 48 vs
    # graph 46 ms at 10 %, 74 vs 39 at 16 %) and between 33 and 67 % (GoEmotions: 35 vs 35,
    # 66 vs 28 ms); 16 before the codes, when a unit cost twice as much.
    exact_speedup: float = 12.0
    ef: int = 32
    M: int = 32
    candidate_cost: float = 1.2  # a (query, row) pair of a partition scan, in graph units

    def ef_for(self, selectivity: float) -> int:
        """Beam width for a filter passing `selectivity` of the rows.

        The beam counts only passing rows, so the walk already visits about ef / selectivity
        nodes: a selective filter needs a smaller ef for the same recall. Measured on 200,000
        clustered 384-d rows (k = 10; recall@10 against the exact answer; M = 32):

        ============  ====================================================
        selectivity   ef: recall
        ============  ====================================================
        100 %         16: 0.896, 24: 0.949, 32: 0.971, 48: 0.985
        50 %          16: 0.961, 18: 0.968, 20: 0.973, 24: 0.981
        24 %          10: 0.972, 12: 0.981, 16: 0.991
        10 %          10: 0.994, 12: 0.996
        ============  ====================================================

        So ef * 1.25 * selectivity (at least 0.375 ef, at most ef) keeps about 0.97 or more at
        every selectivity with the default ef = 32. (With M = 16 the same recall took ef 64
        unfiltered and 40 at 50 %, and the previous rule, 2 * selectivity, spent ef 64 at 50 %
        for 0.989.)
        """
        return max(1, int(round(self.ef * min(1.0, max(0.375, 1.25 * selectivity)))))


def choose(requested: str, estimated_selectivity: float, matching_rows: int, live_rows: int,
           settings: PlannerSettings, partitions=None, k: int = 10) -> Plan:
    """The plan for one filter. `partitions`: the index's Partitions (or None: not built)."""
    est_rows = int(round(estimated_selectivity * live_rows))
    sel = max(matching_rows, 1) / max(live_rows, 1)
    ef = settings.ef_for(sel)
    probes = partitions.probes_for(k, sel) if partitions is not None else 0

    def plan(mode, reason):
        return Plan(mode, float(estimated_selectivity), est_rows, int(matching_rows), int(live_rows), reason,
                    ef if mode == "approx" else 0, probes if mode == "partition" else 0)

    if requested == "exact":
        return plan("exact", "mode='exact' requested")
    if requested == "approx":
        return plan("approx", "mode='approx' requested")
    if requested == "partition":  # (without partitions, probes stay 0: the index builds them first)
        return plan("partition", "mode='partition' requested")
    # Rules that keep the graph out: a small index, or few passing rows (its walk through the
    # rejected rows costs more than scanning them). Partitions, when built, still compete.
    if live_rows < settings.graph_min_rows:
        no_graph = f"{live_rows} live rows < graph_min_rows={settings.graph_min_rows}"
    elif matching_rows <= settings.exact_max_rows:
        source, rows = ("estimated", est_rows) if est_rows <= settings.exact_max_rows else ("counted", matching_rows)
        no_graph = f"{source} {rows} passing rows <= exact_max_rows={settings.exact_max_rows}"
    else:
        no_graph = None
    if no_graph is not None and partitions is None:
        return plan("exact", no_graph)
    costs = {"exact": matching_rows / settings.exact_speedup}
    if no_graph is None:
        costs["approx"] = ef * settings.M / sel * math.sqrt(max(ef, k) / ef)
    if partitions is not None:
        costs["partition"] = (partitions.count / settings.exact_speedup
                              + settings.candidate_cost * probes / partitions.count * matching_rows)
    best = min(costs, key=costs.get)  # ties keep the order above: exact first
    names = {"exact": "scan", "approx": "graph", "partition": f"partition ({probes} probes)"}
    others = ", ".join(f"{names[m]} cost {c:.0f}" for m, c in costs.items() if m != best)
    reason = f"{names[best]} cost {costs[best]:.0f} <= {others} at selectivity {sel:.3f}"
    return plan(best, reason if no_graph is None else f"{reason} (no graph: {no_graph})")
