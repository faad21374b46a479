"""Hinton et al.'s MNIST distillation experiment as a library function.

Three stages on the training core: the teacher, the small student trained alone on the
hard labels (the baseline), and the same student distilled from the teacher on the
transfer set. Every choice (best epoch, the unseen-class bias shift) is made on the
validation split; the test split is only reported. ``examples/distill_mnist.py`` is the
command line over :func:`run`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kdvae import data as kdata
from kdvae import losses, models, objectives, train

__all__ = ["PRESETS", "DistillConfig", "format_table", "make_config", "run"]

# Settings each preset fills in; flags given on the command line override them.
PRESETS: dict[str, dict[str, Any]] = {
    # Finishes in under 10 minutes on 2 CPU cores. The teacher is a CNN, clearly
    # stronger than the 2x800 student (an MLP teacher is not, on Fashion-MNIST). T and
    # alpha were chosen on Fashion-MNIST's validation split among T in {2, 4, 8} and
    # alpha in {0.1, 0.5} (see the README).
    "quick": dict(
        teacher="cnn_teacher", teacher_epochs=10, student_epochs=30, temperature=8.0,
        alpha=0.5, batch_size=128, learning_rate=1e-3, teacher_jitter=0,
    ),
    # Hinton et al. 2015, section 3: 784-1200-1200-10 teacher with dropout, max-norm
    # and inputs jittered by up to 2 pixels; 784-800-800-10 student; T = 20 and a small
    # weight on the hard-label term.
    "paper": dict(
        teacher="hinton_teacher", teacher_epochs=60, student_epochs=60, temperature=20.0,
        alpha=0.1, batch_size=128, learning_rate=1e-3, teacher_jitter=2,
    ),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Every setting of one distillation run (stored with its checkpoints)."""

    dataset: str = "mnist"
    data_dir: str | None = None
    workdir: str = "runs/distill"
    seed: int = 0
    preset: str = "quick"
    teacher: str = "cnn_teacher"
    student: str = "hinton_student"
    teacher_epochs: int = 10
    student_epochs: int = 30
    temperature: float = 8.0
    alpha: float = 0.5
    soft_loss: str = "kl"
    batch_size: int = 128
    learning_rate: float = 1e-3
    teacher_jitter: int = 0
    # The students see unjittered images and the teacher runs in evaluation mode, so its
    # logits are the same every epoch: computed once unless False (then in every step).
    cache_teacher: bool = True
    omit_classes: tuple[int, ...] = ()
    keep_classes: tuple[int, ...] | None = None
    teacher_checkpoint: str | None = None
    transfer_size: int | None = None
    val_size: int = 5000
    resume: bool = False
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_config(preset: str = "quick", **overrides: Any) -> DistillConfig:
    """A :class:`DistillConfig` from a preset, with the non-``None`` overrides applied.

    Raises ``ValueError`` naming the bad setting for an unknown preset or model, a
    temperature that is not positive, ``alpha`` outside ``[0, 1]``, and so on.
    """
    if preset not in PRESETS:
        raise train.ConfigError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}.")
    settings = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    config = DistillConfig(preset=preset, **settings)
    _validate(config)
    return config


def _validate(c: DistillConfig) -> None:
    for name in ("teacher", "student"):
        if getattr(c, name) not in models.CLASSIFIER_PRESETS:
            raise train.ConfigError(
                f"--{name} must be one of {sorted(models.CLASSIFIER_PRESETS)}, "
                f"got {getattr(c, name)!r}."
            )
    if not (np.isfinite(c.temperature) and c.temperature > 0):
        raise train.ConfigError(f"--temperature must be a positive number, got {c.temperature}.")
    if not 0.0 <= c.alpha <= 1.0:
        raise train.ConfigError(
            f"--alpha must be in [0, 1] (the hard-label weight), got {c.alpha}."
        )
    for name in ("teacher_epochs", "student_epochs", "batch_size"):
        if getattr(c, name) < 1:
            raise train.ConfigError(
                f"--{name.replace('_', '-')} must be >= 1, got {getattr(c, name)}."
            )
    if not c.learning_rate > 0:
        raise train.ConfigError(f"--lr must be positive, got {c.learning_rate}.")
    if c.omit_classes and c.keep_classes:
        raise train.ConfigError("give --omit-classes or --keep-classes, not both.")
    classes = (*c.omit_classes, *(c.keep_classes or ()))
    if any(not 0 <= k < 10 for k in classes):
        raise train.ConfigError(f"class ids must be in 0..9, got {classes}.")
    if c.soft_loss not in ("kl", "ce"):
        raise train.ConfigError(f"--soft-loss must be 'kl' or 'ce', got {c.soft_loss!r}.")
    if not 0 <= c.teacher_jitter < 14:
        raise train.ConfigError(f"--teacher-jitter must be 0..13 pixels, got {c.teacher_jitter}.")
    if c.transfer_size is not None and c.transfer_size < 1:
        raise train.ConfigError(f"--transfer-size must be >= 1, got {c.transfer_size}.")
    if c.val_size < 1:  # the best epoch and the bias shift are chosen on it
        raise train.ConfigError(f"--val-size must be >= 1, got {c.val_size}.")


