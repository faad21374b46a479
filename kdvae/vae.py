"""Training and evaluating a VAE on MNIST-like data, as a library function.

The same training core as distillation with a new objective (the ELBO or IWAE bound).
Every epoch reports the negative ELBO on the validation split (which picks the best
epoch) and the test split; at the end, the importance-sampled negative log-likelihood
``-log p(x) ~ -IWAE_k`` (Burda et al. 2016) on the test set. The test set is binarized
once, with a seeded Bernoulli sample (or the fixed threshold), so every evaluation sees
the same binary images. ``examples/vae_mnist.py`` is the command line over :func:`run`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kdvae import data as kdata
from kdvae import losses, models, objectives, train

__all__ = ["VAERunConfig", "evaluate_bounds", "format_table", "make_config", "run"]


@dataclasses.dataclass(frozen=True)
class VAERunConfig:
    """Every setting of one VAE run (stored with its checkpoints)."""

    dataset: str = "mnist"
    data_dir: str | None = None
    workdir: str = "runs/vae"
    seed: int = 0
    preset: str = "flax"
    latents: int | None = None  # None: the preset's
    epochs: int = 20
    batch_size: int = 128
    learning_rate: float = 1e-3
    objective: str = "elbo"
    num_samples: int = 1
    k: int = 5
    beta: float = 1.0
    kl_warmup_epochs: int = 0
    free_bits: float = 0.0
    binarization: str = "dynamic"
    eval_k: int = 1000
    eval_examples: int | None = None  # None: the whole test set
    val_size: int = 5000
    resume: bool = False
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self) -> models.VAEConfig:
        preset = models.VAE_PRESETS[self.preset]
        if self.latents is None:
            return preset
        return dataclasses.replace(preset, latents=self.latents)


def make_config(**settings: Any) -> VAERunConfig:
    """A validated :class:`VAERunConfig`; ``None`` settings keep their defaults."""
    config = VAERunConfig(**{k: v for k, v in settings.items() if v is not None})
    c = config
    checks = [
        ("--preset", c.preset, c.preset in models.VAE_PRESETS,
         f"one of {sorted(models.VAE_PRESETS)}"),
        ("--objective", c.objective, c.objective in ("elbo", "iwae"), "'elbo' or 'iwae'"),
        ("--binarization", c.binarization, c.binarization in ("dynamic", "threshold"),
         "'dynamic' or 'threshold'"),
        ("--latents", c.latents, c.latents is None or c.latents >= 1, ">= 1"),
        ("--epochs", c.epochs, c.epochs >= 1, ">= 1"),
        ("--batch-size", c.batch_size, c.batch_size >= 1, ">= 1"),
        ("--lr", c.learning_rate, c.learning_rate > 0, "positive"),
        ("--num-samples", c.num_samples, c.num_samples >= 1, ">= 1"),
        ("--k", c.k, c.k >= 1, ">= 1"),
        ("--beta", c.beta, c.beta >= 0, ">= 0"),
        ("--free-bits", c.free_bits, c.free_bits >= 0, ">= 0"),
        ("--kl-warmup-epochs", c.kl_warmup_epochs, c.kl_warmup_epochs >= 0, ">= 0"),
        ("--eval-k", c.eval_k, c.eval_k >= 1, ">= 1"),
        ("--val-size", c.val_size, c.val_size >= 1, ">= 1 (the best epoch is chosen on it)"),
        ("--eval-examples", c.eval_examples, c.eval_examples is None or c.eval_examples >= 1,
         ">= 1"),
    ]  # fmt: skip
    for flag, value, ok, requirement in checks:
        if not ok:
            raise train.ConfigError(f"{flag} must be {requirement}, got {value!r}.")
    if c.objective == "iwae":  # the IWAE bound has no separate KL term to weight or free
        ignored = {
            "--beta": c.beta != 1.0,
            "--kl-warmup-epochs": c.kl_warmup_epochs != 0,
            "--free-bits": c.free_bits != 0.0,
            "--num-samples": c.num_samples != 1,
        }
        if any(ignored.values()):
            flags = ", ".join(k for k, v in ignored.items() if v)
            raise train.ConfigError(f"{flags} only apply to --objective elbo (use --k for iwae).")
    return config


def _fixed_binarization(images: np.ndarray, seed: int, dynamic: bool) -> jax.Array:
    """The test set's one binarization: a Bernoulli sample seeded by ``seed``."""
    key = jax.random.fold_in(jax.random.key(seed), 12345)
    return objectives.binarize(key, jnp.asarray(images), dynamic=dynamic)


