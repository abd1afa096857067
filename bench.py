"""
Measures what each attention costs as the grid grows, and how fast whole training steps run.

    python bench.py --mode=attention                      # one layer, N = 64 ... 16,384 tokens, a few minutes
    python bench.py --mode=attention --sides=32,64,128 --variants=grf-fast,toeplitz-fft
    python bench.py --mode=train configs/fmnist.py        # images/s per variant, eager and compiled
    python bench.py --mode=train configs/fmnist.py --train_profile=True   # and the top ops of each step

attention: forward + backward of one model.Attention layer (qkv and output projections included, the mask
built inside the forward as in training) on square side x side grids: the median of at least `repeats` timed
calls, and of at least `min_seconds` of them, after one warm-up call. On CUDA, time comes from CUDA events and memory from the allocator's max_memory_allocated.
On CPU, time is wall-clock and the peak memory is replayed from torch.profiler's allocation events
(profile_memory=True: every allocation and free through PyTorch's CPU allocator, in order) in a separate,
untimed call, added to the bytes resident before the call (the layer's parameters and buffers, such as
topo's W powers and grf's walks, plus the input and the output gradient). Scratch memory that MKL or oneDNN
keep outside PyTorch's allocator is not counted. A size whose time or memory, extrapolated from the
variant's last two sizes, exceeds `time_budget` or `memory_budget` is skipped, and its prediction printed
in parentheses. On CPU, freed memory stays in the process (keep_memory, see keep_freed_memory), as CUDA's
caching allocator keeps GPU memory: the table then measures the algorithms rather than the kernel's page
faults. Prints time and memory tables, log-log slopes for N >= slope_min_n, the crossovers (the N
from which a fast path beats its dense twin, or beats softmax), and writes out_dir/attention-<device>.json
(and a .png when matplotlib is installed).

train: the training step of train.py (forward, cross-entropy, backward, gradient clipping, AdamW) on the
config's data, for each attention in `attns`, eager and torch.compile'd. The variants take turns, a few
steps each, for `train_rounds` rounds, so that a noisy machine slows them alike; the ratios to `linear`
are measured within one run. Reports the median step, images/s, the projected epoch and the compile time.

Every setting is a global below; config files (written for train.py, whose keys are accepted here too)
and --key=value arguments override them.
"""
import ast
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from configurator import configure
from model import Attention, ViT, ViTConfig

def keep_freed_memory():
    """Keep freed heap memory in the process (glibc mallopt). By default glibc serves blocks over 32 MB with
    mmap and unmaps them when freed, so every large temporary is page-faulted in afresh: on this 2-core VM that
    was up to 60% of a large-N step (toeplitz-fft 6.5 s -> 2.5 s at N = 16,384). The same two settings as
    environment variables, for train.py on CPU: MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647."""
    import ctypes, ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    return bool(libc.mallopt(-4, 0) and libc.mallopt(-1, 2 ** 31 - 1))  # M_MMAP_MAX, M_TRIM_THRESHOLD

def train_defaults():
    """train.py's hyperparameter globals (its literal assignments), so that its config files apply here."""
    tree = ast.parse(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')).read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out

# -----------------------------------------------------------------------------
mode = 'attention'         # attention | train | walks (GRF walk sampling per coupling)
device = 'auto'            # auto (cuda if available, else cpu) | cuda | cpu
dtype = 'float32'          # float32 | bfloat16 (autocast; the linear forms accumulate in float32 anyway)
threads = 0                # CPU threads (0 = torch's default)
keep_memory = True         # CPU: keep freed memory in the process instead of page-faulting it in again (see keep_freed_memory)
out_dir = 'out/bench'      # where the JSON (and PNG) go
# attention mode
sides = '8,11,16,23,32,45,64,91,128'  # grid sides: N = side^2 = 64 ... 16,384 tokens
variants = 'softmax,linear,toeplitz-dense,toeplitz-fft,topo,grf-dense,grf-fast'
attn_batch = 2
attn_heads = 2
head_dim = 16
grf_walks = 20
grf_p_halt = 0.1
mask_max_len = 10          # K
repeats = 5                # timed calls per point, and more until min_seconds of them (3 when a call is slow)
min_seconds = 1.0
time_budget = 10.0         # seconds per forward + backward: larger predicted sizes are skipped
memory_budget = 4.0        # GB of peak memory: larger predicted sizes are skipped
slope_min_n = 1024         # fit the log-log slopes from this many tokens on
ratio_n = 4096             # report each pair's time and memory ratio at this many tokens
attn_compile = False       # torch.compile the layer
# train mode (the model, data and optimizer settings are train.py's keys, set by the config file)
attns = 'softmax,linear,toeplitz,topo,grf'
train_impls = 'eager,compiled'
train_rounds = 5           # rounds of train_steps steps per variant, taken in turn
train_steps = 4
train_profile = False      # also print each variant's top ops (torch.profiler, eager)
# -----------------------------------------------------------------------------
config = train_defaults()
config.update({k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))})
configure(config, sys.argv[1:])
globals().update(config)

