"""Mixed precision: ``dtype=bfloat16`` computes activations and matrix multiplies in
bfloat16, while parameters, gradients, the optimizer and the loss math stay float32."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import class_patterns, load_script
from flax import nnx

from kdvae import config, distill, losses, models, train, vae
from kdvae import data as kdata

pytestmark = pytest.mark.usefixtures("compilation_cache")

CLASSIFIERS = ("cnn_teacher", "hinton_student", "hinton_teacher")
# bfloat16 keeps 8 significant bits (a relative step of 2^-8 = 0.4 %). Seen on these
# inputs: the losses agree to 4e-5 relative, the logits to 6e-3 absolute, and the
# gradients' cosine similarity is 0.9996 (CNN) to 0.99998 (VAE).
LOSS_RTOL, LOGIT_ATOL, GRADIENT_COSINE = 2e-3, 3e-2, 0.999


@pytest.fixture(scope="module")
def batch():
    images, labels = class_patterns(64, seed=3)
    return kdata.to_unit_float(images), jnp.asarray(labels)


def classifier(preset: str, dtype: str):
    return distill.make_classifier(preset, seed=0, stage=0, dtype=dtype)


def vae_model(dtype: str):
    key = jax.random.key(0)
    return models.build(
        lambda rngs: models.make_vae(models.VAE_PRESETS["flax"], dtype=dtype, rngs=rngs), key
    )


def cross_entropy(model, x, y):
    logits = model(x, inference=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def negative_elbo(model, x, _):
    binary = (x.reshape(x.shape[0], -1) > 0.5).astype(jnp.float32)
    return -jnp.mean(losses.elbo(jax.random.key(1), binary, model.encode(x), model.decode).elbo)


def dtypes_of(tree) -> set[str]:
    return {str(leaf.dtype) for leaf in jax.tree.leaves(tree)}


def matmul_dtypes(fn, *args) -> set[str]:
    """The result dtypes of every matrix multiply and convolution ``jax.jit(fn)`` runs."""
    text = jax.jit(fn).lower(*args).as_text()
    result = r"->\s*tensor<(?:[\d?]+x)*(\w+)>"
    ops = re.findall(r"stablehlo\.(?:dot_general|convolution).*?" + result, text)
    assert ops, "no matrix multiply found"
    return set(ops)


CASES = [*((p, cross_entropy) for p in CLASSIFIERS), ("vae", negative_elbo)]


def build(name: str, dtype: str):
    return vae_model(dtype) if name == "vae" else classifier(name, dtype)


@pytest.mark.parametrize(("name", "loss"), CASES, ids=[c[0] for c in CASES])
def test_bfloat16_computes_in_bfloat16_and_keeps_float32_parameters_and_outputs(name, loss, batch):
    x, y = batch
    model = build(name, "bfloat16")
    graphdef, params = nnx.split(model)
    assert dtypes_of(params) == {"float32"}
    assert matmul_dtypes(lambda p: loss(nnx.merge(graphdef, p), x, y), params) == {"bf16"}
    grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p), x, y))(params)
    assert dtypes_of(grads) == {"float32"}
    if name == "vae":
        posterior = model.encode(x)
        outputs = [posterior.mean, posterior.logvar, model.decode(posterior.mean)]
    else:
        outputs = [model(x, inference=True)]
    assert dtypes_of(outputs) == {"float32"}
    # The float32 model is unchanged: float32 throughout.
    graphdef32, params32 = nnx.split(build(name, "float32"))
    assert matmul_dtypes(lambda p: loss(nnx.merge(graphdef32, p), x, y), params32) == {"f32"}


@pytest.mark.parametrize(("name", "loss"), CASES, ids=[c[0] for c in CASES])
def test_bfloat16_loss_and_gradient_match_float32(name, loss, batch):
    """Same initialisation in both dtypes: same loss, logits and gradient direction to
    bfloat16's precision."""
    x, y = batch
    values, grads = {}, {}
    for dtype in ("float32", "bfloat16"):
        graphdef, params = nnx.split(build(name, dtype))
        values[dtype], g = jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p), x, y))(params)
        grads[dtype] = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(g)])
    np.testing.assert_allclose(values["bfloat16"], values["float32"], rtol=LOSS_RTOL)
    a, b = grads["float32"], grads["bfloat16"]
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > GRADIENT_COSINE
    if name != "vae":
        logits = {d: build(name, d)(x, inference=True) for d in ("float32", "bfloat16")}
        np.testing.assert_allclose(logits["bfloat16"], logits["float32"], atol=LOGIT_ATOL)