# ----------------------------------------------------------------------- helpers


def _optimizer(config: DistillConfig, epochs: int, steps_per_epoch: int):
    schedule = optax.cosine_decay_schedule(config.learning_rate, epochs * steps_per_epoch)
    return optax.adam(schedule)


@functools.lru_cache(maxsize=16)
def _predictor(graphdef: nnx.GraphDef):
    """A jitted ``(state, uint8 images [N, 28, 28, 1]) -> logits [N, C]``, in chunks."""

    @jax.jit
    def predict(state, images):
        model = nnx.merge(graphdef, state)
        return train.batched_apply(
            lambda x: model(objectives.to_unit_float(x), inference=True), images
        )

    return predict


def _logits(model: nnx.Module, images: np.ndarray) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_predictor(graphdef)(state, images))


def _errors(logits: np.ndarray, labels: np.ndarray) -> int:
    return int(np.sum(np.argmax(logits, -1) != labels))


def _summary(model, ds: kdata.Dataset, result: train.FitResult | None, seconds: float) -> dict:
    test_logits = _logits(model, ds.test.images)
    errors = _errors(test_logits, ds.test.labels)
    val_logits = _logits(model, ds.val.images)
    return {
        "test_errors": errors,
        "test_accuracy": 1.0 - errors / len(ds.test),
        "val_accuracy": 1.0 - _errors(val_logits, ds.val.labels) / max(len(ds.val), 1),
        "params": models.count_params(model),
        "seconds": round(seconds, 1),
        "best_epoch": result.best_epoch if result else None,
    }


def _make_model(preset: str, seed: int, stage: int) -> nnx.Module:
    key = jax.random.fold_in(jax.random.key(seed), stage)
    config = models.CLASSIFIER_PRESETS[preset]
    return models.build(lambda rngs: models.make_classifier(config, rngs=rngs), key)


def _train_stage(
    stage: str,
    index: int,
    preset: str,
    loss_fn,
    data: dict[str, Any],
    ds: kdata.Dataset,
    config: DistillConfig,
    epochs: int,
    stage_config: dict,
    log: train.MetricsLog,
    context=None,
) -> tuple[nnx.Module, train.FitResult]:
    model = _make_model(preset, config.seed, index)
    steps = len(data["labels"]) // config.batch_size
    trainer = train.Trainer(model, _optimizer(config, epochs, max(steps, 1)), loss_fn)
    graphdef = nnx.split(model)[0]
    predict = _predictor(graphdef)
    val_images = jnp.asarray(ds.val.images)

    def evaluate(model: nnx.Module, epoch: int) -> dict[str, float]:
        logits = np.asarray(predict(nnx.state(model), val_images))
        return {"val_accuracy": 1.0 - _errors(logits, ds.val.labels) / len(ds.val)}

    checkpointer = train.Checkpointer(Path(config.workdir) / stage / "checkpoints")
    stage_config = {**stage_config, "model": models.CLASSIFIER_PRESETS[preset].to_dict()}
    result = train.fit(
        trainer, data, epochs=epochs, batch_size=config.batch_size,
        seed=config.seed + 1000 * index, evaluate=evaluate, context=context,
        checkpointer=checkpointer, config=stage_config, resume=config.resume, log=log,
        stage=stage, progress=config.progress,
    )  # fmt: skip
    checkpointer.close()
    return nnx.merge(graphdef, result.best_state), result


