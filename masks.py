"""The math of the attention masks, as small pure functions on tensors.

Tokens are the N nodes of a graph: the h x w grid of patches, node i = row*w + col (row-major), N = h*w, in the paper
with 4-neighbour links. q, k, v are [..., N, d]; phi(x) = relu(x) is the linear-attention feature map.
Every linear form runs in float32 (autocast disabled) and adds EPS to its denominator.
Reference: Reid et al., "Linear Transformer Topological Masking with Graph Random Features", ICLR 2025.
"""
import warnings
import torch
import torch.nn.functional as F

EPS = 1e-6
warnings.filterwarnings('ignore', message='Sparse (CSR tensor support is in beta|invariant checks are implicitly)')  # GRF's CSR

# -----------------------------------------------------------------------------
# graphs, graph = (nbr, deg): neighbour table [N, max_deg] and degrees [N] (the rules: check_graph); the exact mask

def grid_graph(h, w, diagonals=False):
    """The h x w grid, node (r, c) linked to (r +- 1, c), (r, c +- 1) and, with diagonals, (r +- 1, c +- 1) (king moves),
    where those are on the grid (no wrap): nbr [N, 4 or 8] (rows descending, so -1 padding last), deg [N]. O(N)."""
    r, c = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    moves = [(-1, 0), (1, 0), (0, -1), (0, 1)] + [(-1, -1), (-1, 1), (1, -1), (1, 1)] * diagonals
    nbr = torch.stack([torch.where((r + dr >= 0) & (r + dr < h) & (c + dc >= 0) & (c + dc < w), (r + dr) * w + c + dc, -1)
                       for dr, dc in moves], dim=1).sort(dim=1, descending=True).values
    return nbr, (nbr >= 0).sum(1)

def relabelled(graph, perm):
    """The same graph with node perm[i] renamed i: nbr'[i] = inv[nbr[perm[i]]], deg'[i] = deg[perm[i]] (padding stays
    last), so its W' = P W P^T and every mask M' = P M P^T, M'_ij = M_perm[i],perm[j]. O(N max_deg)."""
    (nbr, deg), inv = graph, torch.argsort(perm)
    return torch.where(nbr[perm] >= 0, inv[nbr[perm].clamp(min=0)], -1), deg[perm]

def check_graph(graph):
    """graph, or a ValueError naming the rule it breaks and a node: row i of nbr lists deg_i neighbours, then -1 padding;
    each neighbour in 0 .. N-1, once, not i itself, and with i in its own row. O(N width^2 + E log E)."""
    (nbr, deg), N = graph, graph[0].shape[0]
    node = torch.arange(N)[:, None].expand_as(nbr)
    real, key = nbr >= 0, node * N + nbr
    rules = {'a neighbour is a node, 0 .. N-1 (or -1: padding)': ((nbr < -1) | (nbr >= N)).any(1),
             'deg is the count of neighbours (entries >= 0)': real.sum(1) != deg,
             'the -1 padding comes after the neighbours': (real.int().diff(dim=1) > 0).any(1),
             'no self loop': (nbr == node).any(1),
             'each neighbour listed once': (real & (key[:, :, None] == key[:, None, :]).sum(-1).gt(1)).any(1),
             "every edge i-j listed in both rows, i's and j's": (real & ~torch.isin(nbr * N + node, key[real])).any(1)}
    for rule, broken in rules.items():
        if broken.any():
            i = int(broken.nonzero()[0])
            raise ValueError(f"graph breaks the rule '{rule}' at node {i}: neighbours {nbr[i].tolist()}, deg {int(deg[i])}")
    return graph

