"""Fault injection for the two examples: kill them, interrupt them, resume, compare.

Every scenario trains ``examples/distill_mnist.py`` or ``examples/vae_mnist.py`` for real,
in a subprocess, on a small learnable IDX dataset; stops it (SIGKILL from outside at a
given moment, SIGKILL from inside at a chosen point of a checkpoint save, SIGTERM or
SIGINT); resumes it with ``--resume`` until it finishes; and compares ``results.json``
and ``metrics.jsonl`` with those of an uninterrupted run of the same seed, which must be
equal bit for bit (timing fields aside)::

    python scripts/fault_injection.py                    # every scenario; prints a report
    python scripts/fault_injection.py --example vae      # one example's scenarios

The ``exec`` subcommand runs one example with faults planted inside the process, at
points a signal from outside can only hit by luck::

    python scripts/fault_injection.py exec --die-at tmp:2 -- examples/vae_mnist.py ARGS

``--die-at POINT:N[:SIGNAL]`` (repeatable) sends SIGNAL (default KILL) to the process
itself at the N-th time (counted from 1, over all stages) it reaches POINT:

* ``tmp``: inside a checkpoint save, once orbax has written everything to its temporary
  folder and before the rename that commits it;
* ``delete``: after a new checkpoint is committed, halfway through deleting an old one
  (orbax keeps two);
* ``saved``: right after a checkpoint save returns, before anything else is written;
* ``row``: halfway through appending a row to ``metrics.jsonl`` (half a line on disk);
* ``step``: right after a training step is dispatched (``step:30:TERM`` is a SIGTERM
  at a known step).

``tests/test_fault_injection.py`` runs a selection of the scenarios under pytest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Timing fields: the only ones allowed to differ between an interrupted and a clean run.
TIMING_KEYS = frozenset({"seconds", "samples_per_s", "eval_seconds"})
# Settings that name where and how a run was started, not what it computed.
RUN_KEYS = frozenset({"workdir", "resume", "progress", "data_dir"})

N_TRAIN, N_TEST, VAL_SIZE, BATCH = 6000, 500, 500, 128
STEPS_PER_EPOCH = (N_TRAIN - VAL_SIZE) // BATCH  # 42

# Small but real runs: 42 steps an epoch; dropout, input jitter (distillation's
# teacher) and the VAE's sampling all use the per-step PRNG keys that resuming replays.
EXAMPLES: dict[str, tuple[str, list[str]]] = {
    "distill": (
        "examples/distill_mnist.py",
        ["--teacher", "hinton_teacher", "--teacher-jitter", "1", "--teacher-epochs", "2",
         "--student-epochs", "2", "--batch-size", str(BATCH)],
    ),
    "vae": (
        "examples/vae_mnist.py",
        ["--epochs", "4", "--kl-warmup-epochs", "2", "--batch-size", str(BATCH),
         "--eval-k", "20", "--eval-examples", "200"],
    ),
}  # fmt: skip
# --------------------------------------------------------------------------- data


def write_idx(path: Path, array) -> None:
    """``array`` (uint8) as an IDX file: magic 0x08 | ndim, the sizes, the bytes."""
    import numpy as np

    array = np.asarray(array, np.uint8)
    header = (0x0800 | array.ndim).to_bytes(4, "big")
    header += b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def write_dataset(folder: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """The four MNIST IDX files of a 10-class dataset: a small faint block per class in
    noise, and one label in ten wrong, so that no model gets everything right."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        rng = np.random.default_rng(seed)
        classes = rng.permutation(np.arange(n) % 10)
        images = rng.integers(0, 200, size=(n, 28, 28), dtype=np.uint8)
        for k in range(10):
            r, c, rows = 9 * (k // 4), 7 * (k % 4), classes == k
            images[rows, r + 2 : r + 5, c + 2 : c + 5] = rng.integers(
                60, 256, size=(int(rows.sum()), 3, 3), dtype=np.uint8
            )
        wrong = rng.random(n) < 0.1
        labels = np.where(wrong, rng.integers(0, 10, n), classes).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


# --------------------------------------------------------------------------- runs


def metrics_rows(workdir: Path) -> list[dict]:
    """Complete rows of ``metrics.jsonl`` (a half-written last line is left out)."""
    try:
        text = (workdir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


@dataclass
class Run:
    """One subprocess of an example, its workdir and its captured output."""

    example: str
    workdir: Path
    proc: subprocess.Popen
    log: Path  # stdout
    err: Path  # stderr

    @property
    def metrics(self) -> Path:
        return self.workdir / "metrics.jsonl"

    def rows(self) -> list[dict]:
        return metrics_rows(self.workdir)

    def wait_for_rows(self, n: int, timeout: float = 120.0) -> list[dict]:
        """Poll until metrics.jsonl holds ``n`` rows (fails if the run ends first)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows()
            if len(rows) >= n:
                return rows
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.example} ended (exit {self.proc.returncode}) before {n} rows:\n"
                    + self.output()
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {n} rows in {self.metrics} after {timeout} s")
            time.sleep(0.005)

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 300.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def output(self) -> str:
        out = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"{out}{self.stderr()}"


def command(example: str, workdir: Path, data_dir: Path, *, resume=False, die_at=()) -> list[str]:
    script, args = EXAMPLES[example]
    argv = [script, "--data-dir", str(data_dir), "--workdir", str(workdir), "--val-size",
            str(VAL_SIZE), "--no-progress", "--no-figures", *args,
            *(["--resume"] if resume else [])]  # fmt: skip
    if die_at:
        hooks = [a for point in die_at for a in ("--die-at", point)]
        return [sys.executable, str(Path(__file__).resolve()), "exec", *hooks, "--", *argv]
    return [sys.executable, *argv]


def start(
    example: str, workdir: Path, data_dir: Path, *, argv: list[str] | None = None, **kwargs
) -> Run:
    """Start an example (or ``argv``); its stdout and stderr go to ``<workdir>.N.{out,err}``."""
    workdir.parent.mkdir(parents=True, exist_ok=True)
    n = sum(1 for _ in workdir.parent.glob(f"{workdir.name}.*.out"))
    log, err = (workdir.parent / f"{workdir.name}.{n}.{ext}" for ext in ("out", "err"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    with log.open("w") as out, err.open("w") as errors:
        proc = subprocess.Popen(
            argv or command(example, workdir, data_dir, **kwargs), cwd=REPO, env=env,
            stdout=out, stderr=errors, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    return Run(example, workdir, proc, log, err)


def finish(example: str, workdir: Path, data_dir: Path, *, resume=True, argv=None) -> Run:
    """Run (resume by default, or ``argv``) to the end; fails unless it exits 0."""
    run = start(example, workdir, data_dir, resume=resume, argv=argv)
    if run.wait() != 0:
        raise RuntimeError(f"{example} in {workdir} exited {run.proc.returncode}:\n{run.output()}")
    return run


def checkpoint_steps(workdir: Path) -> dict[str, list[int]]:
    """Committed checkpoint steps of every stage (orbax names them by step).

    The stages sit at ``<stage>/`` or ``<model>/seed_<k>/``: nothing inside a checkpoint
    folder is listed, where a running save renames its files.
    """
    folders = [*workdir.glob("*/checkpoints"), *workdir.glob("*/*/checkpoints")]
    return {
        str(folder.parent.relative_to(workdir)): sorted(
            int(p.name) for p in folder.iterdir() if p.name.isdigit()
        )
        for folder in sorted(folders)
        if folder.is_dir()
    }


def leftovers(workdir: Path) -> list[str]:
    """Orbax's temporary folders (an interrupted save) anywhere under ``workdir``
    (``os.walk`` passes over a folder that a running save renames away)."""
    return sorted(
        str((Path(parent) / name).relative_to(workdir))
        for parent, folders, _ in os.walk(workdir)
        for name in folders
        if "orbax-checkpoint-tmp" in name
    )


# --------------------------------------------------------------------------- comparison


def _strip(value):
    """``value`` without timing fields and run locations, at any depth."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING_KEYS | RUN_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def comparable(workdir: Path) -> tuple[dict, list[dict]]:
    """results.json and metrics.jsonl rows without timing fields and run locations."""
    results = json.loads((workdir / "results.json").read_text())
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return _strip(results), [_strip(r) for r in rows]


def differences(expected: Path, got: Path) -> list[str]:
    """Every difference between two finished workdirs (exact float comparison)."""
    (res_a, rows_a), (res_b, rows_b) = comparable(expected), comparable(got)
    diffs = []

    def walk(a, b, where):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{where}.{k}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{where}[{i}]")
        elif a != b and not (isinstance(a, float) and math.isnan(a) and math.isnan(b)):
            diffs.append(f"{where}: {a!r} != {b!r}")

    walk(res_a, res_b, "results")
    if len(rows_a) != len(rows_b):
        diffs.append(f"metrics.jsonl: {len(rows_a)} rows != {len(rows_b)} rows")
    walk(rows_a, rows_b, "metrics")
    return diffs


def headline(workdir: Path, example: str) -> dict:
    """A few final numbers of a finished run, for reports."""
    r = json.loads((workdir / "results.json").read_text())
    if example == "vae":
        return {k: r[k] for k in ("test_neg_elbo", "test_nll", "kl", "best_epoch")}
    return {
        f"{m}_test_errors": r[m]["test_errors"]["mean"] for m in ("teacher", "student", "kd")
    } | {"kd_val_accuracy": r["kd"]["val_accuracy"]["mean"]}


# --------------------------------------------------------------------------- scenarios


@dataclass
class Outcome:
    """What one scenario did: its interruptions, in order, and the final comparison."""

    example: str
    events: list[str] = field(default_factory=list)
    diffs: list[str] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    tmp_folders: list[str] = field(default_factory=list)  # after the kill inside a save
    tmp_folders_at_end: list[str] = field(default_factory=list)

    def report(self) -> str:
        verdict = "identical" if not self.diffs else f"{len(self.diffs)} DIFFERENCES"
        lines = [f"[{self.example}] final results vs uninterrupted run: {verdict} {self.final}"]
        lines += [f"    {e}" for e in self.events] + [f"    ! {d}" for d in self.diffs[:20]]
        return "\n".join(lines)


def baseline(example: str, root: Path, data_dir: Path) -> Path:
    workdir = root / f"{example}-baseline"
    finish(example, workdir, data_dir, resume=False)
    return workdir


def kill_chain(
    example: str, root: Path, data_dir: Path, reference: Path, *, seed: int = 0
) -> Outcome:
    """SIGKILL again and again, at different points, resuming each time; then compare.

    1. from outside, as soon as the first metrics row appears (the row is written just
       before the epoch's checkpoint, so this lands in or around that save);
    2. from inside, in the first checkpoint save of the resumed run, its data written
       to orbax's temporary folder but not committed;
    3. from inside, with half of the resumed run's first metrics row written;
    4. SIGINT (not a kill) from inside at the resumed run's 10th step: a mid-epoch
       checkpoint;
    5. from inside, halfway through deleting the oldest checkpoint once a third one is
       committed (orbax keeps two);
    6. from outside, at a random-ish delay after the resumed run's first new row;
    then a resume that runs to the end.
    """
    rng = random.Random(f"{example}-{seed}")
    workdir = root / f"{example}-kill-{seed}"
    out = Outcome(example)

    def state() -> str:
        rows = metrics_rows(workdir)
        return f"{len(rows)} complete rows, checkpoints {checkpoint_steps(workdir)}"

    run = start(example, workdir, data_dir)
    rows = run.wait_for_rows(1)
    run.send(signal.SIGKILL)
    run.wait()
    out.events.append(
        f"SIGKILL from outside when row 1 appeared ({rows[-1]['stage']} epoch "
        f"{rows[-1]['epoch']}): {state()}, orbax temporary folders {leftovers(workdir)}"
    )

    for point, expected in (("tmp:1", -9), ("row:1", -9), ("step:10:INT", 130), ("delete:1", -9)):
        run = start(example, workdir, data_dir, resume=True, die_at=[point])
        code = run.wait()
        if code != expected:
            raise RuntimeError(f"--die-at {point}: exit {code}, not {expected}:\n{run.output()}")
        said = [line for line in run.stderr().splitlines() if "py: " in line and "SIGINT" in line]
        out.events.append(
            f"{'SIGINT' if code == 130 else 'SIGKILL'} inside at {point} (exit {code}"
            f"{': ' + said[0] if said else ''}): {state()}, orbax temporary folders "
            f"{leftovers(workdir)}"
        )
        if point.startswith("tmp"):
            out.tmp_folders = leftovers(workdir)

    run = start(example, workdir, data_dir, resume=True)
    n = len(run.rows())
    run.wait_for_rows(n + 1)
    delay = rng.uniform(0.05, 0.5)
    time.sleep(delay)
    run.send(signal.SIGKILL)
    code = run.wait()
    out.events.append(
        f"SIGKILL from outside {delay:.2f} s after row {n + 1} appeared (exit {code}): {state()}"
    )

    finish(example, workdir, data_dir)
    out.events.append("--resume ran to the end")
    out.diffs = differences(reference, workdir)
    out.final = headline(workdir, example)
    out.tmp_folders_at_end = leftovers(workdir)
    return out


def interrupt(
    example: str,
    root: Path,
    data_dir: Path,
    reference: Path,
    sig: int,
    *,
    after: str = "row",
    delay: float = 0.1,
) -> tuple[Outcome, int, str]:
    """``sig`` from outside, ``delay`` s after the first metrics row (``after="row"``: it
    is written just before the epoch's checkpoint, so the signal tends to land in that
    save) or after the first checkpoint is committed (``"checkpoint"``: mid-epoch);
    then resume to the end and compare.

    The resume is the command the interrupted run printed after "To continue:".
    Returns the outcome, the interrupted run's exit status and its stderr.
    """
    name = signal.Signals(sig).name
    workdir = root / f"{example}-{name}"
    out = Outcome(example)
    run = start(example, workdir, data_dir)
    run.wait_for_rows(1)
    if after == "checkpoint":
        deadline = time.monotonic() + 60
        while not any(checkpoint_steps(workdir).values()) and time.monotonic() < deadline:
            if run.proc.poll() is not None:
                raise RuntimeError(f"{example} ended early:\n{run.output()}")
            time.sleep(0.005)
    time.sleep(delay)
    run.send(sig)
    code = run.wait()
    text = run.stderr()
    out.events.append(
        f"{name} from outside {delay:.2f} s after the first {after}: exit {code}; stderr "
        f"{' | '.join(text.splitlines())}; checkpoints {checkpoint_steps(workdir)}"
    )
    prefix = "To continue: "
    resume = [line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)]
    if not resume:
        raise RuntimeError(f"no '{prefix}' line on stderr:\n{text}")
    finish(example, workdir, data_dir, argv=shlex.split(resume[-1]))
    out.events.append("the command after 'To continue:' ran to the end")
    out.diffs = differences(reference, workdir)
    out.final = headline(workdir, example)
    return out, code, text


# --------------------------------------------------------------------------- exec


class _Faults:
    """Counts arrivals at each point and signals the process at the planned ones."""

    def __init__(self, plan: list[str]):
        self.plan: dict[str, tuple[int, int]] = {}
        for item in plan:
            point, n, *rest = item.split(":")
            sig = getattr(signal, f"SIG{rest[0]}" if rest else "SIGKILL")
            self.plan[point] = (int(n), sig)
        self.counts: dict[str, int] = {}

    def due(self, point: str) -> int | None:
        """The signal to send now, if this arrival at ``point`` is the planned one."""
        self.counts[point] = self.counts.get(point, 0) + 1
        n, sig = self.plan.get(point, (0, None))
        return sig if self.counts[point] == n else None

    def hit(self, point: str) -> None:
        sig = self.due(point)
        if sig is not None:
            print(f"fault_injection: {signal.Signals(sig).name} at {point}", file=sys.stderr)
            sys.stderr.flush()
            os.kill(os.getpid(), sig)


def install(plan: list[str]) -> None:
    """Plant the faults of ``plan`` (``POINT:N[:SIGNAL]`` items) into this process."""
    from orbax.checkpoint._src.path import atomicity, deleter

    from kdvae import train

    faults = _Faults(plan)

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_then_maybe_die(self, *args, **kwargs):
        faults.hit("tmp")
        return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_then_maybe_die

    delete = deleter.StandardCheckpointDeleter._delete_step_permanently

    def delete_half_then_maybe_die(self, step, target):
        sig = faults.due("delete")
        if sig is not None:
            import shutil

            items = sorted(p for p in Path(target).iterdir() if p.is_dir())
            for item in items[: max(1, len(items) // 2)]:
                shutil.rmtree(item)
            print(f"fault_injection: {signal.Signals(sig).name} at delete", file=sys.stderr)
            os.kill(os.getpid(), sig)
        return delete(self, step, target)

    deleter.StandardCheckpointDeleter._delete_step_permanently = delete_half_then_maybe_die

    save = train.Checkpointer.save

    def save_then_maybe_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        faults.hit("saved")

    train.Checkpointer.save = save_then_maybe_die

    append = train.MetricsLog.append

    def append_maybe_half(self, row):
        sig = faults.due("row")
        if sig is None:
            return append(self, row)
        line = json.dumps(row) + "\n"
        with self.path.open("a") as f:
            f.write(line[: len(line) // 2])
            f.flush()
            os.fsync(f.fileno())
        print(f"fault_injection: {signal.Signals(sig).name} at row", file=sys.stderr)
        os.kill(os.getpid(), sig)

    train.MetricsLog.append = append_maybe_half

    init = train.Trainer.__init__

    def init_with_counted_steps(self, *args, **kwargs):
        init(self, *args, **kwargs)
        step = self.step

        def counted(*a, **k):
            out = step(*a, **k)
            faults.hit("step")
            return out

        self.step = counted

    train.Trainer.__init__ = init_with_counted_steps


def exec_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fault_injection.py exec")
    p.add_argument("--die-at", action="append", default=[], metavar="POINT:N[:SIGNAL]")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    install(args.die_at)
    import runpy

    sys.argv = [args.script, *args.args]
    sys.path.insert(0, str(Path(args.script).resolve().parent))
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--example", choices=sorted(EXAMPLES), action="append")
    p.add_argument("--root", type=Path, help="where data and workdirs go (default: a temp dir)")
    args = p.parse_args(argv)
    import tempfile

    root = args.root or Path(tempfile.mkdtemp(prefix="kdvae-faults-"))
    os.environ.setdefault("KDVAE_CACHE_DIR", str(root / "jax-cache"))
    data_dir = write_dataset(root / "data")
    failed = 0
    for example in args.example or sorted(EXAMPLES):
        t0 = time.monotonic()
        reference = baseline(example, root, data_dir)
        print(f"[{example}] uninterrupted: {headline(reference, example)} "
              f"({time.monotonic() - t0:.1f} s)", flush=True)  # fmt: skip
        outcomes = [kill_chain(example, root, data_dir, reference)]
        for sig, after in ((signal.SIGTERM, "checkpoint"), (signal.SIGINT, "row")):
            outcomes.append(interrupt(example, root, data_dir, reference, sig, after=after)[0])
        for outcome in outcomes:
            print(outcome.report(), flush=True)
            failed += bool(outcome.diffs)
    print(f"workdirs and logs in {root}")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["exec"]:
        sys.exit(exec_main(sys.argv[2:]))
    sys.exit(main())
