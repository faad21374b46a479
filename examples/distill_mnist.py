"""Knowledge distillation on MNIST (Hinton, Vinyals & Dean 2015), end to end.

Trains a teacher, the small student alone, and the student distilled from the teacher;
prints a table like the paper's and writes results.json, metrics.jsonl, figures and
checkpoints to --workdir.

    python examples/distill_mnist.py                               # quick preset, MNIST
    python examples/distill_mnist.py --data-dir /usr/share/datasets/fashion-mnist \\
        --dataset fashion_mnist                                     # offline IDX files
    python examples/distill_mnist.py --preset paper --omit-classes 3
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import optax
from flax import nnx

from kdvae import cli, config, data, distill, losses, models, train
from kdvae.config import setting

CLASS_IDS = config.Check("class ids in 0..9", lambda ids: all(0 <= k < 10 for k in ids))
EPOCHS, LEARNING_RATE = config.between(1, 10_000), config.positive_up_to(1.0)
TEMPERATURE = config.between(*losses.TEMPERATURE_RANGE)
STAGES = ("teacher", "student", "distilled")


@dataclasses.dataclass(frozen=True)
class Settings(cli.Common):
    """Every setting of a run, each declared once; the defaults are the quick preset."""

    PRESETS = {
        # Under 10 minutes on 2 CPU cores. The teacher is a CNN, clearly stronger than
        # the 2x800 student (an MLP teacher is not, on Fashion-MNIST). T and alpha were
        # chosen on Fashion-MNIST's validation split (see the README).
        "quick": {},
        # Hinton et al. 2015, section 3: 784-1200-1200-10 teacher with dropout, max-norm
        # and inputs jittered by up to 2 pixels; T = 20; a small hard-label weight.
        "paper": dict(
            teacher="hinton_teacher",
            teacher_epochs=60,
            student_epochs=60,
            temperature=20.0,
            alpha=0.1,
            teacher_jitter=2,
        ),
    }
    workdir: str = setting(
        "runs/distill", "where outputs and checkpoints go", check=config.NON_EMPTY, training=False
    )
    preset: str = setting("quick", "quick (< 10 min on a CPU) or paper", choices=tuple(PRESETS))
    teacher: str = setting("cnn_teacher", "teacher model", choices=tuple(models.CLASSIFIER_PRESETS))
    student: str = setting(
        "hinton_student", "student model", choices=tuple(models.CLASSIFIER_PRESETS)
    )
    teacher_epochs: int = setting(10, "the teacher's epochs", check=EPOCHS)
    student_epochs: int = setting(30, "each student's epochs", check=EPOCHS)
    temperature: float = setting(8.0, "distillation temperature T", check=TEMPERATURE)
    alpha: float = setting(
        0.5,
        "weight of the HARD-label term",
        check=config.between(0, 1, "in [0, 1] (the hard-label weight)"),
    )
    soft_loss: str = setting("kl", "soft term: KL or soft cross-entropy", choices=("kl", "ce"))
    batch_size: int = setting(128, "global batch size", check=config.between(1, 65536))
    learning_rate: float = setting(1e-3, "Adam learning rate", check=LEARNING_RATE, flag="lr")
    teacher_jitter: int = setting(
        0,
        "jitter the teacher's inputs by up to N pixels",
        check=config.between(0, 13, "0..13 pixels"),
    )
    cache_teacher: bool = setting(
        True,
        "compute the teacher's logits once for the transfer set, or run the teacher in every step",
    )
    teacher_checkpoint: str | None = setting(
        None, "reuse a trained teacher: <workdir>/teacher/checkpoints", check=config.NON_EMPTY
    )
    omit_classes: tuple[int, ...] = setting(
        (), "e.g. 3: remove from the transfer set", check=CLASS_IDS
    )
    keep_classes: tuple[int, ...] | None = setting(
        None, "e.g. 7,8: keep only these", check=CLASS_IDS
    )
    transfer_size: int | None = setting(
        None,
        "students see only the first N training images (teacher: all)",
        check=config.between(1, 10**7),
    )

    def check(self):
        if self.omit_classes and self.keep_classes:
            raise config.ConfigError("give --omit-classes or --keep-classes, not both.")


# ----------------------------------------------------------------------- the stages


def transfer_set(ds: data.Dataset, s: Settings) -> data.Split:
    """The students' training rows: the training split less the omitted classes, and
    only the first ``--transfer-size`` of them (Hinton et al., section 5)."""
    transfer = data.filter_classes(ds.train, omit=s.omit_classes, keep=s.keep_classes)
    if s.transfer_size is not None:
        transfer = transfer.select(np.arange(min(s.transfer_size, len(transfer))))
    return transfer


class Run(NamedTuple):
    """What every stage of one run shares: its settings, data and metrics log."""

    settings: Settings
    ds: data.Dataset
    data_id: dict  # data.fingerprint(ds): stored with every checkpoint
    log: train.MetricsLog | None = None

    def stored(self, preset: str) -> dict:
        """What a stage's checkpoints store, and a resume must match: the settings, the
        model and the data."""
        model = models.CLASSIFIER_PRESETS[preset].to_dict()
        return {**self.settings.training(), "model": model, "data": self.data_id}

    def checkpoints(self, stage: str) -> Path:
        return Path(self.settings.workdir) / stage / "checkpoints"


def train_stage(run: Run, name: str, preset: str, loss_fn, rows: dict, context=None):
    """One model trained from scratch on ``rows``: its best model (on validation) and fit."""
    s, index = run.settings, STAGES.index(name)
    epochs = s.teacher_epochs if name == "teacher" else s.student_epochs
    model = distill.make_classifier(preset, s.seed, index)
    steps = max(len(rows["labels"]) // s.batch_size, 1)
    tx = optax.adam(optax.cosine_decay_schedule(s.learning_rate, epochs * steps))
    trainer = train.Trainer(model, tx, loss_fn)
    with train.Checkpointer(run.checkpoints(name)) as checkpointer:
        stage = train.Stage(name, checkpointer, run.log, run.stored(preset), s.resume, s.progress)
        loop = train.Loop(epochs, s.batch_size, s.seed + 1000 * index)
        evaluate = distill.validation_accuracy(run.ds)
        fitted = train.fit(trainer, rows, loop, evaluate=evaluate, context=context, stage=stage)
    return trainer.best_model(fitted), fitted


def distilled_stage(run: Run, teacher: nnx.Module, transfer: data.Split):
    """The student trained on the teacher's soft targets (cached, or the live teacher)."""
    s, rows = run.settings, {"images": transfer.images, "labels": transfer.labels}
    objective = distill.distillation_objective(
        temperature=s.temperature,
        alpha=s.alpha,
        soft_loss=s.soft_loss,
        teacher_graphdef=nnx.split(teacher)[0],
    )
    context = None
    if s.cache_teacher:  # the transfer set is not jittered: the logits never change
        rows["teacher_logits"] = distill.predict(teacher, transfer.images)
    else:
        teacher_state = nnx.state(teacher)  # fit places the context on its mesh

        def context(epoch):
            return {"teacher": teacher_state}

    return train_stage(run, "distilled", s.student, objective, rows, context)


