"""
sweep.py and report.py: the table's arithmetic, grouping and published column, a variant registered in
model.VARIANTS that report.py knows nothing of, and a sweep that skips finished runs and busy ones, resumes an
interrupted one and runs the rest (tiny trainings on the generated task).
"""
import ast
import dataclasses
import fcntl
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import model
import report
import trained_masks

ROOT = os.path.dirname(os.path.abspath(__file__))
SYNTHETIC = ('--dataset=synthetic --image_size=16 --patch_size=4 --dim=32 --depth=1 --heads=2 --mlp_dim=64 '
             '--batch_size=256 --warmup_steps=5 --log_interval=8 --device=cpu')
STEPS_PER_EPOCH = 8192 // 256

def fake_run(root, name, attn, top1, epochs=10, **knobs):
    config = {'attn': attn, 'epochs': epochs, 'mask_lr_mult': 10.0, 'mask_init_decay': 0.5, 'grf_walks': 20,
              'grf_p_halt': 0.1, **knobs}
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, 'result.json'), 'w') as f:
        json.dump({'config': config, 'final': {'top1': top1}, 'best': {'top1': top1 + 0.5}, 'images_per_s': 100.0}, f)
    return config

def rows(text):
    return [[c.strip() for c in line.strip('|').split('|')] for line in text.splitlines()[2:] if line.startswith('|')]

def test_table_has_a_row_per_variant_and_mask_setting_with_mean_and_sample_std(tmp_path):
    root = str(tmp_path)
    paper = 'linear:86.36,grf:86.99'
    for i, top1 in enumerate([80.0, 82.0]):
        fake_run(root, f'linear-s{i}', 'linear', top1, published=paper)
    for i, top1 in enumerate([85.0, 86.0, 87.5]):
        fake_run(root, f'grf-m10-s{i}', 'grf', top1, published=paper)
    fake_run(root, 'grf-m30-s0', 'grf', 88.0, mask_lr_mult=30.0, published=paper)
    text = report.table(report.load_runs(root))
    assert text.splitlines()[0].startswith('| attention | mask_lr_mult | top-1')  # the only knob that varies
    assert text.splitlines()[0].endswith('| published top-1 |')
    # mean and sample standard deviation by hand: linear (81, sqrt(2)), grf x10 (86.1667, 1.2583)
    assert rows(text) == [['linear', '–', '81.00 ± 1.41', '2', '10', '100', '86.36'],  # the knob does not act on it
                          ['grf', '10', '86.17 ± 1.26', '3', '10', '100', '86.99'],
                          ['grf', '30', '88.00', '1', '10', '100', '86.99']]
    same = report.table(report.load_runs(os.path.join(root, 'linear-s0')))
    assert rows(same) == [['linear', '80.00', '1', '10', '100', '86.36']]  # no knob column when none varies

def test_run_table_gives_each_runs_figures_by_variant_then_seed(tmp_path):
    root = str(tmp_path)
    for attn, seed, top1 in [('grf', 1, 60.0), ('linear', 1, 57.5), ('grf', 0, 58.0), ('linear', 0, 56.25)]:
        fake_run(root, f'{attn}-s{seed}', attn, top1, seed=seed)
    assert rows(report.run_table(report.load_runs(root))) == [['linear-s0', 'linear', '0', '56.25', '56.75', '100'],
                                                               ['linear-s1', 'linear', '1', '57.50', '58.00', '100'],
                                                               ['grf-s0', 'grf', '0', '58.00', '58.50', '100'],
                                                               ['grf-s1', 'grf', '1', '60.00', '60.50', '100']]

def test_runs_of_different_recipes_or_lengths_get_their_own_rows_and_runs_of_other_seeds_share_one(tmp_path):
    root = str(tmp_path)
    fake_run(root, 'plain-s0', 'linear', 80.0, seed=0, out_dir='a', data_dir='x')  # predates crop_pad and flip: off
    fake_run(root, 'plain-s1', 'linear', 82.0, seed=1, mask_seed=1, out_dir='b', data_dir='y', crop_pad=0, flip=False)
    fake_run(root, 'deep-s0', 'linear', 84.0, depth=6, crop_pad=2, flip=True, label_smoothing=0.1)
    fake_run(root, 'long-s0', 'linear', 86.0, epochs=30)
    text = report.table(report.load_runs(root))
    assert text.splitlines()[0].startswith('| attention | depth | crop_pad | flip | label_smoothing | top-1')
    assert rows(text) == [['linear', '2', '0', 'False', '0', '81.00 ± 1.41', '2', '10', '100', ''],
                          ['linear', '2', '0', 'False', '0', '86.00', '1', '30', '100', ''],
                          ['linear', '6', '2', 'True', '0.1', '84.00', '1', '10', '100', '']]

def test_published_column_comes_from_the_runs_config(tmp_path):
    root = str(tmp_path)
    fake_run(root, 'softmax-s0', 'softmax', 70.0, published='softmax:12.5')
    fake_run(root, 'linear-s0', 'linear', 60.0)  # a run from before the setting
    fake_run(root, 'toeplitz-s0', 'toeplitz', 65.0, published='')
    assert rows(report.table(report.load_runs(root))) == [['softmax', '70.00', '1', '10', '100', '12.5'],
                                                          ['linear', '60.00', '1', '10', '100', ''],
                                                          ['toeplitz', '65.00', '1', '10', '100', '']]
    for bad in ('softmax=12.5', 'softmax:12.5,linear', 'softmax:high', ':12.5'):
        fake_run(root, 'bad', 'softmax', 70.0, published=bad)
        with pytest.raises(ValueError, match=re.escape(f"published={bad!r} is malformed")) as e:
            report.table(report.load_runs(root))
        assert '\n' not in str(e.value)
        os.remove(os.path.join(root, 'bad', 'result.json'))
        os.rmdir(os.path.join(root, 'bad'))

