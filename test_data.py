"""data.py: the batch sampler's sharding, the tensor datasets, and the file datasets' errors."""
import os

import pytest
import torch

import data
import imagefiles

DATA_DIR = os.environ.get('DATA_DIR', os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'data'))

def need(*parts):
    """The path of real data under DATA_DIR; skips the test if it is absent, fails it if REQUIRE_DATA=1."""
    path = os.path.join(DATA_DIR, *parts)
    if not os.path.exists(path):
        if os.environ.get('REQUIRE_DATA') == '1':
            pytest.fail(f"REQUIRE_DATA=1 but {path} is missing")
        pytest.skip(f"no {path}")
    return path

def test_ddp_shards_of_a_global_batch_are_the_single_process_batch():
    """2 ranks x 2 micro-steps of 3 see exactly the samples that 1 rank sees in one batch of 12."""
    single = list(data.ShardedBatches(50, 12, seed=5))
    shards = [list(data.ShardedBatches(50, 3, rank=r, world=2, accum=2, seed=5)) for r in range(2)]
    assert len(single) == 50 // 12 and all(len(s) == 2 * len(single) for s in shards)
    for step, batch in enumerate(single):
        parts = [i for r in range(2) for i in sum(shards[r][2 * step:2 * step + 2], [])]
        assert sorted(parts) == sorted(batch) and len(set(parts)) == 12

def test_each_epoch_is_a_new_permutation_and_resumes_mid_epoch():
    s = data.ShardedBatches(40, 8, seed=1)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(40)) and e0 != e1
    s.set_epoch(1, start_step=3)
    assert list(s) == e1[3:]

def test_evaluation_shards_count_every_sample_once():
    seen = [i for r in range(3) for b in data.ShardedBatches(10_001, 64, rank=r, world=3, train=False) for i in b]
    assert sorted(seen) == list(range(10_001))

def test_synthetic_task_batches():
    d = data.load('synthetic', '', image_size=16, micro_batch=32)
    x, y = next(iter(d.train))
    assert x.shape == (32, 1, 16, 16) and x.dtype == torch.float32 and y.shape == (32,)
    assert (d.num_classes, d.channels, d.num_val, d.steps_per_epoch) == (10, 1, 2048, 8192 // 32)
    assert abs(x.mean().item()) < 0.2 and 0.1 < x.std().item() < 2 and len(y.unique()) > 5
    assert data.load('synthetic', '', 16, 32, num_classes=4).num_classes == 4

def test_fmnist_is_resized_once_and_normalised():
    need('FashionMNIST', 'raw')
    d = data.load('fmnist', DATA_DIR, image_size=32, micro_batch=1000)
    assert d.train.batches.x.shape == (60_000, 1, 32, 32) and d.train.batches.x.dtype == torch.uint8 and d.num_val == 10_000
    x = torch.cat([x for x, _ in d.val])
    assert x.shape == (10_000, 1, 32, 32)
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05  # test set, with the train set's stats
    assert torch.bincount(d.val.batches.y).tolist() == [1000] * 10

def test_imagenet_folder_batches_real_jpegs():
    root = need('imagenette-mini')
    d = data.load('imagenet', root, image_size=64, micro_batch=16, num_workers=0)
    x, y = next(iter(d.train))
    assert x.shape == (16, 3, 64, 64) and (d.num_classes, d.num_val, d.steps_per_epoch) == (10, 200, 500 // 16)
    raw, _, _ = next(iter(d.val.batches))  # the workers hand uint8; the normalising happens on the device
    x, _ = next(iter(d.val))
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) * 255 for s in data.IMAGENET_STATS)
    assert raw.dtype == torch.uint8 and torch.allclose(x, (raw.float() - mean) / std)

def test_missing_imagenet_names_the_expected_layout(tmp_path):
    with pytest.raises(SystemExit) as e:
        data.load('imagenet', str(tmp_path / 'imagenet'), 224, 8)
    msg = str(e.value)
    assert str(tmp_path / 'imagenet' / 'train') in msg and '/train/<wnid>/*.JPEG' in msg and '/val/<wnid>/*.JPEG' in msg

def test_inat2021_reads_torchvision_layout(tmp_path):
    """A two-species stand-in in torchvision's INaturalist layout: data_dir/2021_train/<id>_<7 taxa>/*.jpg."""
    from PIL import Image
    for version in ('2021_train', '2021_valid'):
        for c in range(2):
            folder = tmp_path / version / f"{c:05d}_Animalia_Chordata_Aves_Order_Family_Genus_species{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new('L' if i % 2 else 'RGB', (40, 30), color=60 * c + i).save(folder / f"{i}.jpg")
    d = data.load('inat2021', str(tmp_path), image_size=32, micro_batch=4, num_workers=0)
    x, y = next(iter(d.train))
    assert x.shape == (4, 3, 32, 32) and (d.num_classes, d.num_val, d.steps_per_epoch) == (2, 8, 2)
    assert sorted(torch.cat([y for _, y in d.val]).tolist()) == [0] * 4 + [1] * 4

def test_a_failed_download_is_one_line_naming_the_folder_the_layout_and_data_dir(tmp_path, monkeypatch):
    import urllib.error
    import torchvision
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, 'download', offline)
    with pytest.raises(SystemExit) as e:
        data.load('fmnist', str(tmp_path), 32, 8)
    msg = str(e.value)
    assert '\n' not in msg and str(tmp_path) in msg and 'FashionMNIST/raw' in msg and '--data_dir' in msg and 'no network' in msg

