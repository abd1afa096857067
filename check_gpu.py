"""
One prepared check of a CUDA GPU that returns every figure the project lacks from one run of at most budget_s seconds:
1. one training step under DDP with the NCCL backend (one process);
2. per attention path (bench.py's names: toeplitz and grf have a dense and a fast path): the graph breaks of
   torch.compile; the compiled bf16 training throughput of ViT-B/16 at the largest batch that fits (max_batch, halved
   until an eager step fits) and its peak memory; the FLOPs of a step (FlopCounterMode: matmuls, convolutions and
   attention, not the FFTs nor the sparse GRF operators) and the MFU they make of the device's bf16 peak (PEAK_FLOPS;
   null for a device not in it);
3. bench.py's attention benchmark in bf16 at N = 64 ... 16,384 tokens, in what is left of the budget (at least
   bench_s): time and memory per path, the crossovers, and the dense_max_n they imply for this device type.
Each variant's model is built once, on the CPU (the seconds each took are reported: ViT-B/16's GRF walks and topo's
W powers take a while), and copied for each of its paths.

    python check_gpu.py                           # a CUDA GPU: ViT-B/16, 224 px, bf16, inductor (8 minutes)
    python check_gpu.py --size=tiny --device=cpu  # anywhere: a tiny ViT, float32, aot_eager (CI runs this)

What would not fit in the budget is skipped, and said so. Prints each figure as it comes and a table at the end; writes
them all to `out` (JSON, rewritten after each stage), with bench.py's attention-<device>.json and .png beside it. Ends
with 'check passed', or 'check failed: ...' (exit status 1) naming what failed; each failure's traceback is above it.
"""
import copy
import gc
import json
import os
import statistics
import sys
import time
import traceback
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode

import bench
from configurator import configure, fail
from model import VARIANTS, Attention, ViT, ViTConfig
from outdir import amp_dtype, ddp_no_buffer_sync

size = 'vitb16'            # vitb16 (ImageNet: K = 100, 100 walks) | tiny (16 px, 2 layers)
device = 'auto'            # auto (cuda if available, else cpu) | cuda | cpu
paths = 'softmax,grf-fast,toeplitz-fast,grf-dense,toeplitz-dense,topo,linear'  # trained in this order: the budget cuts the last
max_batch = 512            # the largest batch tried; halved until an eager training step fits
steps = 5                  # timed training steps per path, after two compiling ones
budget_s = 480             # seconds for the whole check: a stage that would not fit is skipped, and said so
bench_s = 120              # seconds of budget_s kept for the attention benchmark
bench_paths = 'softmax,linear,toeplitz-dense,toeplitz-fast,grf-dense,grf-fast'  # not topo: its W powers (float64, on the CPU) take 24 GB at N = 16,384
bench_sides = ''           # attention benchmark grid sides ('': 8 ... 128 for vitb16, N = 64 ... 16,384; 4,8 for tiny)
out = 'out/check_gpu.json' # every figure; bench.py's attention-<device>.json and .png go beside it
# -----------------------------------------------------------------------------
# bf16 dense tensor-core peak, FLOP/s, of the part named in torch.cuda.get_device_name() (NVL parts run slower: not here)
PEAK_FLOPS = {'A100': 312e12, 'H100 80GB HBM3': 989e12, 'H100 PCIe': 756e12, 'H200': 989e12}
SHAPES = {'vitb16': dict(image_size=224, patch_size=16, in_channels=3, num_classes=1000, dim=768, depth=12, heads=12,
                         mlp_dim=3072, mask_max_len=100, grf_walks=100, mask_init_decay=0.99),
          'tiny': dict(image_size=16, patch_size=4, in_channels=3, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64,
                       mask_max_len=4, grf_walks=4)}
config = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, str))}
configure(config, sys.argv[1:])
globals().update(config)
if size not in SHAPES:
    fail(f"size={size!r} is invalid; valid: {', '.join(SHAPES)}")
if set(paths.split(',')) - set(bench.PATHS):
    fail(f"paths={paths!r} names an unknown path; valid: {','.join(bench.PATHS)}")
