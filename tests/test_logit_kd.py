"""Tests for the logit-distillation family in kdvae.losses.

Decoupled KD, DIST, logit standardization, reverse KL, the generalized Jensen-Shannon
divergence and logit matching: each against an independent float64 NumPy reference
written from its paper, through ``jax.jit``; then the identities the papers state (DKD's
decomposition of KD, JSD's ends, KD's high-temperature limit), the invariances, use
under ``jit``/``vmap``/``grad``, extreme inputs and the argument checks. Gradients are
checked against finite differences with the other losses', in test_losses.py.
"""

from __future__ import annotations

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_losses import (  # pytest puts tests/ on sys.path (rootdir conftest)
    assert_close,
    logits_and_targets,
    np_distillation,
    np_log_softmax,
    np_logsumexp,
    np_softmax,
    np_sum_plogq,
    soft_atol,
)

from kdvae import losses

TEMPERATURES = [1e-3, 0.05, 1.0, 1000.0, 1e4]  # both ends of TEMPERATURE_RANGE, and between
assert losses.TEMPERATURE_RANGE == (TEMPERATURES[0], TEMPERATURES[-1])


# ------------------------------------------------------------- float64 references


def np_quiet(fn):
    """A reference run with NumPy's inf/NaN warnings off (warnings are errors here)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapped


@np_quiet
def np_kl(log_p, log_q):
    """KL(p || q) over the last axis, 0 log 0 = 0."""
    return np_sum_plogq(np.exp(log_p), log_p - log_q)


@np_quiet
def np_decoupled_kd(s, t, labels, temperature, alpha, beta, where=None):
    """Zhao et al. eqs. (1)-(6): b = (p_y, 1 - p_y), p_hat_i = p_i / (1 - p_y) for i != y;
    classes last. In log space (float64 probabilities underflow at T = 1e-3)."""
    target = np.eye(s.shape[-1], dtype=bool)[labels]

    def split(z):
        log_p = np_log_softmax(z, temperature, where=where)
        log_target = np.sum(np.where(target, log_p, 0.0), axis=-1)  # log p_y
        log_others = np.where(target, -np.inf, log_p)
        log_rest = np_logsumexp(log_others)  # log (1 - p_y) = log sum_{i != y} p_i
        return np.stack([log_target, log_rest], -1), log_others - log_rest[..., None]

    (b_t, hat_t), (b_s, hat_s) = split(t), split(s)
    return temperature**2 * (alpha * np_kl(b_t, b_s) + beta * np_kl(hat_t, hat_s))


def np_pearson(a, b, axis):
    """The official DIST code's Pearson correlation: cov / (|a - mean| |b - mean| + 1e-8)."""
    a = a - a.mean(axis, keepdims=True)
    b = b - b.mean(axis, keepdims=True)
    norms = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
    return np.sum(a * b, axis=axis) / (norms + 1e-8)


def np_dist(s, t, temperature, beta=1.0, gamma=1.0):
    """Huang et al.: T**2 (beta mean_b (1 - rho(rows)) + gamma mean_c (1 - rho(columns)))."""
    y_s, y_t = np_softmax(s, temperature), np_softmax(t, temperature)
    inter = np.mean(1.0 - np_pearson(y_s, y_t, 1))
    intra = np.mean(1.0 - np_pearson(y_s, y_t, 0))
    return temperature**2 * (beta * inter + gamma * intra)


def np_standardize(z, eps=1e-7, where=None):
    """Sun et al. Algorithm 1 (population std), eps added to it; masked classes -inf."""
    z = np.asarray(z, np.float64)
    visible = np.isfinite(z) if where is None else np.isfinite(z) & where
    n = visible.sum(-1, keepdims=True)
    mean = np.where(visible, z, 0.0).sum(-1, keepdims=True) / n
    deviation = np.where(visible, z - mean, 0.0)
    std = np.sqrt(np.sum(deviation**2, -1, keepdims=True) / n)
    return np.where(visible, deviation / (std + eps), -np.inf)


@np_quiet
def np_reverse_kl(s, t, temperature, where=None):
    log_p_s = np_log_softmax(s, temperature, where=where)
    return temperature**2 * np_kl(log_p_s, np_log_softmax(t, temperature, where=where))