def load_teacher(
    path: str | Path, preset: str, *, dataset: str | None = None, val_size: int | None = None
) -> nnx.Module:
    """The best model of a finished teacher stage's checkpoints at ``path``.

    Raises ``train.ConfigError`` when the checkpoint's architecture differs from
    ``preset``'s, when its training did not finish, or when it was trained on another
    dataset or validation split (its soft targets would leak validation labels);
    ``FileNotFoundError`` when there is no checkpoint.
    """
    # As the checkpoint's JSON holds it: the widths tuple comes back as a list.
    expected = json.loads(json.dumps(models.CLASSIFIER_PRESETS[preset].to_dict()))
    meta = None
    if Path(path).is_dir():
        checkpointer = train.Checkpointer(path, read_only=True)
        meta = checkpointer.read_meta()
        checkpointer.close()
    if meta is None:
        raise FileNotFoundError(f"--teacher-checkpoint: no checkpoint found at {path}")
    saved = meta.get("config", {})
    found = saved.get("model")
    if found != expected:
        raise train.ConfigError(
            f"--teacher-checkpoint {path} holds a {found} model, but --teacher {preset} "
            f"is {expected}; pass the matching --teacher."
        )
    if not meta.get("complete"):
        raise train.ConfigError(
            f"--teacher-checkpoint {path} is from an unfinished run (epoch {meta.get('epoch')}); "
            "finish it with --resume first."
        )
    for key, value in (("dataset", dataset), ("val_size", val_size)):
        if value is not None and key in saved and saved[key] != value:
            raise train.ConfigError(
                f"--teacher-checkpoint {path} was trained with {key}={saved[key]!r}, this run "
                f"has {key}={value!r}."
            )
    model, _ = train.load_best_model(path, _make_model(preset, 0, 0))
    return model


def _bias_shift(val_logits, val_labels, unseen: Sequence[int]) -> float:
    """The shift of the unseen classes' logits that maximises validation accuracy."""
    grid = np.arange(0.0, 15.01, 0.25)
    mask = np.isin(np.arange(val_logits.shape[-1]), unseen)
    accuracy = [np.mean(np.argmax(val_logits + b * mask, -1) == val_labels) for b in grid]
    return float(grid[int(np.argmax(accuracy))])


def _unseen_report(model, ds: kdata.Dataset, unseen: Sequence[int]) -> dict:
    shift = _bias_shift(_logits(model, ds.val.images), ds.val.labels, unseen)
    test_logits = _logits(model, ds.test.images)
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


# --------------------------------------------------------------------------- run


def run(config: DistillConfig, dataset: kdata.Dataset | None = None) -> dict[str, Any]:
    """Run the three stages; write ``results.json``, ``metrics.jsonl`` and figures.

    Args:
      config: the run's settings (see :func:`make_config`).
      dataset: already loaded data; by default loaded from ``config``.

    Returns:
      The results dict also written to ``<workdir>/results.json``.
    """
    workdir = Path(config.workdir)
    ds = dataset or kdata.load_dataset(
        config.dataset, data_dir=config.data_dir, val_size=config.val_size
    )
    if ds.num_classes == 0:
        raise train.ConfigError(f"{ds.name} has no labels; distillation needs a labeled dataset.")
    # The transfer set: the training split, less any omitted classes.
    transfer = kdata.filter_classes(ds.train, omit=config.omit_classes, keep=config.keep_classes)
    if config.transfer_size is not None:  # Hinton et al. section 5: a small transfer set
        transfer = transfer.select(np.arange(min(config.transfer_size, len(transfer))))
    # Every check that can fail before the first file is written.
    mesh = train.data_mesh()
    if not config.teacher_checkpoint:
        train.check_batch_size(config.batch_size, len(ds.train), mesh)
    train.check_batch_size(config.batch_size, len(transfer), mesh)
    t0 = time.perf_counter()
    if config.teacher_checkpoint:
        teacher = load_teacher(
            config.teacher_checkpoint, config.teacher, dataset=config.dataset,
            val_size=config.val_size,
        )  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    log = train.MetricsLog(workdir / "metrics.jsonl")
    if not config.resume and jax.process_index() == 0:
        log.path.unlink(missing_ok=True)
    # Every stage stores the whole configuration: resuming with any other setting is refused.
    common = config.to_dict()
    results: dict[str, Any] = {}

    # 1. The teacher: trained here, or loaded from --teacher-checkpoint.
    if config.teacher_checkpoint:
        fit_t = None
    else:
        teacher, fit_t = _train_stage(
            "teacher", 0, config.teacher,
            objectives.classification_loss(jitter_pixels=config.teacher_jitter),
            {"images": ds.train.images, "labels": ds.train.labels}, ds, config,
            config.teacher_epochs,
            {**common, "epochs": config.teacher_epochs, "jitter": config.teacher_jitter},
            log,
        )  # fmt: skip
    results["teacher"] = _summary(teacher, ds, fit_t, time.perf_counter() - t0)

    transfer_data = {"images": transfer.images, "labels": transfer.labels}
    unseen = sorted(set(range(ds.num_classes)) - set(np.unique(transfer.labels).tolist()))
    stage_common = {
        **common, "epochs": config.student_epochs, "omit_classes": list(config.omit_classes),
        "keep_classes": None if config.keep_classes is None else list(config.keep_classes),
    }  # fmt: skip

    # 2. The student alone, on the hard labels of the same transfer set.
    t0 = time.perf_counter()
    student, fit_s = _train_stage(
        "student", 1, config.student, objectives.classification_loss(), transfer_data, ds,
        config, config.student_epochs, stage_common, log,
    )  # fmt: skip
    results["student"] = _summary(student, ds, fit_s, time.perf_counter() - t0)

    # 3. The distilled student: the same net and budget, on the teacher's soft targets.
    t0 = time.perf_counter()
    loss_fn = objectives.distillation_objective(
        temperature=config.temperature, alpha=config.alpha, soft_loss=config.soft_loss,
        teacher_graphdef=nnx.split(teacher)[0], jitter_pixels=0,
    )  # fmt: skip
    context = None
    if config.cache_teacher:
        transfer_data["teacher_logits"] = _logits(teacher, transfer.images)
    else:
        teacher_state = nnx.state(teacher)  # fit places the context on its mesh

        def context(epoch):
            return {"teacher": teacher_state}

    distilled, fit_d = _train_stage(
        "distilled", 2, config.student, loss_fn, transfer_data, ds, config,
        config.student_epochs,
        {**stage_common, "temperature": config.temperature, "alpha": config.alpha,
         "soft_loss": config.soft_loss, "teacher": config.teacher},
        log, context,
    )  # fmt: skip
    results["distilled"] = _summary(distilled, ds, fit_d, time.perf_counter() - t0)
    results["teacher_margin_errors"] = (
        results["student"]["test_errors"] - results["teacher"]["test_errors"]
    )
    if unseen:
        results["unseen"] = {
            "student": _unseen_report(student, ds, unseen),
            "distilled": _unseen_report(distilled, ds, unseen),
        }
    results["config"] = config.to_dict()
    results["devices"] = [str(d) for d in jax.devices()]
    if jax.process_index() == 0:  # one writer in a multi-host run
        train.write_json(workdir / "results.json", results)
        _figures(workdir, teacher, ds, log)
    return results


