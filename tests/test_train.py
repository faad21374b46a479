"""Tests of kdvae.train: the epoch loop learns, is deterministic, checkpoints, resumes
bit for bit (after a finished or an interrupted run), refuses other configurations, and
stops on a non-finite loss without writing over the last good checkpoint."""

from __future__ import annotations

import errno
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import class_patterns
from flax import nnx

from kdvae import data as kdata
from kdvae import distill, models, train

pytestmark = pytest.mark.usefixtures("compilation_cache")

REPO = Path(__file__).resolve().parent.parent

N, BATCH = 320, 32  # 10 steps per epoch
STEPS = N // BATCH
TIMING = ("seconds", "samples_per_s")  # the only fields of a history row that may differ


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    images, labels = class_patterns(N, seed=3)
    return {"images": images, "labels": labels}


@pytest.fixture(scope="module")
def val() -> dict[str, np.ndarray]:
    images, labels = class_patterns(100, seed=4)
    return {"images": images, "labels": labels}


def make_trainer(*, seed=0, learning_rate=1e-2, loss_fn=None, tx=None, max_norm=None):
    model = models.MLPClassifier((32,), max_norm=max_norm, rngs=nnx.Rngs(seed))
    tx = tx or optax.adam(learning_rate)
    return train.Trainer(model, tx, loss_fn or distill.classification_loss())


@pytest.fixture(scope="module")
def evaluate(val):
    @jax.jit
    def accuracy(model, images, labels):
        logits = model(kdata.to_unit_float(images), inference=True)
        return jnp.mean(jnp.argmax(logits, -1) == labels)

    def evaluate(model, epoch):
        return {"val_accuracy": float(accuracy(model, val["images"], val["labels"]))}

    return evaluate


def run_fit(trainer, data, evaluate, *, epochs=3, seed=7, context=None, **kwargs):
    """``train.fit`` with a :class:`train.Loop` and :class:`train.Stage` made of ``kwargs``."""
    loop_keys = {"batch_size", "select", "check_every"}
    loop = train.Loop(
        epochs=epochs,
        seed=seed,
        **{"batch_size": BATCH, **{k: v for k, v in kwargs.items() if k in loop_keys}},
    )
    stage = train.Stage(
        **{"progress": False, **{k: v for k, v in kwargs.items() if k not in loop_keys}}
    )
    return train.fit(trainer, data, loop, evaluate=evaluate, context=context, stage=stage)


def params(trainer_or_state) -> list[np.ndarray]:
    state = trainer_or_state
    if isinstance(state, train.Trainer):
        state = state.model_state()
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def assert_same_params(a, b):
    a, b = params(a), params(b)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


# ----------------------------------------------------------------------- learning


def test_fit_learns(data, evaluate, tmp_path):
    trainer = make_trainer()
    log = train.MetricsLog(tmp_path / "metrics.jsonl")
    # progress=True and a short check window exercise the progress-bar path too.
    result = run_fit(trainer, data, evaluate, log=log, name="s", progress=True, check_every=3)
    history = result.history
    assert [row["epoch"] for row in history] == [1, 2, 3]
    losses = [row["train_loss"] for row in history]
    assert losses[0] < math.log(10)  # below chance already during the first epoch
    assert losses[2] < losses[1] < losses[0]
    assert losses[2] < 0.2 * losses[0]
    assert history[-1]["train_accuracy"] > 0.9 and history[-1]["val_accuracy"] > 0.9
    assert result.best_metrics["val_accuracy"] == max(r["val_accuracy"] for r in history)
    assert log.rows() == history
    assert all(row["stage"] == "s" for row in history)
    # One compiled step for the whole run: the sums fed back each step keep the placement
    # the step gave them (JAX's private cache counter; 2 meant a second full compile).
    assert trainer.step._cache_size() == 1


def test_no_selection_keeps_the_last_epoch(data, evaluate):
    trainer = make_trainer()
    result = run_fit(trainer, data, evaluate, epochs=3, select=None)
    assert result.best_epoch == 3 and result.best_metrics == result.history[-1]
    assert_same_params(result.best_state, trainer)  # the model as training left it


