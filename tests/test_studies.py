"""scripts/distillation_studies.py: choices on validation, intervals, the unseen study."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import scipy.stats
from conftest import load_script

pytestmark = pytest.mark.usefixtures("compilation_cache")

TINY = ["--val-size", "200", "--batch-size", "32", "--student-epochs", "1"]


@pytest.fixture(scope="module")
def studies():
    return load_script("scripts/distillation_studies.py")


@pytest.fixture(scope="module")
def teacher(tiny_idx_dir, tmp_path_factory):
    """A finished one-epoch teacher of the example, on the tiny data."""
    workdir = tmp_path_factory.mktemp("teacher") / "run"
    example = load_script("examples/distill_mnist.py")
    with contextlib.redirect_stdout(io.StringIO()):
        example.main([*map(str, ["--data-dir", tiny_idx_dir, "--workdir", workdir, *TINY]),
                      "--teacher-epochs", "1", "--no-progress"])  # fmt: skip
    return workdir / "teacher" / "checkpoints"


def run(studies, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = studies.main([str(a) for a in argv])
    return result, out.getvalue()


def test_compare_chooses_on_validation_and_reports_every_seed(
    studies, teacher, tiny_idx_dir, tmp_path, monkeypatch
):
    grids = {"student": [{}], "kd": [dict(temperature=t) for t in (2.0, 4.0, 16.0)]}
    monkeypatch.setattr(studies, "GRIDS", grids)
    argv = ["compare", "--workdir", tmp_path, "--teacher-checkpoint", teacher, "--seeds", 3,
            "--compare-methods", "student,kd", "--data-dir", tiny_idx_dir, *TINY]  # fmt: skip
    out, stdout = run(studies, argv)
    assert json.loads((tmp_path / "comparison.json").read_text()) == out
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = [g["val_accuracy"] for g in out["grids"]["kd"]]
    assert len(scores) == 3 and out["chosen"]["kd"] == grids["kd"][int(np.argmax(scores))]
    best = int(np.argmax(scores))
    final = out["final"]["kd"]
    assert final["seeds"] == [0, 1, 2] and len(final["runs"]) == 3
    # The setting's score is the mean validation accuracy of the first two seeds, which
    # the final runs reuse (not retrained: the same numbers).
    assert np.mean([r["val_accuracy"] for r in final["runs"][:2]]) == pytest.approx(scores[best])
    a, b = out["final"]["student"]["test_errors"]["values"], final["test_errors"]["values"]
    assert out["vs_kd"]["student"] == studies.welch(a, b)
    assert "student" in stdout and "kd: chosen" in stdout
    # Again with the choices fixed: no grid, the same finished runs (not retrained).
    again, _ = run(studies, [*argv, "--chosen-from", tmp_path / "comparison.json"])
    assert again["chosen"] == out["chosen"] and len(again["grids"]["kd"]) == 1
    assert again["final"]["kd"]["test_errors"] == final["test_errors"]


def test_welch_interval_is_scipys(studies):
    a, b = [1.0, 2.0, 3.0, 6.0], [4.0, 4.0, 5.0]
    w = studies.welch(a, b)
    expected = scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert w["difference"] == pytest.approx(3.0 - 13 / 3)
    assert w["ci95"] == pytest.approx([expected.low, expected.high])
    assert studies.welch([5.0, 5.0], [3.0, 3.0]) == {"difference": 2.0, "ci95": [2.0, 2.0]}


def test_unseen_omits_each_class_and_keeps_two(studies, teacher, tiny_idx_dir, tmp_path):
    argv = ["unseen", "--workdir", tmp_path, "--teacher-checkpoint", teacher, "--seeds", 1,
            "--omit", "3", "--data-dir", tiny_idx_dir, *TINY]  # fmt: skip
    out, stdout = run(studies, argv)
    omitted = (3,)
    assert list(out) == [f"omit {c}" for c in omitted] + ["keep 7,8"]
    assert out["omit 3"]["kd"]["classes"] == [3]
    assert out["keep 7,8"]["student"]["classes"] == [0, 1, 2, 3, 4, 5, 6, 9]
    for case in out.values():
        for model in case.values():
            before = model["before"]["unseen_accuracy"]["mean"]
            after = model["after"]["unseen_accuracy"]["mean"]
            assert 0.0 <= before <= after <= 1.0  # a shift >= 0 only adds answers of them
    # The student alone never names a class it never saw.
    assert all(out[f"omit {c}"]["student"]["before"]["unseen_accuracy"]["mean"] < 0.2
               for c in omitted)  # fmt: skip
    assert (tmp_path / "unseen_classes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "unseen.json").read_text()) == out
    assert "omit 3" in stdout and "keep 7,8" in stdout
