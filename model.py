"""
A Vision Transformer whose attention is one of the token mixers of VARIANTS, one class each (the math is in masks.py):
  softmax   softmax(q k^T / sqrt(d)) v, via F.scaled_dot_product_attention          O(N^2)
  linear    phi(q) (phi(k)^T v), phi = relu                                         O(N)
  toeplitz  linear attention masked by a learnable table of 2-D relative offsets      O(N log N) (FFT)
  topo      linear attention masked by M = sum_k alpha_k W^k (exact; the paper's M_alpha(G)),   O(N^2)
            or by M = Phi Phi^T, Phi = sum_k f_k W^k (topo_form='features', what grf estimates)
  grf       the same mask estimated with graph random features (sparse Phi_hat)      O(N)
Patches are nodes of the h x w grid (topo and grf: of the graph GRAPHS[graph] on it); learned absolute positions; global
average pooling. ViT.from_timm takes a timm ViT's weights: a class token (no node of the graph: unmasked), LayerScale, ...
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import masks
import timm_vit

IMPLS = ('auto', 'dense', 'fast')
TOPO_FORMS = ('alpha', 'features')
# graph -> the patch grid's graph (nbr, deg) for topo and grf; grid4_shuffled: grid4 relabelled by a fixed permutation (a control)
GRAPHS = {'grid4': masks.grid_graph, 'grid8': lambda h, w: masks.grid_graph(h, w, diagonals=True),
          'grid4_shuffled': lambda h, w: masks.relabelled(
              masks.grid_graph(h, w), torch.randperm(h * w, generator=torch.Generator().manual_seed(0)))}

@dataclass
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 1
    num_classes: int = 10
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 128
    dropout: float = 0.1
    head_bias_init: float = 0.0  # the classifier's bias at the start (-10 with a sigmoid loss, as the reference)
    attn: str = 'softmax'        # a key of VARIANTS
    attn_impl: str = 'auto'      # auto | dense | fast (toeplitz and grf have both; the others one path)
    grf_walks: int = 20          # n, random walks per node
    grf_p_halt: float = 0.1      # probability that a walk halts at each step
    grf_coupling: str = 'repelling' # how the n walks of a node are drawn together: one of masks.COUPLINGS
    mask_max_len: int = 10       # K: highest power of W in the topological mask / longest walk
    mask_seed: int = 0           # GRF walks are sampled from (mask_seed, layer, head): same on every process
    graph: str = 'grid4'         # topo, grf: the patch graph, a key of GRAPHS (grid4: the paper's; toeplitz: a grid mask)
    topo_form: str = 'alpha'     # topo: 'alpha' learns M = sum_k alpha_k W^k (the reference); 'features' M = Phi Phi^T
    mask_init_decay: float = 0.5 # alpha_k (topo) or f_k (topo features, grf) = decay^k at initialisation
    table_init_decay: float = 1.0 # toeplitz: t[dr, dc] = decay^(|dr| + |dc|) at initialisation (1: unmasked)
    # a timm ViT's features (ViT.from_timm); the defaults are this repository's ViT
    class_token: bool = False    # a learned token before the patches: no node of the graph, unmasked (Attention.mix)
    pool: str = 'mean'           # the image's features: 'mean' of the patches | 'token': the class token's (timm global_pool)
    pos_embed_class: bool = True # with class_token: the position embedding has its entry (timm's no_embed_class=False)
    norm_eps: float = 1e-5       # LayerNorm's eps (timm's ViTs: 1e-6)
    qkv_bias: bool = True
    fc_norm: bool = False        # the last LayerNorm after the pooling, not before (timm's fc_norm)
    layer_scale: float = 0.0     # LayerScale: a learned gain per channel on each residual branch, starting here (0: none)

def check_config(c):
    """Raise a ValueError naming the first bad value and the valid ones."""
    rules = [  # (setting, whether its value is valid, what is)
        ('attn', c.attn in VARIANTS, ', '.join(VARIANTS)),
        ('attn_impl', c.attn_impl in IMPLS, ', '.join(IMPLS)),
        *[(k, getattr(c, k) >= 1, "an integer >= 1") for k in ('patch_size', 'depth', 'heads', 'mlp_dim', 'grf_walks')],
        ('image_size', 0 < c.patch_size <= c.image_size and c.image_size % c.patch_size == 0,
         f"a positive multiple of patch_size={c.patch_size}"),
        ('dim', 0 < c.heads <= c.dim and c.dim % c.heads == 0, f"a positive multiple of heads={c.heads}"),
        ('dropout', 0 <= c.dropout < 1, "0 <= dropout < 1"),
        ('grf_p_halt', 0 < c.grf_p_halt <= 1, "0 < p_halt <= 1"),
        ('topo_form', c.topo_form in TOPO_FORMS, ', '.join(TOPO_FORMS)),
        ('graph', c.graph in GRAPHS, ', '.join(GRAPHS)),
        ('grf_coupling', c.grf_coupling in masks.COUPLINGS, ', '.join(masks.COUPLINGS)),
        ('grf_walks', c.grf_walks % 2 == 0 or not c.grf_coupling.endswith('antithetic'),
         f"an even number with grf_coupling={c.grf_coupling!r}"),
        ('mask_max_len', c.mask_max_len >= 0, "an integer >= 0"),
        ('mask_init_decay', c.mask_init_decay > 0, "a number > 0"),
        ('table_init_decay', c.table_init_decay > 0, "a number > 0"),
        ('pool', c.pool == 'mean' or c.pool == 'token' and c.class_token, "mean, or token with class_token=True"),
    ]
    for name, ok, valid in rules:
        if not ok:
            raise ValueError(f"{name}={getattr(c, name)!r} is invalid; valid: {valid}")

def saved_config(saved):
    """ViTConfig of a saved run's config dict; keys that are not model settings are ignored."""
    return ViTConfig(**{k: v for k, v in saved.items() if k in ViTConfig.__dataclass_fields__})