def test_max_norm_holds_after_every_update(data, evaluate):
    trainer = make_trainer(max_norm=0.5, learning_rate=0.1)
    run_fit(trainer, data, evaluate, epochs=1)
    for layer in trainer.model.layers:
        norms = np.linalg.norm(np.asarray(layer.kernel[...]), axis=0)
        assert norms.max() <= 0.5 * (1 + 1e-5)
        assert norms.max() > 0.49  # the constraint was active, not vacuous


def test_same_seed_same_run_bit_for_bit(data, evaluate):
    a, b, c = make_trainer(), make_trainer(), make_trainer()
    result_a = run_fit(a, data, evaluate, epochs=2)
    result_b = run_fit(b, data, evaluate, epochs=2)
    assert_same_params(a, b)
    assert_same_params(result_a.best_state, result_b.best_state)
    assert untimed(result_a.history) == untimed(result_b.history)
    # Another data-order seed gives another run: the comparison above can fail.
    run_fit(c, data, evaluate, epochs=2, seed=8)
    assert not all(map(np.array_equal, params(a), params(c)))


def test_best_epoch_selection(data):
    scores = {0: 0.5, 1: 0.9, 2: 0.7}

    def evaluate(model, epoch):
        return {"val_accuracy": scores[epoch]}

    trainer = make_trainer()
    result = run_fit(trainer, data, evaluate)
    assert result.best_epoch == 2 and result.best_metrics["val_accuracy"] == 0.9
    two_epochs = make_trainer()
    run_fit(two_epochs, data, evaluate, epochs=2)
    assert_same_params(result.best_state, two_epochs)  # the model as it was after epoch 2
    # "min" picks the lowest; a metric that is never reported keeps the last model.
    assert run_fit(make_trainer(), data, evaluate, select=("val_accuracy", "min")).best_epoch == 1
    last = run_fit(make_trainer(), data, evaluate, select=("val_loss", "min"))
    assert last.best_epoch == 3
    assert_same_params(last.best_state, trainer)


# ----------------------------------------------------------------------- data order


def test_each_epoch_visits_a_fresh_permutation():
    visited: list[np.ndarray] = []

    def loss_fn(model, batch, key, context):
        jax.debug.callback(lambda rows: visited.append(np.asarray(rows)), batch["row"],
                           ordered=True)  # fmt: skip
        x = kdata.to_unit_float(batch["images"])
        return jnp.mean(model(x) ** 2), {}

    n, batch = 100, 16  # 6 steps per epoch; the last 4 rows of each order are dropped
    data = {"images": np.zeros((n, 28, 28, 1), np.uint8), "row": np.arange(n, dtype=np.int32)}
    trainer = make_trainer(loss_fn=loss_fn)
    run_fit(trainer, data, lambda m, e: {}, epochs=3, batch_size=batch, seed=5)
    jax.effects_barrier()
    assert len(visited) == 3 * 6 and all(v.shape == (batch,) for v in visited)
    epochs = [np.concatenate(visited[6 * e : 6 * e + 6]) for e in range(3)]
    for e, rows in enumerate(epochs):
        assert len(np.unique(rows)) == 96 and rows.min() >= 0 and rows.max() < n
        # The documented order: permutation(fold_in(key(seed), epoch)), partial batch dropped.
        want = jax.random.permutation(jax.random.fold_in(jax.random.key(5), e), n)[:96]
        np.testing.assert_array_equal(rows, want)
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    assert set(epochs[0]) != set(epochs[1])  # other rows dropped too, not only reordered


