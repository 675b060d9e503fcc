"""The mma.sync kernel of the CUDA exact filtered k-NN (csrc/knn/exact_knn_mma.cu) against a
float64 reference, and the WMMA kernel it replaces, at awkward sizes.

AFFECTKIT_KNN_MMA and AFFECTKIT_KNN_WGMMA are read once per process, so each setting runs in
one child process that checks every case and prints a JSON report (and the names of the
kernels one call ran); the tests below read those reports. The wgmma settings are the sm_90a
instantiations of the same kernel, the default (2) on compute capability 9.0. Every input
is exact in float16 (small integers; +-1 rows for cosine), so ids and distances must match the
reference exactly, ties included (the smaller id wins).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from _support import requires_cuda

pytestmark = requires_cuda

METRICS = ["ip", "l2", "cosine"]

# (nq, n, d, k, mask, fraction allowed, duplicate period): mask is "none", "shared" (one (n,)
# mask), "few" (a shared mask allowing 3 rows, ~0 %) or "per_query" ((nq, n)); a duplicate
# period p > 0 makes row i a copy of row i % p, so the best rows tie and the smaller id wins.
CASES = [
    (1, 1, 16, 1, "none", 1.0, 0),
    (3, 5, 48, 10, "none", 1.0, 0),  # k > n: padding
    (127, 127, 384, 64, "shared", 0.5, 0),
    (129, 128, 16, 10, "per_query", 0.3, 0),
    (129, 129, 48, 200, "none", 1.0, 0),  # k > n and k > 64
    (1000, 4099, 384, 10, "shared", 0.01, 0),  # ~41 rows allowed: many queries, few rows
    (127, 4099, 48, 64, "shared", 1.0, 23),
    (129, 4099, 16, 10, "shared", 0.0, 0),  # all false
    (127, 4099, 384, 33, "none", 1.0, 0),  # k just over 32 (the list leaves registers)
    (3, 70001, 384, 10, "few", 0.0, 0),  # fewer allowed rows than k
    (1000, 70001, 48, 10, "shared", 0.5, 37),
    (129, 70001, 16, 64, "none", 1.0, 7),
    (1, 70001, 384, 1, "per_query", 0.05, 0),
    (1000, 70001, 384, 10, "shared", 1.0, 0),
    # 2 stages (k's lists leave no room for a third) over several tiles per chunk; one slab per
    # tile (d = 64) at 2 stages; a partial last slab (d = 80): the wgmma schedules' corners.
    (129, 70001, 384, 40, "none", 1.0, 0),
    (129, 70001, 64, 120, "shared", 0.5, 0),
    (129, 70001, 80, 10, "none", 1.0, 0),
]

CHILD = textwrap.dedent(
    """
    import json, math, sys
    import torch
    import affectkit.ops as ops

    def pm1_rows(n, d, nnz, gen):
        pos = torch.rand(n, d, generator=gen).topk(nnz, dim=1).indices
        sign = torch.randint(0, 2, (n, nnz), generator=gen).float() * 2 - 1
        return torch.zeros(n, d).scatter_(1, pos, sign)

    def data(nq, n, d, metric, dup, gen):
        if metric == "cosine":  # unit rows exact in float16: norms 2 (queries) and 4 (rows)
            q, x = pm1_rows(nq, d, 4, gen), pm1_rows(n, d, 16, gen)
        else:
            q = torch.randint(-3, 4, (nq, d), generator=gen).float()
            x = torch.randint(-3, 4, (n, d), generator=gen).float()
        if dup:
            x = x[torch.arange(n) % dup]
        return q, x

    def reference(q, x, mask, k, metric):
        # float64 on the GPU; the stable sort keeps the smaller row first on ties
        q, x = q.double(), x.double()
        if metric == "cosine":
            D = 1 - (q / q.norm(dim=1, keepdim=True)) @ (x / x.norm(dim=1, keepdim=True)).T
        elif metric == "ip":
            D = -(q @ x.T)
        else:
            D = (q * q).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * (q @ x.T)
        if mask is not None:
            D = D.masked_fill(~mask.expand_as(D), math.inf)
        vals, idx = torch.sort(D, dim=1, stable=True)
        m = min(k, D.shape[1])
        want_d = torch.full((D.shape[0], k), math.inf, dtype=torch.float64, device=D.device)
        want_i = torch.full((D.shape[0], k), -1, dtype=torch.int64, device=D.device)
        want_d[:, :m], want_i[:, :m] = vals[:, :m], idx[:, :m]
        want_i[torch.isinf(want_d)] = -1
        return want_d, want_i

    q, x = data(129, 1000, 48, "ip", 0, torch.Generator().manual_seed(5))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.filtered_knn(q.half().cuda(), x.half().cuda(), None, 10, "ip")
    print(json.dumps(sorted({e.name for e in prof.events() if "topk_kernel" in e.name})))

    report = []
    for metric in ("ip", "l2", "cosine"):
        for ci, (nq, n, d, k, kind, frac, dup) in enumerate(json.loads(sys.argv[1])):
            gen = torch.Generator().manual_seed(1000 * ci + len(metric))
            q, x = data(nq, n, d, metric, dup, gen)
            mask = None
            if kind == "shared":
                mask = torch.rand(n, generator=gen) < frac
            elif kind == "few":
                mask = torch.zeros(n, dtype=torch.bool)
                mask[torch.randperm(n, generator=gen)[:3]] = True
            elif kind == "per_query":
                mask = torch.rand(nq, n, generator=gen) < frac
            q, x = q.cuda(), x.cuda()
            mask = None if mask is None else mask.cuda()
            got_d, got_i = ops.filtered_knn(q.half(), x.half(), mask, k, metric)
            want_d, want_i = reference(q, x, mask, k, metric)
            pad = got_i == -1
            problems = []
            if got_d.dtype != torch.float16 or got_d.shape != (nq, k) or got_i.shape != (nq, k):
                problems.append(f"shape/dtype {tuple(got_d.shape)} {got_d.dtype}")
            else:
                if not torch.equal(got_i, want_i):
                    bad = (got_i != want_i).any(1).nonzero()[:3, 0].tolist()
                    problems.append(f"ids differ in queries {bad}")
                if not torch.equal(got_d.double(), want_d.half().double()):
                    problems.append("distances differ")
                if not torch.isinf(got_d[pad]).all():
                    problems.append("padding (-1) without +inf distance")
            report.append({"metric": metric, "case": [nq, n, d, k, kind, frac, dup],
                           "padded": int(pad.sum()), "problems": problems})
    print(json.dumps(report))
    """
)


SETTINGS = {"1": {"AFFECTKIT_KNN_MMA": "1", "AFFECTKIT_KNN_WGMMA": "0"}, "0": {"AFFECTKIT_KNN_MMA": "0"},
            "wgmma": {"AFFECTKIT_KNN_MMA": "1", "AFFECTKIT_KNN_WGMMA": "1"},
            "wgmma2": {"AFFECTKIT_KNN_MMA": "1", "AFFECTKIT_KNN_WGMMA": "2"},
            "wgmma3": {"AFFECTKIT_KNN_MMA": "1", "AFFECTKIT_KNN_WGMMA": "3"},
            "wgmma2_grouped": {"AFFECTKIT_KNN_MMA": "1", "AFFECTKIT_KNN_WGMMA": "2",
                               "AFFECTKIT_KNN_EPILOGUE": "grouped"},
            "wgmma3_grouped": {"AFFECTKIT_KNN_MMA": "1", "AFFECTKIT_KNN_WGMMA": "3",
                               "AFFECTKIT_KNN_EPILOGUE": "grouped"}}


@pytest.fixture(scope="module")
def reports():
    """{setting: (report, names of the top-k kernels one call ran)}, one child process each:
    "1" the mma.sync kernel, "0" the WMMA kernel, "wgmma" the mma kernel's wgmma instantiation,
    "wgmma2" the same keeping one slab's products in flight, "wgmma3" that one warp-specialised
    (a producer warpgroup, mbarriers) with the epilogue's grouped push, each warp's epilogue
    its own; "wgmma2_grouped" and "wgmma3_grouped" those two with the grouped push in the
    epilogue all 8 warps share."""
    out = {}
    for setting, env_vars in SETTINGS.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith("AFFECTKIT_KNN_")}
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES)], capture_output=True,
                              text=True, env={**env, **env_vars}, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        lines = proc.stdout.strip().splitlines()
        out[setting] = json.loads(lines[-1]), json.loads(lines[-2])
    return out


@pytest.mark.parametrize("setting", list(SETTINGS),
                         ids=["mma", "wmma", "wgmma", "wgmma_in_flight", "wgmma_warp_specialised",
                              "wgmma_in_flight_grouped", "wgmma_warp_specialised_grouped"])
@pytest.mark.parametrize("metric", METRICS)
def test_matches_float64_reference(reports, setting, metric):
    rows = [r for r in reports[setting][0] if r["metric"] == metric]
    assert len(rows) == len(CASES)
    failures = [(r["case"], r["problems"]) for r in rows if r["problems"]]
    assert not failures, failures


@pytest.mark.parametrize("setting, expected", [("1", ", false, false, false, 0>"), ("0", "tc_topk_kernel<"),
                                               ("wgmma", ", true, false, false, 0>"),
                                               ("wgmma2", ", true, true, false, 0>"),
                                               ("wgmma3", ", true, true, true, 2>"),
                                               ("wgmma2_grouped", ", true, true, false, 1>"),
                                               ("wgmma3_grouped", ", true, true, true, 1>")])
def test_the_setting_reaches_its_kernel(reports, setting, expected):
    # mma_topk_kernel<METRIC, kWG, kInFlight, kWS, kEpi>: a wgmma run must not fall back to
    # mma.sync unnoticed (an H100/H200 is compute capability 9.0, and the build includes sm_90
    # by default); kEpi 0 plain, 1 grouped, 2 each warp's own.
    names = reports[setting][1]
    assert names and all(expected in n for n in names), names


def _wgmma_possible() -> bool:
    """The wgmma instantiation can run here: compute capability 9.0 and a build with sm_90a."""
    import affectkit._C as C
    import torch

    return (torch.cuda.get_device_capability(0) == (9, 0)
            and "90a-real" in C.build_info()["cuda_architectures"].split(";"))


def test_the_default_is_wgmma_in_flight_where_it_can_run():
    # With no AFFECTKIT_KNN_* variable set, compute capability 9.0 takes the wgmma kernel with
    # products in flight (the fastest on an H100), any other GPU the mma.sync kernel.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFFECTKIT_KNN_")}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES[:2])], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    report, names = json.loads(lines[-1]), json.loads(lines[-2])
    assert not [r["problems"] for r in report if r["problems"]]
    expected = ", true, true, false, 0>" if _wgmma_possible() else ", false, false, false, 0>"
    assert names and all(expected in n for n in names), names


def test_cases_exercise_padding(reports):
    # the cases with fewer allowed rows than k really produce padded outputs
    for setting in SETTINGS:
        padded = {tuple(r["case"][:5]): r["padded"] for r in reports[setting][0] if r["metric"] == "ip"}
        assert padded[(3, 5, 48, 10, "none")] == 3 * 5
        assert padded[(129, 4099, 16, 10, "shared")] == 129 * 10
        assert padded[(3, 70001, 384, 10, "few")] == 3 * 7


@pytest.mark.parametrize("var, value, others", [
    ("AFFECTKIT_KNN_WGMMA", "4", {}),
    ("AFFECTKIT_KNN_EPILOGUE", "fast", {}),
    # a valid name with no kernel for the mode: warp needs mode 3, plain has none in mode 3
    ("AFFECTKIT_KNN_EPILOGUE", "warp", {"AFFECTKIT_KNN_WGMMA": "2"}),
    ("AFFECTKIT_KNN_EPILOGUE", "plain", {"AFFECTKIT_KNN_WGMMA": "3"}),
])
def test_bad_setting_raises_value_error(var, value, others):
    import affectkit._C as C
    import torch

    if "90a-real" not in C.build_info()["cuda_architectures"].split(";") or \
            torch.cuda.get_device_capability(0) != (9, 0):
        pytest.skip(f"{var} is read where the sm_90a code can run (compute capability 9.0)")
    code = ("import torch, affectkit.ops as ops\n"
            "q = torch.ones(4, 64, device='cuda', dtype=torch.float16)\n"
            "try:\n"
            "    ops.filtered_knn(q, q, None, 2, 'ip')\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFFECTKIT_KNN_")}
    proc = subprocess.run([sys.executable, "-c", code], env={**env, **others, var: value},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ValueError:" in proc.stdout and var in proc.stdout, proc.stdout
