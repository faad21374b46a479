"""Flax NNX models: MLP and CNN classifiers (teacher and student) and an MLP VAE.

Every module is free of hidden state: stochastic layers (dropout) take an explicit PRNG
``key`` at call time. Evaluation is asked for explicitly, as in Equinox: a classifier
called with ``inference=True`` is deterministic (dropout off, any key ignored), while in
training (``inference=False``, the default) a model with dropout raises a ``ValueError``
when the ``key`` is missing, rather than silently evaluating. So the functional pattern
``nnx.split -> jax.jit -> nnx.merge`` works unchanged, and a train step derives its key
from the seed, the epoch and the step alone.

The VAE's encoder returns its posterior ``q(z|x)`` as a value,
:class:`kdvae.losses.DiagonalGaussian`, which :func:`kdvae.losses.elbo` and
:func:`kdvae.losses.iwae_bound` take.

Inputs are images as floats in ``[0, 1]``, either ``[B, 784]`` or ``[B, 28, 28, 1]``.

Mixed precision: every model takes ``dtype``, the dtype its activations and matrix
multiplies are computed in (``jnp.bfloat16`` or the default ``jnp.float32``). Its
parameters stay float32 (Flax's ``param_dtype``), and so do the gradients and the
optimizer's moments; every output (logits, the posterior) comes back as float32, so
the loss math is float32 too. :func:`with_dtype` gives a trained model's float32 twin,
for evaluation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from kdvae import kernels, losses

__all__ = [
    "CLASSIFIER_PRESETS",
    "VAE_PRESETS",
    "CNNClassifier",
    "ClassifierConfig",
    "MLPClassifier",
    "VAE",
    "VAEConfig",
    "build",
    "count_params",
    "dropout",
    "make_classifier",
    "make_vae",
    "with_dtype",
]

Dtype = Any  # a JAX floating dtype, e.g. jnp.float32 or jnp.bfloat16
_ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu, "elu": jax.nn.elu}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}.")
    return _ACTIVATIONS[name]


def dropout(
    key: jax.Array | None, x: jax.Array, rate: float, *, inference: bool = False
) -> jax.Array:
    """Inverted dropout: zero each entry with probability ``rate``, scale the rest by
    ``1 / (1 - rate)``.

    ``inference=True`` (evaluation) or ``rate=0`` returns ``x`` unchanged, and needs no
    ``key``; otherwise a missing ``key`` is a ``ValueError``. The mask is
    ``jax.random.bernoulli(key, 1 - rate, x.shape)``'s, drawn by
    :func:`kdvae.kernels.bernoulli` (faster on a CPU).
    """
    if inference or rate == 0.0:
        return x
    if key is None:
        raise ValueError(
            f"dropout (rate {rate}) in training needs a PRNG key: pass key=... to train, "
            "or inference=True to evaluate."
        )
    keep = 1.0 - rate
    mask = kernels.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x * (1.0 / keep), jnp.zeros_like(x))


def _check_rate(name: str, rate: float) -> float:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {rate!r}.")
    return float(rate)


def _max_norm(kernel: nnx.Param, limit: float) -> None:
    """Rescale each unit's incoming weight vector (a kernel column) to L2 norm <= limit."""
    norms = jnp.sqrt(jnp.sum(jnp.square(kernel[...]), axis=0, keepdims=True))
    kernel[...] = kernel[...] * jnp.minimum(1.0, limit / jnp.maximum(norms, 1e-12))


