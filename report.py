"""
Collects every result.json under a folder into a Markdown table (mean +- std of the final top-1 per variant,
beside the seed's FashionMNIST numbers), and draws the test-accuracy curves and the learned masks
(matplotlib, optional) into assets/.

    python report.py out/sweep                 # table + assets/fmnist_curves.png + assets/fmnist_masks.png
    python report.py out/sweep --no_plots      # the table alone
    python report.py out/a out/b --no_plots    # several folders: a row per variant and per mask setting that differs
    python report.py out/sweep --no_plots --mask_swap=DATA_DIR   # + the topo/grf models with their masks swapped
    python report.py out/sweep --no_plots --walk_error   # + the GRF mask's error per walk coupling and walk count
"""
import glob
import json
import os
import statistics
import sys
from dataclasses import replace

import torch

import data
import masks
from model import ATTNS, ViT, saved_config

SEED_RESULT = {'softmax': 86.54, 'toeplitz': 88.03, 'topo': 87.21, 'grf': 86.99, 'linear': 86.36}

def load_runs(root):
    runs = []
    for path in sorted(glob.glob(os.path.join(root, '**', 'result.json'), recursive=True)):
        with open(path) as f:
            r = json.load(f)
        r['dir'] = os.path.dirname(path)
        runs.append(r)
    return runs

# mask settings, and the variants they act on: a column when they vary
KNOBS = {'mask_lr_mult': ('toeplitz', 'topo', 'grf'), 'mask_init_decay': ('topo', 'grf'), 'table_init_decay': ('toeplitz',),
         'grf_walks': ('grf',), 'grf_p_halt': ('grf',), 'grf_coupling': ('grf',), 'grf_resample_every': ('grf',),
         'topo_form': ('topo',)}

def knob(r, k):
    """The run's setting k, None where it does not act; runs from before a knob existed ran at its default."""
    if r['config']['attn'] not in KNOBS[k]:
        return None
    if k in r['config']:
        return r['config'][k]
    return getattr(saved_config(r['config']), k, 0)  # a training setting the run predates was off

def table(runs):
    knobs = [k for k in KNOBS if len({knob(r, k) for r in runs} - {None}) > 1]
    rows = ["| attention | " + ''.join(f"{k} | " for k in knobs) + "top-1 (%) mean ± std | seeds | epochs "
            "| images/s (train) | seed's top-1 |", "|---|" + "---|" * (len(knobs) + 5)]
    for attn in ATTNS:
        groups = {}
        for r in runs:
            if r['config']['attn'] == attn:
                groups.setdefault(tuple(knob(r, k) for k in knobs), []).append(r)
        for values, rs in sorted(groups.items(), key=lambda g: str(g[0])):
            acc = [r['final']['top1'] for r in rs]
            std = statistics.stdev(acc) if len(acc) > 1 else float('nan')
            eps = sorted({r['config']['epochs'] for r in rs})
            ips = statistics.median(r['images_per_s'] for r in rs)
            settings = ''.join('– | ' if v is None else f"{v} | " if isinstance(v, str) else f"{v:g} | " for v in values)
            rows.append(f"| {attn} | {settings}{statistics.mean(acc):.2f} ± {std:.2f} | {len(acc)} "
                        f"| {','.join(map(str, eps))} | {ips:,.0f} | {SEED_RESULT.get(attn, '')} |")
    return '\n'.join(rows)

def curves(runs, path):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for attn in ATTNS:
        per_run = []
        for r in (r for r in runs if r['config']['attn'] == attn):
            with open(os.path.join(r['dir'], 'metrics.jsonl')) as f:
                per_run.append([json.loads(l)['top1'] for l in f if '"eval"' in l])
        if per_run:
            n = min(map(len, per_run))
            mean = [statistics.mean(c[e] for c in per_run) for e in range(n)]
            ax.plot(range(1, n + 1), mean, label=f"{attn} ({len(per_run)} seeds)")
    ax.set(xlabel='epoch', ylabel='test top-1 (%)', title='FashionMNIST')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)

