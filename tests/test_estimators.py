"""The lower-variance gradient estimators: STL for the ELBO, DReG for the IWAE bound.

Their gradients are not the derivatives of their values (that is the point), so they are
checked as estimators: over thousands of keys, their mean gradient equals the plain
estimator's and the closed form on the linear-Gaussian model, their variance is lower,
and at the exact posterior the encoder's gradient is zero for every draw. Where a
gradient *is* the derivative of the value (the decoder's), ``check_grads`` checks it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from test_losses import (
    LinearGaussian,
    assert_close,
    mlp_decoder,
    mlp_params,
    mlp_posterior,
    np_log_likelihood,
    np_mlp_decoder,
    np_normal_logpdf,
    vae_data,
)

from kdvae import losses

DRAWS = 4000  # keys per Monte-Carlo comparison


@pytest.fixture(scope="module")
def model() -> LinearGaussian:
    return LinearGaussian(batch=1)


def encoder_gradients(model, estimator, mean, var, *, num_samples, draws=DRAWS, seed=0):
    """``[draws, 2 * L]``: one draw's gradient of the bound (of the one data point) with
    respect to the posterior's mean and log-variance, for each of ``draws`` keys."""
    x = jnp.asarray(model.x, jnp.float32)

    def bound(params, key):
        q = losses.DiagonalGaussian(params[:, :2], params[:, 2:])
        kw = dict(num_samples=num_samples, likelihood="gaussian")
        if estimator == "elbo":
            return losses.elbo(key, x, q, model.decoder, **kw).elbo.sum()
        if estimator == "stl":
            return losses.stl_elbo(key, x, q, model.decoder, **kw).elbo.sum()
        if estimator == "iwae":
            return losses.iwae_bound(key, x, q, model.decoder, **kw).sum()
        return losses.dreg_iwae_bound(key, x, q, model.decoder, **kw).sum()

    params = jnp.asarray(np.concatenate([mean, np.log(var)], -1), jnp.float32)
    keys = jax.random.split(jax.random.key(seed), draws)
    grads = jax.jit(jax.vmap(jax.grad(bound), in_axes=(None, 0)))(params, keys)
    return np.asarray(grads, np.float64).reshape(draws, -1)


def exact_elbo_gradient(model, mean, var) -> np.ndarray:
    """d/d(mean, logvar) of the ELBO = log p(x) - KL(q || p(z|x)), in closed form."""
    pm, pv = model.post_mean, model.post_var
    return np.concatenate([-(mean - pm) / pv, -0.5 * (var / pv - 1.0)], -1).ravel()


def se(a: np.ndarray) -> np.ndarray:
    return a.std(0) / np.sqrt(len(a))


def snr(grads: np.ndarray) -> np.ndarray:
    """Each coordinate's |mean| / standard deviation over the draws."""
    return np.abs(grads.mean(0)) / grads.std(0)


def near(model, shift=0.5, widen=1.5):
    """A posterior off the exact one: means shifted by ``shift`` standard deviations,
    variances ``widen`` times larger."""
    return model.post_mean + shift * np.sqrt(model.post_var), widen * model.post_var


# --------------------------------------------------------------------------------- STL


def test_stl_value_matches_a_float64_reference_and_shares_the_elbos_samples():
    params, x = mlp_params(50), vae_data(51)
    q, dec = mlp_posterior(params, x), mlp_decoder(params, "gaussian")
    key = jax.random.key(3)
    kw = dict(num_samples=4, likelihood="gaussian", beta=0.7)
    terms = jax.jit(lambda key, x: losses.stl_elbo(key, x, q, dec, **kw))(key, x)
    plain = losses.elbo(key, x, q, dec, **kw)
    assert_close(terms.reconstruction, plain.reconstruction, rtol=1e-6, atol=1e-6)  # same z
    z = np.asarray(q.sample(key, num_samples=4), np.float64)
    mean, var = np.asarray(q.mean, np.float64), np.exp(np.asarray(q.logvar, np.float64))
    log_px = np_log_likelihood("gaussian", np_mlp_decoder(params, z, "gaussian"), x)
    kl = (np_normal_logpdf(z, mean, var) - np_normal_logpdf(z, 0.0, 1.0)).sum(-1).mean(0)
    assert_close(terms.kl, kl, rtol=1e-4, atol=1e-4)
    assert_close(terms.elbo, log_px.mean(0) - 0.7 * kl, rtol=1e-4, atol=1e-4)


