"""
train.py end to end, run as a user runs it (a subprocess, on the CPU): real FashionMNIST, DDP under torchrun,
exact resume, atomic checkpoints, a non-finite loss, the ImageNet config on real JPEGs, fine-tuning and
eval_only. Real data comes from $DATA_DIR (default ../shared/data); see test_data.need.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from bench import PATHS
from model import VARIANTS, ViT, ViTConfig, saved_config
from test_data import DATA_DIR, need

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY = ['--dim=32', '--depth=1', '--heads=2', '--mlp_dim=64']
# a small GRF ViT on the generated task: 16 tokens, 32 steps per epoch, with dropout and mixup drawing randomness
SYNTHETIC = ['--dataset=synthetic', '--image_size=16', '--patch_size=4', *TINY, '--batch_size=256', '--epochs=2',
             '--attn=grf', '--grf_walks=4', '--mask_max_len=4', '--warmup_steps=5', '--lr=3e-3', '--log_interval=8',
             '--dropout=0.1', '--mixup=0.2', '--device=cpu']
STEPS_PER_EPOCH = 8192 // 256

def train(*args, out, launcher=(sys.executable,), ok=True):
    p = subprocess.run([*launcher, 'train.py', *args, f'--out_dir={out}'], cwd=ROOT, capture_output=True, text=True, timeout=900)
    if ok:
        assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p

def records(out, kind):
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['kind'] == kind]

def result(out):
    with open(os.path.join(out, 'result.json')) as f:
        return json.load(f)

def checkpoint(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu', weights_only=False)

def mask_and_walk_names(ckpt):
    """The names of a saved model's mask parameters and of its sampled walk buffers, as model.py declares them."""
    model = ViT(saved_config(ckpt['config']))
    return list(model.mask_parameters()), model.walk_buffers()

def report(capsys, line):
    with capsys.disabled():
        print(f"\n  {line}")

@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('uninterrupted'))
    train(*SYNTHETIC, out=out)
    return out

@pytest.fixture(scope='module')
def first_epoch(tmp_path_factory):
    """The same run stopped after its first epoch."""
    out = str(tmp_path_factory.mktemp('first_epoch'))
    train(*SYNTHETIC, f'--max_steps={STEPS_PER_EPOCH}', out=out)
    return out

def copy_of(run, tmp_path):
    return shutil.copytree(run, str(tmp_path / 'run'))

