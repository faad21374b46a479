"""The one training core: compiled steps, the epoch loop, sharding, checkpoints.

Every objective (classification, distillation, the VAE's ELBO) plugs into the same
loop as a loss function

    loss_fn(model, batch, key, context) -> (scalar loss, {name: scalar metric})

where ``batch`` is a dict of arrays gathered from the device-resident dataset, ``key`` a
PRNG key unique to the step, and ``context`` a pytree of extra inputs that are not
trained (a frozen teacher's state, the epoch for a KL warm-up).

Design:

* One ``jax.jit`` region per step: gather the batch on the device, forward pass,
  ``value_and_grad``, optimizer update, weight constraint, metric sums. The model and
  optimizer travel as ``nnx.State`` (the functional ``split``/``merge`` pattern), with
  their buffers donated.
* The dataset lives on the device. Epoch ``e`` visits the training rows in the order
  ``permutation(fold_in(key(seed), e))``, dropping the last partial batch, and step
  ``i`` of it uses ``fold_in(fold_in(key(seed + 1), e), i)``: any step can be replayed,
  which is what makes ``resume`` exact.
* The batch axis is sharded over every device of a 1-D mesh named ``"data"``;
  parameters and the dataset are replicated. On one device this is a no-op; with
  several it is data-parallel (XLA inserts the gradient all-reduce).
* The loop is :func:`fit`: a :class:`Loop` (epochs, batch size, seed, best-epoch
  metric) run over the data, reporting to a :class:`Stage` (name, checkpoints, metrics
  log, stored config). Its position is one value, :class:`LoopState` (epoch, step,
  metric sums, history, best model), saved and restored together. :func:`run_epoch`
  runs the steps of one epoch; small pieces around it check for non-finite losses and
  show progress every few steps (``_Watch``), record the epoch (``_record``), write the
  checkpoint (``_save``) and stop on a signal (:func:`stop_on_signals`).
* Orbax checkpoints, written atomically at the end of every epoch (and on SIGINT or
  SIGTERM mid-epoch), hold the model and optimizer state, the best model so far, and
  the loop's position as JSON. A non-finite loss or parameter stops the run *before*
  anything is written, so the last good checkpoint survives.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdvae.config import ConfigError

__all__ = [
    "Checkpointer",
    "ConfigError",
    "ConfigMismatchError",
    "Loop",
    "LoopState",
    "Interrupted",
    "MetricsLog",
    "NonFiniteError",
    "Stage",
    "Trainer",
    "WorkdirBusy",
    "WriteError",
    "check_finite_results",
    "check_resumable",
    "claim_workdir",
    "batched_apply",
    "data_mesh",
    "enable_compilation_cache",
    "fit",
    "keep_freed_host_memory",
    "run_epoch",
    "stop_on_signals",
    "write_json",
]

LossFn = Callable[[nnx.Module, dict[str, jax.Array], jax.Array, Any], tuple[jax.Array, dict]]


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or parameter; nothing was saved after it."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; a checkpoint of the current step was written.

    ``signal`` names it (``"SIGINT"`` or ``"SIGTERM"``). Like ``KeyboardInterrupt`` it
    is not an ``Exception``, so no library's ``except Exception`` swallows it.
    """

    def __init__(self, message: str, signal: str = "SIGINT"):
        super().__init__(message)
        self.signal = signal


class WriteError(RuntimeError):
    """A file could not be written (disk full, no permission); says what and where.

    ``reason`` is the underlying error in one line. Whatever was saved before is kept.
    """

    def __init__(self, what: str, err: BaseException):
        reason = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [""])[0]
        super().__init__(f"{what}: {reason[:200] or type(err).__name__}")


def notice(message: str) -> None:
    """One line on stderr that the run goes on despite something the user should know."""
    print(f"note: {message}", file=sys.stderr, flush=True)


class ConfigMismatchError(ConfigError):
    """A checkpoint was written by a run with another configuration."""


# ------------------------------------------------------------------ devices, caching


def enable_compilation_cache(path: str | os.PathLike | None = None) -> None:
    """Turn on JAX's persistent compilation cache (default ``~/.cache/kdvae/jax``).

    The second run of a program then skips XLA compilation of every step it has seen.
    Effective even when called after JAX has compiled something in this process.
    """
    from jax.experimental.compilation_cache import compilation_cache

    path = path or os.environ.get("KDVAE_CACHE_DIR") or Path.home() / ".cache" / "kdvae" / "jax"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX decides once per process, at the first compilation, whether to use the cache;
    # without a reset a later call would silently change nothing.
    compilation_cache.reset_cache()


