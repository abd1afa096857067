"""
Collects every result.json under a folder into a Markdown table (mean +- std of the final top-1 per variant of
model.VARIANTS, the epochs each trained, beside the published top-1 that the runs' config records), and draws the
test-accuracy curves and the learned masks (matplotlib, optional) beside the runs: <folder>/curves.png, masks.png.

    python report.py out/sweep                 # the table + out/sweep/curves.png + out/sweep/masks.png
    python report.py out/sweep --no_plots      # the table alone
    python report.py out/sweep --no_plots --runs   # and each run's figure
    python report.py out/sweep --out=assets/mine   # the pictures as assets/mine/curves.png and masks.png
    python report.py out/a out/b --no_plots    # several folders: a row per variant and per setting that differs
    python report.py out/sweep --no_plots --mask_swap=DATA_DIR   # + the topo/grf models with their masks swapped
    python report.py out/sweep --no_plots --walk_error   # + the GRF mask's error per walk coupling and walk count
    python report.py out/sweep --no_plots --walk_error=20,100,1000 --ensembles=3   # other walk counts, fewer draws

With several folders the pictures go to the folder that holds them all (or --out).
"""
import ast
import glob
import json
import os
import re
import statistics
import sys
from dataclasses import replace

import torch

import data
import masks
from model import VARIANTS, Attention, TopoAttention, ViT, saved_config

def load_runs(root):
    runs = []
    for path in sorted(glob.glob(os.path.join(root, '**', 'result.json'), recursive=True)):
        with open(path) as f:
            r = json.load(f)
        r['dir'] = os.path.dirname(path)
        runs.append(r)
    return runs

def datasets(runs):
    """The runs' datasets, each once, in the order of the runs."""
    return list(dict.fromkeys(r['config']['dataset'] for r in runs))

def is_masked(cls):
    """Whether a variant masks a linear attention: it defines dense_mask() and holds mask parameters."""
    return hasattr(cls, 'dense_mask')

def knobs(cls):
    """The settings that act on a variant's mask, for the table: the learning-rate multiplier of its mask
    parameters (if it has any), its model settings (`settings`), and the redrawing of its walks (if it samples any)."""
    lr_mult = ('mask_lr_mult',) if is_masked(cls) else ()
    redraw = ('grf_resample_every',) if cls.sampled else ()
    return lr_mult + tuple(cls.settings) + redraw

def knob(r, k):
    """The run's setting k, None where it does not act; runs from before a knob existed ran at its default."""
    cls = VARIANTS.get(r['config']['attn'])
    if cls is None or k not in knobs(cls):
        return None
    if k in r['config']:
        return r['config'][k]
    return getattr(saved_config(r['config']), k, 0)  # a training setting the run predates was off

# settings that do not change what a run learns: runs differing only in these share a row
NOT_RECIPE = {'attn', 'seed', 'mask_seed', 'epochs', 'out_dir', 'data_dir', 'init_from', 'eval_only', 'log_interval',
              'ckpt_interval', 'wandb_log', 'wandb_project', 'wandb_run_name', 'published', 'num_workers', 'device',
              'compile', 'attn_impl'}

def train_defaults():
    """train.py's settings and their defaults, read from its source (the globals above its '# ---' line)."""
    source = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')).read().split('\n# ---')[0]
    return {k: ast.literal_eval(v) for k, v in re.findall(r"^(\w+) = ([^#\n]*?)\s*(?:#.*)?$", source, re.M)}

def recipe(r, k, defaults):
    """The run's setting k that is not a knob; a setting the run predates ran at its default."""
    if k in r['config']:
        return r['config'][k]
    return getattr(saved_config(r['config']), k, defaults.get(k))

def is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True

def published(config):
    """The published top-1 (%) per variant that a run's config records, {attn: text}: its setting `published`,
    'attn:top1,...' ('' or absent in older runs: none)."""
    text = config.get('published', '')
    values = {}
    for item in text.split(',') if text else []:
        attn, colon, value = (part.strip() for part in item.partition(':'))
        if not (attn and colon and is_number(value)):
            raise ValueError(f"published={text!r} is malformed; valid: 'attn:top1,...', e.g. 'softmax:86.54,linear:86.36'")
        values[attn] = value
    return values

