"""The ViT of model.py: every variant trains, GRF walks are reproducible and saved, bad configs fail."""
import glob
import math

import pytest
import torch

import masks
from model import VARIANTS, Attention, ViT, ViTConfig, saved_config

def tiny(**kw):
    return ViTConfig(**{**dict(image_size=16, patch_size=4, in_channels=3, num_classes=5, dim=32, depth=2,
                                heads=2, mlp_dim=64, dropout=0.0, grf_walks=4, mask_max_len=4), **kw})

MASKED = [a for a, cls in VARIANTS.items() if hasattr(cls, "dense_mask")]  # the masked linear attentions
PATHS = [(a, impl) for a, cls in VARIANTS.items() for impl in ("dense", "fast")[:1 + (cls.fast_cost is not None)]]

IMAGES = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))

@pytest.mark.parametrize("attn", VARIANTS)
@pytest.mark.parametrize("impl", ["dense", "fast", "auto"])
def test_every_variant_trains_in_fp32_and_bf16(attn, impl):
    torch.manual_seed(0)
    model = ViT(tiny(attn=attn, attn_impl=impl))
    out = model(IMAGES)
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(IMAGES)
        loss = out.float().logsumexp(-1).sum()
    loss.backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

@pytest.mark.parametrize("attn", [a for a, cls in VARIANTS.items() if cls.fast_cost is not None])
def test_dense_and_fast_models_agree(attn):
    torch.manual_seed(0)
    dense = ViT(tiny(attn=attn, attn_impl="dense"))
    fast = ViT(tiny(attn=attn, attn_impl="fast"))
    with torch.no_grad():  # move the mask parameters away from their initial values
        for p in dense.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fast.load_state_dict(dense.state_dict())
    torch.testing.assert_close(fast(IMAGES), dense(IMAGES), rtol=1e-4, atol=1e-5)

@pytest.mark.parametrize("attn", [a for a, cls in VARIANTS.items() if cls.fast_cost is not None])
def test_auto_takes_the_fast_path_where_its_cost_is_lower_with_the_fast_cost_of_the_tokens_device_type(attn, monkeypatch):
    """16 tokens, on the CPU and on the meta device; a device type the table does not name takes the CPU's value."""
    layer = ViT(tiny(attn=attn)).blocks[0].attn
    dense, fast = layer.work(1, 16, 16)
    even = dense / fast  # the fast_cost at which both paths cost the same
    taken = []
    monkeypatch.setattr(type(layer), "fast_mix", lambda self, q, k, v: taken.append("fast"))
    monkeypatch.setattr(masks, "masked_linear_attention", lambda *args, **kw: taken.append("dense"))
    for device, table, path in [("cpu", {"cpu": even * 1.01}, "dense"), ("cpu", {"cpu": even * 0.99}, "fast"),
                                ("cpu", {"cpu": even * 1.01, "meta": even / 2}, "dense"), ("meta", {"cpu": even * 2, "meta": even / 2}, "fast"),
                                ("meta", {"cpu": even / 2, "meta": even * 2}, "dense"), ("meta", {"cpu": even / 2}, "fast"),
                                ("meta", {"cpu": even * 2}, "dense")]:
        monkeypatch.setattr(type(layer), "fast_cost", table)
        q = torch.zeros(1, 2, 16, 16, device=device)
        layer.mix(q, q, q)
        assert taken.pop() == path, (device, table)

@pytest.mark.parametrize("attn", [a for a, cls in VARIANTS.items() if cls.fast_cost is not None])
def test_auto_takes_the_fast_path_where_the_dense_tensors_would_pass_the_memory_budget_whatever_the_costs(attn, monkeypatch):
    """The dense path's 4 H n^2 (3 B + 2) bytes against the CPU's setting (the meta device takes it too) and CUDA's free
    memory, with a fast_cost at which the time model always says dense."""
    layer = ViT(tiny(attn=attn)).blocks[0].attn
    need = 4 * 2 * 16 ** 2 * (3 * 3 + 2)  # 2 heads, 16 tokens, batch 3
    monkeypatch.setattr(type(layer), "fast_cost", {"cpu": 1e12})
    for device, cpu_bytes, free, fast in [("cpu", need + 1, 0, False), ("cpu", need - 1, 2 * need, True),
                                          ("meta", need - 1, 2 * need, True), ("cuda", 0, need + 1, False), ("cuda", 2 * need, need - 1, True)]:
        monkeypatch.setattr(type(layer), "dense_memory", {"cpu": cpu_bytes})
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *args: (free, 10 * need))
        assert layer.fast_pays(3, 16, 16, device) == fast, (device, cpu_bytes, free)