# glibc's mallopt options (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_host_memory() -> bool:
    """On a CPU-only run under glibc, have freed memory reused instead of unmapped.

    XLA's CPU client allocates each step's scratch buffer afresh (84 MB for the CNN
    teacher at batch 128). glibc serves a block over 32 MB (the most its dynamic
    threshold reaches) with ``mmap`` and unmaps it when freed, and a worker thread's own
    arena does so for any block over 64 MB whatever the settings, so every step
    page-faults it all in again (20,500 faults at batch 128). One malloc arena, no
    ``mmap``-ed blocks and no trimming (``mallopt``) let the next step reuse the same
    memory (most steps: glibc 2.36 still strands a freed aligned block now and then):
    the CNN teacher's step took 50 instead of 86-93 ms at batch 128 (2-core AMD EPYC;
    README, Speed). The process then holds its peak heap until it exits.

    Process-wide; call it before JAX's first computation (:func:`kdvae.cli.setup`
    does). Returns whether it was applied. It is not: where a JAX platform other than
    the CPU is possible (``JAX_PLATFORMS`` names another, or it is unset and a GPU or
    TPU plugin is installed: measured on CPUs only); off glibc; once JAX has started a
    backend (its threads keep their arenas); and where the environment already chooses
    the allocator (``LD_PRELOAD``, ``GLIBC_TUNABLES``, ``MALLOC_ARENA_MAX``, ... : the
    way to opt out, e.g. ``MALLOC_ARENA_MAX=8``).
    """
    if (
        not _cpu_only()
        or sys.platform != "linux"
        or platform.libc_ver()[0] != "glibc"
        or _backend_started()
        or any(map(_chooses_allocator, os.environ))
    ):
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's C library
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    applied = [mallopt(option, value) == 1 for option, value in settings]  # all three
    return all(applied)


def _chooses_allocator(variable: str) -> bool:
    """Whether the environment variable ``variable`` chooses or tunes the C allocator."""
    return variable in ("LD_PRELOAD", "GLIBC_TUNABLES") or variable.startswith("MALLOC_")


def _cpu_only() -> bool:
    """Whether JAX can only run on the CPU here, judged before it starts a backend."""
    platforms = jax.config.jax_platforms
    if platforms:
        return all(name.strip().lower() == "cpu" for name in platforms.split(","))
    return not (
        importlib.metadata.entry_points(group="jax_plugins")
        or importlib.util.find_spec("jax_plugins")
        or importlib.util.find_spec("libtpu")
    )


def _backend_started() -> bool:
    """Whether JAX has started a backend (and its threads) in this process."""
    from jax._src import xla_bridge  # no public API says so

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return started is None or started()


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over all devices (of every host), axis ``"data"``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """Place a host array (the same on every process) onto ``sharding``; multi-host safe."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copy every array of ``tree`` onto every device of ``mesh``."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x):
        return jax.device_put(x, sharding) if isinstance(x, jax.Array) else _put(x, sharding)

    return jax.tree.map(put, tree)


def check_batch_size(batch_size: int, num_examples: int, mesh: Mesh) -> None:
    """``ValueError`` unless ``batch_size`` splits over the devices and fits the data."""
    devices = mesh.devices.size
    if batch_size < 1 or batch_size % devices:
        raise ConfigError(
            f"batch size {batch_size} must be a positive multiple of the device count "
            f"({devices}): each device takes batch_size / {devices} examples."
        )
    if batch_size > num_examples:
        raise ConfigError(
            f"batch size {batch_size} is larger than the training set ({num_examples} examples)."
        )


# ------------------------------------------------------------------------ the step


class Trainer:
    """A model, its optimizer and the compiled train step, in split (functional) form.

    The state lives in ``leaves`` (its arrays, as the step takes and returns them);
    ``state`` is the same as an ``nnx.State``.

    Args:
      model: the NNX module to train (it may define ``constrain()``, called after each
        update, e.g. a max-norm projection).
      tx: the optax transformation.
      loss_fn: ``(model, batch, key, context) -> (loss, metrics)``.
      mesh: devices to shard the batch over; default all devices.
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        loss_fn: LossFn,
        *,
        mesh: Mesh | None = None,
    ):
        self.mesh = mesh or data_mesh()
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        self.graphdef, state = nnx.split((model, optimizer))
        self._treedef = jax.tree.structure(state)
        self.state = replicate(state, self.mesh)
        self.loss_fn = loss_fn
        # ``step`` may be wrapped (tests, fault injection); ``compiled_step`` is the jit.
        self.compiled_step = jax.jit(self._make_step(), donate_argnums=(0, 1))
        self.step = self.compiled_step

    @property
    def state(self) -> nnx.State:
        """The model's and the optimizer's state (kept as :attr:`leaves`)."""
        return jax.tree.unflatten(self._treedef, self.leaves)

    @state.setter
    def state(self, state: nnx.State) -> None:
        leaves, treedef = jax.tree.flatten(state)
        if treedef != self._treedef:
            raise ValueError(f"state: expected the structure {self._treedef}, got {treedef}")
        self.leaves = leaves

    def _make_step(self):
        """``step(leaves, sums, data, order, index, epoch_key, context)``: the state goes
        in and out as its list of arrays, whose flattening costs a jit call far less
        than an ``nnx.State``'s (~5 us, not ~100 us, per call on a 2-core CPU)."""
        graphdef, treedef, loss_fn = self.graphdef, self._treedef, self.loss_fn
        batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))

        def step(leaves, sums, data, order, index, epoch_key, context):
            model, optimizer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            rows = jax.lax.with_sharding_constraint(order[index], batch_sharding)
            batch = {
                name: jax.lax.with_sharding_constraint(array[rows], batch_sharding)
                for name, array in data.items()
            }
            key = jax.random.fold_in(epoch_key, index)

            def loss(model):
                return loss_fn(model, batch, key, context)

            (value, metrics), grads = nnx.value_and_grad(loss, has_aux=True)(model)
            optimizer.update(model, grads)
            if hasattr(model, "constrain"):
                model.constrain()
            metrics = {"loss": value, **metrics}
            sums = {k: sums[k] + metrics[k].astype(jnp.float32) for k in sums}
            return jax.tree.leaves(nnx.state((model, optimizer))), sums, value

        return step

    @property
    def model(self) -> nnx.Module:
        """The current model (a fresh view of the trained state)."""
        return nnx.merge(self.graphdef, self.state)[0]

    def model_state(self) -> nnx.State:
        """The model's part of the state (without the optimizer)."""
        return nnx.state(self.model)

    def best_model(self, fitted: LoopState) -> nnx.Module:
        """The model at the best epoch of a :func:`fit`."""
        return nnx.merge(nnx.graphdef(self.model), fitted.best_state)

    def metric_sums(self, values: Mapping[str, float]) -> dict[str, jax.Array]:
        """The step's running metric sums, float32 scalars placed as the step returns them.

        Placed on the mesh (replicated): unplaced scalars would be another input
        signature than the step's own outputs, and the second step would compile again.
        """
        return replicate({k: np.float32(v) for k, v in values.items()}, self.mesh)

    def metric_names(self, data: Mapping[str, jax.Array], context: Any) -> tuple[str, ...]:
        """Names of the metrics the step reports (shape-only evaluation, no compute)."""
        model = self.model
        batch = {k: jax.ShapeDtypeStruct((2, *v.shape[1:]), v.dtype) for k, v in data.items()}
        out = nnx.eval_shape(
            lambda m, b: self.loss_fn(m, b, jax.random.key(0), context), model, batch
        )
        return ("loss", *out[1].keys())