def test_stl_kl_estimate_is_unbiased_for_the_analytic_kl(model):
    mean, var = near(model)
    q = model.posterior(mean, var, replicas=DRAWS)
    x = model.x_replicas(DRAWS)
    terms = losses.stl_elbo(jax.random.key(5), x, q, model.decoder, likelihood="gaussian")
    kl = np.asarray(terms.kl, np.float64)
    analytic = float(np.asarray(q.kl_to_standard_normal())[0])
    assert abs(kl.mean() - analytic) < 4 * kl.std() / np.sqrt(DRAWS)


def test_stl_gradient_is_unbiased(model):
    """Mean over 4000 draws: STL's encoder gradient, the plain one's, and the closed
    form agree within 4 standard errors, coordinate by coordinate."""
    mean, var = near(model)
    exact = exact_elbo_gradient(model, mean, var)
    stl = encoder_gradients(model, "stl", mean, var, num_samples=1)
    plain = encoder_gradients(model, "elbo", mean, var, num_samples=1, seed=1)
    for grads in (stl, plain):
        assert np.all(np.abs(grads.mean(0) - exact) < 4 * se(grads) + 1e-6), grads.mean(0)


def test_stl_variance_is_lower_and_zero_at_the_exact_posterior(model):
    exact_q = (model.post_mean, model.post_var)
    at_optimum = encoder_gradients(model, "stl", *exact_q, num_samples=1, draws=200)
    np.testing.assert_allclose(at_optimum, 0.0, atol=1e-4)  # every single draw
    plain_at_optimum = encoder_gradients(model, "elbo", *exact_q, num_samples=1, draws=200)
    assert plain_at_optimum.var(0).sum() > 0.1
    # Near the optimum (0.2 standard deviations off, 10 % wider), a small fraction
    # (seen: 1.1 %).
    mean, var = near(model, shift=0.2, widen=1.1)
    stl = encoder_gradients(model, "stl", mean, var, num_samples=1)
    plain = encoder_gradients(model, "elbo", mean, var, num_samples=1)
    assert stl.var(0).sum() < 0.1 * plain.var(0).sum()


def test_stl_decoder_gradient_is_the_derivative_of_its_value():
    params, x = mlp_params(52), vae_data(53)
    q = mlp_posterior(params, x)
    key = jax.random.key(1)

    def value(dec_out):
        decode = mlp_decoder({**params, "dec_out": dec_out}, "bernoulli")
        return losses.stl_elbo(key, x, q, decode, num_samples=2).elbo

    check_grads(value, (jnp.asarray(params["dec_out"], jnp.float32),), order=1, modes="rev",
                atol=2e-2, rtol=2e-2, eps=1e-2)  # fmt: skip


# -------------------------------------------------------------------------------- DReG


def test_dreg_value_and_decoder_gradient_are_iwaes():
    params, x = mlp_params(54), vae_data(55)
    q = mlp_posterior(params, x)
    key = jax.random.key(2)

    def both(dec_out):
        decode = mlp_decoder({**params, "dec_out": dec_out}, "bernoulli")
        return [
            jax.value_and_grad(lambda d: fn(key, x, q, decode, num_samples=7).sum())(dec_out)
            for fn in (losses.dreg_iwae_bound, losses.iwae_bound)
        ]

    (v_dreg, g_dreg), (v_iwae, g_iwae) = jax.jit(both)(jnp.asarray(params["dec_out"]))
    assert_close(v_dreg, v_iwae, rtol=1e-5, atol=1e-5)
    assert_close(g_dreg, g_iwae, rtol=1e-4, atol=1e-6)
    check_grads(
        lambda d: losses.dreg_iwae_bound(
            key, x, q, mlp_decoder({**params, "dec_out": d}, "bernoulli"), num_samples=7
        ),
        (jnp.asarray(params["dec_out"], jnp.float32),),
        order=1, modes="rev", atol=2e-2, rtol=2e-2, eps=1e-2,
    )  # fmt: skip


