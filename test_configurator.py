"""The configurator: every override path, and every mistake as one line on stderr with exit status 2."""
import os
import re
import subprocess
import sys

import pytest

from configurator import configure, declared, fail

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = {'lr': 1e-3, 'min_lr': 1e-5, 'epochs': 30, 'compile': True, 'attn': 'softmax', 'out_dir': 'out',
            'init_from': 'scratch', 'wandb_run_name': '', 'resume_note': None}

def run(args):
    config = dict(DEFAULTS)
    configure(config, args)
    return config

def error_of(args, capsys):
    """The exit status and the stderr lines of a configuration that must fail."""
    with pytest.raises(SystemExit) as e:
        run(args)
    return e.value.code, capsys.readouterr().err.strip().splitlines()

def write(tmp_path, text, name='cfg.py'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)

def test_command_line_values_are_python_literals_or_strings():
    c = run(['--epochs=5', '--compile=False', '--attn=grf', '--lr=3e-4'])
    assert (c['epochs'], c['compile'], c['attn'], c['lr']) == (5, False, 'grf', 3e-4)

def test_a_value_may_contain_equals_signs():
    assert run(['--out_dir=runs/a=1,b=2'])['out_dir'] == 'runs/a=1,b=2'
    assert run(['--wandb_run_name=x=y=z'])['wandb_run_name'] == 'x=y=z'

def test_an_int_is_accepted_where_a_float_is_expected():
    c = run(['--lr=1', '--min_lr=0'])
    assert c['lr'] == 1.0 and type(c['lr']) is float and type(c['min_lr']) is float

def test_a_string_key_takes_text_that_looks_like_a_number():
    assert run(['--init_from=123'])['init_from'] == '123'

def test_true_and_false_set_booleans():
    assert run(['--compile=False'])['compile'] is False
    assert run(['--compile=False', '--compile=True'])['compile'] is True

def test_a_none_default_accepts_any_value():
    assert run(['--resume_note=3'])['resume_note'] == 3
    assert run(['--resume_note=hello'])['resume_note'] == 'hello'
    assert run(['--resume_note=[1, 2]'])['resume_note'] == [1, 2]

def test_config_files_and_arguments_apply_left_to_right(tmp_path):
    cfg = write(tmp_path, "import math\nepochs = 7\nlr = lr * 2\n_scratch = 1\n")
    assert run([cfg])['epochs'] == 7 and run([cfg])['lr'] == 2e-3
    assert run([cfg, '--epochs=9'])['epochs'] == 9
    assert run(['--epochs=9', cfg])['epochs'] == 7

def test_unknown_command_line_key_names_it_and_the_closest_keys(capsys):
    code, err = error_of(['--lrr=0.1'], capsys)
    assert code == 2 and len(err) == 1
    assert "unknown key 'lrr'" in err[0] and 'lr' in err[0].split('closest valid keys:')[1]

def test_unknown_key_in_a_config_file_names_it_the_file_and_the_closest_keys(tmp_path, capsys):
    cfg = write(tmp_path, "epochs = 3\nmin_lrr = 0.0\n")
    code, err = error_of([cfg], capsys)
    assert code == 2 and len(err) == 1
    assert "unknown key 'min_lrr'" in err[0] and cfg in err[0] and 'min_lr' in err[0]

def test_wrong_type_names_the_key_the_value_and_the_expected_type(capsys):
    code, err = error_of(['--epochs=1.5'], capsys)
    assert code == 2 and len(err) == 1
    assert 'epochs=1.5' in err[0] and 'expected int' in err[0] and 'float' in err[0]
    code, err = error_of(['--compile=yes'], capsys)
    assert code == 2 and "compile='yes'" in err[0] and 'expected bool' in err[0]

def test_wrong_type_in_a_config_file(tmp_path, capsys):
    cfg = write(tmp_path, "attn = 3\n")
    code, err = error_of([cfg], capsys)
    assert code == 2 and 'attn=3' in err[0] and 'expected str' in err[0] and cfg in err[0]

