"""
A run's folder (train.py's out_dir) and the files in it: one run owns it at a time (out_dir/lock), a run from scratch
never overwrites a run (its ckpt.pt), ckpt.pt is replaced atomically and a damaged one is named in one line, and
metrics.jsonl is cut back to where a resumed run starts. Every failure is one line on stderr (configurator.fail, of
kind out_dir or checkpoint).
"""
import atexit
import json
import os
import socket
from contextlib import suppress

import torch

from configurator import fail

def claim(out_dir, resume):
    """Make out_dir and take its lock; unless resuming, refuse a folder that holds a run."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        fail(f"out_dir={out_dir!r} cannot be made: {e}", kind='out_dir')
    take_lock(out_dir)
    if not resume and os.path.exists(os.path.join(out_dir, 'ckpt.pt')):
        fail(f"{out_dir} holds a run (its ckpt.pt): continue it with --init_from=resume, or train into another "
             f"--out_dir (or remove {out_dir} first)", kind='out_dir')

def take_lock(out_dir):
    """Create out_dir/lock exclusively, holding 'host pid', and remove it at exit. If it is there, fail naming its holder,
    unless that pid is gone from this host (a run killed by SIGKILL): then take it over."""
    path = os.path.join(out_dir, 'lock')
    me = f"{socket.gethostname()} {os.getpid()}"
    while True:
        with suppress(FileExistsError):
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, me.encode())
            os.close(fd)
            atexit.register(lambda: os.path.exists(path) and os.remove(path))
            return
        with suppress(FileNotFoundError):  # gone meanwhile: try again
            who = holder(out_dir)
            if who and who != f"pid {os.getpid()} on {socket.gethostname()}":
                fail(f"out_dir {out_dir} is in use by {who}; let that run end, or remove {path} if it has", kind='out_dir')
            os.remove(path)  # its run is gone: take it over

def holder(out_dir):
    """'pid P on HOST' of the run that holds out_dir's lock, or None: no lock, or its pid is gone from this host."""
    with suppress(FileNotFoundError):
        host, _, pid = open(os.path.join(out_dir, 'lock')).read().strip().partition(' ')
        if host != socket.gethostname() or not pid.isdigit() or pid_alive(int(pid)):
            return f"pid {pid or '?'} on {host or '?'}"
    return None

def pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process is there
    except OSError as e:
        return isinstance(e, PermissionError)  # there, but another user's
    return True

def read_checkpoint(path, what, convert=lambda ckpt: ckpt):
    """convert(the checkpoint at path), or one line: no checkpoint there (what: the setting that named it), or damaged."""
    if not os.path.isfile(path):
        fail(f"{what}: no checkpoint at {path}", kind='checkpoint')
    try:
        return convert(torch.load(path, map_location='cpu', weights_only=False))
    except Exception as e:
        tmp = f"; {path}.tmp is a save that was cut short, not a checkpoint" if os.path.exists(path + '.tmp') else ''
        fail(f"{path} is damaged: torch cannot read it ({type(e).__name__}){tmp}", kind='checkpoint')

def save_checkpoint(ckpt, path):
    """torch.save to a temp file renamed over path: the old checkpoint stays intact until the new one is whole."""
    torch.save(ckpt, path + '.tmp')
    os.replace(path + '.tmp', path)

def keep_metrics(path, kept):
    """Rewrite the metrics log at path with the records kept(record) holds for; a line cut short by a crash goes."""
    lines = open(path).readlines() if os.path.exists(path) else []
    with open(path + '.tmp', 'w') as f:
        f.writelines(l for l in lines if l.endswith('\n') and kept(json.loads(l)))
    os.replace(path + '.tmp', path)
