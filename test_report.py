"""
sweep.py and report.py: the table's arithmetic and grouping, and a sweep that skips finished runs, resumes an
interrupted one and runs the rest (tiny trainings on the generated task).
"""
import json
import os
import subprocess
import sys

import report

ROOT = os.path.dirname(os.path.abspath(__file__))
SYNTHETIC = ('--dataset=synthetic --image_size=16 --patch_size=4 --dim=32 --depth=1 --heads=2 --mlp_dim=64 '
             '--batch_size=256 --warmup_steps=5 --log_interval=8 --device=cpu')
STEPS_PER_EPOCH = 8192 // 256

def fake_run(root, name, attn, top1, epochs=10, **knobs):
    config = {'attn': attn, 'epochs': epochs, 'mask_lr_mult': 10.0, 'mask_init_decay': 0.5, 'grf_walks': 20,
              'grf_p_halt': 0.1, **knobs}
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, 'result.json'), 'w') as f:
        json.dump({'config': config, 'final': {'top1': top1}, 'images_per_s': 100.0}, f)

def rows(text):
    return [[c.strip() for c in line.strip('|').split('|')] for line in text.splitlines()[2:] if line.startswith('|')]

def test_table_has_a_row_per_variant_and_mask_setting_with_mean_and_sample_std(tmp_path):
    root = str(tmp_path)
    for i, top1 in enumerate([80.0, 82.0]):
        fake_run(root, f'linear-s{i}', 'linear', top1)
    for i, top1 in enumerate([85.0, 86.0, 87.5]):
        fake_run(root, f'grf-m10-s{i}', 'grf', top1)
    fake_run(root, 'grf-m30-s0', 'grf', 88.0, mask_lr_mult=30.0)
    text = report.table(report.load_runs(root))
    assert text.splitlines()[0].startswith('| attention | mask_lr_mult | top-1')  # the only knob that varies
    # mean and sample standard deviation by hand: linear (81, sqrt(2)), grf x10 (86.1667, 1.2583)
    assert rows(text) == [['linear', '–', '81.00 ± 1.41', '2', '10', '100', '86.36'],  # the knob does not act on it
                          ['grf', '10', '86.17 ± 1.26', '3', '10', '100', '86.99'],
                          ['grf', '30', '88.00 ± nan', '1', '10', '100', '86.99']]
    same = report.table(report.load_runs(os.path.join(root, 'linear-s0')))
    assert rows(same) == [['linear', '80.00 ± nan', '1', '10', '100', '86.36']]  # no knob column when none varies

def sweep(*args):
    p = subprocess.run([sys.executable, 'sweep.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout

def test_sweep_skips_finished_runs_resumes_an_interrupted_one_and_runs_the_rest(tmp_path):
    root = str(tmp_path)
    fake_run(root, 'linear-s0', 'linear', 12.34, epochs=2)  # finished: must be left alone
    # linear-s1 stopped after its first epoch: a checkpoint, no result.json
    p = subprocess.run([sys.executable, 'train.py', 'configs/fmnist.py', '--attn=linear', '--seed=1', '--epochs=2',
                        f'--max_steps={STEPS_PER_EPOCH}', f'--out_dir={root}/linear-s1', *SYNTHETIC.split()],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    os.remove(os.path.join(root, 'linear-s1', 'result.json'))
    out = sweep('--attns=linear', '--seeds=3', '--epochs=2', '--jobs=2', '--threads=1', f'--out_root={root}',
                f'--args={SYNTHETIC} --mask_seed={{seed}}')
    assert f'{root}/linear-s0: done, skipped' in out
    assert '--mask_seed=2' in next(l for l in out.splitlines() if 'start' in l and '--seed=2' in l)
    assert '--init_from=resume' in next(l for l in out.splitlines() if 'start' in l and '--seed=1' in l)
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
    rows_ = rows(report.mask_swap(runs, data_dir='unused', walks=(4, 4000), walk_seeds=2))
    topo, grf = rows_
    assert topo[0] == 'topo (topo-s0)' and topo[1] == topo[2] == f"{runs[1]['final']['top1']:.2f}"
    assert abs(float(topo[4].split(' ± ')[0]) - float(topo[2])) < 1.5  # 4000 walks: close to the exact mask
    assert grf[0] == 'grf (grf-s0)' and grf[1] == f"{runs[0]['final']['top1']:.2f}"

def test_mask_swap_of_an_alpha_model_gives_its_exact_accuracy_and_says_whether_f_exists(tmp_path):
    p = subprocess.run([sys.executable, 'train.py', 'configs/fmnist.py', '--attn=topo', '--epochs=1', '--mask_max_len=4',
                        f'--out_dir={tmp_path}/topo-s0', *SYNTHETIC.split()], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = report.load_runs(str(tmp_path))
    text = report.mask_swap(runs, data_dir='unused', walks=(4,), walk_seeds=2)
    [row] = rows(text)
    assert row[1] == row[2] == f"{runs[0]['final']['top1']:.2f}"  # alpha form: its own mask is the exact one
    assert "alpha's deconvolution is non-negative in" in text and "of 2 heads" in text
    assert (row[3] == '–') == (' 2 of 2 ' not in text)

def test_walk_error_table_shows_repelling_walks_closer_to_the_exact_mask():
    """report.walk_errors against the exact M from matrix powers: a row per walk count, a column per coupling."""
    rows_ = rows(report.walk_errors([], walks=(20,), ensembles=3))
    assert len(rows_) == 1 and rows_[0][:2] == ['0.5^k (14x14 grid)', '20']
    err = dict(zip(report.masks.COUPLINGS, map(float, rows_[0][2:])))
    assert 0.1 < err['iid'] < 0.2 and err['repelling'] < 0.6 * err['iid']  # 0.15 and 0.07 over 40 ensembles