def normalized_adjacency(graph):
    """W = D^-1/2 A D^-1/2 of graph = (nbr, deg), dense N x N: W_ij = 1 / sqrt(deg_i deg_j) if i ~ j, else 0. O(N^2)."""
    nbr, deg = check_graph(graph)
    A = torch.zeros(nbr.shape[0], nbr.shape[0] + 1).scatter_(1, nbr + 1, 1.0)[:, 1:]  # padding -1 lands in column 0, dropped
    s = deg.float().clamp(min=1).rsqrt()
    return s[:, None] * A * s[None, :]

def matrix_powers(W, n):
    """[W^0, W^1, ..., W^n] stacked, [n+1, N, N], as W^(k+1) = W W^k with W sparse: O(n N nnz(W)) once (O(n N^2) at
    bounded degree, instead of O(n N^3) dense); memory (n+1) N^2."""
    P = torch.eye(W.shape[0], dtype=W.dtype, device=W.device).repeat(n + 1, 1, 1)  # P[0] = I; the others overwritten
    Ws = W.to_sparse_csr()
    for k in range(n):
        P[k + 1] = Ws @ P[k]
    return P

def power_series(W_powers, coeffs):
    """sum_k c_k W^k for coeffs [..., K+1] -> [..., N, N] (W_powers[:K+1]), O(K N^2): with c = alpha the paper's M_alpha(G),
    with c = f the features Phi_G."""
    return torch.einsum('...k,kij->...ij', coeffs, W_powers[:coeffs.shape[-1]])

def self_convolution(f):
    """alpha = f * f over the last dim, alpha_m = sum_{k+l=m} f_k f_l [..., 2K+1]: an outer product scattered onto the
    anti-diagonals k + l = m (no loop over k)."""
    k = torch.arange(f.shape[-1], device=f.device)
    outer = (f[..., :, None] * f[..., None, :]).flatten(-2)
    alpha = torch.zeros(*f.shape[:-1], 2 * len(k) - 1, dtype=f.dtype, device=f.device)
    return alpha.index_add(-1, (k[:, None] + k).flatten(), outer)

def deconvolution(alpha):
    """The f with (f * f)_m = alpha_m for m = 0 .. K (alpha [..., K+1]): f_0 = sqrt(alpha_0), f_k = (alpha_k -
    sum_{p=1}^{k-1} f_p f_{k-p}) / (2 f_0). f may come out negative; (f * f)_m for m > K is whatever it is. O(K^2)."""
    f = [alpha[..., 0].sqrt()]
    for k in range(1, alpha.shape[-1]):
        f.append((alpha[..., k] - sum(f[p] * f[k - p] for p in range(1, k))) / (2 * f[0]))
    return torch.stack(f, -1)

def topo_mask(W_powers, f):
    """M = Phi_G Phi_G^T = sum_m alpha_m W^m with alpha = f * f (W symmetric, so its powers commute); W_powers up to 2K.
    O(K N^2) per call instead of the O(N^3) product."""
    return power_series(W_powers, self_convolution(f))

# -----------------------------------------------------------------------------
# graph random features

COUPLINGS = ('iid', 'antithetic', 'repelling', 'repelling_antithetic')

