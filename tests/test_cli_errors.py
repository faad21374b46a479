"""Bad input to the two examples: one clear line on stderr, exit status 2, no file touched.

Most cases call the examples' ``main(argv)`` in process (``SystemExit``, captured
stderr); a few run the scripts as subprocesses for the real exit status and the absence
of any traceback or warning. Every case snapshots the files under its folders before
and after: a refused run creates, changes and deletes nothing. Also the non-finite
guard: a NaN stops the run with exit status 3, naming the epoch and step, and the last
good checkpoint stays, ready for ``--resume``.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from test_data import write_idx

from kdvae import cli, distill, train, vae
from kdvae import data as kdata

pytestmark = pytest.mark.usefixtures("compilation_cache")

REPO = Path(__file__).resolve().parent.parent
N_TRAIN, N_TEST, VAL = 800, 200, 200  # 600 training rows, 4 steps of 128 an epoch
SMALL = ["--val-size", str(VAL), "--no-progress", "--no-figures"]
DISTILL_SMALL = [*SMALL, "--teacher", "hinton_student", "--teacher-epochs", "1",
                 "--student-epochs", "1"]  # fmt: skip
VAE_SMALL = [*SMALL, "--epochs", "1", "--eval-k", "2", "--eval-examples", "10"]


def _load(path: Path, name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


faults = _load(REPO / "scripts" / "fault_injection.py", "fault_injection")
distill_example = _load(REPO / "examples" / "distill_mnist.py", "cli_errors_distill_mnist")
vae_example = _load(REPO / "examples" / "vae_mnist.py", "cli_errors_vae_mnist")
EXAMPLES = {"distill": distill_example, "vae": vae_example}


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots``: its size and modification time."""
    out = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            stat = path.stat()
            out[str(path)] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return out


def refused(example: str, argv: list, *roots: Path, code: int = 2) -> str:
    """Run ``main(argv)`` in process; assert it exits ``code`` with one line on stderr and
    touches no file under ``roots``; return that line."""
    before = snapshot(*roots)
    err = _capture(EXAMPLES[example], [str(a) for a in argv], code)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert snapshot(*roots) == before, "a refused run changed files"
    print(f"{argv}: {lines[0]}")
    return lines[0]


def _capture(module, argv: list[str], code: int) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as excinfo:
        module.main(argv)
    assert excinfo.value.code == code, err.getvalue()
    return err.getvalue()


def run_script(example: str, argv: list) -> subprocess.CompletedProcess:
    script = REPO / "examples" / ("distill_mnist.py" if example == "distill" else "vae_mnist.py")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, str(script), *map(str, argv)], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli_errors")


@pytest.fixture(scope="module")
def data_dir(root) -> Path:
    return faults.write_dataset(root / "data", N_TRAIN, N_TEST)


@pytest.fixture(scope="module")
def distill_run(root, data_dir) -> Path:
    """A finished (tiny) distillation run: its workdir holds checkpoints of every stage."""
    workdir = root / "distill-run"
    assert distill_example.main(["--data-dir", str(data_dir), "--workdir", str(workdir),
                                 *DISTILL_SMALL]) == 0  # fmt: skip
    assert (workdir / "results.json").exists() and not list(workdir.glob("*.png"))  # --no-figures
    return workdir


@pytest.fixture(scope="module")
def vae_run(root, data_dir) -> Path:
    workdir = root / "vae-run"
    assert vae_example.main(["--data-dir", str(data_dir), "--workdir", str(workdir),
                             *VAE_SMALL]) == 0  # fmt: skip
    return workdir