def test_knobs_come_from_the_variant_classes():
    """Softmax has no mask; a masked variant has its mask's learning rate; walks that are sampled can be redrawn."""
    assert report.knobs(model.SoftmaxAttention) == report.knobs(model.LinearAttention) == ()
    assert report.knobs(model.ToeplitzAttention) == ('mask_lr_mult', 'table_init_decay')
    assert report.knobs(model.GRFAttention)[0] == 'mask_lr_mult' and report.knobs(model.GRFAttention)[-1] == 'grf_resample_every'
    assert {'grf_walks', 'grf_coupling'} <= set(report.knobs(model.GRFAttention))
    assert 'grf_resample_every' not in report.knobs(model.TopoAttention)

class WindowAttention(model.Attention):
    """A toy variant: M_ij = decay^(|dr| + |dc|), a learnable decay per head."""
    mask_settings = ('mask_init_decay',)

    def __init__(self, c, layer):
        super().__init__(c, layer)
        self.decay_logits = nn.Parameter(torch.full((c.heads,), math.log(c.mask_init_decay)))

    def dense_mask(self):
        node = torch.arange(self.h * self.w)
        row, col = node // self.w, node % self.w
        hops = (row[:, None] - row[None, :]).abs() + (col[:, None] - col[None, :]).abs()
        return self.decay_logits.exp()[:, None, None] ** hops

SMALL = dict(image_size=12, patch_size=4, dim=16, depth=2, heads=2, mlp_dim=32)

def fake_model_run(root, name, top1, decays, **settings):
    """A run of a SMALL model with its checkpoint, trained to nothing but per-head mask decays."""
    cfg = model.ViTConfig(**SMALL, **settings)
    vit = model.ViT(cfg)
    for block in vit.blocks:
        if hasattr(block.attn, 'decay_logits'):
            block.attn.decay_logits.data = torch.tensor(decays).log()
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != 'attn'}
    config = fake_run(root, name, cfg.attn, top1, **config)
    torch.save({'model': vit.state_dict(), 'config': config}, os.path.join(root, name, 'ckpt.pt'))

def test_a_variant_registered_in_variants_gets_its_row_its_knob_and_its_mask_pictures(tmp_path, monkeypatch):
    monkeypatch.setitem(model.VARIANTS, 'window', WindowAttention)
    root = str(tmp_path)
    fake_run(root, 'softmax-s0', 'softmax', 70.0, **SMALL)  # no checkpoint: softmax has no mask to draw
    fake_model_run(root, 'window-a', 80.0, [0.3, 0.7], attn='window', mask_init_decay=0.5)
    fake_model_run(root, 'window-b', 81.0, [0.2, 0.9], attn='window', mask_init_decay=0.25)
    runs = report.load_runs(root)
    text = report.table(runs)
    assert text.splitlines()[0].startswith('| attention | mask_init_decay | top-1')
    assert rows(text) == [['softmax', '–', '70.00', '1', '10', '100', ''],
                          ['window', '0.25', '81.00', '1', '10', '100', ''],
                          ['window', '0.5', '80.00', '1', '10', '100', '']]
    pictures = trained_masks.mask_rows(runs)  # the first window run: window-a
    assert [title for title, _ in pictures] == ['window L0: M[centre, :]', 'window L1: M[centre, :]']
    r, c = torch.meshgrid(torch.arange(3), torch.arange(3), indexing='ij')
    hops = (r - 1).abs() + (c - 1).abs()  # from the centre of the 3 x 3 grid
    for _, images in pictures:
        assert len(images) == 2
        for image, decay in zip(images, [0.3, 0.7]):
            torch.testing.assert_close(image, (decay ** hops).float())

def test_mask_pictures_come_from_the_first_run_with_a_checkpoint_and_a_variant_without_one_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(model.VARIANTS, 'window', WindowAttention)
    root = str(tmp_path)
    fake_run(root, 'topo-s0', 'topo', 80.0, **SMALL)  # finished runs whose checkpoints are gone
    fake_run(root, 'grf-s0', 'grf', 80.0, **SMALL)
    fake_run(root, 'window-s0', 'window', 80.0, **SMALL)
    fake_model_run(root, 'window-s1', 81.0, [0.3, 0.7], attn='window')
    pictures = trained_masks.mask_rows(report.load_runs(root))
    assert [title for title, _ in pictures] == ['window L0: M[centre, :]', 'window L1: M[centre, :]']
    torch.testing.assert_close(pictures[0][1][1][1, 2], torch.tensor(0.7))  # window-s1's head 1, one hop from the centre
    assert f"topo: no ckpt.pt in {os.path.join(root, 'topo-s0')}: no mask picture" in capsys.readouterr().out
    assert rows(trained_masks.mask_swap(report.load_runs(root), data_dir='unused')) == []  # and the other tables go on
    assert [r[0] for r in rows(trained_masks.walk_errors(report.load_runs(root), walks=(2,), ensembles=1))] == ['0.5^k (14x14 grid)']
    out = capsys.readouterr().out
    assert f"topo: no ckpt.pt in {os.path.join(root, 'topo-s0')}: not in the mask swap" in out
    assert f"grf: no ckpt.pt in {os.path.join(root, 'grf-s0')}: no learned f in the walk errors" in out