def _bounds_fn(graphdef: nnx.GraphDef, k: int, chunk: int, batch_size: int):
    """Jitted ``(state, x [N, 784] binary, key) -> per-example (elbo, rec, kl, iwae_k, mean)``."""

    @jax.jit
    def bounds(state, x, key):
        model = nnx.merge(graphdef, state)

        def one_batch(xb, index):
            elbo_key, iwae_key = jax.random.split(jax.random.fold_in(key, index))
            posterior = model.encode(xb)  # once, for both bounds and the active units
            terms = losses.elbo(elbo_key, xb, posterior, model.decode)
            iwae = losses.iwae_bound(
                iwae_key, xb, posterior, model.decode, num_samples=k, chunk_size=chunk
            )
            return terms.elbo, terms.reconstruction, terms.kl, iwae, posterior.mean

        return train.batched_apply(one_batch, x, batch_size=batch_size, with_index=True)

    return bounds


def evaluate_bounds(
    model: models.VAE, x: jax.Array, *, k: int, key: jax.Array, batch_size: int = 100
) -> dict[str, Any]:
    """ELBO terms and the ``k``-sample IWAE bound on binary ``x [N, 784]``, averaged.

    Returns ``neg_elbo``, ``reconstruction``, ``kl``, ``nll`` (``-IWAE_k``, an upper
    bound on ``-log p(x)`` that tightens with ``k``), ``active_units`` (latents whose
    posterior mean varies across ``x`` with variance > 0.01; Burda et al.) and ``means``.
    """
    graphdef, state = nnx.split(model)
    batch_size = min(batch_size, x.shape[0])
    chunk = max(1, min(k, 10_000 // batch_size))
    elbo, rec, kl, iwae, means = _bounds_fn(graphdef, k, chunk, batch_size)(state, x, key)
    means = np.asarray(means)
    return {
        "neg_elbo": -float(jnp.mean(elbo)),
        "reconstruction": float(jnp.mean(rec)),
        "kl": float(jnp.mean(kl)),
        "nll": -float(jnp.mean(iwae)),
        "active_units": int(np.sum(np.var(means, axis=0) > 0.01)),
        "means": means,
    }


def _elbo_fn(graphdef: nnx.GraphDef):
    @jax.jit
    def neg_elbo(state, x, key):
        model = nnx.merge(graphdef, state)

        def one(xb, index):
            return losses.elbo(jax.random.fold_in(key, index), xb, model.encode(xb), model.decode)

        terms = train.batched_apply(one, x, batch_size=1000, with_index=True)
        return {
            "neg_elbo": -jnp.mean(terms.elbo),
            "kl": jnp.mean(terms.kl),
            "reconstruction": jnp.mean(terms.reconstruction),
        }

    return neg_elbo


def run(config: VAERunConfig, dataset: kdata.Dataset | None = None) -> dict[str, Any]:
    """Train, evaluate, and write ``results.json``, ``metrics.jsonl`` and figures."""
    workdir = Path(config.workdir)
    ds = dataset or kdata.load_dataset(
        config.dataset, data_dir=config.data_dir, val_size=config.val_size
    )
    train.check_batch_size(config.batch_size, len(ds.train), train.data_mesh())  # nothing written
    workdir.mkdir(parents=True, exist_ok=True)
    log = train.MetricsLog(workdir / "metrics.jsonl")
    if not config.resume and jax.process_index() == 0:
        log.path.unlink(missing_ok=True)
    dynamic = config.binarization == "dynamic"
    x_val = _fixed_binarization(ds.val.images, config.seed + 1, dynamic)
    x_test = _fixed_binarization(ds.test.images, config.seed, dynamic)

    model_config = config.model_config()
    model = models.build(
        lambda rngs: models.make_vae(model_config, rngs=rngs), jax.random.key(config.seed)
    )
    graphdef = nnx.split(model)[0]
    steps = max(len(ds.train) // config.batch_size, 1)
    tx = optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.epochs * steps))
    loss_fn = objectives.vae_objective(
        objective=config.objective, num_samples=config.num_samples, k=config.k,
        beta=config.beta, kl_warmup_epochs=config.kl_warmup_epochs,
        free_bits=config.free_bits, dynamic_binarization=dynamic,
    )  # fmt: skip
    trainer = train.Trainer(model, tx, loss_fn)
    neg_elbo = _elbo_fn(graphdef)
    eval_key = jax.random.key(config.seed + 7)

    def evaluate(model: nnx.Module, epoch: int) -> dict[str, float]:
        state = nnx.state(model)
        val = neg_elbo(state, x_val, eval_key) if len(ds.val) else {}
        test = neg_elbo(state, x_test, eval_key)
        return {
            **{f"val_{k}": float(v) for k, v in val.items()},
            **{f"test_{k}": float(v) for k, v in test.items()},
        }

    checkpointer = train.Checkpointer(workdir / "vae" / "checkpoints")
    settings = {k: v for k, v in config.to_dict().items() if k not in ("eval_k", "eval_examples")}
    result = train.fit(
        trainer, {"images": ds.train.images}, epochs=config.epochs,
        batch_size=config.batch_size, seed=config.seed, evaluate=evaluate,
        select=("val_neg_elbo", "min") if len(ds.val) else ("test_neg_elbo", "min"),
        context=lambda epoch: {"epoch": jnp.int32(epoch)}, checkpointer=checkpointer,
        config={**settings, "model": config.model_config().to_dict()},
        resume=config.resume, log=log, stage="vae", progress=config.progress,
    )  # fmt: skip
    checkpointer.close()
    best = nnx.merge(graphdef, result.best_state)

    t0 = time.perf_counter()
    n_eval = len(ds.test) if config.eval_examples is None else config.eval_examples
    n_eval = min(n_eval, len(ds.test))
    bounds = evaluate_bounds(best, x_test[:n_eval], k=config.eval_k, key=eval_key)
    best_row = result.best_metrics  # evaluate() on the whole test set, at the best epoch
    results = {
        "test_neg_elbo": best_row["test_neg_elbo"],
        "test_nll": bounds["nll"],
        "eval_neg_elbo": bounds["neg_elbo"],  # the ELBO on the same images as test_nll
        "eval_k": config.eval_k,
        "eval_examples": n_eval,
        "kl": best_row["test_kl"],
        "reconstruction": best_row["test_reconstruction"],
        "active_units": bounds["active_units"],
        "latents": config.model_config().latents,
        "params": models.count_params(best),
        "epochs": config.epochs,
        "best_epoch": result.best_epoch,
        "seconds": round(result.seconds, 1),
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "config": config.to_dict(),
        "devices": [str(d) for d in jax.devices()],
    }
    if jax.process_index() == 0:  # one writer in a multi-host run
        train.write_json(workdir / "results.json", results)
        _figures(workdir, best, ds, x_test, bounds["means"], log, config.seed)
    return results


def _figures(workdir, best, ds, x_test, means, log, seed) -> None:
    """Samples, reconstructions, latent space, manifold (2-D) and training curves."""
    from kdvae import plots

    # Figures: probabilities (sigmoid of the logits), never logits.
    z = jax.random.normal(jax.random.key(seed + 3), (64, best.latents))
    plots.image_grid(workdir / "samples.png", np.asarray(jax.nn.sigmoid(best.decode(z))),
                     title="samples from the prior")  # fmt: skip
    originals = x_test[:16]
    recon = jax.nn.sigmoid(best.decode(best.encode(originals).mean))
    plots.reconstructions_figure(workdir / "reconstructions.png", np.asarray(originals),
                                 np.asarray(recon), n=16)  # fmt: skip
    labels = ds.test.labels[: len(means)]
    plots.latent_scatter(workdir / "latents.png", means, labels,
                         class_names=ds.class_names)  # fmt: skip
    if best.latents == 2:
        plots.manifold_figure(
            workdir / "manifold.png",
            lambda z: np.asarray(jax.nn.sigmoid(best.decode(jnp.asarray(z)))),
        )
    plots.training_curves(
        workdir / "training_curves.png", log.rows(),
        keys=("train_loss", "test_neg_elbo", "test_kl", "test_reconstruction"),
    )  # fmt: skip


def format_table(results: dict[str, Any]) -> str:
    """The final table: bounds in nats, KL and reconstruction terms, active units."""
    r = results
    rows = [
        ("test negative ELBO", f"{r['test_neg_elbo']:.2f} nats"),
        (f"test NLL (IWAE, k={r['eval_k']}, {r['eval_examples']} images)",
         f"{r['test_nll']:.2f} nats (negative ELBO {r['eval_neg_elbo']:.2f} on them)"),
        ("KL(q(z|x) || p(z))", f"{r['kl']:.2f} nats"),
        ("reconstruction E_q[log p(x|z)]", f"{r['reconstruction']:.2f} nats"),
        ("active latent units", f"{r['active_units']} / {r['latents']}"),
        ("epochs (best)", f"{r['epochs']} ({r['best_epoch']})"),
        ("seconds (train, eval)", f"{r['seconds']:.1f}, {r['eval_seconds']:.1f}"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
