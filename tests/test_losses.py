"""Tests for kdvae.losses.

Every public function is compared, through ``jax.jit``, with an independent float64
NumPy reference; gradients are checked against finite differences in float64; then come
the invariances the losses promise, the VAE bounds on a linear-Gaussian model whose
log-likelihood is known exactly, extreme inputs, and the argument checks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from kdvae import kernels, losses

F32_MAX = float(np.finfo(np.float32).max)
LOG_2PI = math.log(2.0 * math.pi)


# ------------------------------------------------------------- float64 references


def np_logsumexp(a, axis=-1, keepdims=False):
    a = np.asarray(a, np.float64)
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    out = m + np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis)


def np_log_softmax(z, temperature=1.0, axis=-1, where=None):
    z = np.asarray(z, np.float64) / temperature
    if where is not None:
        z = np.where(where, z, -np.inf)
    return z - np_logsumexp(z, axis, keepdims=True)


def np_softmax(z, temperature=1.0, axis=-1, where=None):
    return np.exp(np_log_softmax(z, temperature, axis, where))


def np_sum_plogq(p, log_q, axis=-1):
    """sum p log q with the convention 0 log 0 = 0."""
    support = p > 0
    return np.sum(np.where(support, p * np.where(support, log_q, 0.0), 0.0), axis=axis)


def np_cross_entropy(z, labels, temperature=1.0, axis=-1, where=None):
    log_p = np_log_softmax(z, temperature, axis, where)
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        picked = np.take_along_axis(log_p, np.expand_dims(labels, axis), axis=axis)
        return -np.squeeze(picked, axis)
    return -np_sum_plogq(labels.astype(np.float64), log_p, axis)


def np_entropy(z, temperature, axis=-1, where=None):
    log_p = np_log_softmax(z, temperature, axis, where)
    return -np_sum_plogq(np.exp(log_p), log_p, axis)


def np_distillation(
    s, t, labels, temperature, alpha=None, soft_loss="kl", scale=True, axis=-1, where=None
):
    log_q = np_log_softmax(s, temperature, axis, where)
    log_p = np_log_softmax(t, temperature, axis, where)
    p = np.exp(log_p)
    soft = -np_sum_plogq(p, log_q, axis)
    if soft_loss == "kl":
        soft = soft + np_sum_plogq(p, log_p, axis)
    if scale:
        soft = soft * temperature**2
    if labels is None:
        return soft
    return alpha * np_cross_entropy(s, labels, 1.0, axis, where) + (1 - alpha) * soft


def np_gaussian_kl(mean, logvar, axis=-1):
    mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
    return 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=axis)


def np_diagonal_gaussian_kl(mean_q, logvar_q, mean_p, logvar_p, axis=-1):
    mq, lq, mp, lp = (np.asarray(a, np.float64) for a in (mean_q, logvar_q, mean_p, logvar_p))
    var_q, var_p = np.exp(lq), np.exp(lp)
    per_dim = 0.5 * (np.log(var_p / var_q) + (var_q + (mq - mp) ** 2) / var_p - 1.0)
    shape = np.broadcast_shapes(mq.shape, lq.shape, mp.shape, lp.shape)
    return np.sum(np.broadcast_to(per_dim, shape), axis=axis)


def np_bernoulli_log_likelihood(logits, x, event_ndim=1):
    logits, x = np.asarray(logits, np.float64), np.asarray(x, np.float64)
    per_dim = -x * np.logaddexp(0.0, -logits) - (1.0 - x) * np.logaddexp(0.0, logits)
    per_dim = np.broadcast_to(per_dim, np.broadcast_shapes(logits.shape, x.shape))
    return np.sum(per_dim, axis=tuple(range(per_dim.ndim - event_ndim, per_dim.ndim)))


def np_normal_logpdf(x, mean, var):
    """Elementwise log N(x; mean, var)."""
    return -0.5 * (LOG_2PI + np.log(var) + (x - mean) ** 2 / var)


def np_gaussian_log_likelihood(mean, logvar, x, event_ndim=1):
    mean, logvar, x = (np.asarray(a, np.float64) for a in (mean, logvar, x))
    per_dim = np_normal_logpdf(x, mean, np.exp(logvar))
    per_dim = np.broadcast_to(per_dim, np.broadcast_shapes(mean.shape, logvar.shape, x.shape))
    return np.sum(per_dim, axis=tuple(range(per_dim.ndim - event_ndim, per_dim.ndim)))


def np_mvn_logpdf(x, mean, cov):
    d = np.asarray(x, np.float64) - mean
    _, logdet = np.linalg.slogdet(cov)
    maha = np.sum(d * np.linalg.solve(cov, d.T).T, axis=-1)
    return -0.5 * (d.shape[-1] * LOG_2PI + logdet + maha)


def assert_close(actual, expected, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def soft_atol(temperature):
    """Absolute tolerance of the T**2-scaled soft term in float32.

    The KL is a difference of cross-entropies, each known to ~1e-7 in float32, scaled by
    T**2: at T = 1000 an O(1) loss carries an error of ~0.1 (optax's composition too).
    """
    return 2e-5 + 3e-7 * temperature**2


def random_probabilities(rng, shape, zero_fraction=0.3):
    """Soft labels along the last axis with some exact zeros (but never a zero row)."""
    p = rng.random(shape) * (rng.random(shape) > zero_fraction)
    p[..., 0] += 0.1
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def logits_and_targets(seed, shape=(4, 7), scale=3.0):
    rng = np.random.default_rng(seed)
    student = (scale * rng.normal(size=shape)).astype(np.float32)
    teacher = (scale * rng.normal(size=shape)).astype(np.float32)
    labels = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
    return rng, student, teacher, labels


# A small MLP encoder/decoder for the ELBO and IWAE references.


def mlp_params(seed, x_dim=6, hidden=5, latent=3, dtype=np.float32):
    rng = np.random.default_rng(seed)
    shapes = {
        "enc_w": (x_dim, hidden),
        "enc_b": (hidden,),
        "enc_mean": (hidden, latent),
        "enc_logvar": (hidden, latent),
        "dec_w": (latent, hidden),
        "dec_b": (hidden,),
        "dec_out": (hidden, x_dim),
        "dec_logvar": (x_dim,),
    }
    return {k: (0.5 * rng.normal(size=s)).astype(dtype) for k, s in shapes.items()}


def mlp_encoder(params):
    def encode(x):
        h = jnp.tanh(x @ params["enc_w"] + params["enc_b"])
        return h @ params["enc_mean"], h @ params["enc_logvar"]

    return encode


def mlp_posterior(params, x):
    """q(z | x) from the MLP encoder, as the value the bounds take."""
    return losses.DiagonalGaussian(*mlp_encoder(params)(x))


def mlp_decoder(params, likelihood):
    def decode(z):
        out = jnp.tanh(z @ params["dec_w"] + params["dec_b"]) @ params["dec_out"]
        return out if likelihood == "bernoulli" else (out, params["dec_logvar"])

    return decode


def np_mlp_decoder(params, z, likelihood):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    out = np.tanh(z @ p["dec_w"] + p["dec_b"]) @ p["dec_out"]
    return out if likelihood == "bernoulli" else (out, p["dec_logvar"])


def np_log_likelihood(likelihood, decoded, x):
    if likelihood == "bernoulli":
        return np_bernoulli_log_likelihood(decoded, x)
    return np_gaussian_log_likelihood(*decoded, x)


def vae_data(seed, batch=5, x_dim=6):
    rng = np.random.default_rng(seed)
    return rng.random((batch, x_dim)).astype(np.float32)  # grey levels in [0, 1]


# ------------------------------------------------------ references through jax.jit


@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0, 4.0, 1000.0])
@pytest.mark.parametrize("axis", [-1, 1])
def test_tempered_log_softmax_and_softmax_match_numpy(temperature, axis):
    z = (3.0 * np.random.default_rng(0).normal(size=(4, 5, 6))).astype(np.float32)
    kw = dict(temperature=temperature, axis=axis)
    log_p, p = jax.jit(
        lambda z: (losses.tempered_log_softmax(z, **kw), losses.tempered_softmax(z, **kw))
    )(z)
    ref = np_log_softmax(z, temperature, axis)
    assert_close(log_p, ref)
    assert_close(p, np.exp(ref), atol=1e-6)
    assert_close(np.sum(p, axis=axis), 1.0)


def test_tempered_log_softmax_with_per_example_mask_matches_numpy():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(5, 6)).astype(np.float32)
    mask = rng.random((5, 6)) > 0.4
    mask[:, 2] = True  # every row keeps a class
    fn = jax.jit(functools.partial(losses.tempered_log_softmax, temperature=0.7))
    out = np.asarray(fn(z, where=mask))
    ref = np_log_softmax(z, 0.7, where=mask)
    assert np.all(out[~mask] == -np.inf)
    assert_close(out[mask], ref[mask])
    probs = np.asarray(jax.jit(losses.tempered_softmax)(z, where=mask))
    assert np.all(probs[~mask] == 0.0)
    assert_close(probs.sum(-1), 1.0)


def test_traced_temperature_matches_numpy():
    """A temperature schedule passes T as a traced array; the result is the same."""
    z = (5.0 * np.random.default_rng(2).normal(size=(3, 8))).astype(np.float32)
    t = (5.0 * np.random.default_rng(3).normal(size=(3, 8))).astype(np.float32)
    log_sm = jax.jit(lambda z, T: losses.tempered_log_softmax(z, temperature=T))
    distill = jax.jit(lambda s, t, T: losses.distillation_loss(s, t, temperature=T))
    for temperature in (0.3, 1.0, 7.0):
        T = jnp.float32(temperature)
        assert_close(log_sm(z, T), np_log_softmax(z, temperature))
        assert_close(distill(z, t, T), np_distillation(z, t, None, temperature), rtol=2e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("label_kind", ["integer", "probabilities"])
def test_tempered_cross_entropy_matches_numpy(temperature, label_kind):
    rng, z, _, labels = logits_and_targets(4)
    if label_kind == "probabilities":
        labels = random_probabilities(rng, z.shape)
    fn = jax.jit(functools.partial(losses.tempered_cross_entropy, temperature=temperature))
    out = fn(z, labels)
    assert out.shape == z.shape[:-1]
    assert_close(out, np_cross_entropy(z, labels, temperature))


def test_tempered_cross_entropy_with_mask_matches_numpy():
    rng, z, _, _ = logits_and_targets(5, shape=(6, 5))
    mask = rng.random(z.shape) > 0.3
    labels = np.argmax(np.where(mask, rng.random(z.shape), -1.0), axis=-1).astype(np.int32)
    soft = random_probabilities(rng, z.shape) * mask
    soft[np.arange(6), labels] += 0.2
    soft = (soft / soft.sum(-1, keepdims=True)).astype(np.float32)
    fn = jax.jit(functools.partial(losses.tempered_cross_entropy, temperature=2.0))
    assert_close(fn(z, labels, where=mask), np_cross_entropy(z, labels, 2.0, where=mask))
    assert_close(fn(z, soft, where=mask), np_cross_entropy(z, soft, 2.0, where=mask))


DISTILLATION_CASES = [
    # (labels, soft_loss, scale_by_temperature_squared, temperature, alpha)
    (None, "kl", True, 4.0, None),
    (None, "ce", True, 0.5, None),
    (None, "kl", False, 2.0, None),
    ("integer", "kl", True, 4.0, 0.3),
    ("integer", "ce", False, 0.5, 0.9),
    ("probabilities", "kl", True, 2.0, 0.5),
    ("probabilities", "ce", True, 10.0, 0.0),
    ("integer", "kl", True, 1.0, 1.0),
]


@pytest.mark.parametrize("label_kind,soft_loss,scale,temperature,alpha", DISTILLATION_CASES)
def test_distillation_loss_matches_numpy(label_kind, soft_loss, scale, temperature, alpha):
    rng, s, t, labels = logits_and_targets(6)
    if label_kind is None:
        labels = None
    elif label_kind == "probabilities":
        labels = random_probabilities(rng, s.shape)
    fn = jax.jit(
        functools.partial(
            losses.distillation_loss,
            temperature=temperature,
            alpha=alpha,
            soft_loss=soft_loss,
            scale_by_temperature_squared=scale,
        )
    )
    out = fn(s, t, labels)
    assert out.shape == s.shape[:-1] and out.dtype == jnp.float32
    ref = np_distillation(s, t, labels, temperature, alpha, soft_loss, scale)
    assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_distillation_loss_with_mask_matches_numpy():
    rng, s, t, _ = logits_and_targets(7, shape=(5, 6))
    mask = rng.random(s.shape) > 0.3
    mask[:, 0] = True
    labels = np.zeros(5, np.int32)
    fn = jax.jit(functools.partial(losses.distillation_loss, temperature=3.0, alpha=0.4))
    ref = np_distillation(s, t, labels, 3.0, 0.4, where=mask)
    assert_close(fn(s, t, labels, where=mask), ref, rtol=2e-5)


def test_tempered_softmax_in_float64_matches_hand_computation():
    # (The figures in kdvae.plots draw these probabilities; this was plots' own test.)
    logits = np.array([1.0, 2.0, 3.0])
    with jax.enable_x64(True):
        for t in (1.0, 2.0, 10.0):
            e = np.array([math.exp(z / t) for z in logits])
            p = jax.jit(functools.partial(losses.tempered_softmax, temperature=t))(logits)
            assert p.dtype == jnp.float64  # float64 in, float64 out
            np.testing.assert_allclose(p, e / e.sum(), rtol=1e-14)
    # Hand numbers: softmax([1, 2, 3]) = [0.0900306, 0.2447285, 0.6652410].
    np.testing.assert_allclose(
        losses.tempered_softmax(logits), [0.09003057, 0.24472847, 0.66524096], atol=1e-7
    )


def test_tempered_softmax_is_stable_at_extreme_logits_and_temperatures():
    p = jax.jit(functools.partial(losses.tempered_softmax, temperature=0.05))(
        np.array([1e4, -1e4, 0.0], dtype=np.float32)
    )
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p, [1.0, 0.0, 0.0])
    q = losses.tempered_softmax(np.array([[1.0, 2.0], [3.0, 3.0]]), temperature=1000.0)
    np.testing.assert_allclose(q.sum(axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(q[1], [0.5, 0.5])
    with pytest.raises(ValueError, match="temperature"):
        losses.tempered_softmax(np.zeros(3), temperature=0.0)


@pytest.mark.parametrize("axis", [-1, 0])
def test_gaussian_kl_matches_numpy(axis):
    rng = np.random.default_rng(8)
    mean = rng.normal(size=(4, 3)).astype(np.float32)
    logvar = rng.normal(size=(4, 3)).astype(np.float32)
    logvar[0, 0] = 1e-6  # near 0, where expm1 matters
    out = jax.jit(functools.partial(losses.gaussian_kl, axis=axis))(mean, logvar)
    assert_close(out, np_gaussian_kl(mean, logvar, axis), rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(out) >= 0)


def test_diagonal_gaussian_kl_matches_numpy():
    rng = np.random.default_rng(9)
    mq, lq = rng.normal(size=(2, 4, 3)).astype(np.float32)
    mp, lp = rng.normal(size=(2, 3)).astype(np.float32)  # broadcast over the batch
    fn = jax.jit(losses.diagonal_gaussian_kl)
    assert_close(fn(mq, lq, mp, lp), np_diagonal_gaussian_kl(mq, lq, mp, lp))
    assert_close(fn(mq, lq, mq, lq), np.zeros(4), atol=1e-7)
    # Against N(0, I) it is gaussian_kl.
    assert_close(fn(mq, lq, 0.0, 0.0), np_gaussian_kl(mq, lq))


@pytest.mark.parametrize("event_ndim", [1, 3])
def test_bernoulli_log_likelihood_matches_numpy(event_ndim):
    rng = np.random.default_rng(10)
    logits = (4.0 * rng.normal(size=(3, 4, 5, 2))).astype(np.float32)
    x = rng.random((3, 4, 5, 2)).astype(np.float32)
    x[0] = x[0] > 0.5  # binary as well as grey levels
    fn = jax.jit(functools.partial(losses.bernoulli_log_likelihood, event_ndim=event_ndim))
    out = fn(logits, x)
    assert out.shape == (3, 4, 5, 2)[: 4 - event_ndim]
    assert_close(out, np_bernoulli_log_likelihood(logits, x, event_ndim))


def test_bernoulli_log_likelihood_gradient_is_x_minus_sigmoid_also_at_zero():
    # d/dl log p(x | l) = x - sigmoid(l) everywhere, including the kink of the stable
    # form at l = 0 (a zero-initialised decoder's logits), and at huge |l|.
    logits = jnp.array([0.0, 0.0, 0.0, 3.0, -2.0, 1e4, -1e4, 0.0])
    x = jnp.array([0.0, 0.5, 1.0, 1.0, 0.0, 0.3, 1.0, 0.25])
    grad = jax.grad(lambda z: losses.bernoulli_log_likelihood(z, x, event_ndim=1))(logits)
    sigmoid = 0.5 * (1 + np.tanh(0.5 * np.asarray(logits, np.float64)))
    assert_close(grad, np.asarray(x) - sigmoid)


@pytest.mark.parametrize("event_ndim", [1, 2])
def test_gaussian_log_likelihood_matches_numpy(event_ndim):
    rng = np.random.default_rng(11)
    mean = rng.normal(size=(3, 4, 5)).astype(np.float32)
    logvar = rng.normal(size=(5,)).astype(np.float32)  # broadcast over the batch
    x = rng.normal(size=(3, 4, 5)).astype(np.float32)
    fn = jax.jit(functools.partial(losses.gaussian_log_likelihood, event_ndim=event_ndim))
    out = fn(mean, logvar, x)
    assert out.shape == (3, 4, 5)[: 3 - event_ndim]
    assert_close(out, np_gaussian_log_likelihood(mean, logvar, x, event_ndim))


def test_reparameterize_is_the_affine_map_of_standard_normal_noise():
    rng = np.random.default_rng(12)
    mean = rng.normal(size=(4, 3)).astype(np.float32)
    logvar = rng.normal(size=(4, 3)).astype(np.float32)
    key = jax.random.key(0)
    fn = jax.jit(functools.partial(losses.reparameterize, num_samples=5))
    eps = np.asarray(fn(key, np.zeros_like(mean), np.zeros_like(logvar)), np.float64)
    z = fn(key, mean, logvar)
    assert z.shape == (5, 4, 3)
    assert_close(z, mean + np.exp(0.5 * np.asarray(logvar, np.float64)) * eps)
    one = jax.jit(losses.reparameterize)(key, mean, logvar)
    assert one.shape == (4, 3)
    # Same key, same sample; another key, another sample.
    np.testing.assert_array_equal(fn(key, mean, logvar), z)
    assert not np.allclose(fn(jax.random.key(1), mean, logvar), z)


def test_reparameterize_samples_the_right_gaussian():
    mean = np.array([0.5, -2.0, 3.0], np.float32)
    logvar = np.array([0.0, -3.0, 2.0], np.float32)
    n = 40_000
    z = np.asarray(
        jax.jit(functools.partial(losses.reparameterize, num_samples=n))(
            jax.random.key(3), mean, logvar
        ),
        np.float64,
    )
    std = np.exp(0.5 * logvar)
    # Sample mean within 5 standard errors; sample variance within 5 standard errors.
    assert np.all(np.abs(z.mean(0) - mean) < 5 * std / np.sqrt(n))
    assert np.all(np.abs(z.var(0) / std**2 - 1.0) < 5 * np.sqrt(2.0 / n))


# ------------------------------------------------------- the posterior as a value


def test_diagonal_gaussian_matches_numpy():
    rng = np.random.default_rng(60)
    mean, logvar, mean_p, logvar_p = rng.normal(size=(4, 4, 3)).astype(np.float32)
    z = (2.0 * rng.normal(size=(5, 4, 3))).astype(np.float32)  # [S, B, L]

    @jax.jit
    def everything(q, p, z):  # the values go in as pytrees
        return {
            "log_prob": q.log_prob(z),
            "log_prob_one": q.log_prob(z[0]),
            "kl": q.kl_to_standard_normal(),
            "kl_per_dimension": q.kl_to_standard_normal(per_dimension=True),
            "kl_q_p": q.kl(p),
        }

    q, p = losses.DiagonalGaussian(mean, logvar), losses.DiagonalGaussian(mean_p, logvar_p)
    out = everything(q, p, z)
    mean64, logvar64 = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
    log_prob = np_normal_logpdf(np.asarray(z, np.float64), mean64, np.exp(logvar64)).sum(-1)
    assert out["log_prob"].shape == (5, 4) and out["log_prob_one"].shape == (4,)
    assert_close(out["log_prob"], log_prob)
    assert_close(out["log_prob_one"], log_prob[0])
    per_dimension = 0.5 * (mean64**2 + np.exp(logvar64) - 1.0 - logvar64)
    assert out["kl_per_dimension"].shape == (4, 3)
    assert_close(out["kl_per_dimension"], per_dimension, rtol=1e-6, atol=1e-6)
    assert_close(out["kl"], per_dimension.sum(-1), rtol=1e-6, atol=1e-6)
    assert_close(out["kl"], np_gaussian_kl(mean, logvar), rtol=1e-6, atol=1e-6)
    assert_close(out["kl_q_p"], np_diagonal_gaussian_kl(mean, logvar, mean_p, logvar_p))
    assert_close(q.kl(q), np.zeros(4), atol=1e-7)


@pytest.mark.parametrize("num_samples", [None, 6])
def test_diagonal_gaussian_samples_are_reparameterize_and_log_q_is_from_the_noise(num_samples):
    rng = np.random.default_rng(61)
    mean, logvar = rng.normal(size=(2, 4, 3)).astype(np.float32)
    q, key = losses.DiagonalGaussian(mean, logvar), jax.random.key(8)
    sample = jax.jit(lambda q, key: q.sample(key, num_samples=num_samples))(q, key)
    z, log_q = jax.jit(lambda q, key: q.sample_and_log_prob(key, num_samples=num_samples))(q, key)
    reparameterized = jax.jit(functools.partial(losses.reparameterize, num_samples=num_samples))(
        key, mean, logvar
    )
    np.testing.assert_array_equal(sample, reparameterized)  # same key, same z, bit for bit
    np.testing.assert_array_equal(z, reparameterized)
    shape = mean.shape if num_samples is None else (num_samples, *mean.shape)
    assert log_q.shape == shape[:-1]
    # log q(z) = sum log N(z; mean, var) at z = mean + std * eps, eps jax.random.normal's.
    eps = np.asarray(jax.random.normal(key, shape), np.float64)
    std = np.exp(0.5 * np.asarray(logvar, np.float64))
    z64 = mean + std * eps
    assert_close(log_q, np_normal_logpdf(z64, mean, std**2).sum(-1))
    assert_close(log_q, q.log_prob(z), rtol=1e-5, atol=1e-5)  # agrees with log_prob


def test_sample_and_log_prob_is_exact_where_z_minus_mean_rounds():
    # A sharp posterior far from 0: z = 1e4 + 5e-5 * eps rounds to 1e4 in float32, so
    # log_prob(z) sees z - mean = 0; the log-density taken from the noise does not.
    mean = np.full((1, 4), 1e4, np.float32)
    logvar = np.full((1, 4), -20.0, np.float32)
    q, key = losses.DiagonalGaussian(mean, logvar), jax.random.key(2)
    z, log_q = jax.jit(lambda q: q.sample_and_log_prob(key))(q)
    eps = np.asarray(jax.random.normal(key, mean.shape), np.float64)
    exact = -0.5 * np.sum(eps**2 + LOG_2PI - 20.0, -1)
    assert_close(log_q, exact, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(z, mean)  # the sample itself is mean, to float32
    assert abs(float(q.log_prob(z)[0]) - exact[0]) > 0.1  # what the formula in z would give


def test_diagonal_gaussian_is_a_pytree():
    rng = np.random.default_rng(62)
    mean, logvar = rng.normal(size=(2, 4, 3)).astype(np.float32)
    q = losses.DiagonalGaussian(mean, logvar)
    leaves = jax.tree.leaves(q)
    assert len(leaves) == 2 and leaves[0] is q.mean and leaves[1] is q.logvar
    doubled = jax.tree.map(lambda a: 2 * a, q)
    assert isinstance(doubled, losses.DiagonalGaussian)
    np.testing.assert_array_equal(doubled.mean, 2 * mean)
    assert jax.eval_shape(lambda q: q, q).mean.shape == (4, 3)  # stand-ins pass through
    # One example at a time (vmap over the batch) gives the batched values.
    assert_close(
        jax.vmap(lambda q: q.kl_to_standard_normal())(q), q.kl_to_standard_normal(), 1e-6, 1e-6
    )
    # Parameters below float32 are promoted, as the losses promote their inputs.
    low = losses.DiagonalGaussian(mean.astype(jnp.bfloat16), logvar.astype(jnp.bfloat16))
    assert low.mean.dtype == low.logvar.dtype == jnp.float32


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_bounds_on_the_posterior_value_are_the_encoder_formulas_bit_for_bit(likelihood):
    """What ``elbo`` and ``iwae_bound`` computed from an encoder's ``(mean, logvar)``
    before the posterior became a value, written out here op for op: same key, same
    numbers (and, for the ELBO, the same gradient), bit for bit."""
    params, x = mlp_params(34), vae_data(35)
    key = jax.random.key(9)

    def log_likelihood(params, z, x):  # z [S, B, L] decoded as one flat batch, as the bounds
        s, b, latents = z.shape
        out = mlp_decoder(params, likelihood)(z.reshape(s * b, latents))
        if likelihood == "bernoulli":
            return losses.bernoulli_log_likelihood(out.reshape(s, b, -1), x)
        return losses.gaussian_log_likelihood(out[0].reshape(s, b, -1), out[1], x)

    def elbo_formula(params, x):
        mean, logvar = mlp_encoder(params)(x)
        z = losses.reparameterize(key, mean, logvar, num_samples=3)
        reconstruction = jnp.mean(log_likelihood(params, z, x), 0)
        return reconstruction - 0.5 * losses.gaussian_kl(mean, logvar)

    def elbo_value(params, x):
        kw = dict(num_samples=3, beta=0.5, likelihood=likelihood)
        decoder = mlp_decoder(params, likelihood)
        return losses.elbo(key, x, mlp_posterior(params, x), decoder, **kw).elbo

    def iwae_formula(params, x, k=7, chunk=3):
        mean, logvar = mlp_encoder(params)(x)
        std = jnp.exp(0.5 * logvar)

        def log_weights(chunk_index):
            index = chunk_index * chunk + jnp.arange(chunk)
            eps = jax.vmap(
                lambda i: kernels.normal(jax.random.fold_in(key, i), mean.shape, mean.dtype)
            )(index)
            z = mean + std * eps
            log_pz = -0.5 * jnp.sum(jnp.square(z) + LOG_2PI, axis=-1)
            log_qz = -0.5 * jnp.sum(jnp.square(eps) + LOG_2PI + logvar, axis=-1)
            log_w = log_likelihood(params, z, x) + log_pz - log_qz
            return jnp.where((index < k)[:, None], log_w, -jnp.inf)

        num_chunks = -(-k // chunk)
        log_w = jax.lax.map(log_weights, jnp.arange(num_chunks)).reshape(num_chunks * chunk, -1)
        return jax.nn.logsumexp(log_w, axis=0) - math.log(k)

    def iwae_value(params, x):
        kw = dict(num_samples=7, chunk_size=3, likelihood=likelihood)
        decoder = mlp_decoder(params, likelihood)
        return losses.iwae_bound(key, x, mlp_posterior(params, x), decoder, **kw)

    def value_and_grad(f):
        return jax.jit(jax.value_and_grad(lambda p, x: f(p, x).sum()))(params, x)

    got, want = value_and_grad(elbo_value), value_and_grad(elbo_formula)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jax.jit(iwae_value)(params, x), jax.jit(iwae_formula)(params, x))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_elbo_matches_numpy(likelihood):
    params = mlp_params(13)
    x = vae_data(14)
    key = jax.random.key(5)
    encoder, decoder = mlp_encoder(params), mlp_decoder(params, likelihood)

    @jax.jit
    def elbo_and_samples(key, x):
        seen = []  # the samples z the ELBO decodes, returned from the same trace

        def recording_decoder(z):
            seen.append(z)
            return decoder(z)

        kw = dict(num_samples=4, beta=0.7, likelihood=likelihood)
        return losses.elbo(key, x, mlp_posterior(params, x), recording_decoder, **kw), seen[0]

    terms, z = elbo_and_samples(key, x)
    z = np.asarray(z, np.float64)
    assert z.shape == (20, 3)  # the decoder sees the samples folded into the batch
    z = z.reshape(4, 5, 3)
    mean, logvar = (np.asarray(a, np.float64) for a in encoder(x))
    reconstruction = np_log_likelihood(likelihood, np_mlp_decoder(params, z, likelihood), x)
    kl = np_gaussian_kl(mean, logvar)
    assert_close(terms.reconstruction, reconstruction.mean(0), rtol=2e-5, atol=2e-5)
    assert_close(terms.kl, kl, rtol=2e-5, atol=2e-5)
    assert_close(terms.elbo, reconstruction.mean(0) - 0.7 * kl, rtol=2e-5, atol=2e-5)
    # The samples are the encoder's Gaussian, reparameterized.
    eps = (z - mean) / np.exp(0.5 * logvar)
    assert np.all(np.abs(eps) < 6) and eps.std() > 0.5


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_iwae_bound_matches_numpy(likelihood):
    params = mlp_params(15)
    x = vae_data(16)
    key = jax.random.key(7)
    encoder, decoder = mlp_encoder(params), mlp_decoder(params, likelihood)
    kw = dict(num_samples=7, chunk_size=3, likelihood=likelihood)
    fn = jax.jit(lambda key, x: losses.iwae_bound(key, x, mlp_posterior(params, x), decoder, **kw))
    out = fn(key, x)
    assert out.shape == (5,)
    mean, logvar = (np.asarray(a, np.float64) for a in encoder(x))
    # Documented: sample i is drawn with fold_in(key, i).
    eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), mean.shape))(
        jnp.arange(7)
    )
    eps = np.asarray(eps, np.float64)
    z = mean + np.exp(0.5 * logvar) * eps
    log_w = (
        np_log_likelihood(likelihood, np_mlp_decoder(params, z, likelihood), x)
        + np_normal_logpdf(z, 0.0, 1.0).sum(-1)
        - np_normal_logpdf(z, mean, np.exp(logvar)).sum(-1)
    )
    assert_close(out, np_logsumexp(log_w, axis=0) - np.log(7), rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------- gradient checks


def _grad_cases():
    """name -> (function, args) in float64 (build under jax.enable_x64).

    Each function returns a dict of losses; check_grads compares every entry, so one
    check (one compilation) covers a family of losses.
    """
    rng = np.random.default_rng(17)
    s, t = rng.normal(size=(2, 3, 5))
    y = np.array([0, 4, 2])
    y_visible = np.array([0, 4, 3])  # no label on the masked class 2
    p = np_softmax(rng.normal(size=(3, 5)))  # no zeros: 0 log 0 = 0 is not smooth in p
    mask = np.array([True, True, False, True, True])
    mean, logvar, mean_p, logvar_p = 0.5 * rng.normal(size=(4, 3, 2))
    x = rng.random((3, 2))
    key = jax.random.key(0)
    params = {k: v.astype(np.float64) for k, v in mlp_params(18).items()}
    vae_x = vae_data(19).astype(np.float64)

    def tempered_log_softmax(z):
        return losses.tempered_log_softmax(z, temperature=2.0)

    def classification(z, p):
        distill = functools.partial(losses.distillation_loss, z, t)
        masked_log_p = losses.tempered_log_softmax(z, temperature=0.5, where=mask)
        return {
            "tempered_log_softmax_where": jnp.where(mask, masked_log_p, 0.0),
            "tempered_softmax": losses.tempered_softmax(z, temperature=0.7),
            "tempered_cross_entropy_integer": losses.tempered_cross_entropy(z, y, temperature=3.0),
            "tempered_cross_entropy_probabilities": losses.tempered_cross_entropy(
                z, p, temperature=0.7
            ),
            "distillation_loss_kl_with_labels": distill(y, temperature=4.0, alpha=0.3),
            "distillation_loss_ce_soft_only": distill(temperature=2.0, soft_loss="ce"),
            "distillation_loss_where": distill(y_visible, temperature=1.5, alpha=0.5, where=mask),
        }

    def logit_distillation(z):  # the teacher (t) is constant: its gradient is stopped
        z_s, z_t = losses.standardize_logits(z), losses.standardize_logits(t)
        return {
            "decoupled_kd_loss": losses.decoupled_kd_loss(z, t, y, temperature=2.0),
            "decoupled_kd_loss_where": losses.decoupled_kd_loss(
                z, t, y_visible, temperature=0.7, alpha=0.5, beta=2.0, where=mask
            ),
            "dist_loss": losses.dist_loss(z, t, temperature=1.5, beta=1.0, gamma=2.0),
            "standardize_logits": losses.standardize_logits(z, where=mask)[:, mask],
            "standardize_logits_with_kd": losses.distillation_loss(z_s, z_t, temperature=2.0),
            "reverse_kl_loss": losses.reverse_kl_loss(z, t, temperature=3.0, where=mask),
            "generalized_jsd_loss": losses.generalized_jsd_loss(z, t, beta=0.3, temperature=0.8),
            "generalized_jsd_loss_ends": [
                losses.generalized_jsd_loss(z, t, beta=b, where=mask) for b in (0.0, 1.0)
            ],
            "logit_matching_loss": losses.logit_matching_loss(z, t),
        }

    def gaussians(mean, logvar, mean_p, logvar_p, x):
        q, p = losses.DiagonalGaussian(mean, logvar), losses.DiagonalGaussian(mean_p, logvar_p)
        z, log_q = q.sample_and_log_prob(key, num_samples=2)
        return {
            "DiagonalGaussian.log_prob": q.log_prob(x),
            "DiagonalGaussian.sample_and_log_prob": (z, log_q),
            "DiagonalGaussian.kl_to_standard_normal": q.kl_to_standard_normal(),
            "DiagonalGaussian.kl_to_standard_normal_per_dimension": q.kl_to_standard_normal(
                per_dimension=True
            ),
            "DiagonalGaussian.kl": q.kl(p),
            "reparameterize": losses.reparameterize(key, mean, logvar, num_samples=2),
            "gaussian_kl": losses.gaussian_kl(mean, logvar),
            "diagonal_gaussian_kl": losses.diagonal_gaussian_kl(mean, logvar, mean_p, logvar_p),
            "bernoulli_log_likelihood": losses.bernoulli_log_likelihood(3 * mean, x),
            "gaussian_log_likelihood": losses.gaussian_log_likelihood(mean, logvar, x),
        }

    def vae_bounds(params):
        q = mlp_posterior(params, vae_x)
        return {
            "elbo": losses.elbo(key, vae_x, q, mlp_decoder(params, "bernoulli")).elbo,
            "iwae_bound": losses.iwae_bound(
                key,
                vae_x,
                q,
                mlp_decoder(params, "gaussian"),
                num_samples=5,
                chunk_size=2,
                likelihood="gaussian",
            ),
        }

    def vae_estimators(decoder_params, mean, logvar):
        """STL's and DReG's gradients are the derivatives of their values for the decoder
        only (the encoder's are estimators, tested in test_estimators.py); the error bars
        of log p(x) and the mutual information are smooth in everything."""
        q = mlp_posterior(params, vae_x)
        decode = mlp_decoder({**params, **decoder_params}, "bernoulli")
        estimate = losses.importance_sampled_log_px(key, vae_x, q, decode, num_samples=6)
        return {
            "stl_elbo": losses.stl_elbo(key, vae_x, q, decode, num_samples=2).elbo,
            "dreg_iwae_bound": losses.dreg_iwae_bound(key, vae_x, q, decode, num_samples=5),
            "importance_sampled_log_px": (estimate.log_px, estimate.standard_error),
            "aggregate_posterior_mutual_information": (
                losses.aggregate_posterior_mutual_information(
                    key, losses.DiagonalGaussian(mean, logvar)
                )
            ),
        }

    decoder_params = {k: params[k] for k in ("dec_w", "dec_b", "dec_out")}
    return {
        "tempered_log_softmax": (tempered_log_softmax, (s,)),
        "classification": (classification, (s, p)),
        "logit_distillation": (logit_distillation, (s,)),
        "gaussians": (gaussians, (mean, logvar, mean_p, logvar_p, x)),
        "vae_bounds": (vae_bounds, (params,)),
        "vae_estimators": (vae_estimators, (decoder_params, mean, logvar)),
    }


# Second order (Hessian-vector products) for the building block of every classification
# loss; reverse mode only for the VAE bounds, which train by backprop (and compile slowly).
GRAD_CASES = {  # name -> (order, modes)
    "tempered_log_softmax": (2, ("fwd", "rev")),
    "classification": (1, ("fwd", "rev")),
    "logit_distillation": (1, ("rev",)),
    "gaussians": (1, ("fwd", "rev")),
    "vae_bounds": (1, ("rev",)),
    "vae_estimators": (1, ("rev",)),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradients_match_finite_differences(name):
    with jax.enable_x64(True):
        fn, args = _grad_cases()[name]
        fn = jax.jit(fn)
        assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(fn(*args)))
        order, modes = GRAD_CASES[name]
        check_grads(fn, args, order=order, modes=modes, atol=1e-6, rtol=1e-5)


def test_every_differentiable_loss_has_its_gradient_checked():
    checked = set()
    with jax.enable_x64(True):
        for fn, args in _grad_cases().values():
            out = jax.eval_shape(fn, *args)
            checked |= set(out) if isinstance(out, dict) else {fn.__name__}
    not_losses = {
        "ELBOTerms",
        "ImportanceSampled",
        "TEMPERATURE_RANGE",
        "check_distillation_settings",
    }
    public = set(losses.__all__) - not_losses
    assert not {f for f in public if not any(name.startswith(f) for name in checked)}


# --------------------------------------------------------------------- invariances


def test_temperature_one_cross_entropy_equals_optax():
    rng, z, _, labels = logits_and_targets(20, shape=(6, 9))
    soft = random_probabilities(rng, z.shape)
    ce = jax.jit(losses.tempered_cross_entropy)
    assert_close(
        ce(z, labels), jax.jit(optax.softmax_cross_entropy_with_integer_labels)(z, labels), 1e-6
    )
    assert_close(ce(z, soft), jax.jit(optax.softmax_cross_entropy)(z, soft), 1e-6)


def test_losses_stay_exact_for_logits_with_a_large_common_offset():
    """The max is subtracted before anything else, so a shared offset of 1e4 costs no
    precision (optax's integer cross-entropy, logsumexp(z) - z_y, loses ~ulp(1e4) = 1e-3
    there)."""
    rng, _, _, labels = logits_and_targets(29, shape=(64, 10))
    s = (1e4 + rng.normal(size=(64, 10))).astype(np.float32)  # the test inputs are these
    t = (-1e4 + rng.normal(size=(64, 10))).astype(np.float32)  # rounded values
    soft = random_probabilities(rng, s.shape)

    @jax.jit
    def all_losses(s, t):
        ce = losses.tempered_cross_entropy
        values = [ce(s, y, temperature=T) for y in (labels, soft) for T in (1.0, 3.0)]
        return values + [losses.distillation_loss(s, t, labels, temperature=3.0, alpha=0.5)]

    refs = [np_cross_entropy(s, y, T) for y in (labels, soft) for T in (1.0, 3.0)]
    refs.append(np_distillation(s, t, labels, 3.0, 0.5))
    for value, ref in zip(all_losses(s, t), refs):
        assert_close(value, ref, rtol=1e-6, atol=2e-6)


def test_integer_labels_equal_one_hot_labels():
    _, s, t, labels = logits_and_targets(21)
    one_hot = np.asarray(jax.nn.one_hot(labels, s.shape[-1]))
    ce = jax.jit(functools.partial(losses.tempered_cross_entropy, temperature=2.5))
    assert_close(ce(s, labels), ce(s, one_hot), 1e-6, 1e-6)
    distill = jax.jit(functools.partial(losses.distillation_loss, temperature=3.0, alpha=0.6))
    assert_close(distill(s, t, labels), distill(s, t, one_hot), 1e-6, 1e-6)


@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_alpha_one_is_the_hard_cross_entropy_and_alpha_zero_the_soft_term(temperature):
    _, s, t, labels = logits_and_targets(22)
    distill = functools.partial(losses.distillation_loss, temperature=temperature)
    hard = jax.jit(functools.partial(distill, alpha=1.0))(s, t, labels)
    assert_close(hard, optax.softmax_cross_entropy_with_integer_labels(s, labels), 1e-6, 1e-6)
    assert_close(hard, jax.jit(losses.tempered_cross_entropy)(s, labels), 1e-6, 1e-6)
    soft = jax.jit(functools.partial(distill, alpha=0.0))(s, t, labels)
    assert_close(soft, jax.jit(distill)(s, t), 1e-6, 1e-6)
    assert not np.allclose(hard, soft)


def test_where_mask_equals_slicing_the_classes_away():
    rng, s, t, _ = logits_and_targets(23, shape=(4, 3, 8))
    keep = np.array([True, False, True, True, False, True, True, False])
    labels = rng.choice(np.flatnonzero(keep), size=(4, 3)).astype(np.int32)
    sliced_labels = (np.cumsum(keep) - 1)[labels].astype(np.int32)
    soft = random_probabilities(rng, s.shape) * keep
    soft = (soft / soft.sum(-1, keepdims=True)).astype(np.float32)

    def all_losses(s, t, labels, soft, where=None):
        distill = functools.partial(
            losses.distillation_loss, labels=labels, temperature=4.0, alpha=0.3, where=where
        )
        return {
            "log_softmax": losses.tempered_log_softmax(s, temperature=0.3, where=where),
            "ce_integer": losses.tempered_cross_entropy(s, labels, temperature=2.0, where=where),
            "ce_soft": losses.tempered_cross_entropy(s, soft, temperature=2.0, where=where),
            "distill_kl": distill(s, t, soft_loss="kl"),
            "distill_ce": distill(s, t, soft_loss="ce"),
            "grad_kl": jax.grad(lambda s: distill(s, t, soft_loss="kl").sum())(s),
            "grad_ce": jax.grad(lambda s: distill(s, t, soft_loss="ce").sum())(s),
        }

    masked = jax.jit(all_losses)(s, t, labels, soft, where=keep)
    sliced = jax.jit(all_losses)(s[..., keep], t[..., keep], sliced_labels, soft[..., keep])
    for name in masked:
        if masked[name].shape == s.shape:  # per class: the masked classes are -inf or 0
            masked_out = np.asarray(masked[name])[..., ~keep]
            assert np.all(masked_out == (-np.inf if name == "log_softmax" else 0.0)), name
            masked[name] = masked[name][..., keep]
        assert_close(masked[name], sliced[name], 1e-5, 1e-6)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 8.0])
def test_kl_and_ce_soft_terms_differ_by_the_scaled_teacher_entropy(temperature):
    _, s, t, labels = logits_and_targets(24)
    kw = dict(temperature=temperature)
    kl = jax.jit(functools.partial(losses.distillation_loss, soft_loss="kl", **kw))
    ce = jax.jit(functools.partial(losses.distillation_loss, soft_loss="ce", **kw))
    entropy = np_entropy(t, temperature)
    assert np.any(entropy > 0.1)
    assert_close(np.asarray(ce(s, t), np.float64) - kl(s, t), temperature**2 * entropy, 1e-5)
    # With labels the soft terms are weighted by 1 - alpha.
    kl_y = jax.jit(functools.partial(losses.distillation_loss, soft_loss="kl", alpha=0.3, **kw))
    ce_y = jax.jit(functools.partial(losses.distillation_loss, soft_loss="ce", alpha=0.3, **kw))
    diff = np.asarray(ce_y(s, t, labels), np.float64) - kl_y(s, t, labels)
    assert_close(diff, 0.7 * temperature**2 * entropy, 1e-5)


@pytest.mark.parametrize("temperature", [0.5, 4.0, 20.0])
@pytest.mark.parametrize("soft_loss", ["kl", "ce"])
def test_soft_gradient_has_the_closed_form(temperature, soft_loss):
    _, s, t, _ = logits_and_targets(25)
    loss = functools.partial(losses.distillation_loss, temperature=temperature, soft_loss=soft_loss)

    @jax.jit
    def grads(s, t):
        return [
            jax.grad(lambda s: loss(s, t, scale_by_temperature_squared=scale).sum())(s)
            for scale in (True, False)
        ]

    scaled, unscaled = grads(s, t)
    closed = np_softmax(s, temperature) - np_softmax(t, temperature)
    assert_close(scaled, temperature * closed, rtol=1e-4, atol=1e-6 * temperature)
    assert_close(unscaled, closed / temperature, rtol=1e-4, atol=1e-6)


def test_scale_by_temperature_squared_false_divides_the_soft_term_by_t_squared():
    _, s, t, labels = logits_and_targets(26)
    T = 3.0
    kw = dict(temperature=T, soft_loss="kl")
    scaled = jax.jit(functools.partial(losses.distillation_loss, **kw))(s, t)
    unscaled = jax.jit(
        functools.partial(losses.distillation_loss, scale_by_temperature_squared=False, **kw)
    )(s, t)
    assert_close(unscaled, np.asarray(scaled, np.float64) / T**2, 1e-6, 1e-7)
    # With labels, only the soft term changes.
    hard = np_cross_entropy(s, labels)
    with_labels = jax.jit(
        functools.partial(
            losses.distillation_loss, alpha=0.25, scale_by_temperature_squared=False, **kw
        )
    )(s, t, labels)
    assert_close(with_labels, 0.25 * hard + 0.75 * np.asarray(scaled, np.float64) / T**2)


def test_axis_equals_moving_the_axis():
    rng, s, t, _ = logits_and_targets(27, shape=(3, 6, 4))
    labels = rng.integers(0, 6, size=(3, 4)).astype(np.int32)
    soft = np.moveaxis(random_probabilities(rng, (3, 4, 6)), -1, 1)
    mean, logvar = s[:, :3], t[:, :3]  # [3, 3, 4], latent axis 1

    def all_losses(s, t, soft, mean, logvar, axis):
        distill = functools.partial(losses.distillation_loss, temperature=3.0, alpha=0.5, axis=axis)
        return {
            "log_softmax": losses.tempered_log_softmax(s, temperature=2.0, axis=axis),
            "ce_integer": losses.tempered_cross_entropy(s, labels, temperature=0.5, axis=axis),
            "ce_soft": losses.tempered_cross_entropy(s, soft, temperature=0.5, axis=axis),
            "distill": distill(s, t, labels),
            "distill_grad": jax.grad(lambda s: distill(s, t, labels).sum())(s),
            "gaussian_kl": losses.gaussian_kl(mean, logvar, axis=axis),
            "diagonal_kl": losses.diagonal_gaussian_kl(mean, logvar, logvar, mean, axis=axis),
        }

    fn = jax.jit(all_losses, static_argnames="axis")
    moved = functools.partial(np.moveaxis, source=1, destination=-1)
    last = fn(moved(s), moved(t), moved(soft), moved(mean), moved(logvar), axis=-1)
    for axis in (1, -2, 0):
        args = (s, t, soft, mean, logvar)
        if axis == 0:  # the class axis first
            args = tuple(np.moveaxis(a, 1, 0) for a in args)
        out = fn(*args, axis=axis)
        for name in out:
            value = np.asarray(out[name])
            if value.ndim == 3:  # per class: move the class axis back to the end
                value = np.moveaxis(value, 0 if axis == 0 else 1, -1)
            assert_close(value, last[name], 1e-6, 1e-6)


@pytest.mark.parametrize("soft_loss", ["kl", "ce"])
def test_teacher_gets_zero_gradient(soft_loss):
    _, s, t, labels = logits_and_targets(28)
    loss = functools.partial(
        losses.distillation_loss, temperature=2.0, alpha=0.5, soft_loss=soft_loss
    )
    grad_s, grad_t = jax.jit(jax.grad(lambda s, t: loss(s, t, labels).sum(), argnums=(0, 1)))(s, t)
    np.testing.assert_array_equal(grad_t, np.zeros_like(t))
    assert np.abs(np.asarray(grad_s)).max() > 1e-3  # the student does learn


# ------------------------------------------------- VAE bounds, linear-Gaussian model


class LinearGaussian:
    """p(z) = N(0, I_L), p(x | z) = N(W z + b, s2 I_D), with log p(x) known exactly.

    W has orthogonal columns, so the exact posterior is a diagonal Gaussian, which a
    :class:`~kdvae.losses.DiagonalGaussian` represents.
    """

    def __init__(self, seed=0, batch=4, x_dim=5, scales=(2.0, 1.0), s2=0.25):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(x_dim, len(scales))))
        self.W = q * np.asarray(scales)
        self.b = rng.normal(size=x_dim)
        self.s2 = s2
        z = rng.normal(size=(batch, len(scales)))
        self.x = z @ self.W.T + self.b + np.sqrt(s2) * rng.normal(size=(batch, x_dim))
        self.log_px = np_mvn_logpdf(self.x, self.b, self.W @ self.W.T + s2 * np.eye(x_dim))
        post_var = 1.0 / (1.0 + np.asarray(scales) ** 2 / s2)
        self.post_mean = post_var * ((self.x - self.b) @ self.W) / s2
        self.post_var = np.broadcast_to(post_var, self.post_mean.shape)
        W32, b32 = jnp.asarray(self.W, jnp.float32), jnp.asarray(self.b, jnp.float32)
        self.decoder = lambda z: (z @ W32.T + b32, jnp.float32(math.log(s2)))

    def posterior(self, mean, var, replicas=1):
        """``N(mean, var)`` as the bounds' posterior, repeated for ``replicas`` copies."""
        mean = jnp.asarray(np.repeat(mean, replicas, 0), jnp.float32)
        logvar = jnp.asarray(np.repeat(np.log(var), replicas, 0), jnp.float32)
        return losses.DiagonalGaussian(mean, logvar)

    def kl_to_posterior(self, mean, var):
        pm, pv = self.post_mean, self.post_var
        return 0.5 * np.sum(var / pv + (mean - pm) ** 2 / pv - 1.0 - np.log(var / pv), -1)

    def x_replicas(self, replicas):
        return jnp.asarray(np.repeat(self.x, replicas, 0), jnp.float32)


@pytest.fixture(scope="module")
def linear_gaussian():
    return LinearGaussian()


def _bound(model, posterior, *, kind, num_samples, chunk_size=None):
    """The jitted bound ``(key, x) -> [B]`` in float64, for a Gaussian likelihood."""
    kw = dict(num_samples=num_samples, likelihood="gaussian")
    if kind == "elbo":
        fn = lambda key, x, q: losses.elbo(key, x, q, model.decoder, **kw).elbo  # noqa: E731
    else:
        fn = lambda key, x, q: losses.iwae_bound(  # noqa: E731
            key, x, q, model.decoder, chunk_size=chunk_size, **kw
        )
    jitted = jax.jit(fn)  # the posterior goes in as an argument: a pytree
    return lambda key, x: np.asarray(jitted(key, x, posterior), np.float64)


def test_linear_gaussian_posterior_is_exact(linear_gaussian):
    """Sanity check of the test model: Bayes' rule holds for the posterior used below."""
    m = linear_gaussian
    z = m.post_mean + 0.3
    log_joint = np_normal_logpdf(z, 0.0, 1.0).sum(-1) + np_normal_logpdf(
        m.x, z @ m.W.T + m.b, m.s2
    ).sum(-1)
    log_post = np_normal_logpdf(z, m.post_mean, m.post_var).sum(-1)
    assert_close(log_joint - log_post, m.log_px, 1e-10, 1e-10)


def test_vae_bounds_are_ordered_and_iwae_rises_to_log_px(linear_gaussian):
    """E[ELBO] = E[IWAE_1] < E[IWAE_10] < E[IWAE_100] < E[IWAE_1000] <= log p(x).

    The posterior q is the exact one shifted by 1.5 standard deviations with twice the
    variance: a 2.6-nat ELBO gap, with importance weights of finite variance. Every
    data point has the same gap, so the replicas of all four points are pooled; the
    bounds for different ``k`` share their first samples (``fold_in(key, i)``), so
    their differences are paired. Margins are 4 standard errors.
    """
    m, replicas = linear_gaussian, 1000
    q_mean = m.post_mean + 1.5 * np.sqrt(m.post_var)
    q_var = 2.0 * m.post_var
    q = m.posterior(q_mean, q_var, replicas)
    x = m.x_replicas(replicas)
    log_px = np.repeat(m.log_px, replicas)
    elbo_exact = np.repeat(m.log_px - m.kl_to_posterior(q_mean, q_var), replicas)
    gap = np.mean(log_px - elbo_exact)
    assert gap > 2.0

    def se(a):
        return a.std() / np.sqrt(a.size)

    key = jax.random.key(11)
    elbo = _bound(m, q, kind="elbo", num_samples=1)(jax.random.key(12), x)
    iwae = {
        k: _bound(m, q, kind="iwae", num_samples=k, chunk_size=250)(key, x)
        for k in (1, 10, 100, 1000)
    }
    # The single-sample ELBO and IWAE_1 are unbiased for the analytic ELBO.
    for estimate in (elbo, iwae[1]):
        assert abs(np.mean(estimate - elbo_exact)) < 4 * se(estimate - elbo_exact)
    assert abs(elbo.mean() - iwae[1].mean()) < 4 * np.hypot(se(elbo), se(iwae[1]))
    # IWAE_k rises with k ...
    for small, large in ((1, 10), (10, 100), (100, 1000)):
        diff = iwae[large] - iwae[small]
        assert diff.mean() > 4 * se(diff), (small, large, diff.mean(), se(diff))
    # ... stays below log p(x) (in expectation) ...
    for k, bound in iwae.items():
        assert np.mean(bound - log_px) < 4 * se(bound - log_px), k
    # ... and closes most of the gap.
    assert np.mean(log_px - iwae[1000]) < 0.01 * gap


def test_exact_posterior_makes_the_bounds_tight(linear_gaussian):
    """With q = p(z | x) every importance weight is p(x): IWAE_k = log p(x) for every
    draw. The ELBO estimator uses the analytic KL, so its single draws vary; its
    expectation is log p(x)."""
    m = linear_gaussian
    exact = m.posterior(m.post_mean, m.post_var, replicas=1)
    x = jnp.asarray(m.x, jnp.float32)
    iwae = _bound(m, exact, kind="iwae", num_samples=3)
    for seed in range(3):
        assert_close(iwae(jax.random.key(seed), x), m.log_px, rtol=0, atol=1e-4)
    # With k = 1 this is the single-sample ELBO in its log-weight form.
    iwae_1 = _bound(m, exact, kind="iwae", num_samples=1)
    assert_close(iwae_1(jax.random.key(4), x), m.log_px, rtol=0, atol=1e-4)
    replicas = 2000
    exact_replicas = m.posterior(m.post_mean, m.post_var, replicas)
    elbo = _bound(m, exact_replicas, kind="elbo", num_samples=4)(
        jax.random.key(3), m.x_replicas(replicas)
    ).reshape(-1, replicas)
    se = elbo.std(1) / np.sqrt(replicas)
    assert np.all(np.abs(elbo.mean(1) - m.log_px) < 4 * se)
    assert np.all(se < 0.05)


def test_elbo_terms_and_beta():
    params, x = mlp_params(30), vae_data(31)
    q, dec = mlp_posterior(params, x), mlp_decoder(params, "bernoulli")
    fn = jax.jit(lambda key, x, beta: losses.elbo(key, x, q, dec, num_samples=3, beta=beta))
    key = jax.random.key(0)
    base = fn(key, x, 1.0)
    for beta in (0.0, 0.5, 4.0):
        terms = fn(key, x, beta)
        assert terms.elbo.shape == terms.reconstruction.shape == terms.kl.shape == (5,)
        assert_close(terms.elbo, np.asarray(terms.reconstruction) - beta * np.asarray(terms.kl))
        np.testing.assert_array_equal(terms.reconstruction, base.reconstruction)
    assert np.all(np.asarray(base.kl) > 0)
    # Same key, same value; another key, another value.
    np.testing.assert_array_equal(fn(key, x, 1.0).elbo, base.elbo)
    assert not np.allclose(fn(jax.random.key(1), x, 1.0).elbo, base.elbo)


def test_iwae_bound_does_not_depend_on_chunk_size():
    params, x = mlp_params(32), vae_data(33)
    q, dec = mlp_posterior(params, x), mlp_decoder(params, "bernoulli")
    key = jax.random.key(4)

    def bound(chunk_size):
        return jax.jit(
            lambda key, x: losses.iwae_bound(key, x, q, dec, num_samples=12, chunk_size=chunk_size)
        )

    all_at_once = bound(None)
    reference = np.asarray(all_at_once(key, x))
    assert_close(bound(5)(key, x), reference, rtol=1e-6, atol=1e-6)  # 5 does not divide 12
    assert not np.allclose(all_at_once(jax.random.key(5), x), reference)


# ------------------------------------------------------------------ extreme inputs


# The ends of losses.TEMPERATURE_RANGE, and between.
@pytest.mark.parametrize("temperature", [1e-3, 0.05, 1.0, 1000.0, 1e4])
def test_extreme_logits(temperature):
    """Logits of 1e4, 1e30 and the float32 maximum: values match float64 wherever the
    tempered log-probabilities fit in float32, overflow to +inf (never NaN) where they
    don't, and gradients always match the closed form."""
    base_s = np.array([[1.0, -1.0, 0.0, 0.5], [-1.0, 1.0, 0.25, -0.5], [0.3, 0.2, -1.0, 1.0]])
    base_t = np.array([[1.0, -0.5, 0.0, -1.0], [0.5, 1.0, -1.0, 0.0], [-1.0, 0.2, 0.3, 1.0]])
    labels = np.array([0, 2, 3], np.int32)
    alpha = 0.5
    log_sm = jax.jit(functools.partial(losses.tempered_log_softmax, temperature=temperature))
    loss = jax.jit(
        functools.partial(losses.distillation_loss, temperature=temperature, alpha=alpha)
    )
    grad = jax.jit(jax.grad(lambda s, t, y: loss(s, t, y).sum()))
    for scale in (1e4, 1e30, F32_MAX):
        s = (scale * base_s).astype(np.float32)
        t = (scale * base_t).astype(np.float32)
        ref_log_p = np_log_softmax(s, temperature)
        fits = np.all(np.abs(ref_log_p) <= F32_MAX)
        log_p = np.asarray(log_sm(s))
        assert not np.any(np.isnan(log_p))
        if scale >= 1e30:
            assert np.all(log_p.max(-1) == 0.0)  # the largest logit has probability one
        if fits:
            assert_close(log_p, ref_log_p, rtol=1e-6, atol=1e-6)
        else:  # what fits in float32 is right; the rest is -inf
            overflows = np.abs(ref_log_p) > F32_MAX
            assert np.all(np.isclose(log_p, ref_log_p, rtol=1e-6) | overflows)
            assert np.all(log_p[overflows] == -np.inf)

        value = np.asarray(loss(s, t, labels))
        ref_value = np_distillation(s, t, labels, temperature, alpha)
        both_fit = fits and np.all(np.abs(np_log_softmax(s, 1.0)) <= F32_MAX)
        assert not np.any(np.isnan(value))
        if both_fit:
            assert_close(value, ref_value, rtol=1e-5, atol=1e-6)
        else:
            assert np.all((value == np.inf) | np.isclose(value, ref_value, rtol=1e-5))

        g = np.asarray(grad(s, t, labels))
        closed = alpha * (np_softmax(s) - np.eye(4)[labels]) + (1 - alpha) * temperature * (
            np_softmax(s, temperature) - np_softmax(t, temperature)
        )
        assert np.all(np.isfinite(g))
        assert_close(g, closed, rtol=1e-4, atol=1e-4 * max(temperature, 1.0))


@pytest.mark.parametrize("temperature", [1e-3, 0.05, 1.0, 1000.0, 1e4])
def test_masked_minus_inf_classes_in_student_and_teacher(temperature):
    rng, s, t, _ = logits_and_targets(40, shape=(3, 6))
    s[:, 1] = t[:, 1] = -np.inf  # masked in both
    t[0, 4] = -np.inf  # masked in the teacher only
    labels = np.array([0, 2, 5], np.int32)
    keep = np.array([True, False, True, True, True, True])
    fn = functools.partial(losses.distillation_loss, temperature=temperature)

    @jax.jit
    def values_and_grads(s, t):
        out = {}
        for soft_loss in ("kl", "ce"):
            loss = functools.partial(fn, labels=labels, alpha=0.3, soft_loss=soft_loss)
            grad = jax.grad(lambda s: loss(s, t).sum())(s)
            out[soft_loss] = (loss(s, t), loss(s, t, where=keep), grad)
        return out

    for soft_loss, (value, masked_value, grad) in values_and_grads(s, t).items():
        value, grad = np.asarray(value), np.asarray(grad)
        ref = np_distillation(s, t, labels, temperature, 0.3, soft_loss)
        assert np.all(np.isfinite(value))
        assert_close(value, ref, rtol=2e-5, atol=soft_atol(temperature))
        assert_close(value, masked_value, rtol=2e-5, atol=2e-5)
        assert np.all(np.isfinite(grad))
        assert np.all(grad[:, 1] == 0.0)
    # A student that puts -inf where the teacher has mass (its top class: mass at any T)
    # is infinitely wrong.
    s_bad = s.copy()
    s_bad[0, np.argmax(t[0])] = -np.inf
    value = np.asarray(jax.jit(fn)(s_bad, t))
    assert value[0] == np.inf and np.all(np.isfinite(value[1:]))


def test_minus_inf_logit_with_zero_label_where_optax_returns_nan():
    logits = np.array([[2.0, -np.inf, 0.5], [-np.inf, 1.0, 0.0]], np.float32)
    labels = np.array([[0.7, 0.0, 0.3], [0.0, 1.0, 0.0]], np.float32)
    # optax 0.2.8 computes 0 * -inf = NaN here.
    assert np.all(np.isnan(optax.softmax_cross_entropy(logits, labels)))
    ce = jax.jit(losses.tempered_cross_entropy)
    value = np.asarray(ce(logits, labels))
    assert_close(value, np_cross_entropy(logits, labels), 1e-6, 1e-6)
    grad = np.asarray(jax.grad(lambda z: ce(z, labels).sum())(logits))
    assert np.all(np.isfinite(grad)) and grad[0, 1] == 0.0 and grad[1, 0] == 0.0
    assert_close(grad, np_softmax(logits) - labels, 1e-6, 1e-6)


def test_minus_inf_teacher_log_targets_where_optax_returns_nan():
    s = np.array([[0.5, 1.0, -1.0, 2.0]], np.float32)
    t = np.array([[1.0, -np.inf, 0.0, 3.0]], np.float32)
    T = 2.0
    log_q = jax.nn.log_softmax(s / T)
    log_p = jax.nn.log_softmax(t / T)
    # optax 0.2.8: exp(-inf) * (-inf - log q) = 0 * -inf = NaN.
    assert np.isnan(optax.losses.kl_divergence_with_log_targets(log_q, log_p)[0])
    value = np.asarray(jax.jit(functools.partial(losses.distillation_loss, temperature=T))(s, t))
    assert np.all(np.isfinite(value))
    assert_close(value, np_distillation(s, t, None, T), 1e-6, 1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
    """bfloat16/float16 are promoted: float32 results, equal to upcasting first; even at
    the dtype's largest values, finite where the math is."""
    _, s, t, labels = logits_and_targets(41, shape=(4, 6))
    # float16's maximum, 65504, and 1e30 for bfloat16 (its maximum, 3.4e38, overflows the
    # tempered log-probabilities at T = 0.05, as test_extreme_logits shows for float32).
    big = min(float(jnp.finfo(dtype).max), 1e30)
    s[0, :2], t[0, :2] = (big, -big), (-big, big)
    s_low, t_low = jnp.asarray(s, dtype), jnp.asarray(t, dtype)
    s_up, t_up = (np.asarray(a, np.float32) for a in (s_low, t_low))
    temperatures = (0.05, 1.0, 1000.0)

    @jax.jit
    def loss(s, t):  # [T, B], one compilation for the three temperatures
        return jnp.stack(
            [losses.distillation_loss(s, t, labels, temperature=T, alpha=0.5) for T in temperatures]
        )

    values = loss(s_low, t_low)
    assert values.dtype == jnp.float32
    np.testing.assert_array_equal(values, loss(s_up, t_up))
    assert np.all(np.isfinite(values))
    for value, temperature in zip(values, temperatures):
        ref = np_distillation(s_up, t_up, labels, temperature, 0.5)
        assert_close(value, ref, rtol=1e-5, atol=soft_atol(temperature))
    grad = jax.jit(jax.grad(lambda s: loss(s, t_low).sum()))(s_low)
    assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))

    mean, logvar = jnp.asarray(s[:, :3], dtype), jnp.asarray(t[1:, :3], dtype)
    kl = jax.jit(losses.gaussian_kl)(mean[1:], logvar)
    assert kl.dtype == jnp.float32
    assert_close(
        kl, np_gaussian_kl(np.asarray(mean[1:], np.float32), np.asarray(logvar, np.float32))
    )
    z = losses.reparameterize(jax.random.key(0), mean[1:], logvar)
    assert z.dtype == jnp.float32 and np.all(np.isfinite(z))
    x = jnp.asarray(vae_data(42, batch=4, x_dim=6), dtype)
    ll = jax.jit(losses.bernoulli_log_likelihood)(s_low, x)
    assert ll.dtype == jnp.float32 and np.all(np.isfinite(ll))


def _kl_reference_with_overflow(mean, logvar):
    """float64 reference where exp(logvar) may overflow float64: +inf, never NaN."""
    with np.errstate(over="ignore"):
        return np_gaussian_kl(mean, logvar)


@pytest.mark.parametrize("logvar_value", [-1e4, -100.0, 100.0, 1e4])
def test_gaussian_kl_extreme_logvar(logvar_value):
    mean = np.array([[0.5, -1.0, 0.0]], np.float32)
    logvar = np.full_like(mean, logvar_value)
    kl = np.asarray(jax.jit(losses.gaussian_kl)(mean, logvar))
    ref = _kl_reference_with_overflow(mean, logvar)
    grad_m, grad_lv = (
        np.asarray(g)
        for g in jax.jit(jax.grad(lambda m, lv: losses.gaussian_kl(m, lv).sum(), (0, 1)))(
            mean, logvar
        )
    )
    assert not np.any(np.isnan(kl)) and not np.any(np.isnan(grad_lv))
    assert_close(grad_m, mean)
    if ref[0] <= F32_MAX:  # -1e4, -100: finite
        assert np.all(np.isfinite(kl)) and np.all(np.isfinite(grad_lv))
        assert_close(kl, ref, rtol=1e-6)
        assert_close(grad_lv, -0.5 * np.ones_like(logvar), atol=1e-6)
    else:  # +100 (1.3e43) and +1e4 exceed float32: +inf, not NaN
        assert kl[0] == np.inf and np.all(grad_lv == np.inf)


def test_diagonal_gaussian_kl_extreme_logvars():
    values = (-1e4, -100.0, 0.0, 100.0, 1e4)
    lq, lp = (a.ravel() for a in np.meshgrid(values, values))
    mq = np.where(np.arange(lq.size) % 2 == 0, 0.5, 0.0)  # equal means in half the rows
    lq, lp, mq = (np.asarray(a, np.float32)[:, None] for a in (lq, lp, mq))
    mp = np.zeros_like(mq)
    fn = jax.jit(losses.diagonal_gaussian_kl)
    kl = np.asarray(fn(mq, lq, mp, lp))
    grads = jax.jit(jax.grad(lambda *a: losses.diagonal_gaussian_kl(*a).sum(), (0, 1, 2, 3)))(
        mq, lq, mp, lp
    )
    assert not np.any(np.isnan(kl))
    for g in grads:
        assert not np.any(np.isnan(np.asarray(g)))
    # float64 reference in log space: 0.5 (r - 1 - log r) + 0.5 d^2 / var_p, r = var_q/var_p.
    lq64, lp64, d = (np.asarray(a, np.float64)[:, 0] for a in (lq, lp, mq))
    with np.errstate(over="ignore", invalid="ignore"):
        ratio = np.expm1(lq64 - lp64) - (lq64 - lp64)
        maha = np.where(d == 0, 0.0, d**2 * np.exp(-lp64))
    ref = 0.5 * (ratio + maha)
    fits = ref <= F32_MAX
    assert_close(kl[fits], ref[fits], rtol=1e-6)
    assert np.all(kl[~fits] == np.inf)
    # Equal Gaussians, however sharp or wide, are at KL 0.
    assert np.all(kl[(lq64 == lp64) & (d == 0)] == 0.0)


def test_gaussian_log_likelihood_extreme_logvar():
    logvar = np.array([-1e4, -100.0, 100.0, 1e4], np.float32)[:, None] * np.ones(2, np.float32)
    mean = np.array([0.0, 0.25], np.float32) * np.ones((4, 1), np.float32)
    fn = jax.jit(losses.gaussian_log_likelihood)
    for x in (np.zeros_like(mean), np.full_like(mean, 0.5)):
        value = np.asarray(fn(mean, logvar, x))
        grads = jax.grad(lambda *a: fn(*a).sum(), (0, 1, 2))(mean, logvar, x)
        assert not np.any(np.isnan(value))
        for g in grads:
            assert not np.any(np.isnan(np.asarray(g)))
        d = np.asarray(x, np.float64) - mean
        lv = np.asarray(logvar, np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            maha = np.where(d == 0, 0.0, d**2 * np.exp(-lv))
        ref = -0.5 * np.sum(LOG_2PI + lv + maha, -1)
        fits = np.abs(ref) <= F32_MAX
        assert_close(value[fits], ref[fits], rtol=1e-6)
        assert np.all(value[~fits] == -np.inf)
    # x == mean: the density is finite at every variance, the logvar = -1e4 one included.
    assert np.isfinite(fn(mean[:1, :1], logvar[:1, :1], mean[:1, :1]))


def test_reparameterize_extreme_logvar():
    mean = np.array([0.5, -1.0], np.float32)
    key = jax.random.key(0)
    fn = jax.jit(losses.reparameterize)
    np.testing.assert_array_equal(fn(key, mean, np.full(2, -1e4, np.float32)), mean)
    assert_close(fn(key, mean, np.full(2, -100.0, np.float32)), mean, rtol=0, atol=1e-20)
    assert np.all(np.isfinite(fn(key, mean, np.full(2, 100.0, np.float32))))
    z = np.asarray(fn(key, mean, np.full(2, 1e4, np.float32)))
    assert np.all(np.isinf(z))  # a sample of std e^5000 is not a float32


# --------------------------------------------------------------------- bad inputs

S = np.zeros((2, 3), np.float32)
Y = np.zeros(2, np.int32)
KEY = jax.random.key(0)


def _q(batch=2, latents=2, logvar_latents=None):
    """A posterior for ``S``'s two examples (or another ``batch``)."""
    logvar_latents = latents if logvar_latents is None else logvar_latents
    return losses.DiagonalGaussian(
        np.zeros((batch, latents), np.float32), np.zeros((batch, logvar_latents), np.float32)
    )


def _dec(z):
    return jnp.zeros(z.shape[:-1] + (3,))


def _distill(*args, **kw):
    kw = {"temperature": 2.0, **kw}
    return losses.distillation_loss(*args, **kw)


BAD_INPUTS = [  # (call, exception, regex its message must match), id
    pytest.param(
        lambda: losses.tempered_log_softmax(S, temperature=0.0),
        ValueError,
        "temperature",
        id="temperature_zero",
    ),
    pytest.param(
        lambda: losses.tempered_softmax(S, temperature=-1.0),
        ValueError,
        "temperature",
        id="temperature_negative",
    ),
    pytest.param(
        lambda: losses.tempered_cross_entropy(S, Y, temperature=float("nan")),
        ValueError,
        "temperature",
        id="temperature_nan",
    ),
    pytest.param(
        lambda: _distill(S, S, temperature=float("inf")),
        ValueError,
        "temperature",
        id="temperature_inf",
    ),
    pytest.param(
        lambda: _distill(S, S, temperature=None), TypeError, "temperature", id="temperature_none"
    ),
    pytest.param(
        lambda: _distill(S, S, temperature="4"), TypeError, "temperature", id="temperature_string"
    ),
    pytest.param(lambda: _distill(S, S, Y, alpha=-0.1), ValueError, "alpha", id="alpha_negative"),
    pytest.param(lambda: _distill(S, S, Y, alpha=1.5), ValueError, "alpha", id="alpha_above_one"),
    pytest.param(
        lambda: _distill(S, S, Y, alpha=float("nan")), ValueError, "alpha", id="alpha_nan"
    ),
    pytest.param(lambda: _distill(S, S, Y, alpha="0.5"), TypeError, "alpha", id="alpha_string"),
    pytest.param(lambda: _distill(S, S, Y), ValueError, "alpha", id="alpha_missing_with_labels"),
    pytest.param(
        lambda: _distill(S, S, alpha=0.5), ValueError, "alpha.*labels", id="alpha_without_labels"
    ),
    pytest.param(
        lambda: _distill(S, np.zeros((2, 4), np.float32)),
        ValueError,
        "student_logits and teacher_logits",
        id="student_teacher_shapes",
    ),
    pytest.param(
        lambda: losses.tempered_cross_entropy(S, np.zeros(3, np.int32)),
        ValueError,
        "integer labels",
        id="integer_label_shape",
    ),
    pytest.param(
        lambda: _distill(S, S, np.zeros((2, 1), np.int32), alpha=0.5),
        ValueError,
        "integer labels",
        id="integer_label_shape_distillation",
    ),
    pytest.param(
        lambda: losses.tempered_cross_entropy(S, np.zeros((2, 4), np.float32)),
        ValueError,
        "probability labels",
        id="probability_label_shape",
    ),
    pytest.param(
        lambda: losses.tempered_cross_entropy(S, np.zeros((2, 3), bool)),
        TypeError,
        "labels",
        id="boolean_labels",
    ),
    pytest.param(
        lambda: losses.tempered_log_softmax(np.zeros((2, 3), np.int32)),
        TypeError,
        "logits",
        id="integer_logits",
    ),
    pytest.param(
        lambda: _distill(np.zeros((2, 3), np.int32), S),
        TypeError,
        "student_logits",
        id="integer_student_logits",
    ),
    pytest.param(
        lambda: _distill(S, np.zeros((2, 3), np.int32)),
        TypeError,
        "teacher_logits",
        id="integer_teacher_logits",
    ),
    pytest.param(
        lambda: losses.bernoulli_log_likelihood(np.zeros(3, np.int32), S),
        TypeError,
        "logits",
        id="integer_bernoulli_logits",
    ),
    pytest.param(
        lambda: _distill(S, S, soft_loss="mse"), ValueError, "soft_loss", id="unknown_soft_loss"
    ),
    pytest.param(
        lambda: losses.tempered_cross_entropy(S, Y, axis=2),
        ValueError,
        "axis",
        id="axis_out_of_range",
    ),
    pytest.param(
        lambda: losses.tempered_log_softmax(S, where=np.ones(3, np.float32)),
        TypeError,
        "where",
        id="non_boolean_where",
    ),
    pytest.param(
        lambda: _distill(S, S, where=np.ones(3, np.int32)),
        TypeError,
        "where",
        id="non_boolean_where_distillation",
    ),
    pytest.param(
        lambda: losses.tempered_log_softmax(S, where=np.ones(4, bool)),
        ValueError,
        "where",
        id="where_shape",
    ),
    pytest.param(
        lambda: losses.elbo(KEY, S, _q(), _dec, likelihood="poisson"),
        ValueError,
        "likelihood",
        id="unknown_likelihood_elbo",
    ),
    pytest.param(
        lambda: losses.iwae_bound(KEY, S, _q(), _dec, num_samples=2, likelihood="normal"),
        ValueError,
        "likelihood",
        id="unknown_likelihood_iwae",
    ),
    pytest.param(
        lambda: losses.elbo(KEY, S, _q(), _dec, num_samples=0),
        ValueError,
        "num_samples",
        id="elbo_num_samples_zero",
    ),
    pytest.param(
        lambda: losses.elbo(KEY, S, _q(), _dec, num_samples=2.0),
        ValueError,
        "num_samples",
        id="elbo_num_samples_float",
    ),
    pytest.param(
        lambda: losses.elbo(KEY, S, _q(), _dec, num_samples=True),
        ValueError,
        "num_samples",
        id="elbo_num_samples_bool",
    ),
    pytest.param(
        lambda: losses.iwae_bound(KEY, S, _q(), _dec, num_samples=-3),
        ValueError,
        "num_samples",
        id="iwae_num_samples_negative",
    ),
    pytest.param(
        lambda: losses.iwae_bound(KEY, S, _q(), _dec, num_samples=None),
        ValueError,
        "num_samples",
        id="iwae_num_samples_none",
    ),
    pytest.param(
        lambda: losses.iwae_bound(KEY, S, _q(), _dec, num_samples=4, chunk_size=0),
        ValueError,
        "chunk_size",
        id="iwae_chunk_size_zero",
    ),
    pytest.param(
        lambda: losses.iwae_bound(KEY, S, _q(), _dec, num_samples=4, chunk_size=1.5),
        ValueError,
        "chunk_size",
        id="iwae_chunk_size_float",
    ),
    pytest.param(
        lambda: losses.reparameterize(KEY, S, S, num_samples=0),
        ValueError,
        "num_samples",
        id="reparameterize_num_samples",
    ),
    pytest.param(
        lambda: losses.reparameterize(KEY, S, np.zeros(3, np.float32)),
        ValueError,
        "mean and logvar",
        id="reparameterize_shapes",
    ),
    pytest.param(
        lambda: losses.gaussian_kl(S, np.zeros((3, 2), np.float32)),
        ValueError,
        "mean and logvar",
        id="gaussian_kl_shapes",
    ),
    pytest.param(
        lambda: losses.elbo(KEY, S, _q(logvar_latents=3), _dec),
        ValueError,
        "mean and logvar",
        id="elbo_posterior_shapes",
    ),
    pytest.param(
        lambda: losses.iwae_bound(KEY, S, _q(logvar_latents=3), _dec, num_samples=2),
        ValueError,
        "mean and logvar",
        id="iwae_posterior_shapes",
    ),
    pytest.param(
        lambda: losses.elbo(KEY, S, (np.zeros((2, 2)), np.zeros((2, 2))), _dec),
        TypeError,
        "posterior must be a DiagonalGaussian",
        id="elbo_posterior_tuple",
    ),
    pytest.param(
        lambda: losses.iwae_bound(KEY, S, lambda x: (x, x), _dec, num_samples=2),
        TypeError,
        "posterior must be a DiagonalGaussian",
        id="iwae_posterior_encoder",
    ),
    pytest.param(
        lambda: losses.elbo(KEY, S, _q(batch=3), _dec),
        ValueError,
        "batch shape",
        id="elbo_posterior_batch",
    ),
    pytest.param(
        lambda: losses.iwae_bound(KEY, S, _q(batch=1), _dec, num_samples=2),
        ValueError,
        "batch shape",
        id="iwae_posterior_batch",
    ),
    pytest.param(
        lambda: losses.reparameterize(None, S, S),
        TypeError,
        "key must be a PRNG key",
        id="key_none",
    ),
    pytest.param(
        lambda: _q().sample(3, num_samples=2), TypeError, "key must be a PRNG key", id="key_int"
    ),
    pytest.param(
        lambda: losses.elbo(None, S, _q(), _dec), TypeError, "key must be a PRNG key", id="elbo_key"
    ),
    pytest.param(
        lambda: losses.iwae_bound(None, S, _q(), _dec, num_samples=2),
        TypeError,
        "key must be a PRNG key",
        id="iwae_key",
    ),
    pytest.param(
        lambda: losses.elbo(KEY, S, _q(), _dec, event_ndim=3),
        ValueError,
        "event_ndim",
        id="elbo_event_ndim",
    ),
    pytest.param(
        lambda: losses.DiagonalGaussian(np.zeros((2, 2), np.int32), S[:, :2]),
        TypeError,
        "mean",
        id="diagonal_gaussian_integer_mean",
    ),
    pytest.param(
        lambda: _q().log_prob(np.zeros((2, 3), np.float32)),
        ValueError,
        "z with shape",
        id="diagonal_gaussian_log_prob_shape",
    ),
    pytest.param(
        lambda: _q().sample(KEY, num_samples=0),
        ValueError,
        "num_samples",
        id="diagonal_gaussian_num_samples",
    ),
    pytest.param(
        lambda: _q().kl((np.zeros(2), np.zeros(2))),
        TypeError,
        "other must be a DiagonalGaussian",
        id="diagonal_gaussian_kl_other",
    ),
    pytest.param(
        lambda: losses.diagonal_gaussian_kl(S, S, np.zeros(4, np.float32), S),
        ValueError,
        "broadcast",
        id="diagonal_kl_shapes",
    ),
    pytest.param(
        lambda: losses.gaussian_log_likelihood(S, S, np.zeros(4, np.float32)),
        ValueError,
        "must broadcast",
        id="gaussian_ll_shapes",
    ),
    pytest.param(
        lambda: losses.bernoulli_log_likelihood(S, np.zeros(4, np.float32)),
        ValueError,
        "x with shape",
        id="bernoulli_x_shape",
    ),
    pytest.param(
        lambda: losses.bernoulli_log_likelihood(S, S, event_ndim=3),
        ValueError,
        "event_ndim",
        id="event_ndim",
    ),
]


@pytest.mark.parametrize("call,error,match", BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("temperature", [0.0, 9e-4, 1.1e4, 1e30, 1e-45, np.inf, np.nan, -1.0])
def test_temperatures_outside_the_documented_range_are_refused(temperature):
    low, high = losses.TEMPERATURE_RANGE
    for call in (
        lambda: losses.tempered_log_softmax(S, temperature=temperature),
        lambda: losses.tempered_cross_entropy(S, Y, temperature=temperature),
        lambda: losses.distillation_loss(S, S, Y, temperature=temperature, alpha=0.5),
    ):
        with pytest.raises(
            ValueError, match=rf"temperature must be a finite number in \[{low:g}, {high:g}\]"
        ):
            call()


@pytest.mark.parametrize("bad", [-1, 3, 100])
def test_integer_labels_out_of_range(bad):
    """Concrete labels are refused; under jit that example's loss is NaN, never another
    class's loss (NumPy-style indexing would wrap -1 to the last class)."""
    logits = S  # [2, 3]
    labels = np.array([1, bad], np.int32)
    with pytest.raises(
        ValueError, match=r"labels must be class indices in \[0, 3\), got labels from"
    ):
        losses.tempered_cross_entropy(logits, labels)
    with pytest.raises(ValueError, match="labels must be class indices"):
        losses.distillation_loss(logits, logits, labels, temperature=2.0, alpha=0.5)
    ce = jax.jit(losses.tempered_cross_entropy)(logits, labels)
    assert np.isnan(ce[1]) and ce[0] == losses.tempered_cross_entropy(logits[:1], labels[:1])[0]
    kd = jax.jit(functools.partial(losses.distillation_loss, temperature=2.0, alpha=0.5))(
        logits, logits, labels
    )
    assert np.isnan(kd[1]) and np.isfinite(kd[0])


def test_checks_also_raise_under_jit():
    with pytest.raises(ValueError, match="alpha"):
        jax.jit(functools.partial(losses.distillation_loss, temperature=2.0, alpha=2.0))(S, S, Y)
    with pytest.raises(ValueError, match="integer labels"):
        jax.jit(functools.partial(losses.tempered_cross_entropy, temperature=2.0))(S, Y[:1])


# ------------------------------------------------------------------ jit and vmap


def test_jitted_distillation_compiles_once_and_vmaps():
    traces = []

    def traced_distillation_loss(*args, **kwargs):
        traces.append(kwargs)
        return losses.distillation_loss(*args, **kwargs)

    loss = jax.jit(functools.partial(traced_distillation_loss, temperature=4.0, alpha=0.5))
    rng = np.random.default_rng(50)
    batches = [
        (
            rng.normal(size=(8, 10)).astype(np.float32),
            rng.normal(size=(8, 10)).astype(np.float32),
            rng.integers(0, 10, size=8).astype(np.int32),
        )
        for _ in range(3)
    ]
    values = [loss(*batch) for batch in batches]
    assert len(traces) == 1  # one compilation for all three batches
    for (s, t, y), value in zip(batches, values):
        assert_close(value, np_distillation(s, t, y, 4.0, 0.5), 2e-5, 2e-5)

    # vmap over examples gives the batched result; vmap over a stack of batches too.
    s, t, y = batches[0]
    np.testing.assert_allclose(jax.vmap(loss)(s, t, y), values[0], rtol=1e-6, atol=1e-6)
    stacked = [np.stack(parts) for parts in zip(*batches)]
    out = jax.vmap(loss)(*stacked)
    assert out.shape == (3, 8)
    np.testing.assert_allclose(out, np.stack(values), rtol=1e-6, atol=1e-6)