def batched_apply(
    fn: Callable[..., Any], x: jax.Array, *, batch_size: int = 1000, with_index: bool = False
) -> Any:
    """``fn`` over ``x`` in chunks of ``batch_size`` rows (a ``lax.map``), concatenated.

    ``x`` is padded to a multiple of ``batch_size`` and the padding dropped again, so
    any ``N`` works; call it inside ``jax.jit``. With ``with_index``, ``fn(chunk, i)``
    also gets the chunk's number ``i`` (e.g. to ``fold_in`` a PRNG key per chunk).
    """
    n = x.shape[0]
    batch_size = max(1, min(batch_size, n))  # n = 0: zero chunks, an empty result
    chunks = -(-n // batch_size)
    padded = jnp.pad(x, [(0, chunks * batch_size - n)] + [(0, 0)] * (x.ndim - 1))
    padded = padded.reshape(chunks, batch_size, *x.shape[1:])
    if with_index:
        out = jax.lax.map(lambda args: fn(*args), (padded, jnp.arange(chunks)))
    else:
        out = jax.lax.map(fn, padded)
    return jax.tree.map(lambda y: y.reshape(chunks * batch_size, *y.shape[2:])[:n], out)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


# ------------------------------------------------------------------------ checkpoints


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def _flatten(tree: Mapping) -> dict[str, Any]:
    """``{"layers/0/kernel": array}`` from a nested pure dict (string keys for orbax)."""
    return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten_like(template: Mapping, flat: Mapping[str, Any]) -> Any:
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[_path_name(path)] for path, _ in paths])


_FINGERPRINT = "kdvae_fingerprint.json"


