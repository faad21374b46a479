"""Losses for knowledge distillation and variational autoencoders.

Pure functions of arrays: ``jit``- and ``vmap``-able, no Flax, no I/O. Every loss takes
logits (never probabilities), computes in log space, and returns **one value per
example** (the batch shape); averaging over the batch belongs to the train step.

Hyperparameters are keyword-only. They are validated on Python scalars and static
shapes, so the checks cost nothing under ``jax.jit``; an invalid argument raises a
``ValueError`` or ``TypeError`` that names it and says what was seen.

Computation happens in float32 or wider: bfloat16 and float16 inputs are promoted, so
the returned values are float32 for them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdvae import kernels

__all__ = [
    "TEMPERATURE_RANGE",
    "DiagonalGaussian",
    "ELBOTerms",
    "ImportanceSampled",
    "aggregate_posterior_mutual_information",
    "bernoulli_log_likelihood",
    "check_distillation_settings",
    "decoupled_kd_loss",
    "diagonal_gaussian_kl",
    "dist_loss",
    "distillation_loss",
    "dreg_iwae_bound",
    "elbo",
    "gaussian_kl",
    "gaussian_log_likelihood",
    "generalized_jsd_loss",
    "importance_sampled_log_px",
    "iwae_bound",
    "logit_matching_loss",
    "reparameterize",
    "reverse_kl_loss",
    "standardize_logits",
    "stl_elbo",
    "tempered_cross_entropy",
    "tempered_log_softmax",
    "tempered_softmax",
]

_LOG_2PI = math.log(2.0 * math.pi)

# --------------------------------------------------------------------------- checks


def _float_array(name: str, x: ArrayLike) -> jax.Array:
    """`x` as a floating array of at least float32 precision; rejects integer inputs."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array (logits), got dtype {x.dtype}.")
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


TEMPERATURE_RANGE = (1e-3, 1e4)
"""The temperatures every tempered function accepts. Inside it, ``T**2 * KL`` and the
scaled logits stay finite in float32 for logits up to ``+-1e4`` (tested at both ends);
below it ``T / 2`` nears float32's smallest normal, above it ``T**2`` its largest."""


def _check_temperature(temperature: Any) -> None:
    if isinstance(temperature, jax.core.Tracer):
        return  # A traced temperature (e.g. a schedule) cannot be checked without cost.
    low, high = TEMPERATURE_RANGE
    message = f"temperature must be a finite number in [{low:g}, {high:g}], got {temperature!r}."
    try:
        if isinstance(temperature, (str, bytes)):
            raise TypeError  # float("4") would accept it, and jnp would fail on it later
        value = float(temperature)
    except (TypeError, ValueError) as err:
        raise TypeError(message) from err
    if not low <= value <= high:  # NaN fails too
        raise ValueError(message)


def _check_key(key: Any) -> None:
    """``TypeError`` naming ``key`` unless it is a PRNG key (typed, or raw uint32 ``[2]``)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and (
        jnp.issubdtype(dtype, jax.dtypes.prng_key)
        or (dtype == jnp.uint32 and key.shape[-1:] == (2,))
    ):
        return
    raise TypeError(f"key must be a PRNG key such as jax.random.key(0), got {key!r}.")


def _check_alpha(alpha: Any) -> None:
    if alpha is None:
        raise ValueError("alpha (the weight of the hard-label term) is required with labels.")
    if isinstance(alpha, jax.core.Tracer):
        return
    try:
        if isinstance(alpha, (str, bytes)):
            raise TypeError
        value = float(alpha)
    except (TypeError, ValueError) as err:
        raise TypeError(f"alpha must be a number in [0, 1], got {alpha!r}.") from err
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")


def _check_axis(name: str, axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for {name} with {ndim} dimensions.")
    return axis % ndim


def _check_where(where: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array | None:
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
    try:
        jnp.broadcast_shapes(where.shape, shape)
    except ValueError as err:
        raise ValueError(
            f"where with shape {where.shape} does not broadcast to the logits' shape {shape}."
        ) from err
    return jnp.broadcast_to(where, shape)


# ------------------------------------------------------------- tempered softmax & CE


def tempered_log_softmax(
    logits: ArrayLike,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Log of the softmax of ``logits / temperature``.

    .. math::
        \log S_T(z)_i = z_i / T - \log \sum_j \exp(z_j / T)
          = \mathrm{log\_softmax}\big((z - \max_j z_j) / T\big)_i

    Computed as written on the right: ``s - logsumexp(s)`` for the logits ``s`` shifted
    by their largest unmasked entry, then divided by ``T``. The shift leaves the
    softmax unchanged, and taken before the division it keeps logits up to the float32
    maximum from overflowing, at any temperature. Masked (``where=False``) and ``-inf``
    classes get ``-inf``.

    Args:
      logits: ``[..., C, ...]`` unnormalised log-probabilities, classes along ``axis``.
      temperature: ``T > 0``; above 1 softens the distribution, below 1 sharpens it.
      axis: the class axis.
      where: optional boolean mask broadcastable to ``logits``; ``False`` classes are
        excluded, exactly as if they had been sliced away.

    Returns:
      An array shaped like ``logits``.

    Example:
      >>> import jax.numpy as jnp
      >>> from kdvae.losses import tempered_log_softmax
      >>> tempered_log_softmax(jnp.array([0.0, 0.0]), temperature=5.0)
      Array([-0.6931472, -0.6931472], dtype=float32)

    References:
      Hinton, Vinyals & Dean, *Distilling the Knowledge in a Neural Network*, 2015,
      eq. (1). https://arxiv.org/abs/1503.02531
    """
    _check_temperature(temperature)
    logits = _float_array("logits", logits)
    axis = _check_axis("logits", axis, logits.ndim)
    where = _check_where(where, logits.shape)
    scaled = _shifted_and_scaled(logits, temperature, axis, where)[0]  # (z - max z) / T
    out = scaled - jax.nn.logsumexp(scaled, axis=axis, keepdims=True)  # log_softmax(z / T)
    return out if where is None else jnp.where(where, out, -jnp.inf)


def _shifted_and_scaled(
    logits: jax.Array, temperature: Any, axis: int, where: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """``(z - max z) / T`` (masked classes ``-inf``) and the shift ``max z``.

    A softmax does not change when a constant is subtracted from every logit, so this
    stands for ``z / T`` in a log-softmax, but is finite for logits up to the float32
    maximum at any ``T``: the largest visible entry is exactly 0 and every other one is
    <= 0. Subtracting the max first, rather than dividing first, keeps the result exact
    for logits with a large common offset.
    """
    visible = logits if where is None else jnp.where(where, logits, -jnp.inf)
    shift = jnp.max(visible, axis=axis, keepdims=True)
    shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0.0))
    return _shift_and_scale(visible, shift, temperature), shift


def _shift_and_scale(logits: jax.Array, shift: jax.Array, temperature: Any) -> jax.Array:
    # Halving before subtracting keeps z - max z from overflowing (it can reach twice the
    # float32 maximum, while (z - max z) / T is finite for T > 1) and is exact, so the
    # largest entry comes out exactly 0, also when the compiler fuses the subtraction
    # into an FMA (which leaves z / T - max z / T slightly off 0).
    return (0.5 * logits - 0.5 * shift) / (0.5 * temperature)


def tempered_softmax(
    logits: ArrayLike,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Softmax of ``logits / temperature``: Hinton's softened class probabilities.

    .. math::
        S_T(z)_i = \exp(z_i / T) / \sum_j \exp(z_j / T)

    Args:
      logits: ``[..., C, ...]`` unnormalised log-probabilities, classes along ``axis``.
      temperature: ``T > 0``.
      axis: the class axis.
      where: optional boolean mask; masked classes get probability 0.

    Returns:
      Probabilities shaped like ``logits``, summing to one along ``axis``.

    Example:
      >>> import jax.numpy as jnp
      >>> from kdvae.losses import tempered_softmax
      >>> tempered_softmax(jnp.array([1.0, 2.0, 3.0]), temperature=1e4).round(3)
      Array([0.333, 0.333, 0.333], dtype=float32)

    References:
      Hinton, Vinyals & Dean, 2015, eq. (1). https://arxiv.org/abs/1503.02531
    """
    return jnp.exp(tempered_log_softmax(logits, temperature=temperature, axis=axis, where=where))


def _integer_labels(labels: jax.Array, logits_shape: tuple[int, ...], axis: int) -> jax.Array:
    """``labels`` checked: the logits' shape less the class axis, and (when concrete, not
    under ``jit``) every label a class index in ``[0, C)``."""
    expected = logits_shape[:axis] + logits_shape[axis + 1 :]
    if labels.shape != expected:
        raise ValueError(
            f"integer labels must have the logits' shape without the class axis, {expected}; "
            f"got {labels.shape} for logits of shape {logits_shape}."
        )
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= logits_shape[axis]:
            raise ValueError(
                f"labels must be class indices in [0, {logits_shape[axis]}), got labels from "
                f"{low} to {high}."
            )
    return labels


def tempered_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Cross-entropy between ``labels`` and the tempered softmax of ``logits``.

    .. math::
        \ell(z, y) = -\sum_i y_i \log S_T(z)_i

    ``labels`` are either integer class indices (shape ``[...]``) or probability vectors
    (one-hot or soft, shaped like ``logits``). An integer label outside ``[0, C)`` is a
    ``ValueError`` when the labels are concrete; under ``jit``, where they cannot be
    checked, that example's loss is NaN. Classes with zero probability contribute
    exactly zero, also when their logit is ``-inf`` (``optax.softmax_cross_entropy``
    returns NaN there). At ``T = 1`` this is the ordinary softmax cross-entropy.

    Args:
      logits: ``[..., C]`` logits (classes along ``axis``).
      labels: ``[...]`` integer class indices, or ``[..., C]`` probabilities.
      temperature: ``T > 0`` applied to ``logits`` only.
      axis: the class axis.
      where: optional boolean mask over classes, broadcastable to ``logits``.

    Returns:
      ``[...]``: the loss per example (the class axis removed).

    Example:
      >>> import jax.numpy as jnp
      >>> from kdvae.losses import tempered_cross_entropy
      >>> tempered_cross_entropy(jnp.array([[0.0, 0.0]]), jnp.array([1]))
      Array([0.6931472], dtype=float32)

    References:
      Hinton, Vinyals & Dean, 2015, section 2. https://arxiv.org/abs/1503.02531
    """
    _check_temperature(temperature)
    logits = _float_array("logits", logits)
    axis = _check_axis("logits", axis, logits.ndim)
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        labels = _integer_labels(labels, logits.shape, axis)
        # As optax does: pick the label's logit from the input and scale only that one,
        # rather than form every log-probability and pick one (measurably faster).
        where = _check_where(where, logits.shape)
        scaled, shift = _shifted_and_scaled(logits, temperature, axis, where)
        # The sum of exponentials lies in [1, C] (the largest term is exp(0)): no overflow.
        log_normalizer = jnp.log(jnp.sum(jnp.exp(scaled), axis=axis, keepdims=True))
        # Under jit labels cannot be checked: one out of [0, C) gives NaN, not a class's loss.
        valid = (labels >= 0) & (labels < logits.shape[axis])
        index = jnp.expand_dims(jnp.where(valid, labels, 0), axis)
        picked = jnp.take_along_axis(logits, index, axis=axis)
        if where is not None:  # a masked class has probability 0
            picked = jnp.where(jnp.take_along_axis(where, index, axis=axis), picked, -jnp.inf)
        picked = _shift_and_scale(picked, shift, temperature)
        return jnp.where(valid, jnp.squeeze(log_normalizer - picked, axis), jnp.nan)
    log_p = tempered_log_softmax(logits, temperature=temperature, axis=axis, where=where)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        raise TypeError(f"labels must be integer indices or probabilities, got {labels.dtype}.")
    if labels.shape != logits.shape:
        raise ValueError(
            f"probability labels must have the logits' shape {logits.shape}, got {labels.shape}."
        )
    return -_sum_plogq(labels.astype(log_p.dtype), log_p, axis)


