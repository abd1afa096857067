"""The mask math of masks.py, each function checked against an independent reference."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import masks

def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()

def brute_force_W(N, edges):
    """W = D^-1/2 A D^-1/2 of the undirected graph on N nodes with these edges, entry by entry."""
    A = torch.zeros(N, N, dtype=torch.float64)
    for i, j in edges:
        A[i, j] = A[j, i] = 1
    d = A.sum(1)
    W = torch.zeros_like(A)
    for i in range(N):
        for j in range(N):
            if A[i, j]:
                W[i, j] = 1 / math.sqrt(d[i] * d[j])
    return W

def grid_edges(h, w, moves=((1, 0), (0, 1))):
    return [(r * w + c, (r + dr) * w + c + dc) for r in range(h) for c in range(w) for dr, dc in moves
            if 0 <= r + dr < h and 0 <= c + dc < w]

def brute_force_grid_W(h, w):
    return brute_force_W(h * w, grid_edges(h, w))

# a graph that is no grid: a ring of 12 nodes with three chords, so degrees 2 and 3 (with its loads' weights
# sqrt(deg u / deg u') != 1), neighbours listed in no particular order
RING_EDGES = [(i, (i + 1) % 12) for i in range(12)] + [(0, 6), (2, 9), (7, 3)]

def graph_of(N, edges):
    """graph = (nbr, deg) from an edge list: each node's neighbours in the order the edges name them, -1 padding."""
    nbrs = [[] for _ in range(N)]
    for i, j in edges:
        nbrs[i].append(j)
        nbrs[j].append(i)
    width = max(len(n) for n in nbrs)
    return torch.tensor([n + [-1] * (width - len(n)) for n in nbrs]), torch.tensor([len(n) for n in nbrs])

GRAPHS = {'grid 3x4': (masks.grid_graph(3, 4), brute_force_grid_W(3, 4)),
          'ring with chords': (graph_of(12, RING_EDGES), brute_force_W(12, RING_EDGES))}

def test_relabelled_graph_is_the_graph_with_its_nodes_renamed():
    """Node perm[i] renamed i: an edge (a, b) of the old graph is the edge (inv[a], inv[b]) of the new one, so
    W' is the brute-force W of the renamed edge list; padding stays last."""
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    inv = torch.argsort(perm).tolist()
    nbr, deg = masks.relabelled(masks.grid_graph(3, 4), perm)
    renamed = [(inv[a], inv[b]) for a, b in grid_edges(3, 4)]
    torch.testing.assert_close(masks.normalized_adjacency((nbr, deg)).double(), brute_force_W(12, renamed))
    assert all((row[:d] >= 0).all() and (row[d:] == -1).all() for row, d in zip(nbr, deg.tolist()))

