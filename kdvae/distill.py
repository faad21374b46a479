"""The pieces of a distillation experiment: objectives, a reused teacher, evaluation.

``examples/distill_mnist.py`` wires them: a teacher, the small student alone on the
hard labels, and the same student distilled from the teacher's soft targets (Hinton,
Vinyals & Dean 2015). Every choice (best epoch, the unseen-class bias shift) is made on
the validation split; the test split is only reported.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdvae import data, losses, models, train

__all__ = [
    "bias_shift",
    "classification_loss",
    "distillation_objective",
    "format_table",
    "load_teacher",
    "make_classifier",
    "predict",
    "summary",
    "unseen_report",
]


# ------------------------------------------------------------------------ objectives


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def classification_loss(*, jitter_pixels: int = 0):
    """Softmax cross-entropy with the integer labels (a teacher, or a student alone).

    A :mod:`kdvae.train` loss function: ``batch["images"]`` uint8 ``[B, 28, 28, 1]`` and
    ``batch["labels"]`` int ``[B]``; the images are jittered by up to ``jitter_pixels``.
    """

    def loss_fn(model: nnx.Module, batch: dict, key: jax.Array, context: Any):
        jitter_key, dropout_key = jax.random.split(key)
        x = data.jitter(jitter_key, data.to_unit_float(batch["images"]), max_shift=jitter_pixels)
        logits = model(x, key=dropout_key)
        loss = losses.tempered_cross_entropy(logits, batch["labels"]).mean()
        return loss, {"accuracy": _accuracy(logits, batch["labels"])}

    return loss_fn


def distillation_objective(
    *,
    temperature: float,
    alpha: float,
    soft_loss: str = "kl",
    teacher_graphdef: nnx.GraphDef | None = None,
    jitter_pixels: int = 0,
):
    """Hinton's objective for a student (:func:`kdvae.losses.distillation_loss`), batch mean.

    ``alpha`` weights the hard-label term. The teacher's logits come from
    ``batch["teacher_logits"]`` when the transfer set's logits were cached, else from
    running the frozen teacher (``nnx.merge(teacher_graphdef, context["teacher"])``, in
    evaluation mode) on the same inputs as the student.
    """
    losses.check_distillation_settings(temperature, alpha, soft_loss)  # now, not at trace

    def loss_fn(model: nnx.Module, batch: dict, key: jax.Array, context: Any):
        jitter_key, dropout_key = jax.random.split(key)
        x = data.jitter(jitter_key, data.to_unit_float(batch["images"]), max_shift=jitter_pixels)
        if "teacher_logits" in batch:
            teacher_logits = batch["teacher_logits"]
        else:
            teacher_logits = nnx.merge(teacher_graphdef, context["teacher"])(x, inference=True)
        logits = model(x, key=dropout_key)
        loss = losses.distillation_loss(
            logits,
            teacher_logits,
            batch["labels"],
            temperature=temperature,
            alpha=alpha,
            soft_loss=soft_loss,
        ).mean()
        agreement = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1))
        return loss, {"accuracy": _accuracy(logits, batch["labels"]), "agreement": agreement}

    return loss_fn


# ------------------------------------------------------------------------ models


def make_classifier(preset: str, seed: int, stage: int) -> nnx.Module:
    """The classifier ``models.CLASSIFIER_PRESETS[preset]``, initialised from
    ``fold_in(key(seed), stage)`` (each stage of a run its own initialisation)."""
    key = jax.random.fold_in(jax.random.key(seed), stage)
    config = models.CLASSIFIER_PRESETS[preset]
    return models.build(lambda rngs: models.make_classifier(config, rngs=rngs), key)


def load_teacher(path: str | Path, preset: str, *, data: dict | None = None) -> nnx.Module:
    """The best model of a finished teacher stage's checkpoints at ``path``.

    Raises ``train.ConfigError`` when the newest checkpoint is not intact, when the
    checkpoint's architecture differs from ``preset``'s, when its training did not
    finish, or when it was trained on other data than ``data`` (a
    :func:`kdvae.data.fingerprint`: its soft targets would leak validation labels);
    ``FileNotFoundError`` when there is no checkpoint.
    """
    # As the checkpoint's JSON holds it: the widths tuple comes back as a list.
    expected = json.loads(json.dumps(models.CLASSIFIER_PRESETS[preset].to_dict()))
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--teacher-checkpoint: no checkpoint found at {path}")
    with train.Checkpointer(path, read_only=True) as checkpointer:
        newest = checkpointer.latest_step()
        newer_damaged = {k: v for k, v in checkpointer.damaged.items() if k > (newest or -1)}
        if newer_damaged:
            step, reason = max(newer_damaged.items())
            raise train.ConfigError(
                f"--teacher-checkpoint {path}: its newest checkpoint (step {step}) is not "
                f"intact ({reason}); retrain the teacher or pass another checkpoint."
            )
        if newest is None:
            raise FileNotFoundError(f"--teacher-checkpoint: no checkpoint found at {path}")
        _check_teacher_meta(path, preset, checkpointer.read_meta(), expected, data)
        graphdef, state = nnx.split(make_classifier(preset, 0, 0))
        restored, _ = checkpointer.restore({"best": state})
    return nnx.merge(graphdef, restored["best"])


def _check_teacher_meta(path, preset: str, meta: dict, expected: dict, data: dict | None):
    saved = meta.get("config", {})
    if saved.get("model") != expected:
        raise train.ConfigError(
            f"--teacher-checkpoint {path} holds a {saved.get('model')} model, but --teacher "
            f"{preset} is {expected}; pass the matching --teacher."
        )
    if not meta.get("complete"):
        raise train.ConfigError(
            f"--teacher-checkpoint {path} is from an unfinished run (epoch {meta.get('epoch')}); "
            "finish it with --resume first."
        )
    if data is not None and saved.get("data") != data:
        found = saved.get("data") or {}
        raise train.ConfigError(
            f"--teacher-checkpoint {path} was trained on other data ({found.get('name')}, rows "
            f"{found.get('rows')}, sha256 {str(found.get('sha256'))[:12]}) than this run's "
            f"({data['name']}, rows {data['rows']}, sha256 {data['sha256'][:12]})."
        )


# ------------------------------------------------------------------------ evaluation


@functools.lru_cache(maxsize=16)
def _predictor(graphdef: nnx.GraphDef):
    """A jitted ``(state, uint8 images [N, 28, 28, 1]) -> logits [N, C]``, in chunks."""

    @jax.jit
    def predict(state, images):
        model = nnx.merge(graphdef, state)
        return train.batched_apply(lambda x: model(data.to_unit_float(x), inference=True), images)

    return predict


def predict(model: nnx.Module, images: np.ndarray | jax.Array) -> np.ndarray:
    """The model's logits ``[N, C]`` for uint8 ``images [N, 28, 28, 1]`` (evaluation mode)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_predictor(graphdef)(state, images))