# ----------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(data, evaluate, tmp_path):
    trainer = make_trainer(seed=0)
    run_fit(trainer, data, evaluate, epochs=1)  # non-trivial optimizer state
    best = jax.tree.map(lambda x: x + 1, trainer.model_state())
    ckpt = train.Checkpointer(tmp_path / "ckpt")
    assert ckpt.latest_step() is None and ckpt.read_meta() is None
    meta = {"epoch": 1, "history": [{"a": 1.5}], "config": {"lr": 0.01, "widths": [3, 4]}}
    ckpt.save(5, trainer.state, best, meta)
    assert ckpt.latest_step() == 5 and ckpt.read_meta() == meta

    other = make_trainer(seed=1)  # another init: the restore must overwrite every array
    assert not all(map(np.array_equal, params(other), params(trainer)))
    restored, got_meta = ckpt.restore({"state": other.state, "best": other.model_state()})
    assert got_meta == meta
    assert_same_params(restored["state"], trainer.state)  # model and optimizer state
    assert_same_params(restored["best"], best)
    assert len(params(restored["state"])) > len(params(restored["best"]))  # + optimizer
    assert STEPS in [int(x) for x in params(restored["state"]) if x.dtype == np.uint32]

    # The two newest are kept; saving a step again replaces it.
    ckpt.save(6, trainer.state, best, {**meta, "epoch": 2})
    ckpt.save(7, trainer.state, best, {**meta, "epoch": 3})
    ckpt.save(7, trainer.state, best, {**meta, "epoch": 4})
    assert ckpt.manager.all_steps() == [6, 7]
    assert ckpt.read_meta()["epoch"] == 4 and ckpt.read_meta(6)["epoch"] == 2
    ckpt.close()

    # load_best_model reads the best model of the latest checkpoint.
    model, _ = train.load_best_model(
        tmp_path / "ckpt", models.MLPClassifier((32,), rngs=nnx.Rngs(2))
    )
    assert_same_params(nnx.state(model), best)
    with pytest.raises(FileNotFoundError):
        train.load_best_model(tmp_path / "nowhere", model)


@pytest.fixture(scope="module")
def reference(data, evaluate, tmp_path_factory):
    """An uninterrupted 3-epoch run with checkpoints and a metrics log."""
    folder = tmp_path_factory.mktemp("reference")
    trainer = make_trainer()
    log = train.MetricsLog(folder / "metrics.jsonl")
    result = run_fit(trainer, data, evaluate, checkpointer=train.Checkpointer(folder / "ckpt"),
                     log=log, config={"lr": 0.01})  # fmt: skip
    return types.SimpleNamespace(trainer=trainer, result=result, rows=log.rows())


def assert_same_run(trainer, result, log, reference):
    assert_same_params(trainer, reference.trainer)
    assert_same_params(result.best_state, reference.result.best_state)
    assert untimed(result.history) == untimed(reference.result.history)
    assert result.best_epoch == reference.result.best_epoch
    assert untimed(log.rows()) == untimed(reference.rows)


def test_resume_a_finished_run_continues_exactly(data, evaluate, reference, tmp_path):
    log = train.MetricsLog(tmp_path / "metrics.jsonl")
    ckpt = train.Checkpointer(tmp_path / "ckpt")
    run_fit(make_trainer(), data, evaluate, epochs=2, checkpointer=ckpt, log=log,
            config={"lr": 0.01})  # fmt: skip
    assert ckpt.latest_step() == 2 * STEPS and ckpt.read_meta()["complete"]
    trainer = make_trainer(seed=1)  # the init does not matter: the checkpoint wins
    result = run_fit(trainer, data, evaluate, checkpointer=ckpt, log=log, resume=True,
                     config={"lr": 0.01})  # fmt: skip
    assert_same_run(trainer, result, log, reference)
    assert ckpt.latest_step() == 3 * STEPS

    # Resuming a complete run trains nothing and returns the same result.
    calls = []
    again = make_trainer(seed=2)
    step = again.step
    again.step = lambda *args: calls.append(1) or step(*args)
    result = run_fit(again, data, evaluate, checkpointer=ckpt, log=log, resume=True,
                     config={"lr": 0.01})  # fmt: skip
    assert not calls
    assert_same_run(again, result, log, reference)


def interrupt_after(trainer: train.Trainer, calls: int) -> None:
    """Send this process SIGINT right after the trainer's ``calls``-th step."""
    step, count = trainer.step, [0]

    def wrapped(*args):
        out = step(*args)
        count[0] += 1
        if count[0] == calls:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    trainer.step = wrapped


