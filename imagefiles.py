"""
Datasets read from image files, decoded by DataLoader worker processes (data.load batches them):
  imagenet     ImageFolder on data_dir/train and data_dir/val (ImageNet's layout, one folder per class)
  inat2021     torchvision INaturalist, 2021_train / 2021_valid
  places365    torchvision Places365, small (256x256) images, train-standard / val
Train and val must hold the same classes (a label is a place in the class list). An image that fails to decode is
replaced by the next file and named; more than UNDECODABLE_MAX of a split end the run (data.Normalised). A file
that cannot be read (gone, an I/O error) is no damaged image: it ends the run at once, in one line naming it.
Also what every dataset on disk needs, the tensor sets of data.py too: rank 0 finds or downloads it first
(rank_zero_first), and a download that fails is one line naming the folder and the layout expected (downloaded).
"""
import ctypes
import io
import os
import signal
from contextlib import contextmanager, suppress
from functools import partial

import torch
import torch.distributed as dist
import torchvision
import torchvision.transforms as T
from PIL import Image
from torchvision.datasets.utils import check_integrity

from configurator import fail

IMAGENET_LAYOUT = "data_dir/train/<wnid>/*.JPEG and data_dir/val/<wnid>/*.JPEG (one folder per class, the same in both)"
UNDECODABLE_MAX = 0.001    # the share of a rank's pass through a split that may fail to decode (at least one image)

class UnreadableFile(Exception):
    """A file a DataLoader worker cannot read. The worker hands it to the main process, which raises
    UnreadableFile(its traceback): that fails (configurator.fail) with the traceback's last line, as every data error."""
    def __new__(cls, msg):
        if 'Traceback' in msg:
            fail(msg.rstrip().rpartition('UnreadableFile: ')[2], kind='data')
        return super().__new__(cls, msg)

class ImageFiles(torch.utils.data.Dataset):
    """The images of samples [(path, label)], decoded and cropped to uint8 tensors (normalised later, on the device) as the
    reference's ImageNet pipeline: random area 8-100%, aspect 3/4-4/3, bicubic, flipped; evaluation: the central 87.5% of
    the short side. Item i, or (epoch, i) in training: (image, label, the paths, one per line, of the files that failed to
    decode before it): the next file stands in for one that fails; after `tries` failures in a row, a blank image (their
    paths stop the run). The crop and flip of (epoch, i) are drawn from a generator seeded by (seed, epoch, i): the same
    in any process, so a resumed run and any number of workers see the images an unstopped run sees."""
    def __init__(self, samples, image_size, train, tries, seed=0):
        bicubic = T.InterpolationMode.BICUBIC
        tf = T.Compose([T.RandomResizedCrop(image_size, interpolation=bicubic), T.RandomHorizontalFlip()] if train else
                       [T.Resize(round(image_size / 0.875), interpolation=bicubic), T.CenterCrop(image_size)])
        self.transform = T.Compose([tf, T.PILToTensor()])
        self.samples, self.size, self.tries, self.seed = samples, image_size, tries, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        failed = []
        for j in range(i, i + self.tries):
            path, label = self.samples[j % len(self.samples)]
            try:  # read first, then decode: PIL raises OSError for a cut-short image too
                with open(path, 'rb') as f:
                    raw = f.read()
            except OSError as e:  # gone, or an I/O error: a fault of the disk, not of the image; no stand-in
                if torch.utils.data.get_worker_info() is None:
                    fail(f"{path} cannot be read ({e})", kind='data')
                raise UnreadableFile(f"{path} cannot be read ({e})") from None
            try:
                image = Image.open(io.BytesIO(raw)).convert('RGB')  # what default_loader does, from the bytes read
            except Exception:  # not an image, cut short, corrupt
                failed.append(path)
                continue
            with torch.random.fork_rng(devices=[]):  # the process's own stream (dropout's, without workers) untouched
                torch.default_generator.manual_seed(hash((self.seed, epoch, i)))
                return self.transform(image), label, '\n'.join(failed)
        return torch.zeros(3, self.size, self.size, dtype=torch.uint8), 0, '\n'.join(failed)