def test_pictures_go_beside_the_runs_unless_out_is_given(tmp_path):
    a, b = str(tmp_path / 'study' / 'a'), str(tmp_path / 'study' / 'b')
    assert report.picture_paths([a]) == (os.path.join(a, 'curves.png'), os.path.join(a, 'masks.png'))
    assert report.picture_paths([a, b])[0] == str(tmp_path / 'study' / 'curves.png')
    assert report.picture_paths([a, b], out='assets/x') == ('assets/x/curves.png', 'assets/x/masks.png')

def test_epochs_column_gives_the_epochs_trained_when_max_steps_stopped_the_run(tmp_path):
    p = subprocess.run([sys.executable, 'train.py', 'configs/fmnist.py', '--attn=linear', '--epochs=3',
                        f'--max_steps={STEPS_PER_EPOCH // 2}', f'--out_dir={tmp_path}/linear-s0', *SYNTHETIC.split()],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    fake_run(str(tmp_path), 'linear-s1', 'linear', 80.0, epochs=3)  # a run from before result.json recorded it
    epochs = sorted(row[-3] for row in rows(report.table(report.load_runs(str(tmp_path)))))
    assert epochs == ['0.5', '3']  # the columns end: epochs, images/s, published

def sweep(*args):
    p = subprocess.run([sys.executable, 'sweep.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout

def test_sweep_skips_finished_runs_resumes_an_interrupted_one_and_runs_the_rest(tmp_path):
    root = str(tmp_path)
    synthetic = {k: ast.literal_eval(v) if v[0].isdigit() else v for k, v in
                 (a[2:].split('=') for a in SYNTHETIC.split())}
    fake_run(root, 'linear-s0', 'linear', 12.34, **{**synthetic, 'epochs': 2})  # finished: must be left alone
    # linear-s1 stopped after its first epoch: a checkpoint, no result.json
    p = subprocess.run([sys.executable, 'train.py', 'configs/fmnist.py', '--attn=linear', '--seed=1', '--epochs=2',
                        f'--max_steps={STEPS_PER_EPOCH}', f'--out_dir={root}/linear-s1', *SYNTHETIC.split()],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    os.remove(os.path.join(root, 'linear-s1', 'result.json'))
    os.makedirs(os.path.join(root, 'linear-s3'))  # linear-s3 is another process's (this one's) run: must be left alone
    held = open(os.path.join(root, 'linear-s3', 'lock'), 'w')  # held as a run holds it (outdir.take_lock: a POSIX lock)
    held.write(f"{socket.gethostname()} {os.getpid()}")
    held.flush()
    fcntl.lockf(held, fcntl.LOCK_EX)
    out = sweep('--attns=linear', '--seeds=4', '--epochs=2', '--jobs=2', '--threads=1', f'--out_root={root}',
                f'--args={SYNTHETIC} --mask_seed={{seed}} --init_from=scratch')  # as a fine-tuning sweep names its start
    assert f'{root}/linear-s0: done, skipped' in out
    assert f'{root}/linear-s3: in use by pid {os.getpid()} on ' in out and '--seed=3' not in out
    assert '--mask_seed=2' in next(l for l in out.splitlines() if 'start' in l and '--seed=2' in l)
    assert next(l for l in out.splitlines() if 'start' in l and '--seed=1' in l).endswith('--init_from=resume  (log: '
                                                                                   f'{root}/linear-s1/train.log)')
    assert '--init_from=resume' not in next(l for l in out.splitlines() if 'start' in l and '--seed=2' in l)
    runs = {os.path.basename(r['dir']): r for r in report.load_runs(root)}
    assert runs['linear-s0']['final']['top1'] == 12.34
    for name in ('linear-s1', 'linear-s2'):
        assert runs[name]['steps'] == 2 * STEPS_PER_EPOCH and runs[name]['config']['epochs'] == 2
        with open(os.path.join(root, name, 'metrics.jsonl')) as f:
            evals = [r['epoch'] for r in map(json.loads, f) if r['kind'] == 'eval']
        assert evals == [1, 2], f"{name}: evaluations after epochs {evals}"
    table = out[out.index('| attention'):]
    assert rows(table)[0][:3] == ['linear', f"{report.statistics.mean(r['final']['top1'] for r in runs.values()):.2f} ± "
                                  f"{report.statistics.stdev(r['final']['top1'] for r in runs.values()):.2f}", '3']

def test_mask_swap_gives_the_trained_accuracy_back_with_the_exact_mask(tmp_path):
    """A topo model evaluated with its own (exact) mask scores what training recorded, and with GRF masks of many
    walks nearly the same; the grf row starts from what the grf model recorded."""
    for attn in ('topo', 'grf'):
        p = subprocess.run([sys.executable, 'train.py', 'configs/fmnist.py', f'--attn={attn}', '--epochs=1',
                            '--mask_max_len=4', f'--out_dir={tmp_path}/{attn}-s0', '--topo_form=features', *SYNTHETIC.split()],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
    runs = report.load_runs(str(tmp_path))
    rows_ = rows(trained_masks.mask_swap(runs, data_dir='unused', walks=(4, 4000), walk_seeds=2))
    topo, grf = rows_
    assert topo[0] == 'topo (topo-s0)' and topo[1] == topo[2] == f"{runs[1]['final']['top1']:.2f}"
    assert abs(float(topo[4].split(' ± ')[0]) - float(topo[2])) < 1.5  # 4000 walks: close to the exact mask
    assert grf[0] == 'grf (grf-s0)' and grf[1] == f"{runs[0]['final']['top1']:.2f}"

def test_mask_swap_of_an_alpha_model_gives_its_exact_accuracy_and_says_whether_f_exists(tmp_path):
    p = subprocess.run([sys.executable, 'train.py', 'configs/fmnist.py', '--attn=topo', '--epochs=1', '--mask_max_len=4',
                        f'--out_dir={tmp_path}/topo-s0', *SYNTHETIC.split()], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = report.load_runs(str(tmp_path))
    text = trained_masks.mask_swap(runs, data_dir='unused', walks=(4,), walk_seeds=2)
    [row] = rows(text)
    assert row[1] == row[2] == f"{runs[0]['final']['top1']:.2f}"  # alpha form: its own mask is the exact one
    assert "alpha's deconvolution is non-negative in" in text and "of 2 heads" in text
    assert (row[3] == '–') == (' 2 of 2 ' not in text)

def test_walk_error_table_shows_repelling_walks_closer_to_the_exact_mask():
    """report.walk_errors against the exact M from matrix powers: a row per walk count, a column per coupling."""
    rows_ = rows(trained_masks.walk_errors([], walks=(20,), ensembles=3))
    assert len(rows_) == 1 and rows_[0][:2] == ['0.5^k (14x14 grid)', '20']
    err = dict(zip(trained_masks.masks.COUPLINGS, map(float, rows_[0][2:])))
    assert 0.1 < err['iid'] < 0.2 and err['repelling'] < 0.6 * err['iid']

def test_paired_differences_to_a_base_variant_by_hand(tmp_path):
    """linear seeds 0-3: 50, 52, 54, 56; grf seeds 0-4: 52, 56, 54, 58, 70 (seed 4 has no linear to pair with).
    Differences 2, 4, 0, 2: mean 2, sample std sqrt(8/3) = 1.63299, standard error 0.816497, t(0.975, 3 df) = 3.182446,
    half-width 2.598: [-0.60, +4.60]; won 3 of 4 (a tie is not won). Sign flips of (2, 4, 0, 2): |sum| >= 8 in 4 of
    the 16 patterns (+-0 times +2+4+2 and -2-4-2): p = 0.25. softmax, seed 0 alone: -1, no interval, p = 1 (both
    patterns). Holm over the two: 0.25 x 2 = 0.5, then max(0.5, 1 x 1) = 1. A grf run of another depth has no linear
    run of its depth to pair with."""
    root = str(tmp_path)
    for seed, top1 in enumerate([50.0, 52.0, 54.0, 56.0]):
        fake_run(root, f'linear-s{seed}', 'linear', top1, seed=seed)
    for seed, top1 in enumerate([52.0, 56.0, 54.0, 58.0, 70.0]):
        fake_run(root, f'grf-s{seed}', 'grf', top1, seed=seed)
    fake_run(root, 'softmax-s0', 'softmax', 49.0, seed=0)
    fake_run(root, 'grf-deep-s0', 'grf', 60.0, seed=0, depth=6)
    text = report.table(report.load_runs(root), vs='linear')
    assert text.splitlines()[0].endswith(
        '| published top-1 | Δ top-1 vs linear [95% CI] | pairs won | p (sign-flip) | p (Holm) |')
    assert rows(text) == [['softmax', '2', '49.00', '1', '10', '100', '', '-1.00', '0/1', '1', '1'],
                          ['linear', '2', '53.00 ± 2.58', '4', '10', '100', '', 'base', '–', '–', '–'],
                          ['grf', '2', '58.00 ± 7.07', '5', '10', '100', '', '+2.00 [-0.60, +4.60]', '3/4', '0.25', '0.5'],
                          ['grf', '6', '60.00', '1', '10', '100', '', '– (no base run of its settings)', '–', '–', '–']]
    assert 'Student t over those paired differences' in text and 'adjusted over the 2 rows compared' in text

def test_paired_differences_to_a_setting_of_a_variant_by_hand(tmp_path):
    """--vs=grf:graph=grid4, the base being grf's runs on grid4. grf on grid4, seeds 0-2: 52, 54, 56; on grid4_shuffled:
    51, 55, 53. Differences -1, +1, -3: mean -1, sample std 2, standard error 1.154701, t(0.975, 2 df) = 4.302653,
    half-width 4.968: [-5.97, +3.97], won 1 of 3; sign flips: the sums of +-1 +-1 +-3 are 5, -1, 3, -3, 3, -3, 1, -5,
    |sum| >= 3 in 6 of 8, p = 0.75.
    linear (no graph), seeds 0-2 at 50: differences -2, -4, -6, mean -4, std 2: [-8.97, +0.97], 0 of 3, p = 0.25 (only
    the all-same-sign patterns reach 12). Holm: 0.25 x 2 = 0.5, max(0.5, 0.75) = 0.75. A shuffled run of another
    depth has no base of its depth."""
    root = str(tmp_path)
    for seed, (grid, shuffled) in enumerate([(52.0, 51.0), (54.0, 55.0), (56.0, 53.0)]):
        fake_run(root, f'grf-s{seed}', 'grf', grid, seed=seed, graph='grid4')
        fake_run(root, f'shuffled-s{seed}', 'grf', shuffled, seed=seed, graph='grid4_shuffled')
        fake_run(root, f'linear-s{seed}', 'linear', 50.0, seed=seed)
    fake_run(root, 'shuffled-deep-s0', 'grf', 60.0, seed=0, graph='grid4_shuffled', depth=6)
    text = report.table(report.load_runs(root), vs='grf:graph=grid4')
    assert text.splitlines()[0].endswith('| Δ top-1 vs grf:graph=grid4 [95% CI] | pairs won | p (sign-flip) | p (Holm) |')
    assert [[r[0], r[1], r[2], *r[-4:]] for r in rows(text)] == [
        ['linear', '–', '2', '-4.00 [-8.97, +0.97]', '0/3', '0.25', '0.5'],
        ['grf', 'grid4', '2', 'base', '–', '–', '–'],
        ['grf', 'grid4_shuffled', '2', '-1.00 [-5.97, +3.97]', '1/3', '0.75', '0.75'],
        ['grf', 'grid4_shuffled', '6', '– (no base run of its settings)', '–', '–', '–']]

def test_runs_pair_one_to_one_by_seed_and_a_row_with_a_seed_twice_says_so(tmp_path):
    """grf seeds 0, 0 (another mask_seed), 1 against linear 0, 1: two runs of seed 0 would both pair with linear's one
    run of seed 0 and count three pairs from two seeds, so the row has no difference and says why; a base with a
    seed twice likewise."""
    root = str(tmp_path)
    for seed in (0, 1):
        fake_run(root, f'linear-s{seed}', 'linear', 50.0, seed=seed)
        fake_run(root, f'toeplitz-s{seed}', 'toeplitz', 53.0, seed=seed)
    for name, seed in (('grf-s0', 0), ('grf-s0-m7', 0), ('grf-s1', 1)):
        fake_run(root, name, 'grf', 52.0, seed=seed, mask_seed=7 if name.endswith('m7') else seed)
    got = {r[0]: r[-4:] for r in rows(report.table(report.load_runs(root), vs='linear'))}
    assert got['grf'] == ['– (seed 0: 2 runs in the row)', '–', '–', '–']
    assert got['toeplitz'][:2] == ['+3.00 [+3.00, +3.00]', '2/2']
    fake_run(root, 'linear-s1-again', 'linear', 51.0, seed=1)
    got = {r[0]: r[-4:] for r in rows(report.table(report.load_runs(root), vs='linear'))}
    assert got['toeplitz'] == ['– (seed 1: 2 base runs)', '–', '–', '–']

def test_vs_settings_compare_as_their_type(tmp_path):
    """mask_lr_mult is a float setting: '10', '10.0' and '1e1' all name the runs at 10.0; grf_walks=100 an int; a
    float as its cell prints it (0.99005) names the run's exp(-0.01)."""
    root = str(tmp_path)
    for seed, (ten, thirty) in enumerate([(52.0, 53.0), (54.0, 57.0)]):
        fake_run(root, f'm10-s{seed}', 'grf', ten, seed=seed, mask_lr_mult=10.0, grf_walks=100)
        fake_run(root, f'm30-s{seed}', 'grf', thirty, seed=seed, mask_lr_mult=30.0, grf_walks=100)
    for text in ('10', '10.0', '1e1'):
        got = rows(report.table(report.load_runs(root), vs=f'grf:mask_lr_mult={text},grf_walks=100'))
        assert [r[-4:-2] for r in got] == [['base', '–'], ['+2.00 [-10.71, +14.71]', '2/2']], text
    fake_run(root, 'decay-s0', 'topo', 50.0, seed=0, mask_init_decay=math.exp(-0.01))
    fake_run(root, 'half-s0', 'topo', 53.0, seed=0)
    got = rows(report.table(report.load_runs(root), vs='topo:mask_init_decay=0.99005'))
    assert [r[-4:-2] for r in got if r[0] == 'topo'] == [['+3.00', '1/1'], ['base', '–']]

def test_fine_tuned_runs_against_their_sources_and_against_scratch_with_their_top1_after_each_epoch_by_hand(tmp_path):
    """softmax sources seeds 0-2 (16 epochs, from scratch): 60, 62, 64; grf from scratch: 56, 57, 58; grf fine-tuned from
    each source, 4 epochs: final 59, 58, 63, after epoch 0 (converted): 10, 20, 30, after epoch 1: 40, 41, 42.
    Against its source: -1, -4, -1: mean -2, sd sqrt(3), t(0.975, 2) = 4.302653: half-width 4.3027 -> [-6.30, +2.30], 0/3,
    sign-flip p: |sum| >= 6 only with all three signs alike, 2 of the 8 patterns: 0.25. Against grf from scratch: +3, +1, +5: mean 3, sd 2,
    half-width 4.97 -> [-1.97, +7.97], 3/3, p 0.25. The sources' and scratch rows are the base; a fine-tuned linear
    run whose source is not among the folders says so."""
    root = str(tmp_path)
    for seed, top1 in enumerate([60.0, 62.0, 64.0]):
        fake_run(root, f'src/softmax-s{seed}', 'softmax', top1, epochs=16, seed=seed)
    for seed, top1 in enumerate([56.0, 57.0, 58.0]):  # seed 2 resumed before train.py kept a run's start in its record
        fake_run(root, f'scratch/grf-s{seed}', 'grf', top1, epochs=16, seed=seed, init_from='resume' if seed == 2 else 'scratch')
    for seed, (top1, e0, e1) in enumerate([(59.0, 10.0, 40.0), (58.0, 20.0, 41.0), (63.0, 30.0, 42.0)]):
        fake_run(root, f'ft/grf-s{seed}', 'grf', top1, epochs=4, seed=seed, lr=1e-4,
                 init_from=os.path.join(root, 'src', f'softmax-s{seed}', 'ckpt.pt'))
        with open(os.path.join(root, 'ft', f'grf-s{seed}', 'metrics.jsonl'), 'w') as f:
            for epoch, x in ((0, e0), (1, e1)):
                f.write(json.dumps({'kind': 'train', 'epoch': epoch + 1, 'top1': -1.0}) + '\n')
                f.write(json.dumps({'kind': 'eval', 'epoch': epoch, 'top1': x}) + '\n')
    fake_run(root, 'ft/linear-s0', 'linear', 50.0, epochs=4, seed=0, lr=1e-4, init_from='/elsewhere/ckpt.pt')
    runs = report.load_runs(root)
    text = report.table(runs, vs='source', at_epochs=(0, 1))
    assert text.splitlines()[0].startswith('| attention | lr | top-1 (%) mean ± std | top-1 after 0 | top-1 after 1 | seeds')
    assert rows(text) == [
        ['softmax', '0.001', '62.00 ± 2.00', '–', '–', '3', '16', '100', '', 'base', '–', '–', '–'],
        ['linear', '0.0001', '50.00', '–', '–', '1', '4', '100', '', '– (no source run among the folders)', '–', '–', '–'],
        ['grf', '0.0001', '60.00 ± 2.65', '20.00', '41.00', '3', '4', '100', '', '-2.00 [-6.30, +2.30]', '0/3', '0.25', '0.25'],
        ['grf', '0.001', '57.00 ± 1.00', '–', '–', '3', '16', '100', '', 'base', '–', '–', '–']]
    scratch = rows(report.table(runs, vs='scratch'))
    assert scratch[2][-4:] == ['+3.00 [-1.97, +7.97]', '3/3', '0.25', '0.25'] and scratch[3][-4] == 'base'

def test_sign_flip_p_values_and_holm_by_hand():
    """Every pattern counted: n positive differences give 2 / 2^n (only all + and all - reach the sum); (1, 2, 3):
    sums of +-1 +-2 +-3 are 6, 0, 2, -4, 4, -2, 0, -6, so |sum| >= 6 in 2 of 8 (0.25) and the observed 0 of (1, 2, -3)
    is reached by all 8 (1.0); (1, -1) gives 0, reached by all. Holm of (0.01, 0.04, 0.03, None): sorted 0.01 x 3,
    0.03 x 2, 0.04 x 1 = 0.03, 0.06, max(0.06, 0.04)."""
    assert report.sign_flip_p([1.5] * 6) == 2 / 64 and report.sign_flip_p([0.1] * 16) == 2 / 2 ** 16
    assert report.sign_flip_p([1, 2, 3]) == 0.25 and report.sign_flip_p([1, 2, -3]) == 1.0
    assert report.sign_flip_p([1, -1]) == 1.0 and report.sign_flip_p([0.3] * 17) is None
    assert report.sign_flip_p([0.1, 0.2, -0.3]) == 1.0  # a sum of 0 in floating point still ties its own pattern
    adjusted = report.holm([0.01, 0.04, 0.03, None])
    assert adjusted[3] is None and adjusted[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert report.holm([0.5, 0.6]) == [1.0, 1.0]

def test_group_contrast_by_hand(tmp_path):
    """linear seeds 0-3: 50 each; grf 51, 50, 53, 52; toeplitz seeds 0-2 only: 53, 52, 51. The seeds all three ran:
    0, 1, 2; group means 52, 51, 52, differences 2, 1, 2: mean 1.6667, std
    0.57735, se 0.333333, t(0.975, 2) = 4.302653, half-width 1.4342: [+0.23, +3.10]; 3/3; sign flips: |sum| >= 5 in
    2 of 8 (the sums of +-2 +-1 +-2 are 5, 1, 3, -1, 1, -3, -1, -5), p = 0.25. A second grf row makes the group
    ambiguous: refused in one line."""
    root = str(tmp_path)
    for seed in range(4):
        fake_run(root, f'linear-s{seed}', 'linear', 50.0, seed=seed)
        fake_run(root, f'grf-s{seed}', 'grf', [51.0, 50.0, 53.0, 52.0][seed], seed=seed)
    for seed in range(3):
        fake_run(root, f'toeplitz-s{seed}', 'toeplitz', [53.0, 52.0, 51.0][seed], seed=seed)
    text = report.table(report.load_runs(root), vs='linear', group='toeplitz,grf')
    block = text[text.index('| group'):]
    assert rows(block) == [['mean of toeplitz, grf', '+1.67 [+0.23, +3.10]', '3/3', '0.25']]
    assert 'outside the Holm family' in block
    fake_run(root, 'grf-deep-s0', 'grf', 60.0, seed=0, depth=6)  # grf now has two rows: which one is ambiguous
    with pytest.raises(SystemExit, match="group='toeplitz,grf': grf has 2 rows in this table"):
        report.table(report.load_runs(root), vs='linear', group='toeplitz,grf')

def test_t_quantiles_are_the_tables():
    """The 97.5% quantiles of Student's t as printed in any statistics table."""
    for df, t in [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (30, 2.042)]:
        assert round(report.t_quantile(0.975, df), 3) == t

def report_py(*args, env=None):
    return subprocess.run([sys.executable, 'report.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)

def test_report_command_line_takes_walk_counts_and_ensembles(tmp_path):
    fake_run(str(tmp_path), 'linear-s0', 'linear', 80.0)
    p = report_py(str(tmp_path), '--no_plots', '--walk_error=3,8', '--ensembles=2')
    assert p.returncode == 0, p.stderr[-3000:]
    walk_rows = rows(p.stdout[p.stdout.index('| f | walks'):])
    assert [r[1] for r in walk_rows] == ['3', '8'] and walk_rows[0][3] == '–' and walk_rows[1][3] != '–'

@pytest.mark.parametrize('bad, said', [
    ('--walk-error=5', "config error: unknown key 'walk-error'; closest valid keys: walk_error"),  # unknown option
    ('--ensembles=abc', "config error: ensembles='abc' has type str, expected int"),  # a value of the wrong type
    ('--no_plots=1', "config error: --no_plots is a flag, given bare: got '--no_plots=1'"),  # a value for a flag
    ('--mask_swap', "config error: expected --key=value, got '--mask_swap'"),  # no value for an option that takes one
    ('--walk_error=0', "config error: walk_error='0' is invalid; valid: walk counts >= 1"),
    ('--ensembles=0', "config error: ensembles=0 is invalid; valid: an integer >= 1"),
    ('--vs=linaer', "config error: vs='linaer' is not a variant; valid: softmax, linear,"),
    ('--vs=grf:graf=grid4', "config error: vs='grf:graf=grid4' is invalid; valid: a variant, or 'variant:key=value,...'"),
    ('--vs=grf:grf_walks=many', "config error: vs='grf:grf_walks=many' is invalid; valid: a variant, or 'variant:key="),
    ('--group=topo,grf', "config error: group='topo,grf' is invalid; valid: with --vs, variants other than vs's"),
    ('--vs=linear --group=topo,lnear', "config error: group='topo,lnear' is invalid; valid: with --vs, variants"),
    ('--vs=source --group=topo,grf', "config error: group='topo,grf' is invalid; valid: with --vs, variants"),
    ('--at_epochs=0,one', "config error: at_epochs='0,one' is invalid; valid: epochs >= 0, comma-separated")])
def test_a_bad_option_fails_in_one_line_before_anything_is_read(tmp_path, bad, said):
    os.makedirs(tmp_path / 'broken')
    (tmp_path / 'broken' / 'result.json').write_text('{')  # read, it would end in a traceback
    p = report_py(str(tmp_path), *bad.split())
    assert p.returncode == 2 and p.stderr.startswith(said) and p.stderr.count('\n') == 1 and '|' not in p.stdout, p.stderr

def test_a_repeated_option_takes_the_last_value_and_says_so(tmp_path):
    fake_run(str(tmp_path), 'linear-s0', 'linear', 80.0, seed=0)
    fake_run(str(tmp_path), 'softmax-s0', 'softmax', 81.0, seed=0)
    p = report_py(str(tmp_path), '--no_plots', '--vs=softmax', '--vs=linear')
    assert p.returncode == 0, p.stderr
    assert "override: vs = 'softmax'\noverride: vs = 'linear'\n" in p.stdout and 'Δ top-1 vs linear' in p.stdout
    assert rows(p.stdout[p.stdout.index('| attention'):])[0][-4:] == ['+1.00', '1/1', '1', '1']

def test_without_matplotlib_the_table_prints_and_the_pictures_are_skipped_in_one_line(tmp_path):
    (tmp_path / 'stub' / 'matplotlib').mkdir(parents=True)  # matplotlib as where it is not installed
    (tmp_path / 'stub' / 'matplotlib' / '__init__.py').write_text("raise ImportError('no matplotlib here')\n")
    fake_run(str(tmp_path / 'runs'), 'linear-s0', 'linear', 80.0)
    p = report_py(str(tmp_path / 'runs'), env={**os.environ, 'PYTHONPATH': str(tmp_path / 'stub')})
    assert p.returncode == 0 and not p.stderr, p.stderr
    assert rows(p.stdout)[0][:2] == ['linear', '80.00']
    assert p.stdout.endswith("no pictures: matplotlib is not installed (pip install matplotlib)\n")
    assert not (tmp_path / 'runs' / 'curves.png').exists()

def brute_force_features_mask(h, w, f):
    """M = Phi Phi^T, Phi = sum_k f_k W^k, W = D^-1/2 A D^-1/2 of the 4-neighbour h x w grid, built by loops, per head."""
    N = h * w
    A = torch.zeros(N, N, dtype=torch.float64)
    for r in range(h):
        for c in range(w):
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w:
                    A[r * w + c, rr * w + cc] = 1
    d = A.sum(1).rsqrt()
    W = d[:, None] * A * d[None, :]
    out = []
    for fh in f:
        Phi = sum(fk * torch.linalg.matrix_power(W, k) for k, fk in enumerate(fh.tolist()))
        out.append(Phi @ Phi.T)
    return torch.stack(out)

def test_hops_on_the_grid_are_manhattan_distances_and_follow_a_relabelling():
    h, w = 5, 7
    for node in (0, 17, 34):
        r0, c0 = divmod(node, w)
        want = [abs(r - r0) + abs(c - c0) for r in range(h) for c in range(w)]
        assert trained_masks.hops_from(model.GRAPHS['grid4'](h, w), node).tolist() == want
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(3))
    shuffled = trained_masks.masks.relabelled(model.GRAPHS['grid4'](h, w), perm)
    r0, c0 = divmod(int(perm[17]), w)  # node 17 of the relabelled graph is the grid's node perm[17]
    want = [abs(int(p) // w - r0) + abs(int(p) % w - c0) for p in perm]
    assert trained_masks.hops_from(shuffled, 17).tolist() == want

@pytest.mark.parametrize('attn', ['topo', 'grf'])
def test_reach_is_the_share_of_the_centre_row_within_r_hops_of_the_exact_mask_and_the_error_its_estimates(attn):
    """A 7 x 7 grid, K = 3, f per head 0.9^k and 0.4^k: the centre row of the loop-built Phi Phi^T summed over the
    patches within r Manhattan steps, over its sum, averaged over the heads; grf: its own walks' mask against it."""
    cfg = model.ViTConfig(image_size=28, patch_size=4, in_channels=1, num_classes=3, dim=16, depth=1, heads=2, mlp_dim=16,
                          attn=attn, topo_form='features', mask_max_len=3, grf_walks=7, grf_coupling='iid', mask_seed=5)
    vit = model.ViT(cfg)
    a = vit.blocks[0].attn
    f = torch.stack([0.9 ** torch.arange(4.0), 0.4 ** torch.arange(4.0)]).double()
    a.f_logits.data = f.log().float()
    M = brute_force_features_mask(7, 7, f.float().double())
    centre = 24
    dist = torch.tensor([abs(r - 3) + abs(c - 3) for r in range(7) for c in range(7)])
    want = [statistics.mean((M[j, centre][dist <= r].sum() / M[j, centre].sum()).item() for j in range(2)) for r in (1, 2, 4)]
    shares, err = trained_masks.layer_reach(a, cfg)
    assert shares == pytest.approx(want, rel=1e-5)
    assert want[0] < want[1] < want[2] < 1.0  # the radii tell apart: r = 4 leaves the 5 and 6 hops out
    if attn == 'grf':
        assert err == pytest.approx(((a.mask().double() - M).norm() / M.norm()).item(), rel=1e-4)
    else:  # a fresh estimate from the settings' walks, drawn from mask_seed, unbiased: its error is that of 7 walks
        assert 0.01 < err < 1.0
    table = trained_masks.reach_table([('tiny', vit)])
    assert rows(table) == [['tiny', '0', *(f'{x:.3f}' for x in want), f'{err:.3f}']]

def test_trained_masks_prints_reach_of_a_setting_at_initialisation_and_answers_help():
    p = subprocess.run([sys.executable, 'trained_masks.py', '--help'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and 'python trained_masks.py configs/imagenette.py --attn=grf' in p.stdout, p.stderr
    p = subprocess.run([sys.executable, 'trained_masks.py', 'configs/fmnist.py', '--attn=grf', '--mask_max_len=10',
                        '--mask_init_decay=0.5', '--image_size=56', '--patch_size=4', '--grf_walks=100',
                        '--depth=1'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (row,) = rows(p.stdout[p.stdout.index('| model'):])
    # the 14 x 14 grid at f = 0.5^k: two thirds of the centre row within one hop; 100 repelling walks, error ~0.02
    assert row[:2] == ['grf at initialisation', '0'] and 0.6 < float(row[2]) < 0.7 and float(row[5]) < 0.05
    p = subprocess.run([sys.executable, 'trained_masks.py', 'configs/fmnist.py', '--attn=linear'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr == "config error: attn='linear' has no graph mask; valid: topo, grf\n"

def test_report_reach_gives_each_folders_first_trained_grf_model_its_rows(tmp_path):
    fake_model_run(str(tmp_path / 'a'), 'grf-s0', 50.0, None, attn='grf', mask_seed=3)
    fake_model_run(str(tmp_path / 'a'), 'grf-s1', 51.0, None, attn='grf', mask_seed=4)
    p = report_py(str(tmp_path / 'a'), '--no_plots', '--reach')
    assert p.returncode == 0, p.stderr[-2000:]
    got = rows(p.stdout[p.stdout.index('| model'):])
    want = rows(trained_masks.reach_table([(f"{tmp_path}/a/grf-s0 (trained)", trained_masks.load_model(str(tmp_path / 'a' / 'grf-s0')))]))
    assert got == want and len(got) == 2  # SMALL: two layers, of the first run only

def test_the_curves_title_names_a_folder_datasets_folder_not_its_loader():
    runs = [{'config': {'dataset': 'imagenet', 'data_dir': '../shared/data/imagenette/'}},
            {'config': {'dataset': 'fmnist', 'data_dir': 'data'}}, {'config': {'dataset': 'imagenet', 'data_dir': 'x/imagenette'}}]
    assert report.datasets(runs) == ['imagenette', 'fmnist']

def test_a_damaged_checkpoint_is_named_in_one_line_by_the_trained_model_tools(tmp_path, capsys):
    run = tmp_path / 'grf-s0'
    run.mkdir()
    (run / 'ckpt.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit) as e:
        trained_masks.load_model(str(run))
    assert e.value.code == 2 and capsys.readouterr().err == f"checkpoint error: {run}/ckpt.pt is damaged: torch cannot read it (UnpicklingError)\n"