def _file_hashes(step_dir: Path) -> dict[str, str]:
    """sha256 of every file under ``step_dir`` (relative path -> hex), its fingerprint aside."""
    return {
        str(path.relative_to(step_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(step_dir.rglob("*"))
        if path.is_file() and path.name != _FINGERPRINT
    }


def _damage(step_dir: Path) -> str | None:
    """Why the checkpoint in ``step_dir`` cannot be trusted, or ``None`` if it is whole."""
    try:
        expected = json.loads((step_dir / _FINGERPRINT).read_text())["files"]
    except FileNotFoundError:
        return "no fingerprint (an unfinished save, or an older kdvae's)"
    except (OSError, ValueError, KeyError, TypeError):
        return "its fingerprint is unreadable"
    found = _file_hashes(step_dir)
    for name in sorted(set(expected) | set(found)):
        if name not in found:
            return f"{name} is missing"
        if name not in expected:
            return f"{name} was not part of it"
        if found[name] != expected[name]:
            return f"{name} has changed"
    return None


class Checkpointer:
    """Atomic, fingerprinted orbax checkpoints of one training stage, in ``directory``.

    Each checkpoint holds ``state`` (model + optimizer), ``best`` (the model at the best
    validation score so far) and ``meta`` (JSON: position, history, config). Orbax
    writes to a temporary folder and renames it when complete, so a crash mid-write
    leaves the previous checkpoint intact; the two newest are kept. Then the sha256 of
    every file is written beside them, last (``kdvae_fingerprint.json``).

    On opening, a step whose files do not match their fingerprint (damaged, incomplete,
    or saved without one) is reported on stderr in one line and set aside as
    ``<step>.damaged-<time>`` (silently left in place when ``read_only``);
    :meth:`latest_step` is the newest intact step, and :attr:`damaged` says what was
    wrong with the others.
    """

    def __init__(self, directory: str | os.PathLike, *, read_only: bool = False):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.damaged = self._set_aside_damaged(read_only)
        # Orbax logs a warning per read-only setting it adjusts; nothing for a user to do.
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR if read_only else level)
        try:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=2,
                enable_async_checkpointing=False,
                create=not read_only,
                read_only=read_only,
                cleanup_tmp_directories=not read_only,
            )
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "best", "meta")
            )
        finally:
            absl_logger.setLevel(level)

    def _step_dirs(self) -> dict[int, Path]:
        if not self.directory.is_dir():
            return {}
        return {int(p.name): p for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir()}

    def _set_aside_damaged(self, read_only: bool) -> dict[int, str]:
        damaged = {}
        for step, path in sorted(self._step_dirs().items()):
            reason = _damage(path)
            if reason is None:
                continue
            damaged[step] = reason
            if read_only or jax.process_index():  # the caller decides what to say
                continue
            aside = path.with_name(f"{step}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            path.rename(aside)
            notice(
                f"checkpoint step {step} in {self.directory} is not intact: {reason}; "
                f"moved to {aside.name}."
            )
        return damaged

    def latest_step(self) -> int | None:
        """The newest intact step, or ``None``."""
        steps = [s for s in self._step_dirs() if s not in self.damaged]
        return max(steps, default=None)

    def save(self, step: int, state: nnx.State, best: nnx.State, meta: dict) -> None:
        """Write checkpoint ``step``, then its fingerprint. ``WriteError`` if it fails."""
        args = self._ocp.args
        try:
            if step in self.manager.all_steps():
                self.manager.delete(step)  # a replayed step (resume): same contents
            self.manager.save(
                step,
                args=args.Composite(
                    state=args.StandardSave(_flatten(nnx.to_pure_dict(state))),
                    best=args.StandardSave(_flatten(nnx.to_pure_dict(best))),
                    meta=args.JsonSave(meta),
                ),
            )
            self.manager.wait_until_finished()
            if jax.process_index() == 0:
                step_dir = self.directory / str(step)
                write_json(step_dir / _FINGERPRINT, {"step": step, "files": _file_hashes(step_dir)})
        except Exception as err:  # disk full, no permission, ...; signals pass (BaseException)
            raise WriteError(
                f"could not save checkpoint step {step} to {self.directory}", err
            ) from err

    def read_meta(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        args = self._ocp.args
        return self.manager.restore(step, args=args.Composite(meta=args.JsonRestore()))["meta"]

    def restore(
        self, templates: Mapping[str, nnx.State], step: int | None = None
    ) -> tuple[dict[str, nnx.State], dict]:
        """Restore the items named in ``templates`` (``"state"``, ``"best"``) like them."""
        step = self.latest_step() if step is None else step
        args = self._ocp.args

        def target(tmpl: nnx.State):
            return {
                k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                for k, v in _flatten(nnx.to_pure_dict(tmpl)).items()
            }

        restore_args = {name: args.StandardRestore(target(t)) for name, t in templates.items()}
        out = self.manager.restore(
            step, args=args.Composite(meta=args.JsonRestore(), **restore_args)
        )
        states = {}
        for name, tmpl in templates.items():
            pure = _unflatten_like(nnx.to_pure_dict(tmpl), out[name])
            state = jax.tree.map(lambda x: x, tmpl)
            nnx.replace_by_pure_dict(state, pure)
            states[name] = state
        return states, out["meta"]

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------- metrics and signals


class MetricsLog:
    """``metrics.jsonl``: one JSON object per epoch and stage, appended as they finish."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def start(cls, path: str | os.PathLike, *, resume: bool) -> MetricsLog:
        """The run's log, its folder created; a fresh run (not ``resume``) starts it empty."""
        log = cls(path)
        log.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and jax.process_index() == 0:
            log.path.unlink(missing_ok=True)
        return log

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i + 1 < len(lines):
                    raise
                # The last row was cut short by a crash; no checkpoint covers it.
        return rows

    def append(self, row: dict) -> None:
        if jax.process_index() != 0:  # one writer in a multi-host run
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as err:
            raise WriteError(f"could not append to {self.path}", err) from err

    def truncate(self, stage: str, after_epoch: int) -> None:
        """Drop rows of ``stage`` past ``after_epoch`` (written after the last checkpoint)."""
        if jax.process_index() != 0:
            return
        rows = [r for r in self.rows() if r.get("stage") != stage or r["epoch"] <= after_epoch]
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(self.path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise WriteError(f"could not rewrite {self.path}", err) from err


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a temporary file renamed into place).

    Raises ``WriteError`` naming the file when it cannot be written; the old one stays.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2))
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"could not write {path}", err) from err