def _sum_plogq(p: jax.Array, log_q: jax.Array, axis: int) -> jax.Array:
    """``sum_i p_i log q_i`` with ``0 * log 0 = 0``, NaN-free in value and gradient.

    One ``where`` is enough: it zeroes ``log q`` (which may be ``-inf`` or NaN) off the
    support of ``p``, so neither the product nor its gradients see ``0 * inf``.
    """
    return jnp.sum(p * jnp.where(p > 0, log_q, 0.0), axis=axis)


# ------------------------------------------------------------------- distillation

_SOFT_LOSSES = ("kl", "ce")


def _check_soft_loss(soft_loss: Any) -> None:
    if soft_loss not in _SOFT_LOSSES:
        raise ValueError(f"soft_loss must be one of {_SOFT_LOSSES}, got {soft_loss!r}.")


def check_distillation_settings(temperature: Any, alpha: Any, soft_loss: Any = "kl") -> None:
    """Raise the error :func:`distillation_loss` (with labels) would raise for these
    settings, without computing anything: for objectives built ahead of their data."""
    _check_temperature(temperature)
    _check_soft_loss(soft_loss)
    _check_alpha(alpha)


def distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    temperature: float,
    alpha: float | None = None,
    soft_loss: str = "kl",
    scale_by_temperature_squared: bool = True,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Hinton's knowledge-distillation objective, per example.

    .. math::
        \mathcal{L} = \alpha \, \mathrm{CE}\big(y, S_1(z_s)\big)
          + (1 - \alpha) \, T^2 \, \mathrm{KL}\big(S_T(z_t) \,\|\, S_T(z_s)\big)

    **``alpha`` weights the hard-label term** (the cross-entropy with the true
    ``labels`` at ``T = 1``), as in Hinton et al.; ``1 - alpha`` weights the soft term.
    Some libraries use the opposite convention: ``alpha=0.1`` here means "mostly soft".

    The ``T**2`` factor keeps the soft term's gradients on the scale of the hard term's
    as ``T`` changes (Hinton et al., section 2); ``scale_by_temperature_squared=False``
    drops it. With it, the gradient of the soft term with respect to the student logits
    is ``T * (S_T(z_s) - S_T(z_t))``.

    ``soft_loss="ce"`` uses the soft cross-entropy ``-sum S_T(z_t) log S_T(z_s)``
    instead of the KL divergence: the same gradient, larger by the teacher's entropy.

    The teacher's logits are an input, not a model, so logits cached once for the
    whole transfer set work; they sit under ``jax.lax.stop_gradient``. Masked
    (``-inf``) classes in the teacher contribute nothing.

    Args:
      student_logits: ``[..., C]`` logits of the student being trained.
      teacher_logits: ``[..., C]`` logits of the frozen teacher.
      labels: ``[...]`` integer labels or ``[..., C]`` probabilities for the hard term;
        ``None`` gives the soft term alone (``T**2 * KL``, with ``alpha`` left unset).
      temperature: ``T > 0`` for the soft term.
      alpha: weight of the hard-label term in ``[0, 1]``; required with ``labels``.
      soft_loss: ``"kl"`` or ``"ce"``.
      scale_by_temperature_squared: multiply the soft term by ``T**2``.
      axis: the class axis.
      where: optional boolean class mask, broadcastable to the logits.

    Returns:
      ``[...]``: the loss per example.

    Example:
      >>> import jax.numpy as jnp
      >>> from kdvae.losses import distillation_loss
      >>> s, t = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[1.0, 2.0, 3.0]])
      >>> distillation_loss(s, t, jnp.array([2]), temperature=4.0, alpha=1.0)
      Array([0.40760595], dtype=float32)

    References:
      Hinton, Vinyals & Dean, *Distilling the Knowledge in a Neural Network*, 2015.
      https://arxiv.org/abs/1503.02531
    """
    _check_temperature(temperature)
    _check_soft_loss(soft_loss)
    student = _float_array("student_logits", student_logits)
    teacher = _float_array("teacher_logits", teacher_logits)
    if student.shape != teacher.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{student.shape} and {teacher.shape}."
        )
    axis = _check_axis("student_logits", axis, student.ndim)
    if labels is None:
        if alpha is not None:
            raise ValueError(
                f"alpha={alpha!r} weights the hard-label term, but labels is None; "
                "leave alpha unset to get the soft term alone."
            )
    else:
        _check_alpha(alpha)

    teacher = jax.lax.stop_gradient(teacher)
    log_p_t = tempered_log_softmax(teacher, temperature=temperature, axis=axis, where=where)
    log_p_s = tempered_log_softmax(student, temperature=temperature, axis=axis, where=where)
    p_t = jnp.exp(log_p_t)
    if soft_loss == "kl":
        # One sum of p_t (log p_t - log p_s), not a difference of two cross-entropies:
        # T**2 magnifies the float32 rounding of the latter at large T.
        soft = _sum_plogq(p_t, log_p_t - log_p_s, axis)
    else:
        soft = -_sum_plogq(p_t, log_p_s, axis)
    if scale_by_temperature_squared:
        soft = soft * temperature**2
    if labels is None:
        return soft
    hard = tempered_cross_entropy(student, labels, axis=axis, where=where)
    return alpha * hard + (1.0 - alpha) * soft


# ------------------------------------------------------ the logit-distillation family
#
# The logit-based losses the distillation literature compares against. They keep
# distillation_loss's conventions: logits in, the teacher's under stop_gradient, the
# tempered terms scaled by T**2, zero-probability classes contributing exactly 0.


def _check_weight(name: str, value: Any, high: float = math.inf, *, positive: bool = False) -> None:
    """``TypeError``/``ValueError`` naming ``name`` unless ``value`` is a finite number in
    ``[0, high]`` (``(0, high]`` if ``positive``); a traced value is not checked."""
    if isinstance(value, jax.core.Tracer):
        return
    low = "(0" if positive else "[0"
    message = f"{name} must be a finite number in {low}, {high:g}], got {value!r}."
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(message) from err
    if not (math.isfinite(number) and 0.0 <= number <= high) or (positive and number == 0):
        raise ValueError(message)


def _student_and_teacher(
    student_logits: ArrayLike, teacher_logits: ArrayLike, axis: int
) -> tuple[jax.Array, jax.Array, int]:
    """Both logits checked (floating, one shape), the teacher's under ``stop_gradient``;
    and the class axis, made non-negative."""
    student = _float_array("student_logits", student_logits)
    teacher = _float_array("teacher_logits", teacher_logits)
    if student.shape != teacher.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{student.shape} and {teacher.shape}."
        )
    axis = _check_axis("student_logits", axis, student.ndim)
    return student, jax.lax.stop_gradient(teacher), axis


def _log_sum_exp(x: jax.Array, axis: int) -> jax.Array:
    """``log sum exp(x)`` over ``axis`` (kept): ``-inf`` for a slice of ``-inf`` only, with
    a finite gradient there too (``jax.nn.logsumexp``'s is NaN)."""
    top = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    total = jnp.sum(jnp.exp(x - top), axis=axis, keepdims=True)  # >= 1 unless all -inf
    return jnp.where(total > 0, top + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)


def _target_split(
    logits: jax.Array, is_target: jax.Array, temperature: Any, axis: int, where: Any
) -> tuple[jax.Array, jax.Array]:
    """For ``p = S_T(logits)`` and the target class ``y``: ``log (p_y, 1 - p_y)`` (a
    two-class axis at ``axis``) and the log-softmax over the classes other than ``y``
    (``-inf`` at ``y``), each from the tempered logits, without forming ``1 - p_y``."""
    scaled = _shifted_and_scaled(logits, temperature, axis, where)[0]  # max 0; masked -inf
    others = jnp.where(is_target, -jnp.inf, scaled)
    log_rest = _log_sum_exp(others, axis)  # log sum_{i != y} exp(z_i / T), shifted
    log_norm = jnp.log(jnp.sum(jnp.exp(scaled), axis=axis, keepdims=True))  # in [0, log C]
    target = jnp.sum(jnp.where(is_target, scaled, 0.0), axis=axis, keepdims=True)
    binary = jnp.concatenate([target, log_rest], axis=axis) - log_norm
    return binary, others - jnp.where(log_rest > -jnp.inf, log_rest, 0.0)


def _kl(log_p: jax.Array, log_q: jax.Array, axis: int) -> jax.Array:
    """``KL(p || q)`` over ``axis`` from log-probabilities, ``0 log 0 = 0``."""
    return _sum_plogq(jnp.exp(log_p), log_p - log_q, axis)


def decoupled_kd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Zhao et al.'s decoupled knowledge distillation (DKD), per example.

    .. math::
        \mathcal{L} = \alpha \, \mathrm{TCKD} + \beta \, \mathrm{NCKD}, \quad
        \mathrm{TCKD} = T^2 \, \mathrm{KL}\big(b^t \,\|\, b^s\big), \quad
        \mathrm{NCKD} = T^2 \, \mathrm{KL}\big(\hat p^t \,\|\, \hat p^s\big)

    For the tempered probabilities :math:`p = S_T(z)` and the true class :math:`y`,
    :math:`b = (p_y, 1 - p_y)` is the binary target-versus-rest distribution and
    :math:`\hat p_i = p_i / (1 - p_y)`, :math:`i \ne y`, the distribution among the
    non-target classes. **``alpha`` weights TCKD** (target-class KD) and **``beta``
    weights NCKD** (non-target-class KD). Hinton's soft term is the special case
    (Zhao et al., eq. 5)

    .. math::
        T^2 \, \mathrm{KL}\big(S_T(z_t) \,\|\, S_T(z_s)\big)
          = \mathrm{TCKD} + (1 - p^t_y) \, \mathrm{NCKD},

    which ties NCKD's weight to the teacher's confidence; DKD sets both weights freely.

    Everything comes from the tempered logits in log space: ``log(1 - p_y)`` is the
    log-sum-exp of the other classes, accurate where ``1 - p_y`` rounds to 0, and the
    non-target distribution is a log-softmax over the other classes (what the official
    code approximates by subtracting 1000 from the target's logit). Masked
    (``where=False`` or ``-inf``) classes contribute nothing. The official code also adds
    the hard-label cross-entropy (weight 1) and ramps DKD up over the first 20 epochs;
    both belong to the train step (:func:`tempered_cross_entropy`), not to this loss.

    Args:
      student_logits: ``[..., C]`` logits of the student (classes along ``axis``).
      teacher_logits: ``[..., C]`` logits of the frozen teacher.
      labels: ``[...]`` integer class indices, the target class :math:`y` of each
        example. One outside ``[0, C)`` raises when concrete; under ``jit`` that
        example's loss is NaN.
      temperature: ``T > 0``, shared by teacher and student (4 in the paper's CIFAR-100
        runs).
      alpha: weight of TCKD, ``>= 0`` (1 in the paper).
      beta: weight of NCKD, ``>= 0`` (8 in the paper's CIFAR-100 runs).
      axis: the class axis.
      where: optional boolean class mask, broadcastable to the logits.

    Returns:
      ``[...]``: the loss per example.

    Example:
      >>> import jax.numpy as jnp
      >>> from kdvae.losses import decoupled_kd_loss
      >>> s, t = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[3.0, 2.0, 1.0]])
      >>> decoupled_kd_loss(s, t, jnp.array([0]), temperature=1.0)
      Array([4.6926603], dtype=float32)

    References:
      Zhao, Cui, Song, Qiu & Liang, *Decoupled Knowledge Distillation*, CVPR 2022,
      eqs. (1)-(6). https://arxiv.org/abs/2203.08679
    """
    _check_temperature(temperature)
    _check_weight("alpha", alpha)
    _check_weight("beta", beta)
    student, teacher, axis = _student_and_teacher(student_logits, teacher_logits, axis)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    labels = _integer_labels(labels, student.shape, axis)
    where = _check_where(where, student.shape)
    classes = jax.lax.broadcasted_iota(jnp.int32, student.shape, axis)
    is_target = classes == jnp.expand_dims(labels, axis)
    binary_t, others_t = _target_split(teacher, is_target, temperature, axis, where)
    binary_s, others_s = _target_split(student, is_target, temperature, axis, where)
    tckd = _kl(binary_t, binary_s, axis)
    nckd = _kl(others_t, others_s, axis)
    loss = temperature**2 * (alpha * tckd + beta * nckd)
    # Under jit labels cannot be checked: one out of [0, C) gives NaN, not another loss.
    return jnp.where((labels >= 0) & (labels < student.shape[axis]), loss, jnp.nan)


def _centered_norm(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """``x - mean(x)`` along ``axis`` and its Euclidean norm (with a finite gradient at 0)."""
    centered = x - jnp.mean(x, axis=axis, keepdims=True)
    square = jnp.sum(jnp.square(centered), axis=axis)
    norm = jnp.where(square > 0, jnp.sqrt(jnp.where(square > 0, square, 1.0)), 0.0)
    return centered, norm


def _pearson_distance(a: jax.Array, b: jax.Array, axis: int, eps: float = 1e-8) -> jax.Array:
    """``1 - rho(a, b)`` along ``axis``: DIST's ``d_p``, with the official code's ``eps``."""
    a, norm_a = _centered_norm(a, axis)
    b, norm_b = _centered_norm(b, axis)
    return 1.0 - jnp.sum(a * b, axis=axis) / (norm_a * norm_b + eps)


def dist_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> jax.Array:
    r"""Huang et al.'s DIST: match the teacher's relations, not its probabilities.

    .. math::
        \mathcal{L} = T^2 \Big(\frac{\beta}{B} \sum_{b=1}^{B}
            \big(1 - \rho(Y^s_{b,:}, Y^t_{b,:})\big)
          + \frac{\gamma}{C} \sum_{c=1}^{C} \big(1 - \rho(Y^s_{:,c}, Y^t_{:,c})\big)\Big)

    with :math:`Y = S_T(z)` the ``[B, C]`` tempered probabilities and :math:`\rho`
    Pearson's correlation. **``beta`` weights the inter-class term**, which correlates
    each example's probabilities across the classes; **``gamma`` the intra-class term**,
    which correlates each class's probabilities across the batch.

    **One value per batch, not per example.** The intra-class term spans the batch, so
    the loss does not split into per-example values: this returns a scalar, with the
    inter-class term already averaged over the batch and the intra-class term over the
    classes (the paper's loss; take no further mean). It depends on which examples share
    the batch, and a batch of one has no intra-class correlation (refused). ``vmap`` it
    over a stack of batches for one value per batch.

    As in the official code (and its ``T**2``), :math:`\rho = \mathrm{cov}(a, b) /
    (\|a - \bar a\| \, \|b - \bar b\| + 10^{-8})`: a row or column of constant
    probabilities (a class that is ``-inf`` throughout, or all-equal logits) has
    correlation 0, not NaN. The ``1e-8`` is negligible unless the probabilities are
    nearly flat (for O(1) logits and 10 classes, ``T`` in the thousands).

    Args:
      student_logits: ``[B, C]`` logits of the student: batch axis 0, class axis 1.
      teacher_logits: ``[B, C]`` logits of the frozen teacher.
      temperature: ``T > 0``, shared by teacher and student (1 in the paper's ImageNet
        runs).
      beta: weight of the inter-class term, ``>= 0`` (1 in the paper).
      gamma: weight of the intra-class term, ``>= 0`` (1 in the paper).

    Returns:
      ``[]``: the loss of the batch, a scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> from kdvae.losses import dist_loss
      >>> s = jnp.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
      >>> print(f"{dist_loss(s, s):.4f}, {dist_loss(s, -s):.4f}")  # the same relations: 0
      0.0000, 3.9335

    References:
      Huang, You, Wang, Qian & Xu, *Knowledge Distillation from A Stronger Teacher*,
      NeurIPS 2022, eqs. (6)-(9). https://arxiv.org/abs/2205.10536
    """
    _check_temperature(temperature)
    _check_weight("beta", beta)
    _check_weight("gamma", gamma)
    student, teacher, _ = _student_and_teacher(student_logits, teacher_logits, -1)
    if student.ndim != 2 or min(student.shape) < 2:
        raise ValueError(
            "student_logits and teacher_logits must be [batch, classes] with at least 2 of "
            f"each (DIST correlates across both), got shape {student.shape}."
        )
    y_s = tempered_softmax(student, temperature=temperature)
    y_t = tempered_softmax(teacher, temperature=temperature)
    inter = jnp.mean(_pearson_distance(y_s, y_t, axis=1))
    intra = jnp.mean(_pearson_distance(y_s, y_t, axis=0))
    return temperature**2 * (beta * inter + gamma * intra)


def standardize_logits(
    logits: ArrayLike,
    *,
    axis: int = -1,
    eps: float = 1e-7,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Sun et al.'s logit standardization: each example's logits as z-scores.

    .. math::
        Z(z)_i = \frac{z_i - \bar z}{\sigma(z) + \epsilon}, \quad
        \bar z = \frac1C \sum_j z_j, \quad
        \sigma(z) = \Big(\frac1C \sum_j (z_j - \bar z)^2\Big)^{1/2}

    A transform to put before a logit-based loss, not a loss: standardize the student's
    and the teacher's logits and pass both on with the paper's *base temperature*
    :math:`\tau` (2 in its ablations), e.g.
    ``distillation_loss(standardize_logits(s), standardize_logits(t), y, temperature=2.0,
    alpha=...)`` or ``decoupled_kd_loss(standardize_logits(s), standardize_logits(t), y,
    temperature=2.0)``: the paper's ``softmax(Z(z) / tau)`` with the ``tau**2``-scaled
    KL. The student then matches the teacher's logit relations rather than their shift
    and scale: the loss no longer changes when a constant is added to either model's
    logits or they are multiplied by a positive number.

    ``sigma`` divides by ``C`` (the paper's Algorithm 1); the official code's
    ``torch.std`` divides by ``C - 1``, which makes its output smaller by a factor
    ``sqrt((C - 1) / C)``, as if the base temperature were larger by its inverse. As in
    that code, ``eps`` is added to ``sigma``, so a constant row (zero variance) becomes
    zeros, not NaN. It is computed on the logits shifted by their maximum and scaled by
    their range (which cancel), exact for logits with a large common offset and finite up
    to the float32 maximum. Masked (``where=False``) and ``-inf`` classes are left out of
    the mean and the deviation and stay ``-inf`` (probability 0 after a softmax).

    Args:
      logits: ``[..., C, ...]`` logits, classes along ``axis``.
      axis: the class axis.
      eps: ``> 0``, added to the standard deviation.
      where: optional boolean class mask, broadcastable to ``logits``.

    Returns:
      An array shaped like ``logits``: mean 0 and standard deviation (almost) 1 over the
      unmasked classes of each example.

    Example:
      >>> import jax.numpy as jnp
      >>> from kdvae.losses import standardize_logits
      >>> standardize_logits(jnp.array([[1.0, 3.0], [5.0, 5.0]])).round(4)
      Array([[-1.,  1.],
             [ 0.,  0.]], dtype=float32)

    References:
      Sun, Ren, Li, Wang & Cao, *Logit Standardization in Knowledge Distillation*,
      CVPR 2024, Algorithms 1 and 2. https://arxiv.org/abs/2403.01427
    """
    logits = _float_array("logits", logits)
    axis = _check_axis("logits", axis, logits.ndim)
    _check_weight("eps", eps, positive=True)
    where = _check_where(where, logits.shape)
    visible = logits > -jnp.inf if where is None else where & (logits > -jnp.inf)
    count = jnp.sum(visible, axis=axis, keepdims=True)
    # Shifted so the largest is 0 and halved, so z - max z cannot overflow; divided by its
    # range clipped to [1, 2**100], so the squares cannot (a larger divisor would have a
    # subnormal reciprocal, which XLA on a CPU flushes to 0). Neither changes the result:
    # out = c / (sigma + eps), with the centred c and sigma both divided by 2 * scale (and
    # stop_gradient is exact, as the result does not depend on the shift or the scale).
    top = jnp.max(jnp.where(visible, logits, -jnp.inf), axis=axis, keepdims=True)
    shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    x = jnp.where(visible, 0.5 * logits - 0.5 * shift, 0.0)  # in [-max |z|, 0]
    scale = jnp.clip(-jnp.min(x, axis=axis, keepdims=True), 1.0, 2.0**100)
    scale = jax.lax.stop_gradient(scale)
    x = x / scale
    centered = jnp.where(visible, x - jnp.sum(x, axis=axis, keepdims=True) / count, 0.0)
    variance = jnp.sum(jnp.square(centered), axis=axis, keepdims=True) / count
    sigma = jnp.where(variance > 0, jnp.sqrt(jnp.where(variance > 0, variance, 1.0)), 0.0)
    out = centered / (sigma + eps / (2.0 * scale))
    return jnp.where(visible, out, -jnp.inf)


def reverse_kl_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""The reverse KL divergence ``T**2 * KL(student || teacher)``, per example.

    .. math::
        \mathcal{L} = T^2 \, \mathrm{KL}\big(S_T(z_s) \,\|\, S_T(z_t)\big)
          = T^2 \sum_i S_T(z_s)_i \big(\log S_T(z_s)_i - \log S_T(z_t)_i\big)

    Hinton's soft term (:func:`distillation_loss`) is the forward ``KL(teacher ||
    student)``, which makes the student cover every class the teacher gives mass; the
    reverse direction is mode-seeking: it penalises student mass where the teacher has
    little, and lets the student drop teacher modes. GKD studies it for language models
    (with ``T = 1``); the ``T**2`` keeps the gradient's scale as ``T`` changes, as in
    :func:`distillation_loss`. Classes of student probability 0 (masked or ``-inf``)
    contribute exactly 0; student mass on a class the teacher gives probability 0 makes
    the loss ``+inf``.

    Args:
      student_logits: ``[..., C]`` logits of the student (classes along ``axis``).
      teacher_logits: ``[..., C]`` logits of the frozen teacher.
      temperature: ``T > 0``, shared by teacher and student.
      axis: the class axis.
      where: optional boolean class mask, broadcastable to the logits.

    Returns:
      ``[...]``: the loss per example.

    Example:
      >>> import jax.numpy as jnp
      >>> from kdvae.losses import reverse_kl_loss
      >>> reverse_kl_loss(jnp.array([[0.0, 0.0]]), jnp.array([[0.0, jnp.log(3.0)]]))
      Array([0.14384101], dtype=float32)

    References:
      Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist & Bachem, *On-Policy
      Distillation of Language Models: Learning from Self-Generated Mistakes*, ICLR
      2024, section 2. https://arxiv.org/abs/2306.13649
    """
    _check_temperature(temperature)
    student, teacher, axis = _student_and_teacher(student_logits, teacher_logits, axis)
    log_p_s = tempered_log_softmax(student, temperature=temperature, axis=axis, where=where)
    log_p_t = tempered_log_softmax(teacher, temperature=temperature, axis=axis, where=where)
    return temperature**2 * _kl(log_p_s, log_p_t, axis)


def _log_mixture(log_p: jax.Array, log_q: jax.Array, weight: Any) -> jax.Array:
    """``log(weight p + (1 - weight) q)`` from ``log p`` and ``log q``, elementwise: a
    two-term log-sum-exp, ``-inf`` (with a finite gradient) where both are ``-inf``."""
    a = log_p + jnp.log(weight)
    b = log_q + jnp.log1p(-weight)
    top = jnp.maximum(a, b)
    gap = jnp.where(top > -jnp.inf, jnp.minimum(a, b) - top, -jnp.inf)  # <= 0
    return top + jnp.log1p(jnp.exp(gap))


def generalized_jsd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""The generalized Jensen-Shannon divergence of GKD (Agarwal et al.), per example.

    .. math::
        \mathcal{L} = T^2 \Big(\beta \, \mathrm{KL}(p_t \,\|\, m)
          + (1 - \beta) \, \mathrm{KL}(p_s \,\|\, m)\Big), \quad
        m = \beta \, p_t + (1 - \beta) \, p_s

    for the tempered teacher and student probabilities :math:`p_t = S_T(z_t)`,
    :math:`p_s = S_T(z_s)`; ``beta = 0.5`` is the Jensen-Shannon divergence. For
    ``0 < beta < 1`` it is finite even where one model gives a class probability 0
    (``m >= beta p_t`` and ``m >= (1 - beta) p_s``). The mixture is formed in log space,
    ``log m = logaddexp(log p_t + log beta, log p_s + log(1 - beta))``, accurate however
    small the probabilities; zero-probability (masked or ``-inf``) classes contribute
    exactly 0.

    **The ends, beta = 0 and 1.** Near them the formula is a scaled KL:
    ``beta * KL(p_t || p_s)`` as ``beta -> 0`` and ``(1 - beta) * KL(p_s || p_t)`` as
    ``beta -> 1`` (to first order). So its gradient turns from the forward KL's to the
    reverse KL's, which is the sense in which GKD says JSD(beta) interpolates between
    the two, while its value tends to 0. Following GKD's convention (as in TRL's
    ``GKDTrainer``), ``beta=0`` gives the forward KL ``T**2 * KL(p_t || p_s)``
    (:func:`distillation_loss`'s soft term) and ``beta=1`` the reverse KL
    ``T**2 * KL(p_s || p_t)`` (:func:`reverse_kl_loss`), not the limit 0: the value jumps
    there (by a factor of about ``1 / beta`` near 0, ``1 / (1 - beta)`` near 1). A traced
    ``beta`` (a schedule) is handled the same way.

    Args:
      student_logits: ``[..., C]`` logits of the student (classes along ``axis``).
      teacher_logits: ``[..., C]`` logits of the frozen teacher.
      beta: the teacher's weight in the mixture ``m``, in ``[0, 1]``.
      temperature: ``T > 0``, shared by teacher and student (GKD uses 1).
      axis: the class axis.
      where: optional boolean class mask, broadcastable to the logits.

    Returns:
      ``[...]``: the loss per example.

    Example:
      >>> import jax.numpy as jnp
      >>> from kdvae.losses import generalized_jsd_loss
      >>> s, t = jnp.array([[0.0, -jnp.inf]]), jnp.array([[-jnp.inf, 0.0]])
      >>> generalized_jsd_loss(s, t)  # disjoint supports: log 2
      Array([0.6931472], dtype=float32)

    References:
      Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist & Bachem, *On-Policy
      Distillation of Language Models: Learning from Self-Generated Mistakes*, ICLR
      2024, section 2. https://arxiv.org/abs/2306.13649
    """
    _check_temperature(temperature)
    _check_weight("beta", beta, high=1.0)
    student, teacher, axis = _student_and_teacher(student_logits, teacher_logits, axis)
    log_p_s = tempered_log_softmax(student, temperature=temperature, axis=axis, where=where)
    log_p_t = tempered_log_softmax(teacher, temperature=temperature, axis=axis, where=where)
    traced = isinstance(beta, jax.core.Tracer)
    if not traced and beta in (0, 1):
        forward = beta == 0
        return temperature**2 * (
            _kl(log_p_t, log_p_s, axis) if forward else _kl(log_p_s, log_p_t, axis)
        )
    log_m = _log_mixture(log_p_t, log_p_s, beta)
    jsd = beta * _kl(log_p_t, log_m, axis) + (1.0 - beta) * _kl(log_p_s, log_m, axis)
    if traced:
        ends = jnp.where(beta == 0, _kl(log_p_t, log_p_s, axis), _kl(log_p_s, log_p_t, axis))
        jsd = jnp.where((beta == 0) | (beta == 1), ends, jsd)
    return temperature**2 * jsd


def logit_matching_loss(
    student_logits: ArrayLike, teacher_logits: ArrayLike, *, axis: int = -1
) -> jax.Array:
    r"""Ba & Caruana's logit matching, normalised as KD's high-temperature limit.

    .. math::
        \mathcal{L} = \frac{1}{2C} \sum_{i=1}^{C}
          \big((z_{s,i} - \bar z_s) - (z_{t,i} - \bar z_t)\big)^2

    half the mean over classes of the squared difference of the zero-mean logits. Its
    gradient with respect to the student's logits,
    :math:`\big((z_s - \bar z_s) - (z_t - \bar z_t)\big) / C`, is exactly the limit as
    ``T -> inf`` of the gradient of Hinton's soft term (:func:`distillation_loss`),
    :math:`T \big(S_T(z_s) - S_T(z_t)\big)` (Hinton et al., section 2.1): logit matching
    is distillation at infinite temperature, and with this normalisation one can replace
    the other at the same learning rate. Ba & Caruana's own loss,
    :math:`\tfrac12 \|z_s - z_t\|^2` per example, is ``C`` times this for zero-mean
    logits; the means are subtracted because a softmax ignores a shift of all logits.

    Logits must be finite (a ``-inf`` logit has no squared distance); the value is
    ``+inf`` where the squares exceed the float32 maximum (differences beyond ~1e19).

    Args:
      student_logits: ``[..., C]`` logits of the student (classes along ``axis``).
      teacher_logits: ``[..., C]`` logits of the frozen teacher.
      axis: the class axis.

    Returns:
      ``[...]``: the loss per example.

    Example:
      >>> import jax.numpy as jnp
      >>> from kdvae.losses import logit_matching_loss
      >>> logit_matching_loss(jnp.array([[1.0, 3.0]]), jnp.array([[10.0, 10.0]]))
      Array([0.5], dtype=float32)

    References:
      Ba & Caruana, *Do Deep Nets Really Need to be Deep?*, NeurIPS 2014, section 2.2.
      https://arxiv.org/abs/1312.6184 ; Hinton, Vinyals & Dean, 2015, section 2.1.
      https://arxiv.org/abs/1503.02531
    """
    student, teacher, axis = _student_and_teacher(student_logits, teacher_logits, axis)
    difference = student - teacher
    centered = difference - jnp.mean(difference, axis=axis, keepdims=True)
    return 0.5 * jnp.mean(jnp.square(centered), axis=axis)


# ----------------------------------------------------------------- Gaussians & VAE


def reparameterize(
    key: jax.Array,
    mean: ArrayLike,
    logvar: ArrayLike,
    *,
    num_samples: int | None = None,
) -> jax.Array:
    r"""Sample ``z ~ N(mean, exp(logvar))`` differentiably in ``mean`` and ``logvar``.

    .. math::
        z = \mu + \exp(\tfrac12 \log\sigma^2) \odot \epsilon, \quad \epsilon \sim N(0, I)

    Args:
      key: a PRNG key.
      mean: ``[..., L]`` posterior means.
      logvar: ``[..., L]`` posterior log-variances.
      num_samples: ``None`` for one sample shaped like ``mean``; an int ``S`` for
        ``[S, ..., L]``.

    Returns:
      ``[..., L]`` or ``[S, ..., L]`` samples.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from kdvae.losses import reparameterize
      >>> reparameterize(jax.random.key(0), jnp.zeros(3), jnp.zeros(3), num_samples=2).shape
      (2, 3)

    References:
      Kingma & Welling, *Auto-Encoding Variational Bayes*, 2014, section 2.4.
      https://arxiv.org/abs/1312.6114
    """
    mean, logvar = _gaussian_parameters(mean, logvar)
    eps = _standard_normal_noise(key, mean, num_samples)
    return _reparameterized(mean, logvar, eps)


def _gaussian_parameters(mean: ArrayLike, logvar: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """``mean`` and ``logvar`` as floating arrays of one shape, else a ``ValueError``."""
    mean = _float_array("mean", mean)
    logvar = _float_array("logvar", logvar)
    if mean.shape != logvar.shape:
        raise ValueError(f"mean and logvar must match, got {mean.shape} and {logvar.shape}.")
    return mean, logvar


def _standard_normal_noise(key: jax.Array, mean: jax.Array, num_samples: Any) -> jax.Array:
    """``eps ~ N(0, I)`` shaped like ``mean``, or ``[S, *mean.shape]`` for ``S`` samples."""
    _check_key(key)
    shape = mean.shape
    if num_samples is not None:
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}.")
        shape = (num_samples, *shape)
    return kernels.normal(key, shape, mean.dtype)  # jax.random.normal's values (faster on a CPU)


def _reparameterized(mean: jax.Array, logvar: jax.Array, eps: jax.Array) -> jax.Array:
    """``z = mu + sigma * eps``: the reparameterization."""
    return mean + jnp.exp(0.5 * logvar) * eps


def gaussian_kl(mean: ArrayLike, logvar: ArrayLike, *, axis: int = -1) -> jax.Array:
    r"""``KL(N(mean, diag(exp(logvar))) || N(0, I))``, summed over the latent axis.

    .. math::
        \mathrm{KL} = \tfrac12 \sum_l \big(\mu_l^2 + \sigma_l^2 - 1 - \log\sigma_l^2\big)

    Computed as ``expm1(logvar) - logvar`` so it stays accurate near ``logvar = 0``.

    Args:
      mean: ``[..., L]`` means of ``q``.
      logvar: ``[..., L]`` log-variances of ``q``.
      axis: the latent axis, summed over.

    Returns:
      ``[...]``: one non-negative KL per example.

    Example:
      >>> import jax.numpy as jnp
      >>> from kdvae.losses import gaussian_kl
      >>> gaussian_kl(jnp.array([1.0, 0.0]), jnp.zeros(2))
      Array(0.5, dtype=float32)

    References:
      Kingma & Welling, 2014, appendix B. https://arxiv.org/abs/1312.6114
    """
    mean, logvar = _gaussian_parameters(mean, logvar)
    axis = _check_axis("mean", axis, mean.ndim)
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.expm1(logvar) - logvar, axis=axis)