def softmax_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v, written out."""
    return ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).softmax(-1) @ v

def qkv(B, H, N, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, d, generator=g, dtype=dtype) for _ in range(3)]

def sample_phi(graph, f, n_walks, p_halt, generator, coupling='iid'):
    """One GRF estimate Phi_hat as a dense matrix."""
    layout = masks.grf_walk_layout(graph, [generator], n_walks, p_halt, f.shape[-1] - 1, coupling)
    return masks.csr_to_dense(layout, masks.grf_features(layout, f), graph[0].shape[0])[0]

# --- 1. graphs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w", [(1, 1), (1, 5), (3, 4), (8, 8)])
def test_grid_adjacency_equals_brute_force(h, w):
    W = masks.normalized_adjacency(masks.grid_graph(h, w)).double()
    torch.testing.assert_close(W, brute_force_grid_W(h, w), rtol=0, atol=1e-7)

def test_grid_degrees_are_2_3_4():
    nbr, deg = masks.grid_graph(5, 6)
    deg = deg.view(5, 6)
    assert deg[0, 0] == deg[4, 5] == 2 and deg[0, 3] == deg[2, 0] == 3 and deg[2, 3] == 4

@pytest.mark.parametrize("h,w", [(1, 4), (3, 4), (5, 5)])
def test_grid_with_diagonals_links_the_king_moves(h, w):
    king = [(1, 0), (0, 1), (1, 1), (1, -1)]  # each undirected edge once
    W = masks.normalized_adjacency(masks.grid_graph(h, w, diagonals=True)).double()
    torch.testing.assert_close(W, brute_force_W(h * w, grid_edges(h, w, king)), rtol=0, atol=1e-7)
    deg = masks.grid_graph(5, 6, diagonals=True)[1].view(5, 6)
    assert deg[0, 0] == 3 and deg[0, 3] == 5 and deg[2, 3] == 8

def test_adjacency_of_any_neighbour_table_equals_brute_force():
    (nbr, deg), W = GRAPHS['ring with chords']
    assert nbr.shape == (12, 3) and set(deg.tolist()) == {2, 3}
    torch.testing.assert_close(masks.normalized_adjacency((nbr, deg)).double(), W, rtol=0, atol=1e-7)

def broken(rule):
    """The ring with chords (padded to 4 columns) broken in one way, and the node its first broken row belongs to."""
    (nbr, deg), _ = GRAPHS['ring with chords']
    nbr, deg = torch.cat([nbr, torch.full((12, 1), -1)], 1), deg.clone()
    if rule == 'padding':
        nbr[4] = torch.cat([nbr[4, deg[4]:], nbr[4, :deg[4]]])  # the -1s first
    elif rule == 'deg':
        deg[5] += 1
    elif rule == 'deg too small':
        deg[5] -= 1
    elif rule == 'one direction':  # 0 drops 1 from its row, 1 still lists 0: row 1 breaks the rule
        nbr[0] = torch.tensor([n for n in nbr[0].tolist() if n != 1] + [-1])
        deg[0] -= 1
        return (nbr, deg), 1
    elif rule == 'self loop':
        nbr[2, deg[2]] = 2
        deg[2] += 1
    elif rule == 'out of range':
        nbr[7, 0] = 12
    elif rule == 'listed twice':
        nbr[3, deg[3]] = nbr[3, 0]
        deg[3] += 1
    return (nbr, deg), {'padding': 4, 'deg': 5, 'deg too small': 5, 'self loop': 2, 'out of range': 7, 'listed twice': 3}[rule]

RULES = {'padding': 'padding comes after', 'deg': 'deg is the count', 'deg too small': 'deg is the count',
         'one direction': 'in both rows',
         'self loop': 'no self loop', 'out of range': 'a neighbour is a node', 'listed twice': 'listed once'}

@pytest.mark.parametrize("rule", RULES)
def test_a_graph_that_breaks_a_rule_is_refused_naming_the_rule_and_a_node_before_any_walk(rule):
    """Sampled as it was, such a graph biased the GRF mask without a word (padding first, or a wrong deg)."""
    graph, node = broken(rule)
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    for use in (masks.check_graph, masks.normalized_adjacency, lambda gr: masks.sample_grf_walks(gr, 4, 0.1, 3, g),
                lambda gr: masks.grf_walk_layout(gr, [g], 4, 0.1, 3, 'repelling')):
        with pytest.raises(ValueError) as e:
            use(graph)
        assert RULES[rule] in str(e.value) and f"at node {node}:" in str(e.value), str(e.value)
    assert torch.equal(g.get_state(), before)  # refused before a single random draw

# a star (node 0 linked to 1..5: degrees 5 and 1) and an isolated node 6 (degree 0, a row of padding)
STAR_EDGES = [(0, j) for j in range(1, 6)]
def star_graph():
    nbr, deg = graph_of(6, STAR_EDGES)
    return torch.cat([nbr, torch.full((1, nbr.shape[1]), -1)]), torch.cat([deg, torch.tensor([0])])

@pytest.mark.parametrize("coupling", ['iid', 'repelling'])
def test_an_isolated_node_and_a_star_through_topo_and_grf_dense_and_fast_are_finite_and_unbiased(coupling):
    """W of the star has 1/sqrt(5) on its edges and a zero row and column for the isolated node, whose walks halt
    where they start: its Phi row is f_0 e_6 exactly, and every GRF estimate is finite and unbiased."""
    graph, W, K, T = star_graph(), brute_force_W(7, STAR_EDGES), 4, 600
    torch.testing.assert_close(masks.normalized_adjacency(graph).double(), W, rtol=0, atol=1e-7)
    f = 0.7 ** torch.arange(K + 1.0, dtype=torch.float64)
    Wp = masks.matrix_powers(W, 2 * K)
    Phi, M = masks.power_series(Wp, f), masks.topo_mask(Wp, f)
    assert Phi[6].tolist() == [0.0] * 6 + [1.0] and torch.isfinite(M).all()
    g = torch.Generator().manual_seed(4)
    S = torch.stack([sample_phi(graph, f, 4, 0.2, g, coupling) for _ in range(T)])
    assert torch.isfinite(S).all() and torch.equal(S[:, 6], Phi[6].expand(T, 7))
    z = (S.mean(0) - Phi).abs() / (S.std(0) / math.sqrt(T) + 1e-12)
    assert z.max() < 5, f"Phi_hat biased: max z {z.max():.2f}"
    H = 2  # the fast path equals the dense one, outputs and gradients finite
    layout = masks.grf_walk_layout(graph, [torch.Generator().manual_seed(j) for j in range(H)], 4, 0.2, K, coupling)
    fh = (0.6 ** torch.arange(K + 1.0)).repeat(H, 1).requires_grad_()
    q, k, v = [x.requires_grad_() for x in qkv(2, H, 7, 4, seed=3)]
    fast = grads(lambda q, k, v, f: masks.grf_linear_attention(q, k, v, layout, masks.grf_features(layout, f.flatten())),
                 [q, k, v, fh])
    def dense_fn(q, k, v, f):
        P = masks.csr_to_dense(layout, masks.grf_features(layout, f.flatten()), 7)
        return masks.masked_linear_attention(q, k, v, P @ P.transpose(-2, -1))
    dense = grads(dense_fn, [q, k, v, fh])
    for a, b in zip(fast, dense):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-4
    out = masks.masked_linear_attention(q, k, v, M.float())  # topo: finite
    assert torch.isfinite(out).all()

# --- 2. linear and softmax attention -----------------------------------------------------------

def test_plain_linear_equals_all_ones_mask():
    q, k, v = qkv(2, 3, 20, 8)
    dense = masks.masked_linear_attention(q, k, v, torch.ones(20, 20))
    assert rel_err(masks.plain_linear_attention(q, k, v), dense) < 1e-5

def test_linear_attention_equals_a_loop_over_tokens():
    q, k, v = qkv(1, 1, 6, 4, seed=3)
    M = torch.rand(6, 6)
    out = masks.masked_linear_attention(q, k, v, M)[0, 0]
    fq, fk = q[0, 0].relu(), k[0, 0].relu()
    for i in range(6):
        s = [M[i, j] * (fq[i] @ fk[j]) for j in range(6)]
        ref = sum(sj * v[0, 0, j] for j, sj in enumerate(s)) / (sum(s) + masks.EPS)
        assert rel_err(out[i], ref) < 1e-5

def plain_masked(q, k, v, M):
    a = (q.relu().float() @ k.relu().float().transpose(-2, -1)) * M.float()
    return (a @ v.float()) / (a.sum(-1, keepdim=True) + masks.EPS)

@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("mask_shape", [(7, 7), (3, 7, 7), (2, 3, 7, 7)])
def test_masked_linear_backward_equals_autograd_of_the_plain_formula(mask_shape, recompute):
    q, k, v = [x.requires_grad_() for x in qkv(2, 3, 7, 4, seed=11)]
    M = torch.rand(mask_shape, generator=torch.Generator().manual_seed(4)).requires_grad_()
    fast = grads(lambda *t: masks.masked_linear_attention(*t, recompute=recompute), [q, k, v, M])
    ref = grads(plain_masked, [q, k, v, M])
    for a, b in zip(fast, ref):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5

def test_masked_linear_keeps_its_input_dtypes_and_only_small_tensors_for_backward():
    q, k, v = [x.bfloat16().requires_grad_() for x in qkv(2, 3, 16, 4, seed=12)]
    M = torch.rand(3, 16, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = masks.masked_linear_attention(q, k, v, M)
    assert out.dtype == torch.float32 and max(t.numel() for t in saved) <= 3 * 16 * 16  # no [B, H, N, N] tensor
    got = grads(masks.masked_linear_attention, [q, k, v, M])
    assert got[1].dtype == torch.bfloat16 and got[4].dtype == torch.float32
    ref = grads(plain_masked, [x.detach().float().requires_grad_() for x in (q, k, v)] + [M.detach().requires_grad_()])
    assert rel_err(got[1].float(), ref[1]) < 1e-2 and rel_err(got[4], ref[4]) < 1e-5

def test_sdpa_softmax_equals_handwritten():
    q, k, v = qkv(2, 3, 17, 8)
    assert rel_err(F.scaled_dot_product_attention(q, k, v), softmax_attention(q, k, v)) < 1e-5

# --- 3. the exact topological mask -------------------------------------------------------------

@pytest.mark.parametrize("graph", GRAPHS)
def test_topo_features_equal_loop_of_matrix_powers_and_mask_is_f_self_convolution(graph):
    """On the grid and on a graph that is no grid: Phi = sum_k f_k W^k and M = Phi Phi^T = sum_m alpha_m W^m."""
    W, K = GRAPHS[graph][1], 6
    f = torch.rand(K + 1, dtype=torch.float64)
    Phi_ref, Wk = torch.zeros_like(W), torch.eye(W.shape[0], dtype=torch.float64)
    for k in range(K + 1):
        Phi_ref += f[k] * Wk
        Wk = Wk @ W
    Wp = masks.matrix_powers(W, 2 * K)
    Phi = masks.power_series(Wp, f)
    torch.testing.assert_close(Phi, Phi_ref)
    M = masks.topo_mask(Wp, f)
    torch.testing.assert_close(M, Phi_ref @ Phi_ref.T)
    torch.testing.assert_close(M, M.T)
    assert (M >= 0).all()
    alpha = [sum(f[a] * f[m - a] for a in range(K + 1) if 0 <= m - a <= K) for m in range(2 * K + 1)]
    torch.testing.assert_close(M, sum(a * torch.linalg.matrix_power(W, m) for m, a in enumerate(alpha)))

def test_self_convolution_equals_a_double_loop_and_deconvolution_inverts_it():
    # f_0 away from 0: deconvolution divides by 2 f_0, which amplifies rounding as f_0 -> 0
    f = 0.5 + torch.rand(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = torch.zeros(3, 13, dtype=torch.float64)
    for k in range(7):
        for l in range(7):
            ref[:, k + l] += f[:, k] * f[:, l]
    torch.testing.assert_close(masks.self_convolution(f), ref)
    torch.testing.assert_close(masks.deconvolution(ref[:, :7]), f)

# --- 4. graph random features are unbiased -----------------------------------------------------

@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("coupling", masks.COUPLINGS)
@pytest.mark.parametrize("p_halt", [0.1, 0.5])
def test_grf_is_unbiased_for_the_exact_mask(p_halt, coupling, graph):
    """Mean of T independent estimates vs Phi_G and M (off-diagonal), within 5 standard errors of the
    mean, the standard error estimated from the same T samples (so it shrinks like 1/sqrt(T n)).
    For repelling walks this fails if the shared offset U is fixed (walkers then favour low neighbour slots).
    On the ring with chords, whose degrees differ, it fails if a hop's load weight is not W[u,u'] deg(u)."""
    (nbr, deg), W = GRAPHS[graph]
    K, n, T = 4, 8, 800
    f = 0.7 ** torch.arange(K + 1.0, dtype=torch.float64)
    Phi = masks.power_series(masks.matrix_powers(W, K), f)
    g = torch.Generator().manual_seed(1)
    S = torch.stack([sample_phi((nbr, deg), f, n, p_halt, g, coupling) for _ in range(T)])
    se = S.std(0) / math.sqrt(T)
    z = (S.mean(0) - Phi).abs() / (se + 1e-12)
    assert z.max() < 5, f"Phi_hat biased: max z {z.max():.2f}"
    assert (S.mean(0) - Phi).abs().max() < 0.05 * Phi.abs().max()
    Mh = S @ S.transpose(1, 2)
    off = ~torch.eye(W.shape[0], dtype=torch.bool)
    zM = ((Mh.mean(0) - Phi @ Phi.T).abs() / (Mh.std(0) / math.sqrt(T) + 1e-12))[off]
    assert zM.max() < 5, f"off-diagonal M_hat biased: max z {zM.max():.2f}"
    # the diagonal shares its walks on both sides, so it is biased upward: the test can see bias
    assert (Mh.mean(0).diagonal() - (Phi @ Phi.T).diagonal()).min() > 0

def test_grf_error_shrinks_like_one_over_sqrt_walks():
    h, w, K = 3, 4, 4
    f = 0.7 ** torch.arange(K + 1.0, dtype=torch.float64)
    Phi = masks.power_series(masks.matrix_powers(brute_force_grid_W(h, w), K), f)
    g = torch.Generator().manual_seed(2)
    mse = {n: torch.stack([(sample_phi(masks.grid_graph(h, w), f, n, 0.2, g) - Phi).square().sum() for _ in range(200)]).mean()
           for n in (4, 64)}
    assert 8 < mse[4] / mse[64] < 32  # 16x more walks -> 16x smaller mean squared error

def test_grf_walk_records_match_a_python_walk_loop():
    """The vectorised sampler and a walk-by-walk loop agree on the support and the load rule."""
    h, w, K, p = 2, 3, 3, 0.25
    W = brute_force_grid_W(h, w)
    step, start, node, load = masks.sample_grf_walks(masks.grid_graph(h, w), 50, p, K, torch.Generator().manual_seed(0))
    deg = (W > 0).sum(1).double()
    # every load recorded at (t, i, u) is (1/n) * a sum of products W[u,u'] deg(u) / (1-p) along walks of t hops
    assert step.max() <= K and (step[start == node].min() == 0)
    assert torch.allclose(load[step == 0], torch.ones(6) * 1.0)  # all 50 walks record step 0 at home
    one_hop = (step == 1)
    per_walk = W[start[one_hop], node[one_hop]] * deg[start[one_hop]] / (1 - p)
    counts = load[one_hop] * 50 / per_walk.float()
    assert torch.allclose(counts, counts.round(), atol=1e-4) and counts.sum() <= 6 * 50

def test_grf_record_count_is_linear_in_nodes_walks_and_length():
    h = w = 128
    N, n, K = h * w, 20, 10
    layout = masks.grf_walk_layout(masks.grid_graph(h, w), [torch.Generator().manual_seed(0)], n, 0.1, K, 'iid')
    records, crow, col = layout['load'].numel(), layout['crow'], layout['col']
    assert records <= N * n * (K + 1)
    R = int(crow.diff().max())  # the most non-zeros in a row of Phi_hat: bounded, independent of N
    assert crow.shape[0] == N + 1 and col.shape[0] <= records and R <= n * (K + 1)
    held = sum(t.numel() * t.element_size() for t in layout.values())
    print(f"\n128x128 grid, 20 walks, K 10: {records:,} records, {col.shape[0]:,} non-zeros, R = {R}, {held / 2**20:.1f} MiB")

def mask_error(h, w, f, n_walks, p_halt, coupling, ensembles, seed=0):
    """Mean ||M_hat - M|| / ||M|| over independent walk ensembles, M = Phi Phi^T from matrix powers."""
    Phi = masks.power_series(masks.matrix_powers(brute_force_grid_W(h, w), f.shape[-1] - 1), f)
    M = Phi @ Phi.T
    g = torch.Generator().manual_seed(seed)
    errs = []
    for _ in range(ensembles):
        P = sample_phi(masks.grid_graph(h, w), f, n_walks, p_halt, g, coupling)
        errs.append(rel_err(P @ P.T, M))
    return sum(errs) / len(errs)

def test_repelling_walks_shrink_the_mask_error():
    """14x14 grid, 20 walks, p_halt 0.1, K 10, f = 0.5^k: repelling walks at most 0.6x the i.i.d. error (results/README.md,
    grf-walks-10ep: the estimate's error). Fails if the walkers of a group each draw their own offset (no stratification)."""
    f = 0.5 ** torch.arange(11.0, dtype=torch.float64)
    err = {c: mask_error(14, 14, f, 20, 0.1, c, ensembles=20) for c in masks.COUPLINGS}
    assert err['repelling'] <= 0.6 * err['iid'] and err['repelling_antithetic'] <= 0.6 * err['iid'], err
    assert abs(err['antithetic'] - err['iid']) < 0.15 * err['iid'], err  # little gain at p_halt 0.1

def walkers_per_first_hop(h, w, n, p_halt, coupling, seed=0):
    """[N, N] count of the walks of each start node that took their first hop to each node (from the records:
    every walk recorded at step 1 carries the load W[i,u] deg(i) / (1 - p_halt))."""
    N = h * w
    step, start, node, load = masks.sample_grf_walks(masks.grid_graph(h, w), n, p_halt, 1, torch.Generator().manual_seed(seed), coupling)
    W = brute_force_grid_W(h, w)
    deg = (W > 0).sum(1).double()
    hop = step == 1
    counts = torch.zeros(N, N, dtype=torch.float64)
    counts[start[hop], node[hop]] = load[hop].double() * n / (W[start[hop], node[hop]] * deg[start[hop]] / (1 - p_halt))
    return counts.round(), W > 0

@pytest.mark.parametrize("n", [3, 4, 10])
def test_repelling_walkers_spread_evenly_over_the_neighbours(n):
    """The walkers that leave a node together take floor(k/d) or ceil(k/d) of each of its d neighbours;
    i.i.d. walkers do not (so the test can fail)."""
    for coupling, even in (('repelling', True), ('iid', False)):
        counts, adj = walkers_per_first_hop(5, 6, n, 1e-9, coupling)
        big = counts.masked_fill(~adj, -1).max(1).values
        small = counts.masked_fill(~adj, 1e9).min(1).values
        assert ((big - small).max() <= 1) == even, coupling
        assert torch.equal(counts.sum(1), torch.full((30,), float(n)))

def test_antithetic_pairs_halt_in_opposition():
    """At p_halt 1/2 the halting draws u and (u + 1/2) mod 1 halt exactly one walker of each pair."""
    counts, _ = walkers_per_first_hop(4, 5, 10, 0.5, 'antithetic')
    assert torch.equal(counts.sum(1), torch.full((20,), 5.0))
    iid, _ = walkers_per_first_hop(4, 5, 10, 0.5, 'iid')
    assert not torch.equal(iid.sum(1), torch.full((20,), 5.0))

def test_bad_coupling_or_odd_antithetic_walks_raise():
    with pytest.raises(ValueError, match="coupling='lazy'.*iid, antithetic, repelling, repelling_antithetic"):
        masks.sample_grf_walks(masks.grid_graph(3, 3), 4, 0.1, 3, coupling='lazy')
    with pytest.raises(ValueError, match="n_walks=5.*even"):
        masks.sample_grf_walks(masks.grid_graph(3, 3), 5, 0.1, 3, coupling='repelling_antithetic')

@pytest.mark.parametrize("graph", [masks.grid_graph(2, 3), GRAPHS['ring with chords'][0]])
def test_iid_walks_are_those_of_a_fixed_seed(graph):
    """The i.i.d. sampler draws as it always did, so checkpoints' walks and seeds keep their meaning:
    a loop over walkers with the same draws gives the same records, on the grid and on any neighbour table."""
    n, p, K = 4, 0.3, 3
    nbr, deg = graph
    got = masks.sample_grf_walks(graph, n, p, K, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    walkers = [[i, i, 1.0] for i in range(nbr.shape[0]) for _ in range(n)]  # start, node, load
    recs = {}
    for t in range(K + 1):
        for s, u, l in walkers:
            recs[(t, s, u)] = recs.get((t, s, u), 0.0) + l / n
        if t == K:
            break
        go = torch.rand(len(walkers), generator=g, dtype=torch.float64) >= p
        walkers = [wk for wk, keep in zip(walkers, go) if keep]
        picks = torch.rand(len(walkers), generator=g, dtype=torch.float64)
        for wk, r in zip(walkers, picks):
            d = int(deg[wk[1]])
            nxt = int(nbr[wk[1], min(int(r * d), d - 1)])
            wk[2] *= math.sqrt(d / int(deg[nxt])) / (1 - p)
            wk[1] = nxt
    want = sorted(recs)
    assert [tuple(x) for x in torch.stack(got[:3], 1).tolist()] == want
    torch.testing.assert_close(got[3].double(), torch.tensor([recs[k] for k in want], dtype=torch.float64), rtol=1e-6, atol=0)

# --- 5. the fast paths equal their dense references --------------------------------------------

def grads(fn, inputs):
    out = fn(*inputs)
    g = torch.Generator().manual_seed(9)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    res = [out.detach()] + [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    return res

@pytest.mark.parametrize("h,w", [(4, 4), (3, 5)])
def test_fft_toeplitz_equals_dense_toeplitz(h, w):
    q, k, v = [x.requires_grad_() for x in qkv(2, 3, h * w, 5)]
    table = (torch.rand(3, 2 * h - 1, 2 * w - 1) + 0.1).requires_grad_()
    fast = grads(lambda q, k, v, t: masks.toeplitz_linear_attention_fft(q, k, v, t, h, w), [q, k, v, table])
    dense = grads(lambda q, k, v, t: masks.masked_linear_attention(q, k, v, masks.toeplitz_mask(t, masks.toeplitz_index(h, w))),
                  [q, k, v, table])
    for a, b in zip(fast, dense):
        assert rel_err(a, b) < 1e-4

def test_toeplitz_mask_equals_offset_loop():
    h, w = 3, 4
    t = torch.rand(2 * h - 1, 2 * w - 1)
    M = masks.toeplitz_mask(t, masks.toeplitz_index(h, w))
    for i in range(h * w):
        for j in range(h * w):
            assert M[i, j] == t[i // w - j // w + h - 1, i % w - j % w + w - 1]

@pytest.mark.parametrize("coupling", ["iid", "repelling"])
def test_walk_layout_of_all_heads_holds_each_heads_own_walks(coupling):
    """grf_walk_layout lays the heads out as one block-diagonal graph in CSR; its Phi_hat per head must equal the dense
    sum of f[step] * load over the records that head's own generator samples, its rows must list exactly their
    non-zero columns in ascending order, nothing may fall outside the heads' diagonal blocks, and its transposed CSR
    (crow_t, col_t, values in perm's order) must be the dense transpose."""
    graph, H, K, seed = masks.grid_graph(3, 5), 3, 4, 7
    N = 15
    f = torch.rand(H, K + 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + j) for j in range(H)]
    layout = masks.grf_walk_layout(graph, generators, n_walks=6, p_halt=0.2, max_len=K, coupling=coupling)
    crow, col = layout['crow'], layout['col']
    vals = masks.grf_features(layout, f.flatten())
    assert crow.shape == (H * N + 1,) and crow[-1] == col.shape[0] == vals.shape[0]
    P = masks.csr_to_dense(layout, vals, N)
    for j in range(H):
        g = torch.Generator().manual_seed(seed * 1_000_003 + j)
        step, start, node, load = masks.sample_grf_walks(graph, 6, 0.2, K, generator=g, coupling=coupling)
        expected = torch.zeros(N, N, dtype=torch.float64)
        for t, a, b, l in zip(step.tolist(), start.tolist(), node.tolist(), load.double().tolist()):
            expected[a, b] += f[j, t] * l
        torch.testing.assert_close(P[j], expected)
        for i in range(N):  # the row's distinct nodes, ascending, as columns of the block-diagonal matrix
            row = col[crow[j * N + i]:crow[j * N + i + 1]].tolist()
            assert row == [j * N + u for u in expected[i].nonzero().flatten().tolist()]
            assert layout['rows'][crow[j * N + i]:crow[j * N + i + 1]].tolist() == [j * N + i] * len(row)
    PT = torch.sparse_csr_tensor(layout['crow_t'], layout['col_t'], vals[layout['perm']], (H * N, H * N),
                                 check_invariants=True).to_dense()
    assert torch.equal(PT, torch.block_diag(*P).T)

GRAPHS_FOR_FAST = {'grid 4x4': masks.grid_graph(4, 4), 'grid 3x5': masks.grid_graph(3, 5),
                   'grid 4x4 with diagonals': masks.grid_graph(4, 4, diagonals=True),
                   'ring with chords': GRAPHS['ring with chords'][0]}

@pytest.mark.parametrize("chunks", ['all key channels', 'two by two', 'one by one'])
@pytest.mark.parametrize("graph", GRAPHS_FOR_FAST)
def test_grf_fast_equals_dense_grf_mask(graph, chunks, monkeypatch):
    """The sparse products run a chunk of key channels at a time (masks._chunks): any chunking is the same."""
    graph = GRAPHS_FOR_FAST[graph]
    N, H, K = graph[0].shape[0], 2, 5
    size = {'all key channels': 2 ** 24, 'two by two': H * N * 2 * 2 * 5, 'one by one': 1}[chunks]  # HN x B x c x dv
    monkeypatch.setattr(masks, '_chunks', functools.partial(masks._chunks, size=size))
    f = (0.6 ** torch.arange(K + 1.0)).repeat(H, 1).mul(torch.rand(H, K + 1) + 0.5).requires_grad_()
    generators = [torch.Generator().manual_seed(j) for j in range(H)]
    layout = masks.grf_walk_layout(graph, generators, n_walks=6, p_halt=0.2, max_len=K, coupling='iid')
    q, k, v = [x.requires_grad_() for x in qkv(2, H, N, 4, seed=5)]
    fast = grads(lambda q, k, v, f: masks.grf_linear_attention(q, k, v, layout, masks.grf_features(layout, f.flatten())),
                 [q, k, v, f])

    def dense_fn(q, k, v, f):
        P = masks.csr_to_dense(layout, masks.grf_features(layout, f.flatten()), N)
        return masks.masked_linear_attention(q, k, v, P @ P.transpose(-2, -1))
    dense = grads(dense_fn, [q, k, v, f])
    for a, b in zip(fast, dense):
        assert rel_err(a, b) < 1e-4

def test_grf_custom_operators_pass_opcheck_on_inputs_of_any_strides():
    """torch.library.opcheck compares the fake kernels (what torch.compile plans with) with the real ones, strides
    included: inductor asserts them at run time, and may hand the operators [H N, B, d] inputs batch-major."""
    H, N, B, d = 2, 16, 3, 4
    generators = [torch.Generator().manual_seed(j) for j in range(H)]
    layout = masks.grf_walk_layout(masks.grid_graph(4, 4), generators, n_walks=4, p_halt=0.2, max_len=4, coupling='iid')
    vals = torch.rand(layout['col'].shape[0])
    structure = (vals[layout['perm']], *(layout[name] for name in ('crow', 'col', 'crow_t', 'col_t')))
    for layout_of in (lambda c: torch.rand(H * N, B, c), lambda c: torch.rand(B, H * N, c).transpose(0, 1)):
        q, k, v, gy = layout_of(d), layout_of(d), layout_of(d + 1), layout_of(d + 1)
        torch.library.opcheck(torch.ops.topomask.grf_mix.default, (q, k, v, vals, *structure))
        torch.library.opcheck(torch.ops.topomask.grf_mix_backward.default, (gy, q, k, v, vals, *structure))

def test_grf_fast_path_never_allocates_an_n_by_n_tensor():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:  # a sparse N x N holds nnz values
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    h = w = 32
    N, d = h * w, 4
    layout = masks.grf_walk_layout(masks.grid_graph(h, w), [torch.Generator().manual_seed(0)], 4, 0.3, 4, 'iid')
    f = torch.ones(5, requires_grad=True)
    q, k, v = [x.requires_grad_() for x in qkv(1, 1, N, d)]
    with Largest():
        vals = masks.grf_features(layout, f)
        masks.grf_linear_attention(q, k, v, layout, vals).sum().backward()
    assert Largest.biggest < N * N / 8, Largest.biggest

def test_self_convolution_is_a_handful_of_ops_whatever_k():
    """No Python loop over the K + 1 coefficients (torch.compile would unroll one into hundreds of ops)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    f = torch.rand(12, 101)
    with Count():
        alpha = masks.self_convolution(f)
    assert alpha.shape == (12, 201) and Count.ops <= 12, Count.ops
