"""
One prepared check of the GPU path, for the first machine with a CUDA GPU: per variant, the graph breaks of
torch.compile, the compiled bf16 training throughput and peak memory of ViT-B/16 at the largest batch per GPU
that fits (up to max_batch), and one training step under DDP with the NCCL backend (one process).

    python check_gpu.py                          # a CUDA GPU: ViT-B/16, 224 px, bf16, inductor (a few minutes)
    python check_gpu.py --size=tiny --device=cpu # anywhere: a tiny ViT, float32, aot_eager (CI runs this)

Prints one line per variant and ends with 'check passed', or stops at the first failure with its traceback.
"""
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure
from model import VARIANTS, ViT, ViTConfig, amp_dtype, ddp_no_buffer_sync

size = 'vitb16'            # vitb16 (ImageNet: K = 100, 100 walks) | tiny (16 px, 2 layers)
device = 'auto'            # auto (cuda if available, else cpu) | cuda | cpu
attns = ','.join(VARIANTS) # comma-separated variants
max_batch = 512            # the largest batch tried; halved until one fits
steps = 5                  # timed training steps per variant, after two compiling ones
# -----------------------------------------------------------------------------
config = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, str))}
configure(config, sys.argv[1:])
globals().update(config)
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
cuda = device.startswith('cuda')
dtype = amp_dtype(device.split(':')[0])
backend = 'inductor' if cuda else 'aot_eager'  # inductor on CPU compiles for minutes
shape = (dict(image_size=224, patch_size=16, in_channels=3, num_classes=1000, dim=768, depth=12, heads=12, mlp_dim=3072,
              mask_max_len=100, grf_walks=100, mask_init_decay=0.99) if size == 'vitb16' else
         dict(image_size=16, patch_size=4, in_channels=3, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64,
              mask_max_len=4, grf_walks=4))
print(f"device {device}" + (f" ({torch.cuda.get_device_name()})" if cuda else '') + f", {str(dtype).split('.')[-1]}, "
      f"torch {torch.__version__}, compile backend {backend}, {size}")

def train_steps(model, batch, n):
    """Seconds per training step (AdamW, bf16 autocast) over n steps, and the peak memory in GB (CUDA)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, shape['in_channels'], shape['image_size'], shape['image_size'], device=device)
    y = torch.randint(shape['num_classes'], (batch,), device=device)
    def step():
        with torch.autocast(device.split(':')[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step(), step()  # compile, warm up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n, torch.cuda.max_memory_allocated() / 1e9 if cuda else float('nan')

for attn in attns.split(','):
    torch.manual_seed(0)
    model = ViT(ViTConfig(attn=attn, **shape)).to(device)
    x = torch.randn(2, shape['in_channels'], shape['image_size'], shape['image_size'], device=device)
    breaks = torch._dynamo.explain(model)(x).graph_break_count
    torch._dynamo.reset()
    batch = max_batch if cuda else 8
    while True:
        try:
            seconds, peak = train_steps(torch.compile(model, backend=backend), batch, steps)
            break
        except torch.cuda.OutOfMemoryError:
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            batch //= 2
            if batch == 0:
                raise
    print(f"{attn:9} graph breaks {breaks}  batch {batch}  {batch / seconds:8.0f} img/s  peak {peak:6.1f} GB", flush=True)
    assert breaks == 0, f"{attn}: {breaks} graph breaks"
    del model
    torch._dynamo.reset()

# one DDP step in a single process: NCCL on CUDA, gloo elsewhere
os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
os.environ.setdefault('MASTER_PORT', '29517')
dist.init_process_group('nccl' if cuda else 'gloo', rank=0, world_size=1)
model = ViT(ViTConfig(attn='grf', **shape)).to(device)
ddp = DDP(model, device_ids=[torch.device(device).index or 0] if cuda else None, **ddp_no_buffer_sync())
seconds, _ = train_steps(ddp, 8, 1)
dist.destroy_process_group()
print(f"DDP ({'nccl' if cuda else 'gloo'}, 1 process): a grf training step took {seconds:.2f} s")
print("check passed")
