"""Hand-written CPU kernels, and the switch that uses them only on the CPU.

* :func:`random_bits`, :func:`uniform`, :func:`normal`, :func:`bernoulli`: JAX's
  threefry written out in one fused element-wise loop. ``jax.random`` lowers it on a CPU
  as a rolled loop of five blocks, each a pass over memory. Same values as
  ``jax.random`` for a threefry key, bit for bit under ``jax.jit``.
* :func:`conv2d_same`: a 'SAME' convolution as im2col and one matrix multiply, with its
  gradient written out (a custom VJP). Kernel ``[k, k, in, out]`` (HWIO, ``nnx.Conv``'s
  layout), reshaped to ``[k * k * in, out]`` inside.
* :func:`max_pool_2x2`: a 2x2 max-pool whose derivative (a custom JVP) goes to the first
  maximum of each window, one pass over the input.

On the CPU backend (``jax.default_backend() == "cpu"``) these functions run the kernels
above; on any other backend the standard ops (``jax.random``,
``jax.lax.conv_general_dilated``, a max with JAX's own derivative): the kernels were
written for a CPU and measured there only. ``python benchmarks/sampling.py`` times each
kernel against its standard op, ``python benchmarks/steps.py`` the train steps that use
them. The choice is made when a function is traced; :func:`forced_backend` overrides it.
Both paths take the same parameters (one layout), so a checkpoint moves between backends.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "bernoulli",
    "conv2d_same",
    "cpu_kernels_enabled",
    "forced_backend",
    "max_pool_2x2",
    "normal",
    "random_bits",
    "uniform",
]

# ------------------------------------------------------------------------------ switch

_FORCED_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kdvae_forced_backend", default=None
)


def cpu_kernels_enabled() -> bool:
    """True where the CPU kernels run: the (forced or default) backend is the CPU."""
    return (_FORCED_BACKEND.get() or jax.default_backend()) == "cpu"


@contextlib.contextmanager
def forced_backend(backend: str) -> Iterator[None]:
    """Choose the path as if ``backend`` (``"cpu"``, ``"gpu"``, ...) were the default.

    Affects only functions *traced* inside the block, where the switch is read. A
    function ``jax.jit`` has already traced keeps the path it was traced with (its
    trace is cached by function and argument types), inside the block or not; call a
    fresh function (a new ``lambda``) to trace it again. The computation still runs on
    JAX's default device.
    """
    token = _FORCED_BACKEND.set(backend)
    try:
        yield
    finally:
        _FORCED_BACKEND.reset(token)


# ------------------------------------------------------------------------ random draws

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array):
    """Threefry-2x32, 20 rounds (Salmon et al. 2011), unrolled; as ``jax.random``."""
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(block + 1) % 3]
        x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def _is_threefry(key: jax.Array) -> bool:
    return (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        and jax.random.key_impl(key) == "threefry2x32"
        and key.shape == ()
        and jax.config.jax_threefry_partitionable
    )


def _threefry_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The CPU kernel of :func:`random_bits` (``jax.random.bits`` for other keys)."""
    n = math.prod(shape)
    if not _is_threefry(key) or n >= 2**32:
        return jax.random.bits(key, shape, jnp.uint32)
    k = jax.random.key_data(key)
    counter = jax.lax.iota(jnp.uint32, n)
    x0, x1 = _threefry2x32(k[0], k[1], jnp.zeros_like(counter), counter)
    # A fusion barrier: without it XLA may fuse the hash into each of its consumers and
    # compute it twice (the forward and the backward use of a dropout mask).
    return jax.lax.optimization_barrier(x0 ^ x1).reshape(shape)


def _threefry_uniform(
    key: jax.Array, shape: tuple[int, ...], minval: float, maxval: float
) -> jax.Array:
    """The CPU kernel of :func:`uniform`: ``jax.random.uniform``'s float32 arithmetic."""
    mantissa = _threefry_bits(key, shape) >> np.uint32(32 - 23)
    ones = np.array(1.0, np.float32).view(np.uint32)
    floats = jax.lax.bitcast_convert_type(mantissa | ones, jnp.float32) - np.float32(1.0)
    lo, hi = np.float32(minval), np.float32(maxval)
    return jnp.maximum(lo, floats * (hi - lo) + lo)


