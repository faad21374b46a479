"""kdvae.kernels: the CPU kernels give jax.random's exact values, XLA's convolution and
max-pool (values and gradients); the switch takes the standard ops off the CPU; a CNN's
logits and state are the same on both paths.

Each function is traced afresh (a new ``lambda``) inside ``kernels.forced_backend``:
``jax.jit`` caches traces by function, and the switch is read when tracing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from kdvae import kernels, models

PATHS = ["cpu", "gpu"]  # the CPU kernels; the standard ops (any backend but the CPU)
SHAPES = [(), (0,), (7,), (3, 5, 11), (64, 784)]


@pytest.fixture
def cpu_kernels():
    with kernels.forced_backend("cpu"):
        yield


def _on(path, fn, *args):
    """``fn(*args)`` traced under ``jax.jit`` with ``path``'s functions."""
    with kernels.forced_backend(path):
        return jax.jit(lambda *a: fn(*a))(*args)


# ------------------------------------------------------------------------- the switch


def test_the_switch_reads_the_default_backend_unless_forced():
    assert kernels.cpu_kernels_enabled() == (jax.default_backend() == "cpu")
    with kernels.forced_backend("gpu"):
        assert not kernels.cpu_kernels_enabled()
        with kernels.forced_backend("cpu"):
            assert kernels.cpu_kernels_enabled()
        assert not kernels.cpu_kernels_enabled()
    with pytest.raises(RuntimeError), kernels.forced_backend("tpu"):
        assert not kernels.cpu_kernels_enabled()
        raise RuntimeError  # the block is left by an exception: the choice is reset
    assert kernels.cpu_kernels_enabled() == (jax.default_backend() == "cpu")


def _jaxpr(path, fn, *args) -> str:
    with kernels.forced_backend(path):
        return str(jax.make_jaxpr(jax.jit(lambda *a: fn(*a)))(*args))


def test_off_the_cpu_the_standard_ops_are_traced():
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    conv = _jaxpr("gpu", kernels.conv2d_same, x, w)
    assert "conv_general_dilated" in conv and "custom_vjp_call" not in conv
    pool = _jaxpr("gpu", kernels.max_pool_2x2, x)
    assert "reduce_max" in pool and "custom_jvp_call" not in pool
    key = jax.random.key(0)
    for fn in (
        lambda k: kernels.random_bits(k, (8,)),
        lambda k: kernels.uniform(k, (8,)),
        lambda k: kernels.normal(k, (8,)),
        lambda k: kernels.bernoulli(k, 0.8, (8,)),
    ):
        assert "random_bits[" in _jaxpr("gpu", fn, key)


def test_on_the_cpu_the_kernels_are_traced():
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    conv = _jaxpr("cpu", kernels.conv2d_same, x, w)
    assert "custom_vjp_call" in conv and "conv_general_dilated" not in conv
    assert "custom_jvp_call" in _jaxpr("cpu", kernels.max_pool_2x2, x)


# ------------------------------------------------------------------------ random draws


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 2**31 + 5])
def test_random_bits_equal_jax_random_bits(shape, seed):
    key = jax.random.fold_in(jax.random.key(seed), 3)
    ours = jax.jit(kernels.random_bits, static_argnums=1)(key, shape)
    assert ours.dtype == jnp.uint32 and ours.shape == shape
    np.testing.assert_array_equal(ours, jax.random.bits(key, shape, jnp.uint32))


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("shape", SHAPES)
def test_uniform_and_bernoulli_equal_jax_random(shape):
    key = jax.random.key(11)
    np.testing.assert_array_equal(kernels.uniform(key, shape), jax.random.uniform(key, shape))
    p = jax.random.uniform(jax.random.key(12), shape)
    np.testing.assert_array_equal(kernels.bernoulli(key, p), jax.random.bernoulli(key, p))
    np.testing.assert_array_equal(
        kernels.bernoulli(key, 0.8, shape), jax.random.bernoulli(key, 0.8, shape)
    )


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("shape", SHAPES)
def test_normal_and_ranged_uniform_equal_jax_random_under_jit(shape):
    key = jax.random.key(21)
    np.testing.assert_array_equal(
        jax.jit(lambda k: kernels.normal(k, shape))(key),
        jax.jit(lambda k: jax.random.normal(k, shape))(key),
    )
    np.testing.assert_array_equal(
        jax.jit(lambda k: kernels.uniform(k, shape, -2.0, 3.0))(key),
        jax.jit(lambda k: jax.random.uniform(k, shape, minval=-2.0, maxval=3.0))(key),
    )


