"""
Runs a comparison: `train.py <config_file>` (configs/fmnist.py unless set) for every attention and seed, then
prints the table of report.py. A run whose result.json exists is skipped, one that another process is running (its
out_dir/lock) too, and one with only a checkpoint resumes, so an interrupted sweep continues where it stopped. Its settings,
the config file and the train.py arguments are checked before anything starts; it exits 1 if a run failed, naming them.
It runs from any directory: train.py and report.py are found beside it, config_file in the working directory or beside it.

    python sweep.py                                   # every variant x 3 seeds x configs/fmnist.py's 30 epochs
    python sweep.py --epochs=10 --seeds=1 --jobs=2    # a shorter CPU protocol, two trainings at a time
    python report.py out/sweep                        # the table, the curves and the mask pictures
"""
import contextlib
import io
import os
import subprocess
import sys
import time

from configurator import configure, fail
from model import VARIANTS
from outdir import holder

attns = ','.join(VARIANTS) # comma-separated variants
seeds = 3                  # seeds 0 .. seeds-1 of each variant
epochs = 0                 # per run (0: the config file's)
jobs = 1                   # trainings at a time
threads = 0                # CPU threads per training (0 = the cores split between the jobs)
config_file = 'configs/fmnist.py'
out_root = 'out/sweep'     # one folder per run: <out_root>/<attn>-s<seed>
args = ''                  # more train.py arguments, space-separated; {seed} stands for the run's seed, e.g.
                           # '--data_dir=../shared/data --mask_seed={seed}'
# -----------------------------------------------------------------------------
config = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, str))}
configure(config, sys.argv[1:])
globals().update(config)
ROOT = os.path.dirname(os.path.abspath(__file__))  # not a setting: defined after them

unknown = [a for a in attns.split(',') if a not in VARIANTS]
if unknown:
    fail(f"attns={attns!r}: unknown variant {unknown[0]!r}; valid: {', '.join(VARIANTS)}")
for key, low in (('seeds', 1), ('jobs', 1), ('threads', 0), ('epochs', 0)):
    if config[key] < low:
        fail(f"{key}={config[key]} is invalid; valid: an integer >= {low}")
if not os.path.isfile(config_file) and os.path.isfile(os.path.join(ROOT, config_file)):
    config_file = os.path.join(ROOT, config_file)  # configs/... beside this script
pending = [(a, s) for s in range(seeds) for a in attns.split(',')]
# every run's settings checked by train.py's own rules: train.py run down to its checks' end (fail: one line, exit 2)
checks = open(os.path.join(ROOT, 'train.py')).read().split('\n# processes and devices')[0]
for attn, seed in pending:
    sys.argv = ['train.py', config_file, f'--attn={attn}', f'--seed={seed}', *[f'--epochs={epochs}'] * bool(epochs),
                *args.replace('{seed}', str(seed)).split()]
    with contextlib.redirect_stdout(io.StringIO()):  # not its override lines
        exec(compile(checks, 'train.py', 'exec'), {'__name__': 'checks'})
threads = threads or max(1, (os.cpu_count() or 1) // jobs)
running, failed, skipped, t0 = [], [], [], time.time()
while pending or running:
    while pending and len(running) < jobs:
        attn, seed = pending.pop(0)  # what to do with a run is decided now: another sweep may have run it meanwhile
        out_dir = os.path.join(out_root, f'{attn}-s{seed}')
        busy = holder(out_dir)
        if busy or os.path.exists(os.path.join(out_dir, 'result.json')):
            print(f"[{time.time() - t0:6.0f}s] {out_dir}: {'in use by ' + busy if busy else 'done'}, skipped", flush=True)
            skipped.append(out_dir)
            continue
        cmd = [sys.executable, os.path.join(ROOT, 'train.py'), config_file, f'--attn={attn}', f'--seed={seed}', f'--out_dir={out_dir}']
        cmd += [f'--epochs={epochs}'] if epochs else []
        cmd += args.replace('{seed}', str(seed)).split()
        cmd += ['--init_from=resume'] if os.path.exists(os.path.join(out_dir, 'ckpt.pt')) else []  # last: over args' init_from
        os.makedirs(out_dir, exist_ok=True)
        print(f"[{time.time() - t0:6.0f}s] start {' '.join(cmd[1:])}  (log: {out_dir}/train.log)", flush=True)
        log = open(os.path.join(out_dir, 'train.log'), 'a')
        env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}
        running.append((out_dir, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    time.sleep(1)
    for r in [r for r in running if r[1].poll() is not None]:
        running.remove(r)
        r[2].close()
        status = 'done' if r[1].returncode == 0 else f'FAILED (exit {r[1].returncode}), see its train.log'
        print(f"[{time.time() - t0:6.0f}s] {r[0]}: {status}", flush=True)
        failed += [r[0]] if r[1].returncode else []

subprocess.run([sys.executable, os.path.join(ROOT, 'report.py'), out_root, '--no_plots'])
print(f"sweep: {seeds * len(attns.split(',')) - len(skipped) - len(failed)} runs done, {len(skipped)} skipped, "
      f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}", file=sys.stderr if failed else sys.stdout)
sys.exit(1 if failed else 0)
