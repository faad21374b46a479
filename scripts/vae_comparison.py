"""Burda et al.'s comparison (IWAE, 2016, table 1), reproduced with the VAE example.

Four models of one architecture (the example's ``iwae`` preset: 2x200 tanh, 50 latents),
trained for the same epochs with dynamic binarization and Adam at Burda et al.'s initial
learning rate, 1e-3 (decayed by a cosine), each over ``--seeds`` seeds:

- ``vae``: the ELBO (k = 1);
- ``iwae_k5``, ``iwae_k50``: Burda et al.'s bound with k = 5 and 50;
- ``iwae_k50_dreg``: k = 50 with Tucker et al.'s doubly reparameterized gradient.

Each is evaluated on the same binarized test images: the NLL by importance sampling at
``--eval-k`` (5000, as in the paper) with its standard errors, the negative ELBO, the
active units and the training time. A model's seed ``s`` starts from the same
initialisation and data order as every other model's seed ``s``, so each model's
difference to the VAE is paired over seeds (Student's t 95 % interval of the per-seed
differences). Every setting is fixed here; nothing is chosen on test.

    python scripts/vae_comparison.py --workdir runs/burda --seeds 3 --epochs 10 \\
        --dataset fashion_mnist --data-dir /usr/share/datasets/fashion-mnist

Any other flag is the example's (``--eval-examples``, ``--batch-size``, ...). It writes
``burda.json`` (every run's numbers) to --workdir; the training resumes from its
checkpoints when run again.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

from kdvae import cli, config, stats

REPO = Path(__file__).resolve().parent.parent

#: The four models, fixed before any run: the example's flags for each.
MODELS = {
    "vae": ["--objective", "elbo"],
    "iwae_k5": ["--objective", "iwae", "--k", "5"],
    "iwae_k50": ["--objective", "iwae", "--k", "50"],
    "iwae_k50_dreg": ["--objective", "iwae", "--k", "50", "--gradient", "dreg"],
}

#: What the table reports of each model, over seeds.
COLUMNS = ("test_nll", "test_nll_mc_se", "test_nll_data_se", "test_neg_elbo", "active_units",
           "seconds")  # fmt: skip


def load_example():
    path = REPO / "examples" / "vae_mnist.py"
    spec = importlib.util.spec_from_file_location("vae_example", path)
    module = sys.modules["vae_example"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_model(
    example, name: str, workdir: Path, seeds: int, eval_k: int, rest: list[str]
) -> dict:
    """Model ``name`` trained (or resumed) and evaluated in ``<workdir>/<name>``: its
    ``results.json``. A finished run is read back only when every setting it was run
    with (seeds, epochs, data, k, ...) is the one asked for now."""
    folder = workdir / name
    argv = ["--preset", "iwae", "--lr", "1e-3", *MODELS[name], "--seeds", str(seeds),
            "--workdir", str(folder), "--eval-k", str(eval_k), "--no-progress", *rest]  # fmt: skip
    done = folder / "results.json"
    if done.exists() and _same_run(json.loads(done.read_text())["config"], example, argv):
        return json.loads(done.read_text())
    argv += ["--resume"] if folder.exists() else []
    with contextlib.redirect_stdout(io.StringIO()):  # the study prints its own table
        code = example.main(argv)
    if code:
        raise SystemExit(code)
    return json.loads((folder / "results.json").read_text())


def _same_run(stored: dict, example, argv: list[str]) -> bool:
    """Whether a run stored with the settings ``stored`` is the run ``argv`` asks for."""
    wanted = json.loads(json.dumps(config.parse(example.Settings, argv).to_dict()))  # as stored
    return {k: v for k, v in stored.items() if k != "resume"} == {
        k: v for k, v in wanted.items() if k != "resume"
    }


def summarize(results: dict[str, dict]) -> dict:
    """Each model's columns over seeds, and its NLL and ELBO minus the VAE's, paired by
    seed (every model must have run the VAE's seeds)."""
    runs = {name: r.get("runs", [r]) for name, r in results.items()}
    out = {name: {c: stats.interval([run[c] for run in rs]) for c in COLUMNS}
           for name, rs in runs.items()}  # fmt: skip
    if "vae" not in runs:
        return out
    vae = {run["seed"]: run for run in runs["vae"]}
    for name, rs in runs.items():
        if name == "vae":
            continue
        by_seed = {run["seed"]: run for run in rs}
        if set(by_seed) != set(vae):
            raise ValueError(
                f"{name} ran seeds {sorted(by_seed)} and vae {sorted(vae)}; "
                "the paired differences need the same seeds."
            )
        for column in ("test_nll", "test_neg_elbo"):
            diff = [by_seed[seed][column] - vae[seed][column] for seed in sorted(vae)]
            out[name][f"{column}_minus_vae"] = stats.interval(diff)
    return out


def _cell(s: dict, digits: int = 2) -> str:
    if s["std"] is None:
        return f"{s['mean']:.{digits}f}"
    low, high = s["ci95"]
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def table(summary: dict, eval_k: int, eval_examples: int) -> str:
    """A Markdown table of :func:`summarize`'s numbers."""
    head = [f"model | test NLL (k = {eval_k}, {eval_examples} images) | its MC s.e. | "
            "s.e. over images | NLL minus VAE's (paired) | test negative ELBO | "
            "ELBO minus VAE's | active units | training s",
            "|".join(["---"] * 9)]  # fmt: skip
    rows = []
    for name, s in summary.items():
        vs = [
            _cell(s[c]) if c in s else "" for c in ("test_nll_minus_vae", "test_neg_elbo_minus_vae")
        ]
        cells = [name, _cell(s["test_nll"]), f"{s['test_nll_mc_se']['mean']:.3f}",
                 f"{s['test_nll_data_se']['mean']:.2f}", vs[0], _cell(s["test_neg_elbo"]), vs[1],
                 _cell(s["active_units"], 1), f"{s['seconds']['mean']:.0f}"]  # fmt: skip
        rows.append(" | ".join(cells))
    return "\n".join("| " + line + " |" for line in [*head, *rows])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-k", type=int, default=5000)
    p.add_argument("--models", default=",".join(MODELS), help="which of " + ",".join(MODELS))
    args, rest = p.parse_known_args(argv)
    names = args.models.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)}; expected some of {', '.join(MODELS)}")
    workdir = Path(args.workdir)
    example = load_example()
    with cli.errors_exit():  # one line and an exit status; a signal stops after a checkpoint
        results = {}
        for name in names:
            results[name] = train_model(example, name, workdir, args.seeds, args.eval_k, rest)
            first_seed = results[name]
            print(f"{name}: test NLL {first_seed['test_nll']:.2f} (seed {first_seed['seed']})")
        summary = summarize(results)
        first = next(iter(results.values()))
        print(table(summary, first["eval_k"], first["eval_examples"]))
        out = {"summary": summary, "results": results}
        (workdir / "burda.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
