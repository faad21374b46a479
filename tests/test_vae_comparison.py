"""scripts/vae_comparison.py: Burda et al.'s four models over seeds, paired with the VAE."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from conftest import load_script

pytestmark = pytest.mark.usefixtures("compilation_cache")

TINY = ["--val-size", "200", "--batch-size", "32", "--epochs", "1", "--eval-k", "4",
        "--no-figures"]  # fmt: skip


@pytest.fixture(scope="module")
def comparison():
    return load_script("scripts/vae_comparison.py")


@pytest.fixture(scope="module")
def study(comparison, tiny_idx_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("burda")
    argv = ["--workdir", workdir, "--seeds", 2, "--data-dir", tiny_idx_dir, *TINY]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = comparison.main([str(a) for a in argv])
    return workdir, argv, result, out.getvalue()


def test_every_model_trains_its_own_bound_over_every_seed(study, comparison):
    workdir, _, out, stdout = study
    assert json.loads((workdir / "burda.json").read_text()) == out
    assert list(out["results"]) == list(comparison.MODELS)
    for name, results in out["results"].items():
        c = results["config"]
        flags = comparison.MODELS[name]
        assert c["objective"] == flags[1] and c["preset"] == "iwae"
        assert c["k"] == (int(flags[3]) if c["objective"] == "iwae" else c["k"])
        assert c["gradient"] == ("dreg" if "dreg" in name else "reparameterized")
        assert [r["seed"] for r in results["runs"]] == [0, 1]
        assert {r["eval_k"] for r in results["runs"]} == {4}
        assert f"| {name} |" in stdout
    nll = {name: r["test_nll"] for name, r in out["results"].items()}
    assert len(set(nll.values())) == 4  # four different trainings, not one copied


def test_differences_to_the_vae_are_paired_over_seeds(study):
    _, _, out, _ = study
    runs = {name: r["runs"] for name, r in out["results"].items()}
    for name in ("iwae_k5", "iwae_k50", "iwae_k50_dreg"):
        s = out["summary"][name]["test_nll_minus_vae"]
        diff = [a["test_nll"] - b["test_nll"] for a, b in zip(runs[name], runs["vae"])]
        assert s["values"] == pytest.approx(diff)
        assert s["mean"] == pytest.approx(np.mean(diff))
        half = 12.706 * np.std(diff, ddof=1) / np.sqrt(2)  # Student's t, 1 degree of freedom
        assert s["ci95"] == pytest.approx([np.mean(diff) - half, np.mean(diff) + half], rel=1e-3)
    assert "test_nll_minus_vae" not in out["summary"]["vae"]
    seconds = out["summary"]["iwae_k50"]["seconds"]["values"]
    assert seconds == [r["seconds"] for r in runs["iwae_k50"]]


def _run(seed, nll):
    other = dict.fromkeys(("test_nll_mc_se", "test_nll_data_se", "active_units", "seconds"), 1.0)
    return {"seed": seed, "test_nll": nll, "test_neg_elbo": nll + 3.0, **other}


def test_pairs_are_matched_by_seed_not_by_position(comparison):
    vae = {"runs": [_run(0, 100.0), _run(1, 110.0), _run(2, 90.0)]}
    iwae = {"runs": [_run(2, 89.0), _run(0, 98.0), _run(1, 107.0)]}  # another order
    summary = comparison.summarize({"vae": vae, "iwae_k5": iwae})
    assert summary["iwae_k5"]["test_nll_minus_vae"]["values"] == [-2.0, -3.0, -1.0]
    with pytest.raises(ValueError, match=r"iwae_k5 ran seeds \[0, 1\] and vae \[0, 1, 2\]"):
        comparison.summarize({"vae": vae, "iwae_k5": {"runs": iwae["runs"][1:]}})


def test_a_finished_model_is_read_back_not_trained_again(study, comparison, monkeypatch):
    workdir, argv, out, _ = study
    example = comparison.load_example()

    def no_training(argv):
        raise AssertionError(f"trained again: {argv}")

    stub = type("E", (), {"main": staticmethod(no_training), "Settings": example.Settings})
    monkeypatch.setattr(comparison, "load_example", lambda: stub)
    with contextlib.redirect_stdout(io.StringIO()):
        again = comparison.main([str(a) for a in argv])
    assert again == out
    # Another setting (here the epochs) is another run: it is not read back.
    other = [str(a) for a in argv]
    other[other.index("--epochs") + 1] = "2"
    with pytest.raises(AssertionError, match="trained again"):
        comparison.main(other)


def test_unknown_models_are_refused_naming_the_flag(comparison, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        comparison.main(["--workdir", str(tmp_path), "--models", "vae,iwae_k500"])
    assert exit.value.code == 2
    assert "--models: unknown iwae_k500" in capsys.readouterr().err
