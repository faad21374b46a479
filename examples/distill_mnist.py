"""Knowledge distillation on MNIST (Hinton, Vinyals & Dean 2015), end to end.

Trains a teacher, the small student alone, and the student distilled from the teacher;
prints a table like the paper's and writes results.json, metrics.jsonl, figures and
checkpoints to --workdir.

    python examples/distill_mnist.py                               # quick preset, MNIST
    python examples/distill_mnist.py --data-dir /usr/share/datasets/fashion-mnist \
        --dataset fashion_mnist                                     # offline IDX files
    python examples/distill_mnist.py --preset paper --omit-classes 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdvae import cli, distill


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__, default_workdir="runs/distill")
    p.add_argument("--preset", default="quick", help="quick (default, < 10 min on CPU) | paper")
    p.add_argument("--teacher", help="teacher model: cnn_teacher | hinton_teacher | hinton_student")
    p.add_argument("--teacher-epochs", type=int)
    p.add_argument("--student-epochs", type=int)
    p.add_argument("--temperature", type=float, help="distillation temperature T")
    p.add_argument("--alpha", type=float, help="weight of the HARD-label term, in [0, 1]")
    p.add_argument("--soft-loss", choices=("kl", "ce"), help="soft term: KL (default) or CE")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, dest="learning_rate", help="Adam learning rate")
    p.add_argument("--teacher-jitter", type=int, help="jitter the teacher's inputs (pixels)")
    p.add_argument(
        "--cache-teacher",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compute the teacher's logits once for the transfer set (the default), "
        "or run the teacher in every step",
    )
    p.add_argument(
        "--teacher-checkpoint", help="reuse a trained teacher: <workdir>/teacher/checkpoints"
    )
    p.add_argument("--omit-classes", type=cli.int_list, help="e.g. 3: remove from the transfer set")
    p.add_argument(
        "--transfer-size",
        type=int,
        help="students see only the first N training images (teacher: all)",
    )
    p.add_argument("--keep-classes", type=cli.int_list, help="e.g. 7,8: keep only these")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with cli.errors_exit():
        config = distill.make_config(
            args.preset, dataset=args.dataset, data_dir=args.data_dir, workdir=args.workdir,
            seed=args.seed, teacher=args.teacher, teacher_epochs=args.teacher_epochs,
            student_epochs=args.student_epochs, temperature=args.temperature,
            alpha=args.alpha, soft_loss=args.soft_loss, batch_size=args.batch_size,
            learning_rate=args.learning_rate, teacher_jitter=args.teacher_jitter,
            cache_teacher=args.cache_teacher, teacher_checkpoint=args.teacher_checkpoint,
            omit_classes=tuple(args.omit_classes or ()),
            keep_classes=None if args.keep_classes is None else tuple(args.keep_classes),
            transfer_size=args.transfer_size, val_size=args.val_size, resume=args.resume,
            progress=not args.no_progress,
        )  # fmt: skip
        cli.check_workdir(Path(config.workdir), ("teacher", "student", "distilled"), config.resume)
        cli.setup(args.distributed)
        results = distill.run(config)
        print(distill.format_table(results))
        print(f"results, metrics, figures and checkpoints in {config.workdir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