@torch.compiler.assume_constant_result  # bytes a dense path may take: CUDA's free memory now (torch.compile: when it traces)
def dense_memory_budget(device, table):  # or table[device type], the CPU's for a type not named
    return torch.cuda.mem_get_info()[0] if device == 'cuda' else table.get(device, table['cpu'])

def decay_logits(decay, hops, heads):
    """Per head, the logits of coefficients that start at decay^hops: log(decay) * hops, [heads, *hops.shape]."""
    return hops.float().mul(math.log(decay)).repeat(heads, *[1] * hops.dim())

# -----------------------------------------------------------------------------
# the attention variants: one class each, registered in VARIANTS at the end of this section

class Attention(nn.Module):
    """Shared qkv and output projections. A subclass mixes the tokens: a masked linear attention defines
    dense_mask() (and fast_mix(), the same output without the N x N mask, if it has one); any other defines mix().
    Its mask parameters are the parameters it holds itself (not those of qkv and proj): they form the optimizer's
    mask group. The class attributes say what the mask depends on, for fine-tuning and report.py."""
    mask_settings = () # ViTConfig settings that act on the mask: report.py makes a column of those that vary
    form_settings = () # ViTConfig settings that change what the mask parameters mean: fine-tuning takes them if equal
    walk_buffers = ()  # names of the buffers drawn at random (walks), saved with the model
    walk_settings = () # ViTConfig settings the walk buffers are drawn from: fine-tuning takes them if all are equal
    fast_cost = None   # with fast_mix() and work(): auto's {device type: fast_cost} (fast_pays; bench.py fits it)
    dense_memory = {'cpu': 8e9}  # bytes auto lets a dense path's N x N tensors (scores, weights, a gradient; the mask) take on a CPU
    # the dense path keeps its N x N scores for backward up to this many tokens per device type, else recomputes them
    scores_kept_max_n = {'cpu': 256}

    def __init__(self, c, layer):
        super().__init__()
        self.heads = c.heads
        self.h = self.w = c.image_size // c.patch_size
        self.prefix = int(c.class_token)  # tokens before the patches, no nodes of the graph
        self.qkv = nn.Linear(c.dim, 3 * c.dim, bias=c.qkv_bias)
        self.proj = nn.Linear(c.dim, c.dim)
        self.impl = c.attn_impl if self.fast_cost else 'dense'

    def mask(self):
        """The dense N x N mask per head, [H, N, N], in float32 under any autocast (for the dense path, and to look at)."""
        with torch.autocast(self.qkv.weight.device.type, enabled=False):
            return self.dense_mask()

    def mix(self, q, k, v):
        """The token mixing, [B, H, T, d] -> [B, H, T, d]. The path is chosen here, where the device is known. A class token
        (index 0, T = 1 + N) is no node of the graph: its row and column of the mask are 1 (it attends to and from all)."""
        B, n, d = q.shape[0], q.shape[2] - self.prefix, q.shape[3]
        if self.impl == 'fast' or self.impl == 'auto' and self.fast_pays(B, n, d, q.device.type):
            return self.class_fast_mix(q, k, v) if self.prefix else self.fast_mix(q, k, v)
        mask = F.pad(self.mask(), (1, 0, 1, 0), value=1.0) if self.prefix else self.mask()
        return masks.masked_linear_attention(q, k, v, mask, recompute=n > self.scores_kept_max_n.get(q.device.type, 0))

    def class_fast_mix(self, q, k, v):
        """fast_mix() with a class token at 0: its row is linear attention; patch i adds phi(q_i).phi(k_0) (v_0, 1) to (num, den)."""
        with torch.autocast(q.device.type, enabled=False):
            y = self.fast_mix(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], eps=None)  # [B, H, N, dv + 1]
            s = q[:, :, 1:].relu().float() @ k[:, :, :1].relu().float().transpose(-2, -1)  # [B, H, N, 1]
            y = y + s * F.pad(v[:, :, :1].float(), (0, 1), value=1.0)
            return torch.cat([masks.plain_linear_attention(q[:, :, :1], k, v), y[..., :-1] / (y[..., -1:] + masks.EPS)], 2)

    def fast_pays(self, B, n, d, device='cpu'):
        """attn_impl='auto': whether fast_mix() costs less on B images of n tokens, d channels per head: fast_cost[device type]
        (else the CPU's; bench.py fits it) x fast < dense, work() = (dense, fast) multiply-adds per head; or, whatever the costs,
        whether the dense path's float32 N x N tensors, 4 H n^2 (3 B + 2) bytes, would pass dense_memory_budget()."""
        dense, fast = self.work(B, n, d)
        too_big = 4 * self.heads * n * n * (3 * B + 2) > dense_memory_budget(device, self.dense_memory)
        return too_big or self.fast_cost.get(device, self.fast_cost['cpu']) * fast < dense

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = self.mix(q, k, v).to(q.dtype)  # linear forms return float32
        return self.proj(y.transpose(1, 2).reshape(B, N, C))