start = time.perf_counter()
left = lambda: budget_s - (time.perf_counter() - start)
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
cuda = device.startswith('cuda')
if cuda:
    torch.cuda.set_device(torch.device(device).index or 0)  # the peak memory and DDP take the current device
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
dtype = amp_dtype(device.split(':')[0])
backend = 'inductor' if cuda else 'aot_eager'  # inductor on CPU compiles for minutes
shape = SHAPES[size]
name = torch.cuda.get_device_name() if cuda else 'cpu'
peak_flops = next((p for part, p in PEAK_FLOPS.items() if part in name and 'NVL' not in name), None)
out_dir = os.path.dirname(out) or '.'
memory_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if cuda else 4.0
bench_settings = bench.setup([f'--device={device}', f"--dtype={str(dtype).split('.')[-1]}", f'--out_dir={out_dir}',
                              f'--variants={bench_paths}', '--time_budget=1.0', '--min_seconds=0.2',
                              f"--sides={bench_sides or ('8,11,16,23,32,45,64,91,128' if size == 'vitb16' else '4,8')}",
                              f'--memory_budget={memory_gb / 2}'])
print(f"check_gpu: {size}, compile backend {backend}, bf16 peak {f'{peak_flops / 1e12:.0f} TFLOP/s' if peak_flops else 'unknown'}"
      f", budget {budget_s} s ({bench_s} s of it for the attention benchmark)", flush=True)
result = {'device': device, 'device_name': name, 'torch': torch.__version__, 'dtype': str(dtype).split('.')[-1],
          'compile_backend': backend, 'size': size, 'peak_flops': peak_flops, 'budget_s': budget_s,
          'build_s': {}, 'ddp': None, 'train': {}, 'attention': None, 'skipped': [], 'failed': [], 'elapsed_s': None,
          'passed': None}

def save():
    result['elapsed_s'] = time.perf_counter() - start
    os.makedirs(out_dir, exist_ok=True)
    with open(out, 'w') as f:
        json.dump(result, f, indent=1)

