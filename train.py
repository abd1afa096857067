"""
Trains a Vision Transformer with one of the attentions of model.VARIANTS on one of six datasets (data.py).

    python train.py configs/fmnist.py --attn=grf                    # laptop: CPU or MPS, or one GPU
    torchrun --standalone --nproc_per_node=8 train.py configs/imagenet.py --attn=toeplitz
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        train.py configs/imagenet.py                                # and --node_rank=1 on the second node
    python train.py configs/inat2021.py --attn=softmax   # fine-tune out/imagenet-softmax/ckpt.pt (init_from)
    python train.py configs/fmnist.py --init_from=resume --eval_only=True          # evaluate out_dir/ckpt.pt

Every hyperparameter is a global below; config files and --key=value arguments override them, left to right
(configurator.py). Writes out_dir/ckpt.pt (each epoch), out_dir/metrics.jsonl and out_dir/result.json.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import outdir
from configurator import configure, fail
from model import ViT, ViTConfig, check_config, saved_config

# I/O
out_dir = ''               # ckpt.pt, metrics.jsonl and result.json go here ('' = out/<dataset>-<attn>; {attn}: the variant)
init_from = 'scratch'      # 'scratch' | 'resume' (continue out_dir/ckpt.pt) | path of a checkpoint to fine-tune from | timm:NAME
init_file = ''             # init_from=timm:NAME: its weights from this file (.npz, .pth, .safetensors), not timm's cache
eval_only = False          # evaluate the model init_from names, print the result, write eval.json beside its checkpoint
ckpt_interval = 0          # also write ckpt.pt mid-epoch, at the first log step this many optimizer steps after the
                           # last save, so that a crash in a long epoch loses no more (0 = at epoch ends only)
log_interval = 50          # optimizer steps between log lines (the only steps that wait for the device)
wandb_log = False          # also log to Weights & Biases (imported only when True)
wandb_project = 'topomask-vit'
wandb_run_name = ''        # '' = the name of out_dir
published = ''             # the recipe's published top-1 (%) per variant, 'softmax:86.54,linear:86.36' (report.py's column)
# data
dataset = 'fmnist'         # fmnist | cifar10 | synthetic | imagenet | inat2021 | places365
data_dir = 'data'          # where the dataset is, or is downloaded to when torchvision can
num_workers = 8            # image-decoding processes per rank (imagenet, inat2021, places365)
crop_pad = 0               # fmnist, cifar10, synthetic: train on random crops of the images zero-padded by this many pixels
flip = False               # fmnist, cifar10, synthetic: mirror half the training images left-right (both on the device)
# model: the fields of model.ViTConfig
image_size = 32            # images are resized (or cropped) to image_size x image_size
patch_size = 4             # tokens = (image_size / patch_size)^2 nodes of the grid graph
in_channels = 0            # 0 = the dataset's
num_classes = 0            # 0 = the dataset's
dim = 64
depth = 2
heads = 4
mlp_dim = 128
dropout = 0.1
head_bias_init = 0.0       # the classifier's bias at the start (the reference's ImageNet recipe: -10 with loss='sigmoid')
attn = 'softmax'           # a key of model.VARIANTS: the paper's softmax, linear, toeplitz, topo, grf, and any added
attn_impl = 'auto'         # auto | dense | fast: how toeplitz and grf are evaluated (a run's own, even resumed)
grf_walks = 20             # grf: random walks per node (n)
grf_p_halt = 0.1           # grf: probability that a walk halts at each step
grf_coupling = 'repelling' # grf: iid | antithetic | repelling | repelling_antithetic (the reference: repelling)
mask_max_len = 10          # topo, grf: highest power of the grid's W in the mask (K)
mask_seed = 0              # grf: seed of the frozen walks (identical on every rank)
graph = 'grid4'            # topo, grf: the patch graph, a key of model.GRAPHS: grid4 (the paper's) | grid8 | grid4_shuffled
grf_resample_every = 0     # grf: draw fresh walks every this many optimizer steps (0 = frozen walks, as the reference)
topo_form = 'alpha'        # topo: 'alpha' learns M = sum_k alpha_k W^k (the reference); 'features' M = Phi Phi^T
mask_init_decay = 0.5      # topo, grf: alpha_k or f_k = decay^k at initialisation (the reference: exp(-0.01))
table_init_decay = 1.0     # toeplitz: t[dr, dc] = decay^(|dr| + |dc|) at initialisation (1: unmasked)
# optimisation
epochs = 30                # the run's length: the learning-rate schedule ends with the last step of the last epoch
max_steps = 0              # stop after this many optimizer steps (0 = never), leaving the schedule as it is
batch_size = 128           # global batch per optimizer step, over all ranks and accumulation micro-steps
grad_accum = 1             # micro-steps per optimizer step: each rank's micro-batch is batch_size / (world * grad_accum)
lr = 1e-3                  # peak learning rate (AdamW)
min_lr = 1e-5              # learning rate at the end of the cosine decay
warmup_steps = 0           # linear warm-up from 0 to lr over this many optimizer steps, then cosine decay to min_lr
weight_decay = 0.05        # AdamW decay of weight matrices (not biases, norms, positions or mask parameters)
mask_lr_mult = 10.0        # lr multiplier of the mask parameters (f, Toeplitz tables): few, and slow at the base lr
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0            # clip the global gradient norm (0 = off)
loss = 'softmax'           # softmax (cross-entropy) | sigmoid (binary cross-entropy per class, the reference's ImageNet loss)
label_smoothing = 0.0      # softmax cross-entropy: label smoothing
mixup = 0.0                # mixup with lambda ~ Beta(mixup, mixup) (0 = off)
seed = 0                   # model init and data order; dropout on rank r uses seed + r
# system
device = 'auto'            # auto (cuda -> mps -> cpu) | cuda | mps | cpu
compile = True             # torch.compile the model (on CUDA; on CPU and MPS it is skipped)
# -----------------------------------------------------------------------------
config = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
config = vars(ViTConfig()) | config  # and ViTConfig's settings not above: a timm ViT's features (from_timm sets them)
configure(config, sys.argv[1:])
globals().update(config)
config['out_dir'] = out_dir = (out_dir or f'out/{dataset}-{attn}').replace('{attn}', attn)
model_keys = [f.name for f in fields(ViTConfig)]

# every setting is checked before anything is read or written: the model's by model.check_config, the others here
# (sweep.py runs this file down to the '# processes and devices' line, so that its runs are checked by these rules)
VALID = [('epochs batch_size grad_accum log_interval', lambda v: v >= 1, "an integer >= 1"),
         ('max_steps warmup_steps ckpt_interval num_workers crop_pad in_channels num_classes', lambda v: v >= 0, "an integer >= 0"),
         ('lr min_lr weight_decay mask_lr_mult grad_clip mixup label_smoothing beta1 beta2', lambda v: v >= 0, "a number >= 0"),
         ('label_smoothing beta1 beta2', lambda v: v < 1, "a number below 1"),
         ('dataset', lambda v: v in data.DATASETS, ', '.join(data.DATASETS)),
         ('loss', lambda v: v in ('softmax', 'sigmoid'), "softmax, sigmoid"),
         ('device', lambda v: v.split(':')[0] in ('auto', 'cuda', 'mps', 'cpu'), "auto, cuda, mps, cpu"),
         ('eval_only', lambda v: not v or init_from != 'scratch', "False with init_from='scratch' (evaluate 'resume' or a path)")]
for keys, ok, valid in VALID:
    for k in keys.split():
        if not ok(config[k]):
            fail(f"{k}={config[k]!r} is invalid; valid: {valid}")
try:
    check_config(ViTConfig(**{k: config[k] for k in model_keys}))
except ValueError as e:
    fail(str(e))

# processes and devices
data.keep_freed_memory()  # before any large tensor: CPU temporaries reuse freed memory, not fresh page faults
ddp, rank, local_rank, world, device, cpu_group = outdir.start_processes(device)  # torchrun's ranks, or one process
device_type = device.split(':')[0]
master = rank == 0
print0 = print if master else (lambda *args, **kwargs: None)
finish = lambda status: outdir.finish(out_dir, status, ddp, drop=lambda: globals().update(model=None, cpu_group=None))

if batch_size % (world * grad_accum):
    fail(f"batch_size={batch_size} is not divisible by world size {world} x grad_accum {grad_accum}")
micro_batch = batch_size // (world * grad_accum)
ptdtype, autocast, scaler = outdir.precision(device_type)  # bf16 where the GPU has it, else fp16 and a scaler; fp32 on CPU

# checkpoint: what the run starts from, settled before any data is read
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
init_from = config['init_from'] = init_from.replace('{attn}', attn)  # a config may name the variant's own checkpoint
# resume: continue out_dir/ckpt.pt exactly; a path: fine-tune from it (what fits; another grid's resampled), or evaluate it
ckpt = None if init_from == 'scratch' or init_from.startswith('timm:') else outdir.read_checkpoint(
    ckpt_path if init_from == 'resume' else init_from, f"init_from={init_from!r}",
    lambda c: c | {'config': c['config'] | asdict(saved_config(c['config']))})  # as it ran
saved_step = ckpt['step'] if init_from == 'resume' and not eval_only else None  # of out_dir/ckpt.pt (None: none yet)
if saved_step is not None:  # the run's record keeps where it started (a fine-tuning's source: report.py --vs=source)
    config['init_from'] = ckpt['config']['init_from']
    print0(f"resuming {out_dir} from step {saved_step}, epoch {ckpt['epoch'] + 1}")
if ckpt and (init_from == 'resume' or eval_only):  # the model is the checkpoint's as it is: its settings win over this run's
    given = {a[2:].partition('=')[0] for a in sys.argv[1:]}  # this run's: the path it takes, and an evaluation's size
    own = given & ({'attn_impl', 'image_size'} if eval_only else {'attn_impl'})
    differ = {k: ckpt['config'][k] for k in model_keys if config[k] != ckpt['config'][k] and k not in own
              and not (k in ('in_channels', 'num_classes') and config[k] == 0)}
    if differ:
        hint = " (a resumed run keeps its image size: fine-tune with --init_from=PATH to change it)"
        print0(f"the checkpoint's model settings win over this run's: {differ}" + hint * ('image_size' in differ and not eval_only))
    config.update({k: ckpt['config'][k] for k in model_keys if k not in own})
globals().update({k: config[k] for k in model_keys})

# out_dir: one run writes it at a time, and a new run never overwrites an old one (rank 0 writes; eval_only writes nothing)
if master and not eval_only:
    outdir.claim(out_dir, resume=init_from == 'resume')
    print0(f"training in {out_dir}" + (f", from {init_from}" if init_from not in ('scratch', 'resume') else ''))

# start-up or an evaluation: nothing unsaved, out at once (the loader workers end with it)
stop_now = lambda signum: outdir.stopped(out_dir, signum, saved_step, ddp, write=master and not eval_only, exit=True)
outdir.catch_stop_signals(at_once=stop_now)  # until training starts

# data
loaders = data.load(dataset, data_dir, image_size, micro_batch, grad_accum=grad_accum, rank=rank, world=world,
                    seed=seed, device=device, num_workers=num_workers, num_classes=num_classes, crop_pad=crop_pad, flip=flip)
steps_per_epoch = loaders.steps_per_epoch
total_steps = epochs * steps_per_epoch
stop_step = min(total_steps, max_steps) if max_steps else total_steps

# model
config['in_channels'] = in_channels = in_channels or loaders.channels
config['num_classes'] = num_classes = num_classes or loaders.num_classes
if (in_channels, num_classes) != (loaders.channels, loaders.num_classes):
    fail(f"the model has in_channels={in_channels}, num_classes={num_classes}; {dataset} has {loaders.channels}, {loaders.num_classes}")
torch.manual_seed(seed)
try:  # scratch; resume: as saved; a checkpoint's path or timm:NAME: fine-tuned into this run's variant (ViT.from_start)
    model, done = ViT.from_start(ViTConfig(**{k: config[k] for k in model_keys}), init_from, ckpt, file=init_file,
                                 exact=init_from == 'resume' or eval_only, inputs=(loaders.mean, loaders.std))
except (ValueError, ImportError, RuntimeError, OSError) as e:  # a model that does not fit; timm's errors
    fail(f"{init_from}: {e}" + '; timm is an optional dependency: pip install timm' * isinstance(e, ImportError), kind='checkpoint')
config.update(vars(model.config))  # a fine-tuning's: the architecture its source's weights fix
globals().update(vars(model.config))
if done:  # what the run took from where it starts: each part only where something happened
    src, this_run = done['source'], f"; this run: {attn}" * (done['source'].attn != attn)
    said = [f"loaded {len(done['loaded'])} tensors", done['resampled'] and f"resampled from {src.image_size} to {image_size} px: "
            f"{done['resampled']}", done['truncated'] and f"kept the first coefficients of {done['truncated']}", done['fresh'] and
            f"started afresh: {done['fresh']}", done['drawn'] and f"walks drawn for this model from mask_seed={mask_seed}: "
            f"{len(done['drawn'])} buffers", done.get('refolded')]
    print0(f"{'evaluating' if eval_only else 'fine-tuning'} from {init_from} (attn={src.attn}{this_run}): " + '; '.join(filter(None, said)))
model.to(device)
raw_model = model  # saved without DDP's module. and compile's _orig_mod. prefixes
optimizer = torch.optim.AdamW(model.param_groups(weight_decay, mask_lr_mult), lr=lr, betas=(beta1, beta2), fused=device_type == 'cuda')
step = 0                   # optimizer steps taken
best = {'top1': 0.0, 'top5': 0.0}
eval_due = False           # whether the model at `step` is still to be evaluated
wall_before = 0.0          # seconds this run spent before it was resumed
loss_sum = torch.zeros((), device=device)  # this rank's loss summed since the last log step, on the device: no sync
loss_count = 0             # the steps since the last log step (a run may stop between log steps)
if init_from == 'resume':
    optimizer.load_state_dict(ckpt['optimizer'])
    for group, now in zip(optimizer.param_groups, model.param_groups(weight_decay, mask_lr_mult)):
        group.update(weight_decay=now['weight_decay'], lr_mult=now['lr_mult'], betas=(beta1, beta2))  # this run's settings
    scaler.load_state_dict(ckpt['scaler'])
    step, best, wall_before = ckpt['step'], ckpt['best'], ckpt['wall_time']  # best: of the evaluations before it
    eval_due = ckpt.get('eval_pending', False)  # saved at an epoch's end, then evaluated (or not, if that crashed)
    rng = outdir.restore_random_state(ckpt['rng'], rank, world, device_type, reseed=seed + rank + 1_000_003 * step)
    loss_sum, loss_count = torch.tensor(rng.get('loss_sum', 0.0), device=device), ckpt.get('loss_count', 0) if rng else 0
else:
    torch.manual_seed(seed + rank)
ckpt = None  # free the memory
if compile and device_type == 'cuda':
    model = torch.compile(model)
eval_model = model  # evaluated without DDP: ranks may see different numbers of validation batches
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None, **outdir.ddp_no_buffer_sync())

print0(f"{raw_model.num_params():,} parameters, attn={attn}, {dataset}: {image_size}px, {(image_size // patch_size) ** 2} tokens, "
       f"{loaders.num_classes} classes; device {device}, {world} rank(s), {str(ptdtype).split('.')[-1]}")
if not eval_only:
    print0(f"global batch {batch_size} = {world} ranks x {grad_accum} micro-steps x {micro_batch}; "
           f"{steps_per_epoch} steps per epoch, {total_steps} in {epochs} epochs" + (f", stopping at {stop_step}" if stop_step < total_steps else ""))
if warmup_steps >= stop_step and not eval_only:
    print0(f"warning: warmup_steps={warmup_steps} is not shorter than the run ({stop_step} steps): lr never reaches {lr}", file=sys.stderr)

def get_lr(step):
    """Linear warm-up to lr over warmup_steps, then cosine decay to min_lr at total_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)