def test_mask_parameters_start_as_documented():
    toep = ViT(tiny(attn="toeplitz"))
    assert torch.equal(toep.blocks[0].attn.table_logits.exp(), torch.ones(2, 7, 7))
    local = ViT(tiny(attn="toeplitz", table_init_decay=0.5)).blocks[0].attn
    for dr in range(-3, 4):  # the table holds offsets -3 .. 3 on the 4x4 grid; decay^(Manhattan distance)
        for dc in range(-3, 4):
            assert local.table_logits[1, dr + 3, dc + 3].exp().item() == pytest.approx(0.5 ** (abs(dr) + abs(dc)))
    topo = ViT(tiny(attn="topo", mask_init_decay=0.5, topo_form="features"))
    torch.testing.assert_close(topo.blocks[1].attn.f_logits.exp(), (0.5 ** torch.arange(5.0)).repeat(2, 1))
    alpha = ViT(tiny(attn="topo", mask_init_decay=0.99)).blocks[0].attn
    torch.testing.assert_close(alpha.alpha_logits.exp(), (0.99 ** torch.arange(5.0)).repeat(2, 1))

def test_toeplitz_model_starts_as_plain_linear_attention():
    torch.manual_seed(0)
    lin, toep = ViT(tiny(attn="linear")), ViT(tiny(attn="toeplitz"))
    toep.load_state_dict(lin.state_dict(), strict=False)
    torch.testing.assert_close(toep(IMAGES), lin(IMAGES), rtol=1e-4, atol=1e-5)

def test_topo_model_mask_is_the_power_series_of_its_alpha_and_every_alpha_gets_a_gradient():
    torch.manual_seed(0)
    model = ViT(tiny(attn="topo", mask_max_len=6))
    attn = model.blocks[0].attn
    assert attn.W_powers.shape[0] == 7  # W^0 .. W^K: half the powers of the features form
    with torch.no_grad():
        attn.alpha_logits.add_(torch.randn_like(attn.alpha_logits))
    alpha = attn.alpha_logits.exp().detach().double()
    W = masks.normalized_adjacency(masks.grid_graph(4, 4)).double()
    M = sum(alpha[:, k, None, None] * torch.linalg.matrix_power(W, k) for k in range(7))
    torch.testing.assert_close(attn.mask().double(), M, rtol=1e-5, atol=1e-6)
    assert (attn.mask() >= 0).all()
    model(IMAGES).logsumexp(-1).sum().backward()
    assert (attn.alpha_logits.grad.abs() > 0).all()

@pytest.mark.parametrize("graph", ["grid4", "grid8"])
def test_topo_model_mask_is_phi_phi_transpose_of_its_f(graph):
    model = ViT(tiny(attn="topo", topo_form="features", graph=graph))
    attn = model.blocks[0].attn
    f = attn.f_logits.exp().detach()
    W = masks.normalized_adjacency(masks.grid_graph(4, 4, diagonals=graph == "grid8"))
    Phi = sum(f[:, k, None, None] * torch.linalg.matrix_power(W, k) for k in range(5))
    torch.testing.assert_close(attn.mask().detach(), Phi @ Phi.transpose(1, 2), rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize("attn", ["topo", "grf"])
def test_grid4_shuffled_masks_are_the_grid_masks_with_rows_and_columns_permuted(attn):
    """The control graph is grid4 relabelled by model.GRAPHS' fixed permutation: the exact mask on it is the grid's exact
    mask, rows and columns permuted; the GRF estimate on it is unbiased for that (its own sparsity, the grid's)."""
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    grid, shuffled = (ViT(tiny(attn="topo", topo_form="features", graph=g, depth=1)).blocks[0].attn.mask().detach()
                      for g in ("grid4", "grid4_shuffled"))
    assert (shuffled - grid).abs().max() > 0.1  # not the grid itself
    if attn == "topo":
        torch.testing.assert_close(shuffled, grid[:, perm][:, :, perm], rtol=1e-5, atol=1e-6)
    else:
        est = ViT(tiny(attn="grf", grf_walks=2000, depth=1, graph="grid4_shuffled")).blocks[0].attn.mask().detach()
        off = ~torch.eye(16, dtype=torch.bool)
        assert ((est - shuffled)[:, off].norm() / shuffled[:, off].norm()) < 0.05
        assert ((est != 0) == (grid[:, perm][:, :, perm] != 0)).float().mean() > 0.9  # the same pairs reached

@pytest.mark.parametrize("graph", ["grid4", "grid8"])
def test_grf_model_mask_estimates_topo_mask(graph):
    """With many walks the GRF model's mask approaches the exact mask of the same f, on the same patch graph."""
    grf = ViT(tiny(attn="grf", grf_walks=2000, depth=1, heads=1, graph=graph))
    topo = ViT(tiny(attn="topo", depth=1, heads=1, topo_form="features", graph=graph))
    exact, est = topo.blocks[0].attn.mask().detach()[0], grf.blocks[0].attn.mask().detach()[0]
    off = ~torch.eye(16, dtype=torch.bool)
    assert ((est - exact)[off].norm() / exact[off].norm()) < 0.05

# --- GRF walks: reproducible, distinct per layer and head, saved with the model ----------------

def grf_buffers(model):
    buffers = dict(model.named_buffers())
    return {n: buffers[n] for n in model.walk_buffers()}

def test_same_seed_gives_identical_walks():
    a, b = grf_buffers(ViT(tiny(attn="grf"))), grf_buffers(ViT(tiny(attn="grf")))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)