def diagonal_gaussian_kl(
    mean_q: ArrayLike,
    logvar_q: ArrayLike,
    mean_p: ArrayLike,
    logvar_p: ArrayLike,
    *,
    axis: int = -1,
) -> jax.Array:
    r"""``KL(q || p)`` between two diagonal Gaussians, summed over the latent axis.

    .. math::
        \mathrm{KL} = \tfrac12 \sum_l \Big(\frac{\sigma_{q,l}^2 + (\mu_{q,l} - \mu_{p,l})^2}
          {\sigma_{p,l}^2} - 1 + \log\sigma_{p,l}^2 - \log\sigma_{q,l}^2\Big)

    Args:
      mean_q, logvar_q: ``[..., L]`` parameters of ``q``.
      mean_p, logvar_p: ``[..., L]`` parameters of ``p`` (broadcastable to ``q``'s).
      axis: the latent axis, summed over.

    Returns:
      ``[...]``: one non-negative KL per example.

    Example:
      >>> import jax.numpy as jnp
      >>> from kdvae.losses import diagonal_gaussian_kl
      >>> diagonal_gaussian_kl(jnp.ones(2), jnp.zeros(2), jnp.ones(2), jnp.zeros(2))
      Array(0., dtype=float32)
    """
    mean_q, logvar_q = _float_array("mean_q", mean_q), _float_array("logvar_q", logvar_q)
    mean_p, logvar_p = _float_array("mean_p", mean_p), _float_array("logvar_p", logvar_p)
    try:
        shape = jnp.broadcast_shapes(mean_q.shape, logvar_q.shape, mean_p.shape, logvar_p.shape)
    except ValueError as err:
        raise ValueError(
            "the Gaussians' parameters must broadcast together, got shapes "
            f"{mean_q.shape}, {logvar_q.shape}, {mean_p.shape}, {logvar_p.shape}."
        ) from err
    axis = _check_axis("mean_q", axis, len(shape))
    log_ratio = logvar_q - logvar_p  # log(var_q / var_p)
    mahalanobis = _standardized_square(mean_q - mean_p, logvar_p)
    per_dim = 0.5 * (jnp.expm1(log_ratio) - log_ratio + mahalanobis)
    return jnp.sum(jnp.broadcast_to(per_dim, shape), axis=axis)