def loss_fn(x, y):
    """The loss of a batch, on images mixed pairwise when mixup > 0 (lambda and the pairing come from the torch
    generator, which resuming restores)."""
    lam, perm = 1.0, None  # the weight of the batch's own images, and the images they are mixed with
    if mixup > 0:
        lam = float(torch.distributions.Beta(mixup, mixup).sample())
        perm = torch.randperm(len(x), device=x.device)
        x = lam * x + (1 - lam) * x[perm]
    logits = model(x).float()
    if loss == 'sigmoid':  # one-vs-all: summed over classes, averaged over images
        target = F.one_hot(y, logits.shape[1]).float()
        target = target if perm is None else lam * target + (1 - lam) * target[perm]
        return F.binary_cross_entropy_with_logits(logits, target, reduction='sum') / len(x)
    ce = lambda labels: F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    return ce(y) if perm is None else lam * ce(y) + (1 - lam) * ce(y[perm])

@torch.no_grad()
def evaluate():
    """Cross-entropy (whatever the training loss, so that runs compare), top-1 and top-5 (%) over the whole validation
    set, and the images replaced in the last pass over each split as undecodable: each rank sums its shard, all-reduce."""
    eval_model.eval()
    sums = torch.zeros(6, device=device)  # loss, top-1 hits, top-5 hits, images, train and val images replaced
    for x, y in loaders.val:
        with autocast:
            logits = eval_model(x).float()
        hits = logits.topk(min(5, logits.size(1)), dim=1).indices == y[:, None]
        sums[:4] += torch.stack([F.cross_entropy(logits, y, reduction='sum'), hits[:, 0].sum().float(),
                                 hits.any(1).sum().float(), torch.tensor(float(len(y)), device=device)])
    sums[4:] = torch.tensor([len(loaders.train.replaced), len(loaders.val.replaced)])
    if ddp:
        dist.all_reduce(sums)
    eval_model.train()
    loss, top1, top5, n, bad_train, bad_val = sums.tolist()
    return {'loss': loss / n, 'top1': 100 * top1 / n, 'top5': 100 * top5 / n, 'count': int(n),
            'undecodable': {'train': int(bad_train), 'val': int(bad_val)}}

