"""Command-line plumbing shared by the examples: common settings, exit codes, messages.

Exit status (each failure is one line on stderr, and a checkpoint once written is kept):

* 0: done;
* 2: bad input: a setting, the data, the workdir (in use by another run, or holding
  checkpoints of other settings or data), a teacher checkpoint; nothing was written;
* 3: a loss, parameter or result became NaN or infinite;
* 4: a file could not be written (disk full, no permission);
* 5: out of memory;
* 6: another process of a multi-process run stopped (this one stops too, at once);
* 130 / 143: interrupted by SIGINT / SIGTERM, after a checkpoint (rerun with ``--resume``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax

from kdvae import config, train
from kdvae import data as kdata

EXIT_USAGE, EXIT_NONFINITE, EXIT_WRITE, EXIT_MEMORY, EXIT_PEER = config.EXIT_USAGE, 3, 4, 5, 6
MAX_SEED = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Common(config.Settings):
    """The settings every example has: data, outputs, seed, resume."""

    dataset: str = config.setting("mnist", ", ".join(kdata.KNOWN_DATASETS))
    data_dir: str | None = config.setting(
        None,
        "offline: a folder of the four MNIST-format IDX files",
        check=config.NON_EMPTY,
        training=False,
    )
    workdir: str = config.setting(
        "runs/run", "where outputs and checkpoints go", check=config.NON_EMPTY, training=False
    )
    seed: int = config.setting(
        0, "the random seed of the whole run", check=config.between(0, MAX_SEED)
    )
    resume: bool = config.setting(False, "continue from the last checkpoint", training=False)
    progress: bool = config.setting(True, "progress bars", training=False)
    figures: bool = config.setting(
        True, "write the figures (PNG) beside results.json", training=False
    )
    distributed: bool = config.setting(
        False,
        "multi-host: call jax.distributed.initialize() first (README, Scaling out)",
        training=False,
    )
    dtype: str = config.setting(
        "float32",
        "activations and matmuls in float32, or bfloat16 (mixed precision: parameters, "
        "optimizer and loss math stay float32)",
        choices=("float32", "bfloat16"),
        legacy="float32",
    )
    # The validation hold-out (the last N training rows): small for tests' tiny data.
    val_size: int = config.setting(
        5000, "validation examples", check=config.between(1, 10**7), hidden=True
    )


def setup(distributed: bool = False) -> None:
    """Process-wide settings: host memory reuse, the compilation cache, multi-host start-up.

    With ``distributed``, ``jax.distributed.initialize()`` joins the job: on SLURM,
    Open MPI or Cloud TPU it finds its peers itself; elsewhere set
    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``KDVAE_NUM_PROCESSES`` and
    ``KDVAE_PROCESS_ID``. Call it before JAX's first computation.
    """
    train.keep_freed_host_memory()
    if distributed:
        count, index = _env_int("KDVAE_NUM_PROCESSES", 1), _env_int("KDVAE_PROCESS_ID", 0)
        if count is not None and index is not None and not index < count:
            raise train.ConfigError(
                f"--distributed: KDVAE_PROCESS_ID={index} must be below "
                f"KDVAE_NUM_PROCESSES={count}."
            )
        if jax.config.jax_cpu_collectives_implementation in (None, "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes
        try:
            jax.distributed.initialize(
                coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                num_processes=count,
                process_id=index,
            )
        except (ValueError, RuntimeError) as err:  # no cluster found, or none reachable
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise train.ConfigError(
                f"--distributed: jax.distributed.initialize() failed ({first}); outside SLURM, "
                "Open MPI or Cloud TPU set JAX_COORDINATOR_ADDRESS, KDVAE_NUM_PROCESSES and "
                "KDVAE_PROCESS_ID (README, Scaling out)."
            ) from err
    train.enable_compilation_cache()


def _env_int(name: str, low: int) -> int | None:
    """The environment variable ``name`` as an int ``>= low``; ``None`` when unset."""
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise train.ConfigError(f"--distributed: {name} must be an integer >= {low}, got {text!r}.")
    return value


def _cannot_write(folder: Path) -> str | None:
    """Why no file can be created in ``folder``, or ``None``. Tried for real (permission
    bits do not stop root; a read-only mount or a pseudo file system does), leaving no
    trace: the probe file goes, and the folder's times are set back."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied"
    times = folder.stat()
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".kdvae-probe-")
    except OSError as err:
        return err.strerror or type(err).__name__
    os.close(fd)
    os.unlink(probe)
    os.utime(folder, ns=(times.st_atime_ns, times.st_mtime_ns))
    return None


