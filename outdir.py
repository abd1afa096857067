"""
A run's folder (train.py's out_dir) and the files in it: one run owns it at a time (out_dir/lock), a run from scratch
never overwrites a run (its ckpt.pt), ckpt.pt is replaced atomically and a damaged one is named in one line, and
metrics.jsonl is cut back to where a resumed run starts. Every failure is one line on stderr (configurator.fail, of
kind out_dir or checkpoint).
"""
import atexit
import fcntl
import json
import os
import socket
import time
from contextlib import suppress

import torch

from configurator import fail

_held = {}  # out_dir: the descriptor of its locked lock file, for as long as this process holds it

def claim(out_dir, resume):
    """Make out_dir and take its lock; unless resuming, refuse a folder that holds a run. A folder this made that holds
    nothing but its lock when the process exits (the data was missing, say) is removed, with the folders made for it."""
    made, path = [], os.path.abspath(out_dir)
    while not os.path.isdir(path):  # out_dir and each parent that makedirs will make, deepest first
        made, path = made + [path], os.path.dirname(path)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        fail(f"out_dir={out_dir!r} cannot be made: {e}", kind='out_dir')
    take_lock(out_dir)
    if made:
        atexit.register(remove_if_unused, out_dir, made)
    if not resume and os.path.exists(os.path.join(out_dir, 'ckpt.pt')):
        release(out_dir)
        fail(f"{out_dir} holds a run (its ckpt.pt): continue it with --init_from=resume, or train into another "
             f"--out_dir (or remove {out_dir} first)", kind='out_dir')

def take_lock(out_dir):
    """Hold an exclusive flock on out_dir/lock for the life of this process, the file holding 'host pid' for the message
    of a run refused. The OS releases the lock however the process ends (SIGKILL included): a folder left by a dead
    run is free at once, and of two runs started together exactly one gets it. The file stays: removing it would let a
    third run lock a new file while a second still locks the old one."""
    path = os.path.join(out_dir, 'lock')
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"out_dir {out_dir} is in use by {held_by(path)} (it holds {path}); let that run end, or train into another "
             "--out_dir", kind='out_dir')
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
    _held[out_dir] = fd  # open until the process ends, or release()

def release(out_dir):
    """Give out_dir back before this process ends (a DataLoader worker forked with the lock's file would hold it on)."""
    with suppress(KeyError):
        fcntl.flock(_held.pop(out_dir), fcntl.LOCK_UN)

def remove_if_unused(out_dir, made):
    """If this process still holds out_dir and it holds only its lock: the lock file (while held), then the folders in
    made (out_dir, then its parents made with it) that are empty."""
    with suppress(OSError):
        if out_dir in _held and os.listdir(out_dir) == ['lock']:
            os.unlink(os.path.join(out_dir, 'lock'))
            for path in made:
                os.rmdir(path)  # OSError: not empty (another run's folder inside), and the ones above stay

def holder(out_dir):
    """'pid P on HOST' of the run that holds out_dir's lock, or None: no lock file, or no process holds its flock."""
    path = os.path.join(out_dir, 'lock')
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken (and given back at once) only if no run holds it
        return None
    except BlockingIOError:
        return held_by(path)
    finally:
        os.close(fd)

def held_by(path):
    """'pid P on HOST' from a held lock file. Its holder writes it just after locking it: an empty file is read again for
    up to a second before the run is called 'a run starting'."""
    for _ in range(50):
        host, _, pid = open(path).read().strip().partition(' ')
        if pid:
            return f"pid {pid} on {host}"
        time.sleep(0.02)
    return "a run starting"

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
    """torch.save to a temp file, fsync'ed, renamed over path: the old checkpoint stays intact until the new one is whole
    on disk (a crash of the machine after the rename cannot leave a ckpt.pt whose data never reached the disk)."""
    torch.save(ckpt, path + '.tmp')
    with open(path + '.tmp', 'rb+') as f:
        os.fsync(f.fileno())
    os.replace(path + '.tmp', path)

def keep_metrics(path, kept):
    """Rewrite the metrics log at path with the records kept(record) holds for; a line cut short by a crash goes."""
    lines = open(path).readlines() if os.path.exists(path) else []
    with open(path + '.tmp', 'w') as f:
        f.writelines(l for l in lines if l.endswith('\n') and kept(json.loads(l)))
    os.replace(path + '.tmp', path)