def _standardized_square(diff: jax.Array, logvar: jax.Array) -> jax.Array:
    """``diff**2 / exp(logvar)``, and exactly 0 where ``diff == 0`` at any ``logvar``.

    Scaling ``diff`` by ``exp(-logvar / 2)`` before squaring overflows only below
    ``logvar = -177`` in float32 (``exp(-logvar)`` does below -88); the ``where`` keeps
    ``0 * inf`` from turning a zero residual under a vanishing variance into NaN, in
    the value and in the gradient.
    """
    safe_logvar = jnp.where(diff == 0, 0.0, logvar)
    return jnp.square(diff * jnp.exp(-0.5 * safe_logvar))


def _normal_log_density(
    standardized_square: jax.Array, logvar: ArrayLike, axis: int | tuple[int, ...]
) -> jax.Array:
    r"""``log N(x; mu, sigma^2)``, summed over ``axis``: the one Gaussian log-density here.

    .. math::
        \log N(x; \mu, \sigma^2) = -\tfrac12 \sum \big(u^2 + \log 2\pi + \log\sigma^2\big),
          \quad u = (x - \mu) / \sigma

    It takes ``u**2`` so each caller forms it the accurate way: ``eps**2`` for a
    reparameterized sample ``z = mu + sigma * eps`` (``z - mu`` would lose the digits
    ``z`` shares with ``mu``), ``z**2`` under the prior ``N(0, I)``, and
    :func:`_standardized_square` for data.
    """
    return -0.5 * jnp.sum(standardized_square + _LOG_2PI + logvar, axis=axis)