# ----------------------------------------------------------------------- the experiment


def experiment(s: Settings, ds: data.Dataset | None = None) -> dict:
    """Teacher, student alone, distilled student: their results (also in results.json)."""
    # 1. Data: the teacher learns from the training split, the students from the transfer set.
    ds = ds or data.load_dataset(s.dataset, data_dir=s.data_dir, val_size=s.val_size)
    if ds.num_classes == 0:
        raise config.ConfigError(f"{ds.name} has no labels; distillation needs labels.")
    transfer = transfer_set(ds, s)
    run = Run(s, ds, data.fingerprint(ds))
    teacher = check_before_writing(run, transfer)  # the reused teacher, if any
    with train.claim_workdir(s.workdir, resume=s.resume) as log:
        return train_and_report(run._replace(log=log), transfer, teacher)


def check_before_writing(run: Run, transfer: data.Split) -> nnx.Module | None:
    """Every check that can refuse the run, before its first file is written: batch
    sizes, the reused teacher, and that resumed stages match these settings and data."""
    s, mesh = run.settings, train.data_mesh()
    train.check_batch_size(s.batch_size, len(transfer), mesh)
    if not s.teacher_checkpoint:
        train.check_batch_size(s.batch_size, len(run.ds.train), mesh)
    stages = {"student": s.student, "distilled": s.student}
    if not s.teacher_checkpoint:
        stages["teacher"] = s.teacher
    for name, preset in stages.items():
        train.check_resumable(run.checkpoints(name), run.stored(preset))
    if s.teacher_checkpoint:
        return distill.load_teacher(s.teacher_checkpoint, s.teacher, data=run.data_id)
    return None


def train_and_report(run: Run, transfer: data.Split, teacher: nnx.Module | None) -> dict:
    """The three stages, their test results and the unseen-class report; results.json."""
    s, ds, results, t0 = run.settings, run.ds, {}, time.perf_counter()
    # 2. The teacher, on the hard labels (unless reused).
    fitted = None
    if teacher is None:
        objective = distill.classification_loss(jitter_pixels=s.teacher_jitter)
        rows = {"images": ds.train.images, "labels": ds.train.labels}
        teacher, fitted = train_stage(run, "teacher", s.teacher, objective, rows)
    results["teacher"] = distill.summary(teacher, ds, fitted, time.perf_counter() - t0)

    # 3. The student alone, on the hard labels of the transfer set: the baseline.
    t0, rows = time.perf_counter(), {"images": transfer.images, "labels": transfer.labels}
    student, fitted = train_stage(run, "student", s.student, distill.classification_loss(), rows)
    results["student"] = distill.summary(student, ds, fitted, time.perf_counter() - t0)

    # 4. The same student, distilled from the teacher.
    t0 = time.perf_counter()
    distilled, fitted = distilled_stage(run, teacher, transfer)
    results["distilled"] = distill.summary(distilled, ds, fitted, time.perf_counter() - t0)

    # 5. Report: test errors, and the classes the students never saw.
    results["teacher_margin_errors"] = (
        results["student"]["test_errors"] - results["teacher"]["test_errors"]
    )
    unseen = sorted(set(range(ds.num_classes)) - set(np.unique(transfer.labels).tolist()))
    if unseen:
        results["unseen"] = {
            name: distill.unseen_report(model, ds, unseen)
            for name, model in (("student", student), ("distilled", distilled))
        }
    results |= {"config": s.to_dict(), "data": run.data_id}
    results["devices"] = [str(d) for d in jax.devices()]
    train.check_finite_results(results)
    if jax.process_index() == 0:  # one writer in a multi-host run
        train.write_json(Path(s.workdir) / "results.json", results)
        distill.figures(Path(s.workdir), teacher, ds, run.log)
    return results


def main(argv: list[str] | None = None) -> int:
    settings = config.parse(Settings, argv, description=__doc__)
    with cli.errors_exit():
        cli.check_workdir(Path(settings.workdir), STAGES, settings.resume)
        cli.setup(settings.distributed)
        results = experiment(settings)
        print(distill.format_table(results))
        print(f"results, metrics, figures and checkpoints in {settings.workdir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