def phi_hat(attn):
    return masks.csr_to_dense(attn.layout(), attn.grf_values().detach(), attn.h * attn.w)

def test_layers_heads_and_seeds_get_different_walks():
    model, other = ViT(tiny(attn="grf")), ViT(tiny(attn="grf", mask_seed=1))
    l0, l1 = phi_hat(model.blocks[0].attn), phi_hat(model.blocks[1].attn)
    assert not torch.allclose(l0[0], l0[1])  # heads of one layer
    assert not torch.allclose(l0, l1)        # layers
    assert not torch.allclose(l0, phi_hat(other.blocks[0].attn))  # seeds

@pytest.mark.parametrize("coupling", masks.COUPLINGS)
def test_grf_model_walks_are_drawn_with_its_coupling(coupling):
    """Layer 0, head 0 holds the walks masks.sample_grf_walks draws with the model's coupling and seed."""
    attn = ViT(tiny(attn="grf", grf_coupling=coupling, mask_seed=3)).blocks[0].attn
    g = torch.Generator().manual_seed((3 * 10_007 + 0) * 1_000_003 + 0)
    step, start, node, load = masks.sample_grf_walks(masks.grid_graph(4, 4), 4, 0.1, 4, g, coupling)
    f = attn.f_logits.exp().detach()[0]
    want = torch.zeros(16, 16).index_put_((start, node), f[step] * load, accumulate=True)
    torch.testing.assert_close(phi_hat(attn)[0], want)

def test_saved_config_takes_the_model_settings_of_a_run_and_ignores_the_others():
    assert saved_config({"attn": "grf", "grf_coupling": "iid", "epochs": 3}) == ViTConfig(attn="grf", grf_coupling="iid")

@pytest.mark.parametrize("path", [p for p in sorted(glob.glob("results/**/ckpt.pt", recursive=True))
                                  if torch.load(p, map_location="cpu", weights_only=False)["config"]["attn"] == "grf"])
def test_walks_saved_in_results_are_the_walks_the_model_draws_today(path):
    """The saved runs' walks, drawn from (mask_seed, layer, head) with the settings in their config, come out of
    today's sampler bit for bit: its draws and layout still mean what they meant when those runs trained."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = ViT(saved_config(ckpt["config"]))
    drawn = dict(model.named_buffers())
    walks = model.walk_buffers()
    assert walks and all(torch.equal(ckpt["model"][k], drawn[k]) for k in walks)
    model.load_state_dict(ckpt["model"])
    assert all(torch.equal(t, drawn[k]) for k, t in model.named_buffers())  # the buffers derived again on loading

def test_state_dict_round_trip_restores_walks_and_outputs(tmp_path):
    torch.manual_seed(0)
    model = ViT(tiny(attn="grf", mask_seed=0)).eval()
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    fresh = ViT(tiny(attn="grf", mask_seed=123)).eval()
    assert not torch.equal(fresh(IMAGES), model(IMAGES))
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    assert torch.equal(fresh(IMAGES), model(IMAGES))

def test_grf_model_holds_no_dense_heads_by_n_by_n_tensor():
    cfg = tiny(attn="grf", image_size=128, patch_size=4, heads=2, grf_walks=20, grf_p_halt=0.1, mask_max_len=10)
    model = ViT(cfg)  # 32 x 32 grid, N = 1024
    N = 1024
    for name, t in list(model.named_buffers()) + list(model.named_parameters()):
        assert t.numel() < N * N, (name, tuple(t.shape))
    attn = model.blocks[0].attn
    assert attn.grf_load.numel() <= cfg.heads * N * cfg.grf_walks * (cfg.mask_max_len + 1)

@pytest.mark.parametrize("attn", MASKED)
def test_param_groups_cover_every_parameter_once(attn):
    model = ViT(tiny(attn=attn))
    groups = model.param_groups(weight_decay=0.05, mask_lr_mult=10)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    mask = [g for g in groups if g["lr_mult"] == 10]
    own = [p for block in model.blocks for p in block.attn.parameters() if not any(
           p is q for q in [*block.attn.qkv.parameters(), *block.attn.proj.parameters()])]  # the layers' own tensors
    assert len(mask) == 1 and mask[0]["weight_decay"] == 0 and len(own) == 2  # one per layer
    assert sorted(id(p) for p in mask[0]["params"]) == sorted(id(p) for p in own)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.pos_embed) not in decayed and id(model.head.bias) not in decayed
    assert id(model.head.weight) in decayed

def test_a_class_token_and_layer_scale_take_no_weight_decay():
    """As timm's no_weight_decay: the class token (a [1, 1, dim] tensor, so not by its shape) and the LayerScale gains."""
    model = ViT(tiny(attn='grf', class_token=True, pool='token', layer_scale=1e-5))
    decayed = {id(p) for g in model.param_groups(weight_decay=0.05) if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.cls_token) not in decayed and id(model.blocks[0].ls1) not in decayed
    assert id(model.blocks[0].attn.qkv.weight) in decayed

