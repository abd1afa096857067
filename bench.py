"""
Measures what each attention costs as the grid grows, and how fast whole training steps run.

    python bench.py --mode=attention                      # one layer, N = 64 ... 16,384 tokens, a few minutes
    python bench.py --mode=attention --sides=32,64,128 --variants=grf-fast,toeplitz-fast
    python bench.py --mode=train configs/fmnist.py        # images/s per variant, eager and compiled
    python bench.py --mode=train configs/fmnist.py --train_profile=True   # and the top ops of each step

attention: forward + backward of one layer per path in `variants` ('<attn>-dense' and '<attn>-fast' where the
variant has an efficient path) on side x side grids: time and peak memory tables, log-log slopes, and the N from
which a fast path beats its dense twin, or a path beats `baseline`. Writes out_dir/attention-<device>.json (and .png).
train: train.py's step for each attention in `attns`, eager and torch.compile'd, taking turns so that a noisy
machine slows them alike: median step, images/s, epoch, ratio to linear, compile time. Writes out_dir/train-*.json.
Settings: the globals below and train.py's (its config files apply), overridden by config files and --key=value.
"""
import ast
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
import masks
from configurator import configure, fail
from model import VARIANTS, ViT, ViTConfig

def attention_paths(attn):
    """attn's paths, name -> (attn, attn_impl): '<attn>-dense' and '<attn>-fast' if it has a fast path, else '<attn>'."""
    if VARIANTS[attn].dense_max_n is None:
        return {attn: (attn, 'dense')}
    return {f'{attn}-{impl}': (attn, impl) for impl in ('dense', 'fast')}

PATHS = {name: path for attn in VARIANTS for name, path in attention_paths(attn).items()}

# settings (--help lists those above the '# ---' line)
mode = 'attention'         # attention | train | walks (GRF walk sampling per coupling)
device = 'auto'            # auto (cuda if available, else cpu) | cuda | cpu
dtype = 'float32'          # float32 | bfloat16 (autocast; the linear forms accumulate in float32 anyway)
threads = 0                # CPU threads (0 = torch's default)
keep_memory = True         # CPU: keep freed memory in the process instead of page-faulting it in again (see keep_freed_memory)
cpu_peak_memory = True     # CPU: peak memory replayed from torch.profiler's allocation events in an extra untimed call (False: time only)
out_dir = 'out/bench'      # where the JSON (and PNG) go
sides = '8,11,16,23,32,45,64,91,128'  # attention mode: grid sides: N = side^2 = 64 ... 16,384 tokens
variants = ','.join(PATHS) # attention paths to measure (default: every path of every variant)
baseline = 'softmax'       # every other path is compared with this one (crossovers and ratios)
attn_batch = 2
attn_heads = 2
head_dim = 16
grf_walks = 20
grf_p_halt = 0.1
mask_max_len = 10          # K
repeats = 5                # timed calls per point, and more until min_seconds of them (3 when a call is slow)
min_seconds = 1.0
time_budget = 10.0         # seconds per forward + backward: larger predicted sizes are skipped
total_budget = 0.0         # seconds for all points: those not begun by then are skipped (0: no limit)
memory_budget = 4.0        # GB of peak memory: larger predicted sizes are skipped
slope_min_n = 1024         # fit the log-log slopes from this many tokens on
ratio_n = 4096             # report each pair's time and memory ratio at this many tokens
attn_compile = False       # torch.compile the layer
attns = ','.join(VARIANTS) # train mode: attentions to train (its model, data and optimizer settings are train.py's)
train_impls = 'eager,compiled'
train_rounds = 5           # rounds of train_steps steps per variant, taken in turn
train_steps = 4
train_profile = False      # also print each variant's top ops (torch.profiler, eager)
# -----------------------------------------------------------------------------
SETTINGS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