@pytest.mark.parametrize("calls", [STEPS + 4, 2 * STEPS], ids=["mid-epoch", "end-of-epoch"])
def test_interrupted_run_resumes_exactly(data, evaluate, reference, tmp_path, calls):
    log = train.MetricsLog(tmp_path / "metrics.jsonl")
    ckpt = train.Checkpointer(tmp_path / "ckpt")
    trainer = make_trainer()
    interrupt_after(trainer, calls)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(train.Interrupted, match="SIGINT") as excinfo:
        run_fit(trainer, data, evaluate, checkpointer=ckpt, log=log, config={"lr": 0.01})
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers are restored
    assert "checkpoint written" in str(excinfo.value)
    assert ckpt.latest_step() == calls  # the position of the step that saw the signal
    meta = ckpt.read_meta()
    assert (meta["epoch"], meta["step"]) == divmod(calls, STEPS) and not meta["complete"]
    assert len(log.rows()) == calls // STEPS  # the finished epochs only

    trainer = make_trainer(seed=1)
    result = run_fit(trainer, data, evaluate, checkpointer=ckpt, log=log, resume=True,
                     config={"lr": 0.01})  # fmt: skip
    assert_same_run(trainer, result, log, reference)


def test_resume_with_another_config_names_every_setting_that_differs(data, evaluate, tmp_path):
    ckpt = train.Checkpointer(tmp_path / "ckpt")
    config = {"lr": 0.01, "model": {"widths": [32]}}
    run_fit(make_trainer(), data, evaluate, epochs=1, checkpointer=ckpt, config=config)
    with pytest.raises(train.ConfigMismatchError, match=r"lr=0\.01.*lr=0\.02"):
        run_fit(make_trainer(), data, evaluate, checkpointer=ckpt, resume=True,
                config={**config, "lr": 0.02})  # fmt: skip
    with pytest.raises(train.ConfigMismatchError, match=r"model\.widths=\[32\]"):
        run_fit(make_trainer(), data, evaluate, checkpointer=ckpt, resume=True,
                config={**config, "model": {"widths": [64]}})  # fmt: skip
    with pytest.raises(train.ConfigMismatchError, match="extra=None.*extra=1"):
        run_fit(make_trainer(), data, evaluate, checkpointer=ckpt, resume=True,
                config={**config, "extra": 1})  # fmt: skip
    with pytest.raises(train.ConfigMismatchError) as error:
        run_fit(make_trainer(), data, evaluate, checkpointer=ckpt, resume=True,
                config={"lr": 0.02, "model": {"widths": [64]}})  # fmt: skip
    assert ("lr=0.01, this run has lr=0.02; and with model.widths=[32], this run has "
            "model.widths=[64]. Use the same settings") in str(error.value)  # fmt: skip
    assert issubclass(train.ConfigMismatchError, train.ConfigError)
    # The same configuration resumes (where the outputs go is not part of it: the
    # settings declared training=False are never stored; tests/test_config.py).
    result = run_fit(make_trainer(), data, evaluate, epochs=2, checkpointer=ckpt, resume=True,
                     config=config)  # fmt: skip
    assert [row["epoch"] for row in result.history] == [1, 2]


# ----------------------------------------------------------------------- failures


def test_nan_loss_stops_before_writing(data, evaluate, tmp_path):
    def loss_fn(model, batch, key, context):
        loss, metrics = distill.classification_loss()(model, batch, key, context)
        return loss + context["poison"], metrics

    def context(epoch):  # the loss becomes NaN in the second epoch
        return {"poison": jnp.float32(np.nan if epoch >= 1 else 0.0)}

    ckpt = train.Checkpointer(tmp_path / "ckpt")
    log = train.MetricsLog(tmp_path / "metrics.jsonl")
    trainer = make_trainer(loss_fn=loss_fn)
    with pytest.raises(train.NonFiniteError, match=r"nan at epoch 2, step 1\b"):
        run_fit(trainer, data, evaluate, context=context, checkpointer=ckpt, log=log)
    assert ckpt.manager.all_steps() == [STEPS]  # the epoch-1 checkpoint, nothing newer
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [str(STEPS)]  # no partial one
    assert [row["epoch"] for row in log.rows()] == [1]
    restored, meta = ckpt.restore({"state": trainer.state})
    assert meta["epoch"] == 1
    assert all(np.all(np.isfinite(x)) for x in params(restored["state"]))


