"""
The experiments on trained runs that rebuild their models from their checkpoints (ckpt.pt), for report.py: the
learned masks to draw (mask_rows), the GRF estimate's error against the exact mask per walk coupling and count
(walk_errors, --walk_error), the models evaluated with their masks swapped (mask_swap, --mask_swap), and each mask's
reach and estimate error per layer (reach_table, --reach). Run alone, it prints the reach table of runs or of a setting:

    python trained_masks.py results/imagenette-features/topo-s0      # a run's trained masks (its ckpt.pt)
    python trained_masks.py configs/imagenette.py --attn=grf --mask_max_len=10 --mask_init_decay=0.5   # at initialisation

A run without a ckpt.pt is built at initialisation from its result.json's settings.
"""
import json
import os
import statistics
import sys
from collections import deque
from dataclasses import asdict, replace

import torch

import data
import masks
import outdir
from configurator import configure, declared, fail
from model import GRAPHS, VARIANTS, GRFAttention, TopoAttention, ViT, ViTConfig, saved_config

def load_checkpoint(run_dir):
    """The run's ckpt.pt and its model config (settings it predates take their defaults); missing or damaged: one line."""
    ckpt = outdir.read_checkpoint(os.path.join(run_dir, 'ckpt.pt'), f"the run {run_dir}")
    return ckpt, saved_config(ckpt['config'])

def load_model(run_dir):
    ckpt, cfg = load_checkpoint(run_dir)
    model = ViT(cfg)
    model.load_state_dict(ckpt['model'])
    return model

def features_mask(graph, f):
    """The exact M = Phi Phi^T, Phi = sum_k f_k W^k, of graph = (nbr, deg) per row of f [H, K+1], [H, N, N] in f's dtype."""
    powers = masks.matrix_powers(masks.normalized_adjacency(graph).double(), 2 * f.shape[1] - 2)
    return masks.topo_mask(powers.to(f.dtype), f)

def first_checkpointed(runs, attn, skipped):
    """The first run of attn that kept its ckpt.pt (checkpoints are not committed with results/), or None; a variant
    whose runs kept none is named, with what it is left out of."""
    mine = [r for r in runs if r['config']['attn'] == attn]
    run = next((r for r in mine if os.path.isfile(os.path.join(r['dir'], 'ckpt.pt'))), None)
    if mine and run is None:
        print(f"{attn}: no ckpt.pt in {', '.join(r['dir'] for r in mine)}: {skipped}")
    return run