def epochs_trained(r):
    """The epochs the run trained (fewer than its setting when max_steps stopped it), from result.json; runs that
    predate the record ran all of theirs."""
    return round(r['epochs_trained'], 2) if 'epochs_trained' in r else r['config']['epochs']

def cell(value):
    if value is None:
        return '–'
    return str(value) if isinstance(value, (str, bool)) else f"{value:g}"

def table(runs):
    all_knobs = dict.fromkeys(k for cls in VARIANTS.values() for k in knobs(cls))
    defaults = train_defaults()
    value = lambda r, k: knob(r, k) if k in all_knobs else recipe(r, k, defaults)
    others = dict.fromkeys(k for r in runs for k in r['config'] if k not in all_knobs and k not in NOT_RECIPE)
    columns = [k for k in [*all_knobs, *others] if len({str(value(r, k)) for r in runs} - {'None'}) > 1]
    rows = ["| attention | " + ''.join(f"{k} | " for k in columns) + "top-1 (%) mean ± std | seeds | epochs "
            "| images/s (train) | published top-1 |", "|---|" + "---|" * (len(columns) + 5)]
    for attn in VARIANTS:
        groups = {}
        for r in runs:
            if r['config']['attn'] == attn:
                groups.setdefault((*(value(r, k) for k in columns), epochs_trained(r)), []).append(r)
        for (*values, epochs), rs in sorted(groups.items(), key=lambda g: str(g[0])):
            acc = [r['final']['top1'] for r in rs]
            spread = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""  # one seed has no spread
            ips = statistics.median(r['images_per_s'] for r in rs)
            settings = ''.join(f"{cell(v)} | " for v in values)
            paper = [v for v in dict.fromkeys(published(r['config']).get(attn) for r in rs) if v is not None]
            rows.append(f"| {attn} | {settings}{statistics.mean(acc):.2f}{spread} | {len(acc)} "
                        f"| {epochs:g} | {ips:,.0f} | {', '.join(paper)} |")
    return '\n'.join(rows)

def run_table(runs):
    """Each run's final and best top-1 (%), by variant (in VARIANTS' order), then seed."""
    rows = ["| run | attention | seed | top-1 (%) | best top-1 (%) | images/s (train) |", "|---|---|---|---|---|---|"]
    order = {attn: i for i, attn in enumerate(VARIANTS)}
    for r in sorted(runs, key=lambda r: (order.get(r['config']['attn'], len(order)), r['config']['seed'], r['dir'])):
        rows.append(f"| {os.path.basename(r['dir'])} | {r['config']['attn']} | {r['config']['seed']} | {r['final']['top1']:.2f} "
                    f"| {r['best']['top1']:.2f} | {r['images_per_s']:,.0f} |")
    return '\n'.join(rows)