def test_dreg_encoder_gradient_is_unbiased(model):
    """Paired over the same 4000 keys, DReG's encoder gradient and the plain IWAE one
    have the same mean (within 4 standard errors of their difference); DReG's variance
    is a small fraction of the plain one's (seen: 0.4 %)."""
    mean, var = near(model)
    dreg = encoder_gradients(model, "dreg", mean, var, num_samples=8)
    plain = encoder_gradients(model, "iwae", mean, var, num_samples=8)
    difference = dreg - plain
    assert np.all(np.abs(difference.mean(0)) < 4 * se(difference) + 1e-6)
    assert dreg.var(0).sum() < 0.1 * plain.var(0).sum()


def test_dreg_snr_does_not_shrink_with_k_while_iwaes_does(model):
    """Rainforth et al. (2018): the plain IWAE encoder gradient's signal-to-noise ratio
    falls like 1/sqrt(k); Tucker et al.'s DReG keeps it. From k = 4 to 64, seen per
    coordinate: the plain SNR falls to 0.06-0.49 of its value, DReG's rises 2.7-4.0-fold."""
    mean, var = near(model)
    ratio = {
        name: snr(encoder_gradients(model, name, mean, var, num_samples=64))
        / snr(encoder_gradients(model, name, mean, var, num_samples=4))
        for name in ("iwae", "dreg")
    }
    assert np.median(ratio["iwae"]) < 0.5, ratio
    assert np.all(ratio["dreg"] > 1.0), ratio


def test_dreg_is_exact_at_the_exact_posterior(model):
    """With q = p(z|x) every weight is p(x): the bound is log p(x) and the encoder's
    gradient is zero, for every draw."""
    grads = encoder_gradients(model, "dreg", model.post_mean, model.post_var, num_samples=5,
                              draws=100)  # fmt: skip
    np.testing.assert_allclose(grads, 0.0, atol=1e-4)
    q = model.posterior(model.post_mean, model.post_var)
    value = losses.dreg_iwae_bound(
        jax.random.key(0), jnp.asarray(model.x, jnp.float32), q, model.decoder,
        num_samples=5, likelihood="gaussian",
    )  # fmt: skip
    assert_close(value, model.log_px, rtol=0, atol=1e-4)


# -------------------------------------------------------------------- both: edges


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_huge_decoder_logits_stay_finite(scale):
    params, x = mlp_params(56), vae_data(57)
    x = (x > 0.5).astype(np.float32)
    q = mlp_posterior(params, x)
    key = jax.random.key(0)

    def bounds(dec_out):
        decode = mlp_decoder({**params, "dec_out": dec_out * scale}, "bernoulli")
        return (
            losses.stl_elbo(key, x, q, decode, num_samples=2).elbo.sum()
            + losses.dreg_iwae_bound(key, x, q, decode, num_samples=3).sum()
        )

    value, grad = jax.value_and_grad(bounds)(jnp.asarray(params["dec_out"]))
    assert not np.isnan(value) and np.all(np.isfinite(grad))


def test_vmap_over_examples_equals_one_call_per_example():
    """Under ``vmap`` over examples (each a batch of one, the same key) both equal a
    Python loop of calls; values and gradients."""
    params, x = mlp_params(58), vae_data(59)
    q, dec = mlp_posterior(params, x), mlp_decoder(params, "bernoulli")
    key = jax.random.key(4)
    for fn, kw in ((losses.stl_elbo, {}), (losses.dreg_iwae_bound, {"num_samples": 3})):

        def one(x1, mean, logvar):
            q1 = losses.DiagonalGaussian(mean[None], logvar[None])
            value = fn(key, x1[None], q1, dec, **kw)
            return (value.elbo if fn is losses.stl_elbo else value)[0]

        value_and_grad = jax.jit(jax.value_and_grad(one, argnums=(1, 2)))  # compiled once
        mapped = jax.vmap(value_and_grad)(x, q.mean, q.logvar)
        for i in range(len(x)):
            looped = value_and_grad(x[i], q.mean[i], q.logvar[i])
            for a, b in zip(jax.tree.leaves(mapped), jax.tree.leaves(looped), strict=True):
                assert_close(a[i], b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [losses.stl_elbo, losses.dreg_iwae_bound])