# --- dead configurations fail loudly -----------------------------------------------------------

@pytest.mark.parametrize("kw,words", [
    (dict(attn="performer"), ["performer", "softmax", "grf"]),
    (dict(attn_impl="sparse"), ["sparse", "auto", "dense", "fast"]),
    (dict(image_size=30), ["30", "patch_size=4"]),
    (dict(attn="grf", grf_p_halt=0.0), ["0.0", "p_halt"]),
    (dict(attn="grf", grf_p_halt=1.5), ["1.5", "p_halt"]),
    (dict(attn="grf", grf_walks=-3), ["-3", ">= 1"]),
    (dict(dim=30, heads=4), ["30", "heads=4"]),
    (dict(attn="toeplitz", table_init_decay=0.0), ["table_init_decay=0.0", "> 0"]),
    (dict(attn="topo", topo_form="beta"), ["topo_form='beta'", "alpha", "features"]),
    (dict(attn="grf", grf_coupling="lazy"), ["grf_coupling='lazy'", "iid", "repelling_antithetic"]),
    (dict(attn="grf", grf_coupling="antithetic", grf_walks=5), ["grf_walks=5", "even"]),
    (dict(attn="topo", graph="knn"), ["graph='knn'", "valid: grid4, grid8"]),
])
def test_bad_config_raises_value_error_naming_value_and_valid_ones(kw, words):
    with pytest.raises(ValueError) as e:
        ViT(tiny(**kw))
    for word in words:
        assert word in str(e.value)

# --- precision, fine-tuning ----------------------------------------------------------------------

@pytest.mark.parametrize("attn,form", [("toeplitz", "alpha"), ("topo", "alpha"), ("topo", "features"), ("grf", "alpha")])
def test_every_mask_is_float32_under_bf16_autocast(attn, form):
    torch.manual_seed(0)
    a = ViT(tiny(attn=attn, topo_form=form, mask_max_len=6)).blocks[0].attn
    with torch.no_grad():
        for p in a.parameters(recurse=False):
            p.add_(0.3 * torch.randn_like(p))
    exact = a.mask()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = a.mask()
    assert mixed.dtype == torch.float32 and ((mixed - exact).norm() / exact.norm()) < 1e-6

def test_training_dtype_is_bf16_only_where_the_gpu_computes_it(monkeypatch):
    from outdir import amp_dtype
    assert amp_dtype("cpu") == amp_dtype("mps") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert amp_dtype("cuda") == torch.float16  # a pre-Ampere GPU: bf16 by emulation only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_dtype("cuda") == torch.bfloat16

def fine_tuned(src_kw, kw):
    torch.manual_seed(0)
    src = ViT(tiny(**src_kw))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    torch.manual_seed(1)
    model = ViT(tiny(**kw))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    done = model.load_for_fine_tuning(src.state_dict(), src.config)
    return src.state_dict(), init, model.state_dict(), done

def mask_and_walk_names(**kw):
    model = ViT(tiny(**kw))
    return list(model.mask_parameters()), model.walk_buffers()

def test_fine_tuning_keeps_the_toeplitz_table_when_only_walk_settings_and_classes_change():
    src, init, new, done = fine_tuned(dict(attn="toeplitz"), dict(attn="toeplitz", num_classes=7, grf_walks=8, mask_max_len=2))
    tables, _ = mask_and_walk_names(attn="toeplitz")
    assert tables and all(torch.equal(new[k], src[k]) for k in tables) and set(tables) <= set(done["loaded"])
    assert done["fresh"] == ["head.weight", "head.bias"] and torch.equal(new["head.weight"], init["head.weight"])

