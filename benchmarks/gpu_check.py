"""The GPU check: the step benchmark and both examples on one device, and one table.

    python benchmarks/gpu_check.py --data-dir DIR --workdir W      # on a GPU machine

``DIR`` holds the four MNIST-format IDX files (e.g. Fashion-MNIST's; nothing is
downloaded). It runs, each as its own process on the first device JAX finds:

1. ``benchmarks/steps.py --json`` (every step at batch 128 and 512);
2. the quick preset of ``examples/distill_mnist.py``, timed from start to exit;
3. ``examples/vae_mnist.py`` (flax preset), whose epochs after the first give the
   time of a VAE epoch.

It prints one table, the targets beside the numbers (one H200: the quick preset in
under 60 s, a VAE epoch in under 0.5 s), and writes ``gpu_check.json`` to ``--workdir``.
``--steps-args``, ``--distill-args`` and ``--vae-args`` pass flags on (the tests
shorten the runs with them).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"quick_preset_s": 60.0, "vae_epoch_s": 0.5}
RUNS = ("steps", "distill", "vae")  # each takes more flags from --<run>-args


def _run(argv: list[str], log: Path) -> float:
    """Run ``argv``, its stdout to ``log`` and its stderr to ``<log>.stderr`` (so that a
    warning never lands in a JSON output); its wall seconds. Exits on failure."""
    t = time.perf_counter()
    errors = log.with_name(log.name + ".stderr")
    with log.open("w") as out, errors.open("w") as err:
        code = subprocess.call(argv, stdout=out, stderr=err, cwd=REPO)
    if code:
        sys.exit(f"gpu_check.py: {' '.join(argv[1:3])} exited {code}; see {errors}")
    return time.perf_counter() - t


def check(data_dir: str, workdir: Path, args: dict[str, list[str]]) -> dict:
    """Run the three, write ``gpu_check.json``; ``args``: extra flags of each."""
    workdir.mkdir(parents=True, exist_ok=True)
    python, common = sys.executable, ["--data-dir", data_dir, "--no-progress"]
    out: dict = {}
    steps_json = workdir / "steps.json"
    _run([python, "benchmarks/steps.py", "--json", *args["steps"]], steps_json)
    out["steps"] = json.loads(steps_json.read_text())

    distill = workdir / "distill"
    out["quick_preset_s"] = round(
        _run([python, "examples/distill_mnist.py", "--workdir", str(distill), *common,
              *args["distill"]], workdir / "distill.log"), 1)  # fmt: skip
    results = json.loads((distill / "results.json").read_text())
    out["quick_preset_test_errors"] = {
        name: r["test_errors"]["mean"] for name, r in results.items() if "test_errors" in r
    }

    vae = workdir / "vae"
    _run([python, "examples/vae_mnist.py", "--workdir", str(vae), *common, *args["vae"]],
         workdir / "vae.log")  # fmt: skip
    rows = [json.loads(line) for line in (vae / "metrics.jsonl").read_text().splitlines()]
    seconds = [row["seconds"] for row in rows[1:]] or [rows[0]["seconds"]]  # after compiling
    out["vae_epoch_s"] = round(statistics.median(seconds), 3)
    out["vae_test_neg_elbo"] = json.loads((vae / "results.json").read_text())["test_neg_elbo"]
    (workdir / "gpu_check.json").write_text(json.dumps(out, indent=1))
    return out


def _is_timed_step(value) -> bool:
    """A step of ``benchmarks/steps.py --json``: ``{batch: {"ms_per_step": ...}}``."""
    return isinstance(value, dict) and all(
        isinstance(r, dict) and "ms_per_step" in r for r in value.values()
    )


def table(out: dict) -> str:
    steps = out["steps"]
    lines = [f"device: {steps['device']} ({steps['devices']} visible)", "",
             f"{'step':<16}{'batch':>6}{'ms':>10}{'samples/s':>12}{'compile s':>11}"]  # fmt: skip
    for name, by_batch in steps.items():
        if not _is_timed_step(by_batch):  # the device, the GEMM rate, the summaries
            continue
        for batch, r in by_batch.items():
            lines.append(f"{name:<16}{batch:>6}{r['ms_per_step']:>10.2f}"
                         f"{r['samples_per_s']:>12.0f}{r['compile_s']:>11.2f}")  # fmt: skip
    lines.append("")
    for key, target in TARGETS.items():
        verdict = "met" if out[key] < target else "NOT met"
        lines.append(f"{key:<16}{out[key]:>10} (target < {target}: {verdict})")
    lines.append(f"quick preset test errors: {out['quick_preset_test_errors']}")
    lines.append(f"VAE test negative ELBO: {out['vae_test_neg_elbo']:.2f} nats")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="the four MNIST-format IDX files")
    p.add_argument("--workdir", default="runs/gpu_check")
    for name in RUNS:
        p.add_argument(f"--{name}-args", default="", help=f"more flags for the {name} run")
    args = p.parse_args(argv)
    extra = {name: shlex.split(getattr(args, f"{name}_args")) for name in RUNS}
    out = check(args.data_dir, Path(args.workdir), extra)
    print(table(out))
    return out


if __name__ == "__main__":
    main()
