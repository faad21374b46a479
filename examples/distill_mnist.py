"""Knowledge distillation on MNIST (Hinton, Vinyals & Dean 2015), end to end.

Trains a teacher, the small student alone, and the student distilled from the teacher;
prints a table like the paper's and writes results.json, metrics.jsonl, figures and
checkpoints to --workdir.

    python examples/distill_mnist.py                               # quick preset, MNIST
    python examples/distill_mnist.py --data-dir /usr/share/datasets/fashion-mnist \\
        --dataset fashion_mnist                                     # offline IDX files
    python examples/distill_mnist.py --preset paper --omit-classes 3
    python examples/distill_mnist.py --methods kd,dkd,dist,kd_ls --seeds 5  # a comparison

The teacher is trained once (with --seed); the student alone and each distilled
student are trained once per seed (--seed, --seed + 1, ...), and the table reports
each model's test errors as mean +- standard deviation with a 95 % confidence interval.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kdvae import cli, config, data, distill, losses, models, train
from kdvae.config import setting

CLASS_IDS = config.Check("class ids in 0..9", lambda ids: all(0 <= k < 10 for k in ids))
EPOCHS, LEARNING_RATE = config.between(1, 10_000), config.positive_up_to(1.0)
TEMPERATURE = config.between(*losses.TEMPERATURE_RANGE)
# Each model's initialisation is drawn from fold_in(key(seed), index): the distilled
# students of one seed share theirs (the methods compared from one starting point).
INIT_INDEX = {"teacher": 0, "student": 1, "distilled": 2}
METHOD_LIST = config.Check(
    f"comma-separated methods from {', '.join(distill.METHODS)}",
    lambda methods: 0 < len(methods) == len(set(methods)) and set(methods) <= set(distill.METHODS),
)
HYPER = distill.DEFAULT_HYPERPARAMETERS  # the papers' values: declared in kdvae.distill
WEIGHT, UNIT = config.between(0, 1000), config.between(0, 1)


@dataclasses.dataclass(frozen=True)
class Settings(cli.Common):
    """Every setting of a run, each declared once; the defaults are the quick preset."""

    PRESETS = {
        # Under 5 minutes on 2 CPU cores. The teacher is a CNN, clearly stronger than
        # the 2x800 student (an MLP teacher is not, on Fashion-MNIST). Its schedule, T
        # and alpha were chosen on Fashion-MNIST's validation split (see the README).
        "quick": {},
        # Hinton et al. 2015, section 3: 784-1200-1200-10 teacher with dropout, max-norm
        # and inputs jittered by up to 2 pixels; T = 20; a small hard-label weight.
        "paper": dict(
            teacher="hinton_teacher",
            teacher_epochs=60,
            teacher_lr=None,
            teacher_warmup_fraction=0.0,
            student_epochs=60,
            temperature=20.0,
            alpha=0.1,
            teacher_jitter=2,
        ),
    }
    workdir: str = setting(
        "runs/distill", "where outputs and checkpoints go", check=config.NON_EMPTY, training=False
    )
    preset: str = setting("quick", "quick (< 5 min on 2 cores) or paper", choices=tuple(PRESETS))
    teacher: str = setting("cnn_teacher", "teacher model", choices=tuple(models.CLASSIFIER_PRESETS))
    student: str = setting(
        "hinton_student", "student model", choices=tuple(models.CLASSIFIER_PRESETS)
    )
    teacher_epochs: int = setting(6, "the teacher's epochs", check=EPOCHS)
    student_epochs: int = setting(30, "each student's epochs", check=EPOCHS)
    temperature: float = setting(8.0, "distillation temperature T", check=TEMPERATURE)
    alpha: float = setting(
        0.5,
        "weight of the HARD-label term",
        check=config.between(0, 1, "in [0, 1] (the hard-label weight)"),
    )
    soft_loss: str = setting("kl", "soft term: KL or soft cross-entropy", choices=("kl", "ce"))
    methods: tuple[str, ...] = setting(
        ("kd",),
        "distillation methods, each a student (kd: Hinton; dkd; dist; kd_ls: KD with logit "
        "standardization; reverse_kl, jsd and logit_matching use --temperature and --alpha)",
        check=METHOD_LIST,
        training=False,
    )
    seeds: int = setting(
        1,
        "train each student with N seeds (--seed, --seed + 1, ...); the teacher once",
        check=config.between(1, 100),
        training=False,
    )
    dkd_temperature: float = setting(HYPER["dkd_temperature"], "DKD's T", check=TEMPERATURE)
    dkd_alpha: float = setting(HYPER["dkd_alpha"], "DKD's TCKD weight", check=WEIGHT)
    dkd_beta: float = setting(HYPER["dkd_beta"], "DKD's NCKD weight", check=WEIGHT)
    dkd_warmup: int = setting(
        HYPER["dkd_warmup"], "epochs over which DKD's weight ramps up", check=EPOCHS
    )
    dist_temperature: float = setting(HYPER["dist_temperature"], "DIST's T", check=TEMPERATURE)
    dist_beta: float = setting(HYPER["dist_beta"], "DIST's inter-class weight", check=WEIGHT)
    dist_gamma: float = setting(HYPER["dist_gamma"], "DIST's intra-class weight", check=WEIGHT)
    ls_temperature: float = setting(
        HYPER["ls_temperature"], "kd_ls's base temperature", check=TEMPERATURE
    )
    ls_alpha: float = setting(HYPER["ls_alpha"], "kd_ls's hard-label weight", check=UNIT)
    jsd_beta: float = setting(HYPER["jsd_beta"], "the teacher's weight in the JSD", check=UNIT)
    batch_size: int = setting(128, "global batch size", check=config.between(1, 65536))
    learning_rate: float = setting(
        1e-3,
        "Adam learning rate (the teacher's too, without --teacher-lr)",
        check=LEARNING_RATE,
        flag="lr",
    )
    teacher_lr: float | None = setting(
        2e-3,
        "the teacher's peak Adam learning rate (the paper preset: none, the teacher uses --lr)",
        check=LEARNING_RATE,
        legacy=None,
    )
    teacher_warmup_fraction: float = setting(
        round(1 / 6, 4),
        "fraction of the teacher's steps spent warming its learning rate up from 0, "
        "before its cosine decay (the quick preset's: its first epoch)",
        check=config.between(0, 0.5, "in [0, 0.5]"),
        legacy=0.0,
    )
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


def stage_name(name: str, seed: int | None) -> str:
    """``teacher``, or a student's ``<model>/seed_<seed>`` (its metrics and checkpoints)."""
    return name if seed is None else f"{name}/seed_{seed}"