class MLPClassifier(nnx.Module):
    """``784 -> widths... -> num_classes`` ReLU network with optional dropout and max-norm.

    Hinton et al.'s teacher is ``widths=(1200, 1200)`` with input dropout 0.2, hidden
    dropout 0.5 and a max-norm constraint on each unit's incoming weights (Srivastava et
    al. 2014); their student is ``(800, 800)`` without regularisation.
    """

    def __init__(
        self,
        widths: Sequence[int],
        *,
        num_inputs: int = 784,
        num_classes: int = 10,
        input_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        max_norm: float | None = None,
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        sizes = [num_inputs, *widths, num_classes]
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, dtype=dtype, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )
        self.input_dropout = _check_rate("input_dropout", input_dropout)
        self.hidden_dropout = _check_rate("hidden_dropout", hidden_dropout)
        self.max_norm = max_norm

    def __call__(
        self, x: jax.Array, *, key: jax.Array | None = None, inference: bool = False
    ) -> jax.Array:
        """``[B, 784]`` or ``[B, 28, 28, 1]`` images -> ``[B, num_classes]`` logits.

        ``key`` draws the dropout masks in training; ``inference=True`` evaluates
        (no dropout, no key needed). See :func:`dropout`.
        """
        x = x.reshape(x.shape[0], -1).astype(self.layers[0].dtype)
        keys = [None] * len(self.layers) if key is None else jax.random.split(key, len(self.layers))
        x = dropout(keys[0], x, self.input_dropout, inference=inference)
        for layer, layer_key in zip(self.layers[:-1], keys[1:], strict=True):
            x = dropout(layer_key, jax.nn.relu(layer(x)), self.hidden_dropout, inference=inference)
        return self.layers[-1](x).astype(jnp.float32)

    def constrain(self) -> None:
        """Apply the max-norm constraint (call after each optimizer update)."""
        if self.max_norm is not None:
            for layer in self.layers:
                _max_norm(layer.kernel, self.max_norm)


class Conv(nnx.Module):
    """A ``k x k`` 'SAME' convolution (:func:`kdvae.kernels.conv2d_same`).

    Kernel ``[k, k, in, out]`` (HWIO, ``nnx.Conv``'s layout) and bias ``[out]`` on
    every backend: the CPU kernel reshapes the kernel, so a checkpoint moves between
    backends.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        kernel_size: int = 3,
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape))
        self.bias = nnx.Param(jnp.zeros((out_features,)))
        self.dtype = dtype

    def __call__(self, x_BHWC: jax.Array, *, max_pool: bool = False) -> jax.Array:
        """``[B, H, W, in] -> [B, H, W, out]``, or ``[B, H/2, W/2, out]`` with ``max_pool``.

        With ``max_pool`` the 2x2 max-pool (:func:`kdvae.kernels.max_pool_2x2`) is taken
        before the bias is added; the two commute, and the bias then touches a quarter
        of the outputs.
        """
        y = kernels.conv2d_same(x_BHWC.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return (kernels.max_pool_2x2(y) if max_pool else y) + self.bias[...].astype(self.dtype)


class CNNClassifier(nnx.Module):
    """conv-pool-conv-pool-dense-dropout-dense, e.g. ``conv32-pool-conv64-pool-dense128``."""

    def __init__(
        self,
        channels: Sequence[int] = (32, 64),
        dense: int = 128,
        *,
        num_classes: int = 10,
        dropout: float = 0.5,
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        ins = [1, *channels[:-1]]
        self.convs = nnx.List(
            [Conv(a, b, dtype=dtype, rngs=rngs) for a, b in zip(ins, channels, strict=True)]
        )
        side = 28 // 2 ** len(channels)
        self.hidden = nnx.Linear(side * side * channels[-1], dense, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(dense, num_classes, dtype=dtype, rngs=rngs)
        self.dropout = _check_rate("dropout", dropout)

    def __call__(
        self, x: jax.Array, *, key: jax.Array | None = None, inference: bool = False
    ) -> jax.Array:
        """``[B, 784]`` or ``[B, 28, 28, 1]`` images -> ``[B, num_classes]`` logits.

        ``key`` draws the dropout mask in training; ``inference=True`` evaluates
        (no dropout, no key needed). See :func:`dropout`.
        """
        x = x.reshape(x.shape[0], 28, 28, 1)
        for conv in self.convs:
            x = jax.nn.relu(conv(x, max_pool=True))  # relu(pool(.)) = pool(relu(.))
        x = jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))
        return self.out(dropout(key, x, self.dropout, inference=inference)).astype(jnp.float32)

    def constrain(self) -> None:
        """No weight constraint; present so every classifier has the same interface."""


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Everything needed to rebuild a classifier; stored beside its checkpoints."""

    kind: str  # "mlp" or "cnn"
    widths: tuple[int, ...] = ()  # MLP hidden widths, or CNN channels
    dense: int = 128  # CNN only
    input_dropout: float = 0.0
    hidden_dropout: float = 0.0
    max_norm: float | None = None
    num_classes: int = 10

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierConfig:
        d = dict(d)
        d["widths"] = tuple(d.get("widths", ()))
        return cls(**d)


