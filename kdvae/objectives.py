"""Training objectives for :mod:`kdvae.train`: classification, distillation, the VAE.

Each factory returns ``loss_fn(model, batch, key, context) -> (loss, metrics)``, the
batch mean of a per-example loss from :mod:`kdvae.losses`. ``batch["images"]`` holds
uint8 images ``[B, 28, 28, 1]``; the conversion to floats, input jitter and
binarization happen here, inside the compiled step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdvae import data, losses

__all__ = [
    "classification_loss",
    "distillation_objective",
    "jitter",
    "to_unit_float",
    "vae_objective",
]


def to_unit_float(images: jax.Array) -> jax.Array:
    """uint8 images ``[B, 28, 28, 1]`` -> float32 ``[B, 28, 28, 1]`` in ``[0, 1]``.

    :func:`kdvae.data.to_float`, keeping the image shape (for :func:`jitter`).
    """
    return data.to_float(images).reshape(images.shape)


def jitter(key: jax.Array, x_BHWC: jax.Array, *, max_shift: int = 2) -> jax.Array:
    """Translate each image by up to ``max_shift`` pixels in each direction (zero fill).

    Hinton et al. (2015) trained the big MNIST net on inputs "jittered by up to two
    pixels in any direction".
    """
    if max_shift == 0:
        return x_BHWC
    b, h, w, _ = x_BHWC.shape
    s = max_shift
    shifts = jax.random.randint(key, (b, 2), 0, 2 * s + 1)
    padded = jnp.pad(x_BHWC, ((0, 0), (s, s), (s, s), (0, 0)))

    def crop(image, shift):
        return jax.lax.dynamic_slice(image, (shift[0], shift[1], 0), (h, w, image.shape[-1]))

    return jax.vmap(crop)(padded, shifts)


def binarize(key: jax.Array | None, images: jax.Array, *, dynamic: bool = True) -> jax.Array:
    """uint8 images ``[B, 28, 28, 1]`` -> float32 0/1 ``[B, 784]`` (see :func:`data.binarize`)."""
    return data.binarize(key, data.to_float(images), dynamic=dynamic)


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def classification_loss(*, jitter_pixels: int = 0):
    """Softmax cross-entropy with the integer labels (a teacher, or a student alone)."""

    def loss_fn(model: nnx.Module, batch: dict, key: jax.Array, context: Any):
        jitter_key, dropout_key = jax.random.split(key)
        x = jitter(jitter_key, to_unit_float(batch["images"]), max_shift=jitter_pixels)
        logits = model(x, key=dropout_key)
        loss = losses.tempered_cross_entropy(logits, batch["labels"]).mean()
        return loss, {"accuracy": _accuracy(logits, batch["labels"])}

    return loss_fn


def distillation_objective(
    *,
    temperature: float,
    alpha: float,
    soft_loss: str = "kl",
    teacher_graphdef: nnx.GraphDef | None = None,
    jitter_pixels: int = 0,
):
    """Hinton's objective for a student; ``alpha`` weights the hard-label term.

    The teacher's logits come from ``batch["teacher_logits"]`` when the transfer set's
    logits were cached, else from running the frozen teacher (``nnx.merge`` of
    ``teacher_graphdef`` and ``context["teacher"]``, in evaluation mode) on the same
    (possibly jittered) inputs as the student.
    """
    losses.check_distillation_settings(temperature, alpha, soft_loss)  # now, not at trace

    def loss_fn(model: nnx.Module, batch: dict, key: jax.Array, context: Any):
        jitter_key, dropout_key = jax.random.split(key)
        x = jitter(jitter_key, to_unit_float(batch["images"]), max_shift=jitter_pixels)
        if "teacher_logits" in batch:
            teacher_logits = batch["teacher_logits"]
        else:
            teacher_logits = nnx.merge(teacher_graphdef, context["teacher"])(x, inference=True)
        logits = model(x, key=dropout_key)
        loss = losses.distillation_loss(
            logits, teacher_logits, batch["labels"],
            temperature=temperature, alpha=alpha, soft_loss=soft_loss,
        ).mean()  # fmt: skip
        agreement = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1))
        return loss, {"accuracy": _accuracy(logits, batch["labels"]), "agreement": agreement}

    return loss_fn


def vae_objective(
    *,
    objective: str = "elbo",
    num_samples: int = 1,
    k: int = 1,
    beta: float = 1.0,
    kl_warmup_epochs: int = 0,
    free_bits: float = 0.0,
    dynamic_binarization: bool = True,
):
    """The negative ELBO (or the negative IWAE bound) of a :class:`kdvae.models.VAE`.

    Args:
      objective: ``"elbo"`` or ``"iwae"`` (Burda et al.'s ``k``-sample bound).
      num_samples: Monte-Carlo samples for the ELBO's reconstruction term.
      k: importance samples for ``"iwae"``.
      beta: the KL weight (1 is the true ELBO).
      kl_warmup_epochs: anneal the KL weight linearly from ``beta / n`` in the first
        epoch to ``beta`` from epoch ``n`` on (Bowman et al. 2016); needs
        ``context["epoch"]``.
      free_bits: Kingma et al.'s (2016) free bits: each latent dimension's batch-mean
        KL below this many nats is not penalised. Metrics still report the true KL.
      dynamic_binarization: binarize with a fresh Bernoulli sample of the grey levels
        every batch; else threshold at 0.5.

    The reported ``neg_elbo`` is always the true negative ELBO (``beta = 1``, no free
    bits), whatever is optimised.
    """
    if objective not in ("elbo", "iwae"):
        raise ValueError(f"objective must be 'elbo' or 'iwae', got {objective!r}.")
    for name, value in (("num_samples", num_samples), ("k", k)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if beta < 0 or free_bits < 0 or kl_warmup_epochs < 0:
        raise ValueError("beta, free_bits and kl_warmup_epochs must be non-negative.")

    def loss_fn(model: nnx.Module, batch: dict, key: jax.Array, context: Any):
        binarize_key, sample_key, iwae_key = jax.random.split(key, 3)
        x = binarize(binarize_key, batch["images"], dynamic=dynamic_binarization)
        posterior = model.encode(x)
        terms = losses.elbo(sample_key, x, posterior, model.decode, num_samples=num_samples)
        weight = beta
        if kl_warmup_epochs:
            epoch = context["epoch"].astype(jnp.float32)
            weight = beta * jnp.minimum(1.0, (epoch + 1.0) / kl_warmup_epochs)
        if objective == "iwae":
            bound = losses.iwae_bound(iwae_key, x, posterior, model.decode, num_samples=k)
            loss = -bound.mean()
        else:
            kl = terms.kl.mean()
            if free_bits:
                per_dim = posterior.kl_to_standard_normal(per_dimension=True).mean(0)
                kl = jnp.sum(jnp.maximum(per_dim, free_bits))
            loss = -terms.reconstruction.mean() + weight * kl
        metrics = {
            "neg_elbo": -terms.elbo.mean(),
            "kl": terms.kl.mean(),
            "reconstruction": terms.reconstruction.mean(),
        }
        return loss, metrics

    return loss_fn
