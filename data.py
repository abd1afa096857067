"""
Datasets as iterables of (images, labels) batches, sharded over DDP ranks by one batch sampler.
  fmnist, cifar10, synthetic   held whole on the device as uint8, batched by index, normalised per batch
  imagenet, inat2021, places365  image files decoded by worker processes (imagefiles.py), normalised on the device
imagefiles.py, which this module imports (never the other way), also finds or downloads every dataset's files.
"""
import ctypes
import ctypes.util
import os
import platform
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import torchvision

import imagefiles
from configurator import fail
from imagefiles import downloaded, rank_zero_first

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

def keep_freed_memory():
    """Keep freed heap memory in the process where the C library is glibc (mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD 2^31 - 1),
    as CUDA's caching allocator keeps GPU memory: glibc serves blocks over 32 MB with mmap and unmaps them when freed, so
    each large CPU temporary of a step is page-faulted in afresh. Call it before any large tensor; True if applied."""
    if platform.libc_ver()[0] != 'glibc':
        return False
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    return bool(libc.mallopt(-4, 0) and libc.mallopt(-1, 2 ** 31 - 1))  # M_MMAP_MAX, M_TRIM_THRESHOLD

class ShardedBatches:
    """Batch sampler for every dataset. Training: each epoch one permutation, seeded by (seed, epoch) and the
    same on every rank, is cut into global batches of micro * accum * world samples (the rest dropped);
    rank r takes micro-batches a * world + r, a < accum, of each (keyed: as (epoch, sample) pairs, the key of a sample's
    random crop in imagefiles.ImageFiles). Evaluation: rank r takes samples r, r + world, r + 2 world, ... in order, so
    every sample is counted exactly once over all ranks."""
    def __init__(self, n, micro, rank=0, world=1, accum=1, seed=0, train=True, keyed=False):
        self.n = n              # samples in the split
        self.micro, self.accum = micro, accum  # samples per micro-batch, micro-batches per optimizer step
        self.rank, self.world = rank, world    # this process's place among all
        self.seed = seed
        self.train, self.keyed = train, keyed
        self.steps = n // (micro * accum * world)  # optimizer steps per epoch
        self.epoch, self.start = 0, 0  # where the next pass starts: epoch, optimizer step within it

    def set_epoch(self, epoch, start_step=0):
        """Iterate epoch `epoch` from optimizer step `start_step` on (to resume mid-epoch)."""
        self.epoch, self.start = epoch, start_step

    def __iter__(self):
        if not self.train:
            yield from (b.tolist() for b in torch.arange(self.rank, self.n, self.world).split(self.micro))
            return
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        B = self.micro * self.accum * self.world
        for s in range(self.start, self.steps):
            for a in range(self.accum):
                i = s * B + (a * self.world + self.rank) * self.micro
                batch = perm[i:i + self.micro].tolist()
                yield [(self.epoch, j) for j in batch] if self.keyed else batch

def crops_and_flips(x, pad, flip):
    """Each image of x (uint8 [B, C, H, W]) cropped at a random offset from itself zero-padded by `pad` pixels and, if
    `flip`, mirrored left-right with probability 1/2: one gather, O(B C H W), drawn on x's device (checkpointed)."""
    B, C, H, W = x.shape
    x = F.pad(x, (pad, pad, pad, pad))
    start = torch.randint(0, 2 * pad + 1, (2, B, 1), device=x.device)
    rows = start[0] + torch.arange(H, device=x.device)  # [B, H]: the rows of the padded image that each crop takes
    cols = start[1] + torch.arange(W, device=x.device)
    if flip:
        cols = torch.where(torch.rand(B, 1, device=x.device) < 0.5, cols.flip(1), cols)
    b = torch.arange(B, device=x.device)[:, None, None]
    return x[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]

class Normalised:
    """uint8 image batches [B, C, H, W] from `batches`, moved to the device, augmented there (augment(x), if given)
    and normalised: a quarter of float32's bytes cross from the loader workers and over the bus. A file dataset's
    batches also name the images replaced (imagefiles.ImageFiles): `replaced` lists this pass's; more than `limit` end the run."""
    def __init__(self, batches, device, mean, std, augment=None, limit=0):
        self.batches, self.device, self.limit = batches, device, limit
        self.augment = augment or (lambda x: x)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.replaced = {}

    def __iter__(self):
        self.replaced = {}  # the files of this pass that failed to decode (a dict: in order, each once)
        for x, y, *failed in self.batches:  # a file dataset's batch also names them, '\n'-joined per sample
            self.replaced.update(dict.fromkeys(path for paths in (failed[0] if failed else ()) for path in paths.split('\n') if path))
            if len(self.replaced) > self.limit:
                fail(f"{len(self.replaced)} images failed to decode in one pass, more than {self.limit} (0.1%): "
                     f"the copy of the dataset is damaged; {', '.join(list(self.replaced)[:3])}, ...", kind='data')
            x = self.augment(x.to(self.device, non_blocking=True))
            yield (x.float() - self.mean) / self.std, y.to(self.device, non_blocking=True)

class TensorBatches:
    """A split held whole on the device as uint8 [N, C, H, W]: batches are index lookups, no per-sample work."""
    def __init__(self, x, y, sampler):
        self.x, self.y, self.batch_sampler = x, y, sampler

    def __iter__(self):
        for idx in self.batch_sampler:
            idx = torch.tensor(idx).to(self.x.device, non_blocking=True)  # no wait for the GPU's queue
            yield self.x[idx], self.y[idx]