def _check_event_ndim(event_ndim: int, ndim: int) -> tuple[int, ...]:
    if not isinstance(event_ndim, int) or not 0 <= event_ndim <= ndim:
        raise ValueError(f"event_ndim must be an int in [0, {ndim}], got {event_ndim!r}.")
    return tuple(range(ndim - event_ndim, ndim))


def bernoulli_log_likelihood(logits: ArrayLike, x: ArrayLike, *, event_ndim: int = 1) -> jax.Array:
    r"""``log p(x | logits)`` of independent Bernoullis, summed over the event axes.

    .. math::
        \log p(x) = \sum_d x_d \log\sigma(l_d) + (1 - x_d) \log\sigma(-l_d)

    Computed in the stable form ``-(max(l, 0) - l x + log1p(exp(-|l|)))``, so logits
    of any finite size are exact: one ``exp`` and one ``log1p`` per pixel, where
    ``optax.sigmoid_binary_cross_entropy`` takes two of each (``benchmarks/losses.py``
    times the ELBO against the optax composition). ``x`` may hold grey levels in ``[0, 1]`` (the
    continuous relaxation) as well as binary values.

    Args:
      logits: ``[..., D1, ..., Dk]`` Bernoulli logits.
      x: observations broadcastable to ``logits``, in ``[0, 1]``.
      event_ndim: ``k``, how many trailing axes form one observation (``1`` for
        flattened images ``[B, 784]``, ``3`` for ``[B, 28, 28, 1]``).

    Returns:
      ``[...]``: the log-likelihood per example (the event axes summed).

    Example:
      >>> import jax.numpy as jnp
      >>> from kdvae.losses import bernoulli_log_likelihood
      >>> bernoulli_log_likelihood(jnp.zeros((1, 2)), jnp.ones((1, 2)))
      Array([-1.3862944], dtype=float32)
    """
    logits = _float_array("logits", logits)
    x = jnp.asarray(x, dtype=logits.dtype)
    try:
        shape = jnp.broadcast_shapes(logits.shape, x.shape)
    except ValueError as err:
        raise ValueError(
            f"x with shape {x.shape} does not broadcast with logits of shape {logits.shape}."
        ) from err
    axes = _check_event_ndim(event_ndim, len(shape))
    logits, x = jnp.broadcast_to(logits, shape), jnp.broadcast_to(x, shape)
    # where(l >= 0, l, 0), not maximum(l, 0): JAX gives maximum slope 1/2 at 0 but abs
    # slope 1, which would make the gradient at l = 0 x - 1 instead of x - 1/2.
    relu = jnp.where(logits >= 0, logits, 0.0)
    nll = relu - logits * x + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return -jnp.sum(nll, axis=axes)