def load_checkpoint(run_dir):
    """The run's ckpt.pt and its model config (settings it predates take their defaults)."""
    ckpt = torch.load(os.path.join(run_dir, 'ckpt.pt'), map_location='cpu', weights_only=False)
    return ckpt, saved_config(ckpt['config'])

def load_model(run_dir):
    ckpt, cfg = load_checkpoint(run_dir)
    model = ViT(cfg)
    model.load_state_dict(ckpt['model'])
    return model

@torch.no_grad()
def mask_pictures(runs, path):
    """Rows: the Toeplitz table, the exact topological mask's row of the centre token, and the GRF estimate
    of the same row next to the exact row for the GRF model's own f, per layer; columns: heads."""
    import matplotlib.pyplot as plt
    pick = {a: next((r['dir'] for r in runs if r['config']['attn'] == a), None) for a in ('toeplitz', 'topo', 'grf')}
    rows = []  # (title, [H images])
    for attn, run_dir in pick.items():
        if run_dir is None:
            continue
        model = load_model(run_dir)
        for layer, block in enumerate(model.blocks):
            a = block.attn
            h, w = a.h, a.w
            centre = (h // 2) * w + w // 2
            if attn == 'toeplitz':
                rows.append((f"toeplitz L{layer}: table t[dr, dc]", list(a.table_logits.exp())))
                continue
            exact = masks.topo_mask(masks.matrix_powers(masks.grid_adjacency(h, w).double(), 2 * a.f_logits.shape[1] - 2).float(),
                                    a.f_logits.exp())
            if attn == 'topo':
                rows.append((f"topo L{layer}: M[centre, :]", [m[centre].view(h, w) for m in exact]))
                continue
            est = a.mask()
            err = ((est - exact).norm() / exact.norm()).item()
            print(f"grf layer {layer}: ||M_hat - M|| / ||M|| = {err:.3f} (same learned f; f per head: "
                  + '; '.join(' '.join(f'{v:.2f}' for v in f[:4]) + ' ...' for f in a.f_logits.exp()) + ')')
            rows.append((f"grf L{layer}: M_hat[centre, :] (rel. err {err:.2f})", [m[centre].view(h, w) for m in est]))
            rows.append((f"grf L{layer}: exact M[centre, :], same f", [m[centre].view(h, w) for m in exact]))
    if not rows:
        return
    H = max(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), H, figsize=(2.1 * H, 2.0 * len(rows)), squeeze=False)
    for i, (title, imgs) in enumerate(rows):
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(imgs):
                im = ax.imshow(imgs[j].numpy(), cmap='viridis')
                fig.colorbar(im, ax=ax, fraction=0.046)
                ax.set_title(f"head {j}", fontsize=8)
        axes[i][0].set_ylabel(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)

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
        r = next((r for r in runs if r['config']['attn'] == attn), None)
        if r is None:
            continue
        ckpt, cfg = load_checkpoint(r['dir'])
        state = {k: v for k, v in ckpt['model'].items() if '.grf_' not in k}  # keep the walks a new model samples
        features = state  # the state with f_logits, for the GRF models
        alpha = {k: v for k, v in state.items() if k.endswith('alpha_logits')}
        if alpha:
            f = {k.replace('alpha_logits', 'f_logits'): masks.deconvolution(v.double().exp()) for k, v in alpha.items()}
            positive = torch.cat([x.min(-1).values >= 0 for x in f.values()])
            notes.append(f"{os.path.basename(r['dir'])}: alpha's deconvolution is non-negative in {int(positive.sum())} "
                         f"of {len(positive)} heads")
            features = None
            if positive.all():
                features = {**{k: v for k, v in state.items() if k not in alpha},
                            **{k: x.clamp(min=1e-30).log().float() for k, x in f.items()}}
        d = data.load(ckpt['config']['dataset'], data_dir, cfg.image_size, 1000)
        def top1(state, **change):
            model = ViT(replace(cfg, **change))
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not unexpected and all('.grf_' in k for k in missing), (missing, unexpected)
            model.eval()
            return 100 * sum((model(x).argmax(1) == y).sum().item() for x, y in d.val) / d.num_val
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