def keep_freed_memory():
    """Keep freed heap memory in the process (glibc mallopt), as CUDA's caching allocator keeps GPU memory, so that timings
    measure the algorithms, not page faults: glibc serves blocks over 32 MB with mmap and unmaps them when freed, so each
    large temporary is faulted in afresh. For train.py on CPU: MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647."""
    import ctypes, ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    return bool(libc.mallopt(-4, 0) and libc.mallopt(-1, 2 ** 31 - 1))  # M_MMAP_MAX, M_TRIM_THRESHOLD

def train_defaults():
    """train.py's settings (its assignments above its '# ---' line), so that its config files apply here."""
    source = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')).read().split('\n# ---')[0]
    return {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(source).body
            if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}

def setup(args):
    """The settings as a namespace for the measuring functions: train.py's (its config files apply), this file's, then
    args (config files, --key=value), and the device picked (device, cuda, kept, autocast). check_gpu.py passes its own."""
    config = train_defaults() | SETTINGS
    configure(config, args)
    if config['mode'] not in ('attention', 'train', 'walks'):
        fail(f"mode={config['mode']!r} is invalid; valid: attention, train, walks")
    s = SimpleNamespace(**config)
    s.device = ('cuda' if torch.cuda.is_available() else 'cpu') if s.device == 'auto' else s.device
    s.cuda = s.device.startswith('cuda')
    torch.set_num_threads(s.threads or torch.get_num_threads())  # 0: torch's default
    s.kept = s.keep_memory and not s.cuda and sys.platform.startswith('linux') and keep_freed_memory()
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

def predict(points, n):
    """Extrapolate (time, memory) to n from the last two measured points, at least linearly in N."""
    (n0, t0, m0), (n1, t1, m1) = points[-2:]
    grow = lambda a, b: b * (n / n1) ** max(1.0, math.log(b / a) / math.log(n1 / n0))
    return grow(t0, t1), grow(m0, m1)

def slope(points, min_n):
    """Least-squares log-log slopes (time, memory) of the points from min_n tokens on, or (None, None)."""
    pts = [(math.log(n), math.log(t), math.log(m)) for n, t, m in points if n >= min_n]
    if len(pts) < 2:
        return None, None
    logn, logt, logm = zip(*pts)
    return statistics.linear_regression(logn, logt).slope, statistics.linear_regression(logn, logm).slope

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
            done = [(m, r['time_s'], r['peak_bytes']) for m, r in res[v].items() if not r['skipped']]
            t, mem = predict(done, n) if len(done) >= 2 else (0.0, 0.0)  # (0, 0): nothing to extrapolate from yet
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
    cell = lambda r, key, scale: ('-' if r is None or r.get('total_budget_spent') else f"({r[key] * scale:.3g})" if r['skipped']
                                  else f"{r[key] * scale:.3g}")
    for title, key, scale in (('forward + backward time, ms (median)', 'time_s', 1e3), ('peak memory, MB', 'peak_bytes', 1e-6)):
        print(f"\n{title}; (x) = skipped over budget, predicted; - = not measured")
        print(f"{'N':>7} " + ''.join(f"{v:>15}" for v in names))
        for n in ns:
            print(f"{n:7d} " + ''.join(f"{cell(res[v].get(n), key, scale):>15}" for v in names))
    slopes = {v: dict(zip(('time', 'memory'), slope([(n, r['time_s'], r['peak_bytes']) for n, r in res[v].items()
                                                     if not r['skipped']], s.slope_min_n))) for v in names}
    print(f"\nlog-log slopes for N >= {s.slope_min_n} (measured points only)")
    for v, fit in slopes.items():
        print(f"  {v:15} time {fit['time'] or float('nan'):5.2f}   memory {fit['memory'] or float('nan'):5.2f}")
    # each fast path against its own dense twin, and every path against the baseline
    twins = [(v, f"{PATHS[v][0]}-dense") for v in names if PATHS[v][1] == 'fast']
    pairs = [(a, b) for a, b in twins + [(v, s.baseline) for v in names if v != s.baseline] if a in res and b in res]
    cross = {f"{a} < {b}": crossover(res, a, b, ns) for a, b in pairs}
    print(f"\ncrossovers (the N from which the first is faster at every larger measured N); ratios at N = {s.ratio_n}")
    ratios = {}
    for a, b in pairs:
        from_n = cross[f"{a} < {b}"]
        ra, rb = res[a].get(s.ratio_n), res[b].get(s.ratio_n)
        if ra and rb and not ra['skipped'] and not rb['skipped']:
            ratios[f"{b} / {a}"] = {'time': rb['time_s'] / ra['time_s'], 'memory': rb['peak_bytes'] / ra['peak_bytes']}
        r = ratios.get(f"{b} / {a}")
        print(f"  {a + ' < ' + b:30} " + (f"from N = {from_n:<6}" if from_n else "not in range") +
              (f"   {b} / {a}: time {r['time']:.1f}x, memory {r['memory']:.1f}x" if r else ''))
    # attn_impl='auto' should take the dense twin up to the last measured N before the crossover
    twin_cross = {PATHS[a][0]: cross.get(f"{a} < {b}") for a, b in twins}
    dense_max_n = {attn: max((m for m in ns if m < n), default=0) for attn, n in twin_cross.items() if n}
    for attn, n in dense_max_n.items():
        print(f"  attn_impl='auto': {VARIANTS[attn].__name__}.dense_max_n['{s.device.split(':')[0]}'] = {n} measured here "
              f"(model.py: {VARIANTS[attn].dense_max_n})")
    settings = {k: vars(s)[k] for k in ('dtype', 'attn_batch', 'attn_heads', 'head_dim', 'grf_walks', 'grf_p_halt',
                                       'mask_max_len', 'repeats', 'min_seconds', 'time_budget', 'memory_budget', 'attn_compile')}
    settings |= {'device': s.device, 'threads': torch.get_num_threads(), 'keep_memory': s.kept, 'cpu_peak_memory': s.cpu_peak_memory}
    out = {'settings': settings, 'results': res, 'slopes': slopes, 'crossovers': cross, 'ratios_at_n': {s.ratio_n: ratios},
           'dense_max_n': dense_max_n}
    path = write_json('attention', out, s)  # json writes the int keys N as strings
    plot(res, path[:-5] + '.png')
    return out

