"""affectkit.eeg (montages, presets, adjacencies, hierarchies) and the affectkit.nn graph modules."""

import doctest
import warnings

import numpy as np
import pytest
import torch

import affectkit.eeg as eeg
import affectkit.eeg.adjacency
import affectkit.eeg.montage
import affectkit.nn.graph
from affectkit.nn import ChebGraphConv, ElectrodeHierarchy, GraphConv, HierarchicalPool
from affectkit.selfcheck import rel_error


def test_docstring_examples_run():
    for module in (affectkit.nn.graph, affectkit.eeg.adjacency, affectkit.eeg.montage):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


# ----------------------------------------------------------------------------------------
# montages and presets
# ----------------------------------------------------------------------------------------


def test_montage_positions_come_from_mne():
    import mne

    m = eeg.standard_montage(["fp1", "CZ", "O2"], "standard_1020")
    name = "colin27_1020" if "colin27_1020" in mne.channels.get_builtin_montages() else "standard_1020"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MNE 1.13 renamed standard_* to colin27_*
        ref = mne.channels.make_standard_montage(name).get_positions()["ch_pos"]
    np.testing.assert_array_equal(m.positions, np.stack([ref["Fp1"], ref["Cz"], ref["O2"]]))
    assert m.channels == ("fp1", "CZ", "O2") and m.index("cz") == 1
    d = m.distances()
    assert d.shape == (3, 3) and np.allclose(d, d.T) and (np.diag(d) == 0).all()


@pytest.mark.parametrize("channels, n", [(eeg.DREAMER_CHANNELS, 14), (eeg.DEAP_CHANNELS, 32), (eeg.SEED_CHANNELS, 62)])
def test_dataset_channels_all_have_positions(channels, n):
    m = eeg.standard_montage(channels)
    assert len(m) == n == len(set(c.upper() for c in channels))
    assert np.isfinite(m.positions).all()
    # Distinct positions, all on a head of roughly 7-12 cm radius.
    assert (m.distances() + np.eye(n)).min() > 0.005
    r = np.linalg.norm(m.positions - m.positions.mean(0), axis=1)
    assert ((r > 0.03) & (r < 0.15)).all()


def test_seed_cerebellar_electrodes_use_documented_aliases():
    m = eeg.standard_montage(["CB1", "CB2", "I1", "O1"])
    np.testing.assert_array_equal(m.positions[0], m.positions[2])
    assert m.positions[0][2] < m.positions[3][2]  # below O1


def test_lobe_and_side_and_region_groups():
    assert eeg.lobe_and_side("F3") == ("frontal", "left")
    assert eeg.lobe_and_side("FCz") == ("central", "midline")
    assert eeg.lobe_and_side("TP8") == ("temporal", "right")
    assert eeg.lobe_and_side("CB1") == ("occipital", "left")
    for channels in (eeg.DEAP_CHANNELS, eeg.SEED_CHANNELS):
        groups = eeg.lobe_hemisphere_groups(channels)
        members = [c for g in groups.values() for c in g]
        assert sorted(members) == sorted(channels)
        for name, chans in groups.items():
            assert all("_".join(eeg.lobe_and_side(c)) == name for c in chans)
    assert len(eeg.lobe_hemisphere_groups(eeg.SEED_CHANNELS)) == 17


@pytest.mark.parametrize("bad, match", [("Q3", "channel: expected a 10-05 name"), ("F", "channel: expected")])
def test_lobe_and_side_rejects_unknown_names(bad, match):
    with pytest.raises(ValueError, match=match):
        eeg.lobe_and_side(bad)


def test_montage_bad_input():
    with pytest.raises(ValueError, match=r"channels: expected names of the standard_1005 montage, got unknown \['XX9'\]"):
        eeg.standard_montage(["Fz", "XX9"])
    with pytest.raises(ValueError, match="channels: expected distinct names"):
        eeg.standard_montage(["Fz", "FZ"])
    with pytest.raises(TypeError, match="channels: expected a sequence"):
        eeg.standard_montage("Fz")
    with pytest.raises(ValueError, match="kind: expected an MNE built-in montage"):
        eeg.standard_montage(["Fz"], "nonsense_montage")