def grf_mask(h, w, f, n_walks, p_halt, coupling, generator):
    """One GRF estimate M_hat = Phi_hat Phi_hat^T per row of f [H, K+1] (a fresh walk ensemble each), [H, N, N]."""
    N, P = h * w, []
    for fh in f:
        step, start, node, load = masks.sample_grf_walks(h, w, n_walks, p_halt, f.shape[1] - 1, generator, coupling)
        cols, slot = masks.grf_layout(start, node, N)
        P.append(masks.ell_to_dense(cols, masks.grf_features(slot, step, load.double(), fh, N, cols.shape[1]), N))
    P = torch.stack(P)
    return P @ P.transpose(1, 2)

@torch.no_grad()
def walk_errors(runs, walks=(5, 20, 100), ensembles=20):
    """Mean ||M_hat - M|| / ||M|| (norms over all heads) of GRF masks per walk coupling and number of walks,
    M = Phi Phi^T exact: f = 0.5^k on the 14x14 grid (K 10, p_halt 0.1), and the learned f of each layer of
    the first grf model among the runs, on its own grid."""
    cases = [('0.5^k (14x14 grid)', 14, 14, 0.5 ** torch.arange(11.0, dtype=torch.float64)[None], 0.1)]
    r = next((r for r in runs if r['config']['attn'] == 'grf'), None)
    if r is not None:
        model = load_model(r['dir'])
        for layer, block in enumerate(model.blocks):
            a = block.attn
            cases.append((f"learned, layer {layer} ({r['dir']}, {a.h}x{a.w})", a.h, a.w, a.f_logits.exp().double(),
                          a.walk_settings['p_halt']))
    rows = ["| f | walks |" + ''.join(f" {c} |" for c in masks.COUPLINGS), "|---|---|" + "---|" * len(masks.COUPLINGS)]
    for title, h, w, f, p_halt in cases:
        M = masks.topo_mask(masks.matrix_powers(masks.grid_adjacency(h, w).double(), 2 * f.shape[1] - 2), f)
        for n in walks:
            cells = []
            for coupling in masks.COUPLINGS:
                if coupling.endswith('antithetic') and n % 2:
                    cells.append(" – |")  # antithetic walkers come in pairs
                    continue
                g = torch.Generator().manual_seed(0)
                errs = [((grf_mask(h, w, f, n, p_halt, coupling, g) - M).norm() / M.norm()).item() for _ in range(ensembles)]
                cells.append(f" {statistics.mean(errs):.3f} |")
            rows.append(f"| {title} | {n} |" + ''.join(cells))
    return '\n'.join(rows)

if __name__ == '__main__':
    if {'-h', '--help'} & set(sys.argv):
        sys.exit(print(__doc__))
    roots = [a for a in sys.argv[1:] if not a.startswith('--')] or ['out/sweep']
    runs = [r for root in roots for r in load_runs(root)]
    if not runs:
        sys.exit(f"no result.json under {', '.join(roots)}")
    print(table(runs))
    if '--no_plots' not in sys.argv:
        os.makedirs('assets', exist_ok=True)
        curves(runs, 'assets/fmnist_curves.png')
        mask_pictures(runs, 'assets/fmnist_masks.png')
        print("wrote assets/fmnist_curves.png, assets/fmnist_masks.png")
    if '--walk_error' in sys.argv:
        print(walk_errors(runs))
    data_dir = next((a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith('--mask_swap=')), None)
    if data_dir:
        print(mask_swap(runs, data_dir))