def all_stages(s: Settings) -> list[str]:
    teacher = [] if s.teacher_checkpoint else ["teacher"]
    students = [stage_name(n, k) for n in ("student", *s.methods) for k in seeds(s)]
    return teacher + students


def seeds(s: Settings) -> range:
    return range(s.seed, s.seed + s.seeds)


def train_stage(run: Run, name: str, rows: dict, loss_fn, context=None, seed=None):
    """One model trained from scratch on ``rows``: its best model (on validation) and fit.

    The teacher (``seed=None``) uses ``--seed``; every distilled student of one seed
    starts from the same initialisation, the student alone from another.
    """
    s, index = run.settings, INIT_INDEX.get(name, INIT_INDEX["distilled"])
    preset, seed = (s.teacher, s.seed) if seed is None else (s.student, seed)
    epochs = s.teacher_epochs if name == "teacher" else s.student_epochs
    model = distill.make_classifier(preset, seed, index, s.dtype)
    steps = max(len(rows["labels"]) // s.batch_size, 1)
    tx = optax.adam(learning_rate_schedule(s, name, epochs * steps))
    trainer = train.Trainer(model, tx, loss_fn)
    stage_id = stage_name(name, None if name == "teacher" else seed)
    with train.Checkpointer(run.checkpoints(stage_id)) as checkpointer:
        stored = run.stored(preset)
        stage = train.Stage(stage_id, checkpointer, run.log, stored, s.resume, s.progress)
        loop = train.Loop(epochs, s.batch_size, seed + 1000 * index)
        evaluate = distill.validation_accuracy(run.ds)
        fitted = train.fit(trainer, rows, loop, evaluate=evaluate, context=context, stage=stage)
    return models.with_dtype(trainer.best_model(fitted), "float32"), fitted  # evaluated in f32


def learning_rate_schedule(s: Settings, name: str, total: int):
    """Cosine decay to 0 over the ``total`` steps, from ``--lr``; the teacher's from
    ``--teacher-lr`` (if set), after a linear warm-up over ``--teacher-warmup-fraction``
    of its steps."""
    teacher = name == "teacher"
    peak = (s.teacher_lr or s.learning_rate) if teacher else s.learning_rate
    warmup = round(s.teacher_warmup_fraction * total) if teacher else 0
    if not warmup:
        return optax.cosine_decay_schedule(peak, total)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total)