def _halts(slot, N, n_walks, p_halt, antithetic, generator):
    """Which of the alive walkers halt at this step. i.i.d.: one U(0,1) draw each, halting below p_halt.
    Antithetic: walker j < n/2 of a start node draws u, its partner j + n/2 uses (u + 1/2) mod 1."""
    if not antithetic:
        return torch.rand(slot.shape[0], generator=generator, dtype=torch.float64) < p_halt
    u = torch.rand(N, n_walks // 2, generator=generator, dtype=torch.float64)
    return torch.cat([u, (u + 0.5) % 1], 1).flatten()[slot] < p_halt  # [N, n]: walker j of start node i draws u[i, j]

def _repelling_picks(start, node, d, N, generator):
    """Neighbour slots for walkers sent out together: the k walkers of one start node standing on one node of
    degree d share one U ~ U(0,1); the j-th of them takes slot floor(((j/k + U) mod 1) d), so while k <= d no
    two take the same neighbour. Each walker's slot is still uniform. O(M log M) for M walkers (one sort)."""
    key, order = torch.sort(start * N + node, stable=True)
    _, group, count = torch.unique_consecutive(key, return_inverse=True, return_counts=True)
    j = torch.arange(key.shape[0]) - (torch.cumsum(count, 0) - count)[group]  # rank in its group
    U = torch.rand(count.shape[0], generator=generator, dtype=torch.float64)
    frac = (j.double() / count[group] + U[group]) % 1
    return torch.empty_like(node).index_put_((order,), (frac * d[order]).long().clamp(max=d[order] - 1))

def sample_grf_walks(graph, n_walks, p_halt, max_len, generator=None, coupling='iid'):
    """n_walks random walks from every node of graph = (nbr, deg), vectorised over all N*n walks. A walk starts at its
    node with load 1; at step t at node u it records (t, start, u, load), then halts with probability p_halt (or at
    t = max_len), else hops to a uniform neighbour u' and multiplies its load by W[u,u'] deg(u) / (1 - p_halt).
    Records are summed per (t, start, u) and divided by n_walks: C_t[start, u], with E[sum_t f_t C_t] = sum_t f_t W^t.
    coupling (COUPLINGS; _halts, _repelling_picks, after Reid et al., ICLR 2024) correlates the n walks of one start
    node, never one walk's law nor walks of different start nodes, so Phi_hat and M_hat's off-diagonal stay unbiased.
    Returns (step, start, node, load), nnz <= N n (max_len+1) each. O(N n max_len), repelling log(N n) more."""
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling={coupling!r} is invalid; valid: {', '.join(COUPLINGS)}")
    antithetic = coupling.endswith('antithetic')
    if antithetic and n_walks % 2:
        raise ValueError(f"n_walks={n_walks} is invalid for coupling={coupling!r}; valid: an even number (walkers come in pairs)")
    (nbr, deg), N = check_graph(graph), graph[0].shape[0]
    start = torch.arange(N).repeat_interleave(n_walks)
    slot = torch.arange(N * n_walks)  # walker j of start node i sits in slot i*n + j
    node, load = start.clone(), torch.ones(N * n_walks, dtype=torch.float64)
    recs = [(torch.zeros_like(node), start, node, load)]
    for t in range(1, max_len + 1 if (deg > 0).any() else 1):  # on an edgeless graph no walker leaves its node
        go = ~_halts(slot, N, n_walks, p_halt, antithetic=antithetic, generator=generator) & (deg[node] > 0)
        start, node, load, slot = start[go], node[go], load[go], slot[go]
        if node.numel() == 0:
            break
        d = deg[node]
        pick = (_repelling_picks(start, node, d, N, generator=generator) if coupling.startswith('repelling') else
                (torch.rand(node.shape[0], generator=generator, dtype=torch.float64) * d).long().clamp(max=d - 1))
        node = nbr[node, pick]
        load = load * (d.double() / deg[node].double()).sqrt() / (1 - p_halt)  # W[u,u'] deg(u) = sqrt(deg u / deg u')
        recs.append((torch.full_like(node, t), start, node, load))
    step, start, node, load = (torch.cat(x) for x in zip(*recs))
    key, inv = torch.unique((step * N + start) * N + node, return_inverse=True)
    load = torch.zeros(key.shape[0], dtype=torch.float64).index_add_(0, inv, load) / n_walks
    return key // (N * N), (key // N) % N, key % N, load.float()

def csr_layout(rows, cols, n):
    """The CSR layout of the n x n matrix P with entries at (rows, cols), repeats summed: crow [n + 1] and col [nnz] (each
    row's distinct columns ascending; int32, as MKL and cuSPARSE take them), slot [entries] (each entry's position in
    col), rows [nnz] (each non-zero's row), P^T's crow_t and col_t, and perm (P's values in P^T's order). O(r log r)."""
    pair, slot = torch.unique(rows * n + cols, return_inverse=True)
    rows, cols = pair // n, pair % n
    perm = torch.argsort(cols * n + rows)  # column-major order: the rows of P^T
    crow, crow_t = (F.pad(torch.bincount(x, minlength=n).cumsum(0), (1, 0)).int() for x in (rows, cols))
    return dict(crow=crow, col=cols.int(), slot=slot.int(), rows=rows, crow_t=crow_t, col_t=rows[perm].int(), perm=perm)

def grf_walk_layout(graph, generators, n_walks, p_halt, max_len, coupling):
    """One walk ensemble per head, head j drawn with generators[j] (one generator may serve all, head after head), laid
    out by csr_layout as one block-diagonal graph (head j's node i is node j*N + i), plus per record fidx (j*(K+1) +
    its step: it indexes f [H*(K+1)], all heads' coefficients flattened) and load, for grf_features. O(H N n K)."""
    N = graph[0].shape[0]
    walks = [sample_grf_walks(graph, n_walks, p_halt, max_len=max_len, generator=g, coupling=coupling) for g in generators]
    records = [(j * (max_len + 1) + t, j * N + s, j * N + u, load) for j, (t, s, u, load) in enumerate(walks)]
    fidx, start, node, load = (torch.cat(x) for x in zip(*records))
    return csr_layout(start, node, len(generators) * N) | {'fidx': fidx.int(), 'load': load}

def grf_features(layout, f):
    """Values of Phi_hat = sum_t f_t C_t in its CSR layout (grf_walk_layout): vals[s] = sum of f[fidx] * load over the
    records in slot s, [nnz]; differentiable in f, f [H*(K+1)]. O(records)."""
    return f.new_zeros(layout['col'].shape[0]).index_add(0, layout['slot'], f[layout['fidx']] * layout['load'])

def csr_to_dense(layout, vals, N):
    """The diagonal N x N blocks [H, N, N] of a block-diagonal CSR matrix with H*N rows (csr_layout's rows and col,
    values vals), which hold all its entries; differentiable in vals. O(H N^2)."""
    rows, col = layout['rows'], layout['col'].long()
    return vals.new_zeros((layout['crow'].shape[0] - 1) // N, N, N).index_put((rows // N, rows % N, col % N), vals)

# -----------------------------------------------------------------------------
# the Toeplitz (relative position) mask of the grid; attention: dense references and efficient forms

def toeplitz_index(h, w):
    """idx[i, j] into a flattened (2h-1) x (2w-1) table at offset (row_i - row_j, col_i - col_j), [N, N]."""
    r, c = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    return (r[:, None] - r[None, :] + h - 1) * (2 * w - 1) + (c[:, None] - c[None, :] + w - 1)

def toeplitz_mask(table, index):
    """M_ij = t[row_i - row_j, col_i - col_j] for table [..., 2h-1, 2w-1] -> [..., N, N], index: toeplitz_index(h, w). O(N^2)."""
    return table.flatten(-2)[..., index]

def plain_linear_attention(q, k, v, eps=EPS):
    """out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j) + eps). O(N d^2)."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.relu().float(), k.relu().float(), v.float()
        return q @ (k.transpose(-2, -1) @ v) / (q @ k.sum(-2, keepdim=True).transpose(-2, -1) + eps)

class _MaskedLinear(torch.autograd.Function):
    """out = (A v) / (A 1 + eps), A = (phi(q) phi(k)^T) * M, in float32 from q, k, v of any dtype. Keeps S = phi(q) phi(k)^T
    and A for backward, or with recompute only q, k, v (in their own dtype) and M, recomputing S and A: O(N d) kept per
    head and image instead of two float32 N x N tensors, for two more O(N^2 d) products. Backward, with g = dL/dout:
    dnum = g / den, dA = [dnum, -(g . out) / den] [v, 1]^T, dv = A^T dnum, dS = dA * M, dM = sum over the batch
    of dA * S, dq = dS phi(k) * [q > 0], dk = dS^T phi(q) * [k > 0]."""
    @staticmethod
    def forward(ctx, q, k, v, mask, eps, recompute):
        ctx.eps = eps
        out, den, s, a = _MaskedLinear.terms(q, k, v, mask, eps=eps)
        ctx.save_for_backward(q, k, v, mask, *(() if recompute else (out, den, s, a)))
        return out

    @staticmethod
    def terms(q, k, v, mask, eps):
        """out, den = A 1 + eps, S, A; the numerator and A 1 come from one product with [v, 1]."""
        fq, fk, v, mask = q.relu().float(), k.relu().float(), v.float(), mask.float()
        s = fq @ fk.transpose(-2, -1)
        a = s * mask
        y = a @ _with_ones(v)
        den = y[..., -1:] + eps
        return y[..., :-1] / den, den, s, a

    @staticmethod
    def backward(ctx, g):
        q, k, v, mask, *kept = ctx.saved_tensors
        out, den, s, a = kept or _MaskedLinear.terms(q, k, v, mask, eps=ctx.eps)
        g = g.float()
        dnum = g / den
        dden = (g * out).sum(-1, keepdim=True) / den
        da = torch.cat([dnum, -dden], -1) @ _with_ones(v.float()).transpose(-2, -1)
        dv = a.transpose(-2, -1) @ dnum
        del a, out
        ds = da * mask.float()
        dmask = (da * s).sum_to_size(mask.shape) if ctx.needs_input_grad[3] else None
        del da, s
        dq = (ds @ k.relu().float()) * (q > 0)
        dk = (ds.transpose(-2, -1) @ q.relu().float()) * (k > 0)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask, None, None

def masked_linear_attention(q, k, v, mask, eps=EPS, recompute=True):
    """Dense reference: out_i = sum_j M_ij (phi(q_i).phi(k_j)) v_j / (sum_j M_ij phi(q_i).phi(k_j) + eps), mask [..., N, N]
    broadcast over the batch. O(N^2 d) time, O(N^2) transient memory; kept for backward O(N d) (recompute) or N^2."""
    with torch.autocast(q.device.type, enabled=False):
        return _MaskedLinear.apply(q, k, v, mask, eps, recompute)  # apply takes no keywords

def _with_ones(v):  # a ones channel appended: one contraction yields numerator (first dv) and denominator (last)
    return torch.cat([v, torch.ones_like(v[..., :1])], -1)

def _divide(y, eps):  # the numerator channels over the last (denominator) channel; eps=None: y, both
    return y if eps is None else y[..., :-1] / (y[..., -1:] + eps)

def _pack(x):
    """Real channels [..., C, h, w] in pairs as complex channels [..., ceil(C/2), h, w]: with a real kernel, conv(x1 + i x2)
    = conv(x1) + i conv(x2), so one complex FFT transforms two channels."""
    x = F.pad(x, (0, 0, 0, 0, 0, x.shape[-3] % 2)).unflatten(-3, (-1, 2))
    return torch.complex(x[..., 0, :, :], x[..., 1, :, :])

def _unpack(z, C):
    return torch.stack([z.real, z.imag], -3).flatten(-4, -3)[..., :C, :, :]

class _GridConv(torch.autograd.Function):
    """Y = crop(kern (*) pad(X)), the circular convolution on the 2h x 2w grid of each channel of x [B, H, C, h, w] with
    kern [H, 2h, 2w], by FFT. Backward: X's gradient correlates dY with kern; kern's gradient correlates dY with X,
    summed over B and C (for packed pairs, Re corr(g1 + i g2, x1 + i x2) = corr(g1, x1) + corr(g2, x2))."""
    @staticmethod
    def forward(ctx, x, kern):
        (C, h, w), s = x.shape[-3:], kern.shape[-2:]
        kf = torch.fft.fft2(kern)[None, :, None]
        ctx.save_for_backward(x, kf)
        return _unpack(torch.fft.ifft2(torch.fft.fft2(_pack(x), s=s) * kf)[..., :h, :w], C)

    @staticmethod
    def backward(ctx, gy):
        x, kf = ctx.saved_tensors
        (C, h, w), s = x.shape[-3:], kf.shape[-2:]
        gf = torch.fft.fft2(_pack(gy), s=s)
        gx = _unpack(torch.fft.ifft2(gf * kf.conj())[..., :h, :w], C)
        gkern = torch.fft.ifft2((gf * torch.fft.fft2(_pack(x), s=s).conj()).sum((0, 2))).real
        return gx, gkern

def toeplitz_linear_attention_fft(q, k, v, table, h, w, eps=EPS):
    """Toeplitz-masked linear attention without the N x N matrix. The fields phi(k_j) v_j^T (d*dv channels) and phi(k_j)
    (d channels) on the grid are convolved with the table by a zero-padded 2-D FFT on a 2h x 2w grid (two real channels
    per complex transform), Y_i = sum_j t[r_i - r_j, c_i - c_j] X_j, then contracted with phi(q_i). q, k, v [B, H, N, d],
    table [H, 2h-1, 2w-1]. O(N log N d^2) time, O(N d^2) memory."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, table = q.relu().float(), k.relu().float(), _with_ones(v).float(), table.float()
        B, H, N, d = q.shape
        x = (k[..., :, None] * v[..., None, :]).flatten(-2).transpose(-2, -1).reshape(B, H, -1, h, w)  # d*(dv+1) fields
        kern = F.pad(table, (0, 1, 0, 1)).roll((-(h - 1), -(w - 1)), dims=(-2, -1))  # offset (dr, dc) at (dr mod 2h, dc mod 2w)
        y = _GridConv.apply(x, kern).reshape(B, H, d, -1, N).permute(0, 1, 4, 2, 3)  # [B, H, N, d, dv+1]
        return _divide(torch.einsum('bhnd,bhnde->bhne', q, y), eps)

def _spmm(A, X):  # A @ X for a sparse CSR A, into an unfilled result (beta=0 never reads it; A @ X fills and copies one)
    out = X.new_empty(A.shape[0], X.shape[1])
    return torch.addmm(out, A, X, beta=0.0, out=out)

def _chunks(HN, B, d, dv, size=2 ** 24):  # key-channel slices whose k v^T, HN x B x channels x dv, holds <= size values
    c = max(1, min(d, size // (HN * B * dv)))
    return [slice(s, s + c) for s in range(0, d, c)]

@torch.library.custom_op('topomask::grf_mix', mutates_args=())
def _grf_mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vals: torch.Tensor, vals_t: torch.Tensor,
             crow: torch.Tensor, col: torch.Tensor, crow_t: torch.Tensor, col_t: torch.Tensor) -> torch.Tensor:
    """y_i = q_i^T U_i for q, k, v [HN, B, d]: S = P^T (k v^T), U = P S (in k v^T's place), a chunk of key channels at a time
    (_chunks); vals_t = vals[perm], P^T's values. Custom operators: torch.compile sees one opaque call, not sparse tensors."""
    A, AT = (torch.sparse_csr_tensor(*csr, (len(q),) * 2) for csr in ((crow, col, vals), (crow_t, col_t, vals_t)))
    y = q.new_zeros(*q.shape[:2], v.shape[2])
    for c in _chunks(*q.shape, v.shape[2]):
        kv = (k[:, :, c, None] * v[:, :, None]).flatten(1)  # row l: k_l v_l^T of every image
        U = torch.addmm(kv, A, _spmm(AT, kv), beta=0.0, out=kv).view(*q[:, :, c].shape, v.shape[2])
        y += torch.einsum('nbd,nbde->nbe', q[:, :, c], U)
    return y

_grf_mix.register_fake(lambda q, k, v, *structure: q.new_empty(q.shape[0], q.shape[1], v.shape[2]))

@torch.library.custom_op('topomask::grf_mix_backward', mutates_args=())
def _grf_mix_backward(gy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vals: torch.Tensor,
                      vals_t: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, crow_t: torch.Tensor,
                      col_t: torch.Tensor) -> list[torch.Tensor]:
    """Recomputes S and U instead of keeping them: O(N d) held between forward and backward. dL/dP_il = q_i^T S_l gy_i +
    k_i^T dL/dS_l v_i summed over the batch. Returns contiguous tensors, as its fake does (inductor checks the strides)."""
    A, AT = (torch.sparse_csr_tensor(*csr, (len(q),) * 2) for csr in ((crow, col, vals), (crow_t, col_t, vals_t)))
    gq, gk, gv, gvals = q.new_empty(q.shape), k.new_empty(k.shape), v.new_zeros(v.shape), vals.new_zeros(vals.shape)
    for c in _chunks(*q.shape, v.shape[2]):
        kv, qg = (k[:, :, c, None] * v[:, :, None]).flatten(1), (q[:, :, c, None] * gy[:, :, None]).flatten(1)
        S, gS = _spmm(AT, kv), _spmm(AT, qg)  # S_l and dL/dS_l = sum_i P_il q_i gy_i^T
        gvals += sum(torch.sparse.sampled_addmm(A, x, y.t(), beta=0.0).values() for x, y in ((qg, S), (kv, gS)))
        U = torch.addmm(kv, A, S, beta=0.0, out=kv).view(*q[:, :, c].shape, v.shape[2])  # U = P S, in kv's place
        G = torch.addmm(qg, A, gS, beta=0.0, out=qg).view(U.shape)  # G_j = sum_l P_jl dL/dS_l, in qg's place
        gq[:, :, c], gk[:, :, c] = torch.einsum('nbde,nbe->nbd', U, gy), torch.einsum('nbde,nbe->nbd', G, v)
        gv += torch.einsum('nbde,nbd->nbe', G, k[:, :, c])
    return [gq, gk, gv, gvals]

_grf_mix_backward.register_fake(lambda gy, q, k, v, vals, *structure: [x.new_empty(x.shape) for x in (q, k, v, vals)])
_grf_mix.register_autograd(lambda ctx, gy: (*_grf_mix_backward(gy, *ctx.saved_tensors), None, None, None, None, None),
                           setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))

def grf_linear_attention(q, k, v, layout, vals, eps=EPS):
    """Linear attention masked by M = P P^T, P in CSR (csr_layout's crow, col and its transpose's crow_t, col_t, perm;
    values vals [nnz]; block-diagonal over the heads, head j's rows and columns j*N .. j*N + N-1), never forming M:
    S_l = sum_j P_jl phi(k_j) v_j^T, z_l = sum_j P_jl phi(k_j), U_i = sum_l P_il S_l, Z_i = sum_l P_il z_l,
    out_i = phi(q_i)^T U_i / (phi(q_i)^T Z_i + eps). q, k, v [B, H, N, d]. O(N R d^2) time for R non-zeros per row,
    O(N d^2) transient memory, O(N d) kept for backward."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, vals = q.relu().float(), k.relu().float(), _with_ones(v).float(), vals.float()
        B, H, N, d = q.shape
        q, k, v = (x.permute(1, 2, 0, 3).reshape(H * N, B, -1) for x in (q, k, v))  # [HN, B, .]: rows of P lead
        y = _grf_mix(q, k, v, vals, vals[layout['perm']], *(layout[name] for name in ('crow', 'col', 'crow_t', 'col_t')))
        return _divide(y.view(H, N, B, -1).permute(2, 0, 1, 3), eps)
