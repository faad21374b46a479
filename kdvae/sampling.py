"""JAX's threefry random bits, written out in full so that a CPU computes them fast.

``jax.random`` lowers threefry on the CPU as a rolled loop of five blocks, each a
separate pass over memory: 4-5 ns per 32-bit word on these 2-core machines, against
1-1.5 ns for the same function unrolled into one fused element-wise loop
(``python benchmarks/sampling.py``: 1.6 M Bernoulli draws, the dropout masks of Hinton's
teacher at batch 512, take 1.1 ms instead of 7.3).

* :func:`random_bits`, :func:`uniform`, :func:`normal` and :func:`bernoulli` return
  *the same values* as their namesakes in ``jax.random`` for the same threefry key
  (tested bit for bit under ``jax.jit``; called eagerly, a float may differ in the
  last bit where XLA fuses a multiply-add), only faster on a CPU. Keys of another
  implementation (``rbg``, ...) are passed on to ``jax.random``.

Packing several dropout draws into one word (one bit each at rate 0.5) was tried and
measured no faster inside a step: once the hash is unrolled, applying the masks costs
as much as drawing them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = ["bernoulli", "normal", "random_bits", "uniform"]

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


def random_bits(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """uint32 ``shape``; equals ``jax.random.bits(key, shape)``.

    ``key`` is a typed key (``jax.random.key``). Draw ``i`` (row-major) is the
    threefry hash of the counter ``i``, its two output words xor-ed, which is what
    ``jax.random.bits`` computes with the (default) partitionable threefry.
    """
    shape = tuple(shape)
    n = math.prod(shape)
    if not _is_threefry(key) or n >= 2**32:
        return jax.random.bits(key, shape, jnp.uint32)
    k = jax.random.key_data(key)
    counter = jax.lax.iota(jnp.uint32, n)
    x0, x1 = _threefry2x32(k[0], k[1], jnp.zeros_like(counter), counter)
    # A fusion barrier: without it XLA may fuse the hash into each of its consumers and
    # compute it twice (the forward and the backward use of a dropout mask).
    return jax.lax.optimization_barrier(x0 ^ x1).reshape(shape)


def uniform(
    key: jax.Array, shape: Sequence[int], minval: float = 0.0, maxval: float = 1.0
) -> jax.Array:
    """float32 ``shape`` in ``[minval, maxval)``; equals ``jax.random.uniform``'s."""
    mantissa = random_bits(key, shape) >> np.uint32(32 - 23)
    ones = np.array(1.0, np.float32).view(np.uint32)
    floats = jax.lax.bitcast_convert_type(mantissa | ones, jnp.float32) - np.float32(1.0)
    lo, hi = np.float32(minval), np.float32(maxval)
    return jnp.maximum(lo, floats * (hi - lo) + lo)


def normal(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """Standard normal ``shape``; equals ``jax.random.normal(key, shape, dtype)``.

    Computed here for float32 (the inverse error function of a uniform on
    ``(-1, 1)``, as JAX does), by ``jax.random.normal`` for other dtypes.
    """
    if jnp.dtype(dtype) != jnp.float32:
        return jax.random.normal(key, shape, dtype)
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    return np.float32(np.sqrt(2)) * jax.scipy.special.erfinv(uniform(key, shape, lo, 1.0))


def bernoulli(key: jax.Array, p: ArrayLike, shape: Sequence[int] | None = None) -> jax.Array:
    """bool ``shape`` (default ``p``'s), True with probability ``p``.

    Equals ``jax.random.bernoulli(key, p, shape)``: computed here when ``p`` is float32
    (a Python float, unless 64-bit mode is on), by ``jax.random.bernoulli`` otherwise.
    """
    p_array = jnp.asarray(p)
    if p_array.dtype != jnp.float32:
        return jax.random.bernoulli(key, p, shape)
    return uniform(key, p_array.shape if shape is None else shape) < p_array
