"""
A run's folder (train.py's out_dir) and the files in it: one run owns it at a time (out_dir/lock), a run from scratch
never overwrites a run (its ckpt.pt), ckpt.pt is replaced atomically and a damaged one is named in one line, and
metrics.jsonl is cut back to where a resumed run starts. Every failure is one line on stderr (configurator.fail, of
kind out_dir or checkpoint). And the run's lifetime, which ends by giving the folder back: the stop signals a
scheduler or a person sends (catch_stop_signals), out_dir/stopped.json for a requeue script, and finish; the random
streams a checkpoint keeps; the run's processes (start_processes) and its arithmetic on the device (precision).
"""
import atexit
import errno
import fcntl
import inspect
import json
import os
import signal
import socket
import sys
import time
from contextlib import nullcontext, suppress

import torch
import torch.distributed as dist

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
    with suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, 'stopped.json'))  # a run resumed is no longer stopped
    if made:
        atexit.register(remove_if_unused, out_dir, made)
    if not resume and os.path.exists(os.path.join(out_dir, 'ckpt.pt')):
        release(out_dir)
        fail(f"{out_dir} holds a run (its ckpt.pt): continue it with --init_from=resume, or train into another "
             f"--out_dir (or remove {out_dir} first)", kind='out_dir')

def take_lock(out_dir):
    """Hold an exclusive POSIX lock (lockf) on out_dir/lock for the life of this process, the file holding 'host pid' for
    the message of a run refused. The OS releases it however the process ends (SIGKILL included), and a forked child
    (a DataLoader worker) never holds it: a folder left by a dead run is free at once, and of two runs started together
    exactly one gets it. A lock file removed (remove_if_unused) between another starter's open and its lock leaves that
    starter holding a file no longer there: it sees so, and locks the file at the path again.
    (A POSIX lock also ends when this process closes any descriptor of the file: nothing here opens it again.)"""
    path = os.path.join(out_dir, 'lock')
    while True:
        with suppress(FileNotFoundError):  # the folder removed meanwhile: made again
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                fail(f"out_dir {out_dir} is in use by {held_by(path)} (it holds {path}); let that run end, or train into "
                     "another --out_dir", kind='out_dir')
            with suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            os.close(fd)
        os.makedirs(out_dir, exist_ok=True)
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
    _held[out_dir] = fd  # open until the process ends, or release()

def release(out_dir):
    """Give out_dir back before this process ends."""
    with suppress(KeyError):
        os.close(_held.pop(out_dir))

def remove_if_unused(out_dir, made):
    """If this process still holds out_dir and it holds only its lock: the lock file (while held: a starter that opened
    it meanwhile sees it gone, take_lock), then the folders in made (out_dir, then its parents made with it) that are empty."""
    with suppress(OSError):
        if out_dir in _held and os.listdir(out_dir) == ['lock']:
            os.unlink(os.path.join(out_dir, 'lock'))
            for path in made:
                os.rmdir(path)  # OSError: not empty (another run's folder inside), and the ones above stay

def holder(out_dir):
    """'pid P on HOST' of the run that holds out_dir's lock, or None: no lock file, or no process holds its lock."""
    path = os.path.join(out_dir, 'lock')
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken (and given back at once) only if no run holds it
        return None
    except OSError:
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

def random_states(device_type, ddp, **extra):
    """This process's random streams (torch's, and CUDA's on a GPU: dropout, mixup) with extra, in a list of every rank's
    (under DDP gathered, a collective), so that a run resumed on the same world size draws what it would have drawn."""
    rng = {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None, **extra}
    if not ddp:
        return [rng]
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng)
    return rngs

def restore_random_state(rngs, rank, world, device_type, reseed):
    """Set this rank's streams from random_states()'s list and return its entry. Saved on another world size, no entry is
    this rank's: torch's stream is seeded with reseed instead (dropout and mixup draw anew) and {} returned."""
    if len(rngs) != world:
        torch.manual_seed(reseed)
        if rank == 0:
            print(f"resuming on {world} ranks from {len(rngs)}: dropout and mixup streams restart from the seed")
        return {}
    torch.set_rng_state(rngs[rank]['torch'])
    if rngs[rank]['cuda'] is not None and device_type == 'cuda':
        torch.cuda.set_rng_state(rngs[rank]['cuda'])
    return rngs[rank]

def write_json(path, obj):
    """obj at path as indented JSON: result.json, eval.json, stopped.json."""
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2)

def keep_metrics(path, kept):
    """Rewrite the metrics log at path with the records kept(record) holds for; a line cut short by a crash goes."""
    lines = open(path).readlines() if os.path.exists(path) else []
    with open(path + '.tmp', 'w') as f:
        f.writelines(l for l in lines if l.endswith('\n') and kept(json.loads(l)))
    os.replace(path + '.tmp', path)

