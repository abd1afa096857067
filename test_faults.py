"""
What a user sees when something goes wrong (issue 23), each fault met as a user meets it: train and val folders that
disagree (a), an empty class folder (b), two trainings into one out_dir (c), a run from scratch into a run's folder (d),
undecodable images and an evaluation that crashes (e), bad settings (f), damaged files (g); and what a cluster does to
a run (issue 33): preemption, Ctrl-C, a worker killed (h), and a sweep whose runs fail (i). Real data from $DATA_DIR is
copied into tmp_path and damaged there; the trainings are real processes on the CPU, tiny.
"""
import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
import time

import pytest

import data
import outdir
from configurator import configure
from test_data import need
from test_train import ROOT, TINY, assert_same_model, checkpoint, records, result, train

# a 2-epoch run of 4 steps each on the generated task, seconds on a CPU
SYNTHETIC = ['--dataset=synthetic', '--image_size=16', '--patch_size=4', *TINY, '--batch_size=2048', '--epochs=2',
             '--log_interval=2', '--dropout=0.0', '--device=cpu']
STEPS_PER_EPOCH = 8192 // 2048
BAD_SETTINGS = ['depth=-1', 'heads=0', 'dim=0', 'mlp_dim=0', 'batch_size=0', 'grad_accum=0', 'log_interval=0', 'epochs=0',
                'max_steps=-1', 'lr=-1', 'min_lr=-1e-5', 'warmup_steps=-1', 'dropout=1.5', 'weight_decay=-0.1',
                'grad_clip=-1', 'mixup=-0.2', 'label_smoothing=1.5', 'image_size=0', 'patch_size=0', 'num_workers=-1',
                'ckpt_interval=-5', 'beta2=1.0', 'in_channels=-1', 'dataset=mnist', 'device=gpu', 'eval_only=True']