# ----------------------------------------------------------------------------------------
# adjacencies and normalisations
# ----------------------------------------------------------------------------------------


def test_knn_and_distance_adjacency(gen):
    p = torch.randn(20, 3, generator=gen, dtype=torch.float64).numpy()
    A = eeg.knn_adjacency(p, k=3, dtype=torch.float64)
    d = np.linalg.norm(p[:, None] - p[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    for i in range(20):  # each node links to its 3 nearest, and the matrix is symmetric
        assert A[i, np.argsort(d[i])[:3]].eq(1).all()
    assert (A == A.T).all() and (A.diagonal() == 0).all() and (A.sum(1) >= 3).all()
    D = eeg.distance_adjacency(p, threshold=1.0, dtype=torch.float64)
    np.fill_diagonal(d, 0)
    want = torch.as_tensor((d < 1.0).astype(float))
    want.fill_diagonal_(0)
    assert torch.equal(D, want)
    assert eeg.knn_adjacency(p[:1], k=3).shape == (1, 1)


def test_edges_ring_and_groups():
    A = eeg.edge_adjacency(4, [(0, 1), (1, 2)], weights=[0.5, 2.0])
    assert A[0, 1] == A[1, 0] == 0.5 and A[2, 1] == 2.0 and A.sum() == 5.0
    R = eeg.ring_adjacency(4)
    assert R.sum(1).eq(2).all() and R[0, 3] == 1 and R[0, 2] == 0
    G = eeg.group_adjacency([0, 0, 1, 1, 1])
    assert G[0, 1] == 1 and G[0, 2] == 0 and G[2:, 2:].sum() == 6
    with pytest.raises(ValueError, match=r"edges: expected node indices in \[0, 3\], got \(0, 4\)"):
        eeg.edge_adjacency(4, [(0, 4)])
    with pytest.raises(ValueError, match="weights: expected one weight per edge"):
        eeg.edge_adjacency(4, [(0, 1)], weights=[1.0, 2.0])


def test_gcn_normalization_and_laplacians(gen):
    A = eeg.knn_adjacency(torch.randn(9, 3, generator=gen).numpy(), k=2, dtype=torch.float64)
    An = eeg.gcn_normalize(A)
    At = A + torch.eye(9, dtype=torch.float64)
    dinv = At.sum(1).rsqrt()
    assert rel_error(An, dinv[:, None] * At * dinv[None, :]) <= 1e-15
    assert torch.linalg.eigvalsh(An).max() <= 1 + 1e-12
    L = eeg.laplacian(A)
    assert rel_error(L, torch.diag(A.sum(1)) - A) == 0 and L.sum(1).abs().max() < 1e-12
    Lr = eeg.rescaled_laplacian(A)
    ev = torch.linalg.eigvalsh(Lr)
    assert abs(ev.max() - 1) < 1e-10 and ev.min() >= -1 - 1e-10
    Ln = eeg.rescaled_laplacian(A, normalized=True, lambda_max=2.0)
    assert rel_error(Ln, -eeg.gcn_normalize(A, add_self_loops=False)) <= 1e-15
    # A graph without edges: L = 0, lambda_max falls back to 2, T_1 = -I.
    assert torch.equal(eeg.rescaled_laplacian(torch.zeros(3, 3)), -torch.eye(3))
    # Batched and isolated nodes: zero rows, never NaN.
    B = torch.zeros(2, 4, 4)
    B[0, 0, 1] = B[0, 1, 0] = 1
    assert torch.isfinite(eeg.gcn_normalize(B, add_self_loops=False)).all()


def test_learned_adjacency_is_symmetric_and_trainable(gen):
    init = torch.rand(14, 14, generator=gen)
    la = eeg.LearnedAdjacency(init, normalize=False)
    A = la()
    assert torch.equal(A, A.T) and (A >= 0).all()
    la_n = eeg.LearnedAdjacency(init)
    conv = GraphConv(5, 3)
    conv(torch.randn(4, 14, 5, generator=gen), la_n()).sum().backward()
    assert la_n.weight.grad is not None and torch.isfinite(la_n.weight.grad).all()
    assert la_n.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="init: expected a square"):
        eeg.LearnedAdjacency(torch.zeros(3, 4))


# ----------------------------------------------------------------------------------------
# hierarchies
# ----------------------------------------------------------------------------------------


def test_dreamer_preset_is_histn():
    h = ElectrodeHierarchy.from_preset("dreamer")
    assert h.level_sizes == [14, 4, 1] and h.channels == eeg.DREAMER_CHANNELS
    a = h.assignment(0).tolist()
    for r, (name, chans) in enumerate(eeg.HISTN_REGIONS.items()):
        assert h.names[1][r] == name
        assert sorted(c for c, p in zip(h.channels, a) if p == r) == sorted(chans)
    assert torch.equal(h.adjacency(1), eeg.ring_adjacency(4))  # regions on a ring
    A0 = h.adjacency(0)  # electrodes linked within their region only
    assert all((A0[i, j] == 1) == (a[i] == a[j] and i != j) for i in range(14) for j in range(14))
    assert h.assignment(1).tolist() == [0, 0, 0, 0]
    L = h.laplacian(1)
    assert abs(torch.linalg.eigvalsh(L).max() - 1) < 1e-6


@pytest.mark.parametrize("name, sizes", [("deap", [32, 16, 1]), ("seed", [62, 17, 1])])
def test_deap_and_seed_presets(name, sizes):
    h = ElectrodeHierarchy.from_preset(name, k=4)
    assert h.level_sizes == sizes
    for lvl in range(h.num_levels - 1):
        a = h.assignment(lvl)
        assert a.shape == (sizes[lvl],) and int(a.min()) == 0 and torch.bincount(a).min() > 0
    A = h.adjacency(0)
    assert torch.equal(A, A.T) and (A.sum(1) >= 4).all()


def test_user_hierarchy_of_depth_three():
    groups = {"front": {"fl": ["F3", "F7"], "fr": ["F4", "F8"]}, "back": {"bl": ["O1"], "br": ["O2", "P8"]}}
    h = ElectrodeHierarchy(["F3", "F4", "F7", "F8", "O1", "O2", "P8"], groups, region_adjacency="complete")
    assert h.level_sizes == [7, 4, 2, 1]
    assert h.assignment(0).tolist() == [0, 1, 0, 1, 2, 3, 3]
    assert h.assignment(1).tolist() == [0, 0, 1, 1] and h.assignment(2).tolist() == [0, 0]
    assert h.names[2] == ("front", "back")
    assert np.allclose(h.positions[1][0], h.positions[0][[0, 2]].mean(0))
    h2 = ElectrodeHierarchy(["F3", "F4"], {"a": ["F3"], "b": ["F4"]}, global_node=False)
    assert h2.level_sizes == [2, 2]


@pytest.mark.parametrize(
    "channels, groups, match",
    [
        (["F3", "F4"], {"a": ["F3"]}, r"groups: expected exactly the channels, got unknown \[\] and ungrouped \['F4'\]"),
        (["F3"], {"a": ["F3"], "b": ["F3"]}, r"groups: expected every channel in exactly one group, got 'F3' twice"),
        (["F3", "F4"], {"a": ["F3"], "b": {"c": ["F4"]}}, r"groups: expected every group at one level to hold either"),
        (["F3", "F4", "O1"], {"a": {"x": ["F3"]}, "b": {"y": {"z": ["F4", "O1"]}}}, r"groups: expected every branch to have the same depth"),
        (["F3"], {}, r"groups: expected a non-empty mapping"),
        (["F3", "ZZ1"], {"a": ["F3", "ZZ1"]}, r"channels: expected names of the standard_1005 montage"),
    ],
)
def test_bad_hierarchies_raise(channels, groups, match):
    with pytest.raises(ValueError, match=match):
        ElectrodeHierarchy(channels, groups)


def test_hierarchy_level_checks_and_unknown_preset():
    h = ElectrodeHierarchy.from_preset("dreamer")
    with pytest.raises(ValueError, match=r"level: expected an int in \[0, 1\], got 2"):
        h.assignment(2)
    with pytest.raises(ValueError, match=r"name: expected one of \['deap', 'dreamer', 'seed'\]"):
        ElectrodeHierarchy.from_preset("amigos")
    with pytest.raises(ValueError, match="adjacency: expected 'knn'"):
        ElectrodeHierarchy.from_preset("dreamer", region_adjacency="star")
    with pytest.raises(ValueError, match="threshold: expected a distance"):
        ElectrodeHierarchy.from_preset("dreamer", electrode_adjacency="distance")


# ----------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------


def test_graph_conv_module_matches_formula(gen):
    A = eeg.knn_adjacency(eeg.standard_montage(eeg.DREAMER_CHANNELS), k=3, dtype=torch.float64)
    conv = GraphConv(5, 7, activation="elu", normalize=True).double()
    x = torch.randn(3, 4, 14, 5, generator=gen, dtype=torch.float64)
    want = torch.nn.functional.elu(eeg.gcn_normalize(A) @ x @ conv.weight + conv.bias)
    assert rel_error(conv(x, A), want) <= 1e-12
    assert "activation='elu'" in repr(conv)
    with pytest.raises(ValueError, match="activation: expected one of"):
        GraphConv(5, 7, activation="swish")


def test_cheb_module_scalar_and_matrix(gen):
    L = eeg.rescaled_laplacian(eeg.ring_adjacency(4)).double()
    x = torch.randn(6, 4, 3, generator=gen, dtype=torch.float64)
    scalar = ChebGraphConv(3, None, K=3).double()
    with torch.no_grad():
        scalar.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
    want = 0.5 * x + -1.0 * (L @ x) + 2.0 * (2 * L @ (L @ x) - x)
    assert rel_error(scalar(x, L), want) <= 1e-12
    mat = ChebGraphConv(3, 8, K=2).double()
    want = x @ mat.weight[0] + (L @ x) @ mat.weight[1] + mat.bias
    assert rel_error(mat(x, L), want) <= 1e-12
    with pytest.raises(ValueError, match="K: expected at least one Chebyshev term"):
        ChebGraphConv(3, 8, K=0)


def test_hierarchical_pool_module_attention(gen):
    h = ElectrodeHierarchy.from_preset("dreamer")
    pool = HierarchicalPool(h.assignment(0), in_channels=5).double()
    x = torch.randn(2, 14, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    out = pool(x)
    s = x @ pool.attention
    a = h.assignment(0)
    for r in range(4):
        members = (a == r).nonzero().flatten()
        w = torch.softmax(s[:, members], dim=-1)
        assert rel_error(out[:, r], (w[..., None] * x[:, members]).sum(1)) <= 1e-12
    out.sum().backward()
    assert pool.attention.grad is not None
    mean_pool = HierarchicalPool([0, 0, 1])
    assert torch.allclose(mean_pool(torch.tensor([[[1.0], [3.0], [5.0]]])), torch.tensor([[[2.0], [5.0]]]))


def test_histn_style_forward_backward_and_compile(gen):
    """A HiSTN-shaped pass: Chebyshev filters on regions, attention pooling, ring, global."""
    h = ElectrodeHierarchy.from_preset("dreamer")
    cheb0, cheb1 = ChebGraphConv(5, None, K=3), ChebGraphConv(5, None, K=3)
    pool0, pool1 = HierarchicalPool(h.assignment(0), in_channels=5), HierarchicalPool(h.assignment(1))
    L0, L1 = h.laplacian(0), h.laplacian(1)

    def model(x):
        z0 = cheb0(x, L0)
        z1 = cheb1(pool0(z0), L1)
        z2 = pool1(z1)
        return torch.cat([z0.flatten(-2), z1.flatten(-2), z2.flatten(-2)], -1)

    x = torch.randn(16, 14, 5, generator=gen)
    y = model(x)
    assert y.shape == (16, 14 * 5 + 4 * 5 + 5)
    y.square().mean().backward()
    grads = [p.grad for p in (cheb0.weight, cheb1.weight, pool0.attention)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    assert rel_error(compiled(x), model(x)) <= 1e-6
