"""
Reads every result.json under the folders named into a Markdown table (mean +- std of the final top-1 per variant of
model.VARIANTS, the epochs each trained, beside the published top-1 that the runs' config records), and draws the
test-accuracy curves and the learned masks (matplotlib, optional) beside the runs: <folder>/curves.png, masks.png.
The experiments that rebuild the trained models from their checkpoints (--walk_error, --mask_swap, the mask
pictures) are in trained_masks.py.

    python report.py out/sweep                 # the table + out/sweep/curves.png + out/sweep/masks.png
    python report.py out/sweep --no_plots      # the table alone
    python report.py out/sweep --no_plots --runs   # and each run's figure
    python report.py out/sweep --no_plots --vs=linear   # and each row against linear, paired by seed
    python report.py out/sweep --out=assets/mine   # the pictures as assets/mine/curves.png and masks.png
    python report.py out/a out/b --no_plots    # several folders: a row per variant and per setting that differs
    python report.py out/a out/b --no_plots --vs=grf:grf_walks=100   # each row against grf's runs with 100 walks
    python report.py out/sweep --no_plots --vs=linear --group=toeplitz,topo,grf   # + the masks' mean against linear
    python report.py out/sweep --no_plots --mask_swap=DATA_DIR   # + the topo/grf models with their masks swapped
    python report.py out/sweep --no_plots --reach      # + each mask's reach and GRF error per layer
    python report.py out/sweep --no_plots --walk_error=5,20,100  # + the GRF mask's error per walk coupling and count
    python report.py out/sweep --no_plots --walk_error=20,100,1000 --ensembles=3   # other walk counts, fewer draws

With several folders the pictures go to the folder that holds them all (or --out). Options follow configurator.py's
rules: --key=value, each checked before anything is read; --no_plots and --runs are given bare.
"""
import ast
import glob
import importlib
import json
import math
import os
import re
import statistics
import sys

import data
import trained_masks
from configurator import configure, declared, fail
from model import VARIANTS, saved_config

no_plots = False           # the table alone: no curves.png and masks.png
runs = False               # also a table of each run's final and best top-1
reach = False              # also each topo and grf mask's reach and GRF error per layer (per folder, its first run:
                           # trained if it kept its ckpt.pt, else at initialisation)
out = ''                   # the folder for curves.png and masks.png ('' = the folder that holds every folder named)
vs = ''                    # a variant, or its runs of some settings ('grf:graph=grid4'): each row adds its mean paired
                           # difference in top-1 to those runs, over the seeds both ran (same seed: same data order
                           # and initial weights), its 95% interval and pairs won. 'source': each fine-tuned run against
                           # the run it started from (its init_from's folder, named too); 'scratch': against the same
                           # variant's runs from scratch
walk_error = ''            # walk counts, e.g. '5,20,100': the GRF mask's error per walk coupling and count ('' = none)
ensembles = 20             # walk_error: fresh walk ensembles drawn per walk count and coupling
group = ''                 # variants, e.g. 'toeplitz,topo,grf' (with vs): per seed their mean top-1 against vs's runs
at_epochs = ''             # epochs, e.g. '0,1,2,4': each row's mean top-1 after them too (metrics.jsonl; 0: a
                           # fine-tuning run's model as converted)
mask_swap = ''             # a data_dir: the first topo and grf models evaluated with their masks swapped ('' = none)
FLAGS = ('no_plots', 'runs', 'reach')  # given bare
# -----------------------------------------------------------------------------
SETTINGS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, str))}
TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')  # its settings are the runs'

def load_runs(root):
    runs = []
    for path in sorted(glob.glob(os.path.join(root, '**', 'result.json'), recursive=True)):
        with open(path) as f:
            r = json.load(f)
        r['dir'] = os.path.dirname(path)
        runs.append(r)
    return runs

def datasets(runs):
    """The runs' data, each once, in the order of the runs: a folder dataset by its folder's name (imagenette, not
    imagenet), another by its name."""
    name = lambda c: os.path.basename(os.path.normpath(c['data_dir'])) if c['dataset'] in data.FILE_SETS else c['dataset']
    return list(dict.fromkeys(name(r['config']) for r in runs))