def random_bits(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """uint32 ``shape``; equals ``jax.random.bits(key, shape, jnp.uint32)``.

    ``key`` is a typed key (``jax.random.key``). On the CPU, for a threefry key, draw
    ``i`` (row-major) is the threefry hash of the counter ``i``, its two output words
    xor-ed: what ``jax.random.bits`` computes with the (default) partitionable threefry.
    """
    shape = tuple(shape)
    if not cpu_kernels_enabled():
        return jax.random.bits(key, shape, jnp.uint32)
    return _threefry_bits(key, shape)


def uniform(
    key: jax.Array, shape: Sequence[int], minval: float = 0.0, maxval: float = 1.0
) -> jax.Array:
    """float32 ``shape`` in ``[minval, maxval)``; equals ``jax.random.uniform``'s."""
    shape = tuple(shape)
    if not cpu_kernels_enabled():
        return jax.random.uniform(key, shape, jnp.float32, minval, maxval)
    return _threefry_uniform(key, shape, minval, maxval)


def normal(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """Standard normal ``shape``; equals ``jax.random.normal(key, shape, dtype)``.

    The CPU kernel computes float32 (the inverse error function of a uniform on
    ``(-1, 1)``, as JAX does); other dtypes go to ``jax.random.normal``.
    """
    shape = tuple(shape)
    if not cpu_kernels_enabled() or jnp.dtype(dtype) != jnp.float32:
        return jax.random.normal(key, shape, dtype)
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    u = _threefry_uniform(key, shape, lo, 1.0)
    return np.float32(np.sqrt(2)) * jax.scipy.special.erfinv(u)


def bernoulli(key: jax.Array, p: ArrayLike, shape: Sequence[int] | None = None) -> jax.Array:
    """bool ``shape`` (default ``p``'s), True with probability ``p``.

    Equals ``jax.random.bernoulli(key, p, shape)``. The CPU kernel takes a float32 ``p``
    (a Python float, unless 64-bit mode is on); other dtypes go to ``jax.random``.
    """
    p_array = jnp.asarray(p)
    if not cpu_kernels_enabled() or p_array.dtype != jnp.float32:
        return jax.random.bernoulli(key, p, shape)
    shape = p_array.shape if shape is None else tuple(shape)
    return _threefry_uniform(key, shape, 0.0, 1.0) < p_array


# ------------------------------------------------------------------------- convolution


def _im2col(x_BHWC: jax.Array, kh: int, kw: int) -> jax.Array:
    """'SAME' ``kh x kw`` patches: ``[B, H, W, C] -> [B, H, W, kh * kw * C]``.

    Patch entries in ``(i, j, c)`` row-major order, the order of an HWIO kernel's
    ``reshape(kh * kw * C, O)``; padding as XLA's 'SAME' (the odd one after).
    """
    return jnp.concatenate(_shifted(x_BHWC, kh, kw), axis=-1)


def _shifted(x_BHWC: jax.Array, kh: int, kw: int) -> list[jax.Array]:
    """The ``kh * kw`` 'SAME'-padded shifts of ``x``, each ``[B, H, W, C]``, in ``(i, j)``
    row-major order: tap ``(i, j)`` of every output pixel."""
    _, h, w, _ = x_BHWC.shape
    top, left = (kh - 1) // 2, (kw - 1) // 2
    pads = ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0))
    padded = jnp.pad(x_BHWC, pads)
    return [padded[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)]


@jax.custom_vjp
def _im2col_conv(x_BHWC: jax.Array, kernel_HWIO: jax.Array) -> jax.Array:
    """The CPU kernel of :func:`conv2d_same`: im2col, then one matrix multiply (one input
    channel: :func:`_taps_conv`).

    The gradient is written out: ``dW = patches^T dy`` as one plain
    ``[kh kw C, B H W] x [B H W, O]`` product, ``dx`` by folding ``dy W^T`` back.
    """
    return _im2col_conv_fwd(x_BHWC, kernel_HWIO)[0]


def _taps_conv(x_BHW1: jax.Array, kernel_HW1O: jax.Array) -> jax.Array:
    """One input channel: the ``kh * kw`` shifted images times their taps, summed in one
    fused pass (3.7 % off the CNN teacher's whole step at batch 128 against the ``K = 9``
    matrix multiply, 1 % at 512; ``benchmarks/steps.py``'s interleaved runner, AMD EPYC)."""
    kh, kw, _, o = kernel_HW1O.shape
    first, *rest = zip(_shifted(x_BHW1, kh, kw), kernel_HW1O.reshape(kh * kw, o), strict=True)
    y = first[0] * first[1]
    for shift, tap in rest:
        y = y + shift * tap
    return y