def test_exploding_learning_rate_raises_without_a_checkpoint(data, evaluate, tmp_path):
    ckpt = train.Checkpointer(tmp_path / "ckpt")
    trainer = make_trainer(tx=optax.sgd(1e30))
    with pytest.raises(train.NonFiniteError, match="epoch 1"):
        run_fit(trainer, data, evaluate, checkpointer=ckpt)
    assert ckpt.latest_step() is None


def test_a_non_finite_parameter_with_a_finite_loss_is_caught(data, evaluate, tmp_path):
    class Poisoned(nnx.Module):
        """A classifier whose constraint writes inf into a parameter the loss never reads."""

        def __init__(self):
            self.net = models.MLPClassifier((8,), rngs=nnx.Rngs(0))
            self.unused = nnx.Param(jnp.zeros(3))

        def __call__(self, x, *, key=None, inference=False):
            return self.net(x, key=key, inference=inference)

        def constrain(self):
            self.unused[...] = jnp.full(3, jnp.inf)

    trainer = train.Trainer(Poisoned(), optax.adam(1e-2), distill.classification_loss())
    ckpt = train.Checkpointer(tmp_path / "ckpt")
    with pytest.raises(train.NonFiniteError, match="parameter became non-finite in epoch 1"):
        run_fit(trainer, data, evaluate, checkpointer=ckpt)
    assert ckpt.latest_step() is None


def test_check_batch_size():
    mesh = train.data_mesh()
    train.check_batch_size(32, 32, mesh)
    with pytest.raises(train.ConfigError, match="larger than the training set"):
        train.check_batch_size(64, 50, mesh)
    with pytest.raises(train.ConfigError, match="positive multiple"):
        train.check_batch_size(0, 50, mesh)
    # Divisibility by the device count; a real 4-device mesh is in test_sharding.py.
    four = types.SimpleNamespace(devices=np.empty(4, object))
    train.check_batch_size(8, 50, four)
    with pytest.raises(train.ConfigError, match=r"multiple of the device count \(4\)"):
        train.check_batch_size(6, 50, four)


def test_fit_checks_the_batch_size(data, evaluate):
    with pytest.raises(train.ConfigError, match="larger than the training set"):
        run_fit(make_trainer(), data, evaluate, batch_size=N + 1)


# ----------------------------------------------------------------------- helpers