def corrupted(tmp_path: Path, data_dir: Path, stem: str, content: bytes | np.ndarray) -> Path:
    """A copy of ``data_dir`` whose ``stem`` file holds ``content`` (bytes or an IDX array)."""
    folder = tmp_path / "data"
    shutil.copytree(data_dir, folder)
    if isinstance(content, bytes):
        (folder / stem).write_bytes(content)
    else:
        write_idx(folder / stem, content, gz=False)
    return folder


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "example, argv, expected",
    [
        ("distill", ["--temperature", "0"], "--temperature must be in [0.001, 10000], got 0.0"),
        ("distill", ["--temperature", "-2"], "--temperature must be in [0.001, 10000], got -2.0"),
        ("distill", ["--temperature", "nan"], "--temperature must be in [0.001, 10000], got nan"),
        ("distill", ["--alpha", "1.5"], "--alpha must be in [0, 1] (the hard-label weight), got 1.5"),  # noqa: E501
        ("distill", ["--alpha", "-0.1"], "--alpha must be in [0, 1]"),
        ("distill", ["--preset", "huge"], "--preset must be one of ['paper', 'quick'], got 'huge'"),
        ("distill", ["--teacher", "resnet50"], "--teacher must be one of"),
        ("distill", ["--batch-size", "0"], "--batch-size must be in [1, 65,536], got 0"),
        ("distill", ["--lr", "0"], "--lr must be positive and at most 1, got 0.0"),
        ("distill", ["--omit-classes", "12"],
         "--omit-classes must be class ids in 0..9, got (12,)"),
        ("distill", ["--val-size", "0"], "--val-size must be in [1, 10,000,000], got 0"),
        ("distill", ["--methods", "kd,fitnets"], "--methods must be comma-separated methods "
         "from kd, dkd, dist, kd_ls, reverse_kl, jsd, logit_matching, got ('kd', 'fitnets')"),
        ("distill", ["--methods", "kd,kd"], "--methods must be comma-separated methods"),
        ("distill", ["--methods", ","], "--methods must be comma-separated methods"),
        ("distill", ["--seeds", "0"], "--seeds must be in [1, 100], got 0"),
        ("distill", ["--dkd-beta", "-1"], "--dkd-beta must be in [0, 1,000], got -1.0"),
        ("distill", ["--jsd-beta", "1.5"], "--jsd-beta must be in [0, 1], got 1.5"),
        ("distill", ["--dist-temperature", "0"], "--dist-temperature must be in [0.001, 10000]"),
        ("vae", ["--preset", "huge"], "--preset must be one of ['2d', 'flax', 'iwae'], got 'huge'"),
        ("vae", ["--epochs", "0"], "--epochs must be in [1, 10,000], got 0"),
        ("vae", ["--latents", "0"], "--latents must be in [1, 4,096], got 0"),
        ("vae", ["--beta", "-1"], "--beta must be in [0, 1,000], got -1.0"),
        ("vae", ["--lr", "-0.001"], "--lr must be positive and at most 1, got -0.001"),
        # Every numeric setting has a range (found: overflow, out of memory, inf).
        ("distill", ["--seed", "18446744073709551616"],
         "--seed must be in [0, 2,147,483,647], got 18446744073709551616"),
        ("vae", ["--latents", "100000000"], "--latents must be in [1, 4,096], got 100000000"),
        ("vae", ["--num-samples", "100000"], "--num-samples must be in [1, 1,000], got 100000"),
        ("vae", ["--k", "100000"], "--k must be in [1, 5,000], got 100000"),
        ("vae", ["--eval-k", "1000000000"], "--eval-k must be in [1, 100,000], got 1000000000"),
        ("vae", ["--lr", "inf"], "--lr must be positive and at most 1, got inf"),
        ("vae", ["--beta", "inf"], "--beta must be in [0, 1,000], got inf"),
        ("vae", ["--free-bits", "inf"], "--free-bits must be in [0, 100], got inf"),
        ("vae", ["--lr", "-1e-3"], "--lr must be positive and at most 1, got -0.001"),
        ("vae", ["--workdir", ""], "--workdir must be a non-empty path, got ''"),
        ("distill", ["--teacher-checkpoint", ""],
         "--teacher-checkpoint must be a non-empty path, got ''"),
    ],
)  # fmt: skip
def test_bad_setting(example, argv, expected, data_dir, tmp_path):
    workdir = tmp_path / "run"
    line = refused(example, ["--data-dir", data_dir, "--workdir", workdir, *argv], tmp_path)
    assert expected in line
    assert not workdir.exists()