def student_rows(run: Run, teacher: nnx.Module, transfer: data.Split) -> tuple[dict, object]:
    """The transfer set's rows and the distilled students' context (``epoch -> pytree``):
    the teacher's logits cached in the rows, or the live teacher in the context."""
    rows = {"images": transfer.images, "labels": transfer.labels}
    if run.settings.cache_teacher:  # the transfer set is not jittered: the logits never change
        rows["teacher_logits"] = distill.predict(teacher, transfer.images)
        return rows, lambda epoch: {"epoch": jnp.int32(epoch)}
    teacher_state = nnx.state(teacher)  # fit places the context on its mesh
    return rows, lambda epoch: {"epoch": jnp.int32(epoch), "teacher": teacher_state}


def train_student(run: Run, name: str, seed: int, teacher, rows: dict, context):
    """The student alone (``name`` "student", on the hard labels of ``rows``) or
    distilled by the method ``name``, at ``seed``: its best model and fit."""
    if name == "student":
        plain = {"images": rows["images"], "labels": rows["labels"]}
        return train_stage(run, name, plain, distill.classification_loss(), seed=seed)
    return distilled_stage(run, name, teacher, rows, context, seed)


def distilled_stage(run: Run, method: str, teacher, rows: dict, context, seed: int):
    """The student trained on the teacher's soft targets by ``method``."""
    s = run.settings
    hyper = {k: getattr(s, k) for k in distill.DEFAULT_HYPERPARAMETERS}
    graphdef = nnx.split(teacher)[0]
    objective = distill.distillation_objective(method, hyper, teacher_graphdef=graphdef)
    return train_stage(run, method, rows, objective, context, seed)


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
    for name in all_stages(s):
        train.check_resumable(
            run.checkpoints(name), run.stored(s.teacher if name == "teacher" else s.student)
        )
    if s.teacher_checkpoint:
        return distill.load_teacher(s.teacher_checkpoint, s.teacher, data=run.data_id)
    return None


def train_and_report(run: Run, transfer: data.Split, teacher: nnx.Module | None) -> dict:
    """The teacher, then each student over the seeds; their test results, the
    unseen-class report and results.json."""
    s, ds, t0 = run.settings, run.ds, time.perf_counter()
    # 2. The teacher, on the hard labels (unless reused).
    fitted = None
    if teacher is None:
        objective = distill.classification_loss(jitter_pixels=s.teacher_jitter)
        rows = {"images": ds.train.images, "labels": ds.train.labels}
        teacher, fitted = train_stage(run, "teacher", rows, objective)
    results = {
        "teacher": distill.over_seeds(
            [distill.summary(teacher, ds, fitted, time.perf_counter() - t0)]
        )
    }

    # 3. The student alone on the transfer set's hard labels (the baseline), and the same
    # student distilled by each method; each once per seed.
    rows, context = student_rows(run, teacher, transfer)
    for name in ("student", *s.methods):
        runs = student_runs(run, name, seeds(s), teacher, rows, context)
        results[name] = distill.over_seeds(runs, list(seeds(s)))
    return write_results(run, results, teacher)


def student_runs(run: Run, name: str, seeds: range, teacher, rows: dict, context) -> list:
    """The student ``name`` trained at each seed: each run's :func:`distill.summary`, and
    its report on the classes ``rows`` lack (if any)."""
    ds = run.ds
    unseen = sorted(set(range(ds.num_classes)) - set(np.unique(rows["labels"]).tolist()))
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        model, fitted = train_student(run, name, seed, teacher, rows, context)
        runs.append(distill.summary(model, ds, fitted, time.perf_counter() - t0))
        if unseen:
            runs[-1]["unseen"] = distill.unseen_report(model, ds, unseen)
    return runs


def write_results(run: Run, results: dict, teacher: nnx.Module) -> dict:
    """results.json and the figures (from one process)."""
    s = run.settings
    results["methods"] = list(s.methods)
    results |= {"config": s.to_dict(), "data": run.data_id}
    results["devices"] = [str(d) for d in jax.devices()]
    train.check_finite_results(results)
    if jax.process_index() == 0:  # one writer in a multi-host run
        train.write_json(Path(s.workdir) / "results.json", results)
        first = ["teacher"] + [stage_name(n, s.seed) for n in ("student", *s.methods)]
        if s.figures:
            distill.figures(Path(s.workdir), teacher, run.ds, run.log, stages=first)
    return results


def main(argv: list[str] | None = None) -> int:
    settings = config.parse(Settings, argv, description=__doc__)
    with cli.errors_exit():
        cli.check_workdir(Path(settings.workdir), all_stages(settings), settings.resume)
        cli.setup(settings.distributed)
        results = experiment(settings)
        print(distill.format_table(results))
        figures = "figures and " if settings.figures else ""
        print(f"results, metrics, {figures}checkpoints in {settings.workdir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
