"""Two studies over one finished teacher of ``examples/distill_mnist.py``.

``compare``: the distillation methods over seeds, every hyperparameter chosen on
validation. For each method, every setting of its grid (fixed below, before any run)
trains the student with the first ``--select-seeds`` seeds; the setting with the best
mean validation accuracy (of the best epoch, itself chosen on validation) is then
trained with all ``--seeds`` (``--chosen-from``: no grids, the settings an earlier
comparison chose). The test split is read only for the report, which gives each
model's test errors (mean ± std, Student's t 95 % interval) and each method's
difference to KD with Welch's 95 % interval.

``unseen``: Hinton et al.'s unseen-class experiment, generalized. The student alone and
the KD student are trained on the training split less one class, for each class in
turn, and on a transfer set of only two classes (``--keep``, 7 and 8 as in the paper).
For each case: the accuracy on the classes the transfer set lacked, before and after
the logit bias shift chosen on validation.

    python scripts/distillation_studies.py compare --workdir runs/compare-3000 \\
        --teacher-checkpoint runs/distill/teacher/checkpoints \\
        --dataset fashion_mnist --data-dir /usr/share/datasets/fashion-mnist \\
        --transfer-size 3000
    python scripts/distillation_studies.py unseen --workdir runs/unseen \\
        --teacher-checkpoint runs/distill/teacher/checkpoints \\
        --dataset fashion_mnist --data-dir /usr/share/datasets/fashion-mnist

Any other flag is the example's (``--student-epochs``, ``--temperature``, ...). Each
writes ``<study>.json`` (every run's numbers) and a figure to --workdir
(``comparison.png``, ``unseen_classes.png``); training resumes from its checkpoints when run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import scipy.stats

from kdvae import cli, config, data, distill, plots, train

REPO = Path(__file__).resolve().parent.parent

#: The grids, fixed before any run. DKD's warm-up is scaled from the paper's 20 of its
#: 240 epochs to about 5 of the quick preset's 30.
GRIDS = {
    "student": [{}],
    "kd": [dict(temperature=t, alpha=a) for t in (2.0, 4.0, 8.0) for a in (0.1, 0.5)],
    "dkd": [
        dict(dkd_temperature=t, dkd_beta=b, dkd_warmup=5) for t in (1.0, 4.0) for b in (2.0, 8.0)
    ],
    "dist": [
        dict(dist_temperature=t, dist_beta=w, dist_gamma=w) for t in (1.0, 4.0) for w in (1.0, 2.0)
    ],
    "kd_ls": [dict(ls_temperature=t, ls_alpha=a) for t in (2.0, 4.0) for a in (0.1 / 9.1, 0.1)],
    "reverse_kl": [dict(temperature=t, alpha=0.5) for t in (1.0, 4.0, 8.0)],
}


def load_example():
    path = REPO / "examples" / "distill_mnist.py"
    spec = importlib.util.spec_from_file_location("distill_example", path)
    module = sys.modules["distill_example"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Study:
    """The example's settings, the data and the teacher, shared by every run."""

    def __init__(self, rest: list[str], teacher_checkpoint: str, workdir: str):
        self.ex = load_example()
        self.base = config.parse(self.ex.Settings, [*rest, "--no-progress"])
        s = self.base
        self.ds = data.load_dataset(s.dataset, data_dir=s.data_dir, val_size=s.val_size)
        self.data_id = data.fingerprint(self.ds)
        self.teacher = distill.load_teacher(teacher_checkpoint, s.teacher, data=self.data_id)
        self.workdir = Path(workdir)

    def runs(self, folder: str, name: str, seeds: range, **settings) -> list[dict]:
        """The student ``name`` (``student`` or a method) under these ``settings``,
        trained (or resumed) in ``<workdir>/<folder>`` at each seed: its runs."""
        s = dataclasses.replace(
            self.base, workdir=str(self.workdir / folder), resume=True, **settings
        )
        run = self.ex.Run(s, self.ds, self.data_id)
        transfer = self.ex.transfer_set(self.ds, s)
        rows, context = self.ex.student_rows(run, self.teacher, transfer)
        with train.claim_workdir(s.workdir, resume=True) as log:
            run = run._replace(log=log)
            return self.ex.student_runs(run, name, seeds, self.teacher, rows, context)

    def write(self, name: str, out: dict) -> None:
        (self.workdir / f"{name}.json").write_text(json.dumps(out, indent=1))


# ------------------------------------------------------------------------- compare