class WorkdirBusy(ConfigError):
    """Another live process holds the workdir."""


class _WorkdirLock:
    """An advisory lock on ``<workdir>/.lock`` (``flock``): the kernel drops it when the
    process ends, however it ends, so a crash leaves no stale lock. The file holds the
    holder's process id, host and start time, for the message of the next run."""

    def __init__(self, workdir: Path):
        import fcntl
        import socket

        self.file = (workdir / ".lock").open("a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise WorkdirBusy(
                f"--workdir {workdir} is in use by {holder}; wait for that run to end, or "
                "choose another --workdir."
            ) from None
        self.file.seek(0)
        self.file.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        self.file.write(f"process {os.getpid()} on {socket.gethostname()} (started {started})")
        self.file.flush()

    def release(self) -> None:
        self.file.close()  # closing the last descriptor releases the flock


@contextlib.contextmanager
def claim_workdir(workdir: str | os.PathLike, *, resume: bool) -> Iterator[MetricsLog]:
    """Hold ``workdir`` for this run: create it, lock it against other runs, and start
    its metrics log (emptied unless ``resume``); the lock goes with the block.

    Raises ``WorkdirBusy`` naming the process that holds it. Call it just before the
    first write: everything that can be refused is checked before.
    """
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        lock = _WorkdirLock(workdir) if jax.process_index() == 0 else None
    except OSError as err:
        raise WriteError(f"could not create --workdir {workdir}", err) from err
    try:
        yield MetricsLog.start(workdir / "metrics.jsonl", resume=resume)
    finally:
        if lock is not None:
            lock.release()


def check_resumable(directory: str | os.PathLike, config: Mapping[str, Any]) -> None:
    """``ConfigMismatchError`` if the newest intact checkpoint in ``directory`` was written
    with another ``config``, ``ConfigError`` if it holds checkpoints and none is intact;
    nothing if it holds none. Reads only: for checks that must come before the first
    write."""
    if not Path(directory).is_dir():
        return
    with Checkpointer(directory, read_only=True) as checkpointer:
        _check_something_intact(checkpointer)
        meta = checkpointer.read_meta()
    if meta is not None:
        _check_config(meta.get("config", {}), _as_stored(config), Path(directory))


def _check_something_intact(checkpointer: Checkpointer) -> None:
    if checkpointer.latest_step() is None and checkpointer.damaged:
        raise ConfigError(
            f"cannot resume from {checkpointer.directory}: no intact checkpoint (step "
            + ", step ".join(f"{k}: {v}" for k, v in sorted(checkpointer.damaged.items()))
            + "). Start afresh with another --workdir."
        )


def check_finite_results(results: Mapping[str, Any], where: str = "results") -> None:
    """``NonFiniteError`` naming the first NaN or infinite number in ``results``."""
    for key, value in results.items():
        if isinstance(value, list):
            value = {f"{i}": item for i, item in enumerate(value)}
        if isinstance(value, Mapping):
            check_finite_results(value, f"{where}.{key}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteError(
                f"the evaluation gave {where}.{key} = {value}; results.json was not written "
                "(the checkpoints are kept)."
            )


class _StopFlag:
    def __init__(self):
        self.signal: str | None = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[_StopFlag]:
    """While active, SIGINT/SIGTERM set a flag (the loop finishes its step, saves, stops)."""
    flag = _StopFlag()

    def handler(signum, frame):
        if flag.signal is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        flag.signal = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class Loop:
    """How :func:`fit` trains: epochs, global batch size, seed, and the best-epoch metric.

    Attributes:
      epochs: total epochs (a resumed run continues up to this number).
      batch_size: global batch size, a multiple of the device count.
      seed: the data order and step keys derive from it (see the module docstring).
      select: ``(metric, "max" | "min")``: the validation metric that picks the best epoch;
        ``None`` for the last epoch (a final fit, with nothing held out).
      check_every: steps between non-finite checks and progress updates.
    """

    epochs: int
    batch_size: int
    seed: int
    select: tuple[str, str] | None = ("val_accuracy", "max")
    check_every: int = 50