def test_a_missing_fashion_mnist_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """Offline, torchvision makes data_dir/FashionMNIST/raw and fails with a message of a line per mirror tried."""
    import urllib.error
    import torchvision
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torchvision.datasets.mnist, 'download_and_extract_archive', offline)
    with pytest.raises(SystemExit) as e:
        data.load('fmnist', str(tmp_path / 'nowhere'), 32, 8)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and err.startswith('data error: FashionMNIST is not in ')
    assert 'no network' in err and 'FashionMNIST/raw' in err and not (tmp_path / 'nowhere').exists()

@pytest.mark.parametrize('dataset', ['imagenet', 'fmnist'])
def test_a_run_that_finds_no_data_leaves_no_folder_behind(dataset, tmp_path):
    """train.py locks out_dir before it reads the data; on failing there it removes the folders it made (out_dir and
    its new parents), and keeps one that was there. fmnist: offline through a proxy that refuses at once."""
    import subprocess, sys
    train = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')
    env = {**os.environ, 'https_proxy': 'http://127.0.0.1:9', 'http_proxy': 'http://127.0.0.1:9'}
    (tmp_path / 'kept').mkdir()
    for out in ('new/parents/run', 'kept/run'):
        p = subprocess.run([sys.executable, train, f'--dataset={dataset}', f'--data_dir={tmp_path}/none', f'--out_dir={out}'],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and p.stderr.startswith('data error: ') and p.stderr.count('\n') == 1
    assert os.listdir(tmp_path) == ['kept']  # nor data_dir (data.py's own cleanup, for fmnist)
    assert os.listdir(tmp_path / 'kept') == []

def test_imports_run_one_way():
    """The scripts -> model.py (with timm_vit.py), data.py (with imagefiles.py, outdir.py) -> masks.py, configurator.py:
    no module imports one of a level above its own, and none comes back to itself through the modules it imports."""
    import ast
    root = os.path.dirname(os.path.abspath(__file__))
    modules = {f[:-3] for f in os.listdir(root) if f.endswith('.py') and not f.startswith('test_')}
    imports = {}
    for m in modules:
        tree = ast.parse(open(os.path.join(root, m + '.py')).read())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imports[m] = {name.split('.')[0] for name in names} & modules
    level = {'masks': 0, 'configurator': 0, 'model': 1, 'timm_vit': 1, 'data': 1, 'imagefiles': 1, 'outdir': 1}  # the rest: 2
    for m, names in imports.items():
        assert all(level.get(n, 2) <= level.get(m, 2) for n in names), (m, names)
        reached, todo = set(), set(names)
        while todo:
            n = todo.pop()
            reached.add(n)
            todo |= imports[n] - reached
        assert m not in reached, f"{m} imports itself through {names}"

@pytest.mark.parametrize('rank', [0, 1])
def test_rank_zero_builds_and_downloads_before_the_other_ranks(rank, monkeypatch):
    """Rank 0 builds the dataset, then meets the others at a barrier; they wait there before building theirs."""
    events = []
    monkeypatch.setattr(imagefiles.dist, 'barrier', lambda: events.append('barrier'))
    def make(data_dir, train, num_classes):
        events.append('build')
        return data.synthetic(data_dir, train, num_classes)
    monkeypatch.setitem(data.TENSOR_SETS, 'synthetic', make)
    data.load('synthetic', 'unused', 32, 8, rank=rank, world=2)
    assert events == (['build', 'barrier'] * 2 if rank == 0 else ['barrier', 'build'] * 2)

def test_crops_and_flips_are_shifted_windows_of_the_zero_padded_image_drawn_uniformly():
    """Every augmented image must equal one of the (2 pad + 1)^2 x 2 windows of its zero-padded (and mirrored)
    original, found by brute force; over many draws every offset and both orientations occur."""
    torch.manual_seed(0)
    pad, B = 2, 400
    x = torch.randint(1, 256, (B, 2, 5, 6), dtype=torch.uint8)  # no zeros: a window is recognisable by its border
    out = data.crops_and_flips(x, pad, flip=True)
    seen = set()
    for img, orig in zip(out, x):
        padded = torch.nn.functional.pad(orig, (pad, pad, pad, pad))
        windows = {(dr, dc): padded[:, dr:dr + 5, dc:dc + 6] for dr in range(2 * pad + 1) for dc in range(2 * pad + 1)}
        matches = [(dr, dc, mirrored) for (dr, dc), window in windows.items() for mirrored in (False, True)
                   if torch.equal(img, window.flip(-1) if mirrored else window)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == (2 * pad + 1) ** 2 * 2  # 50 outcomes, 400 draws: each missed with probability < 1e-3
    assert torch.equal(data.crops_and_flips(x, 0, flip=False), x)

def test_augmentation_touches_training_batches_only_and_only_when_asked():
    args = dict(dataset='synthetic', data_dir='unused', image_size=16, micro_batch=64)
    plain, augmented = data.load(**args), data.load(**args, crop_pad=2, flip=True)
    torch.manual_seed(0)
    (xp, yp), (xa, ya) = next(iter(plain.train)), next(iter(augmented.train))
    assert torch.equal(yp, ya) and not torch.equal(xp, xa)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain.val, augmented.val))
    with pytest.raises(SystemExit, match=r"crop_pad=2.*imagenet"):
        data.load('imagenet', 'unused', 32, 8, crop_pad=2)