def curves(runs, path):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for attn in VARIANTS:
        per_run = []
        for r in (r for r in runs if r['config']['attn'] == attn):
            with open(os.path.join(r['dir'], 'metrics.jsonl')) as f:
                per_run.append([json.loads(l)['top1'] for l in f if '"eval"' in l])
        if per_run:
            n = min(map(len, per_run))
            mean = [statistics.mean(c[e] for c in per_run) for e in range(n)]
            ax.plot(range(1, n + 1), mean, label=f"{attn} ({len(per_run)} seed{'s' * (len(per_run) > 1)})")
    ax.set(xlabel='epoch', ylabel='test top-1 (%)', title=', '.join(datasets(runs)))
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
        run = first_checkpointed(runs, attn, 'no mask picture') if is_masked(cls) else None
        if run is None:
            continue
        model = load_model(run['dir'])
        for layer, block in enumerate(model.blocks):
            a = block.attn
            centre = (a.h // 2) * a.w + a.w // 2
            mask = a.mask()
            if not cls.sampled:
                rows.append((f"{attn} L{layer}: M[centre, :]", list(mask[:, centre].view(-1, a.h, a.w))))
                continue
            exact = features_mask(a.graph, a.f_logits.exp())
            err = ((mask - exact).norm() / exact.norm()).item()
            print(f"{attn} layer {layer}: ||M_hat - M|| / ||M|| = {err:.3f} (same learned f; f per head: "
                  + '; '.join(' '.join(f'{v:.2f}' for v in f[:4]) + ' ...' for f in a.f_logits.exp()) + ')')
            rows.append((f"{attn} L{layer}: M_hat[centre, :] (rel. err {err:.2f})", list(mask[:, centre].view(-1, a.h, a.w))))
            rows.append((f"{attn} L{layer}: exact M[centre, :], same f", list(exact[:, centre].view(-1, a.h, a.w))))
    return rows

def mask_pictures(runs, path):
    """mask_rows drawn: a row of pictures per row, a column per head."""
    import matplotlib.pyplot as plt
    rows = mask_rows(runs)
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

def walk_buffers(model):
    """The state keys of the walks that a model samples (its attention layers' `sampled` buffers)."""
    return {f'{name}.{b}' for name, m in model.named_modules() if isinstance(m, Attention) for b in m.sampled}

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
        saved_walks = walk_buffers(trained)
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
            assert not unexpected and set(missing) <= walk_buffers(model), (missing, unexpected)
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
                          a.walk_settings['p_halt']))
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


def picture_paths(roots, out=None):
    """Where the pictures go: <out>/curves.png and <out>/masks.png, out by default the folder that holds every root."""
    out = out or os.path.commonpath([os.path.abspath(r) for r in roots] if len({os.path.isabs(r) for r in roots}) > 1 else roots)
    return os.path.join(out, 'curves.png'), os.path.join(out, 'masks.png')

def option(name, default=None):
    """The value of --name=value on the command line ('' for a bare --name), or default when it is not there."""
    return next((a.partition('=')[2] for a in sys.argv[1:] if a.split('=')[0] == name), default)

if __name__ == '__main__':
    if {'-h', '--help'} & set(sys.argv):
        sys.exit(print(__doc__))
    options = ('--no_plots', '--runs', '--out', '--mask_swap', '--walk_error', '--ensembles')
    unknown = [a for a in sys.argv[1:] if a.startswith('-') and a.split('=')[0] not in options]
    if unknown:
        sys.exit(f"{unknown[0]}: unknown option; valid: {', '.join(options)} (python report.py --help)")
    walks, ensembles, count = option('--walk_error'), option('--ensembles', '20'), r'[1-9]\d*'
    walks = '5,20,100' if walks == '' else walks  # a bare --walk_error: the default walk counts
    if walks is not None and not (re.fullmatch(f'{count}(,{count})*', walks) and re.fullmatch(count, ensembles)):
        sys.exit(f"--walk_error={walks} --ensembles={ensembles}: valid: walk counts and a count of ensembles >= 1, "
                 f"e.g. --walk_error=20,100 --ensembles=3")
    roots = [a for a in sys.argv[1:] if not a.startswith('--')] or ['out/sweep']
    runs = [r for root in roots for r in load_runs(root)]
    if not runs:
        sys.exit(f"no result.json under {', '.join(roots)}")
    print(table(runs))
    if '--runs' in sys.argv:
        print('\n' + run_table(runs))
    if '--no_plots' not in sys.argv:
        curves_path, masks_path = picture_paths(roots, option('--out'))
        os.makedirs(os.path.dirname(curves_path) or '.', exist_ok=True)
        curves(runs, curves_path)
        mask_pictures(runs, masks_path)
        print(f"wrote {curves_path}, {masks_path}")
    if walks is not None:
        print(walk_errors(runs, tuple(map(int, walks.split(','))), int(ensembles)))
    data_dir = option('--mask_swap')
    if data_dir:
        print(mask_swap(runs, data_dir))
