"""
Measures what each attention costs as the grid grows, and how fast whole training steps run.

    python bench.py --mode=attention                      # one layer, N = 64 ... 16,384 tokens, a few minutes
    python bench.py --mode=attention --sides=32,64,128 --variants=grf-fast,toeplitz-fast
    python bench.py --mode=train configs/imagenette.py --image_sizes=56,112,224 --train_impls=eager --threads=1

attention: forward + backward of one layer per path in `variants` (attention_paths) on side x side grids: time and
peak memory tables, log-log slopes, and the N from which a fast path beats its dense twin, or a path beats `baseline`.
train: train.py's step (random images) per path of each of `attns` at each of `image_sizes`, eager and compiled, in
turns: fastest step, images/s, peak memory, ratios to softmax and linear, the path `auto` takes and the fast_cost the
steps imply (model.py). Each writes out_dir/<mode>-*.json (and .png).
Settings: the globals below and train.py's (its config files apply), overridden by config files and --key=value.
"""
import itertools
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import data
from configurator import configure, declared, fail
from model import VARIANTS, ViT, ViTConfig

def attention_paths(attn):
    """attn's paths, name -> (attn, attn_impl): '<attn>-dense' and '<attn>-fast' if it has a fast path, else '<attn>'."""
    fast = VARIANTS[attn].fast_cost is not None
    return {f'{attn}-{impl}': (attn, impl) for impl in ('dense', 'fast')} if fast else {attn: (attn, 'dense')}

PATHS = {name: path for attn in VARIANTS for name, path in attention_paths(attn).items()}

# settings (--help lists those above the '# ---' line)
mode = 'attention'         # attention | train
device = 'auto'            # auto (cuda if available, else cpu) | cuda | cpu
dtype = 'float32'          # float32 | bfloat16 (autocast; the linear forms accumulate in float32 anyway)
threads = 0                # CPU threads (0 = torch's default)
keep_memory = True         # CPU: keep freed memory in the process instead of page-faulting it in again (data.keep_freed_memory)
cpu_peak_memory = True     # CPU: peak memory replayed from torch.profiler's allocation events in an extra untimed call (False: time only)
out_dir = 'out/bench'      # where the JSON (and PNG) go
sides = '8,11,16,23,32,45,64,91,128'  # attention mode: grid sides: N = side^2 = 64 ... 16,384 tokens
variants = ','.join(PATHS) # attention paths to measure (default: every path of every variant)
baseline = 'softmax'       # every other path is compared with this one (crossovers and ratios)
attn_batch = 2             # attention mode: one layer's batch, heads, head width
attn_heads = 2
head_dim = 16
grf_walks = 20
grf_p_halt = 0.1
mask_max_len = 10          # K
repeats = 5                # timed calls per point, and more until min_seconds of them (3 when a call is slow)
min_seconds = 1.0
time_budget = 10.0         # seconds per forward + backward (train mode: per step): larger predicted sizes are skipped
total_budget = 0.0         # seconds for all points: those not begun by then are skipped (0: no limit)
memory_budget = 4.0        # GB of peak memory: larger predicted sizes are skipped
slope_min_n = 1024         # fit the log-log slopes from this many tokens on
ratio_n = 4096             # report each pair's time and memory ratio at this many tokens
attn_compile = False       # torch.compile the layer
attns = ','.join(VARIANTS) # train mode: attentions (each path) or paths to train (model and optimizer: train.py's)
train_impls = 'eager,compiled'
image_sizes = ''           # train mode: image sizes to measure, '56,112,224' ('' = train.py's image_size)
train_rounds = 5           # rounds of train_steps steps per variant, taken in turn
train_steps = 4
# -----------------------------------------------------------------------------
SETTINGS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

def setup(args):
    """The settings as a namespace for the measuring functions: train.py's (its config files apply), this file's, then
    args (config files, --key=value), and the device picked (device, cuda, kept, autocast). check_gpu.py passes its own."""
    config = vars(ViTConfig()) | declared() | SETTINGS  # train.py's (its configs apply) and ViTConfig's others
    configure(config, args)
    if config['mode'] not in ('attention', 'train'):
        fail(f"mode={config['mode']!r} is invalid; valid: attention, train")
    s = SimpleNamespace(**config)
    s.device = ('cuda' if torch.cuda.is_available() else 'cpu') if s.device == 'auto' else s.device
    s.cuda = s.device.startswith('cuda')
    torch.set_num_threads(s.threads or torch.get_num_threads())  # 0: torch's default
    s.kept = s.keep_memory and not s.cuda and data.keep_freed_memory()
    s.autocast = nullcontext() if s.dtype == 'float32' else torch.autocast(s.device.split(':')[0], dtype=getattr(torch, s.dtype))
    torch.manual_seed(s.seed)
    print(f"device {s.device}" + (f" ({torch.cuda.get_device_name()})" if s.cuda else f" ({torch.get_num_threads()} threads)")
          + f", {s.dtype}, torch {torch.__version__}" + (", freed memory kept in the process" if s.kept else ''))
    return s