CLASSIFIER_PRESETS: dict[str, ClassifierConfig] = {
    # Hinton et al. 2015, section 3: 784-1200-1200-10, dropout, max-norm weight constraint.
    "hinton_teacher": ClassifierConfig(
        "mlp", (1200, 1200), input_dropout=0.2, hidden_dropout=0.5, max_norm=3.5
    ),
    # The small net: 784-800-800-10, no regularisation.
    "hinton_student": ClassifierConfig("mlp", (800, 800)),
    # A CNN teacher clearly stronger than the MLP student on (Fashion-)MNIST.
    "cnn_teacher": ClassifierConfig("cnn", (32, 64), dense=128, hidden_dropout=0.5),
}


def make_classifier(
    config: ClassifierConfig, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs
) -> MLPClassifier | CNNClassifier:
    """Build the classifier described by ``config``, computing in ``dtype`` (a dtype
    or its name, e.g. ``"bfloat16"``)."""
    dtype = jnp.dtype(dtype)
    if config.kind == "mlp":
        return MLPClassifier(
            config.widths,
            num_classes=config.num_classes,
            input_dropout=config.input_dropout,
            hidden_dropout=config.hidden_dropout,
            max_norm=config.max_norm,
            dtype=dtype,
            rngs=rngs,
        )
    if config.kind == "cnn":
        return CNNClassifier(
            config.widths,
            config.dense,
            num_classes=config.num_classes,
            dropout=config.hidden_dropout,
            dtype=dtype,
            rngs=rngs,
        )
    raise ValueError(f"classifier kind must be 'mlp' or 'cnn', got {config.kind!r}.")


# ------------------------------------------------------------------------------ VAE


class MLP(nnx.Module):
    """A stack of ``Linear + activation`` layers (the activation after every layer)."""

    def __init__(
        self, sizes: Sequence[int], activation: str, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs
    ):
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, dtype=dtype, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _activation(self.activation)
        for layer in self.layers:
            x = act(layer(x))
        return x


