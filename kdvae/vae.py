"""The pieces of a VAE experiment: the objective, evaluation, figures and table.

``examples/vae_mnist.py`` wires them: the ELBO (Kingma & Welling 2014) or Burda et al.'s
IWAE bound as the training objective; every epoch the negative ELBO on the validation
split (which picks the best epoch) and the test split; at the end, the importance-sampled
negative log-likelihood ``-log p(x) ~ -IWAE_k`` on the test set.

The model's likelihood decides what it sees: a Bernoulli decoder binary images
(:func:`data.binarize`), a Gaussian one dequantized grey levels (:func:`data.dequantize`).
Training draws a fresh binarization (or dequantization) per batch when ``dynamic``; the
evaluation images are drawn once, seeded, so every evaluation sees the same ones.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdvae import data, losses, train

__all__ = [
    "GRADIENT_OBJECTIVES",
    "binarize",
    "bits_per_dimension",
    "check_gradient",
    "evaluate_bounds",
    "figures",
    "fixed_inputs",
    "format_table",
    "inputs",
    "negative_elbo",
    "objective",
]


def binarize(key: jax.Array | None, images: jax.Array, *, dynamic: bool = True) -> jax.Array:
    """uint8 images ``[B, 28, 28, 1]`` -> float32 0/1 ``[B, 784]`` (see :func:`data.binarize`)."""
    return data.binarize(key, data.to_float(images), dynamic=dynamic)


def inputs(key: jax.Array | None, images: jax.Array, likelihood: str, *, dynamic: bool = True):
    """uint8 images ``[B, 28, 28, 1]`` -> what a ``likelihood`` decoder models, float32
    ``[B, 784]``: binary for ``"bernoulli"``; dequantized ``(pixel + u) / 256`` for
    ``"gaussian"`` (``u ~ U(0, 1)`` when ``dynamic``, else 1/2)."""
    if likelihood == "gaussian":
        return data.dequantize(key if dynamic else None, images)
    return binarize(key, images, dynamic=dynamic)


def bits_per_dimension(nll: float, dims: int = 784) -> float:
    """A negative log-likelihood in nats of a density on dequantized ``[0, 1)^dims`` ->
    bits per dimension of the 256 grey levels: ``(nll / dims + log 256) / log 2``."""
    return (nll / dims + np.log(256.0)) / np.log(2.0)


def objective(
    *,
    objective: str = "elbo",
    num_samples: int = 1,
    k: int = 1,
    beta: float = 1.0,
    kl_warmup_epochs: int = 0,
    free_bits: float = 0.0,
    dynamic_binarization: bool = True,
    gradient: str = "reparameterized",
):
    """The negative ELBO (or the negative IWAE bound) of a :class:`kdvae.models.VAE`.

    A :mod:`kdvae.train` loss function over ``batch["images"]`` uint8 ``[B, 28, 28, 1]``.

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
        every batch (a Gaussian decoder: dequantize with fresh uniform noise); else
        threshold at 0.5 (dequantize at mid-level).
      gradient: the encoder's gradient estimator: ``"reparameterized"`` (the plain
        one), ``"stl"`` for the ELBO (:func:`kdvae.losses.stl_elbo`: the KL is then
        sampled; no free bits) or ``"dreg"`` for the IWAE bound
        (:func:`kdvae.losses.dreg_iwae_bound`).

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
    check_gradient(gradient, objective, free_bits)

    def kl_weight(context):
        if not kl_warmup_epochs:
            return beta
        epoch = context["epoch"].astype(jnp.float32)
        return beta * jnp.minimum(1.0, (epoch + 1.0) / kl_warmup_epochs)

    def loss_fn(model: nnx.Module, batch: dict, key: jax.Array, context: Any):
        binarize_key, sample_key, iwae_key = jax.random.split(key, 3)
        likelihood = model.likelihood
        x = inputs(binarize_key, batch["images"], likelihood, dynamic=dynamic_binarization)
        posterior = model.encode(x)
        elbo = losses.stl_elbo if gradient == "stl" else losses.elbo
        kw = dict(likelihood=likelihood)
        terms = elbo(sample_key, x, posterior, model.decode, num_samples=num_samples, **kw)
        true_kl = posterior.kl_to_standard_normal()  # analytic (STL's terms.kl is sampled)
        if objective == "iwae":
            bound = losses.dreg_iwae_bound if gradient == "dreg" else losses.iwae_bound
            loss = -bound(iwae_key, x, posterior, model.decode, num_samples=k, **kw).mean()
        else:
            kl = terms.kl.mean()
            if free_bits:
                per_dim = posterior.kl_to_standard_normal(per_dimension=True).mean(0)
                kl = jnp.sum(jnp.maximum(per_dim, free_bits))
            loss = -terms.reconstruction.mean() + kl_weight(context) * kl
        metrics = {
            "neg_elbo": -(terms.reconstruction - true_kl).mean(),
            "kl": true_kl.mean(),
            "reconstruction": terms.reconstruction.mean(),
        }
        return loss, metrics

    return loss_fn