def compare(
    study: Study, methods: list[str], seeds: int, select_seeds: int, chosen: dict | None = None
) -> dict:
    """Each method's grid (or only its setting in ``chosen``) chosen on validation, then
    trained over all ``seeds``."""
    out = {"grids": {}, "chosen": {}, "final": {}}
    for method in methods:
        grid, scores = [chosen[method]] if chosen else GRIDS[method], []
        for i, hyper in enumerate(grid):
            runs = study.runs(f"{method}-{i}", method, range(select_seeds), **hyper)
            scores.append(float(np.mean([r["val_accuracy"] for r in runs])))
            out["grids"].setdefault(method, []).append({"hyper": hyper, "val_accuracy": scores[-1]})
        best = int(np.argmax(scores))
        out["chosen"][method] = grid[best]
        runs = study.runs(f"{method}-{best}", method, range(seeds), **grid[best])
        out["final"][method] = distill.over_seeds(runs, list(range(seeds)))
        print(f"{method}: chosen {grid[best]} (validation {scores[best]:.4f})", flush=True)
    print(compare_table(out))
    errors = {name: r["test_errors"] for name, r in out["final"].items()}
    plots.intervals_figure(study.workdir / "comparison.png", errors)
    study.write("comparison", out)
    return out


def welch(a: list[float], b: list[float]) -> dict:
    """``mean(a) - mean(b)`` with Welch's 95 % interval."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb else 1.0
    half = float(scipy.stats.t.ppf(0.975, dof)) * np.sqrt(va + vb)
    diff = float(a.mean() - b.mean())
    return {"difference": diff, "ci95": [diff - half, diff + half]}


def compare_table(out: dict) -> str:
    """Each model's test errors, and each method's difference to KD (in ``out``)."""
    final = out["final"]
    lines = [f"{'model':<12} {'test errors':>15} {'95% CI':>17} {'val_acc':>8}  minus KD [95% CI]"]
    for method, r in final.items():
        e, vs = r["test_errors"], ""
        if "kd" in final and method != "kd" and e["n"] > 1:
            w = out.setdefault("vs_kd", {})[method] = welch(
                e["values"], final["kd"]["test_errors"]["values"]
            )
            vs = f"{w['difference']:+.1f} [{w['ci95'][0]:+.1f}, {w['ci95'][1]:+.1f}]"
        ci = "" if e["ci95"] is None else f"[{e['ci95'][0]:.1f}, {e['ci95'][1]:.1f}]"
        mean_std = f"{e['mean']:.1f} ± {e['std'] or 0:.1f}"
        lines.append(
            f"{method:<12} {mean_std:>15} {ci:>17} {r['val_accuracy']['mean']:>8.4f}  {vs}"
        )
    return "\n".join(lines)


# -------------------------------------------------------------------------- unseen


def unseen(study: Study, seeds: int, omit: tuple[int, ...] | None, keep: tuple[int, ...]) -> dict:
    omit = range(study.ds.num_classes) if omit is None else omit
    cases = {f"omit {c}": dict(omit_classes=(c,)) for c in omit}
    cases[f"keep {','.join(map(str, keep))}"] = dict(keep_classes=keep)
    out = {}
    for i, (case, settings) in enumerate(cases.items()):
        out[case] = {}
        for name in ("student", "kd"):
            runs = study.runs(f"unseen-{i}", name, range(seeds), **settings)
            out[case][name] = distill.over_seeds(runs, list(range(seeds)))["unseen"]
        print(unseen_line(case, out[case]), flush=True)
    accuracy = {
        f"{label}, {when} the shift": [
            out[case][name][when]["unseen_accuracy"]["mean"] for case in cases
        ]
        for name, label in (("student", "student alone"), ("kd", "distilled"))
        for when in ("before", "after")
    }
    plots.unseen_classes_figure(study.workdir / "unseen_classes.png", list(cases), accuracy)
    study.write("unseen", out)
    return out


def unseen_line(case: str, result: dict) -> str:
    """``case``: the unseen classes' accuracy before and after the shift, per model."""
    parts = [
        f"{name} {r['before']['unseen_accuracy']['mean']:.1%} -> "
        f"{r['after']['unseen_accuracy']['mean']:.1%}"
        for name, r in result.items()
    ]
    return f"{case:<10} " + "; ".join(parts)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", choices=("compare", "unseen"))
    p.add_argument("--workdir", required=True)
    p.add_argument("--teacher-checkpoint", required=True)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--select-seeds", type=int, default=2, help="compare: seeds per setting")
    p.add_argument("--compare-methods", default=",".join(GRIDS), help="compare: which")
    p.add_argument(
        "--chosen-from", help="compare: no grids; the settings chosen in this comparison.json"
    )
    p.add_argument("--omit", type=config.int_list, help="unseen: these classes (default all)")
    p.add_argument("--keep", type=config.int_list, default=(7, 8), help="unseen: two classes")
    args, rest = p.parse_known_args(argv)
    with cli.errors_exit():  # one line and an exit status; a signal stops after a checkpoint
        study = Study(rest, args.teacher_checkpoint, args.workdir)
        if args.study == "unseen":
            return unseen(study, args.seeds, args.omit, args.keep)
        chosen = None
        if args.chosen_from:
            chosen = json.loads(Path(args.chosen_from).read_text())["chosen"]
        methods = args.compare_methods.split(",")
        return compare(study, methods, args.seeds, args.select_seeds, chosen)


if __name__ == "__main__":
    main()