@pytest.mark.parametrize("shape", [(3, 5, 11), (64, 784)])
def test_both_paths_draw_the_same_bits(shape):
    key = jax.random.key(8)
    p = jax.random.uniform(jax.random.key(9), shape)
    for fn in (
        lambda k: kernels.random_bits(k, shape),
        lambda k: kernels.uniform(k, shape, -2.0, 3.0),
        lambda k: kernels.normal(k, shape),
        lambda k: kernels.bernoulli(k, 0.8, shape),
        lambda k: kernels.bernoulli(k, p),
    ):
        cpu, standard = (_on(path, fn, key) for path in PATHS)
        assert cpu.dtype == standard.dtype and cpu.shape == standard.shape
        np.testing.assert_array_equal(cpu, standard)


@pytest.mark.usefixtures("cpu_kernels")
def test_normal_of_another_dtype_is_jax_random_normal():
    key = jax.random.key(2)
    for dtype in (jnp.bfloat16, jnp.float16):
        ours = kernels.normal(key, (4, 5), dtype)
        assert ours.dtype == dtype
        np.testing.assert_array_equal(ours, jax.random.normal(key, (4, 5), dtype))


@pytest.mark.usefixtures("cpu_kernels")
def test_bernoulli_broadcasts_p_over_shape():
    key = jax.random.key(1)
    p = jnp.array([0.0, 0.3, 1.0])
    draws = kernels.bernoulli(key, p, (4000, 3))
    np.testing.assert_array_equal(draws, jax.random.bernoulli(key, p, (4000, 3)))
    assert not draws[:, 0].any() and draws[:, 2].all()
    assert abs(draws[:, 1].mean() - 0.3) < 5 * np.sqrt(0.3 * 0.7 / 4000)