def timed(fn, cuda):
    """Seconds that fn() takes (the GPU synchronized before and after)."""
    sync = torch.cuda.synchronize if cuda else lambda: None
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0

@contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ side logs each session start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, 'w') as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)

def peak_bytes(fn, resident, cuda, cpu_peak_memory=True):
    """Peak memory of fn(): the allocator's peak on CUDA. On CPU (cpu_peak_memory) the bytes resident before fn() (parameters,
    buffers such as topo's W powers and grf's walks, input, output gradient) plus the highest running sum of the allocations
    minus frees that torch.profiler records in fn(), in time order (not MKL's or oneDNN's own scratch); else nan."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated()
    if not cpu_peak_memory:
        return float('nan')
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'), key=lambda e: e.start_ns())
    return resident + max(itertools.accumulate((e.nbytes() for e in events), initial=0))  # frees count negative

def measure(name, side, s):
    """(median seconds, peak bytes) of forward + backward of one layer of path `name` on a side x side grid."""
    attn, impl = PATHS[name]
    c = ViTConfig(image_size=side, patch_size=1, dim=s.attn_heads * s.head_dim, heads=s.attn_heads, dropout=0.0, attn=attn,
                  attn_impl=impl, grf_walks=s.grf_walks, grf_p_halt=s.grf_p_halt, mask_max_len=s.mask_max_len, mask_seed=s.seed)
    layer = VARIANTS[attn](c, layer=0).to(s.device)
    layer = torch.compile(layer) if s.attn_compile else layer
    x = torch.randn(s.attn_batch, side * side, s.attn_heads * s.head_dim, device=s.device, requires_grad=True)
    g = torch.randn_like(x)
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with s.autocast:
            y = layer(x)
        y.backward(g.to(y.dtype))
    times = [timed(step, s.cuda)]  # warm-up
    while len(times) <= 3 or (len(times) <= s.repeats or sum(times[1:]) < s.min_seconds) and sum(times[1:]) < s.time_budget:
        times.append(timed(step, s.cuda))
    tensors = [*layer.parameters(), *layer.buffers(), x, g]
    resident = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())  # each storage once
    layer.zero_grad(set_to_none=True)  # the gradients are part of the step's peak, not resident before it
    x.grad = None
    return statistics.median(times[1:]), peak_bytes(step, resident, s.cuda, s.cpu_peak_memory)

def predict(results, n):
    """Extrapolate (time, memory) to n from the last two measured points of results {N: {time_s, peak_bytes, skipped}},
    at least linearly in N; (0, 0) before two."""
    points = [(m, r['time_s'], r['peak_bytes']) for m, r in results.items() if not r['skipped']]
    if len(points) < 2:
        return 0.0, 0.0
    (n0, t0, m0), (n1, t1, m1) = points[-2:]
    grow = lambda a, b: b * (n / n1) ** max(1.0, math.log(b / a) / math.log(n1 / n0))
    return grow(t0, t1), grow(m0, m1)

def slope(results, min_n):
    """Least-squares log-log slopes {time, memory} of the measured points of results from min_n tokens on, or None each."""
    pts = [(math.log(n), math.log(r['time_s']), math.log(r['peak_bytes'])) for n, r in results.items()
           if n >= min_n and not r['skipped']]
    if len(pts) < 2:
        return {'time': None, 'memory': None}
    logn, logt, logm = zip(*pts)
    return {'time': statistics.linear_regression(logn, logt).slope, 'memory': statistics.linear_regression(logn, logm).slope}

def table(title, res, ns, key, scale, width):
    """Print res[path][N][key] * scale, a column per path and a row per N."""
    cell = lambda r: '-' if r is None or r.get('total_budget_spent') else f"({r[key] * scale:.3g})" if r['skipped'] else f"{r[key] * scale:.3g}"
    print(f"\n{title}; (x) = skipped over budget, predicted; - = not measured\n{'N':>7} " + ''.join(f"{v:>{width}}" for v in res))
    for n in ns:
        print(f"{n:7d} " + ''.join(f"{cell(res[v].get(n)):>{width}}" for v in res))

def crossover(res, fast, dense, ns):
    """The smallest N from which `fast` beats `dense` at every larger measured N (a dense point skipped for its
    budget counts as a win), or None."""
    best = None
    for n in reversed(ns):  # from the largest N down, until `dense` wins
        f, d = res[fast].get(n), res[dense].get(n)
        if f and not f['skipped']:
            if d and not d['skipped'] and d['time_s'] <= f['time_s']:
                break
            best = n
    return best

def attention_bench(s):
    names = [v for v in s.variants.split(',') if v]
    if any(v not in PATHS for v in names):
        fail(f"variants={s.variants!r} names an unknown path; valid: {','.join(PATHS)}")
    side_list = [int(side) for side in s.sides.split(',')]
    ns = [side * side for side in side_list]
    res = {v: {} for v in names}
    end = time.perf_counter() + (s.total_budget or math.inf)
    for side, n in zip(side_list, ns):
        for v in names:
            t, mem = predict(res[v], n)
            if t > s.time_budget or mem > s.memory_budget * 1e9 or time.perf_counter() > end:
                res[v][n] = {'skipped': True, 'time_s': t, 'peak_bytes': mem, 'total_budget_spent': time.perf_counter() > end}
                continue
            try:
                t, mem = measure(v, side, s)
                res[v][n] = {'skipped': False, 'time_s': t, 'peak_bytes': mem}
            except (RuntimeError, MemoryError) as e:  # out of memory: note it and go on
                res[v][n] = {'skipped': True, 'time_s': float('nan'), 'peak_bytes': float('nan'), 'error': str(e)[:200]}
        print(f"N={n:6d} " + ' '.join(f"{v} {r[n]['time_s'] * 1e3:.3g}ms{'*' if r[n]['skipped'] else ''}"
                                      for v, r in res.items()), flush=True)
    for title, key, scale in (('forward + backward time, ms (median)', 'time_s', 1e3), ('peak memory, MB', 'peak_bytes', 1e-6)):
        table(title, res, ns, key, scale, 15)
    slopes = {v: slope(res[v], s.slope_min_n) for v in names}
    print(f"\nlog-log slopes for N >= {s.slope_min_n} (measured points only)")
    for v, fit in slopes.items():
        print(f"  {v:15} time {fit['time'] or float('nan'):5.2f}   memory {fit['memory'] or float('nan'):5.2f}")
    # each fast path against its own dense twin, and every path against the baseline
    twins = [(v, f"{PATHS[v][0]}-dense") for v in names if PATHS[v][1] == 'fast']
    pairs = [(a, b) for a, b in twins + [(v, s.baseline) for v in names if v != s.baseline] if a in res and b in res]
    cross = {f"{a} < {b}": crossover(res, a, b, ns) for a, b in pairs}
    print(f"\ncrossovers (the N from which the first is faster at every larger measured N); ratios at N = {s.ratio_n}")
    at = {v: rs[s.ratio_n] for v, rs in res.items() if s.ratio_n in rs and not rs[s.ratio_n]['skipped']}
    ratios = {f"{b} / {a}": {'time': at[b]['time_s'] / at[a]['time_s'], 'memory': at[b]['peak_bytes'] / at[a]['peak_bytes']}
              for a, b in pairs if a in at and b in at}
    for a, b in pairs:
        r, from_n = ratios.get(f"{b} / {a}"), cross[f"{a} < {b}"]
        print(f"  {a + ' < ' + b:30} " + (f"from N = {from_n:<6}" if from_n else "not in range") +
              (f"   {b} / {a}: time {r['time']:.1f}x, memory {r['memory']:.1f}x" if r else ''))
    # one layer's dense twin wins up to the last measured N before the crossover (auto decides by whole steps' costs)
    twin_cross = {PATHS[a][0]: cross.get(f"{a} < {b}") for a, b in twins}
    dense_max_n = {attn: max((m for m in ns if m < n), default=0) for attn, n in twin_cross.items() if n}
    for attn, n in dense_max_n.items():
        print(f"  {attn}: the dense path wins up to N = {n} here, in one layer (attn_impl='auto': see --mode=train)")
    keys = ('dtype', 'attn_batch', 'attn_heads', 'head_dim', 'grf_walks', 'grf_p_halt', 'mask_max_len', 'repeats',
            'min_seconds', 'time_budget', 'memory_budget', 'attn_compile', 'cpu_peak_memory')
    out = {'results': res, 'slopes': slopes, 'crossovers': cross, 'ratios_at_n': {s.ratio_n: ratios},
           'dense_max_n': dense_max_n}
    return write_results('attention', out, keys, s)

def write_results(name, obj, keys, s, what='forward + backward (s)'):
    """Write {'settings': s's keys, device, threads, keep_memory} | obj to s.out_dir/<name>-<device>.json, plotted beside it."""
    obj = {'settings': {k: vars(s)[k] for k in keys} | dict(device=s.device, threads=torch.get_num_threads(), keep_memory=s.kept)} | obj
    os.makedirs(s.out_dir, exist_ok=True)
    path = os.path.join(s.out_dir, f"{name}-{s.device.split(':')[0]}.json")
    with open(path, 'w') as f:
        json.dump(obj, f, indent=1)
    print(f"wrote {path}")
    plot(obj['results'], path[:-5] + '.png', what)
    return obj

def plot(res, path, what='forward + backward (s)'):
    try:
        import matplotlib.pyplot as plt  # without a display matplotlib takes its Agg backend by itself
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in zip(axes, ('time_s', 'peak_bytes'), (what, 'peak memory (bytes)')):
        for v, rs in res.items():
            pts = [(n, r[key]) for n, r in rs.items() if not r['skipped']]
            if pts:
                ax.loglog(*zip(*pts), marker='o', label=v)
        ax.set(xlabel='tokens N', ylabel=label)
        ax.grid(True, which='both', alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    print(f"wrote {path}")

def train_run(name, size, s):
    """train.py's model (its settings; path and eager/compiled from `name`; in_channels or 3, num_classes or 10), its
    AdamW and a batch of random images (data does not change a step's cost): its step, built and run once."""
    (attn, impl), compiled = PATHS[name.split()[0]], name.endswith('compiled')
    torch.manual_seed(s.seed)
    c = ViTConfig(**{k: vars(s)[k] for k in ViTConfig.__dataclass_fields__} | {
        'attn': attn, 'attn_impl': impl, 'image_size': size, 'in_channels': s.in_channels or 3, 'num_classes': s.num_classes or 10})
    raw = ViT(c).to(s.device)
    opt = torch.optim.AdamW(raw.param_groups(s.weight_decay, s.mask_lr_mult), lr=s.lr, betas=(s.beta1, s.beta2), fused=s.cuda)
    model = torch.compile(raw) if compiled else raw
    x = torch.randn(s.batch_size, c.in_channels, size, size, device=s.device)
    y = torch.randint(c.num_classes, (s.batch_size,), device=s.device)
    def step():
        with s.autocast:
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    n, layer = c.image_size ** 2 // c.patch_size ** 2, raw.blocks[0].attn
    r = {'step': step, 'first_s': timed(step, s.cuda), 'times': [], 'resident': lambda: sum(t.untyped_storage().nbytes() for t in [
        *raw.parameters(), *raw.buffers(), x, *(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t))])}
    if layer.fast_cost:  # the path auto takes (model.py's fast_cost), and the work that fits fast_cost here
        r |= {'auto_takes_fast': layer.fast_pays(s.batch_size, n, c.dim // c.heads, s.device.split(':')[0]),
              'work': layer.work(s.batch_size, n, c.dim // c.heads)}
    return r

def train_bench(s):
    sizes = [int(size) for size in str(s.image_sizes or s.image_size).split(',')]
    if any(a not in VARIANTS and a not in PATHS for a in s.attns.split(',')) or any(size % s.patch_size for size in sizes):
        fail(f"attns={s.attns!r}, image_sizes={s.image_sizes!r}: variants or paths of {','.join(PATHS)}, multiples of patch_size={s.patch_size}")
    names = [f"{p} {impl}" for a in s.attns.split(',') for p in (attention_paths(a) if a in VARIANTS else [a]) for impl in s.train_impls.split(',')]
    res, ns = {name: {} for name in names}, [(size // s.patch_size) ** 2 for size in sizes]
    for size, n in zip(sizes, ns):
        runs = {}
        for name in names:
            t, mem = predict(res[name], n)
            if t > s.time_budget or mem > s.memory_budget * 1e9:
                res[name][n] = {'skipped': True, 'time_s': t, 'peak_bytes': mem, 'images_per_s': s.batch_size / t}
                print(f"{size}px, N={n}: {name} skipped: predicted {t:.0f} s a step (time_budget {s.time_budget:g}), "
                      f"{mem / 1e9:.1f} GB (memory_budget {s.memory_budget:g})", flush=True)
            else:
                runs[name] = train_run(name, size, s)
                print(f"{size}px, N={n}: built {name}, first step {runs[name]['first_s']:.2f} s", flush=True)
        for _ in range(s.train_rounds):  # in turn, so that a noisy machine slows them alike
            for r in runs.values():
                if not r['times'] or min(r['times']) < 1.0:  # a short step after switching variants runs once untimed
                    r['step']()
                r['times'] += [timed(r['step'], s.cuda) for _ in range(s.train_steps)]
        for name, r in runs.items():
            t = min(r['times'])
            res[name][n] = {'skipped': False, 'time_s': t, 'peak_bytes': peak_bytes(r.pop('step'), r.pop('resident')(), s.cuda, s.cpu_peak_memory),
                            'images_per_s': s.batch_size / t, 'compile_s': max(0.0, r['first_s'] - t) * name.endswith('compiled'), **r}
    print(f"\nbatch {s.batch_size}, patch {s.patch_size}, dim {s.dim}, depth {s.depth}, heads {s.heads}, dropout {s.dropout}, grf "
          f"{s.grf_walks} walks, K {s.mask_max_len}; fastest of {s.train_rounds} x {s.train_steps} steps; (x) skipped, predicted")
    for title, key, scale in (('step, s', 'time_s', 1), ('images/s', 'images_per_s', 1), ('peak memory, MB', 'peak_bytes', 1e-6)):
        table(title, res, ns, key, scale, 22)
    print("\nstep time ratios at each N; the N from which the first is faster at every larger measured N")
    pairs = [(v, b) for v in names for b in (f"softmax {v.split()[1]}", f"linear {v.split()[1]}") if b in res and v != b and not v.startswith("softmax")]
    ratios = {f"{a} / {b}": {n: res[a][n]['time_s'] / res[b][n]['time_s'] for n in ns if not res[a][n]['skipped'] | res[b][n]['skipped']}
              for a, b in pairs}
    cross = {f"{a} < {b}": crossover(res, a, b, ns) for a, b in pairs}
    for a, b in pairs:
        print(f"  {a + ' / ' + b:36} " + '  '.join(f"{n}: {x:.2f}" for n, x in ratios[f"{a} / {b}"].items())
              + f"   faster from N = {cross[f'{a} < {b}'] or '-'}")
    fits = {}  # fast_cost per variant: the fast path's seconds per multiply-add over the dense path's
    for a in [a for a in VARIANTS if {f"{a}-dense eager", f"{a}-fast eager", 'linear eager'} <= set(res)]:
        both = [(n, res[f"{a}-dense eager"][n], res[f"{a}-fast eager"][n], res['linear eager'][n]) for n in ns]
        pts = [p for p in both if not (p[1]['skipped'] or p[2]['skipped'] or p[3]['skipped'])]
        rate = [sum(p[i]['work'][i - 1] * (p[i]['time_s'] - p[3]['time_s']) for p in pts) /  # seconds beyond linear's step
                sum(p[i]['work'][i - 1] ** 2 for p in pts) if pts else 0.0 for i in (1, 2)]  # least squares through 0
        fits[a] = rate[1] / rate[0] if rate[0] > 0 else None
        picks = [f"{n} {'fast' if (f if d['skipped'] else d)['auto_takes_fast'] else 'dense'}" + (
            '' if d['skipped'] or f['skipped'] else f" ({'fast' if f['time_s'] < d['time_s'] else 'dense'} faster)")
            for n, d, f, _ in both if not (d['skipped'] and f['skipped'])]
        print(f"  {a}: auto takes, at N = {', '.join(picks)}; fast_cost fitted here {fits[a] or float('nan'):.3g} "
              f"(model.py: {VARIANTS[a].fast_cost})")
    write_results(f"train-{s.dataset}", {'results': res, 'ratios': ratios, 'crossovers': cross, 'fast_cost': fits},
                  (*ViTConfig.__dataclass_fields__, 'batch_size', 'dtype', 'image_sizes'), s, 'training step (s)')

if __name__ == '__main__':
    s = setup(sys.argv[1:])
    {'attention': attention_bench, 'train': train_bench}[s.mode](s)