@dataclasses.dataclass(frozen=True)
class Stage:
    """Where one :func:`fit` reports: its name, checkpoints, metrics log, stored config.

    Attributes:
      name: the stage's name in logs, progress bars and errors.
      checkpointer: where to checkpoint; ``None`` for none.
      log: ``metrics.jsonl`` to append one row per epoch to.
      config: settings stored with each checkpoint; ``resume`` refuses other ones.
      resume: continue from the checkpointer's latest checkpoint, if any.
      progress: show a progress bar.
    """

    name: str = "train"
    checkpointer: Checkpointer | None = None
    log: MetricsLog | None = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    resume: bool = False
    progress: bool = True


@dataclasses.dataclass
class LoopState:
    """Where the loop stands, saved and restored as one value; :func:`fit` returns it.

    ``epoch`` epochs and ``step`` steps of the next are done; ``sums`` are that epoch's
    running metric sums; ``history`` one row per finished epoch; ``best_state`` the
    model at ``best_epoch``, whose row is ``best_metrics``.
    """

    best_state: nnx.State
    sums: dict[str, float]
    epoch: int = 0
    step: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    best_epoch: int = 0
    best_metrics: dict = dataclasses.field(default_factory=dict)

    _META = ("epoch", "step", "sums", "history", "seconds", "best_epoch", "best_metrics")

    def meta(self) -> dict[str, Any]:
        """Everything but ``best_state``, as JSON."""
        return {name: getattr(self, name) for name in self._META}

    @classmethod
    def from_checkpoint(cls, best_state: nnx.State, meta: Mapping[str, Any]) -> LoopState:
        return cls(best_state=best_state, **{name: meta[name] for name in cls._META})


def _check_config(saved: Mapping, current: Mapping, where: Path) -> None:
    """``ConfigMismatchError`` naming every setting (``model.latents``) that differs; the
    settings come before the data (``data``), which follow from some of them."""
    differences = [
        f"{key}={old!r}, this run has {key}={new!r}"
        for key, old, new in _differences(saved, current)
    ]
    if differences:
        raise ConfigMismatchError(
            f"cannot resume from {where}: it was written with "
            + "; and with ".join(differences)
            + ". Use the same settings, or another --workdir to start afresh."
        )