@pytest.mark.usefixtures("cpu_kernels")
def test_other_key_kinds_fall_back_to_jax_random():
    for key in (jax.random.key(0, impl="rbg"), jax.random.PRNGKey(0)):
        np.testing.assert_array_equal(
            kernels.random_bits(key, (5, 3)), jax.random.bits(key, (5, 3), jnp.uint32)
        )
    with jax.threefry_partitionable(False):
        key = jax.random.key(0)
        np.testing.assert_array_equal(
            kernels.random_bits(key, (5, 3)), jax.random.bits(key, (5, 3), jnp.uint32)
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


@pytest.mark.usefixtures("cpu_kernels")
def test_the_fast_path_is_taken_for_threefry_keys():
    # The equality tests above would also pass if everything fell back to jax.random;
    # this one fails then: the fast path binds no random_bits primitive (JAX's, lowered
    # as the rolled threefry loop).
    key = jax.random.key(0)
    for fn in (
        lambda k: kernels.random_bits(k, (8,)),
        lambda k: kernels.bernoulli(k, 0.8, (8,)),
        lambda k: kernels.normal(k, (8,)),
    ):
        assert "random_bits[" not in str(jax.make_jaxpr(fn)(key))
    assert "random_bits[" in str(jax.make_jaxpr(lambda k: jax.random.bits(k, (8,)))(key))


@pytest.mark.usefixtures("cpu_kernels")
def test_bernoulli_of_other_dtypes_is_jax_random_bernoulli():
    key = jax.random.key(4)
    p = jnp.full((50,), 0.3, jnp.bfloat16)
    np.testing.assert_array_equal(kernels.bernoulli(key, p), jax.random.bernoulli(key, p))
    with pytest.raises(TypeError):
        kernels.bernoulli(key, jnp.ones(3, jnp.int32))


# ------------------------------------------------------------------------- convolution


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("kernel_size, features_in", [(3, 1), (3, 4), (5, 2), (2, 3)])
def test_im2col_conv_equals_xla_same_convolution(kernel_size, features_in):
    conv = models.Conv(features_in, 6, kernel_size=kernel_size, rngs=nnx.Rngs(0))
    conv.bias[...] = jax.random.normal(jax.random.key(1), (6,))
    x = jax.random.normal(jax.random.key(2), (2, 12, 10, features_in))
    got = jax.jit(lambda c, x: c(x))(conv, x)
    assert conv.kernel.shape == (kernel_size, kernel_size, features_in, 6)  # HWIO
    want = jax.lax.conv_general_dilated(
        x, conv.kernel[...], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    ) + conv.bias[...]  # fmt: skip
    assert got.shape == (2, 12, 10, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# batch, height, width, in, out, kernel size
CONV_SHAPES = [(2, 12, 10, 1, 6, 3), (3, 7, 9, 4, 3, 3), (2, 8, 8, 2, 5, 5), (1, 6, 5, 7, 2, 5)]


@pytest.mark.parametrize("b, h, w, c, o, k", CONV_SHAPES)
def test_conv_paths_agree_in_value_and_gradient(b, h, w, c, o, k):
    # float32; the two paths sum the same products in another order: entries of x, the
    # kernel and dy are O(1), a forward output sums k*k*C products, dkernel B*H*W.
    keys = jax.random.split(jax.random.key(k * c + o), 3)
    x = jax.random.normal(keys[0], (b, h, w, c))
    kernel = jax.random.normal(keys[1], (k, k, c, o))
    dy = jax.random.normal(keys[2], (b, h, w, o))

    def value_and_vjp(x, kernel):
        y, vjp = jax.vjp(kernels.conv2d_same, x, kernel)
        return y, *vjp(dy)

    cpu, standard = (_on(path, value_and_vjp, x, kernel) for path in PATHS)
    for ours, theirs in zip(cpu, standard, strict=True):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels", [1, 3])  # one input channel has its own CPU kernel
def test_conv_gradients_check_numerically(path, channels):
    with jax.enable_x64(True), kernels.forced_backend(path):
        x = jax.random.normal(jax.random.key(0), (2, 5, 4, channels), jnp.float64)
        kernel = jax.random.normal(jax.random.key(1), (3, 3, channels, 2), jnp.float64)
        # A custom VJP has no forward mode: the CPU kernel is checked in reverse only.
        modes = ["rev"] if path == "cpu" else ["fwd", "rev"]
        check_grads(kernels.conv2d_same, (x, kernel), order=1, modes=modes)


def test_conv_refuses_mismatched_channels():
    with pytest.raises(ValueError, match=r"x \[B, H, W, 3\] for kernel \(3, 3, 3, 2\)"):
        kernels.conv2d_same(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 3, 2)))


# ---------------------------------------------------------------------------- max-pool


def _reference_pool(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@pytest.mark.usefixtures("cpu_kernels")
def test_max_pool_equals_the_plain_max_and_its_gradient_without_ties():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (2, 6, 4, 3), jnp.float64)
        np.testing.assert_array_equal(kernels.max_pool_2x2(x), _reference_pool(x))
        dy = jax.random.normal(jax.random.key(1), (2, 3, 2, 3), jnp.float64)
        got = jax.vjp(kernels.max_pool_2x2, x)[1](dy)[0]
        want = jax.vjp(_reference_pool, x)[1](dy)[0]
        np.testing.assert_array_equal(got, want)
        check_grads(kernels.max_pool_2x2, (x,), order=1, modes=["fwd", "rev"])