if eval_only:
    r = evaluate()
    print0(f"eval {init_from}: loss {r['loss']:.4f} top1 {r['top1']:.2f}% top5 {r['top5']:.2f}% ({r['count']} images)")
    print0(json.dumps({'kind': 'eval', **r}))
    if master:  # eval.json beside the checkpoint; resume's and a timm model's (no file of its own) in out_dir
        folder = out_dir if init_from == 'resume' or init_from.startswith('timm:') else os.path.dirname(os.path.abspath(init_from))
        os.makedirs(folder, exist_ok=True)
        outdir.write_json(os.path.join(folder, 'eval.json'), {'checkpoint': ckpt_path if init_from == 'resume' else init_from,
                                                              'image_size': image_size, **r})
    finish(0)

def log(record):
    if master:
        with open(os.path.join(out_dir, 'metrics.jsonl'), 'a') as f:
            f.write(json.dumps(record) + '\n')
        if wandb_log:
            wandb.log(record, step=record['step'])

def save_checkpoint(eval_pending):
    """Save this step in ckpt.pt, atomically (saved_step = step); eval_pending: an evaluation follows, which a resumed run does first."""
    global saved_step
    rngs = outdir.random_states(device_type, ddp, loss_sum=loss_sum.item())  # and the loss summed since the last log step
    if master:
        ckpt = {'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                'step': step, 'epoch': step // steps_per_epoch, 'rng': rngs, 'config': config, 'best': best,
                'eval_pending': eval_pending, 'wall_time': wall_before + time.time() - t_start, 'loss_count': loss_count}
        outdir.save_checkpoint(ckpt, ckpt_path)
    saved_step = step