@pytest.mark.parametrize(("name", "loss"), CASES, ids=[c[0] for c in CASES])
def test_with_dtype_gives_the_float32_twin_of_a_bfloat16_model(name, loss, batch):
    x, y = batch
    model = build(name, "bfloat16")
    twin = models.with_dtype(model, "float32")
    graphdef, params = nnx.split(twin)
    assert matmul_dtypes(lambda p: loss(nnx.merge(graphdef, p), x, y), params) == {"f32"}
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)  # the same parameters
    original = nnx.split(model)
    assert matmul_dtypes(lambda p: loss(nnx.merge(original[0], p), x, y), original[1]) == {"bf16"}
    # Exactly the model built in float32 from the same initialisation.
    np.testing.assert_array_equal(loss(twin, x, y), loss(build(name, "float32"), x, y))


def test_bfloat16_still_trains(batch):
    """The 2x800 student and the CNN learn the class patterns in bfloat16 as in float32:
    after 3 epochs both are above 90 % on held-out patterns, and their final training
    losses are within 20 % of each other."""
    images, labels = class_patterns(640, seed=5)
    data = {"images": images, "labels": labels}
    held_out_x, held_out_y = batch
    for preset in ("hinton_student", "cnn_teacher"):
        final = {}
        for dtype in ("float32", "bfloat16"):
            trainer = train.Trainer(
                classifier(preset, dtype), optax.adam(1e-3), distill.classification_loss()
            )
            fitted = train.fit(
                trainer,
                data,
                train.Loop(epochs=3, batch_size=64, seed=0),
                evaluate=lambda m, e: {},
                stage=train.Stage(progress=False),
            )
            model = trainer.best_model(fitted)
            accuracy = jnp.mean(jnp.argmax(model(held_out_x, inference=True), -1) == held_out_y)
            assert accuracy > 0.9, (preset, dtype)
            assert dtypes_of(trainer.state) <= {"float32", "int32", "key<fry>", "uint32"}
            final[dtype] = fitted.history[-1]["train_loss"]
        assert final["bfloat16"] == pytest.approx(final["float32"], rel=0.2), preset


def test_vae_bfloat16_lowers_the_negative_elbo():
    images, _ = class_patterns(640, seed=6)
    x = kdata.to_unit_float(images[:64])
    finals = {}
    for dtype in ("float32", "bfloat16"):
        trainer = train.Trainer(vae_model(dtype), optax.adam(1e-3), vae.objective())
        before = float(negative_elbo(trainer.model, x, None))
        fitted = train.fit(
            trainer,
            {"images": images},
            train.Loop(epochs=3, batch_size=64, seed=0),
            evaluate=lambda m, e: {},
            context=lambda epoch: {"epoch": jnp.int32(epoch)},
            stage=train.Stage(progress=False),
        )
        finals[dtype] = float(negative_elbo(trainer.best_model(fitted), x, None))
        assert finals[dtype] < 0.5 * before, dtype
    assert finals["bfloat16"] == pytest.approx(finals["float32"], rel=0.05)


@pytest.mark.parametrize("script", ["examples/distill_mnist.py", "examples/vae_mnist.py"])
def test_dtype_is_a_stored_setting_of_both_examples(script):
    example = load_script(script)
    settings = config.parse(example.Settings, ["--dtype", "bfloat16"])
    assert settings.training()["dtype"] == "bfloat16"  # a resume in another dtype is refused
    assert config.parse(example.Settings, []).dtype == "float32"
    with pytest.raises(SystemExit):
        config.parse(example.Settings, ["--dtype", "float16"])