def _differences(
    saved: Mapping, current: Mapping, prefix: str = ""
) -> Iterator[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` for each leaf setting that differs."""
    for key in sorted(set(saved) | set(current), key=lambda k: (k == "data", k)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            yield from _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            yield f"{prefix}{key}", old, new


class _Epochs:
    """The data order and step keys of every epoch, and the steps in one."""

    def __init__(self, loop: Loop, num_examples: int, mesh: Mesh):
        check_batch_size(loop.batch_size, num_examples, mesh)
        self.loop, self.num_examples = loop, num_examples
        self.steps = num_examples // loop.batch_size
        self._sharding = NamedSharding(mesh, PartitionSpec(None, "data"))
        self._order_key, self._step_key = jax.random.key(loop.seed), jax.random.key(loop.seed + 1)

    def order(self, epoch: int) -> jax.Array:
        """``[steps, batch_size]`` row indices: a fresh permutation, partial batch dropped."""
        perm = jax.random.permutation(jax.random.fold_in(self._order_key, epoch), self.num_examples)
        order = perm[: self.steps * self.loop.batch_size].reshape(self.steps, -1)
        return jax.device_put(order, self._sharding)

    def key(self, epoch: int) -> jax.Array:
        return jax.random.fold_in(self._step_key, epoch)


class _Watch:
    """The periodic actions between steps: non-finite check, progress, stop on a signal."""

    def __init__(self, stage: Stage, loop: Loop, epochs: _Epochs, state: LoopState, stop):
        self.stage, self.loop, self.epochs, self.stop = stage, loop, epochs, stop
        self.bar = None
        if stage.progress and jax.process_index() == 0:
            with contextlib.suppress(ImportError):  # the core runs without tqdm
                from tqdm.auto import tqdm

                done = state.epoch * epochs.steps + state.step
                self.bar = tqdm(
                    total=loop.epochs * epochs.steps,
                    initial=done,
                    desc=stage.name,
                    unit="step",
                    dynamic_ncols=True,
                )
        self.tick = time.perf_counter()

    def due(self, window: list, step: int) -> bool:
        return (
            len(window) == self.loop.check_every
            or step == self.epochs.steps
            or bool(self.stop.signal)
        )

    def __call__(self, window: list, epoch: int, step: int, sums: Mapping) -> None:
        """After ``step`` steps of ``epoch``: check the window's losses, show progress."""
        values = np.asarray(jax.device_get(window))
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise NonFiniteError(
                f"{self.stage.name}: the loss became {values[bad[0]]} at epoch {epoch + 1}, "
                f"step {step - len(window) + bad[0] + 1}; stopped without saving "
                f"({_what_is_kept(self.stage)})."
            )
        if self.bar is not None:
            now = time.perf_counter()
            self.bar.update(len(window))
            postfix = {
                "epoch": f"{epoch + 1}/{self.loop.epochs}",
                "loss": f"{float(sums['loss']) / step:.4f}",
            }
            if "accuracy" in sums:
                postfix["acc"] = f"{float(sums['accuracy']) / step:.3f}"
            postfix["samples/s"] = f"{len(window) * self.loop.batch_size / (now - self.tick):.0f}"
            self.bar.set_postfix(postfix)
            self.tick = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_epoch(trainer: Trainer, data, epochs: _Epochs, state: LoopState, ctx, watch) -> None:
    """Steps ``state.step...`` of epoch ``state.epoch``, until its end or a stop signal.

    Advances ``state.step`` and ``state.sums``; ``watch`` runs every few steps.
    """
    order, epoch_key = epochs.order(state.epoch), epochs.key(state.epoch)
    sums, window, watch.tick = trainer.metric_sums(state.sums), [], time.perf_counter()
    for i in range(state.step, epochs.steps):
        # A NumPy index: a jnp.int32 would be one more dispatch per step (~0.1 ms).
        trainer.leaves, sums, loss = trainer.step(
            trainer.leaves, sums, data, order, np.int32(i), epoch_key, ctx
        )
        window.append(loss)
        if watch.due(window, i + 1):
            watch(window, state.epoch, i + 1, sums)
            window = []
            state.step = i + 1
            if watch.stop.signal:
                break
    state.sums = {k: float(v) for k, v in sums.items()}


def _what_is_kept(stage: Stage) -> str:
    if stage.checkpointer is not None and stage.checkpointer.latest_step() is not None:
        return "the last good checkpoint is kept"
    return "no checkpoint of this stage had been written yet"


def _check_parameters(trainer: Trainer, stage: Stage, epoch: int) -> None:
    if not bool(_all_finite(trainer.leaves)):
        raise NonFiniteError(
            f"{stage.name}: a parameter became non-finite in epoch {epoch + 1}; "
            f"stopped without saving ({_what_is_kept(stage)})."
        )


def _save(trainer: Trainer, stage: Stage, loop: Loop, epochs: _Epochs, state: LoopState):
    if stage.checkpointer is None:
        return
    complete = state.epoch >= loop.epochs and state.step == 0
    meta = {**state.meta(), "config": stage.config, "complete": complete}
    step = state.epoch * epochs.steps + state.step
    stage.checkpointer.save(step, trainer.state, state.best_state, meta)


def _record(trainer: Trainer, state: LoopState, row: dict, loop: Loop, stage: Stage) -> None:
    """A finished epoch's row: history, best model, metrics log; on to the next epoch."""
    state.history.append(row)
    metric, mode = loop.select or (None, "min")
    best = state.best_metrics.get(metric)
    if (loop.select is None and state.epoch + 1 == loop.epochs) or (
        metric in row
        and (best is None or (row[metric] > best if mode == "max" else row[metric] < best))
    ):
        state.best_epoch, state.best_metrics = state.epoch + 1, dict(row)
        state.best_state = jax.tree.map(jnp.copy, trainer.model_state())
    state.epoch, state.step = state.epoch + 1, 0
    state.sums = dict.fromkeys(state.sums, 0.0)
    if stage.log is not None:  # before the checkpoint: a resume truncates it, if need be
        stage.log.append(row)


def _start(trainer: Trainer, stage: Stage, names: Sequence[str]) -> LoopState:
    """A fresh position, or the latest checkpoint's when resuming."""
    best = jax.tree.map(jnp.copy, trainer.model_state())  # the step donates the state
    state = LoopState(best_state=best, sums=dict.fromkeys(names, 0.0))
    ckpt = stage.checkpointer
    if ckpt is not None and stage.resume:
        _check_something_intact(ckpt)
    if ckpt is not None and stage.resume and ckpt.latest_step() is not None:
        _check_config(ckpt.read_meta().get("config", {}), stage.config, ckpt.directory)
        restored, meta = ckpt.restore({"state": trainer.state, "best": best})
        trainer.state = restored["state"]
        state = LoopState.from_checkpoint(restored["best"], meta)
    if stage.log is not None and stage.resume:  # rows past the checkpoint (or all) go
        stage.log.truncate(stage.name, after_epoch=state.epoch)
    return state


def fit(
    trainer: Trainer,
    data: Mapping[str, Any],
    loop: Loop,
    *,
    evaluate: Callable[[nnx.Module, int], dict[str, float]],
    context: Callable[[int], Any] | None = None,
    stage: Stage | None = None,
) -> LoopState:
    """Train ``trainer`` over ``data`` as ``loop`` says, reporting to ``stage``.

    Args:
      trainer: the model, optimizer and compiled step.
      data: ``{name: [N, ...] array}`` (host or device); batches are rows of each.
      loop: epochs, batch size, seed and the best-epoch metric.
      evaluate: ``(model, epoch) -> {metric: float}`` after each epoch (validation).
      context: ``epoch -> pytree`` of extra step inputs (frozen teacher, warm-up).
      stage: name, checkpoints, metrics log, stored config, resume, progress bar.

    Returns:
      The final :class:`LoopState`: history and the best model state (by ``loop.select``).

    Raises:
      NonFiniteError: a loss or parameter became NaN or infinite (no checkpoint written).
      Interrupted: SIGINT/SIGTERM; the current position was checkpointed first.
      ConfigMismatchError: ``resume`` found a checkpoint of another configuration.
    """
    stage = stage or Stage()
    stage = dataclasses.replace(stage, config=_as_stored(stage.config))
    epochs = _Epochs(loop, len(next(iter(data.values()))), trainer.mesh)
    data = replicate(dict(data), trainer.mesh)
    context = context or (lambda epoch: None)
    state = _start(trainer, stage, trainer.metric_names(data, context(0)))
    if state.epoch < loop.epochs:  # something left to train
        _check_memory(trainer, data, epochs, state, replicate(context(state.epoch), trainer.mesh))
    with stop_on_signals() as stop:
        watch = _Watch(stage, loop, epochs, state, stop)
        try:
            while state.epoch < loop.epochs:
                _train_one_epoch(trainer, data, epochs, state, context, watch, evaluate)
        finally:
            watch.close()
    if not state.best_metrics:  # the selection metric was never reported: keep the last model
        state.best_state = jax.tree.map(jnp.copy, trainer.model_state())
        state.best_epoch = loop.epochs
        state.best_metrics = state.history[-1] if state.history else {}
    return state


def _free_bytes(device) -> int | None:
    """Memory a new allocation can take on ``device``: the host's available memory for a
    CPU, the allocator's headroom for an accelerator; ``None`` when unknown."""
    if device.platform == "cpu":
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return None
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def _check_memory(trainer: Trainer, data, epochs: _Epochs, state: LoopState, ctx) -> None:
    """``ConfigError`` before training when the compiled step needs more memory than the
    device has free (XLA's own count: arguments, outputs and temporaries)."""
    sums = trainer.metric_sums(state.sums)
    args = (trainer.leaves, sums, data, epochs.order(0), np.int32(0), epochs.key(0), ctx)
    stats = trainer.compiled_step.lower(*args).compile().memory_analysis()
    device = trainer.mesh.devices.flat[0]
    free = _free_bytes(device)
    if stats is None or free is None:
        return
    need = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    need -= stats.alias_size_in_bytes  # donated buffers are reused
    if device.platform == "cpu":  # every CPU device shares the host's memory
        need *= len(jax.local_devices())
    if need > free:
        raise ConfigError(
            f"a training step needs {_size(need)}, more than the {_size(free)} free on "
            f"{device}; lower the batch size, or the sizes of the model or the samples per "
            "example."
        )


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def _as_stored(config: Mapping[str, Any] | None) -> dict:
    """``config`` as a checkpoint stores it (JSON: tuples become lists)."""
    return json.loads(json.dumps(dict(config or {})))


def _train_one_epoch(trainer, data, epochs: _Epochs, state: LoopState, context, watch, evaluate):
    """One epoch (or the rest of one), then its row, best model and checkpoint."""
    stage, loop = watch.stage, watch.loop
    t0, first_step = time.perf_counter(), state.step
    run_epoch(trainer, data, epochs, state, replicate(context(state.epoch), trainer.mesh), watch)
    _check_parameters(trainer, stage, state.epoch)
    if state.step < epochs.steps:  # stopped by a signal mid-epoch
        state.seconds += time.perf_counter() - t0
        _save(trainer, stage, loop, epochs, state)
        raise Interrupted(
            f"{stage.name}: {watch.stop.signal} at epoch {state.epoch + 1}, step "
            f"{state.step}; checkpoint written.",
            watch.stop.signal,
        )
    train_time = time.perf_counter() - t0
    row = {"stage": stage.name, "epoch": state.epoch + 1}
    row.update({f"train_{k}": v / epochs.steps for k, v in state.sums.items()})
    row.update(evaluate(trainer.model, state.epoch))
    row["seconds"] = round(train_time, 3)
    row["samples_per_s"] = round((epochs.steps - first_step) * loop.batch_size / train_time, 1)
    state.seconds += time.perf_counter() - t0
    _record(trainer, state, row, loop, stage)
    _save(trainer, stage, loop, epochs, state)
    if watch.stop.signal:
        raise Interrupted(
            f"{stage.name}: {watch.stop.signal} at the end of epoch {state.epoch}; "
            "checkpoint written.",
            watch.stop.signal,
        )


def load_best_model(directory: str | os.PathLike, model: nnx.Module) -> tuple[nnx.Module, dict]:
    """Restore the best model of a finished stage's checkpoints into ``model``'s shape.

    Raises ``FileNotFoundError`` when there is no checkpoint at ``directory``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {directory}")
    ckpt = Checkpointer(directory, read_only=True)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no complete checkpoint in {directory}")
        graphdef, state = nnx.split(model)
        restored, meta = ckpt.restore({"best": state})
    finally:
        ckpt.close()
    return nnx.merge(graphdef, restored["best"]), meta