def test_bad_arguments_name_themselves(fn):
    params, x = mlp_params(60), vae_data(61)
    q, dec = mlp_posterior(params, x), mlp_decoder(params, "bernoulli")
    with pytest.raises(ValueError, match="num_samples"):
        fn(jax.random.key(0), x, q, dec, num_samples=0)
    with pytest.raises(TypeError, match="key"):
        fn(0, x, q, dec, num_samples=2)
    with pytest.raises(TypeError, match="posterior"):
        fn(jax.random.key(0), x, (q.mean, q.logvar), dec, num_samples=2)
    with pytest.raises(ValueError, match="likelihood"):
        fn(jax.random.key(0), x, q, dec, num_samples=2, likelihood="poisson")


# ------------------------------------------------------------- in the VAE objective


@pytest.fixture(scope="module")
def small_vae_batch():
    from flax import nnx

    from kdvae import models

    model = models.VAE(encoder_widths=(16,), decoder_widths=(16,), latents=3, rngs=nnx.Rngs(0))
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    return model, {"images": jnp.asarray(images)}


@pytest.mark.parametrize(
    ("objective", "gradient"), [("elbo", "stl"), ("iwae", "dreg")], ids=["stl", "dreg"]
)
def test_objective_with_an_estimator_reports_the_same_metrics(objective, gradient, small_vae_batch):
    """Same key, same samples: the metrics (the true negative ELBO, the analytic KL) are
    the plain objective's; DReG's loss is too, and its decoder gradient; the encoder's
    gradient differs."""
    from flax import nnx

    from kdvae import vae

    model, batch = small_vae_batch
    key, context = jax.random.key(3), {"epoch": jnp.int32(0)}
    out = {}
    for g in ("reparameterized", gradient):
        loss_fn = vae.objective(objective=objective, k=4, gradient=g)
        grad_fn = nnx.value_and_grad(lambda m: loss_fn(m, batch, key, context), has_aux=True)
        (loss, metrics), grads = grad_fn(model)
        out[g] = loss, metrics, grads
    (loss0, metrics0, grads0), (loss1, metrics1, grads1) = out["reparameterized"], out[gradient]
    for name in ("neg_elbo", "kl", "reconstruction"):
        assert_close(metrics1[name], metrics0[name], rtol=1e-5, atol=1e-5)
    decoder = lambda g: np.asarray(g.logits.kernel[...])  # noqa: E731
    encoder = lambda g: np.asarray(g.mean.kernel[...])  # noqa: E731
    if gradient == "dreg":
        assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
        assert_close(decoder(grads1), decoder(grads0), rtol=1e-4, atol=1e-6)
    assert not np.allclose(encoder(grads1), encoder(grads0), rtol=1e-3)


def test_objective_refuses_an_estimator_of_the_other_bound():
    from kdvae import vae

    with pytest.raises(ValueError, match="'stl' is for objective 'elbo'"):
        vae.objective(objective="iwae", gradient="stl")
    with pytest.raises(ValueError, match="'dreg' is for objective 'iwae'"):
        vae.objective(objective="elbo", gradient="dreg")
    with pytest.raises(ValueError, match="free_bits"):
        vae.objective(gradient="stl", free_bits=0.5)
    with pytest.raises(ValueError, match="gradient must be one of"):
        vae.objective(gradient="vimco")


def test_example_flag_refuses_an_estimator_of_the_other_bound():
    from conftest import load_script

    from kdvae import config

    example = load_script("examples/vae_mnist.py")
    assert config.parse(example.Settings, ["--gradient", "stl"]).gradient == "stl"
    settings = config.parse(example.Settings, ["--objective", "iwae", "--gradient", "dreg"])
    assert settings.training()["gradient"] == "dreg"
    with pytest.raises(SystemExit):
        config.parse(example.Settings, ["--gradient", "dreg"])  # the ELBO has no DReG


# ------------------------------------------------------- evaluation with error bars


