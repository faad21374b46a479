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

from kdvae import data, losses, models, stats, train

__all__ = [
    "DEFAULT_HYPERPARAMETERS",
    "METHODS",
    "bias_shift",
    "classification_loss",
    "distillation_objective",
    "format_table",
    "load_teacher",
    "make_classifier",
    "method_loss",
    "over_seeds",
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


#: The distillation methods, each a soft term over the logits plus the hard-label
#: cross-entropy (see :func:`method_loss` for their hyperparameters and papers).
METHODS = ("kd", "dkd", "dist", "kd_ls", "reverse_kl", "jsd", "logit_matching")

#: The methods' hyperparameters as their papers set them: DKD's CIFAR-100 runs (T = 4,
#: TCKD weight 1, NCKD weight 8, a 20-epoch warm-up), DIST's ImageNet runs (T = 1, both
#: weights 1), logit standardization's KD runs (base temperature 2, CE weight 0.1 and KD
#: weight 9, so a hard-label share of 0.1 / 9.1), GKD's JSD (beta = 0.5); and Hinton's
#: KD at T = 4 with equal hard and soft weights.
DEFAULT_HYPERPARAMETERS = {
    "temperature": 4.0,
    "alpha": 0.5,
    "soft_loss": "kl",
    "dkd_temperature": 4.0,
    "dkd_alpha": 1.0,
    "dkd_beta": 8.0,
    "dkd_warmup": 20,
    "dist_temperature": 1.0,
    "dist_beta": 1.0,
    "dist_gamma": 1.0,
    "ls_temperature": 2.0,
    "ls_alpha": 0.1 / 9.1,
    "jsd_beta": 0.5,
}


def _hard(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return losses.tempered_cross_entropy(logits, labels).mean()


def method_loss(method: str, hyper: dict[str, Any]):
    """``(student [B, C], teacher [B, C], labels [B], warmup []) -> loss []`` of ``method``.

    ``hyper`` holds the method's hyperparameters (see :data:`DEFAULT_HYPERPARAMETERS`;
    ``warmup`` ramps DKD's weight from 0 to 1, as the paper's code does; the other
    methods ignore it):

    * ``kd`` (Hinton et al. 2015): ``temperature``, ``alpha`` (hard weight),
      ``soft_loss``: :func:`kdvae.losses.distillation_loss`.
    * ``dkd`` (Zhao et al. 2022): CE + ``warmup * (dkd_alpha TCKD + dkd_beta NCKD)`` at
      ``dkd_temperature``: :func:`kdvae.losses.decoupled_kd_loss`.
    * ``dist`` (Huang et al. 2022): CE + DIST with ``dist_beta`` (inter-class),
      ``dist_gamma`` (intra-class) at ``dist_temperature``; one value per batch.
    * ``kd_ls`` (Sun et al. 2024): ``ls_alpha`` CE + ``(1 - ls_alpha)`` KD between the
      standardized logits at the base temperature ``ls_temperature``.
    * ``reverse_kl``, ``jsd`` (GKD, Agarwal et al. 2024) and ``logit_matching`` (Ba &
      Caruana 2014): ``alpha`` CE + ``(1 - alpha)`` soft term, at ``temperature``
      (``jsd_beta`` the teacher's weight in the JSD mixture).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    h = hyper
    if method == "kd":
        return lambda s, t, y, warmup: losses.distillation_loss(
            s, t, y, temperature=h["temperature"], alpha=h["alpha"], soft_loss=h["soft_loss"]
        ).mean()
    soft = _soft_term(method, h)
    if method == "dkd":  # the papers add the cross-entropy at weight 1
        return lambda s, t, y, warmup: _hard(s, y) + warmup * soft(s, t, y)
    if method == "dist":
        return lambda s, t, y, warmup: _hard(s, y) + soft(s, t, y)
    alpha = h["ls_alpha"] if method == "kd_ls" else h["alpha"]
    return lambda s, t, y, warmup: alpha * _hard(s, y) + (1.0 - alpha) * soft(s, t, y)


def _soft_term(method: str, h: dict[str, Any]):
    """The soft term of ``method`` (not ``kd``), a batch mean: ``(student, teacher,
    labels) -> []``."""
    terms = {
        "dkd": lambda s, t, y: losses.decoupled_kd_loss(
            s, t, y, temperature=h["dkd_temperature"], alpha=h["dkd_alpha"], beta=h["dkd_beta"]
        ).mean(),
        "dist": lambda s, t, y: losses.dist_loss(
            s, t, temperature=h["dist_temperature"], beta=h["dist_beta"], gamma=h["dist_gamma"]
        ),
        "kd_ls": lambda s, t, y: losses.distillation_loss(
            losses.standardize_logits(s),
            losses.standardize_logits(t),
            temperature=h["ls_temperature"],
        ).mean(),
        "reverse_kl": lambda s, t, y: losses.reverse_kl_loss(
            s, t, temperature=h["temperature"]
        ).mean(),
        "jsd": lambda s, t, y: losses.generalized_jsd_loss(
            s, t, beta=h["jsd_beta"], temperature=h["temperature"]
        ).mean(),
        "logit_matching": lambda s, t, y: losses.logit_matching_loss(s, t).mean(),
    }
    return terms[method]


def distillation_objective(
    method: str = "kd",
    hyper: dict[str, Any] | None = None,
    *,
    teacher_graphdef: nnx.GraphDef | None = None,
    jitter_pixels: int = 0,
):
    """A student's objective: :func:`method_loss` of ``method``, over a batch.

    The teacher's logits come from ``batch["teacher_logits"]`` when the transfer set's
    logits were cached, else from running the frozen teacher
    (``nnx.merge(teacher_graphdef, context["teacher"])``, in evaluation mode) on the same
    inputs as the student. ``hyper`` overrides :data:`DEFAULT_HYPERPARAMETERS`; DKD's
    term is ramped up over ``dkd_warmup`` epochs from ``context["epoch"]`` (0-based).
    """
    unknown = sorted(set(hyper or {}) - set(DEFAULT_HYPERPARAMETERS))
    if unknown:
        raise ValueError(
            f"hyper has unknown names {unknown}; expected names from "
            f"{sorted(DEFAULT_HYPERPARAMETERS)}."
        )
    hyper = {**DEFAULT_HYPERPARAMETERS, **(hyper or {})}
    if method == "kd":  # now, not at trace time
        losses.check_distillation_settings(hyper["temperature"], hyper["alpha"], hyper["soft_loss"])
    loss_of = method_loss(method, hyper)

    def loss_fn(model: nnx.Module, batch: dict, key: jax.Array, context: Any):
        jitter_key, dropout_key = jax.random.split(key)
        x = data.jitter(jitter_key, data.to_unit_float(batch["images"]), max_shift=jitter_pixels)
        context = context or {}
        if "teacher_logits" in batch:
            teacher_logits = batch["teacher_logits"]
        else:
            teacher_logits = nnx.merge(teacher_graphdef, context["teacher"])(x, inference=True)
        logits = model(x, key=dropout_key)
        epoch = context.get("epoch", hyper["dkd_warmup"])
        warmup = jnp.minimum((epoch + 1) / max(hyper["dkd_warmup"], 1), 1.0)
        loss = loss_of(logits, teacher_logits, batch["labels"], warmup)
        agreement = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1))
        return loss, {"accuracy": _accuracy(logits, batch["labels"]), "agreement": agreement}

    return loss_fn


# ------------------------------------------------------------------------ models


def make_classifier(preset: str, seed: int, stage: int, dtype: str = "float32") -> nnx.Module:
    """The classifier ``models.CLASSIFIER_PRESETS[preset]`` computing in ``dtype``,
    initialised from ``fold_in(key(seed), stage)`` (each stage of a run its own
    initialisation; the same in every dtype)."""
    key = jax.random.fold_in(jax.random.key(seed), stage)
    config = models.CLASSIFIER_PRESETS[preset]
    return models.build(lambda rngs: models.make_classifier(config, dtype=dtype, rngs=rngs), key)


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


def figures(
    workdir: Path,
    teacher: nnx.Module,
    ds: data.Dataset,
    log: train.MetricsLog,
    stages: Sequence[str] | None = None,
):
    """The temperature, dark-knowledge and training-curve (of ``stages``) figures."""
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
    plots.training_curves(workdir / "training_curves.png", log.rows(), keys=keys, stages=stages)


def over_seeds(runs: Sequence[dict], seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """One model's :func:`summary` over seeds: every run's numbers and a
    :func:`kdvae.stats.interval` of the test errors, accuracies and best epochs."""
    out: dict[str, Any] = {"seeds": list(seeds) if seeds is not None else None, "runs": list(runs)}
    out["params"] = runs[0]["params"]
    out["seconds"] = round(sum(r["seconds"] for r in runs), 1)
    for key in ("test_errors", "test_accuracy", "val_accuracy"):
        out[key] = stats.interval([r[key] for r in runs])
    if "unseen" in runs[0]:
        unseen = [r["unseen"] for r in runs]
        out["unseen"] = {"classes": unseen[0]["classes"]}
        for when in ("before", "after"):
            out["unseen"][when] = {
                key: stats.interval([u[when][key] for u in unseen])
                for key in ("test_errors", "unseen_accuracy")
            }
    return out


def _mean_std(summary: dict, digits: int = 1) -> str:
    """``mean ± std`` of a :func:`kdvae.stats.interval` (the mean alone for one value)."""
    if summary["std"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def format_table(results: dict[str, Any]) -> str:
    """Hinton-style table: each model's parameters, test errors (mean ± std over seeds,
    95 % interval), mean accuracies and seconds; the unseen classes, if any."""
    header = (
        f"{'model':<15} {'params':>10} {'test errors':>15} {'95% CI':>17} {'test_acc':>9}"
        f" {'val_acc':>8} {'seeds':>5} {'seconds':>8}"
    )
    lines = [header, "-" * len(header)]
    names = ["teacher", "student", *results.get("methods", [])]
    for name in names:
        r, e = results[name], results[name]["test_errors"]
        ci = "" if e["ci95"] is None else f"[{e['ci95'][0]:.1f}, {e['ci95'][1]:.1f}]"
        lines.append(
            f"{name:<15} {r['params']:>10,} {_mean_std(e):>15} {ci:>17}"
            f" {r['test_accuracy']['mean']:>9.4f} {r['val_accuracy']['mean']:>8.4f}"
            f" {e['n']:>5} {r['seconds']:>8.1f}"
        )
    lines += [
        _unseen_line(name, results[name]["unseen"]) for name in names if "unseen" in results[name]
    ]
    return "\n".join(lines)


def _unseen_line(name: str, u: dict) -> str:
    b, a = u["before"], u["after"]
    return (
        f"unseen classes {u['classes']} ({name}): {_mean_std(b['test_errors'])} errors, "
        f"{b['unseen_accuracy']['mean']:.1%} of them right; after the bias shift chosen on "
        f"validation: {_mean_std(a['test_errors'])} errors, "
        f"{a['unseen_accuracy']['mean']:.1%} right"
    )
