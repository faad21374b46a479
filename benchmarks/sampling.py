"""kdvae.kernels' CPU kernels against the standard ops: the same results, the time they take.

* Random draws, against ``jax.random``: the draw counts of the train steps at batch 512
  (the VAE's 401,408 binarized pixels, the MLP teacher's 1,630,208 dropout draws).
* The CNN teacher's convolutions and max-pools, forward and backward (the gradients the
  train step takes), against ``jax.lax.conv_general_dilated`` and a max with JAX's own
  derivative, at the batch sizes of ``--batches``.

Each pair is first checked to agree (draws equal, layers to float32 tolerance), then
timed in interleaved rounds of jitted calls; reported are the medians (``kdvae_ms`` the
kernel, ``jax_ms`` jax.random or the standard op) and their ratio, ``speedup``. The
kernels are taken whatever the backend (:func:`kdvae.kernels.forced_backend`), so this
also measures them where they are not used.

    python benchmarks/sampling.py [--rounds 30] [--batches 128 512] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from kdvae import kernels

SIZES = {"vae binarization": 512 * 784, "teacher dropout": 512 * (784 + 1200 + 1200)}
PAIRS = {
    "bits": (
        lambda k, n: kernels.random_bits(k, (n,)),
        lambda k, n: jax.random.bits(k, (n,), jnp.uint32),
    ),
    "bernoulli(0.8)": (
        lambda k, n: kernels.bernoulli(k, 0.8, (n,)),
        lambda k, n: jax.random.bernoulli(k, 0.8, (n,)),
    ),
    "normal": (
        lambda k, n: kernels.normal(k, (n,)),
        lambda k, n: jax.random.normal(k, (n,)),
    ),
}
# The cnn_teacher preset's layers: (side, channels in, channels out); a pool follows each.
LAYERS = ((28, 1, 32), (14, 32, 64))


def _timed(fn, args, calls: int = 5) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / calls


def _race(fns, args, rounds: int) -> dict:
    """Median milliseconds of each of ``fns(*args)`` (kernel, standard), and the ratio."""
    times = [[], []]
    for _ in range(rounds):
        for fn, t in zip(fns, times, strict=True):
            t.append(_timed(fn, args))
    ms = [float(np.median(t)) * 1e3 for t in times]
    return {"kdvae_ms": round(ms[0], 3), "jax_ms": round(ms[1], 3),
            "speedup": round(ms[1] / ms[0], 2)}  # fmt: skip


def _compiled(path: str, fn, args):
    """``fn`` compiled for ``args`` with ``path``'s functions ("cpu": the kernels)."""
    with kernels.forced_backend(path):  # a new function: no trace cached by jax.jit
        return jax.jit(lambda *a: fn(*a)).lower(*args).compile()


def _layer_cases(batch: int) -> dict:
    """``{name: (fn, args)}``: the CNN's convs and pools, forward and backward."""
    cases = {}
    for side, c, o in LAYERS:
        x, w, dy, y, dp = (
            jax.random.normal(k, shape)
            for k, shape in zip(
                jax.random.split(jax.random.key(side), 5),
                [(batch, side, side, c), (3, 3, c, o), (batch, side, side, o),
                 (batch, side, side, o), (batch, side // 2, side // 2, o)],
                strict=True,
            )
        )  # fmt: skip
        wrt = (1,) if c == 1 else (0, 1)  # no gradient for the images
        conv = jax.value_and_grad(lambda x, w, dy: jnp.vdot(kernels.conv2d_same(x, w), dy), wrt)
        cases[f"conv {c}->{o} {side}x{side}"] = (conv, (x, w, dy))
        pool = jax.value_and_grad(lambda y, dp: jnp.vdot(kernels.max_pool_2x2(y), dp))
        cases[f"pool {o}ch {side}x{side}"] = (pool, (y, dp))
    return cases


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    key = jax.random.key(0)
    out: dict = {"device": str(jax.devices()[0].device_kind)}
    for what, n in SIZES.items():
        for name, (ours, theirs) in PAIRS.items():
            fns = [_compiled("cpu", lambda k: ours(k, n), (key,)), jax.jit(lambda k: theirs(k, n))]
            np.testing.assert_array_equal(fns[0](key), fns[1](key))
            out[f"{what}: {name}"] = row = {"draws": n, **_race(fns, (key,), args.rounds)}
            if not args.json:
                print(f"{what:>17} {name:>15} {n:>9,} draws  kdvae {row['kdvae_ms']:7.3f} ms  "
                      f"jax.random {row['jax_ms']:7.3f} ms  = {row['speedup']:.2f}x")  # fmt: skip
    for batch in args.batches:
        for name, (fn, fn_args) in _layer_cases(batch).items():
            fns = [_compiled(path, fn, fn_args) for path in ("cpu", "gpu")]
            outputs = [jax.tree.leaves(fn(*fn_args)) for fn in fns]
            for ours, theirs in zip(*outputs, strict=True):  # float32, summed in two orders
                scale = float(jnp.abs(theirs).max())
                np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * scale)
            row = {"batch": batch, **_race(fns, fn_args, args.rounds)}
            out[f"{name}, batch {batch}"] = row
            if not args.json:
                print(f"{name:>17} batch {batch:>4} fwd+bwd  kdvae {row['kdvae_ms']:7.3f} ms  "
                      f"standard {row['jax_ms']:7.3f} ms  = {row['speedup']:.2f}x")  # fmt: skip
    if args.json:
        print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
