"""The distillation methods as objectives, and the statistics over seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdvae import distill, losses, models

B, C = 16, 10
STUDENT = jax.random.normal(jax.random.key(0), (B, C)) * 3
TEACHER = jax.random.normal(jax.random.key(1), (B, C)) * 3
LABELS = jax.random.randint(jax.random.key(2), (B,), 0, C)
H = distill.DEFAULT_HYPERPARAMETERS


def cross_entropy(logits, labels):
    logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def expected(method: str, warmup: float) -> jax.Array:
    """Each method's objective as its paper writes it, from the losses directly."""
    s, t, y = STUDENT, TEACHER, LABELS
    ce = cross_entropy(s, y)
    if method == "kd":
        soft = losses.distillation_loss(s, t, temperature=H["temperature"]).mean()
        return H["alpha"] * ce + (1 - H["alpha"]) * soft
    if method == "dkd":
        dkd = losses.decoupled_kd_loss(s, t, y, temperature=4.0, alpha=1.0, beta=8.0)
        return ce + warmup * dkd.mean()
    if method == "dist":
        return ce + losses.dist_loss(s, t, temperature=1.0, beta=1.0, gamma=1.0)
    if method == "kd_ls":  # the hard term on the raw logits, the soft one standardized
        z_s, z_t = losses.standardize_logits(s), losses.standardize_logits(t)
        soft = losses.distillation_loss(z_s, z_t, temperature=2.0).mean()
        return H["ls_alpha"] * ce + (1 - H["ls_alpha"]) * soft
    soft = {
        "reverse_kl": lambda: losses.reverse_kl_loss(s, t, temperature=H["temperature"]),
        "jsd": lambda: losses.generalized_jsd_loss(s, t, beta=0.5, temperature=H["temperature"]),
        "logit_matching": lambda: losses.logit_matching_loss(s, t),
    }[method]().mean()
    return H["alpha"] * ce + (1 - H["alpha"]) * soft


@pytest.mark.parametrize("method", distill.METHODS)
@pytest.mark.parametrize("warmup", [0.25, 1.0])
def test_method_loss_is_the_papers_objective(method, warmup):
    loss = distill.method_loss(method, H)(STUDENT, TEACHER, LABELS, warmup)
    assert loss.shape == () and np.isfinite(loss)
    np.testing.assert_allclose(loss, expected(method, warmup), rtol=2e-5)


def test_the_papers_defaults():
    assert (H["dkd_temperature"], H["dkd_alpha"], H["dkd_beta"], H["dkd_warmup"]) == (4, 1, 8, 20)
    assert (H["dist_temperature"], H["dist_beta"], H["dist_gamma"]) == (1, 1, 1)
    assert H["ls_temperature"] == 2 and H["ls_alpha"] == pytest.approx(0.1 / 9.1)
    assert H["jsd_beta"] == 0.5


@pytest.mark.parametrize("method", ["dkd", "kd", "dist"])
def test_the_objective_ramps_dkd_up_over_its_warmup_epochs(method):
    model = models.MLPClassifier((8,), rngs=nnx.Rngs(0))
    images = jax.random.randint(jax.random.key(3), (B, 28, 28, 1), 0, 256).astype(jnp.uint8)
    batch = {"images": images, "labels": LABELS, "teacher_logits": TEACHER}
    objective = distill.distillation_objective(method, {"dkd_warmup": 4})
    value = {
        e: objective(model, batch, jax.random.key(0), {"epoch": jnp.int32(e)})[0]
        for e in (0, 1, 3, 9)
    }
    logits = model(images.astype(jnp.float32) / 255.0)
    ce = cross_entropy(logits, LABELS)
    if method == "dkd":  # CE + (e + 1) / 4 of DKD's term, then all of it
        soft = losses.decoupled_kd_loss(logits, TEACHER, LABELS, temperature=4.0, beta=8.0)
        for epoch, ramp in ((0, 0.25), (1, 0.5), (3, 1.0), (9, 1.0)):
            np.testing.assert_allclose(value[epoch], ce + ramp * soft.mean(), rtol=1e-5)
    else:  # no warm-up: the same at every epoch
        assert value[0] == value[1] == value[3] == value[9]


def test_an_unknown_method_or_hyperparameter_names_the_argument():
    with pytest.raises(ValueError, match="method must be one of"):
        distill.method_loss("fitnets", H)
    with pytest.raises(ValueError, match=r"hyper has unknown names \['temprature'\]"):
        distill.distillation_objective("kd", {"temprature": 2.0})


def test_over_seeds_keeps_every_run_and_summarises_them():
    runs = [
        {"test_errors": e, "test_accuracy": 1 - e / 100, "val_accuracy": 0.9, "params": 7,
         "seconds": 1.5, "best_epoch": 2}
        for e in (10, 12, 14)
    ]  # fmt: skip
    out = distill.over_seeds(runs, [0, 1, 2])
    assert out["runs"] == runs and out["seeds"] == [0, 1, 2]
    assert out["params"] == 7 and out["seconds"] == 4.5
    assert out["test_errors"]["mean"] == 12 and out["test_errors"]["std"] == 2
    assert out["test_accuracy"]["mean"] == pytest.approx(0.88)
    table = distill.format_table({"teacher": out, "student": out, "methods": []})
    assert "12.0 ± 2.0" in table and "[7.0, 17.0]" in table  # 12 -+ 4.303 * 2 / sqrt(3)