if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
cuda = device.startswith('cuda')
if threads:
    torch.set_num_threads(threads)
kept = keep_memory and not cuda and sys.platform.startswith('linux') and keep_freed_memory()
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
autocast = torch.autocast(device.split(':')[0], dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
torch.manual_seed(seed)
print(f"device {device}" + (f" ({torch.cuda.get_device_name()})" if cuda else f" ({torch.get_num_threads()} threads)")
      + f", {dtype}, torch {torch.__version__}" + (", freed memory kept in the process" if kept else ''))

# name -> (attn, attn_impl)
VARIANTS = {'softmax': ('softmax', 'dense'), 'linear': ('linear', 'dense'), 'toeplitz-dense': ('toeplitz', 'dense'),
            'toeplitz-fft': ('toeplitz', 'fast'), 'topo': ('topo', 'dense'), 'grf-dense': ('grf', 'dense'),
            'grf-fast': ('grf', 'fast')}
CROSSOVERS = [('toeplitz-fft', 'toeplitz-dense'), ('grf-fast', 'grf-dense'), ('grf-fast', 'topo'), ('linear', 'softmax'),
              ('grf-fast', 'softmax'), ('toeplitz-fft', 'softmax')]

def sync():
    if cuda:
        torch.cuda.synchronize()

def timed(fn):
    """Seconds that fn() takes (CUDA events on GPU)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0

@contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ side logs each session start and stop there)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(null)

def peak_bytes(fn, resident):
    """Peak memory of fn(): the allocator's peak on CUDA; on CPU, resident bytes + the highest sum of the
    allocations minus frees that torch.profiler records during fn(), taken in time order."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated()
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return resident + peak

def tensor_bytes(tensors):
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

def attention_layer(name, side):
    attn, impl = VARIANTS[name]
    c = ViTConfig(image_size=side, patch_size=1, dim=attn_heads * head_dim, heads=attn_heads, dropout=0.0, attn=attn,
                  attn_impl=impl, grf_walks=grf_walks, grf_p_halt=grf_p_halt, mask_max_len=mask_max_len, mask_seed=seed)
    layer = Attention(c, layer=0).to(device)
    return torch.compile(layer) if attn_compile else layer

def measure(name, side):
    """(median seconds, peak bytes) of forward + backward of one layer on a side x side grid."""
    layer = attention_layer(name, side)
    x = torch.randn(attn_batch, side * side, attn_heads * head_dim, device=device, requires_grad=True)
    g = torch.randn_like(x)
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with autocast:
            y = layer(x)
        y.backward(g.to(y.dtype))
    times = [timed(step)]  # warm-up
    while len(times) <= 3 or (len(times) <= repeats or sum(times[1:]) < min_seconds) and sum(times[1:]) < time_budget:
        times.append(timed(step))
    resident = tensor_bytes([*layer.parameters(), *layer.buffers(), x, g])
    layer.zero_grad(set_to_none=True)
    x.grad = None
    sync()
    return statistics.median(times[1:]), peak_bytes(step, resident)

def predict(points, n):
    """Extrapolate (time, memory) to n from the last two measured points, at least linearly in N."""
    (n0, t0, m0), (n1, t1, m1) = points[-2:]
    grow = lambda a, b: b * (n / n1) ** max(1.0, math.log(b / a) / math.log(n1 / n0))
    return grow(t0, t1), grow(m0, m1)

def slope(points):
    pts = [(math.log(n), math.log(t), math.log(m)) for n, t, m in points if n >= slope_min_n]
    if len(pts) < 2:
        return None, None
    xm = sum(p[0] for p in pts) / len(pts)
    fit = lambda i: (sum((p[0] - xm) * p[i] for p in pts) / sum((p[0] - xm) ** 2 for p in pts))
    return fit(1), fit(2)

def crossover(res, fast, dense, ns):
    """The smallest N from which `fast` beats `dense` at every larger measured N (a dense point skipped for its
    budget counts as a win), or None."""
    best = None
    for n in reversed(ns):
        f, d = res[fast].get(n), res[dense].get(n)
        if f is None or f['skipped']:
            continue
        if d is not None and not d['skipped'] and d['time_s'] <= f['time_s']:
            break
        best = n
    return best

def attention_bench():
    names = [v for v in variants.split(',') if v]
    ns = [int(s) ** 2 for s in str(sides).split(',')]
    res = {v: {} for v in names}
    for side in (int(s) for s in str(sides).split(',')):
        n = side * side
        for v in names:
            done = [(m, r['time_s'], r['peak_bytes']) for m, r in res[v].items() if not r['skipped']]
            if len(done) >= 2:
                t, mem = predict(done, n)
                if t > time_budget or mem > memory_budget * 1e9:
                    res[v][n] = {'skipped': True, 'time_s': t, 'peak_bytes': mem}
                    continue
            try:
                t, mem = measure(v, side)
                res[v][n] = {'skipped': False, 'time_s': t, 'peak_bytes': mem}
            except (RuntimeError, MemoryError) as e:  # out of memory: note it and go on
                res[v][n] = {'skipped': True, 'time_s': float('nan'), 'peak_bytes': float('nan'), 'error': str(e)[:200]}
        print(f"N={n:6d} " + ' '.join(f"{v} {r[n]['time_s'] * 1e3:.3g}ms{'*' if r[n]['skipped'] else ''}"
                                      for v, r in res.items()), flush=True)
    cell = lambda r, key, scale: ('-' if r is None else f"({r[key] * scale:.3g})" if r['skipped'] else f"{r[key] * scale:.3g}")
    for title, key, scale in (('forward + backward time, ms (median)', 'time_s', 1e3), ('peak memory, MB', 'peak_bytes', 1e-6)):
        print(f"\n{title}; (x) = skipped over budget, predicted")
        print(f"{'N':>7} " + ''.join(f"{v:>15}" for v in names))
        for n in ns:
            print(f"{n:7d} " + ''.join(f"{cell(res[v].get(n), key, scale):>15}" for v in names))
    slopes = {v: dict(zip(('time', 'memory'), slope([(n, r['time_s'], r['peak_bytes']) for n, r in res[v].items()
                                                     if not r['skipped']]))) for v in names}
    print(f"\nlog-log slopes for N >= {slope_min_n} (measured points only)")
    for v, s in slopes.items():
        print(f"  {v:15} time {s['time'] or float('nan'):5.2f}   memory {s['memory'] or float('nan'):5.2f}")
    pairs = [(a, b) for a, b in CROSSOVERS if a in res and b in res]
    cross = {f"{a} < {b}": crossover(res, a, b, ns) for a, b in pairs}
    print(f"\ncrossovers (the N from which the first is faster at every larger measured N); ratios at N = {ratio_n}")
    ratios = {}
    for a, b in pairs:
        n, ra, rb = cross[f"{a} < {b}"], res[a].get(ratio_n), res[b].get(ratio_n)
        if ra and rb and not ra['skipped'] and not rb['skipped']:
            ratios[f"{b} / {a}"] = {'time': rb['time_s'] / ra['time_s'], 'memory': rb['peak_bytes'] / ra['peak_bytes']}
        r = ratios.get(f"{b} / {a}")
        print(f"  {a + ' < ' + b:30} " + (f"from N = {n:<6}" if n else "not in range") +
              (f"   {b} / {a}: time {r['time']:.1f}x, memory {r['memory']:.1f}x" if r else ''))
    for a, b in pairs:  # the dense twin runs up to the last measured N before the crossover
        if b.endswith('-dense') and cross[f"{a} < {b}"]:
            below = [n for n in ns if n < cross[f"{a} < {b}"]]
            print(f"  attn_impl='auto' for {VARIANTS[a][0]}: AUTO_DENSE_MAX_N = {below[-1] if below else 0}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"attention-{device.split(':')[0]}.json")
    settings = {k: config[k] for k in ('device', 'dtype', 'attn_batch', 'attn_heads', 'head_dim', 'grf_walks', 'grf_p_halt',
                                       'mask_max_len', 'repeats', 'min_seconds', 'time_budget', 'memory_budget', 'attn_compile')}
    settings['threads'], settings['keep_memory'] = torch.get_num_threads(), kept
    with open(path, 'w') as f:
        json.dump({'settings': settings, 'results': {v: {str(n): r for n, r in rs.items()} for v, rs in res.items()},
                   'slopes': slopes, 'crossovers': cross, 'ratios_at_n': {str(ratio_n): ratios}}, f, indent=1)
    print(f"wrote {path}")
    plot(res, path[:-5] + '.png')

def plot(res, path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in zip(axes, ('time_s', 'peak_bytes'), ('forward + backward (s)', 'peak memory (bytes)')):
        for v, rs in res.items():
            pts = [(n, r[key]) for n, r in rs.items() if not r['skipped']]
            ax.loglog(*zip(*pts), marker='o', label=v) if pts else None
        ax.set_xlabel('tokens N'), ax.set_ylabel(label), ax.grid(True, which='both', alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")

# -----------------------------------------------------------------------------
def train_bench():
    import data
    d = data.load(dataset, data_dir, image_size, batch_size, 1, 0, 1, seed, device, 0, num_classes)
    batches = iter(())
    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(d.train)
            return next(batches)
    keys = [f.name for f in ViTConfig.__dataclass_fields__.values()]
    runs = {}
    for a in attns.split(','):
        for impl in train_impls.split(','):
            torch.manual_seed(seed)
            c = {k: config[k] for k in keys} | {'attn': a, 'in_channels': d.channels, 'num_classes': d.num_classes}
            raw = ViT(ViTConfig(**c)).to(device)
            opt = torch.optim.AdamW(raw.param_groups(weight_decay, mask_lr_mult), lr=lr, betas=(beta1, beta2), fused=cuda)
            model = torch.compile(raw) if impl == 'compiled' else raw
            def step(model=model, raw=raw, opt=opt):
                x, y = next_batch()
                with autocast:
                    loss = F.cross_entropy(model(x).float(), y)
                loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            first = timed(step)  # compiles, when compiled
            runs[f"{a} {impl}"] = {'step': step, 'first_s': first, 'times': []}
            print(f"built {a} {impl}: first step {first:.2f} s", flush=True)
    for _ in range(train_rounds):
        for r in runs.values():
            r['step']()  # one untimed step after switching variants
            r['times'] += [timed(r['step']) for _ in range(train_steps)]
    print(f"\n{dataset}: batch {batch_size}, {image_size}px / patch {patch_size}, dim {dim}, depth {depth}, heads {heads}, "
          f"dropout {dropout}; {d.steps_per_epoch} steps per epoch; median of {train_rounds} x {train_steps} steps")
    print(f"{'variant':18}{'step ms':>9}{'img/s':>8}{'epoch s':>9}{'/ linear':>10}{'compile s':>11}")
    out = {}
    for name, r in runs.items():
        a, impl = name.split()
        med = statistics.median(r['times'])
        lin = runs.get(f"linear {impl}")
        ratio = med / statistics.median(lin['times']) if lin else float('nan')
        compile_s = max(0.0, r['first_s'] - med) if impl == 'compiled' else 0.0
        out[name] = {'step_ms': med * 1e3, 'images_per_s': batch_size / med, 'epoch_s': med * d.steps_per_epoch,
                     'ratio_to_linear': ratio, 'compile_s': compile_s, 'times_ms': [t * 1e3 for t in r['times']]}
        print(f"{name:18}{med * 1e3:9.1f}{batch_size / med:8.0f}{med * d.steps_per_epoch:9.1f}{ratio:10.2f}"
              + (f"{compile_s:11.1f}" if impl == 'compiled' else ''))
    if train_profile:
        for name, r in runs.items():
            if name.endswith('eager'):
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    for _ in range(train_steps):
                        r['step']()
                print(f"\n{name}: top ops over {train_steps} steps")
                print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"train-{dataset}-{device.split(':')[0]}.json")
    with open(path, 'w') as f:
        json.dump({'settings': {k: config[k] for k in (*keys, 'dataset', 'batch_size', 'dtype', 'device')}
                   | {'threads': torch.get_num_threads(), 'keep_memory': kept, 'steps_per_epoch': d.steps_per_epoch}, 'results': out}, f, indent=1)
    print(f"wrote {path}")

def walks_bench():
    """Seconds to sample grf_walks walks per node of the largest grid in `sides`, K = mask_max_len, per coupling."""
    import masks
    side = int(sides.split(',')[-1])
    base = None
    print(f"sampling {grf_walks} walks per node on a {side}x{side} grid (N = {side * side:,}), p_halt {grf_p_halt}, K {mask_max_len}")
    for coupling in masks.COUPLINGS:
        g = torch.Generator().manual_seed(seed)
        times = [timed(lambda: masks.sample_grf_walks(side, side, grf_walks, grf_p_halt, mask_max_len, g, coupling))
                 for _ in range(repeats)]
        base = base or statistics.median(times)
        print(f"{coupling:22}{statistics.median(times):8.3f} s{statistics.median(times) / base:8.2f} x iid")

if __name__ == '__main__':
    {'attention': attention_bench, 'train': train_bench, 'walks': walks_bench}[mode]()