def check_workdir(workdir: Path, stages: Sequence[str], resume: bool) -> None:
    """Refuse a workdir that cannot be written, or whose checkpoints a fresh run would
    overwrite (a good checkpoint is never replaced without ``--resume``)."""
    if workdir.exists() and not workdir.is_dir():
        raise train.ConfigError(f"--workdir {workdir} exists and is not a folder.")
    ancestor = workdir
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise train.ConfigError(
            f"--workdir {workdir} cannot be created: {ancestor} is a file, not a folder."
        )
    reason = _cannot_write(ancestor)
    if reason:
        raise train.ConfigError(f"--workdir {workdir} is not writable ({ancestor}: {reason}).")
    used_any = any(
        (workdir / s / "checkpoints").is_dir() and any((workdir / s / "checkpoints").iterdir())
        for s in stages
    )
    if resume and not used_any:
        train.notice(f"--resume: {workdir} holds no checkpoint yet; starting afresh.")
    if not resume:
        used = [
            s
            for s in stages
            if (workdir / s / "checkpoints").is_dir()
            and any((workdir / s / "checkpoints").iterdir())
        ]
        if used:
            raise train.ConfigError(
                f"--workdir {workdir} holds checkpoints of an earlier run ({', '.join(used)}); "
                "pass --resume to continue it, or choose another --workdir."
            )


def _interrupt_now(signum, frame):
    name = signal.Signals(signum).name
    raise train.Interrupted(
        f"{name} outside a training loop; every checkpoint written so far is complete.", name
    )


def _one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _out_of_memory(err: Exception) -> bool:
    """A host allocation failure, or XLA's (``RESOURCE_EXHAUSTED``) on any device."""
    return isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err)


#: Words of the errors that a collective (Gloo, NCCL) or JAX's coordination service raises
#: when a process of the run is gone.
_PEER_LOST = ("Gloo", "NCCL", "Connection closed by peer", "Connection reset by peer",
              "coordination service", "heartbeat")  # fmt: skip


def _lost_peer(err: BaseException) -> BaseException | None:
    """The error in ``err``'s chain that says another process is gone, in a
    multi-process run; else ``None``."""
    if jax.process_count() < 2:
        return None
    while err is not None:
        if any(word in str(err) for word in _PEER_LOST):
            return err
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def _stop_when_a_peer_is_lost(prog: str) -> Iterator[None]:
    """Exit 6 at once when another process of a multi-process run is gone.

    ``os._exit``: a normal exit would run ``jax.distributed.shutdown``, whose barrier
    waits for the lost process until the heartbeat times out (~100 s), then aborts.
    """
    try:
        yield
    except Exception as err:
        cause = _lost_peer(err)
        if cause is None:
            raise
        print(
            f"{prog}: error: another process of this {jax.process_count()}-process run "
            f"stopped ({_one_line(cause)}); this one stops too. The checkpoints written "
            "before are kept: start every process again with --resume.",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_PEER)


@contextlib.contextmanager
def errors_exit() -> Iterator[None]:
    """Turn the expected failures into one line on stderr and an exit status.

    SIGINT and SIGTERM also end the run with 130 and 143 and the command that resumes
    it: inside :func:`kdvae.train.fit` after the current step and a checkpoint, anywhere
    else (loading data, between stages, final evaluation) at once.
    """
    prog = os.path.basename(sys.argv[0])
    previous = {s: signal.signal(s, _interrupt_now) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with _stop_when_a_peer_is_lost(prog):
            yield
    except (kdata.DataError, train.ConfigError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except train.NonFiniteError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    except (train.WriteError, OSError) as err:
        print(
            f"{prog}: error: {_one_line(err)}; the checkpoints written before are kept.",
            file=sys.stderr,
        )
        sys.exit(EXIT_WRITE)
    except Exception as err:
        if not _out_of_memory(err):
            raise
        print(
            f"{prog}: error: out of memory ({_one_line(err)}); lower --batch-size or the "
            "settings that size a step. The checkpoints written before are kept.",
            file=sys.stderr,
        )
        sys.exit(EXIT_MEMORY)
    except train.Interrupted as err:
        command = shlex.join([sys.executable, *sys.argv])
        if "--resume" not in sys.argv:
            command += " --resume"
        print(f"{prog}: {err}\nTo continue: {command}", file=sys.stderr)
        sys.exit(130 if err.signal == "SIGINT" else 143)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
