"""Tests of kdvae.models: shapes of every preset, dropout keys and the explicit
evaluation mode, max-norm, the convolution layer's parameters, the VAE's posterior and
log-variance bound, parameter counts. (The convolution and max-pool kernels are tested
in test_kernels.py.)"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdvae import losses, models


def _images(n: int, seed: int = 0, flat: bool = False) -> jax.Array:
    x = jax.random.uniform(jax.random.key(seed), (n, 28, 28, 1))
    return x.reshape(n, 784) if flat else x


# ------------------------------------------------------------------------ classifiers


@pytest.mark.parametrize("name", sorted(models.CLASSIFIER_PRESETS))
def test_classifier_presets_map_images_to_logits(name):
    # Shapes only (nnx.eval_shape: no compilation, no compute); the numbers are checked on
    # small models of each kind below.
    config = models.CLASSIFIER_PRESETS[name]
    model = nnx.eval_shape(lambda: models.make_classifier(config, rngs=nnx.Rngs(0)))
    for x in (jax.ShapeDtypeStruct((3, 28, 28, 1), jnp.float32),
              jax.ShapeDtypeStruct((3, 784), jnp.float32)):  # fmt: skip
        logits = nnx.eval_shape(lambda m, x: m(x, key=jax.random.key(0)), model, x)
        assert logits.shape == (3, config.num_classes) and logits.dtype == jnp.float32
    assert models.ClassifierConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "config",
    [
        models.ClassifierConfig("mlp", (16, 8), input_dropout=0.2, hidden_dropout=0.5, max_norm=3),
        models.ClassifierConfig("cnn", (4, 8), dense=16, hidden_dropout=0.5),
        models.ClassifierConfig("cnn", (4,), dense=16, num_classes=3),
    ],
    ids=["mlp", "cnn", "cnn-1-conv"],
)
def test_small_classifiers_are_finite_and_take_both_layouts(config):
    model = models.make_classifier(config, rngs=nnx.Rngs(0))
    square = _images(3)
    logits, from_flat = jax.jit(
        lambda m, x: (m(x, inference=True), m(x.reshape(3, 784), inference=True))
    )(model, square)
    assert logits.shape == (3, config.num_classes) and np.all(np.isfinite(logits))
    np.testing.assert_array_equal(from_flat, logits)  # the same images, the same logits


def test_unknown_classifier_kind():
    with pytest.raises(ValueError, match="'rnn'"):
        models.make_classifier(models.ClassifierConfig("rnn"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "config",
    [
        models.ClassifierConfig("mlp", (16, 8), input_dropout=0.2, hidden_dropout=0.5),
        models.ClassifierConfig("cnn", (4, 8), dense=16, hidden_dropout=0.5),
    ],
    ids=["mlp", "cnn"],
)
def test_dropout_acts_only_with_a_key_and_is_a_function_of_it(config):
    model = models.make_classifier(config, rngs=nnx.Rngs(0))
    x = _images(8)
    apply = jax.jit(lambda m, x, key: m(x, key=key))
    evaluate = jax.jit(lambda m, x, key: m(x, key=key, inference=True))
    evaluation = model(x, inference=True)
    np.testing.assert_array_equal(model(x, inference=True), evaluation)  # deterministic
    np.testing.assert_array_equal(evaluate(model, x, None), evaluation)
    np.testing.assert_array_equal(evaluate(model, x, jax.random.key(1)), evaluation)  # ignored
    a = apply(model, x, jax.random.key(1))
    np.testing.assert_array_equal(apply(model, x, jax.random.key(1)), a)  # same key, same
    b = apply(model, x, jax.random.key(2))
    assert not np.allclose(a, evaluation)  # dropout changed the output
    assert not np.allclose(a, b)  # and differently for another key


def test_a_model_without_dropout_ignores_the_key():
    model = models.MLPClassifier((16, 8), rngs=nnx.Rngs(0))  # like hinton_student
    x = _images(4)
    with_key, without = jax.jit(lambda m, x: (m(x, key=jax.random.key(3)), m(x)))(model, x)
    np.testing.assert_array_equal(with_key, without)
    # Rate 0 needs no key, in training as in evaluation.
    np.testing.assert_array_equal(model(x, inference=True), without)


@pytest.mark.parametrize(
    "config",
    [
        models.ClassifierConfig("mlp", (16, 8), input_dropout=0.2, hidden_dropout=0.5),
        models.ClassifierConfig("mlp", (16, 8), input_dropout=0.2),  # input dropout alone
        models.ClassifierConfig("cnn", (4, 8), dense=16, hidden_dropout=0.5),
    ],
    ids=["mlp", "mlp-input-only", "cnn"],
)
def test_training_without_a_key_is_an_error(config):
    model = models.make_classifier(config, rngs=nnx.Rngs(0))
    x = _images(2)
    for call in (lambda: model(x), lambda: jax.jit(lambda m, x: m(x))(model, x)):
        with pytest.raises(ValueError, match=r"needs a PRNG key.*key=.*inference=True"):
            call()


@pytest.mark.parametrize(
    "config",
    [
        models.ClassifierConfig("mlp", (16, 8), input_dropout=0.2, hidden_dropout=0.5),
        models.ClassifierConfig("cnn", (4, 8), dense=16, hidden_dropout=0.5),
    ],
    ids=["mlp", "cnn"],
)
def test_inference_is_the_deterministic_network(config):
    # The same parameters (dropout rates do not change the initialisation) without
    # dropout layers: inference=True computes exactly that network, key or no key.
    model = models.make_classifier(config, rngs=nnx.Rngs(0))
    plain_config = dataclasses.replace(config, input_dropout=0.0, hidden_dropout=0.0)
    plain = models.make_classifier(plain_config, rngs=nnx.Rngs(0))
    x = _images(6)

    @jax.jit
    def run(model, plain, x):
        key = jax.random.key(0)
        return model(x, inference=True), model(x, key=key, inference=True), plain(x)

    evaluation, with_key, deterministic = run(model, plain, x)
    np.testing.assert_array_equal(evaluation, deterministic)
    np.testing.assert_array_equal(with_key, deterministic)


def test_dropout_function_needs_a_key_only_in_training_at_a_nonzero_rate():
    x, key = jnp.ones((4, 5)), jax.random.key(0)
    with pytest.raises(ValueError, match="key"):
        models.dropout(None, x, 0.5)
    assert models.dropout(None, x, 0.5, inference=True) is x
    assert models.dropout(key, x, 0.5, inference=True) is x
    assert models.dropout(None, x, 0.0) is x
    assert not np.array_equal(models.dropout(key, x, 0.5), x)


def _column_norms(kernel: jax.Array) -> np.ndarray:
    return np.linalg.norm(np.asarray(kernel, np.float64), axis=0)


def test_max_norm_constrain_caps_every_incoming_weight_vector():
    limit = 3.5
    model = models.MLPClassifier((32, 16), max_norm=limit, rngs=nnx.Rngs(0))
    # Blow up half of each kernel's columns; leave the rest (all below the limit) as is.
    before = []
    for layer in model.layers:
        kernel = np.asarray(layer.kernel[...])
        scale = np.where(np.arange(kernel.shape[1]) % 2 == 0, 100.0, 1.0)
        layer.kernel[...] = jnp.asarray(kernel * scale)
        before.append(np.asarray(layer.kernel[...]))
    assert max(_column_norms(k).max() for k in before) > 10 * limit

    model.constrain()
    for layer, old in zip(model.layers, before, strict=True):
        norms_old, new = _column_norms(old), np.asarray(layer.kernel[...])
        norms = _column_norms(new)
        assert np.all(norms <= limit * (1 + 1e-6)), norms.max()
        big = norms_old > limit
        assert big.any() and (~big).any()
        np.testing.assert_allclose(norms[big], limit, rtol=1e-5)  # scaled onto the sphere
        np.testing.assert_array_equal(new[:, ~big], old[:, ~big])  # the others untouched
        # A projection: each column keeps its direction.
        np.testing.assert_allclose(new[:, big] * (norms_old[big] / norms[big]), old[:, big],
                                   rtol=1e-4)  # fmt: skip


def test_constrain_without_max_norm_changes_nothing():
    model = models.MLPClassifier((8,), rngs=nnx.Rngs(0))
    before = [np.asarray(layer.kernel[...]) * 100 for layer in model.layers]
    for layer, kernel in zip(model.layers, before, strict=True):
        layer.kernel[...] = jnp.asarray(kernel)
    model.constrain()
    for layer, kernel in zip(model.layers, before, strict=True):
        np.testing.assert_array_equal(layer.kernel[...], kernel)


def _reference_pool(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@pytest.mark.parametrize("kernel_size, features_in", [(3, 1), (3, 32), (5, 2)])
def test_conv_kernel_is_hwio_and_initialised_as_the_flat_layout_was(kernel_size, features_in):
    # Before the HWIO layout the kernel was [k * k * in, out], drawn by the same
    # initializer from the same key: lecun_normal's fan-in is k * k * in for both shapes,
    # and threefry's draw i is a function of the flat index i, so the numbers are the
    # same, reshaped.
    conv = models.Conv(features_in, 6, kernel_size=kernel_size, rngs=nnx.Rngs(3))
    fan_in = kernel_size * kernel_size * features_in
    flat = nnx.initializers.lecun_normal()(nnx.Rngs(3).params(), (fan_in, 6))
    assert conv.kernel.shape == (kernel_size, kernel_size, features_in, 6)
    assert conv.bias.shape == (6,) and not conv.bias[...].any()
    np.testing.assert_array_equal(conv.kernel[...].reshape(fan_in, 6), flat)


def test_conv_with_max_pool_is_pool_of_the_conv():
    conv = models.Conv(2, 4, rngs=nnx.Rngs(0))
    conv.bias[...] = jax.random.normal(jax.random.key(1), (4,))
    x = jax.random.normal(jax.random.key(2), (2, 8, 6, 2))
    np.testing.assert_allclose(conv(x, max_pool=True), _reference_pool(conv(x)), rtol=1e-6)


# ------------------------------------------------------------------------------ VAE


@pytest.mark.parametrize("name", sorted(models.VAE_PRESETS))
def test_vae_presets_shapes(name):
    config = models.VAE_PRESETS[name]
    vae = nnx.eval_shape(lambda: models.make_vae(config, rngs=nnx.Rngs(0)))
    assert vae.latents == config.latents
    for x in (jax.ShapeDtypeStruct((3, 28, 28, 1), jnp.float32),
              jax.ShapeDtypeStruct((3, 784), jnp.float32)):  # fmt: skip
        posterior = nnx.eval_shape(lambda m, x: m.encode(x), vae, x)
        assert isinstance(posterior, losses.DiagonalGaussian)
        assert posterior.mean.shape == posterior.logvar.shape == (3, config.latents)
    for z_shape in ((3, config.latents), (4, 3, config.latents)):  # [B, L] and [k, B, L]
        z = jax.ShapeDtypeStruct(z_shape, jnp.float32)
        logits = nnx.eval_shape(lambda m, z: m.decode(z), vae, z)
        assert logits.shape == (*z_shape[:-1], 784) and logits.dtype == jnp.float32


def test_small_vae_runs():
    vae = models.VAE(encoder_widths=(16,), decoder_widths=(8, 8), latents=3, activation="tanh",
                     rngs=nnx.Rngs(0))  # fmt: skip

    @jax.jit
    def run(vae, x):
        posterior = vae.encode(x)
        mean, logvar = posterior.mean, posterior.logvar
        return mean, logvar, vae.encode(x.reshape(3, 784)).mean, vae.decode(mean)

    mean, logvar, mean_flat, logits = run(vae, _images(3))
    assert mean.shape == logvar.shape == (3, 3) and logits.shape == (3, 784)
    np.testing.assert_array_equal(mean_flat, mean)
    assert all(np.all(np.isfinite(a)) for a in (mean, logvar, logits))


def test_gaussian_vae_decodes_a_mean_and_a_variance_per_pixel():
    learned = models.VAE(encoder_widths=(16,), decoder_widths=(8,), latents=3,
                         likelihood="gaussian", rngs=nnx.Rngs(0))  # fmt: skip
    fixed = models.VAE(encoder_widths=(16,), decoder_widths=(8,), latents=3,
                       likelihood="gaussian", decoder_logvar=-3.0, rngs=nnx.Rngs(0))  # fmt: skip
    z = jax.random.normal(jax.random.key(0), (4, 5, 3))  # [k, B, L]
    mean, logvar = learned.decode(z)
    assert mean.shape == logvar.shape == (4, 5, 784)
    assert np.all(np.abs(np.asarray(logvar)) <= learned.logvar_bound)
    assert not np.allclose(logvar[0, 0], logvar[0, 1])  # decoded from z, per example
    mean_fixed, logvar_fixed = fixed.decode(z)
    assert mean_fixed.shape == (4, 5, 784) and float(logvar_fixed) == -3.0
    assert models.count_params(learned) == models.count_params(fixed) + 8 * 784 + 784
    image = np.asarray(learned.mean_image(z))
    assert image.shape == (4, 5, 784) and image.min() >= 0.0 and image.max() <= 1.0
    # Through the bounds: a Gaussian decoder with likelihood="gaussian".
    x = jax.random.uniform(jax.random.key(1), (5, 784))
    terms = losses.elbo(jax.random.key(2), x, learned.encode(x), learned.decode,
                        likelihood="gaussian")  # fmt: skip
    assert terms.elbo.shape == (5,) and np.all(np.isfinite(terms.elbo))
    with pytest.raises(ValueError, match="likelihood must be"):
        models.VAE(likelihood="poisson", rngs=nnx.Rngs(0))


def test_vae_logvar_stays_within_its_bound_for_huge_inputs():
    vae = models.VAE(encoder_widths=(16,), decoder_widths=(16,), latents=4, rngs=nnx.Rngs(0))
    vae.logvar.kernel[...] = vae.logvar.kernel[...] * 1e3
    x = _images(6, flat=True) * 1e6
    x = x.at[:3].multiply(-1.0)

    @jax.jit
    def run(vae, x, small):
        raw_small = vae.logvar(vae.encoder(small))  # the unbounded output
        posterior = vae.encode(x)
        return posterior.mean, posterior.logvar, vae.encode(small).logvar, raw_small

    mean, logvar, logvar_small, raw_small = run(vae, x, _images(2, flat=True) * 1e-4)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(logvar))
    assert np.all(np.abs(logvar) <= vae.logvar_bound)
    assert np.abs(logvar).max() > 0.99 * vae.logvar_bound  # the bound is what held it
    assert np.all(np.isfinite(np.exp(0.5 * np.asarray(logvar))))
    # Near zero the bound is the identity: b * tanh(r / b) ~ r.
    np.testing.assert_allclose(logvar_small, raw_small, rtol=1e-4, atol=1e-6)


def test_vae_encode_returns_the_posterior_value_the_bounds_take():
    vae = models.VAE(encoder_widths=(16,), decoder_widths=(16,), latents=3, rngs=nnx.Rngs(0))
    x = (_images(4, flat=True) > 0.5).astype(jnp.float32)

    @jax.jit
    def run(vae, x):
        posterior = vae.encode(x)
        terms = losses.elbo(jax.random.key(0), x, posterior, vae.decode)
        return posterior, terms

    posterior, terms = run(vae, x)  # the value comes out of jit as it went in
    assert isinstance(posterior, losses.DiagonalGaussian)
    h = vae.encoder(x)
    np.testing.assert_array_equal(posterior.mean, vae.mean(h))
    np.testing.assert_allclose(terms.kl, posterior.kl_to_standard_normal(), rtol=1e-6)
    assert terms.elbo.shape == (4,) and np.all(np.isfinite(terms.elbo))


def test_vae_rejects_an_unknown_activation():
    with pytest.raises(ValueError, match="'swish'"):
        models.VAE(activation="swish", rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------ counting


def test_count_params():
    mlp = models.MLPClassifier((5,), rngs=nnx.Rngs(0))
    assert models.count_params(mlp) == (784 * 5 + 5) + (5 * 10 + 10)
    cnn = nnx.eval_shape(lambda: models.CNNClassifier((4, 8), 16, rngs=nnx.Rngs(0)))
    convs = (9 * 1 * 4 + 4) + (9 * 4 * 8 + 8)
    assert models.count_params(cnn) == convs + (7 * 7 * 8 * 16 + 16) + (16 * 10 + 10)
    vae = nnx.eval_shape(
        lambda: models.VAE(encoder_widths=(7,), decoder_widths=(9,), latents=3, rngs=nnx.Rngs(0))
    )
    expected = (784 * 7 + 7) + 2 * (7 * 3 + 3) + (3 * 9 + 9) + (9 * 784 + 784)
    assert models.count_params(vae) == expected


def test_count_params_of_the_presets():
    # The parameter counts of Hinton et al.'s nets (and our CNN); shapes only.
    def count(make, config):
        return models.count_params(nnx.eval_shape(lambda: make(config, rngs=nnx.Rngs(0))))

    presets = models.CLASSIFIER_PRESETS
    student = count(models.make_classifier, presets["hinton_student"])
    assert student == (784 * 800 + 800) + (800 * 800 + 800) + (800 * 10 + 10) == 1_276_810
    teacher = count(models.make_classifier, presets["hinton_teacher"])
    assert teacher == (784 * 1200 + 1200) + (1200 * 1200 + 1200) + (1200 * 10 + 10)
    cnn = count(models.make_classifier, presets["cnn_teacher"])
    assert cnn == (9 * 32 + 32) + (9 * 32 * 64 + 64) + (7 * 7 * 64 * 128 + 128) + (128 * 10 + 10)
    flax_vae = count(models.make_vae, models.VAE_PRESETS["flax"])
    assert flax_vae == (784 * 500 + 500) + 2 * (500 * 20 + 20) + (20 * 500 + 500) + (
        500 * 784 + 784
    )