def resized(x, size):
    """uint8 [N, C, h, w] -> uint8 [N, C, size, size], bilinear (antialiased when shrinking), once up front."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = [F.interpolate(c.float(), size=(size, size), mode='bilinear', antialias=True, align_corners=False)
           for c in x.split(8192)]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)

FMNIST_MD5 = {'train-images-idx3-ubyte': 'f4a8712d7a061bf5bd6d2ca38dc4d50a', 'train-labels-idx1-ubyte': '9018921c3c673c538a1fc5bad174d6f9',
              't10k-images-idx3-ubyte': '8181f5470baa50b63fa0f6fddb340f0a', 't10k-labels-idx1-ubyte': '15d484375f8d13e6eb1aabb0c3f46965'}

def fmnist(data_dir, train, num_classes):
    ds = downloaded(lambda: torchvision.datasets.FashionMNIST(data_dir, train=train, download=True), 'FashionMNIST', data_dir,
                    "data_dir/FashionMNIST/raw/*-ubyte(.gz)", {os.path.join(data_dir, 'FashionMNIST', 'raw', f): md5 for f, md5 in FMNIST_MD5.items()})
    return ds.data[:, None], ds.targets, (0.2860,), (0.3530,)

def cifar10(data_dir, train, num_classes):
    C = torchvision.datasets.CIFAR10
    files = C.train_list + C.test_list + [(C.meta['filename'], C.meta['md5'])]
    ds = downloaded(lambda: C(data_dir, train=train, download=True), 'CIFAR-10', data_dir, "data_dir/cifar-10-batches-py/",
                    {os.path.join(data_dir, C.base_folder, f): md5 for f, md5 in files})
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

def synthetic(data_dir, train, num_classes, size=32):
    """num_classes classes (10 unless set), each a fixed random 8x8 texture tiled over the image, seen
    through heavy pixel noise: one patch is ambiguous, the average over all patches is not."""
    num_classes = num_classes or 10
    g = torch.Generator().manual_seed(1234)
    textures = torch.randn(num_classes, 1, 8, 8, generator=g).repeat(1, 1, size // 8, size // 8)
    g.manual_seed(1 if train else 2)
    n = 8192 if train else 2048
    y = torch.randint(num_classes, (n,), generator=g)
    x = textures[y] + 2.0 * torch.randn(n, 1, size, size, generator=g)
    return (x * 30 + 128).round().clamp(0, 255).to(torch.uint8), y, (0.5,), (0.25,)

TENSOR_SETS = {'fmnist': fmnist, 'cifar10': cifar10, 'synthetic': synthetic}
FILE_SETS = ('imagenet', 'inat2021', 'places365')
DATASETS = (*TENSOR_SETS, *FILE_SETS)

def load(dataset, data_dir, image_size, micro_batch, grad_accum=1, rank=0, world=1, seed=0, device='cpu',
         num_workers=0, num_classes=0, crop_pad=0, flip=False):
    """-> namespace(train, val: iterables of (x, y) micro-batches for this rank; sampler: the train ShardedBatches
    (set_epoch before each pass); steps_per_epoch, num_classes, channels, num_val;
    mean, std: the normalisation per channel, of pixels in 0..1). num_classes sets the synthetic
    task's class count; crop_pad, flip: the training images of a tensor dataset pass through crops_and_flips."""
    if (crop_pad or flip) and dataset not in TENSOR_SETS:
        fail(f"crop_pad={crop_pad}, flip={flip} apply to {', '.join(TENSOR_SETS)}; {dataset} has its own crops")
    shard = lambda n, train: ShardedBatches(n, micro_batch, rank=rank, world=world, accum=grad_accum, seed=seed, train=train,
                                            keyed=train and dataset in FILE_SETS)
    if dataset in TENSOR_SETS:
        splits = []
        for train in (True, False):
            with rank_zero_first(rank, world):
                x, y, mean, std = TENSOR_SETS[dataset](data_dir, train, num_classes)
            x, y = resized(x, image_size).to(device), y.to(device)
            splits.append(TensorBatches(x, y, shard(len(y), train)))
        train, val = splits
        channels = train.x.shape[1]
        num_classes = int(train.y.max()) + 1
        limits = (0, 0)
    elif dataset in FILE_SETS:
        train, val, num_classes, limits = imagefiles.splits(dataset, data_dir, image_size, shard, rank, world, device, num_workers, seed)
        channels = 3
        mean, std = IMAGENET_STATS
    else:
        fail(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    sampler = train.batch_sampler
    num_val = val.batch_sampler.n
    augment = (lambda x: crops_and_flips(x, crop_pad, flip)) if crop_pad or flip else None
    train, val = Normalised(train, device, mean, std, augment, limits[0]), Normalised(val, device, mean, std, limit=limits[1])
    if sampler.steps == 0:
        fail(f"{dataset} has fewer training images than one global batch of {micro_batch * grad_accum * world}", kind='data')
    return SimpleNamespace(train=train, val=val, sampler=sampler, steps_per_epoch=sampler.steps,
                           num_classes=num_classes, channels=channels, num_val=num_val, mean=mean, std=std)