@pytest.mark.parametrize("attn", ["topo", "grf"])
@pytest.mark.parametrize("K", [2, 6])
def test_fine_tuning_to_another_k_keeps_the_first_coefficients_and_redraws_the_walks(attn, K):
    src, init, new, done = fine_tuned(dict(attn=attn), dict(attn=attn, mask_max_len=K))
    coef, walks = mask_and_walk_names(attn=attn, mask_max_len=K)
    n = min(K, 4) + 1
    for k in coef:
        assert torch.equal(new[k][:, :n], src[k][:, :n]) and torch.equal(new[k][:, n:], init[k][:, n:])
    assert coef and set(coef) == set(done["truncated"]) and torch.equal(new["head.weight"], src["head.weight"])
    assert (attn == "grf") == bool(walks)
    assert all(k in done["drawn"] and torch.equal(new[k], init[k]) for k in walks) and not set(walks) & set(done["fresh"])

def test_fine_tuning_with_the_same_walk_settings_keeps_the_walks_and_another_variant_starts_its_mask_afresh():
    src, init, new, done = fine_tuned(dict(attn="grf", mask_seed=5), dict(attn="grf", mask_seed=5, num_classes=9))
    _, walks = mask_and_walk_names(attn="grf")
    assert walks and all(torch.equal(new[k], src[k]) for k in walks)
    src, init, new, done = fine_tuned(dict(attn="topo"), dict(attn="topo", topo_form="features"))
    f, _ = mask_and_walk_names(attn="topo", topo_form="features")
    assert f and all(torch.equal(new[k], init[k]) and k in done["fresh"] for k in f)
    assert torch.equal(new["blocks.0.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"])

def test_imagenet_config_states_the_flops_that_torch_counts():
    """configs/imagenet.py's 'about X GFLOP per image, forward and backward' against FlopCounterMode on ViT-B/16."""
    import re
    from torch.utils.flop_counter import FlopCounterMode
    stated = float(re.search(r"about (\d+) GFLOP per image", open("configs/imagenet.py").read()).group(1))
    with torch.device("meta"):  # counts without computing
        model = ViT(ViTConfig(image_size=224, patch_size=16, in_channels=3, num_classes=1000, dim=768, depth=12,
                              heads=12, mlp_dim=3072))
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(2, 3, 224, 224)).sum().backward()
    assert abs(counter.get_total_flops() / 2 / 1e9 - stated) < 0.1 * stated

def saved_activation_bytes(attn):
    """Bytes of the tensors autograd keeps for backward (parameters and buffers not counted), one ViT-B/16 block,
    batch 8, under CPU bf16 autocast."""
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=224, patch_size=16, in_channels=3, num_classes=1000, dim=768, depth=1, heads=12,
                          mlp_dim=3072, attn=attn, attn_impl="dense", dropout=0.0))
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept = {}
    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(8, 3, 224, 224))
    return sum(kept.values())

def test_dense_masked_paths_keep_at_most_1_3x_the_activations_of_softmax(monkeypatch):
    """Where the scores are recomputed (CUDA; on this CPU above scores_kept_max_n), and where they are kept."""
    softmax = saved_activation_bytes("softmax")
    kept = {attn: saved_activation_bytes(attn) for attn in MASKED}
    monkeypatch.setattr(Attention, "scores_kept_max_n", {})
    for attn in MASKED:
        recomputed = saved_activation_bytes(attn)
        assert recomputed <= 1.3 * softmax, attn
        assert kept[attn] >= recomputed + 2 * 8 * 12 * 196 * 196 * 4, attn  # S and A, float32 [B, H, N, N]

@pytest.mark.parametrize("attn,impl", PATHS)
def test_every_variant_compiles_as_one_graph_and_matches_eager(attn, impl):
    """fullgraph=True fails on any graph break, forward or backward (AOTAutograd traces both)."""
    torch.manual_seed(0)
    model = ViT(tiny(attn=attn, attn_impl=impl, dropout=0.0, depth=1))
    eager = model(IMAGES)
    eager.square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(IMAGES)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)

def test_toeplitz_forward_builds_no_index_on_the_host(monkeypatch):
    """The offset index is a buffer made once: a forward pass does not rebuild it (on CUDA that is a host copy)."""
    model = ViT(tiny(attn="toeplitz", attn_impl="dense"))
    monkeypatch.setattr(masks, "toeplitz_index", lambda h, w: (_ for _ in ()).throw(AssertionError("index rebuilt")))
    model(IMAGES).sum().backward()