def stop_if_signalled():
    """If any rank has had a stop signal (all-reduced on the CPU, gloo: every rank stops after the same step, with no
    wait for the device), save this step (unless saved), say how to resume and exit as that signal's kill does."""
    signum = outdir.stop_signal(cpu_group if ddp else None)
    if signum:
        if saved_step != step:
            save_checkpoint(eval_pending=False)
        outdir.stopped(out_dir, signum, step, ddp, write=master)
        finish(128 + signum)  # 143 or 130, as Slurm and Kubernetes read a job ended by that signal

fmt_time = lambda s: f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"

if master:  # metrics.jsonl keeps the records before the start step: a resumed run logs the later ones again
    outdir.keep_metrics(os.path.join(out_dir, 'metrics.jsonl'),  # not the evaluation it does again
                        lambda r: r['step'] < step or r['step'] == step and not (eval_due and r['kind'] == 'eval'))
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name or os.path.basename(os.path.abspath(out_dir)), config=config)
t_start = time.time()
train_time = 0.0           # seconds spent in training steps (evaluation and checkpoints excluded)
result = None
first_step = step
# nothing left to train: report the checkpoint as it is; fine-tuning: the model as converted first (epoch 0)
eval_due = eval_due or step >= stop_step or step == 0 and init_from != 'scratch'
while True:
    if eval_due:  # the model at the end of an epoch (or at stop_step), saved just before
        outdir.stop_at_once(stop_now)  # nothing unsaved: a stop signal ends the evaluation at once
        result = evaluate()
        best = {k: max(best[k], result[k]) for k in best}
        record = {'kind': 'eval', 'epoch': math.ceil(step / steps_per_epoch), 'step': step, **result}
        print0(f"eval epoch {record['epoch']} step {step}: loss {result['loss']:.4f} top1 {result['top1']:.2f}% "
               f"top5 {result['top5']:.2f}% ({result['count']} images)")
        log(record)
        for split, bad in ((s, n) for s, n in result['undecodable'].items() if n):
            print0(f"{bad} of the {split} images failed to decode and were replaced by the next ones: "
                   f"{', '.join(list(getattr(loaders, split).replaced)[:3])}{', ...' if bad > 3 else ''}")
    outdir.stop_at_once(None)  # training: a stop signal waits for the step's end, and its save
    if step >= stop_step:
        break
    epoch = step // steps_per_epoch
    loaders.sampler.set_epoch(epoch, step % steps_per_epoch)
    batches = iter(loaders.train)
    t0, last_step = time.time(), step
    while True:
        if grf_resample_every and step % grf_resample_every == 0:  # draw r is seeded by (mask_seed, layer, r)
            for m in raw_model.modules():
                if hasattr(m, 'sample_walks'):
                    m.sample_walks(draw=step // grf_resample_every)
        lr_now = get_lr(step)
        for group in optimizer.param_groups:
            group['lr'] = lr_now * group['lr_mult']
        for micro_step in range(grad_accum):
            x, y = next(batches)  # on the device
            if ddp:  # all-reduce gradients on the last micro-step only
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            with autocast:
                loss = loss_fn(x, y) / grad_accum
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_count += 1
        epoch_end = step % steps_per_epoch == 0 or step == stop_step
        if step % log_interval == 0 or epoch_end:
            if ddp:
                dist.all_reduce(loss_sum)
            mean_loss = loss_sum.item() / loss_count / world
            if not math.isfinite(mean_loss):  # the same on every rank: all stop
                print0(f"non-finite loss ({mean_loss}) by step {step}: stopping. The last good checkpoint is untouched: "
                       f"{ckpt_path if os.path.exists(ckpt_path) else '(none written yet)'}", file=sys.stderr)
                finish(1)
            dt = time.time() - t0
            train_time += dt
            ips = (step - last_step) * batch_size / dt
            eta = (stop_step - step) * dt / (step - last_step)
            print0(f"epoch {epoch + 1}/{epochs} step {step}/{stop_step} loss {mean_loss:.4f} lr {lr_now:.2e} "
                   f"{ips:,.0f} img/s eta {fmt_time(eta)}")
            log({'kind': 'train', 'epoch': epoch + 1, 'step': step, 'loss': mean_loss, 'lr': lr_now, 'images_per_s': ips, 'eta_s': eta})
            loss_sum.zero_()
            loss_count = 0
            if ckpt_interval and step - (saved_step or 0) >= ckpt_interval and not epoch_end:
                save_checkpoint(eval_pending=False)  # at a log step, so that a resumed run logs the same averages
                print0(f"saved {ckpt_path} at step {step}")
            t0, last_step = time.time(), step
        if epoch_end:
            break
        stop_if_signalled()
    save_checkpoint(eval_pending=True)  # before the evaluation: an exception there costs no training
    eval_due = True
    stop_if_signalled()  # the evaluation is left to the resumed run
if master:
    summary = {'config': config, 'final': result, 'best': best, 'num_params': raw_model.num_params(), 'steps': step,
               'epochs_trained': step / steps_per_epoch,
               'images_per_s': (step - first_step) * batch_size / max(train_time, 1e-9),  # every step trained is logged
               'wall_time_s': wall_before + time.time() - t_start}
    outdir.write_json(os.path.join(out_dir, 'result.json'), summary)
    print0(f"done: top1 {result['top1']:.2f}% (best {best['top1']:.2f}%), {summary['images_per_s']:,.0f} img/s, "
           f"{fmt_time(summary['wall_time_s'])}; {out_dir}/result.json")
finish(0)