@torch.no_grad()
def mask_rows(runs):
    """The learned masks to draw, [(title, [an h x w image per head])]: for each masked variant among the runs, its
    first run that kept its ckpt.pt, per layer the centre token's row of the mask. A variant that samples walks
    (grf) gets a second row per layer, the exact mask of the same f, and the estimate's relative error is printed."""
    rows = []
    for attn, cls in VARIANTS.items():
        run = first_checkpointed(runs, attn, 'no mask picture') if hasattr(cls, 'dense_mask') else None
        if run is None:
            continue
        model = load_model(run['dir'])
        for layer, block in enumerate(model.blocks):
            a = block.attn
            centre = (a.h // 2) * a.w + a.w // 2
            mask = a.mask()
            if not cls.walk_buffers:
                rows.append((f"{attn} L{layer}: M[centre, :]", list(mask[:, centre].view(-1, a.h, a.w))))
                continue
            exact = features_mask(a.graph, a.f_logits.exp())
            err = ((mask - exact).norm() / exact.norm()).item()
            print(f"{attn} layer {layer}: ||M_hat - M|| / ||M|| = {err:.3f} (same learned f; f per head: "
                  + '; '.join(' '.join(f'{v:.2f}' for v in f[:4]) + ' ...' for f in a.f_logits.exp()) + ')')
            rows.append((f"{attn} L{layer}: M_hat[centre, :] (rel. err {err:.2f})", list(mask[:, centre].view(-1, a.h, a.w))))
            rows.append((f"{attn} L{layer}: exact M[centre, :], same f", list(exact[:, centre].view(-1, a.h, a.w))))
    return rows

@torch.no_grad()
def mask_swap(runs, data_dir, walks=(20, 100, 1000), walk_seeds=3):
    """The first topo and grf models evaluated with their mask swapped, the learned coefficients kept: the exact mask,
    and GRF estimates from n walks (walk_seeds fresh ensembles each, the model's coupling). Tells how much the walks'
    noise costs in accuracy. A topo model of the alpha form gets GRF masks only if every head's deconvolution f of
    alpha (f * f = alpha up to K) is non-negative; those estimate Phi Phi^T, which also has the terms beyond K."""
    rows = ["| trained as | its own mask | exact mask |" + ''.join(f" GRF, {n} walks |" for n in walks),
            "|---|---|---|" + "---|" * len(walks)]
    notes = []
    for attn in ('topo', 'grf'):
        r = first_checkpointed(runs, attn, 'not in the mask swap')
        if r is None:
            continue
        ckpt, cfg = load_checkpoint(r['dir'])
        trained = ViT(cfg)  # the checkpoint's modules, for the names of its walks and alpha coefficients
        saved_walks = set(trained.walk_buffers())
        state = {k: v for k, v in ckpt['model'].items() if k not in saved_walks}  # keep the walks a new model samples
        features = state  # the state with f_logits, for the GRF models
        alpha_layers = [name for name, m in trained.named_modules() if isinstance(m, TopoAttention) and m.alpha_form]
        if alpha_layers:
            f = {f'{name}.f_logits': masks.deconvolution(state[f'{name}.alpha_logits'].double().exp()) for name in alpha_layers}
            positive = torch.cat([x.min(-1).values >= 0 for x in f.values()])
            notes.append(f"{os.path.basename(r['dir'])}: alpha's deconvolution is non-negative in {int(positive.sum())} "
                         f"of {len(positive)} heads")
            features = None
            if positive.all():
                alpha_keys = {f'{name}.alpha_logits' for name in alpha_layers}
                features = {**{k: v for k, v in state.items() if k not in alpha_keys},
                            **{k: x.clamp(min=1e-30).log().float() for k, x in f.items()}}
        loaders = data.load(ckpt['config']['dataset'], data_dir, cfg.image_size, micro_batch=1000)
        def top1(state, **change):
            model = ViT(replace(cfg, **change))
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not unexpected and set(missing) <= set(model.walk_buffers()), (missing, unexpected)
            model.eval()
            return 100 * sum((model(x).argmax(1) == y).sum().item() for x, y in loaders.val) / loaders.num_val
        exact = top1(state, attn='topo') if attn == 'topo' else top1(state, attn='topo', topo_form='features')
        cells = []
        for n in walks:
            if features is None:
                cells.append(" – |")
                continue
            acc = [top1(features, attn='grf', grf_walks=n, mask_seed=1000 + s) for s in range(walk_seeds)]
            cells.append(f" {statistics.mean(acc):.2f} ± {statistics.stdev(acc):.2f} |")
        rows.append(f"| {attn} ({os.path.basename(r['dir'])}) | {r['final']['top1']:.2f} | {exact:.2f} |" + ''.join(cells))
    return '\n'.join(rows + [''] + notes)

def grf_mask(graph, f, n_walks, p_halt, coupling, generator):
    """One GRF estimate M_hat = Phi_hat Phi_hat^T on graph = (nbr, deg) per row of f [H, K+1] (a fresh walk ensemble
    each, drawn one after the other with generator), [H, N, N]."""
    layout = masks.grf_walk_layout(graph, [generator] * len(f), n_walks=n_walks, p_halt=p_halt, max_len=f.shape[1] - 1,
                                   coupling=coupling)
    P = masks.csr_to_dense(layout, masks.grf_features(layout, f.flatten()), graph[0].shape[0])
    return P @ P.transpose(1, 2)

@torch.no_grad()
def walk_errors(runs, walks=(5, 20, 100), ensembles=20):
    """Mean ||M_hat - M|| / ||M|| (norms over all heads) of GRF masks per walk coupling and number of walks,
    M = Phi Phi^T exact: f = 0.5^k on the 14x14 grid (K 10, p_halt 0.1), and the learned f of each layer of
    the first grf model among the runs, on its own grid."""
    cases = [('0.5^k (14x14 grid)', masks.grid_graph(14, 14), 0.5 ** torch.arange(11.0, dtype=torch.float64)[None], 0.1)]
    r = first_checkpointed(runs, 'grf', 'no learned f in the walk errors')
    if r is not None:
        model = load_model(r['dir'])
        for layer, block in enumerate(model.blocks):
            a = block.attn
            cases.append((f"learned, layer {layer} ({r['dir']}, {a.h}x{a.w})", a.graph, a.f_logits.exp().double(),
                          a.walk_args['p_halt']))
    rows = ["| f | walks |" + ''.join(f" {c} |" for c in masks.COUPLINGS), "|---|---|" + "---|" * len(masks.COUPLINGS)]
    for title, graph, f, p_halt in cases:
        M = features_mask(graph, f)
        for n in walks:
            cells = []
            for coupling in masks.COUPLINGS:
                if coupling.endswith('antithetic') and n % 2:
                    cells.append(" – |")  # antithetic walkers come in pairs
                    continue
                g = torch.Generator().manual_seed(0)
                errs = [((grf_mask(graph, f, n_walks=n, p_halt=p_halt, coupling=coupling, generator=g) - M).norm()
                         / M.norm()).item() for _ in range(ensembles)]
                cells.append(f" {statistics.mean(errs):.3f} |")
            rows.append(f"| {title} | {n} |" + ''.join(cells))
    return '\n'.join(rows)

def hops_from(graph, node):
    """The number of edges on a shortest path from node to each node of graph = (nbr, deg) (breadth-first), [N];
    -1 where none leads."""
    nbr, _ = graph
    dist = [-1] * nbr.shape[0]
    dist[node], queue = 0, deque([node])
    while queue:
        i = queue.popleft()
        for j in nbr[i].tolist():
            if j >= 0 and dist[j] < 0:
                dist[j] = dist[i] + 1
                queue.append(j)
    return torch.tensor(dist)

@torch.no_grad()
def layer_reach(a, c, radii=(1, 2, 4)):
    """One topo or grf layer a of a model of config c: ([the share of the centre patch's row of the exact mask within
    r hops on the layer's graph, mean over heads, for r in radii], ||M_hat - M|| / ||M|| of the GRF estimate of that
    mask, or None). grf: M its exact mask for the same f, M_hat its own walks' estimate. topo of the features form:
    M_hat from fresh walks of c's settings (grf_walks, grf_p_halt, grf_coupling, drawn from mask_seed); alpha: None."""
    grf, graph = isinstance(a, GRFAttention), GRAPHS[c.graph](a.h, a.w)
    f = a.f_logits.exp().double() if grf or not a.alpha_form else None
    exact = features_mask(graph, f) if f is not None else a.mask().double()
    centre = (a.h // 2) * a.w + a.w // 2
    hops, row = hops_from(graph, centre), exact[:, centre]  # [H, N]
    shares = [((row * ((hops >= 0) & (hops <= r))).sum(-1) / row.sum(-1)).mean().item() for r in radii]
    if grf:
        estimate = a.mask().double()
    elif f is not None:
        estimate = grf_mask(graph, f, n_walks=c.grf_walks, p_halt=c.grf_p_halt, coupling=c.grf_coupling,
                            generator=torch.Generator().manual_seed(c.mask_seed))
    else:
        return shares, None
    return shares, ((estimate - exact).norm() / exact.norm()).item()

def reach_table(models, radii=(1, 2, 4)):
    """The reach table of models = [(title, ViT)]: per topo or grf layer the share of the centre patch's mask row
    within r hops and the GRF estimate's relative error (layer_reach)."""
    rows = ["| model | layer |" + ''.join(f" within {r} hop{'s' * (r > 1)} |" for r in radii) + " GRF rel. error |",
            "|---|---|" + "---|" * (len(radii) + 1)]
    for title, model in models:
        for layer, block in enumerate(model.blocks):
            if isinstance(block.attn, (TopoAttention, GRFAttention)):
                shares, err = layer_reach(block.attn, model.config, radii)
                rows.append(f"| {title} | {layer} |" + ''.join(f" {s:.3f} |" for s in shares)
                            + (" – |" if err is None else f" {err:.3f} |"))
    return '\n'.join(rows)

def at_initialisation(config):
    """The model of a run's settings (a train.py config dict) as it starts: seeded by its seed, walks by its mask_seed."""
    torch.manual_seed(config.get('seed', 0))
    return ViT(saved_config(config))

def reach_models(runs):
    """[(title, model)] for reach_table: per folder and topo or grf variant, its first run, trained if it kept its
    ckpt.pt, else at initialisation."""
    firsts = {}
    for r in sorted(runs, key=lambda r: r['dir']):
        if r['config']['attn'] in ('topo', 'grf'):
            firsts.setdefault((os.path.dirname(r['dir']), r['config']['attn']), r)
    return [run_model(r['dir'], r['config']) for r in firsts.values()]

def run_model(run_dir, config):
    """(title, model) of a run: its ckpt.pt's model if it kept one, else its settings' model at initialisation."""
    if os.path.isfile(os.path.join(run_dir, 'ckpt.pt')):
        return f"{run_dir} (trained)", load_model(run_dir)
    return f"{run_dir} (at initialisation)", at_initialisation(config)

if __name__ == '__main__':
    args = sys.argv[1:]
    if not args or {'-h', '--help'} & set(args):
        print(__doc__.strip())
        sys.exit(0)
    dirs = [a for a in args if os.path.isdir(a)]
    if dirs and len(dirs) < len(args):
        fail(f"give run folders, or a config file with --key=value settings, not both: {args}")
    models = []
    for d in dirs:
        result = os.path.join(d, 'result.json')
        if not os.path.isfile(os.path.join(d, 'ckpt.pt')) and not os.path.isfile(result):
            fail(f"{d} holds no ckpt.pt or result.json", kind='data')
        models.append(run_model(d, None if os.path.isfile(os.path.join(d, 'ckpt.pt')) else json.load(open(result))['config']))
    if not dirs:
        settings = asdict(ViTConfig()) | declared(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py'))
        configure(settings, args)
        if settings['attn'] not in ('topo', 'grf'):
            fail(f"attn={settings['attn']!r} has no graph mask; valid: topo, grf")
        settings.update(in_channels=settings['in_channels'] or 3, num_classes=settings['num_classes'] or 10)
        cfg = {k: settings[k] for k in asdict(ViTConfig())}
        models.append((f"{settings['attn']} at initialisation", at_initialisation({**cfg, 'seed': settings['seed']})))
    print(reach_table(models))