def imagenet_mask_settings():
    scope = {}
    exec(open("configs/imagenet.py").read(), scope)
    return {k: scope[k] for k in ("mask_max_len", "mask_init_decay", "grf_walks", "grf_p_halt", "grf_coupling")}

@pytest.mark.parametrize("attn", ["topo", "grf"])
def test_imagenet_start_gives_every_one_of_the_100_coefficients_a_gradient(attn):
    """With f_k = 0.5^k the gradients of f_k beyond k ~ 30 vanish (below 1e-12) and never move; the reference's
    exp(-0.01 k) start, which configs/imagenet.py takes, keeps all of them within a few orders of magnitude."""
    cfg = ViTConfig(image_size=224, patch_size=16, in_channels=3, num_classes=5, dim=16, depth=1, heads=1, mlp_dim=16,
                    dropout=0.0, attn=attn, **{**imagenet_mask_settings(), "grf_walks": 20})
    torch.manual_seed(0)
    model = ViT(cfg)
    model(torch.randn(2, 3, 224, 224)).logsumexp(-1).sum().backward()
    g = next(iter(model.mask_parameters().values())).grad.abs()
    assert g.shape[-1] == 101
    if attn == "grf":  # only walks that reach length k carry f_k: few of 20 per node get past ~40 steps at p_halt 0.1
        g = g[..., :41]
    assert g.min() > 1e-6 * g.max(), (g.min(), g.max())

# --- a sixth variant, added as README's "Adding a mask" says -------------------------------------

def window_mask(h, w, radius, outside):
    """The toy's math (a masks.py function): M_ij = 1 where patches i and j are at most `radius` rows and columns
    apart, else outside[head]; outside [H] -> [H, N, N]."""
    r, c = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    near = ((r[:, None] - r[None, :]).abs() <= radius) & ((c[:, None] - c[None, :]).abs() <= radius)
    return torch.where(near, torch.ones(()), outside[:, None, None])

class WindowAttention(Attention):
    """The toy's class: a learned weight per head for the patches outside a 3 x 3 window."""
    mask_settings = ("mask_init_decay",)

    def __init__(self, c, layer):
        super().__init__(c, layer)
        self.outside_logits = torch.nn.Parameter(torch.full((c.heads,), math.log(c.mask_init_decay)))

    def dense_mask(self):
        return window_mask(self.h, self.w, 1, self.outside_logits.exp())

