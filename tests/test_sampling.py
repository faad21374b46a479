"""kdvae.sampling gives jax.random's exact values (bits, uniforms, Bernoulli draws)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdvae import models, sampling

SHAPES = [(), (0,), (7,), (3, 5, 11), (64, 784)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 2**31 + 5])
def test_random_bits_equal_jax_random_bits(shape, seed):
    key = jax.random.fold_in(jax.random.key(seed), 3)
    ours = jax.jit(sampling.random_bits, static_argnums=1)(key, shape)
    assert ours.dtype == jnp.uint32 and ours.shape == shape
    np.testing.assert_array_equal(ours, jax.random.bits(key, shape, jnp.uint32))


@pytest.mark.parametrize("shape", SHAPES)
def test_uniform_and_bernoulli_equal_jax_random(shape):
    key = jax.random.key(11)
    np.testing.assert_array_equal(sampling.uniform(key, shape), jax.random.uniform(key, shape))
    p = jax.random.uniform(jax.random.key(12), shape)
    np.testing.assert_array_equal(sampling.bernoulli(key, p), jax.random.bernoulli(key, p))
    np.testing.assert_array_equal(
        sampling.bernoulli(key, 0.8, shape), jax.random.bernoulli(key, 0.8, shape)
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_normal_and_ranged_uniform_equal_jax_random_under_jit(shape):
    key = jax.random.key(21)
    np.testing.assert_array_equal(
        jax.jit(lambda k: sampling.normal(k, shape))(key),
        jax.jit(lambda k: jax.random.normal(k, shape))(key),
    )
    np.testing.assert_array_equal(
        jax.jit(lambda k: sampling.uniform(k, shape, -2.0, 3.0))(key),
        jax.jit(lambda k: jax.random.uniform(k, shape, minval=-2.0, maxval=3.0))(key),
    )


def test_normal_of_another_dtype_is_jax_random_normal():
    key = jax.random.key(2)
    for dtype in (jnp.bfloat16, jnp.float16):
        ours = sampling.normal(key, (4, 5), dtype)
        assert ours.dtype == dtype
        np.testing.assert_array_equal(ours, jax.random.normal(key, (4, 5), dtype))


def test_bernoulli_broadcasts_p_over_shape():
    key = jax.random.key(1)
    p = jnp.array([0.0, 0.3, 1.0])
    draws = sampling.bernoulli(key, p, (4000, 3))
    np.testing.assert_array_equal(draws, jax.random.bernoulli(key, p, (4000, 3)))
    assert not draws[:, 0].any() and draws[:, 2].all()
    assert abs(draws[:, 1].mean() - 0.3) < 5 * np.sqrt(0.3 * 0.7 / 4000)


def test_other_key_kinds_fall_back_to_jax_random():
    for key in (jax.random.key(0, impl="rbg"), jax.random.PRNGKey(0)):
        np.testing.assert_array_equal(
            sampling.random_bits(key, (5, 3)), jax.random.bits(key, (5, 3), jnp.uint32)
        )
    with jax.threefry_partitionable(False):
        key = jax.random.key(0)
        np.testing.assert_array_equal(
            sampling.random_bits(key, (5, 3)), jax.random.bits(key, (5, 3), jnp.uint32)
        )


def test_dropout_mask_is_jax_bernoulli_and_keeps_the_mean():
    key = jax.random.key(5)
    x = jnp.ones((200, 500))
    for rate in (0.2, 0.5):
        y = models.dropout(key, x, rate)
        keep = jax.random.bernoulli(key, 1 - rate, x.shape)
        np.testing.assert_array_equal(y != 0, keep)
        np.testing.assert_allclose(y[keep], 1 / (1 - rate), rtol=1e-6)
        assert abs(float(y.mean()) - 1.0) < 5 * np.sqrt(rate / (1 - rate) / x.size)
    assert models.dropout(None, x, 0.5, inference=True) is x
    assert models.dropout(key, x, 0.0) is x


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_dropout_rate_outside_zero_one_is_refused(rate):
    with pytest.raises(ValueError, match=r"hidden_dropout must be in \[0, 1\)"):
        models.MLPClassifier((8,), hidden_dropout=rate, rngs=nnx.Rngs(0))


def test_the_fast_path_is_taken_for_threefry_keys():
    # The equality tests above would also pass if everything fell back to jax.random;
    # this one fails then: the fast path binds no random_bits primitive (JAX's, lowered
    # as the rolled threefry loop).
    key = jax.random.key(0)
    for fn in (
        lambda k: sampling.random_bits(k, (8,)),
        lambda k: sampling.bernoulli(k, 0.8, (8,)),
        lambda k: sampling.normal(k, (8,)),
    ):
        assert "random_bits[" not in str(jax.make_jaxpr(fn)(key))
    assert "random_bits[" in str(jax.make_jaxpr(lambda k: jax.random.bits(k, (8,)))(key))


def test_bernoulli_of_other_dtypes_is_jax_random_bernoulli():
    key = jax.random.key(4)
    p = jnp.full((50,), 0.3, jnp.bfloat16)
    np.testing.assert_array_equal(sampling.bernoulli(key, p), jax.random.bernoulli(key, p))
    with pytest.raises(TypeError):
        sampling.bernoulli(key, jnp.ones(3, jnp.int32))