@np_quiet
def np_generalized_jsd(s, t, beta, temperature, where=None):
    """GKD: beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s,
    the mixture formed from probabilities; beta = 0 and 1: forward and reverse KL."""
    log_p_s = np_log_softmax(s, temperature, where=where)
    log_p_t = np_log_softmax(t, temperature, where=where)
    if beta in (0.0, 1.0):
        kl = np_kl(log_p_t, log_p_s) if beta == 0.0 else np_kl(log_p_s, log_p_t)
        return temperature**2 * kl
    log_m = np.log(beta * np.exp(log_p_t) + (1.0 - beta) * np.exp(log_p_s))
    return temperature**2 * (beta * np_kl(log_p_t, log_m) + (1.0 - beta) * np_kl(log_p_s, log_m))


def np_logit_matching(s, t):
    """Ba & Caruana's squared logit difference, on zero-mean logits, 1/2 mean over classes."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    d = (s - s.mean(-1, keepdims=True)) - (t - t.mean(-1, keepdims=True))
    return 0.5 * np.mean(d**2, axis=-1)


# ------------------------------------------------------ references through jax.jit


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (0.5, 2.0), (0.0, 1.0)])
def test_decoupled_kd_loss_matches_numpy(temperature, alpha, beta):
    _, s, t, labels = logits_and_targets(60, shape=(6, 7))
    kw = dict(temperature=temperature, alpha=alpha, beta=beta)
    out = jax.jit(functools.partial(losses.decoupled_kd_loss, **kw))(s, t, labels)
    assert out.shape == (6,) and out.dtype == jnp.float32
    assert_close(out, np_decoupled_kd(s, t, labels, temperature, alpha, beta), 2e-5, 2e-5)


def test_decoupled_kd_loss_with_a_mask_matches_numpy_and_slicing():
    rng, s, t, _ = logits_and_targets(61, shape=(5, 8))
    keep = np.array([True, False, True, True, False, True, True, True])
    labels = rng.choice(np.flatnonzero(keep), size=5).astype(np.int32)
    sliced_labels = (np.cumsum(keep) - 1)[labels].astype(np.int32)
    loss = jax.jit(functools.partial(losses.decoupled_kd_loss, temperature=2.0, beta=3.0))
    masked = loss(s, t, labels, where=keep)
    assert_close(masked, np_decoupled_kd(s, t, labels, 2.0, 1.0, 3.0, where=keep), 2e-5)
    assert_close(masked, loss(s[:, keep], t[:, keep], sliced_labels), 1e-5, 1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_decoupled_kd_splits_hinton_kd_into_tckd_and_nckd(temperature):
    """Zhao et al. eq. (5): KD = TCKD + (1 - p_t[y]) NCKD; with alpha = beta = 1 DKD is
    TCKD + NCKD. The terms come from the loss itself (alpha, beta = 1, 0 and 0, 1); the
    identity is checked against a float64 KD and p_t[y] from probabilities."""
    _, s, t, labels = logits_and_targets(62, shape=(8, 10))
    dkd = functools.partial(losses.decoupled_kd_loss, temperature=temperature)

    @jax.jit
    def terms(s, t, labels):
        return [dkd(s, t, labels, alpha=a, beta=b) for a, b in ((1, 0), (0, 1), (1, 1))]

    tckd, nckd, both = (np.asarray(x, np.float64) for x in terms(s, t, labels))
    p_target = np_softmax(t, temperature)[np.arange(8), labels]
    kd = np_distillation(s, t, None, temperature)
    atol = soft_atol(temperature)
    assert_close(tckd + (1.0 - p_target) * nckd, kd, rtol=2e-5, atol=atol)
    assert_close(both, tckd + nckd, rtol=1e-6, atol=1e-6)
    # And the same identity from the paper's probabilities, b = (p_y, 1 - p_y).
    p_s, p_t = np_softmax(s, temperature), np_softmax(t, temperature)
    rows = np.arange(8)
    b_s = np.stack([p_s[rows, labels], 1 - p_s[rows, labels]], -1)
    b_t = np.stack([p_t[rows, labels], 1 - p_t[rows, labels]], -1)
    tckd_prob = temperature**2 * np.sum(b_t * np.log(b_t / b_s), -1)
    assert_close(tckd, tckd_prob, rtol=2e-5, atol=atol)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("beta,gamma", [(1.0, 1.0), (2.0, 0.5), (0.0, 1.0)])
def test_dist_loss_matches_numpy(temperature, beta, gamma):
    _, s, t, _ = logits_and_targets(63, shape=(16, 10))
    kw = dict(temperature=temperature, beta=beta, gamma=gamma)
    out = jax.jit(functools.partial(losses.dist_loss, **kw))(s, t)
    assert out.shape == () and out.dtype == jnp.float32  # one value for the batch
    assert_close(out, np_dist(s, t, temperature, beta, gamma), rtol=2e-5, atol=1e-6)


def test_dist_loss_is_one_value_per_batch_and_vmaps_over_batches():
    rng = np.random.default_rng(64)
    s, t = (rng.normal(size=(3, 8, 5)).astype(np.float32) for _ in range(2))
    out = jax.jit(jax.vmap(losses.dist_loss))(s, t)
    assert out.shape == (3,)
    assert_close(out, [np_dist(s[i], t[i], 1.0) for i in range(3)], rtol=2e-5, atol=1e-6)
    # The intra-class term spans the batch: a batch's loss is not the mean of its halves'.
    halves = [losses.dist_loss(s[0, :4], t[0, :4]), losses.dist_loss(s[0, 4:], t[0, 4:])]
    assert abs(float(np.mean(halves)) - float(out[0])) > 1e-3


def test_dist_loss_is_zero_for_the_same_relations_and_invariant_to_the_teachers_shift():
    _, s, t, _ = logits_and_targets(65, shape=(6, 5))
    loss = jax.jit(losses.dist_loss)
    assert_close(loss(s, s), 0.0, atol=1e-6)
    assert_close(loss(s, t + 7.0), loss(s, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", [-1, 1])
def test_standardize_logits_matches_numpy(axis):
    rng = np.random.default_rng(66)
    z = (3.0 * rng.normal(size=(4, 6, 3)) + 5.0).astype(np.float32)
    z[0, :, 0] = 2.5  # a constant row: zeros, finite
    fn = jax.jit(functools.partial(losses.standardize_logits, axis=axis))
    out = np.asarray(fn(z if axis == 1 else np.moveaxis(z, 1, -1)))
    out = out if axis == 1 else np.moveaxis(out, -1, 1)  # classes on axis 1
    ref = np.moveaxis(np_standardize(np.moveaxis(z, 1, -1)), -1, 1)
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[0, :, 0], 0.0)
    assert_close(out[1:].mean(1), 0.0, atol=1e-6)
    assert_close(out[1:].std(1), 1.0, rtol=1e-5)


def test_standardize_logits_with_a_mask_and_minus_inf_matches_numpy():
    rng = np.random.default_rng(67)
    z = rng.normal(size=(5, 7)).astype(np.float32)
    z[0, 3] = -np.inf  # left out, as if masked
    keep = rng.random((5, 7)) > 0.3
    keep[:, :2] = True
    fn = jax.jit(losses.standardize_logits)
    for where in (None, keep):
        out, ref = np.asarray(fn(z, where=where)), np_standardize(z, where=where)
        hidden = np.isinf(ref)
        assert np.all(out[hidden] == -np.inf) and hidden[0, 3]
        assert_close(out[~hidden], ref[~hidden], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift,scale", [(0.0, 0.25), (-100.0, 1.0), (1e3, 7.0)])
def test_standardized_kd_and_dkd_ignore_the_shift_and_scale_of_either_models_logits(shift, scale):
    """Sun et al.'s point: after standardization only the logits' relations matter."""
    _, s, t, labels = logits_and_targets(68, shape=(6, 10))
    z = losses.standardize_logits

    @jax.jit
    def standardized(s, t):
        return [
            losses.distillation_loss(z(s), z(t), labels, temperature=2.0, alpha=0.1),
            losses.decoupled_kd_loss(z(s), z(t), labels, temperature=2.0),
        ]

    base = standardized(s, t)
    for s2, t2 in ((scale * s + shift, t), (s, scale * t + shift)):
        for value, ref in zip(standardized(s2.astype(np.float32), t2.astype(np.float32)), base):
            assert_close(value, ref, rtol=1e-4, atol=1e-5)
    # Without it KD does depend on them.
    kd = functools.partial(losses.distillation_loss, temperature=2.0, alpha=0.1)
    assert not np.allclose(kd(s, 3.0 * t, labels), kd(s, t, labels), rtol=1e-3)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_reverse_kl_loss_matches_numpy_and_has_the_closed_form_gradient(temperature):
    _, s, t, _ = logits_and_targets(69, shape=(6, 7))
    loss = functools.partial(losses.reverse_kl_loss, temperature=temperature)
    value, grad = jax.jit(jax.value_and_grad(lambda s, t: loss(s, t).sum()))(s, t)
    assert_close(jax.jit(loss)(s, t), np_reverse_kl(s, t, temperature), 2e-5, 2e-5)
    assert_close(value, np_reverse_kl(s, t, temperature).sum(), 2e-5, 2e-5)
    # d/dz_s T**2 KL(p_s || p_t) = T p_s (r - sum p_s r), r = log p_s - log p_t.
    p_s = np_softmax(s, temperature)
    r = np_log_softmax(s, temperature) - np_log_softmax(t, temperature)
    closed = temperature * p_s * (r - np.sum(p_s * r, -1, keepdims=True))
    assert_close(grad, closed, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_loss_matches_numpy(temperature, beta):
    _, s, t, _ = logits_and_targets(70, shape=(6, 7))
    kw = dict(beta=beta, temperature=temperature)
    loss = jax.jit(functools.partial(losses.generalized_jsd_loss, **kw))
    assert_close(loss(s, t), np_generalized_jsd(s, t, beta, temperature), 2e-5, 2e-5)


def test_generalized_jsd_ends_are_forward_and_reverse_kl_and_the_middle_is_symmetric():
    rng, s, t, _ = logits_and_targets(71, shape=(6, 7))
    keep = rng.random(7) > 0.3
    jsd = functools.partial(losses.generalized_jsd_loss, temperature=2.0, where=keep)
    forward = losses.distillation_loss(s, t, temperature=2.0, where=keep)
    reverse = losses.reverse_kl_loss(s, t, temperature=2.0, where=keep)
    assert_close(jsd(s, t, beta=0.0), forward, 1e-6, 1e-6)
    assert_close(jsd(s, t, beta=1.0), reverse, 1e-6, 1e-6)
    assert_close(jsd(s, t, beta=0.5), jsd(t, s, beta=0.5), 1e-5, 1e-6)
    assert_close(jsd(s, t, beta=0.3), jsd(t, s, beta=0.7), 1e-5, 1e-6)
    # A traced beta (a schedule) gives the same, the ends included.
    traced = jax.jit(lambda s, t, b: jsd(s, t, beta=b))
    for beta in (0.0, 0.3, 1.0):
        assert_close(traced(s, t, jnp.float32(beta)), jsd(s, t, beta=beta), 1e-5, 1e-6)


def test_generalized_jsd_near_its_ends_is_a_scaled_forward_or_reverse_kl():
    """The sense in which JSD(beta) interpolates (GKD): JSD(beta) / beta -> KL(p_t || p_s)
    as beta -> 0, and JSD(beta) / (1 - beta) -> KL(p_s || p_t) as beta -> 1, with an
    error of order beta (1 - beta): no cancellation in log(1 - beta) or the mixture."""
    _, s, t, _ = logits_and_targets(72, shape=(6, 7), scale=1.0)
    with jax.enable_x64(True):
        s, t = s.astype(np.float64), t.astype(np.float64)
        jsd = jax.jit(losses.generalized_jsd_loss, static_argnames="beta")
        forward, reverse = np_distillation(s, t, None, 1.0), np_reverse_kl(s, t, 1.0)
        for eps in (1e-3, 1e-5, 1e-7):
            near_zero = np.asarray(jsd(s, t, beta=eps)) / eps
            near_one = np.asarray(jsd(s, t, beta=1.0 - eps)) / eps
            assert_close(near_zero, forward, rtol=30 * eps, atol=0)
            assert_close(near_one, reverse, rtol=30 * eps, atol=0)


def test_logit_matching_loss_matches_numpy_and_its_gradient_is_the_centred_difference():
    _, s, t, _ = logits_and_targets(73, shape=(6, 9))
    value, grad = jax.jit(jax.value_and_grad(lambda s, t: losses.logit_matching_loss(s, t).sum()))(
        s, t
    )
    out = jax.jit(losses.logit_matching_loss)(s, t)
    assert out.shape == (6,)
    assert_close(out, np_logit_matching(s, t), 1e-5, 1e-5)
    assert_close(value, np_logit_matching(s, t).sum(), 1e-5, 1e-5)
    d = (s - s.mean(-1, keepdims=True)) - (t - t.mean(-1, keepdims=True))
    assert_close(grad, d / s.shape[-1], 1e-5, 1e-6)
    # Invariant to a shift of either model's logits, not to a scale.
    assert_close(losses.logit_matching_loss(s + 5.0, t - 3.0), out, 1e-5, 1e-5)


def test_kd_gradient_tends_to_the_logit_matching_gradient_as_t_grows():
    """Hinton et al. 2.1: T (S_T(z_s) - S_T(z_t)) -> ((z_s - mean) - (z_t - mean)) / C, with
    a relative error of order 1/T; in float64, so rounding does not hide it at T = 1000."""
    _, s, t, _ = logits_and_targets(74, shape=(8, 10), scale=1.0)
    with jax.enable_x64(True):
        s, t = s.astype(np.float64), t.astype(np.float64)
        match = jax.grad(lambda s: losses.logit_matching_loss(s, t).sum())(s)

        @functools.partial(jax.jit, static_argnames="temperature")
        def kd_grad(s, temperature):
            return jax.grad(
                lambda s: losses.distillation_loss(s, t, temperature=temperature).sum()
            )(s)

        errors = []
        for temperature in (10.0, 100.0, 1000.0):
            g = kd_grad(s, temperature)
            errors.append(float(jnp.linalg.norm(g - match) / jnp.linalg.norm(match)))
    assert errors[0] < 0.1
    for coarse, fine in zip(errors, errors[1:]):  # ten times T, a tenth of the error
        assert 7.0 < coarse / fine < 13.0, errors


def test_the_teacher_gets_no_gradient():
    _, s, t, labels = logits_and_targets(75, shape=(6, 7))
    two_model_losses = {
        "decoupled_kd_loss": lambda s, t: losses.decoupled_kd_loss(s, t, labels),
        "dist_loss": losses.dist_loss,
        "reverse_kl_loss": losses.reverse_kl_loss,
        "generalized_jsd_loss": losses.generalized_jsd_loss,
        "logit_matching_loss": losses.logit_matching_loss,
    }
    for name, loss in two_model_losses.items():
        g_s, g_t = jax.jit(jax.grad(lambda s, t: loss(s, t).sum(), argnums=(0, 1)))(s, t)
        np.testing.assert_array_equal(g_t, np.zeros_like(t), err_msg=name)
        assert np.abs(np.asarray(g_s)).max() > 1e-3, name  # the student does learn


# ------------------------------------------------------------------ jit, vmap, grad

PER_EXAMPLE = {  # name -> loss(s, t, labels), one value per example
    "decoupled_kd_loss": lambda s, t, y: losses.decoupled_kd_loss(s, t, y),
    "reverse_kl_loss": lambda s, t, y: losses.reverse_kl_loss(s, t, temperature=2.0),
    "generalized_jsd_loss": lambda s, t, y: losses.generalized_jsd_loss(s, t, beta=0.2),
    "logit_matching_loss": lambda s, t, y: losses.logit_matching_loss(s, t),
    "standardized_kd": lambda s, t, y: losses.distillation_loss(
        losses.standardize_logits(s), losses.standardize_logits(t), y, temperature=2.0, alpha=0.1
    ),
}


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_jit_vmap_and_grad(name):
    loss = PER_EXAMPLE[name]
    _, s, t, labels = logits_and_targets(76, shape=(8, 10))
    batched = jax.jit(loss)(s, t, labels)
    assert batched.shape == (8,)
    # vmap over the examples gives the batch's values; vmap over a stack of batches too.
    assert_close(jax.jit(jax.vmap(loss))(s, t, labels), batched, 1e-6, 1e-6)
    stack = [np.stack([a, a[::-1]]) for a in (s, t, labels)]
    stacked = jax.jit(jax.vmap(loss))(*stack)
    assert stacked.shape == (2, 8)
    assert_close(stacked[1], np.asarray(batched)[::-1], 1e-6, 1e-6)
    # grad of the batch mean, per-example gradients by vmap(grad): the same.
    grad = jax.jit(jax.grad(lambda s: loss(s, t, labels).mean()))(s)
    per_example = jax.jit(jax.vmap(jax.grad(loss)))(s, t, labels)
    assert np.all(np.isfinite(grad))
    assert_close(grad, np.asarray(per_example) / 8, 1e-5, 1e-7)


# ------------------------------------------------------------------ extreme inputs


def _extreme_logits(scale):
    base_s = np.array([[1.0, -1.0, 0.0, 0.5], [-1.0, 1.0, 0.25, -0.5], [0.3, 0.2, -1.0, 1.0]])
    base_t = np.array([[1.0, -0.5, 0.0, -1.0], [0.5, 1.0, -1.0, 0.0], [-1.0, 0.2, 0.3, 1.0]])
    return (scale * base_s).astype(np.float32), (scale * base_t).astype(np.float32)


TEMPERED = {  # name -> (loss(s, t, labels, temperature), float64 reference)
    "decoupled_kd_loss": (
        lambda s, t, y, T: losses.decoupled_kd_loss(s, t, y, temperature=T, alpha=1.0, beta=8.0),
        lambda s, t, y, T: np_decoupled_kd(s, t, y, T, 1.0, 8.0),
    ),
    "reverse_kl_loss": (
        lambda s, t, y, T: losses.reverse_kl_loss(s, t, temperature=T),
        lambda s, t, y, T: np_reverse_kl(s, t, T),
    ),
    "generalized_jsd_loss": (
        lambda s, t, y, T: losses.generalized_jsd_loss(s, t, beta=0.5, temperature=T),
        lambda s, t, y, T: np_generalized_jsd(s, t, 0.5, T),
    ),
    "dist_loss": (
        lambda s, t, y, T: losses.dist_loss(s, t, temperature=T),
        lambda s, t, y, T: np_dist(s, t, T),
    ),
}


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", sorted(TEMPERED))
def test_extreme_logits_and_temperatures(name, temperature):
    """Logits of 1 and 1e4 at both ends of TEMPERATURE_RANGE: the values match float64,
    the gradients are finite."""
    loss, reference = TEMPERED[name]
    labels = np.array([0, 2, 3], np.int32)
    value_and_grad = jax.jit(jax.value_and_grad(lambda s, t: loss(s, t, labels, temperature).sum()))
    values = jax.jit(lambda s, t: loss(s, t, labels, temperature))
    for scale in (1.0, 1e4):
        s, t = _extreme_logits(scale)
        value, grad = values(s, t), value_and_grad(s, t)[1]
        ref = reference(s, t, labels, temperature)
        assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad)), (scale, value, grad)
        # float32 rounding of the log-probabilities, scaled by T**2 (as distillation_loss's:
        # see soft_atol), times the weights (DKD's alpha + beta = 9).
        weights = 9.0 if name == "decoupled_kd_loss" else 1.0
        assert_close(value, ref, rtol=1e-4, atol=weights * soft_atol(temperature))


@pytest.mark.parametrize("scale", [1.0, 1e4, 1e30, float(np.finfo(np.float32).max)])
def test_standardize_logits_at_extreme_logits(scale):
    s, t = _extreme_logits(scale)
    z = np.asarray(jax.jit(losses.standardize_logits)(s))
    assert_close(z, np_standardize(s / scale), rtol=1e-5, atol=1e-6)  # scale-free
    grad = jax.jit(jax.grad(lambda s: (losses.standardize_logits(s) * t).sum()))(s)
    assert np.all(np.isfinite(grad))
    # A large common offset costs no precision (the maximum is subtracted first).
    offset = t + np.float32(1e4)  # the test's input is this rounded value
    out = np.asarray(jax.jit(losses.standardize_logits)(offset))
    assert_close(out, np_standardize(offset), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e4, 1e30])
def test_logit_matching_at_extreme_logits(scale):
    s, t = _extreme_logits(scale)
    value = np.asarray(jax.jit(losses.logit_matching_loss)(s, t))
    grad = jax.jit(jax.grad(lambda s: losses.logit_matching_loss(s, t).sum()))(s)
    ref = np_logit_matching(s, t)
    fits = ref <= np.finfo(np.float32).max
    assert_close(value[fits], ref[fits], rtol=1e-5)
    assert np.all(value[~fits] == np.inf)  # 1e60 is not a float32: +inf, not NaN
    assert np.all(np.isfinite(grad))


MASKABLE = {  # name -> loss(s, t, labels, temperature, where)
    "decoupled_kd_loss": lambda s, t, y, T, w: losses.decoupled_kd_loss(
        s, t, y, temperature=T, beta=2.0, where=w
    ),
    "reverse_kl_loss": lambda s, t, y, T, w: losses.reverse_kl_loss(s, t, temperature=T, where=w),
    "generalized_jsd_loss": lambda s, t, y, T, w: losses.generalized_jsd_loss(
        s, t, beta=0.3, temperature=T, where=w
    ),
    "standardized_kd": lambda s, t, y, T, w: losses.distillation_loss(
        losses.standardize_logits(s, where=w), losses.standardize_logits(t, where=w), y,
        temperature=T, alpha=0.5, where=w,
    ),
}  # fmt: skip


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", sorted(MASKABLE))
def test_masked_minus_inf_classes(name, temperature):
    """-inf in both models (class 1) is the same as where=False: finite values, gradient
    exactly 0 on the masked class."""
    loss = MASKABLE[name]
    _, s, t, _ = logits_and_targets(77, shape=(3, 6))
    s[:, 1] = t[:, 1] = -np.inf
    keep = np.array([True, False, True, True, True, True])
    labels = np.array([0, 2, 5], np.int32)

    @jax.jit
    def values_and_grad(s, t):
        grad = jax.grad(lambda s: loss(s, t, labels, temperature, None).sum())(s)
        return loss(s, t, labels, temperature, None), loss(s, t, labels, temperature, keep), grad

    value, masked, grad = (np.asarray(x) for x in values_and_grad(s, t))
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad)), (value, grad)
    assert_close(value, masked, rtol=2e-5, atol=2e-5)
    assert np.all(grad[:, 1] == 0.0)
    if name == "decoupled_kd_loss":
        ref = np_decoupled_kd(s, t, labels, temperature, 1.0, 2.0)
        assert_close(value, ref, rtol=1e-4, atol=soft_atol(temperature))


def test_zero_probability_classes_of_one_model_only():
    """Teacher -inf where the student has mass: reverse KL is +inf (the math), the JSD
    finite; student -inf where the teacher has mass: the reverse KL finite, the JSD too."""
    _, s, t, _ = logits_and_targets(78, shape=(2, 5))
    t_hole, s_hole = t.copy(), s.copy()
    t_hole[0, 2] = -np.inf
    s_hole[0, 2] = -np.inf
    reverse = jax.jit(losses.reverse_kl_loss)
    jsd = jax.jit(losses.generalized_jsd_loss)
    assert reverse(s, t_hole)[0] == np.inf and np.isfinite(reverse(s, t_hole)[1])
    assert_close(reverse(s_hole, t), np_reverse_kl(s_hole, t, 1.0), 1e-5, 1e-6)
    for a, b in ((s, t_hole), (s_hole, t)):
        assert_close(jsd(a, b), np_generalized_jsd(a, b, 0.5, 1.0), 1e-5, 1e-6)
        grad = jax.grad(lambda a: jsd(a, b).sum())(a)
        assert np.all(np.isfinite(grad))


def test_low_precision_inputs_give_float32():
    _, s, t, labels = logits_and_targets(79, shape=(4, 6))
    for dtype in (jnp.bfloat16, jnp.float16):
        s_low, t_low = jnp.asarray(s, dtype), jnp.asarray(t, dtype)
        s_up, t_up = np.asarray(s_low, np.float32), np.asarray(t_low, np.float32)
        for name, (loss, _) in TEMPERED.items():
            value = jax.jit(lambda s, t: loss(s, t, labels, 2.0))(s_low, t_low)
            assert value.dtype == jnp.float32, name
            assert_close(value, loss(s_up, t_up, labels, 2.0), 1e-6, 1e-6)
        assert losses.standardize_logits(s_low).dtype == jnp.float32
        assert losses.logit_matching_loss(s_low, t_low).dtype == jnp.float32


# --------------------------------------------------------------------- bad inputs

S = np.zeros((2, 3), np.float32)
Y = np.zeros(2, np.int32)
S3 = np.zeros((2, 3, 4), np.float32)

BAD_INPUTS = [  # (call, exception, regex its message must match), id
    pytest.param(lambda: losses.decoupled_kd_loss(S, S, Y, alpha=-1.0), ValueError, "alpha",
                 id="dkd_alpha_negative"),
    pytest.param(lambda: losses.decoupled_kd_loss(S, S, Y, beta="8"), TypeError, "beta",
                 id="dkd_beta_string"),
    pytest.param(lambda: losses.decoupled_kd_loss(S, S, Y, beta=float("inf")), ValueError,
                 "beta", id="dkd_beta_inf"),
    pytest.param(lambda: losses.decoupled_kd_loss(S, S, Y, temperature=0.0), ValueError,
                 "temperature", id="dkd_temperature"),
    pytest.param(lambda: losses.decoupled_kd_loss(S, S, S), TypeError, "labels",
                 id="dkd_probability_labels"),
    pytest.param(lambda: losses.decoupled_kd_loss(S, S, Y[:1]), ValueError, "integer labels",
                 id="dkd_label_shape"),
    pytest.param(lambda: losses.decoupled_kd_loss(S, S, np.array([0, 3])), ValueError,
                 r"labels must be class indices in \[0, 3\)", id="dkd_label_range"),
    pytest.param(lambda: losses.decoupled_kd_loss(S, S[:1], Y), ValueError,
                 "student_logits and teacher_logits", id="dkd_shapes"),
    pytest.param(lambda: losses.decoupled_kd_loss(S, S, Y, where=np.ones(3)), TypeError,
                 "where", id="dkd_where_dtype"),
    pytest.param(lambda: losses.decoupled_kd_loss(S, S, Y, axis=2), ValueError, "axis",
                 id="dkd_axis"),
    pytest.param(lambda: losses.dist_loss(S, S, beta=-0.5), ValueError, "beta",
                 id="dist_beta_negative"),
    pytest.param(lambda: losses.dist_loss(S, S, gamma=float("nan")), ValueError, "gamma",
                 id="dist_gamma_nan"),
    pytest.param(lambda: losses.dist_loss(S, S, temperature=-1.0), ValueError, "temperature",
                 id="dist_temperature"),
    pytest.param(lambda: losses.dist_loss(S3, S3), ValueError, r"\[batch, classes\]",
                 id="dist_three_axes"),
    pytest.param(lambda: losses.dist_loss(S[:1], S[:1]), ValueError, "at least 2",
                 id="dist_batch_of_one"),
    pytest.param(lambda: losses.dist_loss(S.astype(np.int32), S), TypeError, "student_logits",
                 id="dist_integer_student"),
    pytest.param(lambda: losses.standardize_logits(S, eps=0.0), ValueError, "eps",
                 id="standardize_eps_zero"),
    pytest.param(lambda: losses.standardize_logits(S, eps=None), TypeError, "eps",
                 id="standardize_eps_none"),
    pytest.param(lambda: losses.standardize_logits(S.astype(np.int32)), TypeError, "logits",
                 id="standardize_integer_logits"),
    pytest.param(lambda: losses.standardize_logits(S, axis=-3), ValueError, "axis",
                 id="standardize_axis"),
    pytest.param(lambda: losses.standardize_logits(S, where=np.ones(4, bool)), ValueError,
                 "where", id="standardize_where_shape"),
    pytest.param(lambda: losses.reverse_kl_loss(S, S, temperature="1"), TypeError,
                 "temperature", id="reverse_temperature_string"),
    pytest.param(lambda: losses.reverse_kl_loss(S, S.astype(np.int32)), TypeError,
                 "teacher_logits", id="reverse_integer_teacher"),
    pytest.param(lambda: losses.reverse_kl_loss(S, S3), ValueError,
                 "student_logits and teacher_logits", id="reverse_shapes"),
    pytest.param(lambda: losses.generalized_jsd_loss(S, S, beta=1.5), ValueError,
                 r"beta must be a finite number in \[0, 1\]", id="jsd_beta_above_one"),
    pytest.param(lambda: losses.generalized_jsd_loss(S, S, beta=-0.1), ValueError, "beta",
                 id="jsd_beta_negative"),
    pytest.param(lambda: losses.generalized_jsd_loss(S, S, beta=None), TypeError, "beta",
                 id="jsd_beta_none"),
    pytest.param(lambda: losses.generalized_jsd_loss(S, S, temperature=2e4), ValueError,
                 "temperature", id="jsd_temperature"),
    pytest.param(lambda: losses.logit_matching_loss(S, S[:, :2]), ValueError,
                 "student_logits and teacher_logits", id="matching_shapes"),
    pytest.param(lambda: losses.logit_matching_loss(S, S, axis=5), ValueError, "axis",
                 id="matching_axis"),
    pytest.param(lambda: losses.logit_matching_loss(S.astype(bool), S), TypeError,
                 "student_logits", id="matching_boolean_student"),
]  # fmt: skip


@pytest.mark.parametrize("call,error,match", BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("temperature", [0.0, 9e-4, 1.1e4, np.inf, np.nan])
def test_temperatures_outside_the_documented_range_are_refused(temperature):
    low, high = losses.TEMPERATURE_RANGE
    for name, (loss, _) in TEMPERED.items():
        with pytest.raises(
            ValueError, match=rf"temperature must be a finite number in \[{low:g}, {high:g}\]"
        ):
            loss(S, S, Y, temperature)


def test_out_of_range_labels_under_jit_give_nan_not_another_class():
    labels = np.array([1, 3], np.int32)
    _, s, t, _ = logits_and_targets(80, shape=(2, 3))
    out = jax.jit(losses.decoupled_kd_loss)(s, t, labels)
    assert np.isnan(out[1]) and np.isfinite(out[0])


def test_the_new_docstring_examples_run():
    names = ["decoupled_kd_loss", "dist_loss", "standardize_logits", "reverse_kl_loss",
             "generalized_jsd_loss", "logit_matching_loss"]  # fmt: skip
    for name in names:
        runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
        for test in doctest.DocTestFinder().find(getattr(losses, name), name, globs={}):
            runner.run(test)
        assert runner.summarize(verbose=False).failed == 0, name