@pytest.mark.parametrize(
    "example, argv, expected",
    [
        ("distill", ["--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'"),
        ("distill", ["--soft-loss", "mse"], "--soft-loss must be one of ['ce', 'kl'], got 'mse'"),
        ("distill", ["--omit-classes", "3,x"], "expected comma-separated integers, got '3,x'"),
        ("vae", ["--objective", "vi"], "--objective must be one of ['elbo', 'iwae'], got 'vi'"),
        ("vae", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)  # fmt: skip
def test_bad_flag_is_one_line_not_a_usage_block(example, argv, expected, tmp_path):
    line = refused(example, ["--workdir", tmp_path / "run", *argv], tmp_path)
    assert expected in line and line.endswith("--help)")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("example", ["distill", "vae"])
def test_unknown_dataset(example, data_dir, tmp_path):
    line = refused(
        example, ["--dataset", "cifar10", "--data-dir", data_dir, "--workdir", tmp_path / "run"],
        tmp_path, data_dir,
    )  # fmt: skip
    assert "unknown dataset 'cifar10'; known datasets: mnist, fashion_mnist" in line


@pytest.mark.parametrize("example", ["distill", "vae"])
def test_missing_data_dir(example, tmp_path):
    line = refused(example, ["--data-dir", tmp_path / "nowhere", "--workdir", tmp_path / "run",
                             *SMALL], tmp_path)  # fmt: skip
    assert f"data directory {tmp_path / 'nowhere'} does not exist" in line
    assert "train-images-idx3-ubyte[.gz]" in line


def test_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "data").write_text("not a folder")
    line = refused(
        "vae", ["--data-dir", tmp_path / "data", "--workdir", tmp_path / "run"], tmp_path
    )
    assert f"data directory {tmp_path / 'data'} is a file, not a folder" in line


def test_data_dir_without_the_files(tmp_path):
    (tmp_path / "empty").mkdir()
    line = refused("distill", ["--data-dir", tmp_path / "empty", "--workdir", tmp_path / "run"],
                   tmp_path)  # fmt: skip
    assert "lacks train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]" in line


def test_unreadable_idx_file(data_dir, tmp_path, monkeypatch):
    folder = corrupted(tmp_path, data_dir, "t10k-labels-idx1-ubyte",
                       (data_dir / "t10k-labels-idx1-ubyte").read_bytes())  # fmt: skip
    path = folder / "t10k-labels-idx1-ubyte"
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make the read fail instead
        read_bytes = Path.read_bytes

        def denied(self):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", denied)
    try:
        line = refused("vae", ["--data-dir", folder, "--workdir", tmp_path / "run", *SMALL],
                       tmp_path)  # fmt: skip
    finally:
        path.chmod(0o644)
    assert f"cannot read IDX file {path}: [Errno 13] Permission denied" in line


def _images(n, size=28):
    return np.zeros((n, size, size), np.uint8)


@pytest.mark.parametrize(
    "stem, content, expected",
    [
        ("train-images-idx3-ubyte", b"PK\x03\x04" + bytes(60),  # a zip file
         "is not an MNIST-format IDX file: magic number 0x504b0304"),
        ("train-labels-idx1-ubyte", b"\x00\x00\x0c\x01\x00\x00\x00\x02\x01\x02",
         "magic number 0x00000c01, expected 0x00000803 (uint8 images) or 0x00000801"),
        ("t10k-images-idx3-ubyte", _images(N_TEST, 32),
         f"holds an array of shape ({N_TEST}, 32, 32), expected 28x28 images"),
        ("t10k-labels-idx1-ubyte", np.zeros(N_TEST - 1, np.uint8),
         f"holds {N_TEST} images but", ),
        ("train-images-idx3-ubyte", "truncated",
         f"is truncated: its header gives images of shape ({N_TRAIN}, 28, 28)"),
        ("t10k-labels-idx1-ubyte", b"\x00\x00\x08\x01\x00\x00",
         "is truncated: its IDX header needs 8 bytes, found 6"),
        ("train-labels-idx1-ubyte", "extra", "followed by extra bytes"),
        ("t10k-labels-idx1-ubyte", np.full(N_TEST, 10, np.uint8),
         "data has labels up to 10, but mnist has 10 classes"),
    ],
    ids=["magic-zip", "magic-wrong-type", "not-28x28", "count-mismatch", "truncated-data",
         "truncated-header", "extra-bytes", "label-out-of-range"],
)  # fmt: skip
def test_bad_idx_files(stem, content, expected, data_dir, tmp_path):
    if isinstance(content, str):
        raw = (data_dir / stem).read_bytes()
        content = raw[:-1000] if content == "truncated" else raw + b"\0"
    folder = corrupted(tmp_path, data_dir, stem, content)
    example = "distill" if "images" in stem else "vae"
    line = refused(example, ["--data-dir", folder, "--workdir", tmp_path / "run", *SMALL],
                   tmp_path)  # fmt: skip
    assert expected in line
    assert stem in line or "labels up to" in line  # that one names the folder


# --------------------------------------------------------------------------- workdir


@pytest.mark.parametrize("example", ["distill", "vae"])
def test_workdir_under_a_file(example, data_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    line = refused(example, ["--data-dir", data_dir, "--workdir", tmp_path / "file" / "run"],
                   tmp_path)  # fmt: skip
    assert f"--workdir {tmp_path / 'file' / 'run'} cannot be created: " in line
    assert f"{tmp_path / 'file'} is a file, not a folder" in line


def test_workdir_that_is_a_file(data_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    line = refused("distill", ["--data-dir", data_dir, "--workdir", tmp_path / "file"], tmp_path)
    assert f"--workdir {tmp_path / 'file'} exists and is not a folder." in line


def test_read_only_workdir(data_dir, tmp_path):
    """A folder without write permission; as root, whom permissions do not stop, /sys,
    where nobody may create a file. The check tries a write and leaves no trace."""
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):  # root
            parent = Path("/sys")
            if not parent.is_dir():
                pytest.skip("running as root on a system without /sys")
        line = refused("vae", ["--data-dir", data_dir, "--workdir", parent / "run"], tmp_path)
    finally:
        (tmp_path / "read-only").chmod(0o755)
    assert f"--workdir {parent / 'run'} is not writable ({parent}: " in line


@pytest.mark.parametrize("example", ["distill", "vae"])
def test_batch_larger_than_the_data(example, data_dir, tmp_path):
    line = refused(example, ["--data-dir", data_dir, "--workdir", tmp_path / "run", *SMALL,
                             "--batch-size", "601"], tmp_path)  # fmt: skip
    assert "batch size 601 is larger than the training set (600 examples)." in line


def test_batch_larger_than_the_transfer_set(data_dir, tmp_path):
    # 600 training rows, 60 of class 3: the teacher could train, the students cannot.
    line = refused("distill", ["--data-dir", data_dir, "--workdir", tmp_path / "run", *SMALL,
                               "--keep-classes", "3", "--batch-size", "128"], tmp_path)  # fmt: skip
    assert "batch size 128 is larger than the training set" in line


def test_existing_checkpoints_need_resume(distill_run, vae_run, data_dir):
    line = refused("distill", ["--data-dir", data_dir, "--workdir", distill_run, *DISTILL_SMALL],
                   distill_run)  # fmt: skip
    earlier = "holds checkpoints of an earlier run (teacher, student/seed_0, kd/seed_0)"
    assert f"--workdir {distill_run} {earlier}" in line
    assert "pass --resume to continue it" in line
    line = refused("vae", ["--data-dir", data_dir, "--workdir", vae_run, *VAE_SMALL], vae_run)
    assert "holds checkpoints of an earlier run (vae)" in line


@pytest.mark.parametrize(
    "example, argv, expected",
    [
        ("distill", ["--lr", "0.002"], "learning_rate=0.001, this run has learning_rate=0.002"),
        ("distill", ["--temperature", "3"], "temperature=8.0, this run has temperature=3.0"),
        ("distill", ["--student-epochs", "2"], "student_epochs=1, this run has student_epochs=2"),
        ("distill", ["--seed", "1"], "seed=0, this run has seed=1"),
        ("vae", ["--latents", "3"], "latents=None, this run has latents=3"),
        ("vae", ["--preset", "2d"], "model.latents=20, this run has model.latents=2"),
        ("vae", ["--epochs", "2"], "epochs=1, this run has epochs=2"),
        ("vae", ["--val-size", "100"], "val_size=200, this run has val_size=100"),
    ],
)  # fmt: skip
def test_resume_with_other_settings_is_refused(example, argv, expected, request, data_dir):
    workdir = request.getfixturevalue(f"{example}_run")
    small = DISTILL_SMALL if example == "distill" else VAE_SMALL
    line = refused(example, ["--data-dir", data_dir, "--workdir", workdir, *small, *argv,
                             "--resume"], workdir)  # fmt: skip
    assert f"cannot resume from {workdir}/" in line and expected in line
    assert "Use the same settings, or another --workdir to start afresh." in line


def test_resume_with_the_same_settings_succeeds(vae_run, data_dir):
    """The counterpart of the refusals: the stored configuration matches a rerun's."""
    argv = ["--data-dir", str(data_dir), "--workdir", str(vae_run), *VAE_SMALL, "--resume"]
    assert vae_example.main(argv) == 0


# --------------------------------------------------------------------------- teacher


def test_teacher_checkpoint_that_does_not_exist(data_dir, tmp_path):
    line = refused("distill", ["--data-dir", data_dir, "--workdir", tmp_path / "run", *SMALL,
                               "--teacher-checkpoint", tmp_path / "nowhere"], tmp_path)  # fmt: skip
    assert f"--teacher-checkpoint: no checkpoint found at {tmp_path / 'nowhere'}" in line


def test_teacher_checkpoint_of_another_architecture(distill_run, data_dir, tmp_path):
    checkpoints = distill_run / "teacher" / "checkpoints"
    line = refused("distill", ["--data-dir", data_dir, "--workdir", tmp_path / "run", *SMALL,
                               "--teacher", "hinton_teacher", "--teacher-checkpoint", checkpoints],
                   tmp_path, distill_run)  # fmt: skip
    assert f"--teacher-checkpoint {checkpoints} holds a " in line
    assert "'widths': [800, 800]" in line and "--teacher hinton_teacher is" in line
    assert "pass the matching --teacher" in line


def test_teacher_checkpoint_of_a_vae(vae_run, data_dir, tmp_path):
    checkpoints = vae_run / "vae" / "checkpoints"
    line = refused("distill", ["--data-dir", data_dir, "--workdir", tmp_path / "run", *SMALL,
                               "--teacher-checkpoint", checkpoints], tmp_path, vae_run)  # fmt: skip
    assert f"--teacher-checkpoint {checkpoints} holds a " in line and "'latents': 20" in line


# --------------------------------------------------------------------------- subprocesses


@pytest.mark.parametrize(
    "example, argv, expected",
    [
        ("distill", ["--temperature", "0"], "--temperature must be in [0.001, 10000], got 0.0"),
        ("distill", ["--alpha", "2"], "--alpha must be in [0, 1]"),
        ("vae", ["--data-dir", "{tmp}/nowhere"], "does not exist"),
        ("vae", ["--batch-size", "nine"], "argument --batch-size: invalid int value: 'nine'"),
    ],
)  # fmt: skip
def test_script_exit_status_and_one_line(example, argv, expected, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = snapshot(tmp_path)
    proc = run_script(example, ["--workdir", tmp_path / "run", *argv])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    prog = "distill_mnist.py" if example == "distill" else "vae_mnist.py"
    assert lines[0].startswith(f"{prog}: error: ")
    assert proc.stdout == "" and snapshot(tmp_path) == before


def test_script_refuses_checkpoints_without_resume(distill_run, data_dir):
    before = snapshot(distill_run)
    proc = run_script("distill", ["--data-dir", data_dir, "--workdir", distill_run, *DISTILL_SMALL])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "pass --resume to continue it" in proc.stderr
    assert snapshot(distill_run) == before


# --------------------------------------------------------------------------- non-finite


def test_nan_before_any_checkpoint_stops_with_status_3(data_dir, tmp_path, monkeypatch):
    """A loss that is NaN from the first step (as Adam at lr 1e30 made it, before the
    learning rate got its range): exit 3, one line that says no checkpoint was written."""
    classification_loss = distill.classification_loss

    def poisoned(**kwargs):
        loss_fn = classification_loss(**kwargs)

        def nan(model, batch, key, context):
            loss, metrics = loss_fn(model, batch, key, context)
            return loss * jnp.nan, metrics

        return nan

    monkeypatch.setattr(distill, "classification_loss", poisoned)
    workdir = tmp_path / "run"
    err = _capture(distill_example, ["--data-dir", str(data_dir), "--workdir", str(workdir),
                                     *DISTILL_SMALL], 3)  # fmt: skip
    assert err.split(": error: ", 1)[1] == (
        "teacher: the loss became nan at epoch 1, step 1; stopped without saving (no "
        "checkpoint of this stage had been written yet).\n"
    )
    assert faults.checkpoint_steps(workdir) == {"teacher": []}  # nothing good to keep


def test_nan_in_epoch_two_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    """A loss that turns NaN from the second epoch on: exit 3 naming epoch 2, step 1; the
    checkpoint of epoch 1 stays and a resume without the fault runs to the end."""
    vae_objective = vae.objective

    def poisoned(**kwargs):
        loss_fn = vae_objective(**kwargs)

        def nan_from_epoch_two(model, batch, key, context):
            loss, metrics = loss_fn(model, batch, key, context)
            return jnp.where(context["epoch"] >= 1, jnp.nan, loss), metrics

        return nan_from_epoch_two

    workdir = tmp_path / "run"
    argv = ["--data-dir", str(data_dir), "--workdir", str(workdir), *SMALL, "--epochs", "2",
            "--eval-k", "2", "--eval-examples", "10"]  # fmt: skip
    with monkeypatch.context() as patch:
        patch.setattr(vae, "objective", poisoned)
        err = _capture(vae_example, argv, 3)
    assert err.count("\n") == 1
    assert "vae: the loss became nan at epoch 2, step 1; stopped without saving" in err
    assert faults.checkpoint_steps(workdir) == {"vae": [4]}  # epoch 1: 4 steps of 128
    rows = [r["epoch"] for r in train.MetricsLog(workdir / "metrics.jsonl").rows()]
    assert rows == [1]

    assert vae_example.main([*argv, "--resume"]) == 0
    assert faults.checkpoint_steps(workdir) == {"vae": [4, 8]}
    rows = [r["epoch"] for r in train.MetricsLog(workdir / "metrics.jsonl").rows()]
    assert rows == [1, 2]


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_outside_the_training_loop(sig, code, capsys, monkeypatch):
    """Loading data, between stages, the final evaluation: the run stops at once, with
    the status and the command that resumes it (the checkpoints are all complete)."""
    monkeypatch.setattr(sys, "argv", ["vae_mnist.py", "--workdir", "w"])
    before = signal.getsignal(sig)
    with pytest.raises(SystemExit) as excinfo, cli.errors_exit():
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler raises here
    assert excinfo.value.code == code
    first, second = capsys.readouterr().err.strip().splitlines()
    assert first == (
        f"vae_mnist.py: {sig.name} outside a training loop; every checkpoint written so far "
        "is complete."
    )
    assert second.startswith("To continue: ") and second.endswith(
        "vae_mnist.py --workdir w --resume"
    )
    assert signal.getsignal(sig) is before


# --------------------------------------------------------------------------- damage


def flip_largest_file(folder: Path) -> None:
    path = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(path.read_bytes())
    for i in range(100, min(500, len(raw))):  # 400 bytes, as a bad disk would
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def vae_two_epochs(root, data_dir) -> Path:
    workdir = root / "vae-two-epochs"
    assert vae_example.main(["--data-dir", str(data_dir), "--workdir", str(workdir),
                             *VAE_SMALL, "--epochs", "2"]) == 0  # fmt: skip
    assert faults.checkpoint_steps(workdir) == {"vae": [4, 8]}
    return workdir


def test_damaged_best_model_falls_back_and_gives_the_same_results(
    vae_two_epochs, data_dir, tmp_path, capsys
):
    """Found: bytes flipped in the latest step's best/ made --resume of a finished run
    exit 0 with a NaN test NLL. Now the step is set aside, epoch 2 is replayed from the
    intact step, and the results are the uninterrupted run's."""
    workdir = tmp_path / "run"
    shutil.copytree(vae_two_epochs, workdir)
    flip_largest_file(workdir / "vae" / "checkpoints" / "8" / "best")
    argv = ["--data-dir", str(data_dir), "--workdir", str(workdir), *VAE_SMALL, "--epochs", "2"]
    assert vae_example.main([*argv, "--resume"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "checkpoint step 8 in " in notes[0] and "has changed" in notes[0]
    ignore = ("seconds", "eval_seconds", "config")
    got, want = (json.loads((w / "results.json").read_text()) for w in (workdir, vae_two_epochs))
    assert {k: v for k, v in got.items() if k not in ignore} == {
        k: v for k, v in want.items() if k not in ignore
    }
    assert faults.checkpoint_steps(workdir) == {"vae": [4, 8]}


def test_no_intact_checkpoint_refuses_to_resume(vae_run, data_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(vae_run, workdir)
    flip_largest_file(workdir / "vae" / "checkpoints" / "4" / "state")
    line = refused("vae", ["--data-dir", data_dir, "--workdir", workdir, *VAE_SMALL, "--resume"],
                   code=2)  # fmt: skip
    assert f"cannot resume from {workdir / 'vae' / 'checkpoints'}: no intact checkpoint" in line


def test_damaged_teacher_is_refused_before_training(distill_run, data_dir, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(distill_run / "teacher" / "checkpoints", teacher)
    step = faults.checkpoint_steps(distill_run)["teacher"][-1]
    flip_largest_file(teacher / str(step) / "best")
    argv = ["--data-dir", data_dir, "--workdir", tmp_path / "run", *DISTILL_SMALL,
            "--teacher-checkpoint", teacher]  # fmt: skip
    line = refused("distill", argv, tmp_path)
    assert f"--teacher-checkpoint {teacher}: its newest checkpoint (step {step})" in line
    assert "is not intact (" in line


# --------------------------------------------------------------------------- one run, one data


def test_a_second_run_into_a_busy_workdir(vae_run, data_dir):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom kdvae import train\n"
         "with train.claim_workdir(sys.argv[1], resume=True):\n"
         "    print('held', flush=True); time.sleep(120)", str(vae_run)],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        line = refused("vae", ["--data-dir", data_dir, "--workdir", vae_run, *VAE_SMALL,
                               "--resume"], vae_run)  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert f"--workdir {vae_run} is in use by process {holder.pid} on " in line


@pytest.fixture(scope="module")
def inverted_data_dir(root, data_dir) -> Path:
    """The same IDX files with every grey level inverted: other data, same shapes."""
    folder = root / "inverted"
    shutil.copytree(data_dir, folder)
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        images = kdata.read_idx(folder / stem)
        write_idx(folder / stem, 255 - images, gz=False)
    return folder


def test_resume_on_other_data_is_refused(vae_run, inverted_data_dir):
    line = refused("vae", ["--data-dir", inverted_data_dir, "--workdir", vae_run, *VAE_SMALL,
                           "--resume"], vae_run)  # fmt: skip
    assert (
        f"cannot resume from {vae_run / 'vae' / 'checkpoints'}: it was written with data." in line
    )


def test_teacher_trained_on_other_data_is_refused(distill_run, inverted_data_dir, tmp_path):
    checkpoints = distill_run / "teacher" / "checkpoints"
    line = refused("distill", ["--data-dir", inverted_data_dir, "--workdir", tmp_path / "run",
                               *DISTILL_SMALL, "--teacher-checkpoint", checkpoints],
                   tmp_path, distill_run)  # fmt: skip
    assert f"--teacher-checkpoint {checkpoints} was trained on other data (mnist" in line


# --------------------------------------------------------------------------- failures


def test_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(
    data_dir, tmp_path, monkeypatch
):
    calls = []
    hashes = train._file_hashes

    def full_on_the_second_save(step_dir):
        calls.append(step_dir)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return hashes(step_dir)

    monkeypatch.setattr(train, "_file_hashes", full_on_the_second_save)
    workdir = tmp_path / "run"
    err = _capture(vae_example, ["--data-dir", str(data_dir), "--workdir", str(workdir),
                                 *VAE_SMALL, "--epochs", "2"], 4)  # fmt: skip
    assert err.count("\n") == 1 and "Traceback" not in err
    where = workdir / "vae" / "checkpoints"
    assert err.split(": error: ", 1)[1] == (
        f"could not save checkpoint step 8 to {where}: No space left on device; the "
        "checkpoints written before are kept.\n"
    )
    monkeypatch.undo()
    with train.Checkpointer(workdir / "vae" / "checkpoints", read_only=True) as ckpt:
        assert ckpt.latest_step() == 4 and ckpt.read_meta()["epoch"] == 1


def test_no_permission_for_the_metrics_log_is_one_line(data_dir, tmp_path, monkeypatch):
    def denied(self, row):
        raise train.WriteError(f"could not append to {self.path}",
                               PermissionError(errno.EPERM, "Operation not permitted"))  # fmt: skip

    monkeypatch.setattr(train.MetricsLog, "append", denied)
    err = _capture(vae_example, ["--data-dir", str(data_dir), "--workdir",
                                 str(tmp_path / "run"), *VAE_SMALL], 4)  # fmt: skip
    assert err.count("\n") == 1
    assert "could not append to " in err and "Operation not permitted; the checkpoints" in err


@pytest.mark.parametrize(
    "error",
    [MemoryError(), RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 400.0G")],
    ids=["host", "xla"],
)
def test_out_of_memory_in_the_evaluation_is_one_line(error, data_dir, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise error

    monkeypatch.setattr(vae, "evaluate_bounds", oom)
    err = _capture(vae_example, ["--data-dir", str(data_dir), "--workdir",
                                 str(tmp_path / "run"), *VAE_SMALL], 5)  # fmt: skip
    assert err.count("\n") == 1 and err.split(": error: ", 1)[1].startswith("out of memory (")
    assert "lower --batch-size" in err


def test_a_step_too_large_for_memory_is_refused_before_training(data_dir, tmp_path):
    line = refused("vae", ["--data-dir", data_dir, "--workdir", tmp_path / "run", *VAE_SMALL,
                           "--objective", "iwae", "--k", "5000", "--latents", "4096",
                           "--batch-size", "512"], code=2)  # fmt: skip
    assert "a training step needs " in line and "GiB, more than the " in line


def test_non_finite_results_exit_3_without_results(data_dir, tmp_path, monkeypatch):
    bounds = vae.evaluate_bounds

    def nan_nll(*args, **kwargs):
        return {**bounds(*args, **kwargs), "nll": float("nan")}

    monkeypatch.setattr(vae, "evaluate_bounds", nan_nll)
    workdir = tmp_path / "run"
    err = _capture(vae_example, ["--data-dir", str(data_dir), "--workdir", str(workdir),
                                 *VAE_SMALL], 3)  # fmt: skip
    assert "the evaluation gave results.test_nll = nan; results.json was not written" in err
    assert not (workdir / "results.json").exists()


def test_an_empty_test_split_is_refused(data_dir, tmp_path):
    folder = corrupted(tmp_path, data_dir, "t10k-images-idx3-ubyte", _images(0))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(0, np.uint8), gz=False)
    line = refused("vae", ["--data-dir", folder, "--workdir", tmp_path / "run", *SMALL], tmp_path)
    assert "the test split of mnist is empty" in line


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "--distributed: jax.distributed.initialize() failed ("),
        ({"KDVAE_NUM_PROCESSES": "two"}, "KDVAE_NUM_PROCESSES must be an integer >= 1, got 'two'"),
        ({"KDVAE_NUM_PROCESSES": "2", "KDVAE_PROCESS_ID": "2"}, "KDVAE_PROCESS_ID=2 must be below"),
    ],
)
def test_distributed_without_its_environment(env, expected, data_dir, tmp_path, monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "KDVAE_NUM_PROCESSES", "KDVAE_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    proc = run_script("vae", ["--data-dir", data_dir, "--workdir", tmp_path / "run",
                              "--distributed"])  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]
    assert not (tmp_path / "run").exists()


def test_resume_into_a_missing_workdir_says_it_starts_afresh(data_dir, tmp_path, capsys):
    workdir = tmp_path / "new"
    assert vae_example.main(["--data-dir", str(data_dir), "--workdir", str(workdir),
                             *VAE_SMALL, "--resume"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert f"note: --resume: {workdir} holds no checkpoint yet; starting afresh." in err