def write_json(name, obj, s):
    """Write obj to s.out_dir/<name>-<device type>.json; its path."""
    os.makedirs(s.out_dir, exist_ok=True)
    path = os.path.join(s.out_dir, f"{name}-{s.device.split(':')[0]}.json")
    with open(path, 'w') as f:
        json.dump(obj, f, indent=1)
    print(f"wrote {path}")
    return path

def plot(res, path):
    try:
        import matplotlib.pyplot as plt  # without a display matplotlib takes its Agg backend by itself
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in zip(axes, ('time_s', 'peak_bytes'), ('forward + backward (s)', 'peak memory (bytes)')):
        for v, rs in res.items():
            pts = [(n, r[key]) for n, r in rs.items() if not r['skipped']]
            if pts:
                ax.loglog(*zip(*pts), marker='o', label=v)
        ax.set(xlabel='tokens N', ylabel=label)
        ax.grid(True, which='both', alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    print(f"wrote {path}")

def train_bench(s):
    loaders = data.load(s.dataset, s.data_dir, s.image_size, s.batch_size, grad_accum=1, rank=0, world=1, seed=s.seed,
                        device=s.device, num_workers=0, num_classes=s.num_classes, crop_pad=s.crop_pad, flip=s.flip)
    batches = itertools.chain.from_iterable(itertools.repeat(loaders.train))  # epoch after epoch, without end
    model_keys = [f.name for f in ViTConfig.__dataclass_fields__.values()]
    runs = {}
    for a in s.attns.split(','):
        for impl in s.train_impls.split(','):
            torch.manual_seed(s.seed)
            c = {k: vars(s)[k] for k in model_keys} | {'attn': a, 'in_channels': loaders.channels, 'num_classes': loaders.num_classes}
            raw = ViT(ViTConfig(**c)).to(s.device)
            opt = torch.optim.AdamW(raw.param_groups(s.weight_decay, s.mask_lr_mult), lr=s.lr, betas=(s.beta1, s.beta2), fused=s.cuda)
            model = torch.compile(raw) if impl == 'compiled' else raw
            def step(model=model, raw=raw, opt=opt):
                x, y = next(batches)
                with s.autocast:
                    loss = F.cross_entropy(model(x).float(), y)
                loss.backward()
                if s.grad_clip:
                    torch.nn.utils.clip_grad_norm_(raw.parameters(), s.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            runs[f"{a} {impl}"] = {'step': step, 'first_s': timed(step, s.cuda), 'times': []}  # the first step compiles, when compiled
            print(f"built {a} {impl}: first step {runs[f'{a} {impl}']['first_s']:.2f} s", flush=True)
    for _ in range(s.train_rounds):
        for r in runs.values():
            r['step']()  # one untimed step after switching variants
            r['times'] += [timed(r['step'], s.cuda) for _ in range(s.train_steps)]
    print(f"\n{s.dataset}: batch {s.batch_size}, {s.image_size}px / patch {s.patch_size}, dim {s.dim}, depth {s.depth}, heads {s.heads}, "
          f"dropout {s.dropout}; {loaders.steps_per_epoch} steps per epoch; median of {s.train_rounds} x {s.train_steps} steps")
    print(f"{'variant':18}{'step ms':>9}{'img/s':>8}{'epoch s':>9}{'/ linear':>10}{'compile s':>11}")
    out = {}
    for name, r in runs.items():
        impl = name.split()[1]
        med = statistics.median(r['times'])
        lin = runs.get(f"linear {impl}")
        ratio = med / statistics.median(lin['times']) if lin else float('nan')
        compile_s = max(0.0, r['first_s'] - med) if impl == 'compiled' else 0.0
        out[name] = {'step_ms': med * 1e3, 'images_per_s': s.batch_size / med, 'epoch_s': med * loaders.steps_per_epoch,
                     'ratio_to_linear': ratio, 'compile_s': compile_s, 'times_ms': [t * 1e3 for t in r['times']]}
        print(f"{name:18}{med * 1e3:9.1f}{s.batch_size / med:8.0f}{med * loaders.steps_per_epoch:9.1f}{ratio:10.2f}"
              + (f"{compile_s:11.1f}" if impl == 'compiled' else ''))
    for name in (n for n in runs if s.train_profile and n.endswith('eager')):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(s.train_steps):
                runs[name]['step']()
        print(f"\n{name}: top ops over {s.train_steps} steps")
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12))
    settings = {k: vars(s)[k] for k in (*model_keys, 'dataset', 'batch_size', 'dtype')} | {'device': s.device, 'keep_memory': s.kept}
    settings |= {'threads': torch.get_num_threads(), 'steps_per_epoch': loaders.steps_per_epoch}
    write_json(f"train-{s.dataset}", {'settings': settings, 'results': out}, s)

def walks_bench(s):
    """Seconds to sample grf_walks walks per node of the largest grid in `sides`, K = mask_max_len, per coupling."""
    side = int(s.sides.split(',')[-1])
    base = None
    print(f"sampling {s.grf_walks} walks per node on a {side}x{side} grid (N = {side * side:,}), p_halt {s.grf_p_halt}, K {s.mask_max_len}")
    for coupling in masks.COUPLINGS:
        sample = lambda: masks.sample_grf_walks(masks.grid_graph(side, side), s.grf_walks, s.grf_p_halt, max_len=s.mask_max_len,
                                                generator=torch.Generator().manual_seed(s.seed), coupling=coupling)
        median = statistics.median([timed(sample, s.cuda) for _ in range(s.repeats)])
        base = base or median
        print(f"{coupling:22}{median:8.3f} s{median / base:8.2f} x iid")

if __name__ == '__main__':
    settings = setup(sys.argv[1:])
    {'attention': attention_bench, 'train': train_bench, 'walks': walks_bench}[settings.mode](settings)
