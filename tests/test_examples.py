"""Smoke tests of the two examples, end to end on a tiny IDX folder (and TFDS's mock).

``main(argv)`` is called in process (fast: the compilation cache fixture shares the
compiled steps between runs); one test runs a script as a subprocess for its exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import NOISY_TEST_LABELS, load_script
from test_data import mock_tfds

from kdvae import config, train
from kdvae import data as kdata

pytestmark = pytest.mark.usefixtures("compilation_cache")

REPO = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
STAGES = ("teacher", "student/seed_0", "kd/seed_0")  # metrics and checkpoints
MODELS = ("teacher", "student", "kd")  # results
TINY = ["--val-size", "200", "--batch-size", "32", "--no-progress"]  # 600/200/200 examples


@pytest.fixture(scope="module")
def distill_example():
    return load_script("examples/distill_mnist.py")


@pytest.fixture(scope="module")
def vae_example():
    return load_script("examples/vae_mnist.py")


def run_main(example, argv: list[str]) -> str:
    """``example.main(argv)``; its stdout. A failure shows what it printed on stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = example.main([str(a) for a in argv])
        except SystemExit as exit:
            raise AssertionError(f"exit {exit.code}: {err.getvalue()}") from None
    assert status == 0
    return out.getvalue()


def exit_code(example, argv: list[str]) -> tuple[int, str]:
    """The exit status of ``example.main(argv)`` that fails, and its stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as excinfo:
        example.main([str(a) for a in argv])
    return excinfo.value.code, err.getvalue()


def read_results(workdir: Path) -> dict:
    return json.loads((workdir / "results.json").read_text())


def metrics_rows(workdir: Path) -> list[dict]:
    return train.MetricsLog(workdir / "metrics.jsonl").rows()


def assert_pngs(workdir: Path, names) -> None:
    for name in names:
        assert (workdir / name).read_bytes()[:8] == PNG, name


def strip_seconds(value):
    """``value`` (results, nested) less every ``"seconds"``: the wall-clock times."""
    if isinstance(value, dict):
        return {k: strip_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [strip_seconds(v) for v in value]
    return value


def without(results: dict, *keys: str) -> dict:
    """``results`` less the wall-clock times and the given config keys (for comparisons)."""
    out = strip_seconds(results)
    out["config"] = {k: v for k, v in out["config"].items() if k not in keys}
    return out


# --------------------------------------------------------------------- distillation


@pytest.fixture(scope="module")
def distill_run(distill_example, tiny_idx_dir, tmp_path_factory):
    """One run of the three stages, one epoch each; shared (read-only) by the tests."""
    workdir = tmp_path_factory.mktemp("distill") / "run"
    argv = ["--data-dir", tiny_idx_dir, "--workdir", workdir, *TINY,
            "--teacher-epochs", 1, "--student-epochs", 1]  # fmt: skip
    stdout = run_main(distill_example, argv)
    return workdir, argv, stdout


def test_distill_writes_results_metrics_figures_checkpoints(distill_run, tiny_idx_dir):
    workdir, _, stdout = distill_run
    results = read_results(workdir)
    for name in MODELS:
        (r,) = results[name]["runs"]  # one seed
        assert {"test_errors", "test_accuracy", "val_accuracy", "params", "seconds"} <= set(r)
        assert r["test_accuracy"] == 1 - r["test_errors"] / 200
        assert r["test_accuracy"] > 0.5 and r["val_accuracy"] > 0.5  # chance is 0.1
        # Not perfect: NOISY_TEST_LABELS test labels are wrong (a model can match a few).
        assert r["test_errors"] >= NOISY_TEST_LABELS // 2
        assert r["best_epoch"] == 1
        stats = results[name]["test_errors"]
        assert stats == {"mean": r["test_errors"], "std": None, "ci95": None, "n": 1,
                         "values": [r["test_errors"]]}  # fmt: skip
        assert results[name]["seeds"] == (None if name == "teacher" else [0])
        assert name in stdout
    assert results["student"]["params"] == results["kd"]["params"] == 1_276_810
    assert results["teacher"]["params"] == 421_642  # the quick preset's CNN teacher
    assert results["methods"] == ["kd"]
    assert not any("unseen" in results[name] for name in MODELS)
    config = results["config"]
    assert config["data_dir"] == str(tiny_idx_dir) and config["val_size"] == 200
    assert (config["teacher_epochs"], config["student_epochs"], config["batch_size"]) == (1, 1, 32)
    assert (config["preset"], config["teacher"]) == ("quick", "cnn_teacher")

    rows = metrics_rows(workdir)
    assert [(r["stage"], r["epoch"]) for r in rows] == [(s, 1) for s in STAGES]
    for row in rows:
        assert {"train_loss", "train_accuracy", "val_accuracy"} <= set(row)
        assert np.isfinite(row["train_loss"])
    assert "train_agreement" in rows[2]  # the distilled student's agreement with its teacher
    assert_pngs(workdir, ("temperature.png", "dark_knowledge.png", "training_curves.png"))
    steps = 600 // 32
    for stage in STAGES:
        ckpt = train.Checkpointer(workdir / stage / "checkpoints", read_only=True)
        assert ckpt.latest_step() == steps and ckpt.read_meta()["complete"]


def test_distill_refuses_to_overwrite_a_run(distill_example, distill_run):
    _, argv, _ = distill_run
    code, err = exit_code(distill_example, argv)  # the same workdir, without --resume
    assert code == 2 and "--resume" in err and err.count("\n") == 1


def test_distill_resume_of_a_finished_run_trains_nothing(
    distill_example, distill_run, tmp_path, monkeypatch
):
    workdir, argv, _ = distill_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    argv = [copy if a == workdir else a for a in argv]

    def no_step(self):
        def step(*args):
            raise AssertionError("a finished run was trained again")

        return step

    monkeypatch.setattr(train.Trainer, "_make_step", no_step)
    run_main(distill_example, [*argv, "--resume"])
    ignore = ("resume", "workdir")
    assert without(read_results(copy), *ignore) == without(read_results(workdir), *ignore)
    assert read_results(copy)["config"]["resume"] is True
    assert metrics_rows(copy) == metrics_rows(workdir)


def test_distill_resume_adds_methods_and_seeds_and_reports_intervals(
    distill_example, distill_run, tmp_path
):
    """A finished one-seed KD run, resumed with two more methods over two seeds: the
    finished stages are reused as they are, the new ones trained, and each model
    reported over its seeds (mean, std, 95 % interval) with every seed's numbers kept.
    (Every method trains in test_benchmarks; each objective is checked in test_distill.)"""
    workdir, argv, _ = distill_run
    base = read_results(workdir)
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    argv = [copy if a == workdir else a for a in argv]
    methods = ("kd", "dkd", "dist")
    stdout = run_main(distill_example, [*argv, "--resume", "--methods", ",".join(methods),
                                        "--seeds", 2])  # fmt: skip
    results = read_results(copy)
    assert results["methods"] == list(methods)
    for name in ("teacher", "student", "kd"):  # reused: seed 0 as before
        assert strip_seconds(results[name]["runs"][0]) == strip_seconds(base[name]["runs"][0])
    for name in ("student", *methods):
        r = results[name]
        assert r["seeds"] == [0, 1] and len(r["runs"]) == 2
        errors = [run["test_errors"] for run in r["runs"]]
        stats = r["test_errors"]
        assert stats["values"] == errors and stats["mean"] == np.mean(errors)
        assert stats["std"] == pytest.approx(np.std(errors, ddof=1))
        low, high = stats["ci95"]
        assert low <= stats["mean"] <= high and high - low == pytest.approx(
            2 * 12.706204736 * stats["std"] / np.sqrt(2), rel=1e-6
        )  # t(0.975, 1)
        assert all(run["test_errors"] >= NOISY_TEST_LABELS // 2 for run in r["runs"])
        assert all(run["val_accuracy"] > 0.5 for run in r["runs"])
        assert name in stdout
    stages = [row["stage"] for row in metrics_rows(copy)]
    new = [f"{n}/seed_{k}" for n in ("student", *methods) for k in (0, 1)]
    new = [s for s in new if s not in STAGES]
    assert stages == [*STAGES, *new]  # the old stages not retrained


def test_distill_reuses_a_teacher_checkpoint(distill_example, distill_run, tmp_path):
    workdir, argv, _ = distill_run
    base = read_results(workdir)
    other = tmp_path / "reuse"
    argv = [other if a == workdir else a for a in argv]
    run_main(distill_example, [*argv, "--teacher-checkpoint", workdir / "teacher" / "checkpoints"])
    results = read_results(other)
    assert results["teacher"]["runs"][0]["best_epoch"] is None  # loaded, not trained
    for key in ("test_errors", "val_accuracy", "params"):
        assert results["teacher"][key] == base["teacher"][key]
    # The same teacher and seed: the students are the same, bit for bit.
    for name in ("student", "kd"):
        assert strip_seconds(results[name]) == strip_seconds(base[name])
    assert not (other / "teacher").exists()
    assert [r["stage"] for r in metrics_rows(other)] == list(STAGES[1:])
    assert_pngs(other, ("dark_knowledge.png",))

    # A checkpoint of another architecture is refused, naming the flag.
    code, err = exit_code(distill_example, [*argv, "--workdir", tmp_path / "bad", "--teacher",
                          "hinton_student", "--teacher-checkpoint",
                          workdir / "teacher" / "checkpoints"])  # fmt: skip
    assert code == 2 and "--teacher-checkpoint" in err


def test_distill_cached_teacher_and_omitted_class(
    distill_example, distill_run, tiny_idx_dir, tmp_path
):
    workdir, argv, _ = distill_run
    other = tmp_path / "omit3"
    argv = [other if a == workdir else a for a in argv]
    # T = 4: this teacher trained for one epoch on 600 images, and at the quick
    # preset's T = 8 its soft targets are too close to uniform to single out the 3s.
    run_main(distill_example, [*argv, "--cache-teacher", "--omit-classes", "3",
                               "--temperature", "4"])  # fmt: skip
    results = read_results(other)
    assert results["config"]["cache_teacher"] is True
    assert results["config"]["omit_classes"] == [3]
    ds = kdata.load_dataset("mnist", data_dir=tiny_idx_dir, val_size=200)
    for name in ("student", "kd"):
        unseen = results[name]["runs"][0]["unseen"]
        before, after = unseen["before"], unseen["after"]
        assert unseen["classes"] == [3]
        assert before["unseen_count"] == after["unseen_count"] == int(np.sum(ds.test.labels == 3))
        assert before["unseen_errors"] <= before["test_errors"]
        # A shift >= 0 of the 3s' logit can only turn more answers into 3.
        assert after["bias_shift"] >= 0.0
        assert after["unseen_accuracy"] >= before["unseen_accuracy"]
    # Hinton et al.'s observation: the student that never saw a 3 never says 3; the
    # distilled one learnt about 3s from the teacher's soft targets alone.
    student, distilled = (results[n]["runs"][0]["unseen"]["before"] for n in ("student", "kd"))
    assert student["unseen_accuracy"] < 0.2
    assert distilled["unseen_accuracy"] > student["unseen_accuracy"] + 0.3
    # The students train on fewer rows (no 3s): fewer steps per epoch.
    transfer = len(ds.train) - int(np.sum(ds.train.labels == 3))
    ckpt = train.Checkpointer(other / "kd" / "seed_0" / "checkpoints", read_only=True)
    assert ckpt.latest_step() == transfer // 32 < 600 // 32
    assert [r["stage"] for r in metrics_rows(other)] == list(STAGES)


def test_distill_bad_flag_exits_2_before_writing(tiny_idx_dir, tmp_path):
    workdir = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, REPO / "examples" / "distill_mnist.py", "--data-dir", tiny_idx_dir,
         "--workdir", workdir, "--alpha", "2", *TINY],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--alpha" in proc.stderr and proc.stderr.count("\n") == 1
    assert not workdir.exists()


def test_distill_teacher_schedule_warms_up_then_decays(distill_example):
    from kdvae import config

    s = config.parse(
        distill_example.Settings, ["--teacher-lr", "4e-3", "--teacher-warmup-fraction", "0.2"]
    )
    teacher = distill_example.learning_rate_schedule(s, "teacher", total=100)
    assert float(teacher(0)) == 0.0 and float(teacher(10)) == pytest.approx(2e-3)
    assert float(teacher(20)) == pytest.approx(4e-3) and float(teacher(100)) == 0.0
    assert float(teacher(60)) == pytest.approx(2e-3)  # cosine: half-way down at the middle
    # The students keep --lr's plain cosine decay.
    student = distill_example.learning_rate_schedule(s, "kd", total=100)
    assert float(student(0)) == pytest.approx(1e-3) and float(student(50)) == pytest.approx(5e-4)
    # The paper preset is Hinton's recipe: the teacher too on --lr's cosine decay.
    paper = config.parse(distill_example.Settings, ["--preset", "paper", "--lr", "3e-4"])
    hinton = distill_example.learning_rate_schedule(paper, "teacher", total=100)
    assert float(hinton(0)) == pytest.approx(3e-4) and float(hinton(50)) == pytest.approx(1.5e-4)
    # ... and its stored config is what runs stored before these settings existed.
    assert not {"teacher_lr", "teacher_warmup_fraction", "dtype"} & set(paper.training())
    with pytest.raises(SystemExit):
        config.parse(distill_example.Settings, ["--teacher-warmup-fraction", "0.6"])


# ---------------------------------------------------------------------------- VAE


# beta = 0.5: the training loss is not the negative ELBO, so a report of the objective in
# place of the ELBO would be caught.
VAE_TINY = [*TINY, "--epochs", 1, "--eval-k", 4, "--beta", 0.5]


@pytest.fixture(scope="module")
def vae_run(vae_example, tiny_idx_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vae") / "run"
    run_main(vae_example, ["--data-dir", tiny_idx_dir, "--workdir", workdir, *VAE_TINY,
                           "--eval-examples", 50])  # fmt: skip
    return workdir


def test_vae_writes_results_metrics_figures_checkpoints(vae_run):
    results = read_results(vae_run)
    keys = {"test_neg_elbo", "test_nll", "eval_k", "kl", "reconstruction", "epochs", "seconds",
            "config"}  # fmt: skip
    assert keys <= set(results)
    assert (results["eval_k"], results["eval_examples"], results["epochs"]) == (4, 50, 1)
    assert results["latents"] == 20 and results["config"]["preset"] == "flax"
    # -ELBO = KL - E[log p(x|z)], all finite and positive on binary images.
    assert results["kl"] > 0 and results["reconstruction"] < 0
    np.testing.assert_allclose(
        results["test_neg_elbo"], results["kl"] - results["reconstruction"], rtol=1e-4
    )
    assert 0 < results["test_nll"] < 784 * np.log(2) * 2
    # The error bars and diagnostics of issue 12 (50 images, k = 4).
    assert 0 <= results["test_nll_mc_se"] < 50 and 0 < results["test_nll_data_se"] < 50
    assert 1.0 <= results["ess_min"] <= results["ess_mean"] <= 4.0
    assert len(results["kl_per_dimension"]) == 20 and min(results["kl_per_dimension"]) >= 0
    assert 0.0 <= results["mutual_information"] <= np.log(50) + 1e-6
    rows = metrics_rows(vae_run)
    assert [(r["stage"], r["epoch"]) for r in rows] == [("vae", 1)]
    assert {"train_loss", "train_neg_elbo", "val_neg_elbo", "test_neg_elbo"} <= set(rows[0])
    # The objective weighs the KL by beta = 0.5; the reported ELBO is the true one (beta 1).
    row = rows[0]
    assert results["config"]["beta"] == 0.5
    np.testing.assert_allclose(
        row["train_loss"], row["train_neg_elbo"] - 0.5 * row["train_kl"], rtol=1e-5
    )
    assert row["train_loss"] < row["train_neg_elbo"] - 1.0
    assert_pngs(vae_run, ("samples.png", "reconstructions.png", "latents.png",
                          "training_curves.png", "kl_per_dimension.png"))  # fmt: skip
    assert not (vae_run / "manifold.png").exists()  # 20 latents: no 2-D manifold
    ckpt = train.Checkpointer(vae_run / "vae" / "checkpoints", read_only=True)
    assert ckpt.latest_step() == 600 // 32


def test_vae_gaussian_likelihood_reports_bits_per_dimension(vae_example, tiny_idx_dir, tmp_path):
    workdir = tmp_path / "run"
    stdout = run_main(vae_example, ["--data-dir", tiny_idx_dir, "--workdir", workdir, *VAE_TINY,
                                    "--eval-examples", 20, "--likelihood", "gaussian",
                                    "--no-figures"])  # fmt: skip
    results = read_results(workdir)
    assert not list(workdir.glob("*.png"))  # --no-figures: results, metrics, checkpoints only
    assert stdout.strip().endswith(f"results, metrics, checkpoints in {workdir}/")
    assert results["config"]["likelihood"] == "gaussian"
    # bits per dimension of the 256 grey levels, from the NLL of the dequantized images
    assert results["test_bpd"] == pytest.approx(
        (results["test_nll"] / 784 + np.log(256)) / np.log(2)
    )
    assert 0 < results["test_bpd"] < 16 and "in bits per dimension" in stdout
    from kdvae import vae

    assert vae.bits_per_dimension(0.0) == pytest.approx(8.0)  # uniform on [0, 1): 8 bits
    code, err = exit_code(vae_example, ["--data-dir", tiny_idx_dir, "--workdir", tmp_path / "b",
                                        *VAE_TINY, "--decoder-logvar", -2])  # fmt: skip
    assert code == 2 and "--decoder-logvar is for --likelihood gaussian" in err


@pytest.mark.parametrize("name", ["distill_example", "vae_example"])
def test_help_lists_every_setting(name, request, capsys):
    example = request.getfixturevalue(name)
    with pytest.raises(SystemExit) as excinfo:
        config.parse(example.Settings, ["--help"], description=example.__doc__)
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    for field in dataclasses.fields(example.Settings):
        if not field.metadata.get("hidden"):
            assert config.flag_name(field) in out


def test_vae_learning_rate_is_the_presets_unless_given(vae_example):
    parse = functools.partial(config.parse, vae_example.Settings)
    assert parse([]).peak_learning_rate() == vae_example.LEARNING_RATES["flax"]
    assert parse(["--preset", "iwae"]).peak_learning_rate() == 1e-3
    assert parse(["--lr", "2e-3"]).peak_learning_rate() == 2e-3
    # What the checkpoints store is the rate used, so a run stored with the iwae preset's
    # 1e-3 (given or not) resumes either way.
    assert (
        parse(["--preset", "iwae"]).training()
        == parse(["--preset", "iwae", "--lr", "1e-3"]).training()
    )


def test_vae_bfloat16_run_reports_the_float32_models_numbers(vae_example, tiny_idx_dir, tmp_path):
    workdir = tmp_path / "run"
    run_main(vae_example, ["--data-dir", tiny_idx_dir, "--workdir", workdir, *VAE_TINY,
                           "--eval-examples", 20, "--dtype", "bfloat16",
                           "--no-figures"])  # fmt: skip
    results, (row,) = read_results(workdir), metrics_rows(workdir)
    # The epoch's row was computed by the bfloat16 model; results.json by its float32 twin.
    assert results["test_neg_elbo"] != row["test_neg_elbo"]
    assert results["test_neg_elbo"] == pytest.approx(row["test_neg_elbo"], rel=2e-2)
    np.testing.assert_allclose(
        results["test_neg_elbo"], results["kl"] - results["reconstruction"], rtol=1e-4
    )


def test_vae_final_fit_trains_on_train_and_validation_for_the_chosen_epochs(
    vae_example, tiny_idx_dir, tmp_path
):
    workdir = tmp_path / "run"
    run_main(vae_example, ["--data-dir", tiny_idx_dir, "--workdir", workdir, *TINY,
                           "--epochs", 3, "--eval-k", 4, "--eval-examples", 20,
                           "--final-fit"])  # fmt: skip
    rows = metrics_rows(workdir)
    chosen = min((r for r in rows if r["stage"] == "vae"), key=lambda r: r["val_neg_elbo"])
    final = [r for r in rows if r["stage"] == "vae/final"]
    assert [r["epoch"] for r in final] == list(range(1, chosen["epoch"] + 1))
    assert all("val_neg_elbo" not in r for r in final)  # nothing held out, nothing chosen
    results = read_results(workdir)
    assert results["final_fit"] and results["best_epoch"] == chosen["epoch"]
    assert results["test_neg_elbo"] == final[-1]["test_neg_elbo"]  # the final model's
    ckpt = train.Checkpointer(workdir / "vae" / "final" / "checkpoints", read_only=True)
    assert ckpt.latest_step() == chosen["epoch"] * (800 // 32)  # 600 + 200 images


def test_vae_seeds_report_intervals_and_resume_adds_a_seed(vae_example, tiny_idx_dir, tmp_path):
    workdir = tmp_path / "run"
    argv = ["--data-dir", tiny_idx_dir, "--workdir", workdir, *VAE_TINY, "--eval-examples", 20]
    stdout = run_main(vae_example, [*argv, "--seeds", 2])
    results = read_results(workdir)
    assert results["seeds"] == [0, 1] and [r["seed"] for r in results["runs"]] == [0, 1]
    first, second = results["runs"]
    assert first["test_nll"] == results["test_nll"] != second["test_nll"]  # two models
    nll = results["over_seeds"]["test_nll"]
    assert nll["values"] == [first["test_nll"], second["test_nll"]] and nll["n"] == 2
    assert nll["ci95"][0] < nll["mean"] < nll["ci95"][1]
    assert "over 2 seeds (seeds 0-1)" in stdout and "  test_nll " in stdout
    assert {r["stage"] for r in metrics_rows(workdir)} == {"vae", "vae/seed_1"}
    # A third seed on --resume trains only that one; the first two come back as they were.
    run_main(vae_example, [*argv, "--seeds", 3, "--resume"])
    again = read_results(workdir)
    assert [r["stage"] for r in metrics_rows(workdir)].count("vae/seed_2") == 1
    untimed = lambda runs: [{k: v for k, v in r.items() if "seconds" not in k} for r in runs]  # noqa: E731
    assert untimed(again["runs"][:2]) == untimed(results["runs"])
    assert again["over_seeds"]["test_nll"]["n"] == 3


def test_vae_2d_through_tfds_manifold_and_iwae_below_elbo(vae_example, tmp_path):
    # TFDS's mock data (random images) in place of a download; all 96 test images for both
    # bounds, so that they are comparable.
    with mock_tfds(tmp_path / "tfds", "mnist", ("train", "test"), num_examples=96):
        run_main(vae_example, ["--dataset", "mnist", "--workdir", tmp_path / "run",
                               "--preset", "2d", "--val-size", 32, "--batch-size", 32,
                               "--epochs", 1, "--eval-k", 4, "--no-progress"])  # fmt: skip
    results = read_results(tmp_path / "run")
    assert results["config"]["dataset"] == "mnist" and results["config"]["data_dir"] is None
    assert results["latents"] == 2 and results["eval_examples"] == 96
    assert_pngs(tmp_path / "run", ("manifold.png", "latents.png"))
    assert [r["epoch"] for r in metrics_rows(tmp_path / "run")] == [1]
    # E[IWAE_k] >= ELBO: the NLL estimate is at most the negative ELBO, up to the noise of
    # the one-sample estimates over 96 images.
    assert np.isfinite(results["test_nll"])
    assert results["test_nll"] <= results["test_neg_elbo"] + 0.5


SETUP_BEFORE_JAX = """
import os, sys
sys.path.insert(0, "tests")
import jax._src.xla_bridge as xla_bridge
from conftest import load_script
from kdvae import train

def stop():  # the examples' first call into kdvae.train that changes the process
    print(xla_bridge.backends_are_initialized(), flush=True)
    os._exit(0)

train.keep_freed_host_memory = stop
load_script(sys.argv[1]).main(sys.argv[2:])
"""


@pytest.mark.parametrize("script", ["examples/distill_mnist.py", "examples/vae_mnist.py"])
def test_examples_set_up_the_process_before_jax_starts_a_backend(script, tmp_path):
    """Host memory reuse (kdvae.train.keep_freed_host_memory) holds only from then on."""
    argv = [script, "--workdir", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, "-c", SETUP_BEFORE_JAX, *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.stdout.strip() == "False", done.stderr[-2000:]