@pytest.mark.parametrize("path", PATHS)
def test_max_pool_paths_agree_without_ties(path):
    x = jax.random.normal(jax.random.key(3), (4, 14, 10, 8))  # no ties
    dy = jax.random.normal(jax.random.key(4), (4, 7, 5, 8))

    def value_vjp_and_jvp(pool, x):
        y, vjp = jax.vjp(pool, x)
        return y, vjp(dy)[0], jax.jvp(pool, (x,), (dy.repeat(2, 1).repeat(2, 2),))[1]

    got = _on(path, lambda x: value_vjp_and_jvp(kernels.max_pool_2x2, x), x)
    for ours, want in zip(got, value_vjp_and_jvp(_reference_pool, x), strict=True):
        np.testing.assert_array_equal(ours, want)
    with jax.enable_x64(True), kernels.forced_backend(path):
        x64 = jnp.asarray(x[:1, :4, :4], jnp.float64)
        check_grads(kernels.max_pool_2x2, (x64,), order=1, modes=["fwd", "rev"])


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize(
    "window, winner",
    [([[1, 1], [1, 1]], (0, 0)), ([[0, 2], [2, 2]], (0, 1)), ([[0, 1], [2, 2]], (1, 0)),
     ([[0, 1], [1, 2]], (1, 1)), ([[-3, -3], [-5, -3]], (0, 0))],
)  # fmt: skip
def test_max_pool_gradient_goes_to_the_first_maximum(window, winner):
    x = jnp.asarray(window, jnp.float32).reshape(1, 2, 2, 1)
    grad = jax.grad(lambda x: 5.0 * kernels.max_pool_2x2(x).sum())(x).reshape(2, 2)
    want = np.zeros((2, 2))
    want[winner] = 5.0
    np.testing.assert_array_equal(grad, want)


def test_with_ties_the_standard_max_pool_splits_the_gradient():
    # The one place the paths differ: the CPU kernel routes to the first maximum (above).
    x = jnp.asarray([[0, 2], [2, 2]], jnp.float32).reshape(1, 2, 2, 1)
    grad = _on("gpu", jax.grad(lambda x: 6.0 * kernels.max_pool_2x2(x).sum()), x)
    np.testing.assert_array_equal(grad.reshape(2, 2), [[0, 2], [2, 2]])


@pytest.mark.parametrize("path", PATHS)
def test_max_pool_refuses_an_odd_size(path):
    with kernels.forced_backend(path):
        with pytest.raises(ValueError, match="even height and width, got 7x6"):
            kernels.max_pool_2x2(jnp.zeros((1, 7, 6, 2)))


# -------------------------------------------------------------------- a CNN, both ways


def test_a_cnn_has_one_state_and_the_same_logits_on_both_paths():
    config = models.ClassifierConfig("cnn", (4, 8), dense=16, hidden_dropout=0.5)
    shapes = []
    for path in PATHS:
        with kernels.forced_backend(path):
            model = nnx.eval_shape(lambda: models.make_classifier(config, rngs=nnx.Rngs(0)))
        shapes.append(jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(model)))
    assert shapes[0] == shapes[1]  # a checkpoint written on one path loads on the other

    model = models.make_classifier(config, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))

    def logits_and_grads(model, x):
        def loss(model):
            logits = model(x, key=jax.random.key(2))  # dropout: the same mask on both paths
            return jnp.sum(logits * jnp.arange(10.0)), logits

        return nnx.grad(loss, has_aux=True)(model)

    (grads_cpu, cpu), (grads_std, standard) = (_on(p, logits_and_grads, model, x) for p in PATHS)
    np.testing.assert_allclose(cpu, standard, rtol=1e-5, atol=1e-5)
    evaluate = _on("gpu", lambda m, x: m(x, inference=True), model, x)
    np.testing.assert_allclose(model(x, inference=True), evaluate, atol=1e-5)
    for ours, theirs in zip(jax.tree.leaves(grads_cpu), jax.tree.leaves(grads_std), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