class VAE(nnx.Module):
    """MLP VAE: Gaussian encoder ``q(z|x)``; a Bernoulli decoder ``p(x|z)`` (logits), or
    with ``likelihood="gaussian"`` a Gaussian one (a mean and a log-variance per pixel,
    both decoded from ``z``; or the log-variance fixed at ``decoder_logvar``).

    The encoder's log-variance is soft-bounded, ``logvar = b * tanh(raw / b)`` with
    ``b = logvar_bound`` (default 10: standard deviations between ``exp(-5) ~ 0.0067``
    and ``exp(5) ~ 148``). The map is the identity near zero and smooth, and keeps an
    early, badly scaled update from sending ``exp(logvar)`` to ``inf`` and the loss to
    NaN.
    """

    def __init__(
        self,
        *,
        num_inputs: int = 784,
        encoder_widths: Sequence[int] = (500,),
        decoder_widths: Sequence[int] = (500,),
        latents: int = 20,
        activation: str = "relu",
        logvar_bound: float = 10.0,
        likelihood: str = "bernoulli",
        decoder_logvar: float | None = None,
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        _activation(activation)
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}.")
        self.encoder = MLP([num_inputs, *encoder_widths], activation, dtype=dtype, rngs=rngs)
        enc_out = encoder_widths[-1] if encoder_widths else num_inputs
        self.mean = nnx.Linear(enc_out, latents, dtype=dtype, rngs=rngs)
        self.logvar = nnx.Linear(enc_out, latents, dtype=dtype, rngs=rngs)
        self.decoder = MLP([latents, *decoder_widths], activation, dtype=dtype, rngs=rngs)
        dec_out = decoder_widths[-1] if decoder_widths else latents
        self.logits = nnx.Linear(dec_out, num_inputs, dtype=dtype, rngs=rngs)
        self.dtype = dtype
        self.logvar_bound = logvar_bound
        self.latents = latents
        self.likelihood = likelihood
        self.decoder_logvar = decoder_logvar
        if likelihood == "gaussian" and decoder_logvar is None:  # learned, per pixel
            self.pixel_logvar = nnx.Linear(dec_out, num_inputs, dtype=dtype, rngs=rngs)

    def encode(self, x: jax.Array) -> losses.DiagonalGaussian:
        """``[B, 784]`` (or ``[B, 28, 28, 1]``) -> the posterior ``q(z|x)``, a
        :class:`kdvae.losses.DiagonalGaussian` with ``mean`` and ``logvar`` of ``[B, L]``."""
        h = self.encoder(x.reshape(x.shape[0], -1).astype(self.dtype))
        mean, raw = (f(h).astype(jnp.float32) for f in (self.mean, self.logvar))
        bound = self.logvar_bound
        return losses.DiagonalGaussian(mean, bound * jnp.tanh(raw / bound))

    def decode(self, z: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array]:
        """``[..., L]`` latents -> ``[..., 784]`` Bernoulli logits (float32); for a
        Gaussian decoder, ``(mean [..., 784], logvar [..., 784])``, the log-variance
        soft-bounded as the encoder's (or the fixed scalar)."""
        h = self.decoder(z.astype(self.dtype))
        out = self.logits(h).astype(jnp.float32)
        if self.likelihood == "bernoulli":
            return out
        if self.decoder_logvar is not None:
            return out, jnp.float32(self.decoder_logvar)
        raw = self.pixel_logvar(h).astype(jnp.float32)
        return out, self.logvar_bound * jnp.tanh(raw / self.logvar_bound)

    def mean_image(self, z: jax.Array) -> jax.Array:
        """``[..., L]`` -> the decoder's mean ``E[x | z]`` ``[..., 784]``, in ``[0, 1]``
        (for pictures)."""
        out = self.decode(z)
        return jax.nn.sigmoid(out) if self.likelihood == "bernoulli" else jnp.clip(out[0], 0, 1)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Everything needed to rebuild a VAE; stored beside its checkpoints."""

    encoder_widths: tuple[int, ...] = (500,)
    decoder_widths: tuple[int, ...] = (500,)
    latents: int = 20
    activation: str = "relu"
    likelihood: str = "bernoulli"  # or "gaussian" (dequantized grey levels)
    decoder_logvar: float | None = None  # Gaussian: fixed, or None to decode one per pixel

    def to_dict(self) -> dict[str, Any]:
        """As stored with checkpoints. The fields added after runs were stored are left
        out at the values those runs had, so their checkpoints still resume."""
        d = dataclasses.asdict(self)
        for key, legacy in (("likelihood", "bernoulli"), ("decoder_logvar", None)):
            if d[key] == legacy:
                del d[key]
        return d


VAE_PRESETS: dict[str, VAEConfig] = {
    # The official Flax VAE example: 784-500-(20, 20), 20-500-784, ReLU.
    "flax": VAEConfig((500,), (500,), 20, "relu"),
    # Burda et al. 2016, one stochastic layer: 2x200 tanh, 50 latents.
    "iwae": VAEConfig((200, 200), (200, 200), 50, "tanh"),
    # Two latents, for pictures of the latent space and the decoded manifold.
    "2d": VAEConfig((500,), (500,), 2, "relu"),
}


def make_vae(config: VAEConfig, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> VAE:
    """Build the VAE described by ``config``, computing in ``dtype`` (a dtype or its
    name)."""
    return VAE(
        encoder_widths=config.encoder_widths,
        decoder_widths=config.decoder_widths,
        latents=config.latents,
        activation=config.activation,
        likelihood=config.likelihood,
        decoder_logvar=config.decoder_logvar,
        dtype=jnp.dtype(dtype),
        rngs=rngs,
    )


M = TypeVar("M", bound=nnx.Module)


def build(factory: Callable[[nnx.Rngs], M], key: jax.Array) -> M:
    """``factory(nnx.Rngs(key))``, initialised as one compiled program.

    Eager initialisation runs (and compiles) every random op of a new shape on its
    own. Under ``jax.jit`` it is one program, which JAX's persistent compilation cache
    then keeps across runs. Same key, same parameters.
    """
    graphdef = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))[0]
    state = jax.jit(lambda k: nnx.split(factory(nnx.Rngs(k)))[1])(key)
    return nnx.merge(graphdef, state)


def with_dtype(model: M, dtype: Dtype) -> M:
    """A copy of ``model`` computing in ``dtype``, with the same (float32) parameters:
    e.g. a model trained in bfloat16, evaluated in float32."""
    model = nnx.clone(model)
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "dtype"):
            module.dtype = jnp.dtype(dtype)
    return model


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