class SoftmaxAttention(Attention):
    def mix(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

class LinearAttention(Attention):
    def mix(self, q, k, v):
        return masks.plain_linear_attention(q, k, v)

class ToeplitzAttention(Attention):
    """M_ij = t[row_i - row_j, col_i - col_j], a learnable table per head; t = exp(logits) >= 0, starting at
    decay^(|dr| + |dc|) (decay 1: unmasked)."""
    mask_settings = ('table_init_decay',)

    def __init__(self, c, layer):
        super().__init__(c, layer)
        hops = torch.arange(1 - self.h, self.h).abs()[:, None] + torch.arange(1 - self.w, self.w).abs()  # |dr| + |dc|
        self.table_logits = nn.Parameter(decay_logits(c.table_init_decay, hops, c.heads))
        self.register_buffer('toeplitz_index', masks.toeplitz_index(self.h, self.w), persistent=False)

    def dense_mask(self):
        return masks.toeplitz_mask(self.table_logits.exp(), self.toeplitz_index)

    def fast_mix(self, q, k, v, eps=masks.EPS):
        return masks.toeplitz_linear_attention_fft(q, k, v, self.table_logits.exp(), h=self.h, w=self.w, eps=eps)

    def resample(self, name, saved):
        """A table of another grid's offsets [H, 2a-1, 2b-1] at the same offsets as fractions of the image (bicubic):
        offset (dr, dc) here reads the saved table at (dr a / h, dc b / w), its farthest offsets extended outwards."""
        a, b = (saved.shape[-2] + 1) // 2, (saved.shape[-1] + 1) // 2  # grid_sample's -1 and 1: its first and last offsets
        y, x = (torch.arange(1 - n, n) * old / n / max(old - 1, 1) for n, old in ((self.h, a), (self.w, b)))
        grid = torch.stack(torch.meshgrid(x, y, indexing='xy'), -1).clamp(-1, 1)[None].to(saved)
        return F.grid_sample(saved[None].float(), grid, mode='bicubic', padding_mode='border', align_corners=True)[0]

    fast_cost = {'cpu': 3.4}  # fitted by bench.py --mode=train to whole steps with work()'s multiply-adds
    def work(self, B, n, d):
        """Multiply-adds per head: dense B n^2 d (scores, times v); FFT B d^2 n' log2 n', n' = 4n the padded grid."""
        return B * n * n * d, B * d * d * 4 * n * math.log2(4 * n)

class TopoAttention(Attention):
    """The exact topological mask of the patch graph, coefficients starting at decay^k. topo_form='alpha' learns
    alpha = exp(logits) >= 0 in M = sum_k alpha_k W^k (W^0 .. W^K; M >= 0 entry-wise as W >= 0); 'features' learns
    f = exp(logits) in M = Phi Phi^T = sum_m (f * f)_m W^m (W^0 .. W^2K), the mask that grf estimates."""
    mask_settings = ('topo_form', 'graph', 'mask_max_len', 'mask_init_decay')
    form_settings = ('topo_form',)

    def __init__(self, c, layer):
        super().__init__(c, layer)
        K = c.mask_max_len
        start = decay_logits(c.mask_init_decay, torch.arange(K + 1), c.heads)
        self.alpha_form = c.topo_form == 'alpha'
        if self.alpha_form:
            self.alpha_logits = nn.Parameter(start)
        else:
            self.f_logits = nn.Parameter(start)
        W = masks.normalized_adjacency(GRAPHS[c.graph](self.h, self.w)).double()
        powers = K if self.alpha_form else 2 * K
        self.register_buffer('W_powers', masks.matrix_powers(W, powers).float(), persistent=False)

    def dense_mask(self):
        if self.alpha_form:
            return masks.power_series(self.W_powers, self.alpha_logits.exp())
        return masks.topo_mask(self.W_powers, self.f_logits.exp())

class GRFAttention(Attention):
    """M_hat = Phi_hat Phi_hat^T with Phi_hat = sum_t f_t C_t estimated from random walks on the patch graph (masks.py),
    f = exp(logits) >= 0 starting at decay^k. The walks are sampled once, from (mask_seed, layer), identically on
    every process, and saved with the model; sample_walks redraws them."""
    mask_settings = ('graph', 'grf_walks', 'grf_p_halt', 'grf_coupling', 'mask_max_len', 'mask_init_decay')
    walk_buffers = ('grf_crow', 'grf_col', 'grf_slot', 'grf_fidx', 'grf_load')
    derived_buffers = ('grf_rows', 'grf_crow_t', 'grf_col_t', 'grf_perm')  # from grf_crow and grf_col, not saved
    walk_settings = ('image_size', 'patch_size', 'graph', 'grf_walks', 'grf_p_halt', 'grf_coupling', 'mask_max_len', 'mask_seed')

    def __init__(self, c, layer):
        super().__init__(c, layer)
        self.f_logits = nn.Parameter(decay_logits(c.mask_init_decay, torch.arange(c.mask_max_len + 1), c.heads))
        self.graph = GRAPHS[c.graph](self.h, self.w)
        self.walk_args = dict(n_walks=c.grf_walks, p_halt=c.grf_p_halt, max_len=c.mask_max_len, coupling=c.grf_coupling)
        self.walk_seed = c.mask_seed * 10_007 + layer
        self.sample_walks()

    def sample_walks(self, draw=0):
        """(Re)draw the walks of every head: draw r of this layer is seeded by (mask_seed, layer, r) alone, head j by
        seed * 1_000_003 + j, so every rank draws the same walks and a resumed run the same as an uninterrupted one."""
        seed = self.walk_seed if draw == 0 else hash((self.walk_seed, draw)) % 2 ** 31  # int hashes: fixed
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + j) for j in range(self.heads)]
        layout = masks.grf_walk_layout(self.graph, generators, **self.walk_args)
        for name in self.walk_buffers + self.derived_buffers:
            t = layout[name.removeprefix('grf_')].to(self.f_logits.device)
            self.register_buffer(name, t, persistent=name in self.walk_buffers)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # walk buffers are as long as the walks sampled: take the saved shapes before loading
        for name in self.walk_buffers:
            if prefix + name in state_dict:
                old = getattr(self, name)
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=old.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        rows = torch.repeat_interleave(self.grf_crow.diff().long())  # the row of each non-zero: crow's inverse
        layout = masks.csr_layout(rows, self.grf_col.long(), n=self.grf_crow.shape[0] - 1)
        for name in self.derived_buffers:
            self.register_buffer(name, layout[name.removeprefix('grf_')], persistent=False)

    def layout(self):
        """Phi_hat's CSR layout, block-diagonal over the heads (masks.grf_walk_layout), from this layer's buffers."""
        return {name.removeprefix('grf_'): getattr(self, name) for name in self.walk_buffers + self.derived_buffers}

    def grf_values(self):
        """The values of Phi_hat = sum_t f_t C_t [nnz], in the order of its CSR, differentiable in f."""
        return masks.grf_features(self.layout(), self.f_logits.exp().flatten())

    def dense_mask(self):
        P = masks.csr_to_dense(self.layout(), self.grf_values(), self.h * self.w)
        return P @ P.transpose(-2, -1)

    def fast_mix(self, q, k, v, eps=masks.EPS):
        return masks.grf_linear_attention(q, k, v, self.layout(), self.grf_values(), eps=eps)

    fast_cost = {'cpu': 17.6}  # fitted by bench.py --mode=train to whole steps with work()'s multiply-adds
    def work(self, B, n, d):
        """Multiply-adds per head: dense n^3 (M, once a batch) + B n^2 d; sparse B n R d^2, R non-zeros per row of Phi_hat."""
        R = self.grf_col.numel() / (self.heads * n)
        return n ** 3 + B * n * n * d, B * n * R * d * d