def _errors(logits: np.ndarray, labels: np.ndarray) -> int:
    return int(np.sum(np.argmax(logits, -1) != labels))


def validation_accuracy(ds: data.Dataset):
    """``evaluate(model, epoch) -> {"val_accuracy": ...}`` for :func:`kdvae.train.fit`."""
    images = jnp.asarray(ds.val.images)

    def evaluate(model: nnx.Module, epoch: int) -> dict[str, float]:
        return {"val_accuracy": 1.0 - _errors(predict(model, images), ds.val.labels) / len(ds.val)}

    return evaluate


def summary(model, ds: data.Dataset, fitted: train.LoopState | None, seconds: float) -> dict:
    """Test errors and accuracy, validation accuracy, parameters, time, best epoch."""
    errors = _errors(predict(model, ds.test.images), ds.test.labels)
    val_errors = _errors(predict(model, ds.val.images), ds.val.labels)
    return {
        "test_errors": errors,
        "test_accuracy": 1.0 - errors / len(ds.test),
        "val_accuracy": 1.0 - val_errors / max(len(ds.val), 1),
        "params": models.count_params(model),
        "seconds": round(seconds, 1),
        "best_epoch": fitted.best_epoch if fitted else None,
    }


def bias_shift(val_logits: np.ndarray, val_labels: np.ndarray, unseen: Sequence[int]) -> float:
    """The shift of the unseen classes' logits that maximises validation accuracy."""
    grid = np.arange(0.0, 15.01, 0.25)
    mask = np.isin(np.arange(val_logits.shape[-1]), unseen)
    accuracy = [np.mean(np.argmax(val_logits + b * mask, -1) == val_labels) for b in grid]
    return float(grid[int(np.argmax(accuracy))])