def failed(what, e):
    """A stage that failed: its traceback, and a line in the result's failures; the check goes on."""
    traceback.print_exception(e)
    result['failed'].append(f"{what}: {type(e).__name__}: {str(e)[:300]}")
    print(f"{what} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)

def skip(what, why):
    result['skipped'].append(f"{what}: {why}")
    print(f"{what} skipped: {why}", flush=True)

def trainer(model, batch):
    """One AdamW training step of model on a random batch under autocast, as a function without arguments."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, shape['in_channels'], shape['image_size'], shape['image_size'], device=device)
    y = torch.randint(shape['num_classes'], (batch,), device=device)
    def step():
        with bench_settings.autocast:
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step

def out_of_memory(e):
    """Whether e is CUDA running out of memory: the caching allocator's error, or a library's failed allocation."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or 'out of memory' in str(e) or 'ALLOC_FAILED' in str(e)

def free_memory(model=None):
    if model is not None:
        model.zero_grad(set_to_none=True)
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()  # does nothing without CUDA

def fitting(model, batches, run):
    """(batch, run(model, batch)) for the first of batches at which run fits in memory."""
    for batch in batches:
        try:
            return batch, run(model, batch)
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            print(f"  batch {batch}: out of memory", flush=True)
        free_memory(model)  # out of the except clause, whose traceback holds the step's tensors
    raise torch.cuda.OutOfMemoryError(f"not even batch {batches[-1]} fits")

def flops_per_image(model):
    """FLOPs of an eager training step, (per image, per step besides): counted at batches 1 and 2, as a step is affine
    in the batch (grf's dense P P^T and topo's power series do not depend on it)."""
    counts = []
    for batch in (1, 2):
        step = trainer(model, batch)
        with FlopCounterMode(display=False) as counter:
            step()
        counts.append(counter.get_total_flops())
    return counts[1] - counts[0], 2 * counts[0] - counts[1]

def compiled_steps(model, batch):
    """(seconds of the first step, which compiles; median seconds of `steps` steps after a second; peak bytes)."""
    step = trainer(torch.compile(model, backend=backend), batch)
    first = bench.timed(step, cuda)
    bench.timed(step, cuda)
    seconds = statistics.median(bench.timed(step, cuda) for _ in range(steps))
    return first, seconds, bench.peak_bytes(step, 0, cuda)  # CUDA: the allocator's peak over a step

def on_path(attn, impl):
    """A copy of the variant's model on the device, taking path impl: set on the copy, as the model is built once."""
    model = copy.deepcopy(built[attn]).to(device)
    for m in model.modules():
        if isinstance(m, Attention):
            m.impl = impl
    return model

def check_path(path):
    model = on_path(*bench.PATHS[path])
    x = torch.randn(2, shape['in_channels'], shape['image_size'], shape['image_size'], device=device)
    breaks = torch._dynamo.explain(model)(x).graph_break_count
    torch._dynamo.reset()
    per_image, fixed = flops_per_image(model)
    halvings = lambda b: [b >> i for i in range(b.bit_length())]  # b, b/2, ..., 1
    eager_batch, _ = fitting(model, halvings(max_batch if cuda else min(max_batch, 8)), lambda m, b: trainer(m, b)())
    free_memory(model)
    batch, (first, seconds, peak) = fitting(model, halvings(eager_batch), compiled_steps)
    flops = fixed + batch * per_image
    return {'graph_breaks': breaks, 'batch': batch, 'images_per_s': batch / seconds, 'step_s': seconds,
            'compile_s': max(0.0, first - seconds), 'peak_gb': peak / 1e9, 'flops_per_image': per_image,
            'flops_per_step': flops, 'mfu': flops / seconds / peak_flops if peak_flops else None}

# 1. each variant's model, once (at ViT-B/16 grf's walks and topo's W powers take a while to build, on the CPU)
built = {}
for attn in dict.fromkeys([*(bench.PATHS[path][0] for path in paths.split(',')), 'grf']):
    t0 = time.perf_counter()
    torch.manual_seed(0)
    built[attn] = ViT(ViTConfig(attn=attn, **shape))
    result['build_s'][attn] = time.perf_counter() - t0
    print(f"built the {attn} model in {result['build_s'][attn]:.1f} s", flush=True)

# 2. one DDP step in a single process: NCCL on CUDA, gloo elsewhere
os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
os.environ.setdefault('MASTER_PORT', '29517')
try:
    dist.init_process_group('nccl' if cuda else 'gloo', rank=0, world_size=1)
    model = on_path('grf', 'auto')
    step = trainer(DDP(model, device_ids=[torch.cuda.current_device()] if cuda else None, **ddp_no_buffer_sync()), 8)
    step()
    result['ddp'] = {'backend': dist.get_backend(), 'step_s': bench.timed(step, cuda)}
    print(f"DDP ({result['ddp']['backend']}, 1 process): a grf training step at batch 8 took {result['ddp']['step_s']:.2f} s")
    del model, step
except Exception as e:
    failed('DDP', e)
if dist.is_initialized():
    dist.destroy_process_group()
save()

# 3. every path trained, compiled; a path is skipped when the slowest so far would not fit before the benchmark's share
took = []
for path in paths.split(','):
    if took and left() - bench_s < max(took):
        skip(path, f"a path took up to {max(took):.0f} s; {left() - bench_s:.0f} s left before the benchmark's {bench_s} s")
        continue
    t0 = time.perf_counter()
    print(f"{path}: graph breaks, FLOPs, largest batch, compiling ...", flush=True)
    try:
        r = result['train'][path] = check_path(path)
        print(f"{path:15} graph breaks {r['graph_breaks']}  batch {r['batch']}  {r['images_per_s']:8.0f} img/s  peak "
              f"{r['peak_gb']:.3g} GB  {r['flops_per_image'] / 1e9:.3g} GFLOP/image" +
              (f"  MFU {r['mfu']:.1%}" if r['mfu'] is not None else '') + f"  (compiling {r['compile_s']:.0f} s)", flush=True)
        if r['graph_breaks']:
            result['failed'].append(f"{path}: {r['graph_breaks']} graph breaks")
    except Exception as e:
        result['train'][path] = {'error': f"{type(e).__name__}: {str(e)[:300]}"}
        failed(path, e)
    free_memory()  # out of the except clause, whose traceback holds the path's model
    took.append(time.perf_counter() - t0)
    save()

# 4. the attention benchmark, in what is left of the budget
if left() < 10:
    skip('attention benchmark', f"{left():.0f} s left")
else:
    budget = SimpleNamespace(**{**vars(bench_settings), 'total_budget': left() - 10.0})  # the last point begun may take a few s
    try:
        measured = result['attention'] = bench.attention_bench(budget)
        errors = {f"{p} N={n}": r['error'] for p, rs in measured['results'].items() for n, r in rs.items() if 'error' in r}
        for what, e in errors.items():
            if 'out of memory' in e:
                skip(f"attention {what}", e)
            else:
                failed(f"attention {what}", RuntimeError(e))
        late = [p for p, rs in measured['results'].items() if any(r.get('total_budget_spent') for r in rs.values())]
        if late:
            skip('attention benchmark', f"out of time before the largest N of {', '.join(late)}")
    except Exception as e:
        failed('attention benchmark', e)
save()

print(f"\n{name}, {result['dtype']}, {size}: compiled training per path")
print(f"{'path':15}{'breaks':>7}{'batch':>6}{'img/s':>9}{'step ms':>9}{'peak GB':>9}{'GFLOP/img':>10}{'MFU':>7}{'compile s':>10}")
for path, r in result['train'].items():
    if 'error' in r:
        print(f"{path:15} {r['error'][:90]}")
        continue
    mfu = f"{r['mfu']:.1%}" if r['mfu'] is not None else '-'
    print(f"{path:15}{r['graph_breaks']:7d}{r['batch']:6d}{r['images_per_s']:9.0f}{r['step_s'] * 1e3:9.1f}{r['peak_gb']:9.3g}"
          f"{r['flops_per_image'] / 1e9:10.3g}{mfu:>7}{r['compile_s']:10.0f}")
for attn in [a for a in VARIANTS if VARIANTS[a].fast_cost]:
    dense, fast = (result['train'].get(f'{attn}-{impl}', {}).get('images_per_s') for impl in ('dense', 'fast'))
    n = (shape['image_size'] // shape['patch_size']) ** 2
    measured = (result['attention'] or {}).get('dense_max_n', {}).get(attn, 'no crossover measured')
    print(f"{attn}: dense_max_n['{device.split(':')[0]}'] from the attention benchmark: {measured}; at N = {n} training, "
          + (f"fast / dense {fast / dense:.2f}x images/s" if dense and fast else "not both paths measured")
          + f" (model.py: fast_cost {VARIANTS[attn].fast_cost})")
runs = (result['attention'] or {}).get('results', {})
for n in (4096, 16384):  # grf's O(N) sparse path against SDPA's softmax, one layer (the point of the GRF mask)
    grf, sdpa = (runs.get(path, {}).get(n) for path in ('grf-fast', 'softmax'))
    both = grf and sdpa and not (grf['skipped'] or sdpa['skipped'])
    result.setdefault('grf_fast_over_softmax', {})[n] = grf['time_s'] / sdpa['time_s'] if both else None
    print(f"grf-fast / softmax (SDPA), one layer at N = {n}: " + (f"{grf['time_s'] / sdpa['time_s']:.2f}x the time, "
          f"{grf['peak_bytes'] / sdpa['peak_bytes']:.2f}x the memory" if both else "not both measured"))
result['passed'] = not result['failed']
save()
print(f"wrote {out} in {result['elapsed_s']:.0f} s")
if result['skipped']:
    print(f"skipped: {'; '.join(result['skipped'])}")
if result['failed']:
    print(f"check failed: {'; '.join(result['failed'])}")
    sys.exit(1)
print("check passed")