#: Each gradient estimator and the objectives it is for.
GRADIENT_OBJECTIVES = {"reparameterized": ("elbo", "iwae"), "stl": ("elbo",), "dreg": ("iwae",)}


def check_gradient(gradient: str, objective: str, free_bits: float = 0.0) -> None:
    """``ValueError`` unless the estimator ``gradient`` goes with ``objective`` (and
    STL, which samples the KL, has no free bits)."""
    if gradient not in GRADIENT_OBJECTIVES:
        raise ValueError(
            f"gradient must be one of {sorted(GRADIENT_OBJECTIVES)}, got {gradient!r}."
        )
    if objective not in GRADIENT_OBJECTIVES[gradient]:
        raise ValueError(
            f"gradient {gradient!r} is for objective {GRADIENT_OBJECTIVES[gradient][0]!r}."
        )
    if gradient == "stl" and free_bits:
        raise ValueError("gradient 'stl' samples the KL: it takes no free_bits.")


def fixed_inputs(
    images: np.ndarray, seed: int, dynamic: bool, likelihood: str = "bernoulli"
) -> jax.Array:
    """An evaluation split's one binarization (or dequantization), seeded by ``seed``:
    :func:`inputs`. A Gaussian decoder is always evaluated on uniformly dequantized
    images (whatever ``dynamic``): only then is its density a bound on the grey levels'
    probability (mid-level points could take any density)."""
    key = jax.random.fold_in(jax.random.key(seed), 12345)
    dynamic = dynamic or likelihood == "gaussian"
    return inputs(key, jnp.asarray(images), likelihood, dynamic=dynamic)


def _bounds_fn(graphdef: nnx.GraphDef, k: int, chunk: int, batch_size: int):
    """Jitted ``(state, x [N, 784] (the model's inputs), key) -> per-example (elbo, rec, kl,
    ImportanceSampled, posterior)``."""

    @jax.jit
    def bounds(state, x, key):
        model = nnx.merge(graphdef, state)

        def one_batch(xb, index):
            elbo_key, iwae_key = jax.random.split(jax.random.fold_in(key, index))
            posterior = model.encode(xb)  # once, for both bounds and the diagnostics
            kw = dict(likelihood=model.likelihood)
            terms = losses.elbo(elbo_key, xb, posterior, model.decode, **kw)
            sampled = losses.importance_sampled_log_px(
                iwae_key, xb, posterior, model.decode, num_samples=k, chunk_size=chunk, **kw
            )
            return terms.elbo, terms.reconstruction, terms.kl, sampled, posterior

        return train.batched_apply(one_batch, x, batch_size=batch_size, with_index=True)

    return bounds