def gaussian_log_likelihood(
    mean: ArrayLike, logvar: ArrayLike, x: ArrayLike, *, event_ndim: int = 1
) -> jax.Array:
    r"""``log N(x; mean, diag(exp(logvar)))``, summed over the event axes.

    .. math::
        \log p(x) = -\tfrac12 \sum_d \big(\log 2\pi + \log\sigma_d^2
          + (x_d - \mu_d)^2 / \sigma_d^2\big)

    Args:
      mean: ``[..., D1, ..., Dk]`` means.
      logvar: log-variances broadcastable to ``mean``.
      x: observations broadcastable to ``mean``.
      event_ndim: ``k``, how many trailing axes form one observation.

    Returns:
      ``[...]``: the log-density per example.

    Example:
      >>> import jax.numpy as jnp
      >>> from kdvae.losses import gaussian_log_likelihood
      >>> gaussian_log_likelihood(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1))
      Array(-0.9189385, dtype=float32)
    """
    mean = _float_array("mean", mean)
    logvar = _float_array("logvar", logvar)
    x = jnp.asarray(x, dtype=mean.dtype)
    try:
        shape = jnp.broadcast_shapes(mean.shape, logvar.shape, x.shape)
    except ValueError as err:
        raise ValueError(
            f"mean {mean.shape}, logvar {logvar.shape} and x {x.shape} must broadcast together."
        ) from err
    axes = _check_event_ndim(event_ndim, len(shape))
    # The standardized square has the broadcast shape of x, mean and logvar.
    return _normal_log_density(_standardized_square(x - mean, logvar), logvar, axes)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class DiagonalGaussian:
    r"""The diagonal Gaussian ``N(mean, diag(exp(logvar)))`` as a value: a VAE's ``q(z|x)``.

    .. math::
        q(z) = \prod_l N\big(z_l; \mu_l, \exp(\log\sigma_l^2)\big)

    A pytree whose leaves are ``mean`` and ``logvar``, so it goes in and out of
    ``jax.jit``, ``vmap`` and ``lax`` loops like an array. The latents are the last
    axis; the axes before it are the batch. The methods are :func:`reparameterize`,
    :func:`gaussian_kl` and :func:`diagonal_gaussian_kl` on its parameters.

    Args:
      mean: ``[..., L]`` means.
      logvar: ``[..., L]`` log-variances (same shape; float32 or wider, as the losses).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from kdvae.losses import DiagonalGaussian
      >>> q = DiagonalGaussian(jnp.zeros((4, 2)), jnp.zeros((4, 2)))
      >>> q.sample(jax.random.key(0), num_samples=3).shape
      (3, 4, 2)
      >>> q.kl_to_standard_normal()
      Array([0., 0., 0., 0.], dtype=float32)

    References:
      Kingma & Welling, *Auto-Encoding Variational Bayes*, 2014, section 2.4 and
      appendix B. https://arxiv.org/abs/1312.6114 (The interface follows distrax's
      ``Normal``: ``sample``, ``sample_and_log_prob``, ``log_prob``, ``kl_divergence``.)
    """

    mean: jax.Array
    logvar: jax.Array

    def __post_init__(self):
        mean, logvar = _gaussian_parameters(self.mean, self.logvar)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "logvar", logvar)

    def tree_flatten(self) -> tuple[tuple[jax.Array, jax.Array], None]:
        return (self.mean, self.logvar), None

    @classmethod
    def tree_unflatten(cls, _: None, leaves: Any) -> DiagonalGaussian:
        # Unchecked: JAX rebuilds pytrees with stand-ins for the leaves (None, shapes).
        gaussian = object.__new__(cls)
        object.__setattr__(gaussian, "mean", leaves[0])
        object.__setattr__(gaussian, "logvar", leaves[1])
        return gaussian

    def sample(self, key: jax.Array, *, num_samples: int | None = None) -> jax.Array:
        """Reparameterized ``z ~ q``: ``[..., L]``, or ``[S, ..., L]`` for ``num_samples=S``
        (:func:`reparameterize`)."""
        return reparameterize(key, self.mean, self.logvar, num_samples=num_samples)

    def sample_and_log_prob(
        self, key: jax.Array, *, num_samples: int | None = None
    ) -> tuple[jax.Array, jax.Array]:
        r"""The sample of :meth:`sample` (same key, same ``z``) and its ``log q(z)``.

        The density is taken from the noise, ``-1/2 sum(eps**2 + log 2 pi + logvar)``,
        which is exact where ``z - mean`` would round (a small variance beside a large
        mean).

        Returns:
          ``z``: ``[..., L]`` (or ``[S, ..., L]``); ``log q(z)``: ``[...]`` (or ``[S, ...]``).
        """
        eps = _standard_normal_noise(key, self.mean, num_samples)
        z = _reparameterized(self.mean, self.logvar, eps)
        return z, _normal_log_density(jnp.square(eps), self.logvar, axis=-1)

    def log_prob(self, z: ArrayLike) -> jax.Array:
        """``log q(z)``, summed over the latents: ``z`` of shape ``[..., L]`` (or
        ``[S, ..., L]``, broadcasting against the batch) -> ``[...]`` (or ``[S, ...]``)."""
        z = _float_array("z", z)
        try:
            jnp.broadcast_shapes(z.shape, self.mean.shape)
        except ValueError as err:
            raise ValueError(
                f"z with shape {z.shape} does not broadcast with mean {self.mean.shape}."
            ) from err
        u_square = _standardized_square(z - self.mean, self.logvar)
        return _normal_log_density(u_square, self.logvar, axis=-1)

    def kl_to_standard_normal(self, *, per_dimension: bool = False) -> jax.Array:
        """``KL(q || N(0, I))``: ``[...]`` summed over the latents (:func:`gaussian_kl`),
        or ``[..., L]`` one per latent with ``per_dimension=True`` (for free bits)."""
        if per_dimension:  # each latent as a Gaussian of its own, on a trailing axis of 1
            return gaussian_kl(self.mean[..., None], self.logvar[..., None])
        return gaussian_kl(self.mean, self.logvar)

    def kl(self, other: DiagonalGaussian) -> jax.Array:
        """``KL(self || other)``, summed over the latents: ``[...]``
        (:func:`diagonal_gaussian_kl`; ``other`` broadcasts against ``self``)."""
        if not isinstance(other, DiagonalGaussian):
            raise TypeError(f"other must be a DiagonalGaussian, got {type(other).__name__}.")
        return diagonal_gaussian_kl(self.mean, self.logvar, other.mean, other.logvar)


class ELBOTerms(NamedTuple):
    """The ELBO and its two terms, each ``[B]`` (one value per example).

    ``elbo == reconstruction - beta * kl``.
    """

    elbo: jax.Array
    reconstruction: jax.Array  # E_q[log p(x | z)], Monte-Carlo estimate
    kl: jax.Array  # KL(q(z | x) || p(z)): analytic in elbo, sampled in stl_elbo


_LIKELIHOODS = ("bernoulli", "gaussian")

Decoder = Callable[[jax.Array], Any]


def _decode(decoder: Decoder, z_SxBxL: jax.Array) -> Any:
    """``decoder`` on ``[S * B, L]`` (one flat batch: no extra axis in its matmuls),
    its outputs reshaped back to ``[S, B, ...]``. An output without that leading
    ``S * B`` axis (a shared scalar or per-pixel log-variance) is left to broadcast."""
    s, b = z_SxBxL.shape[:2]
    out = decoder(z_SxBxL.reshape(s * b, *z_SxBxL.shape[2:]))

    def unfold(y):
        y = jnp.asarray(y)
        return y.reshape(s, b, *y.shape[1:]) if y.ndim and y.shape[0] == s * b else y

    return jax.tree.map(unfold, out)


def _log_likelihood(likelihood: str, decoded: Any, x: jax.Array, event_ndim: int) -> jax.Array:
    if likelihood == "bernoulli":
        return bernoulli_log_likelihood(decoded, x, event_ndim=event_ndim)
    mean, logvar = decoded
    return gaussian_log_likelihood(mean, logvar, x, event_ndim=event_ndim)


def _check_vae_args(likelihood: str, num_samples: Any, name: str = "num_samples") -> None:
    if likelihood not in _LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{name} must be a positive int, got {num_samples!r}.")


def _check_posterior(posterior: Any, x: jax.Array, event_ndim: Any) -> None:
    """``posterior`` is a :class:`DiagonalGaussian` with ``x``'s batch shape."""
    if not isinstance(posterior, DiagonalGaussian):
        raise TypeError(
            "posterior must be a DiagonalGaussian (what VAE.encode(x) returns), "
            f"got {type(posterior).__name__}."
        )
    _check_event_ndim(event_ndim, x.ndim)
    batch = x.shape[: x.ndim - event_ndim]
    if posterior.mean.shape[:-1] != batch:
        raise ValueError(
            f"the posterior's batch shape {posterior.mean.shape[:-1]} must be x's, {batch} "
            f"(x of shape {x.shape} with event_ndim={event_ndim})."
        )