# attn -> its class. A new variant: its math in masks.py, its class above, its entry here (README, "Adding a mask").
VARIANTS = {'softmax': SoftmaxAttention, 'linear': LinearAttention, 'toeplitz': ToeplitzAttention,
            'topo': TopoAttention, 'grf': GRFAttention}

class CPUDropout(nn.Dropout):
    """nn.Dropout, but on the CPU the keep mask comes from 16 random bits per element (p rounded to a multiple of
    2^-16) instead of torch's slower bernoulli_. Elsewhere F.dropout."""
    def forward(self, x):
        if not self.training or not 0 < self.p < 1 or x.device.type != 'cpu' or torch.compiler.is_compiling():
            return super().forward(x)
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)
        keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= round(self.p * 65536) - 32768
        return x * keep * (1 / (1 - self.p))

class Block(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c.dim, eps=c.norm_eps), nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.attn = VARIANTS[c.attn](c, layer)
        self.mlp = nn.Sequential(nn.Linear(c.dim, c.mlp_dim), nn.GELU(), CPUDropout(c.dropout), nn.Linear(c.mlp_dim, c.dim))
        # LayerScale (Touvron et al. 2021): a learned gain per channel on each branch, or none (1)
        self.ls1, self.ls2 = (nn.Parameter(torch.full((c.dim,), c.layer_scale)) if c.layer_scale else 1.0 for _ in range(2))
        self.drop = CPUDropout(c.dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.norm1(x)) * self.ls1)
        return x + self.drop(self.mlp(self.norm2(x)) * self.ls2)