def test_a_sixth_variant_added_the_documented_way_trains_and_its_mask_is_what_a_loop_computes(monkeypatch):
    monkeypatch.setitem(VARIANTS, "window", WindowAttention)
    torch.manual_seed(0)
    model = ViT(tiny(attn="window", mask_init_decay=0.3))
    groups = model.param_groups(weight_decay=0.05, mask_lr_mult=10.0)
    mask_group = next(g for g in groups if g["lr_mult"] == 10.0)
    own = [model.blocks[layer].attn.outside_logits for layer in range(2)]
    assert {id(p) for p in mask_group["params"]} == {id(p) for p in own} and mask_group["weight_decay"] == 0
    before = [p.detach().clone() for p in own]
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    model(IMAGES).logsumexp(-1).sum().backward()
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(own, before))
    # the dense path against a brute-force loop over token pairs
    attn = model.blocks[0].attn
    q, k, v = torch.randn(3, 1, 2, 16, 8, generator=torch.Generator().manual_seed(1))
    outside = attn.outside_logits.exp().detach()
    out = torch.zeros(1, 2, 16, 8)
    for hd in range(2):
        for i in range(16):
            num, den = torch.zeros(8), 0.0
            for j in range(16):
                near = abs(i // 4 - j // 4) <= 1 and abs(i % 4 - j % 4) <= 1
                weight = (1.0 if near else outside[hd]) * (q[0, hd, i].relu() @ k[0, hd, j].relu())
                num, den = num + weight * v[0, hd, j], den + weight
            out[0, hd, i] = num / (den + masks.EPS)
    torch.testing.assert_close(attn.mix(q, k, v).detach(), out, rtol=1e-5, atol=1e-6)

def bicubic(table, r, c, a=-0.75):
    """table [rows, cols] at the fractional index (r, c): Keys' cubic convolution (torch's a = -0.75) over the 4 x 4
    nearest entries, an index past the edge reading the edge, as a loop."""
    def weight(x):
        x = abs(x)
        return ((a + 2) * x - (a + 3)) * x * x + 1 if x <= 1 else ((x - 5) * x + 8) * x * a - 4 * a if x < 2 else 0.0
    r0, c0 = math.floor(r), math.floor(c)
    return sum(weight(r - i) * weight(c - j) * table[min(max(i, 0), table.shape[0] - 1), min(max(j, 0), table.shape[1] - 1)]
               for i in range(r0 - 1, r0 + 3) for j in range(c0 - 1, c0 + 3))

def changed_resolution(attn, image_size, **kw):
    """A tiny model (4 x 4 grid) with random weights, fine-tuned at image_size: (source state, new state, done)."""
    torch.manual_seed(0)
    src = ViT(tiny(attn=attn, **kw))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    model = ViT(tiny(attn=attn, image_size=image_size, **kw))
    done = model.load_for_fine_tuning(src.state_dict(), src.config)
    return src.state_dict(), model.state_dict(), done

@pytest.mark.parametrize("image_size", [24, 12, 32])
def test_position_embeddings_of_another_grid_are_the_old_grid_resampled_bicubic(image_size):
    """Against F.interpolate of the embeddings laid out by hand on the 4 x 4 grid, node i = row * 4 + col."""
    src, new, done = changed_resolution("linear", image_size)
    side = image_size // 4
    grid = torch.stack([torch.stack([src["pos_embed"][0, row * 4 + col] for col in range(4)], -1) for row in range(4)], -2)
    want = torch.nn.functional.interpolate(grid[None], size=(side, side), mode="bicubic", antialias=True)[0]
    got = new["pos_embed"][0]
    assert got.shape == (side * side, 32) and done["resampled"] == ["pos_embed"]
    torch.testing.assert_close(torch.stack([got[row * side + col] for row in range(side) for col in range(side)]),
                               want.permute(1, 2, 0).reshape(-1, 32))
    assert torch.equal(new["blocks.0.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"])

@pytest.mark.parametrize("attn", VARIANTS)
def test_fine_tuning_at_the_same_size_changes_nothing(attn):
    src, new, done = changed_resolution(attn, 16)
    assert done["resampled"] == [] and done["fresh"] == [] and src.keys() == new.keys()
    assert all(torch.equal(src[k], new[k]) for k in src)

@pytest.mark.parametrize("image_size", [24, 12, 32])
def test_toeplitz_tables_are_resampled_at_the_same_offsets_as_fractions_of_the_image(image_size):
    """Offset dr of the new grid of h' patches reads the old table of h = 4 at dr * 4 / h' (the farthest offset
    where that is beyond it): against Keys' cubic convolution in a loop; at 32 px (8 x 8) even offsets are exact."""
    src, new, done = changed_resolution("toeplitz", image_size)
    h, side = 4, image_size // 4
    tables = [k for k in src if k.endswith("table_logits")]
    assert tables and set(tables) <= set(done["resampled"])
    for k in tables:
        assert new[k].shape == (2, 2 * side - 1, 2 * side - 1)
        for head in range(2):
            for i, dr in enumerate(range(1 - side, side)):
                for j, dc in enumerate(range(1 - side, side)):
                    r, c = (min(max(o * h / side, 1 - h), h - 1) + h - 1 for o in (dr, dc))
                    want = bicubic(src[k][head], r, c)
                    assert abs(new[k][head, i, j] - want) < 1e-4, (k, head, dr, dc)
        if side == 8:
            torch.testing.assert_close(new[k][:, 1::2, 1::2], src[k], rtol=0, atol=1e-5)

@pytest.mark.parametrize("attn", ["topo", "grf"])
def test_another_resolution_keeps_the_per_hop_coefficients_and_builds_powers_and_walks_for_the_new_grid(attn):
    src, new, done = changed_resolution(attn, 24)
    coef = [k for k in src if k.endswith("_logits")]
    assert coef and all(torch.equal(new[k], src[k]) and k in done["loaded"] for k in coef)
    model = ViT(tiny(attn=attn, image_size=24))
    model.load_for_fine_tuning(src, tiny(attn=attn))
    layer = model.blocks[0].attn
    fresh = ViT(tiny(attn=attn, image_size=24)).blocks[0].attn  # the powers and walks of the 6 x 6 grid, as built
    if attn == "topo":
        W = masks.normalized_adjacency(masks.grid_graph(6, 6))
        torch.testing.assert_close(layer.W_powers[2], (W @ W).float())
    else:
        assert all(k in done["drawn"] and k not in done["fresh"] for k in src if "grf_" in k)
        assert layer.grf_crow.shape[0] == 2 * 36 + 1 and torch.equal(layer.grf_col, fresh.grf_col)
    assert torch.isfinite(model(torch.randn(2, 3, 24, 24))).all()

@pytest.mark.parametrize("walks, K, dense_at, fast_at", [(100, 100, 784, 3136), (20, 10, 784, 3136)])
def test_auto_takes_grf_dense_and_sparse_paths_where_whole_training_steps_found_each_faster(walks, K, dense_at, fast_at):
    """The Imagenette model's attention (heads of 32 channels, batch 2) with the walks drawn at the reference's
    settings and at the benchmark's: bench.py --mode=train measured the dense step faster at dense_at tokens, the
    sparse one at fast_at (README, 'What they cost')."""
    for n, fast in ((dense_at, False), (fast_at, True)):
        side = math.isqrt(n)
        layer = VARIANTS["grf"](ViTConfig(image_size=4 * side, dim=32, heads=1, grf_walks=walks, mask_max_len=K,
                                          mask_init_decay=0.99), layer=0)
        assert layer.fast_pays(2, n, 32) == fast, (n, layer.work(2, n, 32))

def test_auto_takes_the_toeplitz_fft_only_from_a_grid_larger_than_whole_training_steps_found_it_slower_on():
    """Heads of 32 channels, batch 2: the dense step was faster up to 3,136 tokens (README, 'What they cost')."""
    at = lambda n: VARIANTS["toeplitz"](ViTConfig(image_size=4 * math.isqrt(n), dim=32, heads=1), 0).fast_pays(2, n, 32)
    assert not at(196) and not at(784) and not at(3136) and at(12544)

# -----------------------------------------------------------------------------
# a class token (ViT.from_timm; test_timm.py) is no node of the graph: unmasked

def brute_force_mix(q, k, v, mask, eps=1e-6):
    """out_i = sum_j M_ij (phi(q_i).phi(k_j)) v_j / (sum_j M_ij phi(q_i).phi(k_j) + eps), a loop over every pair, with
    mask [H, T, T] over all T tokens, in float64."""
    q, k, v, mask = q.double().relu(), k.double().relu(), v.double(), mask.double()
    out = torch.zeros_like(v)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                num, den = torch.zeros_like(v[b, h, 0]), 0.0
                for j in range(q.shape[2]):
                    a = mask[h, i, j] * (q[b, h, i] @ k[b, h, j])
                    num, den = num + a * v[b, h, j], den + a
                out[b, h, i] = num / (den + eps)
    return out

@pytest.mark.parametrize('attn, impl', [('linear', 'dense'), ('toeplitz', 'dense'), ('toeplitz', 'fast'), ('topo', 'dense'),
                                        ('grf', 'dense'), ('grf', 'fast')])
def test_a_class_token_attends_to_and_from_every_patch_unmasked(attn, impl):
    """The mask over the class token (index 0) and the 4 x 4 grid's patches is 1 in the class token's row and column and
    the variant's mask between patches: the token mixing equals that loop, on the dense and the fast path."""
    c = ViTConfig(image_size=16, patch_size=4, dim=16, heads=2, attn=attn, attn_impl=impl, class_token=True,
                  grf_walks=4, mask_max_len=3, table_init_decay=0.7, mask_init_decay=0.6)
    layer = VARIANTS[attn](c, layer=0)
    q, k, v = torch.randn(3, 2, 2, 17, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    patches = layer.mask() if hasattr(layer, 'dense_mask') else torch.ones(2, 16, 16)
    mask = torch.ones(2, 17, 17)
    mask[:, 1:, 1:] = patches
    assert (patches != 1).any() or attn == 'linear'
    torch.testing.assert_close(layer.mix(q, k, v).double(), brute_force_mix(q, k, v, mask), rtol=0, atol=1e-6)

@pytest.mark.parametrize('attn', ['toeplitz', 'grf'])
def test_a_class_token_model_gives_the_same_logits_and_gradients_on_the_dense_and_the_fast_path(attn):
    out = {}
    for impl in ('dense', 'fast'):
        torch.manual_seed(0)
        model = ViT(tiny(attn=attn, attn_impl=impl, class_token=True, pool='token', table_init_decay=0.7))
        logits = model.eval()(IMAGES)
        logits.square().sum().backward()
        out[impl] = logits, model.blocks[0].attn.qkv.weight.grad, next(iter(model.mask_parameters().values())).grad
    for a, b in zip(*out.values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

def test_checkpoints_saved_before_the_timm_settings_existed_load_with_their_defaults():
    paths = sorted(glob.glob('results/**/ckpt.pt', recursive=True))[:3]
    if not paths:
        pytest.skip('no checkpoint in results/')
    for path in paths:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        assert 'class_token' not in ckpt['config']
        model = ViT(saved_config(ckpt['config']))
        model.load_state_dict(ckpt['model'])  # strict: no tensor missing, none left over
        assert not model.config.class_token and model.config.pool == 'mean' and model.config.norm_eps == 1e-5