DAMAGE = {'truncated': lambda b: b[:len(b) // 3], 'empty': lambda b: b'', 'garbage': lambda b: b'\x80\x02garbage' * 100}

@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp('finished')
    train(*SYNTHETIC, out=out)
    return out

@pytest.fixture(scope='module')
def early_exits(finished, tmp_path_factory):
    """The runs that must stop before they read any data, and short ones, in one process that runs train.py for each as
    `python train.py ARGS` does (the imports, most of each run's seconds, shared): {name: (exit status, stderr, stdout)}."""
    tmp = tmp_path_factory.mktemp('early')
    runs = {bad: ['configs/fmnist.py', f'--data_dir={tmp}/nowhere', f'--out_dir={tmp}/never/{bad}', f'--{bad}']
            for bad in BAD_SETTINGS}
    (tmp / 'a_file').write_text('')
    runs['out_dir under a file'] = ['configs/fmnist.py', f'--data_dir={tmp}/nowhere', f'--out_dir={tmp}/a_file/run']
    for name in ('scratch', 'fine-tuning', 'another host', *DAMAGE):  # copies of a finished run
        shutil.copytree(finished, tmp / name)
        runs[name] = [*SYNTHETIC, '--init_from=resume', f'--out_dir={tmp / name}']
    runs['scratch'] = [*SYNTHETIC, f'--out_dir={tmp}/scratch']
    runs['fine-tuning'] = [*SYNTHETIC, f'--init_from={finished}/ckpt.pt', f'--out_dir={tmp}/fine-tuning']
    (tmp / 'another host' / 'lock').write_text('another-host 1')
    shutil.copytree(finished, tmp / 'empty lock')
    runs['empty lock'] = [*SYNTHETIC, '--init_from=resume', f"--out_dir={tmp / 'empty lock'}"]
    (tmp / 'empty lock' / 'lock').write_text('')
    for name, damage in DAMAGE.items():
        (tmp / name / 'ckpt.pt').write_bytes(damage((finished / 'ckpt.pt').read_bytes()))
    (tmp / 'truncated' / 'ckpt.pt.tmp').write_bytes(b'half a save')
    shutil.copytree(finished, tmp / 'evaluated')
    runs['eval resumed'] = [*SYNTHETIC, '--init_from=resume', '--eval_only=True', '--image_size=32', f"--out_dir={tmp / 'evaluated'}"]
    runs['eval path'] = [*SYNTHETIC, f"--init_from={tmp / 'evaluated'}/ckpt.pt", '--eval_only=True', '--image_size=32',
                         f'--out_dir={tmp}/elsewhere']
    runs['warm-up'] = [*SYNTHETIC, '--max_steps=1', '--warmup_steps=5', f'--out_dir={tmp}/warm-up']
    script = ("import contextlib, io, json, os, runpy, sys, traceback\n"
              "out = {}\n"
              f"for name, args in {runs!r}.items():\n"
              "    sys.argv, err, said, code = ['train.py', *args], io.StringIO(), io.StringIO(), 0\n"
              "    try:\n"
              "        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(said):\n"
              "            runpy.run_path('train.py', run_name='__main__')\n"
              "    except SystemExit as e:\n"
              "        code = e.code\n"
              "    except BaseException:\n"
              "        code, _ = 'traceback', err.write(traceback.format_exc())\n"
              "    out[name] = code, err.getvalue(), said.getvalue()\n"
              f"    if os.path.exists({str(tmp / 'evaluated' / 'eval.json')!r}):\n"
              f"        os.rename({str(tmp / 'evaluated' / 'eval.json')!r}, {str(tmp)!r} + '/' + name + '.json')\n"
              "print(json.dumps(out))\n")
    p = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp, json.loads(p.stdout.strip().splitlines()[-1])

def one_line(err):
    return err.count('\n') == 1 and 'Traceback' not in err

@pytest.fixture
def mini(tmp_path):
    """A copy of imagenette-mini (10 classes, 50 train and 20 val JPEGs each) to damage."""
    return shutil.copytree(need('imagenette-mini'), tmp_path / 'mini')

def files(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder))

# a. train and val class folders that disagree ----------------------------------------------------------------------

@pytest.mark.parametrize('change, named', [('extra', 'only in train: none, only in val: 1 (n09999999)'),
                                           ('missing', 'only in train: 1 (n03888257), only in val: none'),
                                           ('renamed', 'only in train: 1 (n03888257), only in val: 1 (n01000000)')])
def test_train_and_val_must_hold_the_same_classes(mini, change, named):
    """An extra val folder shifted every label after it (11-class head, wrong top-1); a missing one crashed at step 1;
    a renamed one (the same count) shifts no count, only the labels."""
    if change == 'extra':
        os.makedirs(mini / 'val' / 'n09999999')
        shutil.copy(files(mini / 'val' / 'n01440764')[0], mini / 'val' / 'n09999999')
    elif change == 'renamed':
        os.rename(mini / 'val' / 'n03888257', mini / 'val' / 'n01000000')  # first: every label moves
    else:
        shutil.rmtree(mini / 'val' / 'n03888257')
    with pytest.raises(SystemExit) as e:
        data.load('imagenet', str(mini), 32, 10)
    assert str(e.value) == f"imagenet: train and val must hold the same classes; {named}"

def test_inat2021_train_and_valid_categories_must_agree(tmp_path):
    """torchvision's INaturalist lists each split's own category folders: a category only in 2021_valid is named."""
    from PIL import Image
    for version, n in (('2021_train', 2), ('2021_valid', 6)):
        for c in range(n):
            folder = tmp_path / version / f"{c:05d}_Animalia_Chordata_Aves_Order_Family_Genus_species{c}"
            folder.mkdir(parents=True)
            Image.new('RGB', (40, 30), color=60 * c).save(folder / "0.jpg")
    with pytest.raises(SystemExit) as e:
        data.load('inat2021', str(tmp_path), 32, 1)
    assert 'only in train: none' in str(e.value) and 'only in val: 4 (00002_' in str(e.value) and ', ...)' in str(e.value)

# b. an empty class folder -------------------------------------------------------------------------------------------

def test_an_empty_class_folder_is_one_line_naming_it(mini):
    for f in files(mini / 'train' / 'n02102040'):
        os.remove(f)
    with pytest.raises(SystemExit) as e:
        data.load('imagenet', str(mini), 32, 10)
    assert '\n' not in str(e.value) and 'n02102040' in str(e.value) and str(mini / 'train') in str(e.value)

# c. two trainings into one out_dir ----------------------------------------------------------------------------------

def test_a_second_run_into_a_busy_out_dir_refuses_and_a_killed_runs_folder_is_free_at_once(tmp_path):
    out = tmp_path / 'run'
    loading = tmp_path / 'loading'
    hold = ("import runpy, sys, time, data\n"  # the first run stops where its data would load, holding out_dir
            f"data.load = lambda *args, **kwargs: open({str(loading)!r}, 'w').close() or time.sleep(600)\n"
            f"sys.argv = ['train.py', *{SYNTHETIC + [f'--out_dir={out}']!r}]\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    first = subprocess.Popen([sys.executable, '-c', hold], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if loading.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert loading.exists(), "the first run never reached its data"
        assert outdir.holder(str(out)) == f"pid {first.pid} on {socket.gethostname()}"
        second = train(*SYNTHETIC, out=out, ok=False)
        assert second.returncode == 2 and one_line(second.stderr), second.stderr
        assert f"pid {first.pid} on {socket.gethostname()}" in second.stderr and str(out) in second.stderr
    finally:
        first.kill()  # SIGKILL: no exit handler runs, the OS drops its lock
        first.wait()
    assert open(out / 'lock').read() == f"{socket.gethostname()} {first.pid}" and outdir.holder(str(out)) is None
    third = train(*SYNTHETIC, '--max_steps=2', out=out)  # no take-over to decide: the lock is free
    assert 'done' in third.stdout and outdir.holder(str(out)) is None and checkpoint(out)['step'] == 2

def test_a_lock_file_left_by_a_run_on_another_host_or_an_empty_one_is_no_obstacle(early_exits):
    """A requeued job on another node resumes at once; what a dead run's lock file says no longer matters."""
    tmp, exits = early_exits
    for name in ('another host', 'empty lock'):
        code, err, _ = exits[name]
        assert code == 0 and 'error' not in err, f"{name}: {code} {err}"
        assert json.load(open(tmp / name / 'result.json'))['steps'] == 2 * STEPS_PER_EPOCH

def test_a_run_caught_between_locking_its_folder_and_writing_its_name_is_still_named(tmp_path):
    """The holder locks out_dir/lock, then writes 'host pid' into it; a refused run that reads it in between waits for
    the name rather than print 'a run starting' (the two-starters test below met this window in CI)."""
    lock = tmp_path / 'lock'
    holder = ("import fcntl, os, socket, sys, time\n"
              f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
              "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
              "print('locked', flush=True)\n"
              "time.sleep(0.3)\n"
              "os.write(fd, f'{socket.gethostname()} {os.getpid()}'.encode())\n"
              "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, '-c', holder], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == 'locked\n'
        assert outdir.holder(str(tmp_path)) == f"pid {p.pid} on {socket.gethostname()}"
    finally:
        p.kill()
        p.wait()

def test_two_runs_started_into_one_folder_at_the_same_moment_one_trains_and_one_refuses(tmp_path):
    """Both wait at the door (just before taking out_dir) until a go file appears, then go at once."""
    out, go = tmp_path / 'run', tmp_path / 'go'
    door = ("import os, runpy, sys, time, outdir\n"
            "real, me = outdir.claim, sys.argv[1]\n"  # before sys.argv becomes train.py's
            "def claim(*args, **kwargs):\n"
            f"    open({str(tmp_path)!r} + '/ready-' + me, 'w').close()\n"
            f"    while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
            "    real(*args, **kwargs)\n"
            "outdir.claim = claim\n"
            f"sys.argv = ['train.py', *{SYNTHETIC + ['--max_steps=2', f'--out_dir={out}']!r}]\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    runs = [subprocess.Popen([sys.executable, '-c', door, str(i)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(2)]
    for _ in range(1200):
        if all((tmp_path / f'ready-{i}').exists() for i in range(2)) or any(r.poll() is not None for r in runs):
            break
        time.sleep(0.05)
    waiting = all((tmp_path / f'ready-{i}').exists() for i in range(2))
    go.touch()
    done = [r.communicate(timeout=600) + (r.returncode,) for r in runs]
    assert waiting, done  # both were at the door when it opened
    assert sorted(code for _, _, code in done) == [0, 2], done
    (_, err, _), = [d for d in done if d[2] == 2]
    assert one_line(err) and 'is in use by pid' in err and str(out) in err, err
    assert checkpoint(out)['step'] == 2 and outdir.holder(str(out)) is None

# d. a run from scratch into a folder that holds a run ----------------------------------------------------------------

@pytest.mark.parametrize('run', ['scratch', 'fine-tuning'])
def test_a_run_from_scratch_or_a_fine_tuning_never_overwrites_a_run(early_exits, finished, run):
    tmp, exits = early_exits
    code, err, _ = exits[run]
    assert code == 2 and one_line(err) and '--init_from=resume' in err and '--out_dir' in err, err
    assert sorted(os.listdir(tmp / run)) == sorted(os.listdir(finished)) and outdir.holder(str(tmp / run)) is None
    assert all((tmp / run / f).read_bytes() == (finished / f).read_bytes() for f in os.listdir(finished) if f != 'lock')

# e. undecodable images; an evaluation that crashes ------------------------------------------------------------------

def test_an_undecodable_image_costs_that_image_and_is_counted_and_named(mini, tmp_path):
    bad_train = files(mini / 'train' / 'n03000684')[7]
    bad_val = files(mini / 'val' / 'n03417042')[3]
    open(bad_train, 'wb').write(b'<html>not a JPEG</html>')
    whole = open(bad_val, 'rb').read()
    open(bad_val, 'wb').write(whole[:len(whole) // 2])  # cut short
    p = train('--dataset=imagenet', f'--data_dir={mini}', '--image_size=32', '--patch_size=8', *TINY, '--batch_size=50',
              '--epochs=1', '--num_workers=2', '--log_interval=5', '--device=cpu', out=tmp_path / 'run')
    assert bad_train in p.stdout and bad_val in p.stdout  # named at the epoch's end
    counts = {'train': 1, 'val': 1}
    assert records(tmp_path / 'run', 'eval')[-1]['undecodable'] == result(tmp_path / 'run')['final']['undecodable'] == counts
    assert result(tmp_path / 'run')['final']['count'] == 200  # the replacement takes its place

@pytest.mark.parametrize('num_workers, damaged', [(0, (0, 5)), (2, (0, 1))])
def test_more_undecodable_images_than_one_in_a_thousand_stop_the_run_in_one_line(mini, num_workers, damaged):
    """200 val images may lose one; two (apart, or in a row, which no replacement can stand in for) stop the run."""
    paths = [files(mini / 'val' / 'n01440764')[i] for i in damaged]
    for path in paths:
        open(path, 'wb').write(b'')
    d = data.load('imagenet', str(mini), 32, 20, num_workers=num_workers)
    with pytest.raises(SystemExit) as e:
        list(d.val)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith('2 images failed to decode') and paths[0] in msg and 'damaged' in msg

@pytest.mark.parametrize('fault, num_workers', [('vanished', 0), ('unreadable', 2)])  # each fault, each place it is met
def test_a_file_that_cannot_be_read_ends_the_run_in_one_line_naming_it(mini, num_workers, fault):
    """Not an undecodable image to replace: a file gone since the folders were listed, or one whose read fails (here a
    folder where the file was: the read raises IsADirectoryError, an OSError as an I/O error is)."""
    d = data.load('imagenet', str(mini), 32, 20, num_workers=num_workers)
    path = files(mini / 'val' / 'n01440764')[3]
    os.remove(path)
    if fault == 'unreadable':
        os.makedirs(path)
    with pytest.raises(SystemExit) as e:
        list(d.val)
    msg = str(e.value)  # through configurator.fail: 'data error: ' + msg on stderr, exit status 2
    assert e.value.code == 2 and msg.startswith(f"{path} cannot be read (") and '\n' not in msg and 'damaged' not in msg, msg

def test_an_evaluation_that_crashes_costs_no_training(finished, tmp_path):
    """The checkpoint of a finished epoch is on disk before its evaluation; the resumed run evaluates it first, and
    ends where an uninterrupted run ends, with the same evaluations and the same best."""
    out = tmp_path / 'run'
    crash = ("import runpy, sys, torch\n"
             "def crash(self):\n"
             "    raise KeyboardInterrupt('simulated crash in evaluation')\n"
             "torch.nn.Module.eval = crash\n"
             f"sys.argv = ['train.py', *{SYNTHETIC + [f'--out_dir={out}']!r}]\n"
             "runpy.run_path('train.py', run_name='__main__')\n")
    p = subprocess.run([sys.executable, '-c', crash], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and 'simulated crash in evaluation' in p.stderr
    assert checkpoint(out)['step'] == STEPS_PER_EPOCH and not records(out, 'eval')
    p = train(*SYNTHETIC, '--init_from=resume', out=out)
    assert p.stdout.index(f'eval epoch 1 step {STEPS_PER_EPOCH}:') < p.stdout.index('epoch 2/2 step')
    assert_same_model(checkpoint(finished)['model'], checkpoint(out)['model'])
    assert records(finished, 'eval') == records(out, 'eval') and len(records(out, 'eval')) == 2
    assert result(finished)['best'] == result(out)['best'] and result(finished)['final'] == result(out)['final']

# f. settings that trained a broken model or crashed -----------------------------------------------------------------

def test_every_bad_setting_fails_in_one_line_before_anything_is_read_or_written(early_exits):
    tmp, exits = early_exits
    for bad in BAD_SETTINGS:
        code, err, _ = exits[bad]
        assert code == 2 and one_line(err) and f"{bad.split('=')[0]}=" in err and 'valid' in err, f"--{bad}: {code} {err}"
    assert not (tmp / 'nowhere').exists() and not (tmp / 'never').exists()  # no data read, no out_dir made

# g. damaged files ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('damage', DAMAGE)
def test_a_damaged_checkpoint_is_named_in_one_line(early_exits, damage):
    """A truncated one beside the ckpt.pt.tmp of a save cut short (which is no checkpoint either), an empty one, garbage."""
    tmp, exits = early_exits
    code, err, _ = exits[damage]
    assert code == 2 and one_line(err) and f"{tmp / damage / 'ckpt.pt'} is damaged" in err, err
    assert ('ckpt.pt.tmp' in err) == (damage == 'truncated')

def test_an_out_dir_under_a_file_fails_in_one_line_before_the_data(early_exits):
    tmp, exits = early_exits
    code, err, _ = exits['out_dir under a file']
    assert code == 2 and one_line(err) and f"out_dir='{tmp}/a_file/run'" in err and not (tmp / 'nowhere').exists()

@pytest.mark.parametrize('damage', ['empty', 'truncated'])
def test_a_damaged_fashion_mnist_file_is_named_as_damaged(tmp_path, damage):
    raw = need('FashionMNIST', 'raw')
    copy = tmp_path / 'FashionMNIST' / 'raw'
    copy.mkdir(parents=True)
    for f in os.listdir(raw):
        os.symlink(os.path.join(raw, f), copy / f)
    name = 'train-images-idx3-ubyte' if damage == 'empty' else 't10k-labels-idx1-ubyte'
    os.remove(copy / name)
    (copy / name).write_bytes(b'' if damage == 'empty' else open(os.path.join(raw, name), 'rb').read()[:5000])
    with pytest.raises(SystemExit) as e:
        data.load('fmnist', str(tmp_path), 28, 1000)
    msg = str(e.value)
    assert '\n' not in msg and f"{copy / name} is damaged" in msg and 'downloaded' in msg and 'could not' not in msg

def test_a_damaged_cifar10_file_is_named_as_damaged_offline(tmp_path, monkeypatch):
    import urllib.error
    import torchvision
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torchvision.datasets.CIFAR10, 'download', offline)
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    (folder / 'data_batch_1').write_bytes(b'cut short')
    with pytest.raises(SystemExit) as e:
        data.load('cifar10', str(tmp_path), 32, 8)
    assert f"{folder / 'data_batch_1'} is damaged" in str(e.value) and 'could not' not in str(e.value)

def test_a_config_path_that_is_a_directory_says_so(capsys):
    with pytest.raises(SystemExit):
        configure({'lr': 1e-3}, ['configs'])
    assert capsys.readouterr().err.strip() == "config error: config file configs is a directory, not a file"

# h. what a cluster does to a run: preemption (SIGTERM), Ctrl-C (SIGINT), a worker killed -------------------------------

def wrapped(tmp_path, signum, at_step, rank=0, times=1, at='step'):
    """A script that runs train.py as given and has `rank` send itself signum (`times` times, as a burst) while it takes
    optimizer step at_step, as a scheduler's signal lands in the middle of a step, or (at='eval', 'start') as the
    evaluation after step at_step begins, or as the data loads; at its end it names the threads still running."""
    script = tmp_path / f'signal_{signum}_at_{at}_{at_step}_x{times}.py'
    script.write_text("import os, runpy, sys, time, torch\n"
                      f"sys.path.insert(0, {ROOT!r})\n"
                      "import data, outdir\n"
                      "real_step, real_eval, real_load, calls = torch.optim.AdamW.step, torch.nn.Module.eval, data.load, []\n"
                      "def send():\n"
                      f"    if os.environ.get('RANK', '0') == '{rank}':\n"
                      f"        for _ in range({times}): os.kill(os.getpid(), {signum})\n"
                      "def step(self, *args, **kwargs):\n"
                      "    calls.append(1)\n"
                      f"    if len(calls) == {at_step} and {at == 'step'}: send()\n"
                      "    return real_step(self, *args, **kwargs)\n"
                      "def evaluation(self):\n"
                      f"    if len(calls) == {at_step} and {at == 'eval'}: send()\n"
                      "    return real_eval(self)\n"
                      "def load(*args, **kwargs):\n"
                      f"    if {at == 'start'}: send()\n"
                      "    return real_load(*args, **kwargs)\n"
                      "torch.optim.AdamW.step, torch.nn.Module.eval, data.load = step, evaluation, load\n"
                      "sys.argv[0] = 'train.py'\n"
                      "try:\n"
                      "    runpy.run_path('train.py', run_name='__main__')\n"
                      "finally:\n"
                      "    threads = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
                      "    sys.stdout.flush(), sys.stderr.flush()\n"
                      "    os.write(2, ('threads at exit: ' + ' '.join(sorted(threads)) + '\\n').encode())  # one write: ranks' lines never mix\n")
    return str(script)

TORCHRUN = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')

def run(launcher, script, *args, out):
    return subprocess.run([*launcher, script, *args, f'--out_dir={out}'], cwd=ROOT, capture_output=True, text=True, timeout=600)

def logged(out):
    return [(r['kind'], r['step'], r['loss'], r.get('top1')) for r in map(json.loads, open(out / 'metrics.jsonl'))]

@pytest.mark.parametrize('signum, at_step', [(15, 3), (2, STEPS_PER_EPOCH)])  # SIGTERM mid-epoch, SIGINT at its end
def test_a_signal_stops_the_run_after_its_step_and_the_resumed_run_ends_as_if_never_stopped(finished, tmp_path, signum, at_step):
    out = tmp_path / 'run'
    p = run((sys.executable,), wrapped(tmp_path, signum, at_step), *SYNTHETIC, out=out)
    name, err = {15: 'SIGTERM', 2: 'SIGINT'}[signum], p.stderr.split('threads at exit:')[0]  # train.py's own lines
    assert p.returncode == 128 + signum and one_line(err), p.stderr  # 143 or 130: ended by that signal
    assert f"stopped by {name} at step {at_step}" in err and '--init_from=resume' in err
    assert checkpoint(out)['step'] == at_step and outdir.holder(str(out)) is None
    assert not records(out, 'eval')  # the evaluation at the epoch's end is left to the resumed run
    again = err.strip().split('resume with: python ')[1].split()
    assert json.load(open(out / 'stopped.json')) == {'signal': name, 'step': at_step, 'resume': 'python ' + ' '.join(again)}
    p = train(*again[1:], out=out)  # the command it printed (and the same out_dir)
    said = [l for l in p.stdout.splitlines() if not l.startswith('override')]
    assert said[0] == f"resuming {out} from step {at_step}, epoch {at_step // STEPS_PER_EPOCH + 1}", said[:2]
    assert not (out / 'stopped.json').exists()  # resumed, and then finished
    assert_same_model(checkpoint(finished)['model'], checkpoint(out)['model'])
    assert logged(out) == logged(finished)  # every train loss and evaluation, the partial log interval's included
    assert result(out)['final'] == result(finished)['final'] and result(out)['best'] == result(finished)['best']

def photographs(*args):
    """A 1-layer model on imagenette-mini's JPEGs at 16 px: 10 steps per epoch of 50 random crops, 2 epochs."""
    return ['--dataset=imagenet', f"--data_dir={need('imagenette-mini')}", '--image_size=16', '--patch_size=4', *TINY,
            '--attn=linear', '--batch_size=50', '--epochs=2', '--log_interval=5', '--lr=3e-3', '--device=cpu', *args]

@pytest.fixture(scope='module')
def ddp_stopped_and_resumed(tmp_path_factory):
    """2 ranks on photographs, rank 1 alone signalled (SIGTERM during step 3), then resumed; and the same run unstopped:
    (out_dir, the stopped run, the resumed, the unstopped run's out_dir)."""
    tmp = tmp_path_factory.mktemp('ddp')
    args = photographs('--num_workers=1', '--dropout=0.1')
    stopped = run(TORCHRUN, wrapped(tmp, 15, 3, rank=1), *args, out=tmp / 'run')
    stopped.saved = checkpoint(tmp / 'run')
    stopped.json = json.load(open(tmp / 'run' / 'stopped.json'))
    resumed = run(TORCHRUN, wrapped(tmp, 15, 0), *args, '--init_from=resume', out=tmp / 'run')  # no signal
    unstopped = run(TORCHRUN, wrapped(tmp, 15, 0), *args, out=tmp / 'unstopped')
    assert unstopped.returncode == 0, unstopped.stderr[-3000:]
    return tmp / 'run', stopped, resumed, tmp / 'unstopped'

def test_under_torchrun_every_rank_stops_at_the_step_one_rank_was_signalled_at(ddp_stopped_and_resumed):
    """Both stop after step 3 (rank 0 never had the signal) and say so in stopped.json (torchrun's exit status is 1);
    resumed, the run ends bit for bit as an unstopped one."""
    out, stopped, resumed, unstopped = ddp_stopped_and_resumed
    assert stopped.returncode != 0 and stopped.stderr.count('stopped by SIGTERM at step 3') == 1, stopped.stderr[-3000:]
    assert stopped.saved['step'] == 3 and len(stopped.saved['rng']) == 2 and resumed.returncode == 0, resumed.stderr[-3000:]
    assert stopped.json['signal'] == 'SIGTERM' and stopped.json['step'] == 3 and '--init_from=resume' in stopped.json['resume']
    assert_same_model(checkpoint(unstopped)['model'], checkpoint(out)['model'])
    assert logged(out) == logged(unstopped) and not (out / 'stopped.json').exists()

def test_no_gloo_thread_outlives_a_ddp_run_stopped_or_finished(ddp_stopped_and_resumed):
    """A gloo thread alive at interpreter exit aborted a rank at random (terminate called without an active exception,
    SIGABRT) after a run that had done all its work; every rank of both runs ends with its main thread alone."""
    _, stopped, resumed, _ = ddp_stopped_and_resumed
    for p in (stopped, resumed):
        ends = [l for l in p.stderr.splitlines() if l.startswith('threads at exit:')]
        assert len(ends) == 2 and not any('gloo' in l for l in ends), ends

def test_torchrun_with_a_worker_killed_ends_and_its_last_checkpoint_resumes_on_another_host(finished, tmp_path):
    """Rank 0, which holds out_dir, dies by SIGKILL during step 6 (epoch 2): torchrun ends (no hang: this call's timeout
    bounds it) with the checkpoint of epoch 1 intact; the job, requeued on another node, resumes from it at once."""
    out = tmp_path / 'run'
    p = run(TORCHRUN, wrapped(tmp_path, 9, STEPS_PER_EPOCH + 2, rank=0), *SYNTHETIC, out=out)
    assert p.returncode != 0 and 'SIGKILL' in p.stderr, p.stderr[-3000:]
    assert checkpoint(out)['step'] == STEPS_PER_EPOCH and outdir.holder(str(out)) is None
    elsewhere = ("import runpy, socket, sys\n"
                 "socket.gethostname = lambda: 'another-node'\n"
                 f"sys.argv = ['train.py', *{SYNTHETIC + ['--init_from=resume', f'--out_dir={out}']!r}]\n"
                 "runpy.run_path('train.py', run_name='__main__')\n")
    p = subprocess.run([sys.executable, '-c', elsewhere], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_model(checkpoint(finished)['model'], checkpoint(out)['model'], exact=False)

def test_a_checkpoint_is_on_disk_before_it_replaces_the_last(tmp_path, monkeypatch):
    """The temp file is fsync'ed before the rename: a crash of the machine cannot leave an empty ckpt.pt."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: calls.append(('fsync', os.readlink(f'/proc/self/fd/{fd}'))) or real_fsync(fd))
    monkeypatch.setattr(os, 'replace', lambda a, b: calls.append(('replace', str(a))) or real_replace(a, b))
    path = str(tmp_path / 'ckpt.pt')
    outdir.save_checkpoint({'step': 1}, path)
    assert calls == [('fsync', path + '.tmp'), ('replace', path + '.tmp')]

# i. a sweep -------------------------------------------------------------------------------------------------------------

def sweep(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'sweep.py'), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)

def test_a_sweep_from_another_folder_skips_a_held_run_and_fails_naming_the_run_that_failed(tmp_path):
    """softmax trains; linear's folder holds a damaged checkpoint, so its run fails; grf's is held by this process."""
    for attn in ('linear', 'grf'):
        os.makedirs(tmp_path / 'sweep' / f'{attn}-s0')
    (tmp_path / 'sweep' / 'linear-s0' / 'ckpt.pt').write_bytes(b'damaged')
    outdir.take_lock(str(tmp_path / 'sweep' / 'grf-s0'))
    try:
        p = sweep('--attns=softmax,linear,grf', '--seeds=1', '--epochs=1', '--out_root=sweep',
                  f"--args={' '.join([*SYNTHETIC[:8], '--max_steps=1', '--device=cpu'])}", cwd=tmp_path)
    finally:
        outdir.release(str(tmp_path / 'sweep' / 'grf-s0'))
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"sweep/grf-s0: in use by pid {os.getpid()} on {socket.gethostname()}, skipped" in p.stdout
    assert result(tmp_path / 'sweep' / 'softmax-s0')['steps'] == 1 and 'is damaged' in open(tmp_path / 'sweep' / 'linear-s0' / 'train.log').read()
    assert p.stderr.strip().splitlines()[-1] == "sweep: 1 runs done, 1 skipped, 1 failed: sweep/linear-s0"

@pytest.mark.parametrize('bad, named', [('--config_file=configs/nope.py', 'config file not found: configs/nope.py'),
                                        ('--args=--depth=-1', 'depth=-1'), ('--args=--dataset=mnist', "dataset='mnist'"),
                                        ('--seeds=0', 'seeds=0'), ('--args=--lrr=1', "unknown key 'lrr'"),
                                        ('--attns=softmax,nope', "'nope'")])
def test_a_sweep_checks_its_settings_and_config_before_it_launches_anything(tmp_path, monkeypatch, capsys, bad, named):
    """sweep.py run in this process (as `python sweep.py ...`: each case a failure before any launch)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', ['sweep.py', bad, '--out_root=sweep'])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, 'sweep.py'), run_name='__main__')
    err = capsys.readouterr().err
    assert e.value.code == 2 and one_line(err) and named in err and not (tmp_path / 'sweep').exists(), err

# j. exact resume on photographs, locks no child holds, the signals a cluster sends (issue 42) -------------------------

@pytest.fixture(scope='module')
def unstopped_photographs(tmp_path_factory):
    """The photograph run without workers, unstopped, at each dropout: {dropout: out_dir}."""
    runs = {}
    for dropout in (0.0, 0.1):
        runs[dropout] = tmp_path_factory.mktemp(f'photographs-{dropout}')
        train(*photographs('--num_workers=0', f'--dropout={dropout}'), out=runs[dropout])
    return runs

@pytest.mark.parametrize('num_workers, dropout, at_step', [(0, 0.1, 7), (2, 0.0, 13)])
def test_a_run_on_photographs_stopped_and_resumed_ends_bit_for_bit_as_an_unstopped_one_with_any_workers(
        unstopped_photographs, tmp_path, num_workers, dropout, at_step):
    """Each image's crop and flip come from (seed, epoch, index), not from a worker's stream or the dropout's: the same
    with 0 or 2 workers, and the same again after a resume."""
    out, args = tmp_path / 'run', photographs(f'--num_workers={num_workers}', f'--dropout={dropout}')
    p = run((sys.executable,), wrapped(tmp_path, 15, at_step), *args, out=out)
    assert p.returncode == 143 and checkpoint(out)['step'] == at_step, p.stderr[-3000:]
    train(*args, '--init_from=resume', out=out)
    assert_same_model(checkpoint(unstopped_photographs[dropout])['model'], checkpoint(out)['model'])
    assert logged(out) == logged(unstopped_photographs[dropout])

def test_a_killed_run_with_workers_frees_its_folder_at_once_and_its_workers_end_with_it(tmp_path):
    """SIGKILL leaves no handler to run: the lock is free because no worker ever held it, and the workers (which
    torch would end after seconds) end at once, by the signal the kernel sends when their parent dies."""
    out, ready = tmp_path / 'run', tmp_path / 'workers'
    hold = ("import multiprocessing, os, runpy, sys, time, torch\n"
            "real, calls = torch.optim.AdamW.step, []\n"
            "def step(self, *args, **kwargs):\n"
            "    calls.append(1)\n"
            "    if len(calls) == 2:\n"
            f"        open({str(ready)!r}, 'w').write(' '.join(str(p.pid) for p in multiprocessing.active_children()))\n"
            "        time.sleep(600)\n"
            "    return real(self, *args, **kwargs)\n"
            "torch.optim.AdamW.step = step\n"
            f"sys.argv = ['train.py', *{photographs('--num_workers=2', f'--out_dir={out}')!r}]\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    first = subprocess.Popen([sys.executable, '-c', hold], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):
            if ready.exists() and ready.read_text() or first.poll() is not None:
                break
            time.sleep(0.1)
        workers = [int(p) for p in ready.read_text().split()]
        assert len(workers) == 2 and outdir.holder(str(out)) == f"pid {first.pid} on {socket.gethostname()}"
    finally:
        first.kill()
        first.wait()
    assert outdir.holder(str(out)) is None  # at once: no waiting
    time.sleep(0.5)
    alive = [w for w in workers if os.path.exists(f'/proc/{w}') and open(f'/proc/{w}/stat').read().split()[2] != 'Z']
    assert not alive, f"workers {alive} outlived their parent"

@pytest.mark.parametrize('at', ['start', 'eval'])
def test_a_signal_during_start_up_or_evaluation_stops_at_once_with_the_last_steps_checkpoint(finished, tmp_path, at):
    """Not after the whole evaluation, one more step and two saves: the checkpoint on disk is the one to resume."""
    out = tmp_path / 'run'
    p = run((sys.executable,), wrapped(tmp_path, 15, STEPS_PER_EPOCH, at=at), *SYNTHETIC, out=out)
    err = p.stderr.split('threads at exit:')[0]
    assert p.returncode == 143, p.stderr[-3000:]
    stopped = json.load(open(out / 'stopped.json'))
    if at == 'start':
        assert not (out / 'ckpt.pt').exists() and stopped['step'] is None and 'start again with: python' in err
        assert '--init_from=resume' not in stopped['resume']
        return
    assert checkpoint(out)['step'] == stopped['step'] == STEPS_PER_EPOCH and not records(out, 'eval'), err
    train(*SYNTHETIC, '--init_from=resume', out=out)
    assert_same_model(checkpoint(finished)['model'], checkpoint(out)['model'])
    assert logged(out) == logged(finished)

def test_a_burst_of_sigterms_is_one_and_a_second_sigint_ends_the_run_at_once(finished, tmp_path):
    out = tmp_path / 'burst'
    p = run((sys.executable,), wrapped(tmp_path, 15, 3, times=3), *SYNTHETIC, out=out)
    assert p.returncode == 143 and 'stopped by SIGTERM at step 3' in p.stderr and checkpoint(out)['step'] == 3, p.stderr
    out = tmp_path / 'twice'
    p = run((sys.executable,), wrapped(tmp_path, 2, 3, times=2), *SYNTHETIC, out=out)
    assert p.returncode != 130 and 'KeyboardInterrupt' in p.stderr and not (out / 'ckpt.pt').exists(), p.stderr[-3000:]

def test_a_starter_that_opened_a_lock_file_removed_before_it_locked_it_does_not_own_the_folder(tmp_path):
    """remove_if_unused takes away a failed start's folder and lock file; a starter that opened that file just before
    and locks it just after must not own the folder that a third run, meanwhile, made and locked again."""
    out = tmp_path / 'made' / 'run'
    starter = ("import os, sys, time, outdir\n"
               "def paused(lock):\n"
               "    def call(fd, *args):\n"
               "        if sys.argv[1] == 'paused':\n"
               f"            open({str(tmp_path)!r} + '/opened', 'w').close()\n"
               f"            while not os.path.exists({str(tmp_path)!r} + '/go'): time.sleep(0.01)\n"
               "        return lock(fd, *args)\n"
               "    return call\n"
               "outdir.fcntl.lockf, outdir.fcntl.flock = paused(outdir.fcntl.lockf), paused(outdir.fcntl.flock)\n"
               f"outdir.claim({str(out)!r}, resume=False)\n"
               "print('owner', flush=True)\n"
               "sys.stdin.readline()\n")  # holds the folder until told, then exits: an empty folder is removed
    spawn = lambda mode: subprocess.Popen([sys.executable, '-c', starter, mode], cwd=ROOT, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = spawn('plain')
    assert first.stdout.readline() == 'owner\n'
    second = spawn('paused')
    for _ in range(600):
        if (tmp_path / 'opened').exists():
            break
        time.sleep(0.05)
    first.communicate('\n', timeout=60)  # exits: its folder, lock file and all, is removed
    assert not (tmp_path / 'made').exists()
    third = spawn('plain')
    assert third.stdout.readline() == 'owner\n'
    (tmp_path / 'go').touch()
    out2, err2 = second.communicate(timeout=60)
    third.communicate('\n', timeout=60)
    assert second.returncode == 2 and f"in use by pid {third.pid}" in err2 and 'owner' not in out2, (out2, err2)

def test_eval_only_of_a_resumed_run_at_another_size_is_the_evaluation_of_its_path_and_is_written_beside_it(early_exits):
    """No training banner, no 'resuming': one line of result, and eval.json beside the checkpoint."""
    tmp, exits = early_exits
    by_resume, by_path = (json.load(open(tmp / f'{name}.json')) for name in ('eval resumed', 'eval path'))
    assert by_resume['image_size'] == 32 and by_resume['count'] == 2048 and 0 <= by_resume['top5'] <= 100
    assert {k: v for k, v in by_resume.items() if k != 'checkpoint'} == {k: v for k, v in by_path.items() if k != 'checkpoint'}
    assert by_path['checkpoint'] == f"{tmp / 'evaluated'}/ckpt.pt"
    for name in ('eval resumed', 'eval path'):
        code, err, out = exits[name]
        said = [l for l in out.splitlines() if not l.startswith('override')]
        assert code == 0 and not any('resuming' in l or 'epoch' in l for l in said), (name, code, err, said)

def test_every_start_names_its_out_dir_and_a_warm_up_longer_than_the_run_is_said_in_one_line(early_exits):
    tmp, exits = early_exits
    code, err, out = exits['warm-up']
    assert code == 0 and f"training in {tmp}/warm-up" in out
    assert err.count('\n') == 1 and 'warmup_steps=5' in err and '1 steps' in err, err

def test_the_readme_slurm_script_requeues_a_stopped_job_and_not_a_finished_one(finished, tmp_path):
    """Its lines run by bash as they are, with the training command this test's (signalled in its first run) and
    scontrol a stub that notes the requeue."""
    readme = open(os.path.join(ROOT, 'README.md')).read()
    script = readme.split('```bash\n')[1].split('```')[0]
    bin_dir, out = tmp_path / 'bin', tmp_path / 'run'
    bin_dir.mkdir()
    (bin_dir / 'scontrol').write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/requeued\n")
    (bin_dir / 'scontrol').chmod(0o755)
    lines = [l for l in script.splitlines() if not l.startswith(('out=', 'train='))]
    for n, signalled in enumerate((True, False)):
        train_cmd = ' '.join([sys.executable, wrapped(tmp_path, 15, 3 if signalled else 0), *SYNTHETIC, f'--out_dir={out}'])
        body = '\n'.join([lines[0], f'out={out}', f'train="{train_cmd}"', *lines[1:]])
        p = subprocess.run(['bash', '-c', body], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, 'PATH': f"{bin_dir}:{os.environ['PATH']}", 'SLURM_JOB_ID': '42'})
        requeued = (tmp_path / 'requeued').read_text().splitlines() if (tmp_path / 'requeued').exists() else []
        assert requeued == ['requeue 42'], (n, p.stderr[-2000:])  # once: after the first run, not the second
    assert_same_model(checkpoint(finished)['model'], checkpoint(out)['model'])

def test_the_readme_installs_cpu_torch_first_names_what_bench_writes_and_when_nfs_frees_a_lock():
    import bench
    readme = open(os.path.join(ROOT, 'README.md')).read()
    setup = readme.split('## Set-up')[1].split('##')[0]
    commands = [l.strip() for l in setup.splitlines() if l.startswith('    ')]
    assert 'download.pytorch.org/whl/cpu' in commands[0] and 'Python 3.10' in setup and 'torch 2.3' in setup
    benches = [l for l in readme.splitlines() if 'python bench.py' in l and bench.out_dir in l]
    named = {l.split('--mode=')[1].split()[0]: l.split(bench.out_dir + '/')[1].split()[0] for l in benches}
    assert named == {'attention': 'attention-cpu.json'}  # write_results: <mode>-<device>.json
    assert 'train-imagenet-cpu.json' in readme.split('configs/imagenette.py --image_sizes')[1].split('\n\n')[0]
    lock = readme.split('is in use by pid P on HOST')[1].split('\n- ')[0]
    assert 'NFSv4' in lock and '90 s' in lock and 'NFSv3' in lock and 'local_lock' in lock