class ViT(nn.Module):
    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.config = c = config
        n = (c.image_size // c.patch_size) ** 2
        self.patch_embed = nn.Conv2d(c.in_channels, c.dim, c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, c.dim) * 0.02) if c.class_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, n + (c.class_token and c.pos_embed_class), c.dim) * 0.02)
        self.drop = CPUDropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, layer) for layer in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.head = nn.Linear(c.dim, c.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:  # qkv_bias=False
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.head.bias, c.head_bias_init)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, dim], node i = row*w + col
        if self.cls_token is not None:  # at index 0, with its own position or (pos_embed_class=False) none
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        x = self.drop(x + F.pad(self.pos_embed, (0, 0, x.shape[1] - self.pos_embed.shape[1], 0)))
        for block in self.blocks:
            x = block(x)
        x = x if self.config.fc_norm else self.norm(x)  # the image's features: the class token's or the patches' mean
        x = x[:, 0] if self.config.pool == 'token' else x[:, int(self.config.class_token):].mean(1)
        return self.head(self.norm(x) if self.config.fc_norm else x)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_start(cls, config, init_from='scratch', ckpt=None, exact=False, file='', inputs=None):
        """(A run's model, None or load_for_fine_tuning's lists + 'source'): 'scratch': config's; ckpt ('resume', a path): as saved
        if exact (a resumed run; an evaluation at its size), else fine-tuned into config; 'timm:NAME': from_timm(NAME, file, inputs)."""
        if init_from.startswith('timm:'):  # its weights fix timm_vit.FIXED; config the rest
            return cls.from_timm(init_from[5:], file, inputs, **{k: v for k, v in vars(config).items() if k not in timm_vit.FIXED})
        src = ckpt and saved_config(ckpt['config'])
        if ckpt and not exact:  # fine-tuning: as from timm, the checkpoint's weights fix the architecture (a class token, ...)
            config = replace(config, **{k: getattr(src, k) for k in timm_vit.FIXED})
        model = cls(config)
        if ckpt and exact and src.image_size == config.image_size:
            model.load_state_dict(ckpt['model'])
        elif ckpt:
            return model, model.load_for_fine_tuning(ckpt['model'], src) | {'source': src}
        return model, None

    @classmethod
    def from_timm(cls, source, file='', inputs=None, **overrides):
        """(A ViT with a timm ViT's weights, load_for_fine_tuning's lists + 'source': its ViTConfig, 'refolded'). source: a
        timm ViT, or a name timm fetches or reads from file (.npz, .pth, .safetensors); inputs: the (mean, std) its images
        will be normalised by, if not the timm model's own (timm_vit.state_dict); overrides: ViTConfig's but timm_vit.FIXED."""
        vit = timm_vit.create(source, file) if isinstance(source, str) else source
        src = ViTConfig(**timm_vit.settings(vit))
        fixed = [f"{k}={v!r}" for k, v in overrides.items() if k in timm_vit.FIXED and v != getattr(src, k)]
        if fixed:
            raise ValueError(f"{', '.join(fixed)} differ from the timm model's, which its weights fix")
        model, (state, refolded) = cls(replace(src, **overrides)), timm_vit.refold(timm_vit.state_dict(vit), vit, inputs)
        extra = sorted(set(state) - set(model.state_dict()))
        if extra:
            raise ValueError(f"the timm model's {', '.join(extra)} have no place in this ViT")
        return model, model.load_for_fine_tuning(state, src) | {'source': src, 'refolded': refolded}

    def load_for_fine_tuning(self, state, src):
        """Take the tensors of a saved model (state, its ViTConfig src) that still mean the same thing here: the shared
        weights; the head if the class count is the same; the mask parameters if the variant and its `form_settings` are
        (coefficient vectors of another length cut or extended, so K may change); the sampled walks if all its `walk_settings`
        are, else drawn from its mask_seed; position embeddings and Toeplitz tables of another grid resampled (resample()). The
        rest keeps its initialisation. Returns {'loaded', 'truncated', 'resampled', 'fresh', 'drawn': [names]}"""
        c = self.config
        variant, grid, saved_grid = VARIANTS[c.attn], c.image_size // c.patch_size, src.image_size // src.patch_size
        same_mask = src.attn == c.attn and all(getattr(src, k) == getattr(c, k) for k in variant.form_settings)
        same_walks = same_mask and all(getattr(src, k) == getattr(c, k) for k in variant.walk_settings)
        mask, walks = set(self.mask_parameters()), set(self.walk_buffers())
        new, done = {}, {'loaded': [], 'truncated': [], 'resampled': [], 'fresh': [], 'drawn': []}
        for k, own in self.state_dict().items():
            saved, module = state.get(k), self.get_submodule(k.rpartition('.')[0])
            resample = grid != saved_grid and saved is not None and hasattr(module, 'resample')
            resampled = module.resample(k.rpartition('.')[2], saved) if resample else None
            if k in walks and (saved is None or not same_walks):
                done['drawn'].append(k)
            elif saved is None or k.startswith('head.') and src.num_classes != c.num_classes or k in mask and not same_mask:
                done['fresh'].append(k)
            elif k in walks or saved.shape == own.shape:
                new[k] = saved
                done['loaded'].append(k)
            elif resampled is not None and resampled.shape == own.shape:  # of another grid
                new[k] = resampled
                done['resampled'].append(k)
            elif k in mask and saved.shape[:-1] == own.shape[:-1]:  # coefficients 0 .. K of another K
                n = min(saved.shape[-1], own.shape[-1])
                new[k] = torch.cat([saved[..., :n], own[..., n:]], -1)
                done['truncated'].append(k)
            elif k in mask:  # a parameter of another head count
                done['fresh'].append(k)
            else:
                raise ValueError(f"{k} of shape {tuple(saved.shape)} does not fit this model's {tuple(own.shape)}")
        self.load_state_dict(new, strict=False)
        return done

    def resample(self, name, saved):
        """pos_embed of another grid, bicubic over the grid as timm's resample_abs_pos_embed (a class token's kept); else None."""
        if name != 'pos_embed':  # the Toeplitz tables: their Attention's resample()
            return None
        grid = self.config.image_size // self.config.patch_size
        prefix = self.pos_embed.shape[1] - grid * grid  # a class token's entry, kept as it is
        x = saved[:, prefix:].unflatten(1, (math.isqrt(saved.shape[1] - prefix), -1)).permute(0, 3, 1, 2).float()  # [1, dim, rows, cols]
        x = F.interpolate(x, size=(grid, grid), mode='bicubic', antialias=True, align_corners=False)
        return torch.cat([saved[:, :prefix].float(), x.flatten(2).transpose(1, 2)], 1)

    def mask_parameters(self):
        """The mask's own parameters (f, alpha, Toeplitz tables), by name: an Attention's own, not qkv's or proj's."""
        return {f'{name}.{p_name}': p for name, m in self.named_modules() if isinstance(m, Attention)
                for p_name, p in m.named_parameters(recurse=False)}

    def walk_buffers(self):
        """The names of the buffers drawn at random (GRF walks), saved with the model."""
        return [f'{name}.{b}' for name, m in self.named_modules() if isinstance(m, Attention) for b in m.walk_buffers]

    def param_groups(self, weight_decay, mask_lr_mult=1.0):
        """AdamW groups: matrices decay; biases, norms, positions and the class token do not; the few mask parameters
        get no decay and their own learning-rate multiplier."""
        groups = {'decay': [], 'no_decay': [], 'mask': []}
        mask = {id(p) for p in self.mask_parameters().values()}
        for name, p in self.named_parameters():
            if id(p) in mask:
                groups['mask'].append(p)
            elif p.dim() >= 2 and name not in ('pos_embed', 'cls_token'):
                groups['decay'].append(p)
            else:
                groups['no_decay'].append(p)
        assert sorted(id(p) for g in groups.values() for p in g) == sorted(map(id, self.parameters())), "not one group each"
        settings = {'decay': (weight_decay, 1.0), 'no_decay': (0.0, 1.0), 'mask': (0.0, mask_lr_mult)}
        return [{'params': ps, 'weight_decay': settings[k][0], 'lr_mult': settings[k][1]}
                for k, ps in groups.items() if ps]