def is_masked(cls):
    """Whether a variant masks a linear attention: it defines dense_mask() and holds mask parameters."""
    return hasattr(cls, 'dense_mask')

def knobs(cls):
    """The settings that act on a variant's mask, for the table: the learning-rate multiplier of its mask
    parameters (if it has any), its model settings (`mask_settings`), and the redrawing of its walks (if it samples any)."""
    lr_mult = ('mask_lr_mult',) if is_masked(cls) else ()
    redraw = ('grf_resample_every',) if cls.walk_buffers else ()
    return lr_mult + tuple(cls.mask_settings) + redraw

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

def t_quantile(p, df):
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom: the density integrated by Simpson's rule
    from 0, inverted by bisection (no scipy)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda x: math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))
    def cdf(x, n=2000):
        h = x / n
        return 0.5 + h / 3 * sum((1 if i in (0, n) else 4 if i % 2 else 2) * density(i * h) for i in range(n + 1))
    lo, hi = 0.0, 1000.0
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if cdf((lo + hi) / 2) < p else (lo, (lo + hi) / 2)
    return (lo + hi) / 2

MAX_FLIPS = 16             # sign-flip p-values enumerate all 2^n sign patterns up to this many pairs

def sign_flip_p(diffs):
    """The exact two-sided p-value of the paired sign-flip test: the share of the 2^n patterns of signs s_i whose
    |sum s_i d_i| is at least the observed |sum d_i| (under no effect each difference is as likely negative). The
    patterns come in pairs of opposite sign, so half of them are counted. None above MAX_FLIPS pairs."""
    n = len(diffs)
    if n > MAX_FLIPS:
        return None
    observed = abs(sum(diffs)) - 1e-9 * (1 + sum(map(abs, diffs)))  # a pattern that ties counts, whatever the rounding
    rest = diffs[1:]
    hits = sum(abs(diffs[0] + sum(d if m >> i & 1 else -d for i, d in enumerate(rest))) >= observed
               for m in range(2 ** (n - 1)))
    return hits / 2 ** (n - 1)

def holm(ps):
    """Holm's step-down adjustment of the p-values ps (None: no test) for the family of those that are not None:
    the j-th smallest (from 0) times (m - j), at least its predecessor's, at most 1."""
    order = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    adjusted, running = list(ps), 0.0
    for j, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - j) * p))
        adjusted[i] = running
    return adjusted

def per_seed(rs, who):
    """{seed: top-1} of runs rs, or the reason they do not pair by seed (a seed run more than once)."""
    top1 = {}
    for r in rs:
        seed = r['config']['seed']
        if seed in top1:
            return f"seed {seed}: {sum(x['config']['seed'] == seed for x in rs)} {who}"
        top1[seed] = r['final']['top1']
    return top1