def end_with_parent(parent, worker_id):
    """A DataLoader worker's start: it ends when its parent does, however (Linux: prctl PR_SET_PDEATHSIG, SIGKILL), ends
    on SIGTERM (quietly: the parent's exit sends it to a worker slow to leave) and SIGINT, not by the training's stop
    handler, and leaves the parent's process group: what a terminal or torchrun sends that group reaches the parent
    alone, which stops saved, rather than a worker dying under it."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setpgid(0, 0)
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(0)

def image_files(dataset, data_dir, train):
    """-> ([(path, label)], class names): a split of a file dataset, as torchvision finds it."""
    if dataset == 'imagenet':
        folder = os.path.join(data_dir, 'train' if train else 'val')
        try:
            ds = torchvision.datasets.ImageFolder(folder)
        except FileNotFoundError as e:  # no such folder, or a class folder without an image
            fail(f"ImageNet at {folder}: {e}. Expected {IMAGENET_LAYOUT.replace('data_dir', data_dir)}; "
                 "see README.md, 'Getting the data'.", kind='data')
        return ds.samples, ds.classes
    if dataset == 'inat2021':
        version = '2021_train' if train else '2021_valid'
        ds = downloaded(lambda: torchvision.datasets.INaturalist(data_dir, version, target_type='full', download=True),
                        'iNaturalist 2021', data_dir, f"data_dir/{version}/<category folders>/*.jpg")
        return [(os.path.join(ds.root, ds.all_categories[c], f), c) for c, f in ds.index], ds.all_categories
    ds = downloaded(lambda: torchvision.datasets.Places365(data_dir, 'train-standard' if train else 'val', small=True, download=True),
                    'Places365', data_dir, "data_dir/data_256_standard, data_dir/val_256 and the places365 file lists")
    return ds.imgs, ds.classes

def only_in(a, b):
    """The names in a that are not in b: their count and the first three, or 'none'."""
    names = sorted(set(a) - set(b))
    return f"{len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else 'none'

@contextmanager
def rank_zero_first(rank, world):
    """Rank 0 runs the block first (and downloads what is missing), the others after it: no two write one folder."""
    if world > 1 and rank > 0:
        dist.barrier()
    yield
    if world > 1 and rank == 0:
        dist.barrier()

def downloaded(make, name, data_dir, layout, md5s={}):
    """make() (a torchvision dataset that downloads itself), or one line that names the first file of md5s {path: md5}
    that is there but damaged, or says where it looked and what it expects; a failed download leaves no folder behind."""
    new = set()  # the folders a download would make that are not there yet: data_dir, those of the files of md5s
    for folder in {data_dir, *map(os.path.dirname, md5s)}:
        while folder and not os.path.isdir(folder):
            new.add(folder)
            folder = os.path.dirname(folder)
    try:
        return make()
    except Exception as e:
        damaged = [f for f, md5 in md5s.items() if os.path.exists(f) and not check_integrity(f, md5)]
        if damaged:
            fail(f"{damaged[0]} is damaged ({type(e).__name__}); delete it, and it is downloaded again", kind='data')
        if not isinstance(e, (RuntimeError, OSError)):  # torchvision's 'Dataset not found', or a failed download (URLError)
            raise
        for folder in sorted(new, key=len, reverse=True):  # the deepest first; a folder that is not empty stays
            with suppress(OSError):
                os.rmdir(folder)
        reason = ' '.join(str(e).split())  # torchvision's message, one line for each mirror tried
        fail(f"{name} is not in {data_dir} and could not be downloaded ({type(e).__name__}: {reason}). "
             f"Expected {layout.replace('data_dir', data_dir)}; point --data_dir at a folder that holds it.", kind='data')

def splits(dataset, data_dir, image_size, shard, rank=0, world=1, device='cpu', num_workers=0, seed=0):
    """-> (train, val: DataLoaders of (uint8 images, labels, the paths replaced) batched by shard(n, train), the number
    of classes, and how many images of each split may fail to decode on this rank). Their own generator draws the
    workers' base seed, not the process's stream (which dropout draws from, and a resumed run restores)."""
    found = []
    for is_train in (True, False):
        with rank_zero_first(rank, world):
            found.append(image_files(dataset, data_dir, is_train))
    (train, classes), (val, val_classes) = found
    if classes != val_classes:  # one extra folder shifts the labels of all that follow
        fail(f"{dataset}: train and val must hold the same classes; only in train: "
             f"{only_in(classes, val_classes)}, only in val: {only_in(val_classes, classes)}", kind='data')
    limits = [max(1, int(UNDECODABLE_MAX * len(samples) / world)) for samples in (train, val)]
    train, val = (torch.utils.data.DataLoader(ImageFiles(samples, image_size, is_train, limit + 1, seed),
                                              batch_sampler=shard(len(samples), is_train), num_workers=num_workers,
                                              pin_memory=str(device).startswith('cuda'), persistent_workers=num_workers > 0,
                                              worker_init_fn=partial(end_with_parent, os.getpid()), generator=torch.Generator())
                  for samples, limit, is_train in zip((train, val), limits, (True, False)))
    return train, val, len(classes), limits