def evaluate_bounds(
    model: nnx.Module, x: jax.Array, *, k: int, key: jax.Array, batch_size: int = 100
) -> dict[str, Any]:
    """ELBO terms, the ``k``-sample IWAE bound and posterior diagnostics on ``x [N, 784]``
    (the model's inputs: :func:`fixed_inputs`).

    Returns (averages over the ``N`` examples):

    * ``neg_elbo``, ``reconstruction``, ``kl``;
    * ``nll``: ``-IWAE_k``, an upper bound on ``-log p(x)`` that tightens with ``k``;
      ``nll_mc_se``, its Monte-Carlo standard error (the importance sampling's, for
      these ``N`` images), and ``nll_data_se``, the standard error of the mean over
      images (``std / sqrt(N)``: how much another test set of ``N`` could differ);
    * ``ess_mean`` and ``ess_min``: the importance weights' effective sample size
      (:func:`kdvae.losses.importance_sampled_log_px`), mean and worst over examples;
    * ``kl_per_dimension``: ``KL(q(z_l|x) || N(0, 1))`` of each latent, a list;
    * ``active_units``: latents whose posterior mean varies across ``x`` with variance
      above 0.01 (Burda et al.);
    * ``mutual_information``: ``I(x; z)`` under the aggregate posterior
      (:func:`kdvae.losses.aggregate_posterior_mutual_information`), at most ``log N``;
    * ``means``: the posterior means ``[N, L]`` (for the figures).
    """
    graphdef, state = nnx.split(model)
    batch_size = min(batch_size, x.shape[0])
    chunk = max(1, min(k, 10_000 // batch_size))
    mi_key = jax.random.fold_in(key, 1)  # the bounds keep `key`'s samples
    elbo, rec, kl, sampled, posterior = _bounds_fn(graphdef, k, chunk, batch_size)(state, x, key)
    means, n = np.asarray(posterior.mean), x.shape[0]
    nll = -np.asarray(sampled.log_px, np.float64)
    ess = np.asarray(sampled.ess, np.float64)
    mutual_information = jax.jit(losses.aggregate_posterior_mutual_information)(mi_key, posterior)
    return {
        "neg_elbo": -float(jnp.mean(elbo)),
        "reconstruction": float(jnp.mean(rec)),
        "kl": float(jnp.mean(kl)),
        "nll": float(nll.mean()),
        "nll_mc_se": float(
            np.sqrt(np.sum(np.square(np.asarray(sampled.standard_error, np.float64)))) / n
        ),
        "nll_data_se": float(nll.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
        "ess_mean": float(ess.mean()),
        "ess_min": float(ess.min()),
        "kl_per_dimension": np.asarray(
            posterior.kl_to_standard_normal(per_dimension=True).mean(0), np.float64
        ).tolist(),
        "active_units": int(np.sum(np.var(means, axis=0) > 0.01)),
        "mutual_information": float(mutual_information),
        "means": means,
    }


@functools.lru_cache(maxsize=16)
def _elbo_fn(graphdef: nnx.GraphDef):
    """Jitted ``(state, x [N, 784], key) -> {neg_elbo, kl, reconstruction}``, averaged."""

    @jax.jit
    def neg_elbo(state, x, key):
        model = nnx.merge(graphdef, state)

        def one(xb, index):
            key_b = jax.random.fold_in(key, index)
            return losses.elbo(
                key_b, xb, model.encode(xb), model.decode, likelihood=model.likelihood
            )

        terms = train.batched_apply(one, x, batch_size=1000, with_index=True)
        return {
            "neg_elbo": -jnp.mean(terms.elbo),
            "kl": jnp.mean(terms.kl),
            "reconstruction": jnp.mean(terms.reconstruction),
        }

    return neg_elbo


def negative_elbo(splits: dict[str, jax.Array], key: jax.Array):
    """``evaluate(model, epoch)`` for :func:`kdvae.train.fit`: the negative ELBO and its
    terms on each of ``splits`` (``{"val": x [N, 784], ...}``, from :func:`fixed_inputs`),
    as ``val_neg_elbo``, ``val_kl``, ``val_reconstruction``, ... (the same ``key`` every
    epoch)."""

    def evaluate(model: nnx.Module, epoch: int) -> dict[str, float]:
        graphdef, state = nnx.split(model)
        fn = _elbo_fn(graphdef)
        return {
            f"{split}_{name}": float(value)
            for split, x in splits.items()
            if len(x)
            for name, value in fn(state, x, key).items()
        }

    return evaluate


def figures(workdir: Path, best, ds: data.Dataset, x_test, bounds: dict, log, seed: int) -> None:
    """Samples, reconstructions, latent space, KL per latent, manifold (2-D) and training
    curves; ``bounds`` is :func:`evaluate_bounds`'s."""
    from kdvae import plots

    means = bounds["means"]
    plots.kl_per_dimension_figure(workdir / "kl_per_dimension.png", bounds["kl_per_dimension"])
    # Figures: the decoder's means in [0, 1] (probabilities for a Bernoulli), never logits.
    z = jax.random.normal(jax.random.key(seed + 3), (64, best.latents))
    plots.image_grid(
        workdir / "samples.png", np.asarray(best.mean_image(z)), title="samples from the prior"
    )
    originals = x_test[:16]
    recon = best.mean_image(best.encode(originals).mean)
    plots.reconstructions_figure(
        workdir / "reconstructions.png", np.asarray(originals), np.asarray(recon), n=16
    )
    labels = ds.test.labels[: len(means)]
    plots.latent_scatter(workdir / "latents.png", means, labels, class_names=ds.class_names)
    if best.latents == 2:
        plots.manifold_figure(
            workdir / "manifold.png",
            lambda z: np.asarray(best.mean_image(jnp.asarray(z))),
        )
    plots.training_curves(
        workdir / "training_curves.png",
        log.rows(),
        keys=("train_loss", "test_neg_elbo", "test_kl", "test_reconstruction"),
    )


def format_table(results: dict[str, Any]) -> str:
    """The final table: bounds in nats with the NLL's error bars and its weights' ESS,
    the KL and reconstruction terms, I(x; z) and the active units (of the first seed);
    then, with several seeds, each summary's mean ± std and 95 % interval over them."""
    r = results
    rows = [
        ("test negative ELBO", f"{r['test_neg_elbo']:.2f} nats"),
        (
            f"test NLL (IWAE, k={r['eval_k']}, {r['eval_examples']} images)",
            f"{r['test_nll']:.2f} nats (negative ELBO {r['eval_neg_elbo']:.2f} on them)",
        ),
        *([("  in bits per dimension", f"{r['test_bpd']:.4f}")] if "test_bpd" in r else []),
        ("  its Monte-Carlo standard error", f"{r['test_nll_mc_se']:.3f} nats"),
        ("  standard error over test images", _maybe(r["test_nll_data_se"], ".3f", " nats")),
        (
            f"  effective sample size (of {r['eval_k']})",
            f"mean {r['ess_mean']:.1f}, worst {r['ess_min']:.1f}",
        ),
        ("KL(q(z|x) || p(z))", f"{r['kl']:.2f} nats"),
        ("reconstruction E_q[log p(x|z)]", f"{r['reconstruction']:.2f} nats"),
        ("I(x; z), aggregate posterior", f"{r['mutual_information']:.2f} nats"),
        ("active latent units", f"{r['active_units']} / {r['latents']}"),
        (
            "epochs (final fit on train + val)" if r.get("final_fit") else "epochs (best)",
            f"{r['epochs']} ({r['best_epoch']})",
        ),
        ("seconds (train, eval)", f"{r['seconds']:.1f}, {r['eval_seconds']:.1f}"),
    ]
    summary = r.get("over_seeds", {})
    if summary:
        rows.insert(0, (f"seed {r['seed']}", ""))
        n = next(iter(summary.values()))["n"]
        rows.append(
            (f"over {n} seeds (seeds {r['seeds'][0]}-{r['seeds'][-1]})", "mean ± std [95 % CI]")
        )
        rows += [(f"  {name}", _over_seeds(summary[name])) for name in summary]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _over_seeds(s: dict) -> str:
    low, high = s["ci95"]
    return f"{s['mean']:.2f} ± {s['std']:.2f} [{low:.2f}, {high:.2f}]"


def _maybe(value, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"