def summary(diffs):
    """Paired differences summarised: (mean, half-width of its 95% Student-t interval (None for one pair), pairs won,
    pairs, exact sign-flip p)."""
    n = len(diffs)
    half = t_quantile(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None
    return statistics.mean(diffs), half, sum(d > 0 for d in diffs), n, sign_flip_p(diffs)

def paired(rs, base):
    """rs against the base runs of the same seed: summary() of the differences in top-1, or the reason there are none
    (a seed run twice in the row or in the base, or no seed in common): runs pair only one to one."""
    mine, theirs = per_seed(rs, 'runs in the row'), per_seed(base, 'base runs')
    for reason in (mine, theirs):
        if isinstance(reason, str):
            return reason
    diffs = [top1 - theirs[seed] for seed, top1 in mine.items() if seed in theirs]
    return summary(diffs) if diffs else 'no seed in common' if base else 'no base run of its settings'

def group_contrast(members, base):
    """Per seed that every member and the base ran once: the members' mean top-1 minus the base's; summary() of
    those differences, or the reason there are none. members: a list of runs per variant."""
    tables = [per_seed(rs, 'runs of a member') for rs in members] + [per_seed(base, 'base runs')]
    reason = next((t for t in tables if isinstance(t, str)), None)
    if reason:
        return reason
    seeds = sorted(set.intersection(*(set(t) for t in tables)))
    diffs = [statistics.mean(t[s] for t in tables[:-1]) - tables[-1][s] for s in seeds]
    return summary(diffs) if diffs else 'no seed in common'

# whether a run started from scratch; 'resume': one resumed before train.py kept its start in the record (the studies' were)
from_scratch = lambda r: r['config'].get('init_from', 'scratch') in ('scratch', 'resume')
# vs='source' | 'scratch': the base runs of run r, by lineage rather than by settings (b: a candidate)
LINEAGE = {'source': lambda r, b: os.path.realpath(b['dir']) == os.path.realpath(os.path.dirname(r['config'].get('init_from', ''))),
           'scratch': lambda r, b: b['config']['attn'] == r['config']['attn'] and from_scratch(b)}

def top1_after(r, epoch):
    """The run's top-1 at its evaluation after `epoch` epochs (metrics.jsonl; epoch 0: a fine-tuning run's converted
    model), None if it has none."""
    if 'evals' not in r:
        path = os.path.join(r['dir'], 'metrics.jsonl')
        lines = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
        r['evals'] = {e['epoch']: e['top1'] for e in lines if e.get('kind') == 'eval'}
    return r['evals'].get(epoch)

def typed(key, raw, defaults):
    """A setting's value given as text ('10'), as the setting's type (10.0 for a float setting), or None if it is not one."""
    default = defaults[key]
    try:
        value = raw if isinstance(default, str) else ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    value = float(value) if type(default) is float and type(value) is int else value
    return value if type(value) is type(default) else None

def base_spec(vs, defaults=None):
    """'grf:graph=grid4,grf_walks=100' -> ('grf', {'graph': 'grid4', 'grf_walks': 100}): the base variant and the
    settings its runs must have, each as its train.py type (None where the text is no value of that type)."""
    defaults = defaults or declared(TRAIN_PY)
    attn, _, where = vs.partition(':')
    items = [item.partition('=')[::2] for item in where.split(',')] if where else []
    return attn, {k: typed(k, v, defaults) if k in defaults and v else None for k, v in items}

def delta_cells(pair, *p_holm):
    """The Δ, pairs won and sign-flip p cells of a row, then its Holm-adjusted p if given."""
    if isinstance(pair, str):
        return f" – ({pair}) |" + " – |" * (2 + len(p_holm))
    mean, half, won, n, p = pair
    interval = f" [{mean - half:+.2f}, {mean + half:+.2f}]" if half is not None else ""
    return f" {mean:+.2f}{interval} | {won}/{n} |" + ''.join(' – |' if x is None else f" {x:.3g} |" for x in (p, *p_holm))

def table(runs, vs='', group='', at_epochs=()):
    """The Markdown table: a row per variant and per value of the settings that differ among the runs. vs: a variant,
    optionally 'variant:key=value,...'; each row adds its paired difference to that variant's runs of those settings
    and of the row's other settings, with its sign-flip p and the Holm-adjusted p over the rows compared. group:
    variants, comma-separated, whose mean per seed is compared with the same base (one row of each in the table).
    vs='source' or 'scratch' (LINEAGE): each row against the runs its runs started from, or the same variant's from
    scratch, whatever their settings. at_epochs: each row's mean top-1 after those epochs, in columns."""
    all_knobs = dict.fromkeys(k for cls in VARIANTS.values() for k in knobs(cls))
    defaults = declared(TRAIN_PY)
    value = lambda r, k: knob(r, k) if k in all_knobs else recipe(r, k, defaults)
    others = dict.fromkeys(k for r in runs for k in r['config'] if k not in all_knobs and k not in NOT_RECIPE)
    columns = [k for k in [*all_knobs, *others] if len({str(value(r, k)) for r in runs} - {'None'}) > 1]
    extra = f"Δ top-1 vs {vs} [95% CI] | pairs won | p (sign-flip) | p (Holm) | " if vs else ""
    after = ''.join(f"top-1 after {e} | " for e in at_epochs)
    rows = ["| attention | " + ''.join(f"{k} | " for k in columns) + f"top-1 (%) mean ± std | {after}seeds | epochs "
            f"| images/s (train) | published top-1 | {extra}", "|---|" + "---|" * (len(columns) + len(at_epochs) + 5 + 4 * bool(vs))]
    rows[0] = rows[0].rstrip()
    key = lambda r: (*(value(r, k) for k in columns), epochs_trained(r))
    # the base runs of a row: vs's variant and settings, the row's values in the other columns that act on both, its epochs
    same = lambda a, b: all(x is None or y is None or x == y for x, y in zip(a, b))
    base_attn, fixed = base_spec(vs, defaults)
    # as the cells print them (6 significant digits, so that 0.99005 names exp(-0.01)), after the setting's type: 10 == 10.0
    is_base = lambda r: r['config']['attn'] == base_attn and all(cell(value(r, k)) == cell(v) for k, v in fixed.items())
    free = [i for i, k in enumerate(columns) if k not in fixed]  # the columns a base run must share with its row
    found = []  # (attn, the row's text, its runs, its pairing: 'base', summary() or the reason for none)
    for attn in VARIANTS:
        groups = {}
        for r in runs:
            if r['config']['attn'] == attn:
                groups.setdefault(key(r), []).append(r)
        for (*values, epochs), rs in sorted(groups.items(), key=lambda g: str(g[0])):
            acc = [r['final']['top1'] for r in rs]
            spread = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""  # one seed has no spread
            ips = statistics.median(r['images_per_s'] for r in rs)
            settings = ''.join(f"{cell(v)} | " for v in values)
            paper = [v for v in dict.fromkeys(published(r['config']).get(attn) for r in rs) if v is not None]
            later = [[top1_after(r, e) for r in rs] for e in at_epochs]
            later = ''.join('– | ' if None in xs else f"{statistics.mean(xs):.2f} | " for xs in later)
            row = (f"| {attn} | {settings}{statistics.mean(acc):.2f}{spread} | {later}{len(acc)} "
                   f"| {epochs:g} | {ips:,.0f} | {', '.join(paper)} |")
            base = [b for b in runs if is_base(b) and epochs_trained(b) == epochs
                    and same([key(b)[i] for i in free], [values[i] for i in free])]
            if vs in LINEAGE:  # the base by lineage: a run from scratch is one
                base = [b for b in runs if any(LINEAGE[vs](r, b) for r in rs)]
                scratch = all(from_scratch(r) for r in rs)
                pair = 'base' if scratch else paired(rs, base) if base else f"no {vs} run among the folders"
            else:
                pair = 'base' if is_base(rs[0]) else paired(rs, base) if vs else None
            found.append((attn, row, rs, base, pair))
    p_holm = holm([p[4] if isinstance(p, tuple) else None for *_, p in found])
    for (attn, row, rs, base, pair), adjusted in zip(found, p_holm):
        rows.append(row + ('' if not vs else " base | – | – | – |" if pair == 'base' else delta_cells(pair, adjusted)))
    note = (f"\nΔ top-1 vs {vs}: the mean over the seeds that both ran of (top-1 - {vs}'s top-1), runs of the same seed "
            f"paired one to one; [95% CI]: Student t over those paired differences (n - 1 degrees of freedom); pairs won: "
            f"the differences above 0; p (sign-flip): exact two-sided, over all 2^n sign patterns of the differences; "
            f"p (Holm): adjusted over the {sum(p is not None for p in p_holm)} rows compared; –: no pair, and why.") if vs else ""
    if group:
        members = [[f for f in found if f[0] == a] for a in group.split(',')]
        several = next((m for m in members if len(m) != 1), None)
        if several is not None:
            a = group.split(',')[members.index(several)]
            fail(f"group={group!r}: {a} has {len(several)} rows in this table; valid: variants with one row each "
                 f"(report one setting's folders)", kind='data')
        contrast = group_contrast([m[0][2] for m in members], members[0][0][3])
        note += (f"\n\n| group | Δ top-1 vs {vs} [95% CI] | pairs won | p (sign-flip) |\n|---|---|---|---|\n"
                 f"| mean of {', '.join(group.split(','))} |" + delta_cells(contrast) + "\n"
                 f"group: per seed that all of them and {vs} ran, their mean top-1 minus {vs}'s; one test, outside the "
                 f"Holm family above.")
    return '\n'.join(rows) + note

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

def mask_pictures(runs, path):
    """trained_masks.mask_rows drawn: a row of pictures per row, a column per head."""
    import matplotlib.pyplot as plt
    rows = trained_masks.mask_rows(runs)
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

def picture_paths(roots, out=None):
    """Where the pictures go: <out>/curves.png and <out>/masks.png, out by default the folder that holds every root."""
    out = out or os.path.commonpath([os.path.abspath(r) for r in roots] if len({os.path.isabs(r) for r in roots}) > 1 else roots)
    return os.path.join(out, 'curves.png'), os.path.join(out, 'masks.png')

def has_matplotlib():
    try:
        importlib.import_module('matplotlib')
    except ImportError:
        return False
    return True

if __name__ == '__main__':
    config = dict(SETTINGS)
    configure(config, [a for a in sys.argv[1:] if a.startswith('-')], flags=FLAGS)
    globals().update(config)
    roots = [a for a in sys.argv[1:] if not a.startswith('-')] or ['out/sweep']
    if vs and vs not in LINEAGE and base_spec(vs)[0] not in VARIANTS:
        fail(f"vs={vs!r} is not a variant; valid: {', '.join(VARIANTS)}, each optionally with settings, e.g. "
             f"'grf:graph=grid4'; or {', '.join(LINEAGE)}")
    if vs and vs not in LINEAGE and None in base_spec(vs)[1].values():
        fail(f"vs={vs!r} is invalid; valid: a variant, or 'variant:key=value,...' with settings of train.py and values "
             f"of their types, e.g. 'grf:graph=grid4'")
    bad = [a for a in group.split(',') if a not in VARIANTS or a == base_spec(vs)[0]] if group else []
    if group and (not vs or bad or vs in LINEAGE):
        fail(f"group={group!r} is invalid; valid: with --vs, variants other than vs's, comma-separated, e.g. "
             f"--vs=linear --group=toeplitz,topo,grf" + (f" ({bad[0]!r} is not one)" if bad else " (no --vs given)" if not vs
                                                          else f" (not with --vs={vs})"))
    if at_epochs and not re.fullmatch(r'\d+(,\d+)*', at_epochs):
        fail(f"at_epochs={at_epochs!r} is invalid; valid: epochs >= 0, comma-separated, e.g. '0,1,2,4'")
    if walk_error and not re.fullmatch(r'[1-9]\d*(,[1-9]\d*)*', walk_error):
        fail(f"walk_error={walk_error!r} is invalid; valid: walk counts >= 1, comma-separated, e.g. '5,20,100'")
    if ensembles < 1:
        fail(f"ensembles={ensembles} is invalid; valid: an integer >= 1")
    results = [r for root in roots for r in load_runs(root)]
    if not results:
        fail(f"no result.json under {', '.join(roots)}", kind='data')
    print(table(results, vs, group, tuple(int(e) for e in at_epochs.split(',')) if at_epochs else ()))
    if runs:
        print('\n' + run_table(results))
    if not no_plots and not has_matplotlib():
        print("no pictures: matplotlib is not installed (pip install matplotlib)")
    elif not no_plots:
        curves_path, masks_path = picture_paths(roots, out)
        os.makedirs(os.path.dirname(curves_path) or '.', exist_ok=True)
        curves(results, curves_path)
        mask_pictures(results, masks_path)
        print(f"wrote {curves_path}, {masks_path}")
    if reach:
        print('\n' + trained_masks.reach_table(trained_masks.reach_models(results)))
    if walk_error:
        print(trained_masks.walk_errors(results, tuple(map(int, walk_error.split(','))), ensembles))
    if mask_swap:
        print(trained_masks.mask_swap(results, mask_swap))