_stop = {'signal': 0, 'time': 0.0, 'at_once': None}  # the stop signal had, when, and what ends the run at once

def catch_stop_signals(at_once=None):
    """SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) asks the run to stop: after its optimizer step, saved
    (stop_signal()), or at once during start-up and evaluation (stop_at_once(end): end(signum), nothing unsaved then;
    at_once: the end from now on). SIGTERMs within a second of the first are one (Slurm and torchrun each send one); a
    later one, or a second SIGINT, ends the run at once."""
    stop_at_once(at_once)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_stop_signal)

def _on_stop_signal(signum, frame):
    now = time.monotonic()
    if _stop['signal']:
        if signum == signal.SIGTERM and now - _stop['time'] < 1:
            return
        signal.signal(signum, signal.SIG_DFL)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)
    _stop.update(signal=signum, time=now)
    if _stop['at_once']:
        _stop['at_once'](signum)

def stop_signal(group=None):
    """The stop signal this process has had, or 0; with a process group, the highest any of its ranks has had."""
    signum = torch.tensor(_stop['signal'])
    if group is not None:
        dist.all_reduce(signum, op=dist.ReduceOp.MAX, group=group)
    return int(signum)

def stop_at_once(end):
    """From now on a stop signal calls end(signum) at once (None: it waits for stop_signal() to be read); one had
    already calls it now."""
    _stop['at_once'] = end
    if end and _stop['signal']:
        end(_stop['signal'])

def stopped(out_dir, signum, step, ddp, write, exit=False):
    """Say how a run stopped by signum continues from its checkpoint of step (None: none yet): if write (rank 0 of a
    training), on stderr and in out_dir/stopped.json for a requeue script (torchrun's exit status is 1, not 128 + signum).
    exit: then end the process at once, as that signal's kill does (nothing unsaved: start-up or an evaluation)."""
    args = [a for a in sys.argv[1:] if not a.startswith('--init_from=')] + ['--init_from=resume'] if step is not None else sys.argv[1:]
    again = ('torchrun <the same options> ' if ddp else 'python ') + ' '.join([sys.argv[0], *args])
    if write:
        write_json(os.path.join(out_dir, 'stopped.json'), {'signal': signal.Signals(signum).name, 'step': step, 'resume': again})
        print(f"stopped by {signal.Signals(signum).name} " + (f"at step {step}, saved in {out_dir}/ckpt.pt; resume with: "
              if step is not None else "before a checkpoint was saved; start again with: ") + again, file=sys.stderr)
    if exit:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(128 + signum)

def finish(out_dir, status, ddp=False, drop=lambda: None):
    """Every way out that all ranks take together: out_dir given back, the process group torn down in order, exit.
    drop(): forget what holds the process group (DDP), so that destroy joins gloo's threads, which would otherwise
    outlive the interpreter and abort the process at exit (SIGABRT); after a barrier, with no collective in flight."""
    release(out_dir)
    if ddp:
        dist.barrier()
        drop()
        dist.destroy_process_group()
    sys.exit(status)

# the run's processes and its arithmetic on the device

def start_processes(device):
    """(ddp, rank, local_rank, world, device, cpu_group) of this process: torchrun's (RANK set) or a lone one's. device 'auto'
    is cuda, mps or cpu; under DDP each rank takes its GPU, the process group starts (finish ends it) and a gloo group
    carries stop_signal's flag, off the device."""
    ddp = 'RANK' in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) if ddp else (0, 0, 1)
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if ddp and device == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    return ddp, rank, local_rank, world, device, dist.new_group(backend='gloo') if ddp else None

def amp_dtype(device_type):
    """The dtype to train in: bf16 on a CUDA GPU that computes it natively (Ampere on), fp16 (with a loss scaler)
    on older GPUs, which report bf16 as supported only by emulation; float32 on CPU and MPS."""
    if device_type != 'cuda':
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16

def ddp_no_buffer_sync():
    """DDP's keyword that stops its buffer broadcast before every forward, which the walks and W powers do not
    need (they are identical on every rank by construction): forward_sync_buffers from torch 2.13 on."""
    new = 'forward_sync_buffers' in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {'forward_sync_buffers' if new else 'broadcast_buffers': False}

def precision(device_type):
    """(dtype, autocast context, loss scaler) of a run on device_type: amp_dtype's, with TF32 matmuls on CUDA."""
    dtype = amp_dtype(device_type)
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast('cuda', dtype=dtype) if dtype != torch.float32 else nullcontext()
    return dtype, autocast, torch.amp.GradScaler('cuda', enabled=dtype == torch.float16)