def test_missing_config_file_names_the_path(capsys):
    code, err = error_of(['configs/no_such_config.py'], capsys)
    assert code == 2 and len(err) == 1 and 'config file not found: configs/no_such_config.py' in err[0]

def test_argument_without_a_value(capsys):
    code, err = error_of(['--compile'], capsys)
    assert code == 2 and len(err) == 1 and '--key=value' in err[0]

def test_a_flag_is_given_bare_and_a_value_for_it_fails_in_one_line(capsys):
    config = {'no_plots': False, 'out': ''}
    configure(config, ['--no_plots'], flags=('no_plots',))
    assert config['no_plots'] is True
    with pytest.raises(SystemExit) as e:
        configure(config, ['--no_plots=1'], flags=('no_plots',))
    assert e.value.code == 2 and capsys.readouterr().err == "config error: --no_plots is a flag, given bare: got '--no_plots=1'\n"

def test_a_failure_is_one_line_that_says_its_kind(capsys):
    with pytest.raises(SystemExit) as e:
        fail("out_dir out/x is in use by pid 1 on h", kind='out_dir')
    assert e.value.code == 2 and str(e.value) == "out_dir out/x is in use by pid 1 on h"  # for a caller that catches it
    assert capsys.readouterr().err == "out_dir error: out_dir out/x is in use by pid 1 on h\n"