def assert_same_model(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        ok = torch.equal(a[k], b[k]) if exact else torch.allclose(a[k], b[k], rtol=0, atol=1e-5)
        assert ok, f"{k} differs by {(a[k].float() - b[k].float()).abs().max():.3g}"

def test_fmnist_short_run_reaches_80_percent(tmp_path, capsys):
    """One epoch of the fmnist config on 7x7 patches of the 28x28 images (16 tokens: 4x cheaper on a CPU)."""
    need('FashionMNIST', 'raw')
    t = time.time()
    train('configs/fmnist.py', f'--data_dir={DATA_DIR}', '--attn=softmax', '--epochs=1', '--image_size=28',
          '--patch_size=7', '--batch_size=64', '--lr=2e-3', '--warmup_steps=50', '--dropout=0.0', '--device=cpu', out=tmp_path)
    r = result(tmp_path)
    report(capsys, f"FashionMNIST softmax, 28px / 7px patches: top-1 {r['final']['top1']:.2f}% after {r['steps']} steps "
                   f"of 64 ({time.time() - t:.0f} s, {r['images_per_s']:.0f} img/s)")
    assert r['final']['count'] == 10_000 and r['final']['top1'] >= 80

@pytest.mark.parametrize('attn', VARIANTS)
def test_fmnist_config_runs_with_every_attention(attn, tmp_path):
    need('FashionMNIST', 'raw')
    p = train('configs/fmnist.py', f'--attn={attn}', '--epochs=1', f'--data_dir={DATA_DIR}', '--max_steps=3',
              '--log_interval=1', '--device=cpu', out=tmp_path)
    r = result(tmp_path)
    assert r['steps'] == 3 and r['final']['count'] == 10_000 and r['config']['attn'] == attn
    assert [t['step'] for t in records(tmp_path, 'train')] == [1, 2, 3] and 'img/s eta' in p.stdout

def test_ddp_on_two_cpu_ranks_equals_one_process_and_counts_each_test_image_once(tmp_path, capsys):
    """Same global batch of 64: one process, one process in 2 accumulation steps, 2 gloo ranks of 32."""
    need('FashionMNIST', 'raw')
    args = ['configs/fmnist.py', f'--data_dir={DATA_DIR}', '--attn=linear', *TINY, '--dropout=0.0',
            '--batch_size=64', '--max_steps=6', '--warmup_steps=2', '--log_interval=3', '--device=cpu']
    runs = {name: str(tmp_path / name) for name in ('single', 'accum', 'ddp')}
    train(*args, out=runs['single'])
    train(*args, '--grad_accum=2', out=runs['accum'])
    p = train(*args, out=runs['ddp'], launcher=(sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'))
    assert '2 ranks x 1 micro-steps x 32' in p.stdout and p.stdout.count('eval epoch 1 step 6') == 1  # rank 0 prints
    single, ddp = checkpoint(runs['single']), checkpoint(runs['ddp'])
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ddp['model']) and len(ddp['rng']) == 2
    assert_same_model(single['model'], ddp['model'], exact=False)
    assert_same_model(single['model'], checkpoint(runs['accum'])['model'], exact=False)
    evals = {name: result(out)['final'] for name, out in runs.items()}
    assert evals['ddp']['count'] == records(runs['ddp'], 'eval')[-1]['count'] == 10_000
    assert abs(evals['ddp']['top1'] - evals['single']['top1']) <= 0.02  # at most 2 images flip on fp32 noise
    report(capsys, f"DDP 2 ranks vs 1 process: max param diff "
                   f"{max((single['model'][k] - ddp['model'][k]).abs().max().item() for k in single['model']):.2g}, "
                   f"top-1 {evals['ddp']['top1']:.2f} vs {evals['single']['top1']:.2f} on {evals['ddp']['count']} images")

def test_resume_after_an_epoch_and_mid_epoch_is_exact(uninterrupted, first_epoch, tmp_path):
    out = copy_of(first_epoch, tmp_path)
    assert checkpoint(out)['step'] == STEPS_PER_EPOCH and checkpoint(out)['epoch'] == 1
    train(*SYNTHETIC, '--init_from=resume', '--max_steps=40', out=out)  # stops mid-epoch 2, at a log step
    train(*SYNTHETIC, '--init_from=resume', out=out)
    a, b = checkpoint(uninterrupted), checkpoint(out)
    assert_same_model(a['model'], b['model'])
    assert a['step'] == b['step'] == 2 * STEPS_PER_EPOCH and result(uninterrupted)['best'] == result(out)['best']
    assert_same_model(a['optimizer']['state'][0], b['optimizer']['state'][0])
    loss = lambda run: {r['step']: r['loss'] for r in records(run, 'train')}
    assert loss(uninterrupted) == {s: l for s, l in loss(out).items() if s in loss(uninterrupted)}
    evals = lambda run: [{k: r[k] for k in ('step', 'loss', 'top1', 'top5')} for r in records(run, 'eval') if r['step'] % STEPS_PER_EPOCH == 0]
    assert evals(uninterrupted) == evals(out) and result(uninterrupted)['final'] == result(out)['final']
    assert result(out)['final']['top1'] > 50  # and the generated task is being learned

def test_a_crash_mid_epoch_loses_only_the_steps_since_the_last_ckpt_interval_save(uninterrupted, tmp_path):
    out = str(tmp_path / 'run')
    os.makedirs(out)
    with open(os.path.join(out, 'metrics.jsonl'), 'w') as f:  # an old run's records, the last one cut short
        f.write('{"kind": "train", "step": 8, "loss": 9.0}\n{"kind": "eval", "st')
    args = [*SYNTHETIC, '--ckpt_interval=12']  # log steps 8, 16, 24: the first save is at step 16, none at 24
    crash = ("import runpy, sys, torch\n"
             "real_step, calls = torch.optim.AdamW.step, []\n"
             "def step_then_die(self, *args, **kwargs):\n"
             "    calls.append(1)\n"
             "    if len(calls) > 28: raise KeyboardInterrupt('simulated crash at step 28')\n"
             "    return real_step(self, *args, **kwargs)\n"
             "torch.optim.AdamW.step = step_then_die\n"
             f"sys.argv = ['train.py', *{args + [f'--out_dir={out}']!r}]\n"
             "runpy.run_path('train.py', run_name='__main__')\n")
    p = subprocess.run([sys.executable, '-c', crash], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and 'simulated crash' in p.stderr and 'at step 16' in p.stdout
    assert checkpoint(out)['step'] == 16 and checkpoint(out)['epoch'] == 0  # mid-epoch 1, nothing evaluated yet
    assert [r['step'] for r in records(out, 'train')] == [8, 16, 24]  # the old run's records went at the start
    train(*args, '--init_from=resume', out=out)
    assert_same_model(checkpoint(uninterrupted)['model'], checkpoint(out)['model'])
    logged = lambda run, kind, keys: [[r[k] for k in keys] for r in records(run, kind)]
    for kind, keys in ('train', ('step', 'loss')), ('eval', ('step', 'loss', 'top1')):  # step 24 logged once
        assert logged(out, kind, keys) == logged(uninterrupted, kind, keys)

def test_checkpoint_holds_everything_needed_to_resume(first_epoch):
    c = checkpoint(first_epoch)
    assert {'model', 'optimizer', 'scaler', 'step', 'epoch', 'rng', 'config', 'best'} <= c.keys()
    assert c['config']['attn'] == 'grf' and len(c['rng']) == 1 and 'grf_col' in ' '.join(c['model'])

def test_a_save_interrupted_mid_write_leaves_the_previous_checkpoint_intact(uninterrupted, first_epoch, tmp_path):
    out = copy_of(first_epoch, tmp_path)
    before = open(os.path.join(out, 'ckpt.pt'), 'rb').read()
    crash = ("import io, runpy, sys, torch\n"
             "real_save = torch.save\n"
             "def save_half_then_die(obj, f, *args, **kwargs):\n"
             "    buf = io.BytesIO(); real_save(obj, buf)\n"
             "    open(f, 'wb').write(buf.getvalue()[:len(buf.getvalue()) // 2])\n"
             "    raise KeyboardInterrupt('simulated crash while writing the checkpoint')\n"
             "torch.save = save_half_then_die\n"
             f"sys.argv = ['train.py', *{SYNTHETIC + ['--init_from=resume', f'--out_dir={out}']!r}]\n"
             "runpy.run_path('train.py', run_name='__main__')\n")
    p = subprocess.run([sys.executable, '-c', crash], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and 'simulated crash' in p.stderr
    assert open(os.path.join(out, 'ckpt.pt'), 'rb').read() == before and checkpoint(out)['step'] == STEPS_PER_EPOCH
    train(*SYNTHETIC, '--init_from=resume', out=out)  # and the run goes on from it as if nothing had happened
    assert_same_model(checkpoint(uninterrupted)['model'], checkpoint(out)['model'])

def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(first_epoch, tmp_path):
    out = copy_of(first_epoch, tmp_path)
    before = open(os.path.join(out, 'ckpt.pt'), 'rb').read()
    (tmp_path / 'diverge.py').write_text("lr = 1e30  # the weights overflow after a step or two\n")
    p = train(*SYNTHETIC, str(tmp_path / 'diverge.py'), '--init_from=resume', '--log_interval=1', out=out, ok=False)
    assert p.returncode == 1 and 'non-finite loss' in p.stderr and os.path.join(out, 'ckpt.pt') in p.stderr
    assert 'Traceback' not in p.stderr and open(os.path.join(out, 'ckpt.pt'), 'rb').read() == before
    assert len(records(out, 'eval')) == 1 and checkpoint(out)['step'] == STEPS_PER_EPOCH

@pytest.mark.parametrize('mask_max_len', [4, 2])
def test_fine_tuning_to_a_different_class_count(first_epoch, mask_max_len, tmp_path):
    """10 classes -> 4: a fresh head; the rest loaded; with another K, f's first K + 1 coefficients and fresh walks.
    The checkpoint is named through the {attn} placeholder. lr = 0 keeps the loaded weights as they are, to compare."""
    src = checkpoint(first_epoch)
    os.rename(first_epoch, os.path.join(os.path.dirname(first_epoch), 'run-grf'))
    try:
        p = train(*SYNTHETIC, '--num_classes=4', f'--mask_max_len={mask_max_len}',
                  f"--init_from={os.path.dirname(first_epoch)}/run-{{attn}}/ckpt.pt",
                  '--lr=0', '--min_lr=0', '--max_steps=2', out=tmp_path)
    finally:
        os.rename(os.path.join(os.path.dirname(first_epoch), 'run-grf'), first_epoch)
    assert 'fine-tuning from' in p.stdout and 'run-grf/ckpt.pt' in p.stdout and "'head.weight'" in p.stdout
    new, r = checkpoint(tmp_path)['model'], result(tmp_path)
    assert new['head.weight'].shape == (4, 32) and r['final']['count'] == 2048 and r['config']['num_classes'] == 4
    f, walks = mask_and_walk_names(checkpoint(tmp_path))
    shared = [k for k in new if not k.startswith('head.') and k not in f + walks]
    assert len(shared) > 10 and all(torch.equal(new[k], src['model'][k]) for k in shared)
    n = mask_max_len + 1
    assert f and all(torch.equal(new[k][:, :n], src['model'][k][:, :n]) for k in f)
    assert walks and all(torch.equal(new[k], src['model'][k]) == (mask_max_len == 4) for k in walks)
    assert ('walks drawn for this model from mask_seed=0: ' in p.stdout) == (mask_max_len != 4)  # not 'started afresh'
    first, last = records(tmp_path, 'eval')[0], records(tmp_path, 'eval')[-1]
    assert first['step'] == 0 and first['epoch'] == 0 and first['loss'] == last['loss']  # lr 0: converted = trained
    train(*SYNTHETIC, '--num_classes=4', f'--mask_max_len={mask_max_len}', '--init_from=resume', '--max_steps=3', out=tmp_path)
    assert result(tmp_path)['steps'] == 3 and result(tmp_path)['config']['init_from'].endswith('run-grf/ckpt.pt')

def test_fine_tuning_from_a_run_with_a_class_token_keeps_the_architecture_its_weights_fix(tmp_path):
    """A run with timm's features (a class token pooled by, LayerScale, eps 1e-6: as one from timm:NAME) fine-tuned into
    grf: the architecture comes from the checkpoint, not from this run's defaults, and every shared weight is loaded."""
    src = ViTConfig(image_size=16, patch_size=4, in_channels=1, num_classes=10, dim=32, depth=1, heads=2, mlp_dim=64,
                    class_token=True, pool='token', norm_eps=1e-6, layer_scale=0.1, qkv_bias=False)
    torch.manual_seed(0)
    os.makedirs(tmp_path / 'src')
    torch.save({'model': ViT(src).state_dict(), 'config': vars(src), 'step': 0}, tmp_path / 'src' / 'ckpt.pt')
    p = train(*SYNTHETIC, '--attn=grf', f"--init_from={tmp_path / 'src' / 'ckpt.pt'}", '--max_steps=1', out=tmp_path / 'run')
    config = result(tmp_path / 'run')['config']
    assert all(config[k] == getattr(src, k) for k in ('class_token', 'pool', 'norm_eps', 'layer_scale', 'qkv_bias'))
    assert 'started afresh: [' in p.stdout and "'cls_token'" not in p.stdout.split('started afresh: ')[1], p.stdout

def test_resuming_takes_this_runs_mask_learning_rate_multiplier(first_epoch, tmp_path):
    run = copy_of(first_epoch, tmp_path)
    train(*SYNTHETIC, '--init_from=resume', '--mask_lr_mult=3', f'--max_steps={STEPS_PER_EPOCH + 1}', out=run)
    groups = checkpoint(run)['optimizer']['param_groups']
    assert sorted(g['lr_mult'] for g in groups) == [1.0, 1.0, 3.0] and result(run)['config']['mask_lr_mult'] == 3

@pytest.mark.parametrize('bad, named', [('--attn=nonsense', "attn='nonsense'"), ('--loss=hinge', "loss='hinge'"),
                                        ('--ckpt_interval=-5', 'ckpt_interval=-5')])
def test_a_bad_setting_fails_in_one_line_before_any_data_is_read(bad, named, tmp_path):
    p = train('configs/fmnist.py', bad, f'--data_dir={tmp_path}/nowhere', out=tmp_path, ok=False)
    assert p.returncode == 2 and p.stderr.count('\n') == 1 and named in p.stderr
    assert not os.path.exists(tmp_path / 'nowhere')  # no download was started

def test_imagenet_config_end_to_end_on_real_jpegs_and_eval_only_reproduces_it(tmp_path, capsys):
    root = need('imagenette-mini')
    args = ['configs/imagenet.py', f'--data_dir={root}', '--num_classes=10', '--image_size=64', '--patch_size=16', *TINY,
            '--attn=grf', '--batch_size=50', '--epochs=2', '--max_steps=12', '--warmup_steps=2', '--num_workers=2',
            '--log_interval=5', '--device=cpu']
    train(*args, out=tmp_path)
    r, c = result(tmp_path), checkpoint(tmp_path)
    assert r['steps'] == 12 and r['final']['count'] == 200 and c['step'] == 12 and c['config']['grf_walks'] == 100
    assert [e['step'] for e in records(tmp_path, 'eval')] == [10, 12]  # each epoch (10 steps), and the early stop
    p = train(*args, '--init_from=resume', '--eval_only=True', out=tmp_path)
    again = json.loads(p.stdout.strip().splitlines()[-1])
    report(capsys, f"imagenette-mini: top-1 {r['final']['top1']:.2f}% in result.json, eval_only {again['top1']:.2f}%")
    assert again['top1'] == r['final']['top1'] and again['count'] == 200

def test_eval_only_reproduces_the_recorded_top1(first_epoch):
    p = train(*SYNTHETIC, '--init_from=resume', '--eval_only=True', out=first_epoch)
    again = json.loads(p.stdout.strip().splitlines()[-1])
    assert again['top1'] == result(first_epoch)['final']['top1'] and again['loss'] == pytest.approx(result(first_epoch)['final']['loss'])
    fast = train(*SYNTHETIC, '--init_from=resume', '--eval_only=True', '--attn_impl=fast', out=first_epoch)
    assert 'win over' not in fast.stdout, fast.stdout  # the path is this run's choice: the same model, the same math
    fast = json.loads(fast.stdout.strip().splitlines()[-1])
    assert fast['top1'] == pytest.approx(again['top1'], abs=0.5) and fast['loss'] == pytest.approx(again['loss'], rel=1e-4)

def test_eval_only_of_a_checkpoint_named_by_its_bare_file_name_writes_eval_json_beside_it(first_epoch, tmp_path):
    """--init_from=ckpt.pt, run from the checkpoint's folder: a path with no folder part."""
    run = copy_of(first_epoch, tmp_path)
    if os.path.exists(os.path.join(run, 'eval.json')):
        os.remove(os.path.join(run, 'eval.json'))
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *SYNTHETIC, '--init_from=ckpt.pt', '--eval_only=True'],
                       cwd=run, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(run, 'eval.json')) as f:
        assert json.load(f)['top1'] == result(first_epoch)['final']['top1']

def test_a_checkpoint_saved_before_a_model_setting_existed_still_resumes(first_epoch, tmp_path):
    """A model setting added later takes its default when an older checkpoint lacks it (table_init_decay); the walks
    are the checkpoint's."""
    run = copy_of(first_epoch, tmp_path)
    old = checkpoint(run)
    del old['config']['table_init_decay']
    torch.save(old, os.path.join(run, 'ckpt.pt'))
    p = train(*SYNTHETIC, '--init_from=resume', '--eval_only=True', out=run)
    assert json.loads(p.stdout.strip().splitlines()[-1])['top1'] == result(first_epoch)['final']['top1']
    train(*SYNTHETIC, '--init_from=resume', f'--max_steps={STEPS_PER_EPOCH + 2}', out=run)
    new = checkpoint(run)
    assert new['step'] == STEPS_PER_EPOCH + 2 and new['config']['table_init_decay'] == 1.0
    walks = mask_and_walk_names(old)[1]
    assert walks and all(torch.equal(new['model'][k], old['model'][k]) for k in walks)

def test_resampled_walks_change_during_training_and_resume_exactly(tmp_path):
    """--grf_resample_every=3: the walks of step 9 are not the initial ones, and a run stopped at step 7 and
    resumed ends with the same walks and weights as one that ran straight through to step 10."""
    args = [*SYNTHETIC, '--grf_resample_every=3']
    straight, resumed, frozen = (str(tmp_path / name) for name in ('straight', 'resumed', 'frozen'))
    train(*args, '--max_steps=10', out=straight)
    train(*args, '--max_steps=7', out=resumed)
    train(*args, '--init_from=resume', '--max_steps=10', out=resumed)
    train(*SYNTHETIC, '--max_steps=1', out=frozen)
    a, b = checkpoint(straight)['model'], checkpoint(resumed)['model']
    assert_same_model(a, b)
    walks = mask_and_walk_names(checkpoint(straight))[1]
    assert walks and all(not torch.equal(a[k], checkpoint(frozen)['model'][k]) for k in walks)

def test_the_sigmoid_loss_starts_near_the_head_bias_and_learns(tmp_path):
    """With the head's bias at -10 every class's logit starts near -10: the summed binary cross-entropy of an image
    is about -log(sigmoid(-10)) = 10 for its class and about 9 x 4.5e-5 for the others."""
    args = [*SYNTHETIC, '--loss=sigmoid', '--head_bias_init=-10.0', '--epochs=1']
    train(*args, '--lr=0', '--min_lr=0', '--max_steps=1', '--log_interval=1', out=tmp_path / 'start')
    assert abs(records(tmp_path / 'start', 'train')[0]['loss'] - 10.0) < 0.3
    train(*args, '--lr=1e-2', out=tmp_path / 'learn')
    assert result(tmp_path / 'learn')['final']['top1'] > 50

def test_the_gpu_check_runs_on_cpu_at_a_tiny_size_and_writes_every_figure(tmp_path):
    """check_gpu.py cannot rot: the same script a GPU machine runs, tiny and on the CPU, every path of every variant and
    the attention benchmark; its JSON holds the figures the README's GPU section is filled from."""
    out = tmp_path / 'check_gpu.json'
    args = ['--size=tiny', '--device=cpu', '--steps=1', '--budget_s=3600', f'--out={out}']  # a busy machine skips nothing
    p = subprocess.run([sys.executable, 'check_gpu.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert all(any(l.startswith(path + ' ') and 'graph breaks 0' in l for l in lines) for path in PATHS)
    assert 'DDP (gloo, 1 process)' in p.stdout and lines[-1] == 'check passed'
    result = json.loads(out.read_text())
    assert set(result) == {'device', 'device_name', 'torch', 'dtype', 'compile_backend', 'size', 'peak_flops', 'budget_s',
                           'build_s', 'ddp', 'train', 'attention', 'skipped', 'failed', 'elapsed_s', 'passed',
                           'grf_fast_over_softmax'}
    assert set(result['grf_fast_over_softmax']) == {'4096', '16384'}  # tiny: N of the GPU sizes not measured, None
    assert 'grf-fast / softmax (SDPA), one layer at N = 16384: not both measured' in p.stdout
    assert result['passed'] and not result['failed'] and not result['skipped'] and result['peak_flops'] is None
    assert set(result['train']) == set(PATHS) and result['ddp']['step_s'] > 0
    for path, r in result['train'].items():
        assert set(r) == {'graph_breaks', 'batch', 'images_per_s', 'step_s', 'compile_s', 'peak_gb', 'flops_per_image',
                          'flops_per_step', 'mfu'}, path
        assert r['graph_breaks'] == 0 and r['mfu'] is None and r['images_per_s'] == pytest.approx(r['batch'] / r['step_s'])
        assert r['flops_per_step'] >= r['batch'] * r['flops_per_image'] > 0, path
    attention = result['attention']
    assert set(attention) == {'settings', 'results', 'slopes', 'crossovers', 'ratios_at_n', 'dense_max_n'}
    assert all(set(r) == {'16', '64'} for r in attention['results'].values()) and 'grf-fast' in attention['results']
    assert os.path.isfile(tmp_path / 'attention-cpu.json')

def test_the_gpu_check_skips_what_would_not_fit_in_its_budget_and_says_so(tmp_path):
    """The first path always runs; the next is skipped once the slowest so far would overrun, and so is the attention
    benchmark with under 10 s left: each named on stdout and in the JSON, and the check still passes."""
    out = tmp_path / 'check_gpu.json'
    args = ['--size=tiny', '--device=cpu', '--steps=1', '--paths=softmax,linear', '--budget_s=1', '--bench_s=0', f'--out={out}']
    p = subprocess.run([sys.executable, 'check_gpu.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result['train']) == ['softmax'] and result['attention'] is None and result['passed']
    assert [s.split(':')[0] for s in result['skipped']] == ['linear', 'attention benchmark']
    assert 'linear skipped: ' in p.stdout and 'attention benchmark skipped: ' in p.stdout
    assert p.stdout.splitlines()[-1] == 'check passed'

def test_a_resumed_run_keeps_the_checkpoints_image_size_and_says_so(first_epoch, tmp_path):
    run = copy_of(first_epoch, tmp_path)
    p = train(*SYNTHETIC, '--init_from=resume', '--image_size=32', f'--max_steps={STEPS_PER_EPOCH + 1}', out=run)
    assert "win over this run's: {'image_size': 16}" in p.stdout and 'a resumed run keeps its image size' in p.stdout
    assert checkpoint(run)['config']['image_size'] == 16 and '16px, 16 tokens' in p.stdout

def fmnist_top1(model, image_size):
    """Top-1 (%) of model on the FashionMNIST test images resized to image_size, in this process."""
    import data
    loaders = data.load('fmnist', DATA_DIR, image_size, 1000, num_classes=0)
    model.eval()
    with torch.no_grad():
        hits = sum((model(x).argmax(1) == y).sum().item() for x, y in loaders.val)
    return 100 * hits / loaders.num_val

def test_a_model_trained_at_32px_and_evaluated_at_48px_does_better_with_resampled_than_with_fresh_embeddings(tmp_path, capsys):
    """Toeplitz on 8-pixel patches: trained briefly on the 4 x 4 grid, evaluated on the 6 x 6 grid of 48 px images as
    it is (eval_only at --image_size=48: embeddings and tables resampled) and with the embeddings a fresh model starts
    with; then fine-tuned at 48 px for a step, which says what it resampled. Each patch then sees a 1.5x finer view,
    which costs more than the positions: resampled, the model keeps over half of its accuracy, and more than afresh."""
    need('FashionMNIST', 'raw')
    args = ['configs/fmnist.py', f'--data_dir={DATA_DIR}', '--attn=toeplitz', '--patch_size=8', '--batch_size=64',
            '--max_steps=200', '--epochs=1', '--lr=3e-3', '--warmup_steps=20', '--dropout=0.0', '--device=cpu']
    train(*args, out=tmp_path / 'run')
    at32 = result(tmp_path / 'run')['final']['top1']
    ckpt = os.path.join(tmp_path, 'run', 'ckpt.pt')
    p = train(*args, f'--init_from={ckpt}', '--eval_only=True', '--image_size=48', out=tmp_path / 'eval')
    at48 = json.loads(p.stdout.strip().splitlines()[-1])['top1']
    assert "from 32 to 48 px: ['pos_embed', 'blocks.0.attn.table_logits', 'blocks.1.attn.table_logits']" in p.stdout
    src = saved_config(checkpoint(tmp_path / 'run')['config'])
    model = ViT(ViTConfig(**{**vars(src), 'image_size': 48}))
    fresh = model.pos_embed.detach().clone()
    model.load_for_fine_tuning(checkpoint(tmp_path / 'run')['model'], src)
    assert fmnist_top1(model, 48) == pytest.approx(at48, abs=0.02)
    with torch.no_grad():
        model.pos_embed.copy_(fresh)
    afresh = fmnist_top1(model, 48)
    report(capsys, f"FashionMNIST toeplitz: top-1 {at32:.2f}% at 32 px; at 48 px {at48:.2f}% resampled, {afresh:.2f}% with fresh embeddings")
    assert at32 > 65 and at48 > 0.6 * at32 and at48 > afresh + 2
    p = train(*args, f'--init_from={ckpt}', '--image_size=48', '--max_steps=1', out=tmp_path / 'fine')
    assert "fine-tuning from" in p.stdout and "resampled from 32 to 48 px: ['pos_embed', " in p.stdout

def test_a_finished_run_classifies_its_own_val_images_to_its_recorded_top1_as_the_readme_says(tmp_path):
    """README, 'Using a trained model elsewhere': its three lines load a finished run's checkpoint (a GRF model with a
    class token), and the val images prepared as it says, by PIL and torchvision here, give the top-1 of result.json."""
    import torchvision
    import torchvision.transforms as T
    root = need('imagenette-mini')
    out = str(tmp_path / 'run')
    train('configs/imagenette.py', f'--data_dir={root}', '--image_size=32', '--patch_size=8', *TINY, '--epochs=1',
          '--batch_size=50', '--num_workers=0', '--attn=grf', '--grf_walks=4', '--class_token=True', '--pool=token',
          '--device=cpu', out=out)
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu', weights_only=True)
    model = ViT(saved_config(ckpt['config'])).eval(); model.load_state_dict(ckpt['model'])
    size = ckpt['config']['image_size']
    prepare = T.Compose([T.Resize(round(size / 0.875), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                         T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    val = torchvision.datasets.ImageFolder(os.path.join(root, 'val'), transform=prepare)
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in torch.utils.data.DataLoader(val, batch_size=50))
    assert model.config.class_token and len(val) == result(out)['final']['count'] == 200
    assert 100 * hits / len(val) == pytest.approx(result(out)['final']['top1'], abs=1e-9)
