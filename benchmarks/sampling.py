"""kdvae.sampling against jax.random: the same draws, the time they take.

For the draw counts of the train steps at batch 512 (the VAE's 401,408 binarized pixels,
the MLP teacher's 1,630,208 dropout draws), each pair is first checked to give equal
values, then timed in interleaved rounds of jitted calls; reported are the medians and
their ratio.

    python benchmarks/sampling.py [--rounds 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from kdvae import sampling

SIZES = {"vae binarization": 512 * 784, "teacher dropout": 512 * (784 + 1200 + 1200)}
PAIRS = {
    "bits": (
        lambda k, n: sampling.random_bits(k, (n,)),
        lambda k, n: jax.random.bits(k, (n,), jnp.uint32),
    ),
    "bernoulli(0.8)": (
        lambda k, n: sampling.bernoulli(k, 0.8, (n,)),
        lambda k, n: jax.random.bernoulli(k, 0.8, (n,)),
    ),
    "normal": (
        lambda k, n: sampling.normal(k, (n,)),
        lambda k, n: jax.random.normal(k, (n,)),
    ),
}


def _timed(fn, key, calls: int = 5) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        out = fn(key)
    out.block_until_ready()
    return (time.perf_counter() - t) / calls


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    key = jax.random.key(0)
    out: dict = {"device": str(jax.devices()[0].device_kind)}
    for what, n in SIZES.items():
        for name, (ours, theirs) in PAIRS.items():
            fns = [jax.jit(lambda k, f=f, n=n: f(k, n)) for f in (ours, theirs)]
            np.testing.assert_array_equal(fns[0](key), fns[1](key))
            times = [[], []]
            for _ in range(args.rounds):
                for fn, t in zip(fns, times, strict=True):
                    t.append(_timed(fn, key))
            ms = [float(np.median(t)) * 1e3 for t in times]
            row = {"draws": n, "kdvae_ms": round(ms[0], 3), "jax_ms": round(ms[1], 3),
                   "speedup": round(ms[1] / ms[0], 2)}  # fmt: skip
            out[f"{what}: {name}"] = row
            if not args.json:
                print(f"{what:>17} {name:>15} {n:>9,} draws  kdvae {ms[0]:7.3f} ms  "
                      f"jax.random {ms[1]:7.3f} ms  = {row['speedup']:.2f}x")  # fmt: skip
    if args.json:
        print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
