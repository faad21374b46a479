"""Time kdvae.losses against the plain optax/JAX compositions they wrap.

Two jitted value-and-grad computations, each next to its hand-written equivalent:

(a) ``distillation_loss`` (batch mean, 10 classes, integer labels, T=4, alpha=0.5)
    w.r.t. the student logits, versus
    ``optax.softmax_cross_entropy_with_integer_labels`` plus
    ``T**2 * optax.losses.kl_divergence_with_log_targets`` on ``jax.nn.log_softmax(z / T)``;
(b) ``elbo`` (Bernoulli likelihood, one sample) w.r.t. the parameters of an MLP VAE
    (784-500-20 encoder, 20-500-784 decoder), versus the same ELBO written out in JAX.

Both variants of a pair are checked to agree, then timed interleaved: each round runs
one block of calls of each, in alternating order, so drift on a noisy machine hits both
alike. Reported: the median over rounds of the time per call (after warm-up, every call
ended with ``block_until_ready``), and the ratio kdvae/plain.

Run from the repository root:  python benchmarks/losses.py [--repeats 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    from kdvae import losses
except ModuleNotFoundError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kdvae import losses

TEMPERATURE, ALPHA, NUM_CLASSES = 4.0, 0.5, 10
X_DIM, HIDDEN, LATENT = 784, 500, 20


# ------------------------------------------------------------------ distillation


def kdvae_distillation(student, teacher, labels):
    loss = losses.distillation_loss(student, teacher, labels, temperature=TEMPERATURE, alpha=ALPHA)
    return jnp.mean(loss)


def plain_distillation(student, teacher, labels):
    hard = optax.softmax_cross_entropy_with_integer_labels(student, labels)
    teacher = jax.lax.stop_gradient(teacher)
    soft = optax.losses.kl_divergence_with_log_targets(
        jax.nn.log_softmax(student / TEMPERATURE), jax.nn.log_softmax(teacher / TEMPERATURE)
    )
    return jnp.mean(ALPHA * hard + (1.0 - ALPHA) * TEMPERATURE**2 * soft)


def distillation_inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    student = jnp.asarray(3.0 * rng.normal(size=(batch, NUM_CLASSES)), jnp.float32)
    teacher = jnp.asarray(3.0 * rng.normal(size=(batch, NUM_CLASSES)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, size=batch), jnp.int32)
    return student, teacher, labels


# --------------------------------------------------------------------------- ELBO


def init_vae(seed=0):
    rng = np.random.default_rng(seed)

    def dense(n_in, n_out):
        w = rng.normal(scale=1.0 / np.sqrt(n_in), size=(n_in, n_out))
        return jnp.asarray(w, jnp.float32), jnp.zeros(n_out, jnp.float32)

    return {
        "enc_hidden": dense(X_DIM, HIDDEN),
        "enc_out": dense(HIDDEN, 2 * LATENT),
        "dec_hidden": dense(LATENT, HIDDEN),
        "dec_out": dense(HIDDEN, X_DIM),
    }


def encode(params, x):
    w, b = params["enc_hidden"]
    h = jax.nn.relu(x @ w + b)
    w, b = params["enc_out"]
    out = h @ w + b
    return out[..., :LATENT], out[..., LATENT:]  # mean, logvar


def decode(params, z):
    w, b = params["dec_hidden"]
    h = jax.nn.relu(z @ w + b)
    w, b = params["dec_out"]
    return h @ w + b  # Bernoulli logits


def kdvae_elbo(params, key, x, decoder=decode):
    posterior = losses.DiagonalGaussian(*encode(params, x))
    terms = losses.elbo(key, x, posterior, lambda z: decoder(params, z), num_samples=1)
    return -jnp.mean(terms.elbo)


def plain_elbo(params, key, x):
    mean, logvar = encode(params, x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    logits = decode(params, z)
    reconstruction = -jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), axis=-1)
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=-1)
    return -jnp.mean(reconstruction - kl)


def elbo_inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.random((batch, X_DIM)) < 0.3, jnp.float32)  # binarised images
    return init_vae(seed), jax.random.key(seed), x


# ---------------------------------------------------------------------- timing


def check_agree(kd: Callable, plain: Callable, args, rtol: float) -> None:
    """Both variants compute the same value and gradient (else the timing means nothing)."""
    for a, b in zip(jax.tree.leaves(kd(*args)), jax.tree.leaves(plain(*args))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol)


def time_block(fn: Callable, args, calls: int) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per call over ``calls`` calls, each waited for.

    CPU time (all threads) is the steadier measure on a shared machine, where wall time
    also counts the time the process waits for a core.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def compare(name: str, kd: Callable, plain: Callable, args, repeats: int, calls: int) -> dict:
    """Median time per call of ``kd`` and ``plain``, timed in interleaved rounds."""
    for fn in (kd, plain):  # compile and warm up
        time_block(fn, args, max(3, calls // 2))
    times: dict[str, list[tuple[float, float]]] = {"kdvae": [], "plain": []}
    for round_ in range(repeats):
        order = (("kdvae", kd), ("plain", plain))
        for label, fn in order if round_ % 2 == 0 else order[::-1]:
            times[label].append(time_block(fn, args, calls))
    result = {"name": name}
    for clock, column in (("wall", 0), ("cpu", 1)):
        kd_t = np.array([t[column] for t in times["kdvae"]])
        plain_t = np.array([t[column] for t in times["plain"]])
        result[clock] = {
            "kdvae_us": 1e6 * float(np.median(kd_t)),
            "plain_us": 1e6 * float(np.median(plain_t)),
            "ratio": float(np.median(kd_t) / np.median(plain_t)),
            # The spread of the per-round ratios: how far the median ratio can be trusted.
            "ratio_iqr": [float(q) for q in np.percentile(kd_t / plain_t, [25, 75])],
        }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=20, help="calls per round and variant")
    parser.add_argument("--distillation-batches", type=int, nargs="+", default=[128, 512, 4096])
    parser.add_argument("--elbo-batches", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)

    cases = [  # (name, kdvae, plain, inputs, batches, rtol of the agreement check)
        (f"distillation value+grad  B={{:<5}} C={NUM_CLASSES}", kdvae_distillation,
         plain_distillation, distillation_inputs, args.distillation_batches, 1e-5),
        ("elbo value+grad (MLP) B={:<5}", kdvae_elbo, plain_elbo, elbo_inputs,
         args.elbo_batches, 1e-4),
    ]  # fmt: skip

    print(
        f"{'':<38} kdvae / plain per call, median of {args.repeats} interleaved rounds "
        "[IQR of the per-round ratio]"
    )
    results = []
    for name, kdvae_fn, plain_fn, make_inputs, batches, rtol in cases:
        kd, plain = (jax.jit(jax.value_and_grad(f)) for f in (kdvae_fn, plain_fn))
        for batch in batches:
            inputs = make_inputs(batch)
            check_agree(kd, plain, inputs, rtol=rtol)
            results.append(compare(name.format(batch), kd, plain, inputs, args.repeats, args.calls))
            print(_row(results[-1]), flush=True)

    if args.json:
        meta = {
            "jax": jax.__version__,
            "optax": optax.__version__,
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "python": platform.python_version(),
            "repeats": args.repeats,
            "calls": args.calls,
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


def _row(r: dict) -> str:
    cells = []
    for clock in ("wall", "cpu"):
        c = r[clock]
        lo, hi = c["ratio_iqr"]
        cells.append(
            f"{clock} {c['kdvae_us']:8.1f} / {c['plain_us']:8.1f} us = {c['ratio']:.3f} "
            f"[{lo:.2f}-{hi:.2f}]"
        )
    return f"{r['name']:<38} " + "   ".join(cells)


if __name__ == "__main__":
    sys.exit(main())