def test_a_busy_run_folder_a_damaged_checkpoint_and_missing_data_each_say_their_kind(tmp_path, capsys):
    import data
    import outdir
    hold = ("import fcntl, os, sys\n"  # another run, another process, holds the folder: its POSIX lock (outdir.take_lock)
            f"fcntl.lockf(os.open({str(tmp_path / 'lock')!r}, os.O_RDWR | os.O_CREAT), fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n")
    held = subprocess.Popen([sys.executable, '-c', hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert held.stdout.readline() == 'held\n'
    (tmp_path / 'ckpt.pt').write_bytes(b'garbage')
    try:
        for call, kind in [(lambda: outdir.claim(str(tmp_path), resume=True), 'out_dir'),
                           (lambda: outdir.read_checkpoint(str(tmp_path / 'ckpt.pt'), 'init_from'), 'checkpoint'),
                           (lambda: data.load('imagenet', str(tmp_path / 'nowhere'), 32, 8), 'data')]:
            with pytest.raises(SystemExit) as e:
                call()
            err = capsys.readouterr().err
            assert e.value.code == 2 and err.startswith(f"{kind} error: ") and err.count('\n') == 1, err
    finally:
        held.communicate('')

def test_bench_names_a_mistyped_mode_in_one_line():
    p = subprocess.run([sys.executable, 'bench.py', '--mode=atention'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr == "config error: mode='atention' is invalid; valid: attention, train\n"

def test_broken_config_file_is_one_line(tmp_path, capsys):
    cfg = write(tmp_path, "epochs = = 3\n")
    code, err = error_of([cfg], capsys)
    assert code == 2 and len(err) == 1 and cfg in err[0] and 'SyntaxError' in err[0]

@pytest.mark.parametrize('args, words', [
    (['--lrr=0.1'], ["unknown key 'lrr'", 'lr']),
    (['--epochs=2.5'], ['epochs=2.5', 'expected int']),
    (['configs/missing.py'], ['config file not found: configs/missing.py']),
])
def test_train_py_reports_config_errors_in_one_line_without_traceback(args, words):
    """Through train.py itself: exit status 2, a single stderr line, before any data is touched."""
    p = subprocess.run([sys.executable, 'train.py', 'configs/fmnist.py', *args], cwd=ROOT, capture_output=True, text=True)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and 'Traceback' not in p.stderr, p.stderr
    assert all(w in err[0] for w in words), err[0]

def test_every_config_file_is_valid():
    """Each shipped config only sets keys that train.py has, with their types."""
    import ast
    src = open(os.path.join(ROOT, 'train.py')).read().split('# ---')[0]
    keys = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(src).body
            if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and n.targets[0].id != 'config'}
    for name in sorted(os.listdir(os.path.join(ROOT, 'configs'))):
        configure(dict(keys), [os.path.join(ROOT, 'configs', name)])

@pytest.mark.parametrize('script', ['train.py', 'sweep.py', 'bench.py', 'report.py', 'check_gpu.py'])
def test_help_lists_every_setting_with_its_default_and_comment(script):
    p = subprocess.run([sys.executable, script, '--help'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and not p.stderr
    if script == 'train.py':
        assert "--mask_lr_mult=10.0" in p.stdout and "lr multiplier of the mask parameters" in p.stdout
        assert "--grf_coupling='repelling'" in p.stdout and "--attn='softmax'" in p.stdout
        assert "so that a crash in a long epoch loses no more (0 = at epoch ends only)\n" in p.stdout  # a comment of two lines
    if script == 'report.py':
        assert all(f"--{k}" in p.stdout for k in ('no_plots', 'runs', 'out', 'vs', 'walk_error', 'ensembles', 'mask_swap'))
    assert 'python' in p.stdout  # the usage lines of the docstring
    assert not re.findall(r"^  --[A-Z]\w*", p.stdout, re.M)  # a module constant (ROOT) is not a setting

@pytest.mark.parametrize('base, derived, differs', [
    ('fmnist', 'fmnist_strong', {'depth', 'crop_pad', 'flip', 'label_smoothing'}),
    ('inat2021', 'places365', {'dataset', 'published', 'data_dir'})])
def test_a_config_built_on_another_repeats_it_but_for_what_it_says_differs(base, derived, differs, tmp_path, monkeypatch):
    """From any working directory: the base is read from beside the derived config (configurator sets __file__)."""
    monkeypatch.chdir(tmp_path)
    first, second = ({'__file__': os.path.join(ROOT, 'configs', f'{name}.py')} for name in (base, derived))
    for scope in (first, second):
        exec(open(scope['__file__']).read(), scope)
    keys = {k for k in [*first, *second] if not k.startswith('__') and k != 'os'}
    assert {k for k in keys if first.get(k, 'absent') != second.get(k, 'absent')} == differs
    said = open(second['__file__']).read().split(f'# what differs from configs/{base}.py')[1]
    assert all(f"\n{k} = " in said for k in differs)

def test_a_config_built_on_another_loads_through_train_py_from_another_directory(tmp_path):
    """configs/imagenette.py builds on configs/imagenet.py: run from outside the repository, the whole chain loads (the
    run then stops at the data, which is not there, in one line that does not claim ImageNet's 1000 images a class)."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), os.path.join(ROOT, 'configs', 'imagenette.py'),
                        '--data_dir=nowhere', '--device=cpu'], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "override in" in p.stdout and "image_size = 56" in p.stdout and "mask_max_len = 100" in p.stdout, p.stdout
    assert p.returncode != 0 and 'imagenet.py' not in p.stderr and 'nowhere' in p.stderr, p.stderr
    assert p.stderr.startswith('data error: ImageNet at nowhere') and p.stderr.count('\n') == 1 and '1000 each' not in p.stderr
    made = os.listdir(tmp_path / 'out') if (tmp_path / 'out').exists() else []
    assert set(made) <= {'imagenette-softmax'}, made  # not out/imagenet-softmax, where a real ImageNet run goes

def test_the_settings_a_script_declares_are_its_literals_above_its_dashed_line(tmp_path):
    """sweep.py, report.py and bench.py read train.py's settings this way, without running it."""
    script = tmp_path / 'script.py'
    script.write_text("import os\nlr = 1e-3  # a comment\nattn = 'grf'\nsizes = (1, 2)\nnote = '# --- in a string'\n"
                      "# --- below: the script's work\nsteps = 3\n")
    assert declared(str(script)) == {'lr': 1e-3, 'attn': 'grf', 'sizes': (1, 2), 'note': '# --- in a string'}
    assert declared() == declared(os.path.join(ROOT, 'train.py')) and declared()['attn'] == 'softmax'  # by default train.py's