def _im2col_conv_fwd(x_BHWC, kernel_HWIO):
    kh, kw, c, o = kernel_HWIO.shape
    if c == 1:  # the patches are rebuilt, small, for the gradient
        return _taps_conv(x_BHWC, kernel_HWIO), (x_BHWC, None, kernel_HWIO)
    patches = _im2col(x_BHWC, kh, kw)
    return patches @ kernel_HWIO.reshape(-1, o), (x_BHWC, patches, kernel_HWIO)


def _im2col_conv_bwd(residuals, dy_BHWO):
    x_BHWC, patches, kernel_HWIO = residuals
    kh, kw, _, o = kernel_HWIO.shape
    if patches is None:
        patches = _im2col(x_BHWC, kh, kw)
    dkernel = patches.reshape(-1, patches.shape[-1]).T @ dy_BHWO.reshape(-1, o)
    dpatches = dy_BHWO @ kernel_HWIO.reshape(-1, o).T
    dx = jax.vjp(lambda x: _im2col(x, kh, kw), x_BHWC)[1](dpatches)[0]
    # The barrier keeps the reshape out of the optimizer's fused update: there it made
    # XLA contract another multiply-add, and training differed in the last bits from
    # the earlier [k * k * in, out] parameter layout's (now bit for bit the same).
    return dx, jax.lax.optimization_barrier(dkernel.reshape(kernel_HWIO.shape))


_im2col_conv.defvjp(_im2col_conv_fwd, _im2col_conv_bwd)


def conv2d_same(x_BHWC: jax.Array, kernel_HWIO: jax.Array) -> jax.Array:
    """'SAME' stride-1 convolution: ``[B, H, W, C]``, ``[kh, kw, C, O]`` -> ``[B, H, W, O]``.

    Equals ``jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"))`` (a cross-correlation, as every deep
    learning library's), which is what runs off the CPU.
    """
    c = kernel_HWIO.shape[2]
    if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != c:
        raise ValueError(
            f"conv2d_same needs x [B, H, W, {c}] for kernel {kernel_HWIO.shape}, "
            f"got x {x_BHWC.shape}."
        )
    if not cpu_kernels_enabled():
        return jax.lax.conv_general_dilated(
            x_BHWC, kernel_HWIO, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    return _im2col_conv(x_BHWC, kernel_HWIO)


# ---------------------------------------------------------------------------- max-pool


def _max_pool(x_BHWC: jax.Array) -> jax.Array:
    b, h, w, c = x_BHWC.shape
    return x_BHWC.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


_first_max_pool = jax.custom_jvp(_max_pool)
_WINDOW = ((0, 0), (0, 1), (1, 0), (1, 1))  # row-major order within a 2x2 window


@_first_max_pool.defjvp
def _first_max_pool_jvp(primals, tangents):
    """The tangent of each window's first maximum (row-major), in one pass."""
    (x_BHWC,), (dx_BHWC,) = primals, tangents
    y = _max_pool(x_BHWC)
    b, h, w, c = x_BHWC.shape
    windows = x_BHWC.reshape(b, h // 2, 2, w // 2, 2, c)
    dwindows = dx_BHWC.reshape(windows.shape)
    dy, taken = jnp.zeros_like(y), jnp.zeros(y.shape, bool)
    for i, j in _WINDOW:
        first = ~taken & (windows[:, :, i, :, j, :] == y)
        dy = jnp.where(first, dwindows[:, :, i, :, j, :], dy)
        taken = taken | first
    return y, dy


def max_pool_2x2(x_BHWC: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2: ``[B, H, W, C] -> [B, H/2, W/2, C]`` (H, W even).

    The values are the same on both paths, and so is the derivative without ties. With
    ties, the CPU kernel's derivative goes to the first maximum of each window in
    row-major order (as PyTorch's max-pool routes its gradient), while JAX's own (off
    the CPU) splits it equally among the tied entries. Forward and reverse mode both
    work on both paths.
    """
    _, h, w, _ = x_BHWC.shape
    if h % 2 or w % 2:
        raise ValueError(f"max_pool_2x2 needs an even height and width, got {h}x{w}.")
    return _first_max_pool(x_BHWC) if cpu_kernels_enabled() else _max_pool(x_BHWC)