def test_metrics_log_truncate(tmp_path):
    log = train.MetricsLog(tmp_path / "metrics.jsonl")
    assert log.rows() == []
    rows = [
        {"stage": s, "epoch": e, "x": 10 * e} for s in ("teacher", "student") for e in (1, 2, 3)
    ]
    for row in rows:
        log.append(row)
    assert log.rows() == rows
    log.truncate("teacher", after_epoch=1)
    assert log.rows() == [rows[0], *rows[3:]]  # the other stage untouched, order kept
    log.truncate("student", after_epoch=0)
    assert log.rows() == [rows[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file


@pytest.mark.parametrize("n, batch_size", [(10, 4), (3, 4), (8, 4), (0, 4)])
def test_batched_apply_any_n(n, batch_size):
    x = jnp.arange(n * 3, dtype=jnp.float32).reshape(n, 3)

    def fn(b):
        return {"double": 2 * b, "sum": b.sum(-1)}

    got = jax.jit(lambda x: train.batched_apply(fn, x, batch_size=batch_size))(x)
    assert got["double"].shape == (n, 3) and got["sum"].shape == (n,)
    np.testing.assert_array_equal(got["double"], 2 * x)
    np.testing.assert_array_equal(got["sum"], x.sum(-1))


def test_stop_on_signals_sets_a_flag_then_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with train.stop_on_signals() as flag:
        assert flag.signal is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.signal == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------- damage and misuse
# Fingerprinted checkpoints fall back to the newest intact step; one run per workdir;
# failed writes and memory named in one line.

_REPO = Path(__file__).resolve().parent.parent


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bytes(path: Path, count: int = 400) -> None:
    raw = bytearray(path.read_bytes())
    start = min(100, max(len(raw) - count, 0))
    for i in range(start, min(start + count, len(raw))):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


# Each damages the newest step (step 2 * STEPS of a two-epoch run) in its own way.
DAMAGE = {
    "flipped-best": lambda step: flip_bytes(largest_file(step / "best")),
    "flipped-state": lambda step: flip_bytes(largest_file(step / "state")),
    "deleted-state": lambda step: shutil.rmtree(step / "state"),
    "emptied-manifest": lambda step: (step / "state" / "manifest.ocdbt").write_bytes(b""),
    "deleted-meta": lambda step: (step / "meta" / "metadata").unlink(),
    "no-fingerprint": lambda step: (step / "kdvae_fingerprint.json").unlink(),
    "extra-file": lambda step: (step / "best" / "stray").write_text("x"),
    "deleted-ocdbt": lambda step: shutil.rmtree(step / "state" / "ocdbt.process_0"),
}


@pytest.fixture(scope="module")
def two_epochs(data, evaluate, tmp_path_factory):
    """A two-epoch run with checkpoints at the end of epochs 1 and 2 (kept: both)."""
    folder = tmp_path_factory.mktemp("two_epochs")
    log = train.MetricsLog(folder / "metrics.jsonl")
    ckpt = train.Checkpointer(folder / "ckpt")
    run_fit(make_trainer(), data, evaluate, epochs=2, checkpointer=ckpt, log=log,
            config={"lr": 0.01})  # fmt: skip
    ckpt.close()
    assert sorted(int(p.name) for p in (folder / "ckpt").iterdir()) == [STEPS, 2 * STEPS]
    return folder


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_step_is_set_aside_and_the_run_resumes_exactly(
    damage, two_epochs, data, evaluate, reference, tmp_path, capsys
):
    """The reference is an uninterrupted three-epoch run (tests/test_train.py)."""
    folder = tmp_path / "run"
    shutil.copytree(two_epochs, folder)
    DAMAGE[damage](folder / "ckpt" / str(2 * STEPS))
    ckpt = train.Checkpointer(folder / "ckpt")
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and note[0].startswith(f"note: checkpoint step {2 * STEPS} in ")
    assert "is not intact" in note[0] and f"moved to {2 * STEPS}.damaged-" in note[0]
    assert ckpt.latest_step() == STEPS and list(ckpt.damaged) == [2 * STEPS]
    trainer, log = make_trainer(seed=1), train.MetricsLog(folder / "metrics.jsonl")
    result = run_fit(trainer, data, evaluate, checkpointer=ckpt, log=log, resume=True,
                     config={"lr": 0.01})  # fmt: skip
    assert_same_run(trainer, result, log, reference)  # epoch 2 replayed, then epoch 3
    assert ckpt.latest_step() == 3 * STEPS


def test_a_stray_empty_step_folder_is_set_aside(two_epochs, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(two_epochs, folder)
    (folder / "ckpt" / str(3 * STEPS)).mkdir()  # newer than every real step
    ckpt = train.Checkpointer(folder / "ckpt")
    assert ckpt.latest_step() == 2 * STEPS and ckpt.read_meta()["epoch"] == 2
    assert f"checkpoint step {3 * STEPS} in " in capsys.readouterr().err


def test_no_intact_step_refuses_to_resume(two_epochs, data, evaluate, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(two_epochs, folder)
    for step in (STEPS, 2 * STEPS):
        flip_bytes(largest_file(folder / "ckpt" / str(step) / "state"))
    (folder / "ckpt" / str(3 * STEPS)).mkdir()  # and a stray empty step folder
    ckpt = train.Checkpointer(folder / "ckpt")
    assert ckpt.latest_step() is None and sorted(ckpt.damaged) == [STEPS, 2 * STEPS, 3 * STEPS]
    with pytest.raises(train.ConfigError, match="no intact checkpoint") as excinfo:
        run_fit(make_trainer(), data, evaluate, checkpointer=ckpt, resume=True,
                config={"lr": 0.01})  # fmt: skip
    assert "\n" not in str(excinfo.value)


def test_read_only_checkpointer_reports_without_moving(two_epochs, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(two_epochs, folder)
    (folder / "ckpt" / str(2 * STEPS) / "kdvae_fingerprint.json").unlink()
    before = sorted(p.name for p in (folder / "ckpt").iterdir())
    with train.Checkpointer(folder / "ckpt", read_only=True) as ckpt:
        assert ckpt.latest_step() == STEPS and "no fingerprint" in ckpt.damaged[2 * STEPS]
        assert ckpt.read_meta()["epoch"] == 1
    assert sorted(p.name for p in (folder / "ckpt").iterdir()) == before
    assert capsys.readouterr().err == ""


def test_a_failed_save_names_what_and_where_and_keeps_the_last_checkpoint(
    data, evaluate, tmp_path, monkeypatch
):
    ckpt = train.Checkpointer(tmp_path / "ckpt")
    run_fit(make_trainer(), data, evaluate, epochs=1, checkpointer=ckpt, config={"lr": 0.01})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "save", full_disk)
    with pytest.raises(train.WriteError) as excinfo:
        run_fit(make_trainer(), data, evaluate, epochs=2, checkpointer=ckpt, resume=True,
                config={"lr": 0.01})  # fmt: skip
    assert str(excinfo.value) == (
        f"could not save checkpoint step {2 * STEPS} to {tmp_path / 'ckpt'}: "
        "No space left on device"
    )
    monkeypatch.undo()
    assert train.Checkpointer(tmp_path / "ckpt").latest_step() == STEPS  # intact


def test_failed_writes_of_logs_and_results(tmp_path, monkeypatch):
    log = train.MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"epoch": 1})

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(train.WriteError, match="could not append to .*: Operation not permitted"):
        log.append({"epoch": 2})
    monkeypatch.setattr(Path, "write_text", denied)
    with pytest.raises(train.WriteError, match="could not write .*results.json: Operation not"):
        train.write_json(tmp_path / "results.json", {"a": 1})
    monkeypatch.undo()
    assert log.rows() == [{"epoch": 1}] and not (tmp_path / "results.json").exists()


def test_non_finite_results_are_refused():
    train.check_finite_results({"a": 1.0, "b": {"c": 2, "d": "x"}})
    with pytest.raises(train.NonFiniteError, match=r"results\.test\.nll = nan; results\.json"):
        train.check_finite_results({"test": {"nll": float("nan")}})
    with pytest.raises(train.NonFiniteError, match=r"results\.kl = inf"):
        train.check_finite_results({"kl": float("inf")})


def test_a_step_too_large_for_memory_is_refused_before_training(
    data, evaluate, tmp_path, monkeypatch
):
    calls = []

    def counted(*args):
        calls.append(1)
        return step(*args)

    monkeypatch.setattr(train, "_free_bytes", lambda device: 1024)
    trainer = make_trainer()
    step, trainer.step = trainer.step, counted
    ckpt = train.Checkpointer(tmp_path / "ckpt")
    with pytest.raises(
        train.ConfigError, match=r"a training step needs [\d.]+ MiB, more than the 0\.0 MiB free on"
    ):
        run_fit(trainer, data, evaluate, checkpointer=ckpt)
    assert not calls and ckpt.latest_step() is None
    monkeypatch.undo()  # with the real headroom the same step trains
    run_fit(trainer, data, evaluate, epochs=1)
    assert len(calls) == STEPS


# ----------------------------------------------------------------------- the workdir lock

HOLD = """
import sys, time
from kdvae import train
with train.claim_workdir(sys.argv[1], resume=True):
    print("held", flush=True)
    time.sleep(120)
"""


def hold(workdir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE,
                            text=True, cwd=_REPO)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_one_run_per_workdir_and_no_stale_lock(tmp_path):
    holder = hold(tmp_path / "run")
    try:
        with pytest.raises(train.WorkdirBusy) as excinfo:
            with train.claim_workdir(tmp_path / "run", resume=True):
                pass
        message = str(excinfo.value)
        assert f"--workdir {tmp_path / 'run'} is in use by process {holder.pid} on " in message
        assert "wait for that run to end, or choose another --workdir" in message
    finally:
        holder.kill()  # as a crash: the kernel drops the lock
        holder.wait()
        holder.stdout.close()
    with train.claim_workdir(tmp_path / "run", resume=True) as log:
        assert log.path == tmp_path / "run" / "metrics.jsonl"
        lock = (tmp_path / "run" / ".lock").read_text()
        assert lock.startswith(f"process {os.getpid()} on ")
    with train.claim_workdir(tmp_path / "run", resume=False):  # released at the block's end
        pass
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


# --------------------------------------------------------------------------- host memory

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
CLEAN_ENVIRONMENT = {k: v for k, v in os.environ.items() if not train._chooses_allocator(k)}

FAULTS = """
import resource, sys
sys.path.insert(0, "benchmarks")
from kdvae import train
applied = train.keep_freed_host_memory() if sys.argv[1] == "keep" else None
import steps  # the CNN teacher's step at batch 128: 84 MB of scratch buffer per step
run_5_steps = steps._library_runner("cnn_teacher", 128, (), 5)  # back to back, as fit does
run_5_steps()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    run_5_steps()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def faults_per_step(mode: str) -> tuple[str, float]:
    """(what keep_freed_host_memory returned, minor page faults per step) in a new process."""
    env = {**CLEAN_ENVIRONMENT, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], env=env, capture_output=True,
                          text=True, timeout=300, check=True, cwd=REPO)  # fmt: skip
    applied, faults = done.stdout.split()
    return applied, float(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc, Linux page faults")
def test_keep_freed_host_memory_stops_page_faulting_each_steps_scratch_buffer():
    applied, kept = faults_per_step("keep")
    assert applied == "True"
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        return  # the kernel maps 2 MB pages itself: the default's faults are few too
    _, default = faults_per_step("default")
    assert default > 10_000, default  # glibc unmaps the freed buffer: each step faults it in
    # Reused: glibc 2.36's aligned allocations still strand a freed buffer now and then
    # (0 to 4 steps in 20 faulted it in again, when each step was waited for).
    assert kept < default / 3, (kept, default)


@pytest.mark.parametrize(
    "environment, applied",
    [
        ({"JAX_PLATFORMS": "cpu"}, True),
        ({"JAX_PLATFORMS": "cuda,cpu"}, False),  # JAX may start CUDA as well
        ({"JAX_PLATFORMS": "cpu,cuda"}, False),
        ({"JAX_PLATFORMS": "cpu", "MALLOC_ARENA_MAX": "8"}, False),  # the user's choice
        ({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, False),
    ],
)
def test_keep_freed_host_memory_only_on_the_cpu_and_not_against_the_users_choice(
    environment, applied
):
    code = "from kdvae import train; print(train.keep_freed_host_memory())"
    done = subprocess.run([sys.executable, "-c", code], env={**CLEAN_ENVIRONMENT, **environment},
                          capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    assert done.stdout.strip() == str(applied and GLIBC)


def test_keep_freed_host_memory_is_not_applied_off_glibc_or_after_jax_started(monkeypatch):
    monkeypatch.setattr(train.ctypes, "CDLL", None)  # fails if called
    jnp.ones(1).block_until_ready()  # this process's backend has started
    assert train.keep_freed_host_memory() is False
    monkeypatch.setattr(train, "_backend_started", lambda: False)
    monkeypatch.setattr(train.platform, "libc_ver", lambda: ("", ""))
    assert train.keep_freed_host_memory() is False