def elbo(
    key: jax.Array,
    x: ArrayLike,
    posterior: DiagonalGaussian,
    decoder: Decoder,
    *,
    num_samples: int = 1,
    beta: float = 1.0,
    likelihood: str = "bernoulli",
    event_ndim: int = 1,
) -> ELBOTerms:
    r"""The evidence lower bound per example, with its reconstruction and KL terms.

    .. math::
        \mathrm{ELBO}(x) = \mathbb{E}_{q(z|x)}[\log p(x|z)]
          - \beta \, \mathrm{KL}\big(q(z|x) \,\|\, p(z)\big)

    with ``q(z|x)`` the ``posterior`` (e.g. ``VAE.encode(x)``), ``p(z) = N(0, I)``, the
    expectation estimated with ``num_samples`` reparameterized samples
    (``posterior.sample``) and the KL analytic (``posterior.kl_to_standard_normal``).
    Note the KL's direction: posterior first, prior second.

    Args:
      key: a PRNG key for the samples.
      x: ``[B, ...]`` observations (``event_ndim`` trailing axes each).
      posterior: ``q(z|x)``, a :class:`DiagonalGaussian` of shape ``[B, L]``.
      decoder: ``z -> logits`` (Bernoulli) or ``z -> (mean, logvar)`` (Gaussian), for
        ``z`` of shape ``[S * B, L]`` (the samples folded into the batch axis, sample
        major), returning arrays of shape ``[S * B, D...]`` (a Gaussian log-variance may
        instead be a scalar or ``[D]``, shared).
      num_samples: ``S``, Monte-Carlo samples of ``z`` per example.
      beta: weight of the KL term (1 for the true ELBO; Higgins et al.'s beta-VAE).
      likelihood: ``"bernoulli"`` or ``"gaussian"``.
      event_ndim: how many trailing axes of ``x`` form one observation.

    Returns:
      :class:`ELBOTerms` of ``[B]`` arrays: ``elbo``, ``reconstruction`` and ``kl``.
      Maximise ``elbo``; the training loss is ``-elbo.mean()``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from kdvae.losses import DiagonalGaussian, elbo
      >>> q = DiagonalGaussian(jnp.zeros((4, 2)), jnp.zeros((4, 2)))  # q(z|x), 4 examples
      >>> dec = lambda z: jnp.zeros(z.shape[:-1] + (3,))
      >>> elbo(jax.random.key(0), jnp.ones((4, 3)), q, dec).elbo.shape
      (4,)

    References:
      Kingma & Welling, *Auto-Encoding Variational Bayes*, 2014, eq. (10).
      https://arxiv.org/abs/1312.6114
    """
    _check_vae_args(likelihood, num_samples)
    x = jnp.asarray(x)
    _check_posterior(posterior, x, event_ndim)
    z = posterior.sample(key, num_samples=num_samples)  # [S, B, L]
    log_px_z = _log_likelihood(likelihood, _decode(decoder, z), x, event_ndim)  # [S, B]
    reconstruction = jnp.mean(log_px_z, axis=0)
    kl = posterior.kl_to_standard_normal()
    return ELBOTerms(elbo=reconstruction - beta * kl, reconstruction=reconstruction, kl=kl)


def iwae_bound(
    key: jax.Array,
    x: ArrayLike,
    posterior: DiagonalGaussian,
    decoder: Decoder,
    *,
    num_samples: int,
    chunk_size: int | None = None,
    likelihood: str = "bernoulli",
    event_ndim: int = 1,
) -> jax.Array:
    r"""Burda et al.'s ``k``-sample importance-weighted lower bound on ``log p(x)``.

    .. math::
        \mathcal{L}_k(x) = \log \frac1k \sum_{i=1}^k
          \frac{p(x | z_i)\, p(z_i)}{q(z_i | x)}, \quad z_i \sim q(z | x)

    ``L_1`` is the ELBO (up to Monte-Carlo noise), ``L_k`` rises with ``k`` and tends to
    ``log p(x)``, so with large ``k`` (5000 in Burda et al.) it estimates the
    log-likelihood. The samples are evaluated ``chunk_size`` at a time (a ``lax.map``),
    so memory is that of ``chunk_size`` decoder passes; sample ``i`` is drawn from
    ``fold_in(key, i)`` (``posterior.sample_and_log_prob``), so the result does not
    depend on ``chunk_size``.

    Args:
      key: a PRNG key.
      x: ``[B, ...]`` observations.
      posterior: ``q(z|x)``, a :class:`DiagonalGaussian` of shape ``[B, L]``.
      decoder: as in :func:`elbo`, for ``z`` of shape ``[chunk * B, L]``.
      num_samples: ``k >= 1``.
      chunk_size: samples per decoder pass; ``None`` for all ``k`` at once.
      likelihood: ``"bernoulli"`` or ``"gaussian"``.
      event_ndim: how many trailing axes of ``x`` form one observation.

    Returns:
      ``[B]``: the bound per example, in nats.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from kdvae.losses import DiagonalGaussian, iwae_bound
      >>> q = DiagonalGaussian(jnp.zeros((4, 2)), jnp.zeros((4, 2)))
      >>> dec = lambda z: jnp.zeros(z.shape[:-1] + (3,))
      >>> iwae_bound(jax.random.key(0), jnp.ones((4, 3)), q, dec, num_samples=8).shape
      (4,)

    References:
      Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, 2016, eq. (8).
      https://arxiv.org/abs/1509.00519
    """
    log_w = _iwae_log_weights(key, x, posterior, decoder, num_samples, chunk_size, likelihood,
                              event_ndim)  # fmt: skip
    return jax.nn.logsumexp(log_w, axis=0) - math.log(num_samples)


class ImportanceSampled(NamedTuple):
    """An importance-sampled ``log p(x)`` with its Monte-Carlo error, each ``[B]``."""

    log_px: jax.Array  # the k-sample IWAE bound: log (1/k) sum_i w_i
    standard_error: jax.Array  # its Monte-Carlo standard error (delta method), nats
    ess: jax.Array  # the weights' effective sample size, 1 / sum_i w~_i^2, in [1, k]


def importance_sampled_log_px(
    key: jax.Array,
    x: ArrayLike,
    posterior: DiagonalGaussian,
    decoder: Decoder,
    *,
    num_samples: int,
    chunk_size: int | None = None,
    likelihood: str = "bernoulli",
    event_ndim: int = 1,
) -> ImportanceSampled:
    r"""The ``k``-sample estimate of ``log p(x)`` (:func:`iwae_bound`'s value, same samples
    for the same key) with its Monte-Carlo standard error and effective sample size.

    With weights :math:`w_i = p(x, z_i) / q(z_i|x)` and :math:`\tilde w_i = w_i / \sum_j
    w_j`, the effective sample size is :math:`1 / \sum_i \tilde w_i^2` (Kong 1992), and
    the standard error of :math:`\log \hat p(x) = \log \frac1k \sum_i w_i` by the delta
    method is :math:`\mathrm{sd}(w) / (\sqrt{k}\, \bar w) = \sqrt{1/\mathrm{ESS} - 1/k}`.
    Both come from the same weights as the estimate. A small ESS means ``q`` covers the
    posterior poorly and the standard error is itself unreliable: read them together.
    With ``k = 1`` there is no spread to estimate it from, and the standard error is 0.

    Args:
      key, x, posterior, decoder, num_samples, chunk_size, likelihood, event_ndim: as in
        :func:`iwae_bound`.

    Returns:
      :class:`ImportanceSampled` of ``[B]`` arrays.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from kdvae.losses import DiagonalGaussian, importance_sampled_log_px
      >>> q = DiagonalGaussian(jnp.zeros((4, 2)), jnp.zeros((4, 2)))
      >>> dec = lambda z: jnp.zeros(z.shape[:-1] + (3,))
      >>> est = importance_sampled_log_px(jax.random.key(0), jnp.ones((4, 3)), q, dec,
      ...                                 num_samples=8)
      >>> est.ess.shape, float(est.ess.max()) <= 8
      ((4,), True)

    References:
      Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, 2016, sec. 5.
      Kong, *A Note on Importance Sampling using Standardized Weights*, 1992.
    """
    log_w = _iwae_log_weights(key, x, posterior, decoder, num_samples, chunk_size, likelihood,
                              event_ndim)  # fmt: skip
    log_sum = jax.nn.logsumexp(log_w, axis=0)
    sum_of_squares = jnp.exp(jax.nn.logsumexp(2.0 * log_w, axis=0) - 2.0 * log_sum)
    ess = jnp.clip(1.0 / sum_of_squares, 1.0, num_samples)  # rounding aside, 1 / sum <= k
    standard_error = jnp.sqrt(jnp.maximum(sum_of_squares - 1.0 / num_samples, 0.0))
    return ImportanceSampled(log_sum - math.log(num_samples), standard_error, ess)


def aggregate_posterior_mutual_information(
    key: jax.Array, posterior: DiagonalGaussian
) -> jax.Array:
    r"""An estimate of the mutual information ``I(x; z)`` under ``q(z|x)`` and the
    data's aggregate posterior ``q(z) = (1/N) sum_n q(z | x_n)``.

    .. math::
        I(x; z) = \mathbb{E}_{x}\, \mathbb{E}_{q(z|x)}\big[\log q(z|x) - \log q(z)\big]
          \approx \frac1N \sum_m \Big[\log q(z_m | x_m)
          - \log \frac1N \sum_n q(z_m | x_n)\Big], \quad z_m \sim q(z | x_m)

    One sample per example over the ``N`` examples given (an ``N x N`` matrix of
    densities, ``O(N^2 L)`` work). It estimates the mutual information of the empirical
    distribution: how many nats the code carries about which example it came from
    (Hoffman & Johnson's "ELBO surgery"; Alemi et al. 2018). Every estimate is at most
    ``log N``; its expectation is at least 0 (a single estimate of a collapsed
    posterior's, about 0, can fall just below).

    Args:
      key: a PRNG key for the samples.
      posterior: ``q(z|x)`` of ``N`` examples, a :class:`DiagonalGaussian` ``[N, L]``.

    Returns:
      A scalar, in nats.

    References:
      Hoffman & Johnson, *ELBO surgery: yet another way to carve up the variational
      evidence lower bound*, NIPS Workshop on Advances in Approximate Bayesian
      Inference, 2016.
      Alemi et al., *Fixing a Broken ELBO*, ICML 2018. https://arxiv.org/abs/1711.00464
    """
    _check_key(key)
    if not isinstance(posterior, DiagonalGaussian) or posterior.mean.ndim != 2:
        raise TypeError("posterior must be a DiagonalGaussian of shape [N, L].")
    n = posterior.mean.shape[0]
    z, log_q_own = posterior.sample_and_log_prob(key)  # [N, L], [N]

    def log_q_of_all(z_m: jax.Array) -> jax.Array:  # log q(z_m | x_n) for every n: [N]
        return posterior.log_prob(z_m)

    log_q_cross = jax.lax.map(log_q_of_all, z, batch_size=min(n, 64))  # [N (m), N (n)]
    log_aggregate = jax.nn.logsumexp(log_q_cross, axis=1) - math.log(n)
    return jnp.mean(log_q_own - log_aggregate)