def test_importance_sampled_log_px_matches_a_float64_reference():
    params, x = mlp_params(62), vae_data(63)
    x = (x > 0.5).astype(np.float32)
    q, dec = mlp_posterior(params, x), mlp_decoder(params, "bernoulli")
    key, k = jax.random.key(6), 9
    est = losses.importance_sampled_log_px(key, x, q, dec, num_samples=k, chunk_size=4)
    assert_close(est.log_px, losses.iwae_bound(key, x, q, dec, num_samples=k), 1e-6, 1e-6)
    z = np.stack([np.asarray(q.sample(jax.random.fold_in(key, i)), np.float64) for i in range(k)])
    mean, var = np.asarray(q.mean, np.float64), np.exp(np.asarray(q.logvar, np.float64))
    log_w = (
        np_log_likelihood("bernoulli", np_mlp_decoder(params, z, "bernoulli"), x)
        + np_normal_logpdf(z, 0.0, 1.0).sum(-1)
        - np_normal_logpdf(z, mean, var).sum(-1)
    )  # [k, B]
    w = np.exp(log_w - log_w.max(0))
    w_tilde = w / w.sum(0)
    ess = 1.0 / np.sum(w_tilde**2, 0)
    weights = w / w.mean(0)  # sd(w) / mean(w) / sqrt(k), the delta method's
    se = weights.std(0) / np.sqrt(k)
    assert_close(est.ess, ess, rtol=1e-4, atol=1e-4)
    assert_close(est.standard_error, se, rtol=1e-3, atol=1e-5)
    assert np.all((1.0 <= np.asarray(est.ess)) & (np.asarray(est.ess) <= k))


def test_importance_sampling_standard_error_is_the_spread_over_keys(model):
    """The reported standard error (from one draw of k weights) matches the actual
    spread of the estimate over 400 independent draws, within 15 % (seen: median
    0.066 nats reported, 0.070 spread; mean ESS 69 of 100)."""
    mean, var = near(model, shift=0.5, widen=1.5)
    q = model.posterior(mean, var)
    x = jnp.asarray(model.x, jnp.float32)

    def one(key):
        est = losses.importance_sampled_log_px(
            key, x, q, model.decoder, num_samples=100, likelihood="gaussian"
        )
        return est.log_px[0], est.standard_error[0], est.ess[0]

    log_px, se, ess = (np.asarray(a, np.float64) for a in jax.jit(jax.vmap(one))(
        jax.random.split(jax.random.key(8), 400)))  # fmt: skip
    assert np.median(se) == pytest.approx(log_px.std(), rel=0.15)
    assert 1.0 < ess.mean() < 100.0
    # At the exact posterior every weight is p(x): full ESS, no error.
    exact = model.posterior(model.post_mean, model.post_var)
    est = losses.importance_sampled_log_px(
        jax.random.key(0), x, exact, model.decoder, num_samples=50, likelihood="gaussian"
    )
    assert_close(est.ess, 50.0, rtol=1e-3, atol=0)
    assert_close(est.standard_error, 0.0, rtol=0, atol=2e-3)


def test_mutual_information_matches_a_float64_reference_and_its_limits():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(50, 3)).astype(np.float32)
    logvar = rng.normal(-1.0, 0.3, size=(50, 3)).astype(np.float32)
    q, key = losses.DiagonalGaussian(mean, logvar), jax.random.key(9)
    mi = losses.aggregate_posterior_mutual_information(key, q)
    z = np.asarray(q.sample(key), np.float64)  # the same draws
    m64, v64 = mean.astype(np.float64), np.exp(logvar.astype(np.float64))
    cross = np_normal_logpdf(z[:, None, :], m64[None], v64[None]).sum(-1)  # [m, n]
    own = np.diag(cross)
    aggregate = np.log(np.mean(np.exp(cross - cross.max(1, keepdims=True)), 1)) + cross.max(1)
    assert_close(mi, np.mean(own - aggregate), rtol=1e-4, atol=1e-4)
    # A collapsed posterior (the same q for every x) carries nothing; posteriors far
    # apart and narrow carry which example it was: log N nats.
    collapsed = losses.DiagonalGaussian(
        np.zeros((50, 3), np.float32), np.zeros((50, 3), np.float32)
    )
    assert abs(float(losses.aggregate_posterior_mutual_information(key, collapsed))) < 1e-5
    apart = losses.DiagonalGaussian(100.0 * mean, np.full((50, 3), -6.0, np.float32))
    assert float(losses.aggregate_posterior_mutual_information(key, apart)) == pytest.approx(
        np.log(50), abs=1e-3
    )
    with pytest.raises(TypeError, match="posterior"):
        losses.aggregate_posterior_mutual_information(key, (mean, logvar))