def _figures(workdir: Path, teacher: nnx.Module, ds: kdata.Dataset, log: train.MetricsLog):
    """The temperature, dark-knowledge and training-curve figures."""
    from kdvae import plots

    logits = np.arange(1.0, 6.0)  # an illustrative example: z = 1, ..., 5
    softened = {
        t: np.asarray(losses.tempered_softmax(logits, temperature=t)) for t in (1, 2, 5, 10, 20)
    }
    plots.temperature_figure(workdir / "temperature.png", logits, softened)
    index = int(np.flatnonzero(ds.test.labels == ds.test.labels[0])[0])
    teacher_logits = _logits(teacher, ds.test.images[index : index + 1])[0]
    probs = {
        t: np.asarray(losses.tempered_softmax(teacher_logits, temperature=t)) for t in (1, 5, 10)
    }
    plots.dark_knowledge_figure(
        workdir / "dark_knowledge.png", probs, image=ds.test.images[index],
        class_names=ds.class_names, true_label=int(ds.test.labels[index]),
    )  # fmt: skip
    plots.training_curves(workdir / "training_curves.png", log.rows(),
                          keys=("train_loss", "val_accuracy"))  # fmt: skip


def format_table(results: dict[str, Any]) -> str:
    """Hinton-style table: model, parameters, test errors, accuracies, seconds."""
    rows = []
    for name in ("teacher", "student", "distilled"):
        r = results[name]
        rows.append(
            f"{name:<10} {r['params']:>10,} {r['test_errors']:>7} {r['test_accuracy']:>9.4f}"
            f" {r['val_accuracy']:>9.4f} {r['seconds']:>8.1f}"
        )
    header = (
        f"{'model':<10} {'params':>10} {'errors':>7} {'test_acc':>9} {'val_acc':>9} {'seconds':>8}"
    )
    lines = [header, "-" * len(header), *rows]
    for name, u in results.get("unseen", {}).items():
        b, a = u["before"], u["after"]
        lines.append(
            f"unseen classes {u['classes']} ({name}): {b['test_errors']} errors, "
            f"{b['unseen_accuracy']:.1%} of them right; after a bias shift of "
            f"{a['bias_shift']} (chosen on validation): {a['test_errors']} errors, "
            f"{a['unseen_accuracy']:.1%} right"
        )
    return "\n".join(lines)