def _iwae_log_weights(
    key, x, posterior, decoder, num_samples, chunk_size, likelihood, event_ndim
) -> jax.Array:
    """``[k, B]``: ``log p(x, z_i) - log q(z_i | x)`` for ``z_i`` from ``fold_in(key, i)``,
    decoded ``chunk_size`` samples at a time."""
    _check_key(key)
    _check_vae_args(likelihood, num_samples)
    chunk = num_samples if chunk_size is None else chunk_size
    _check_vae_args(likelihood, chunk, "chunk_size")
    chunk = min(chunk, num_samples)
    num_chunks = -(-num_samples // chunk)
    x = jnp.asarray(x)
    _check_posterior(posterior, x, event_ndim)

    def draw(i: jax.Array) -> tuple[jax.Array, jax.Array]:  # z_i ~ q and log q(z_i)
        return posterior.sample_and_log_prob(jax.random.fold_in(key, i))

    def log_weights(chunk_index: jax.Array) -> jax.Array:  # [chunk, B]
        index = chunk_index * chunk + jnp.arange(chunk)
        z, log_qz = jax.vmap(draw)(index)  # [chunk, B, L], [chunk, B]
        log_px_z = _log_likelihood(likelihood, _decode(decoder, z), x, event_ndim)
        log_pz = _normal_log_density(jnp.square(z), 0.0, axis=-1)  # p(z) = N(0, I)
        log_w = log_px_z + log_pz - log_qz
        return jnp.where((index < num_samples)[:, None], log_w, -jnp.inf)

    log_w = jax.lax.map(log_weights, jnp.arange(num_chunks))  # [chunks, chunk, B]
    log_w = log_w.reshape(num_chunks * chunk, -1)
    return log_w


# ---------------------------------------------------- lower-variance gradient estimators


def _stopped(posterior: DiagonalGaussian) -> DiagonalGaussian:
    """``posterior`` with its parameters behind ``stop_gradient``: ``log q(z)`` then
    depends on the encoder only through ``z`` (the path), not through its score."""
    return DiagonalGaussian(*(jax.lax.stop_gradient(p) for p in (posterior.mean, posterior.logvar)))


def stl_elbo(
    key: jax.Array,
    x: ArrayLike,
    posterior: DiagonalGaussian,
    decoder: Decoder,
    *,
    num_samples: int = 1,
    beta: float = 1.0,
    likelihood: str = "bernoulli",
    event_ndim: int = 1,
) -> ELBOTerms:
    r"""The ELBO with Roeder et al.'s "sticking the landing" (STL) gradient.

    .. math::
        \widehat{\mathrm{ELBO}}(x) = \frac1S \sum_{s=1}^S \Big[\log p(x | z_s)
          - \beta \big(\log q_{\bot(\phi)}(z_s | x) - \log p(z_s)\big)\Big],
          \quad z_s = \mu_\phi + \sigma_\phi \epsilon_s

    The KL is estimated from the same samples, and in ``log q`` the posterior's
    parameters are behind ``stop_gradient`` (:math:`\bot`): the encoder's gradient keeps
    the path derivative through ``z_s`` and drops the score term
    :math:`\nabla_\phi \log q_\phi(z)`, whose expectation is 0. The gradient is unbiased,
    and its variance vanishes as ``q`` approaches the true posterior (where the plain
    estimator's does not). The value is a Monte-Carlo estimate of the ELBO (noisier than
    :func:`elbo`'s, which takes the KL analytically); the decoder's gradient is
    :func:`elbo`'s for the same key (the KL does not reach the decoder).

    Args:
      key, x, posterior, decoder, num_samples, beta, likelihood, event_ndim: as in
        :func:`elbo`.

    Returns:
      :class:`ELBOTerms` of ``[B]`` arrays; ``kl`` is the Monte-Carlo estimate
      ``mean_s [log q(z_s) - log p(z_s)]`` (unbiased for the analytic KL), and
      ``elbo == reconstruction - beta * kl``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from kdvae.losses import DiagonalGaussian, stl_elbo
      >>> q = DiagonalGaussian(jnp.zeros((4, 2)), jnp.zeros((4, 2)))
      >>> dec = lambda z: jnp.zeros(z.shape[:-1] + (3,))
      >>> stl_elbo(jax.random.key(0), jnp.ones((4, 3)), q, dec).elbo.shape
      (4,)

    References:
      Roeder, Wu & Duvenaud, *Sticking the Landing: Simple, Lower-Variance Gradient
      Estimators for Variational Inference*, NeurIPS 2017, eq. (8).
      https://arxiv.org/abs/1703.09194
    """
    _check_key(key)
    _check_vae_args(likelihood, num_samples)
    x = jnp.asarray(x)
    _check_posterior(posterior, x, event_ndim)
    z = posterior.sample(key, num_samples=num_samples)  # [S, B, L]
    log_px_z = _log_likelihood(likelihood, _decode(decoder, z), x, event_ndim)  # [S, B]
    log_pz = _normal_log_density(jnp.square(z), 0.0, axis=-1)
    kl = jnp.mean(_stopped(posterior).log_prob(z) - log_pz, axis=0)
    reconstruction = jnp.mean(log_px_z, axis=0)
    return ELBOTerms(elbo=reconstruction - beta * kl, reconstruction=reconstruction, kl=kl)


def _weights_squared_on_the_path(log_weights: Callable[[jax.Array], jax.Array], z: jax.Array):
    """``log_weights(z)`` (``[K, B, L] -> [K, B]``), whose backward pass multiplies the
    cotangent reaching ``z[i, b]`` by the normalized weight ``softmax(log_w)[i, b]``.

    One forward and one backward pass of ``log_weights``: the cotangent of ``log_w[i, b]``
    is already ``w~[i, b]`` (times the loss's own factor), and it reaches the parameters
    ``log_weights`` closes over unchanged; only ``z``'s share is scaled once more, to
    ``w~**2``. This relies on each row ``z[i, b]`` reaching ``log_w[i, b]`` alone (a
    decoder without batch statistics).
    """
    fn, consts = jax.closure_convert(log_weights, z)

    @jax.custom_vjp
    def weighted(z, consts):
        return fn(z, *consts)

    def forward(z, consts):
        log_w, vjp = jax.vjp(fn, z, *consts)
        return log_w, (vjp, log_w)

    def backward(residuals, cotangent):
        vjp, log_w = residuals
        dz, *dconsts = vjp(cotangent)
        return dz * jax.nn.softmax(log_w, axis=0)[..., None], list(dconsts)

    weighted.defvjp(forward, backward)
    return weighted(z, consts)


def dreg_iwae_bound(
    key: jax.Array,
    x: ArrayLike,
    posterior: DiagonalGaussian,
    decoder: Decoder,
    *,
    num_samples: int,
    likelihood: str = "bernoulli",
    event_ndim: int = 1,
) -> jax.Array:
    r"""Burda et al.'s ``k``-sample bound with Tucker et al.'s doubly reparameterized
    gradient (DReG) for the encoder.

    The value is :func:`iwae_bound`'s for the same key, from the same samples (up to
    rounding: ``log q`` is computed from ``z``).
    With normalized weights :math:`\tilde w_i = w_i / \sum_j w_j` and
    :math:`\log w_i = \log p(x, z_i) - \log q_\phi(z_i | x)`, the gradients are

    .. math::
        \nabla_\theta = \sum_i \tilde w_i \nabla_\theta \log w_i, \qquad
        \nabla_\phi = \sum_i \tilde w_i^2 \,
          \frac{\partial \log w_i}{\partial z_i} \frac{\partial z_i}{\partial \phi}

    where ``log q``'s parameters are behind ``stop_gradient`` in the second: the
    decoder's is the plain IWAE gradient; the encoder's is unbiased, and its
    signal-to-noise ratio no longer shrinks like ``1 / sqrt(k)`` (Rainforth et al.,
    2018). One decoder pass forward and one backward, as :func:`iwae_bound` without
    chunks; the decoder must treat each row of ``z`` on its own (no batch statistics).
    Reverse mode only: the gradient is a custom VJP, so ``jax.jvp``, ``jax.jacfwd`` and
    ``jax.hessian`` raise.

    Args:
      key, x, posterior, decoder, likelihood, event_ndim: as in :func:`iwae_bound`.
      num_samples: ``k >= 1``, all decoded in one pass (``[k * B, L]``).

    Returns:
      ``[B]``: the bound per example, in nats.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from kdvae.losses import DiagonalGaussian, dreg_iwae_bound
      >>> q = DiagonalGaussian(jnp.zeros((4, 2)), jnp.zeros((4, 2)))
      >>> dec = lambda z: jnp.zeros(z.shape[:-1] + (3,))
      >>> dreg_iwae_bound(jax.random.key(0), jnp.ones((4, 3)), q, dec, num_samples=8).shape
      (4,)

    References:
      Tucker, Lawson, Gu & Maddison, *Doubly Reparameterized Gradient Estimators for
      Monte Carlo Objectives*, ICLR 2019, eq. (5). https://arxiv.org/abs/1810.04152
      Rainforth et al., *Tighter Variational Bounds are Not Necessarily Better*, ICML
      2018. https://arxiv.org/abs/1802.04537
    """
    _check_key(key)
    _check_vae_args(likelihood, num_samples)
    x = jnp.asarray(x)
    _check_posterior(posterior, x, event_ndim)
    stopped = _stopped(posterior)
    # Sample i from fold_in(key, i), as iwae_bound draws it: same key, same samples.
    draw = lambda i: posterior.sample(jax.random.fold_in(key, i))  # noqa: E731
    z = jax.vmap(draw)(jnp.arange(num_samples))  # [k, B, L]

    def log_weights(z):  # [k, B, L] -> [k, B]
        log_px_z = _log_likelihood(likelihood, _decode(decoder, z), x, event_ndim)
        return log_px_z + _normal_log_density(jnp.square(z), 0.0, axis=-1) - stopped.log_prob(z)

    log_w = _weights_squared_on_the_path(log_weights, z)
    return jax.nn.logsumexp(log_w, axis=0) - math.log(num_samples)