def unseen_report(model, ds: data.Dataset, unseen: Sequence[int]) -> dict:
    """Test errors on the classes the transfer set lacked, before and after the logit
    bias shift chosen on validation (Hinton et al., section 3)."""
    shift = bias_shift(predict(model, ds.val.images), ds.val.labels, unseen)
    test_logits = predict(model, ds.test.images)
    is_unseen = np.isin(ds.test.labels, unseen)
    mask = np.isin(np.arange(test_logits.shape[-1]), unseen)

    def report(logits):
        wrong = np.argmax(logits, -1) != ds.test.labels
        return {
            "test_errors": int(wrong.sum()),
            "unseen_errors": int(wrong[is_unseen].sum()),
            "unseen_count": int(is_unseen.sum()),
            "unseen_accuracy": float(1.0 - wrong[is_unseen].mean()),
        }

    return {
        "classes": list(unseen),
        "before": report(test_logits),
        "after": {**report(test_logits + shift * mask), "bias_shift": shift},
    }


# ------------------------------------------------------------------------ report


def figures(workdir: Path, teacher: nnx.Module, ds: data.Dataset, log: train.MetricsLog):
    """The temperature, dark-knowledge and training-curve figures."""
    from kdvae import plots

    logits = np.arange(1.0, 6.0)  # an illustrative example: z = 1, ..., 5
    softened = {
        t: np.asarray(losses.tempered_softmax(logits, temperature=t)) for t in (1, 2, 5, 10, 20)
    }
    plots.temperature_figure(workdir / "temperature.png", logits, softened)
    index = int(np.flatnonzero(ds.test.labels == ds.test.labels[0])[0])
    teacher_logits = predict(teacher, ds.test.images[index : index + 1])[0]
    probs = {
        t: np.asarray(losses.tempered_softmax(teacher_logits, temperature=t)) for t in (1, 5, 10)
    }
    plots.dark_knowledge_figure(
        workdir / "dark_knowledge.png",
        probs,
        image=ds.test.images[index],
        class_names=ds.class_names,
        true_label=int(ds.test.labels[index]),
    )
    keys = ("train_loss", "val_accuracy")
    plots.training_curves(workdir / "training_curves.png", log.rows(), keys=keys)


def format_table(results: dict[str, Any]) -> str:
    """Hinton-style table: model, parameters, test errors, accuracies, seconds."""
    header = (
        f"{'model':<10} {'params':>10} {'errors':>7} {'test_acc':>9} {'val_acc':>9} {'seconds':>8}"
    )
    lines = [header, "-" * len(header)]
    for name in ("teacher", "student", "distilled"):
        r = results[name]
        lines.append(
            f"{name:<10} {r['params']:>10,} {r['test_errors']:>7} {r['test_accuracy']:>9.4f}"
            f" {r['val_accuracy']:>9.4f} {r['seconds']:>8.1f}"
        )
    for name, u in results.get("unseen", {}).items():
        b, a = u["before"], u["after"]
        lines.append(
            f"unseen classes {u['classes']} ({name}): {b['test_errors']} errors, "
            f"{b['unseen_accuracy']:.1%} of them right; after a bias shift of "
            f"{a['bias_shift']} (chosen on validation): {a['test_errors']} errors, "
            f"{a['unseen_accuracy']:.1%} right"
        )
    return "\n".join(lines)
