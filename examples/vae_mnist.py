"""A variational autoencoder on binarized MNIST (Kingma & Welling 2014), end to end.

Trains on the ELBO (or Burda et al.'s IWAE bound), reports the test negative ELBO
every epoch and, at the end, the importance-sampled test negative log-likelihood;
writes results.json, metrics.jsonl, figures and checkpoints to --workdir.

    python examples/vae_mnist.py                                   # flax preset, MNIST
    python examples/vae_mnist.py --dataset fashion_mnist \\
        --data-dir /usr/share/datasets/fashion-mnist               # offline IDX files
    python examples/vae_mnist.py --preset 2d --epochs 30           # latent-space pictures
    python examples/vae_mnist.py --preset iwae --objective iwae --k 50 --eval-k 5000
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from kdvae import cli, config, data, models, stats, train, vae
from kdvae.config import setting

EPOCHS, LEARNING_RATE = config.between(0, 10_000), config.positive_up_to(1.0)

#: Adam's peak learning rate for each model preset, where --lr is not given. The flax
#: preset's was chosen on the Fashion-MNIST validation split at 20 epochs (1e-3, 2e-3,
#: 4e-3, 8e-3, 1.6e-2; README, "Against the Flax example"); the others are not tuned.
LEARNING_RATES = {"flax": 4e-3, "iwae": 1e-3, "2d": 1e-3}


@dataclasses.dataclass(frozen=True)
class Settings(cli.Common):
    """Every setting of a run, each declared once."""

    workdir: str = setting(
        "runs/vae", "where outputs and checkpoints go", check=config.NON_EMPTY, training=False
    )
    preset: str = setting("flax", "the model", choices=tuple(models.VAE_PRESETS))
    latents: int | None = setting(
        None, "latent size (default: the preset's)", check=config.between(1, 4096)
    )
    epochs: int = setting(20, "training epochs", check=config.between(1, 10_000))
    batch_size: int = setting(128, "global batch size", check=config.between(1, 65536))
    learning_rate: float | None = setting(
        None,
        "Adam's peak learning rate, decayed by a cosine; None: the preset's ("
        + ", ".join(f"{k} {v:g}" for k, v in LEARNING_RATES.items())
        + ")",
        check=LEARNING_RATE,
        flag="lr",
    )
    objective: str = setting("elbo", "training bound", choices=("elbo", "iwae"))
    gradient: str = setting(
        "reparameterized",
        "the encoder's gradient estimator: reparameterized, stl (--objective elbo; "
        "Roeder et al. 2017) or dreg (--objective iwae; Tucker et al. 2019)",
        choices=tuple(vae.GRADIENT_OBJECTIVES),
        legacy="reparameterized",
    )
    num_samples: int = setting(
        1, "z samples per example for the ELBO", check=config.between(1, 1000)
    )
    k: int = setting(5, "importance samples for --objective iwae", check=config.between(1, 5000))
    beta: float = setting(1.0, "KL weight (1: the true ELBO)", check=config.between(0, 1000))
    kl_warmup_epochs: int = setting(0, "anneal the KL weight over n epochs", check=EPOCHS)
    free_bits: float = setting(0.0, "nats per latent not penalised", check=config.between(0, 100))
    likelihood: str = setting(
        "bernoulli",
        "the decoder: bernoulli on binarized images, or gaussian on dequantized grey levels "
        "(reports bits per dimension)",
        choices=("bernoulli", "gaussian"),
        legacy="bernoulli",
    )
    decoder_logvar: float | None = setting(
        None,
        "gaussian: a fixed decoder log-variance (default: decoded from z, one per pixel)",
        check=config.between(-20, 20),
        legacy=None,
    )
    binarization: str = setting(
        "dynamic",
        "dynamic: a fresh binarization (gaussian: dequantization noise) per batch; "
        "threshold: at 0.5 (gaussian: mid-level)",
        choices=("dynamic", "threshold"),
    )
    eval_k: int = setting(
        1000,
        "importance samples for the test NLL",
        check=config.between(1, 100_000),
        training=False,
    )
    final_fit: bool = setting(
        False,
        "after choosing the epoch count on validation, train afresh on training + "
        "validation for that many epochs and report that model",
        training=False,  # the first stage is the same; the final one stores its own epochs
    )
    seeds: int = setting(
        1,
        "train N models (--seed, --seed + 1, ...): mean, std and 95 % interval over them",
        check=config.between(1, 100),
        training=False,
    )
    eval_examples: int | None = setting(
        None,
        "test images for the NLL (default: all)",
        check=config.between(1, 10**7),
        training=False,
    )

    def check(self):
        if self.decoder_logvar is not None and self.likelihood != "gaussian":
            raise config.ConfigError("--decoder-logvar is for --likelihood gaussian.")
        try:
            vae.check_gradient(self.gradient, self.objective, self.free_bits)
        except ValueError as err:  # the library's words, in the flags' names
            raise config.ConfigError(
                str(err)
                .replace("gradient ", "--gradient ")
                .replace("objective", "--objective")
                .replace("free_bits", "--free-bits")
            ) from None
        if self.objective == "iwae":  # the IWAE bound has no separate KL term to weight or free
            ignored = {
                "--beta": self.beta != 1.0,
                "--kl-warmup-epochs": self.kl_warmup_epochs,
                "--free-bits": self.free_bits,
                "--num-samples": self.num_samples != 1,
            }
            if any(ignored.values()):
                flags = ", ".join(k for k, v in ignored.items() if v)
                raise config.ConfigError(
                    f"{flags} only apply to --objective elbo (use --k for iwae)."
                )

    def training(self) -> dict:
        # The learning rate the run uses, not None: a run stored before the presets had
        # their own still resumes where its rate is the preset's.
        return {**super().training(), "learning_rate": self.peak_learning_rate()}

    def peak_learning_rate(self) -> float:
        if self.learning_rate is None:
            return LEARNING_RATES[self.preset]
        return self.learning_rate

    def model_config(self) -> models.VAEConfig:
        preset = models.VAE_PRESETS[self.preset]
        latents = preset.latents if self.latents is None else self.latents
        return dataclasses.replace(
            preset, latents=latents, likelihood=self.likelihood, decoder_logvar=self.decoder_logvar
        )


def stored(s: Settings, ds: data.Dataset) -> dict:
    """What the checkpoints store, and a resume must match: settings, model and data."""
    return {**s.training(), "model": s.model_config().to_dict(), "data": data.fingerprint(ds)}


def seeds(s: Settings) -> range:
    return range(s.seed, s.seed + s.seeds)


def stage_name(s: Settings, seed: int) -> str:
    """``vae`` for the first seed (as with one), ``vae/seed_<k>`` for each further one:
    its metrics rows and ``<workdir>/<stage>/checkpoints``."""
    return "vae" if seed == s.seed else f"vae/seed_{seed}"


def checkpoints(s: Settings, seed: int) -> Path:
    return Path(s.workdir) / stage_name(s, seed) / "checkpoints"


def fit(s: Settings, ds: data.Dataset, log: train.MetricsLog, x_eval: dict, seed: int, final=False):
    """The VAE trained on ``ds.train`` from ``seed``: the model at its best validation
    epoch, and the fit. ``final``: the final fit on ``ds`` with nothing held out
    (stage ``<stage>/final``), for ``s.epochs`` epochs, its last epoch's model."""
    stage = stage_name(s, seed) + ("/final" if final else "")
    s = dataclasses.replace(s, seed=seed)
    model = models.build(
        lambda rngs: models.make_vae(s.model_config(), dtype=s.dtype, rngs=rngs),
        jax.random.key(s.seed),
    )
    steps = max(len(ds.train) // s.batch_size, 1)
    tx = optax.adam(optax.cosine_decay_schedule(s.peak_learning_rate(), s.epochs * steps))
    objective = vae.objective(
        objective=s.objective,
        num_samples=s.num_samples,
        k=s.k,
        beta=s.beta,
        kl_warmup_epochs=s.kl_warmup_epochs,
        free_bits=s.free_bits,
        dynamic_binarization=s.binarization == "dynamic",
        gradient=s.gradient,
    )
    trainer = train.Trainer(model, tx, objective)
    select = None if final else ("val_neg_elbo", "min")
    with train.Checkpointer(Path(s.workdir) / stage / "checkpoints") as checkpointer:
        fitted = train.fit(
            trainer,
            {"images": ds.train.images},
            train.Loop(s.epochs, s.batch_size, s.seed, select),
            evaluate=vae.negative_elbo(x_eval, jax.random.key(s.seed + 7)),
            context=lambda epoch: {"epoch": jnp.int32(epoch)},
            stage=train.Stage(stage, checkpointer, log, stored(s, ds), s.resume, s.progress),
        )
    return models.with_dtype(trainer.best_model(fitted), "float32"), fitted  # evaluated in f32


def experiment(s: Settings, ds: data.Dataset | None = None) -> dict:
    """Train, evaluate, report: the results (also in results.json) and figures."""
    # 1. Data: the evaluation splits binarized once, with seeded samples. Every check
    # that can refuse the run comes before its first file is written.
    ds = ds or data.load_dataset(s.dataset, data_dir=s.data_dir, val_size=s.val_size)
    train.check_batch_size(s.batch_size, len(ds.train), train.data_mesh())
    for seed in seeds(s):
        train.check_resumable(checkpoints(s, seed), stored(dataclasses.replace(s, seed=seed), ds))
    with train.claim_workdir(s.workdir, resume=s.resume) as log:
        return train_and_report(s, ds, log)


def train_and_report(s: Settings, ds: data.Dataset, log: train.MetricsLog) -> dict:
    """Training, the final evaluation, results.json and the figures."""
    dynamic = s.binarization == "dynamic"
    x_eval = {
        "val": vae.fixed_inputs(ds.val.images, s.seed + 1, dynamic, s.likelihood),
        "test": vae.fixed_inputs(ds.test.images, s.seed, dynamic, s.likelihood),
    }

    # 2. One model per seed, each trained (best epoch on validation) and evaluated on
    # the same binarized test images.
    runs, first = [], None
    for seed in seeds(s):
        best, fitted = fit(s, ds, log, x_eval, seed)
        if s.final_fit:  # the epoch count chosen on validation, then all 60k images
            final_settings = dataclasses.replace(s, epochs=fitted.best_epoch)
            everything = data.with_validation_in_training(ds)
            test_only = {"test": x_eval["test"]}
            best, fitted = fit(final_settings, everything, log, test_only, seed, final=True)
        run, bounds = evaluate(s, ds, best, fitted, x_eval["test"], seed)
        runs.append(run)
        first = first or (best, bounds)
    results = {**runs[0], "seeds": list(seeds(s))}
    if s.seeds > 1:
        results["runs"] = runs
        summary = [key for key in SUMMARY if key in runs[0]]
        results["over_seeds"] = {key: stats.interval([r[key] for r in runs]) for key in summary}
    results |= {
        "config": s.to_dict(),
        "data": data.fingerprint(ds),
        "devices": [str(d) for d in jax.devices()],
    }

    # 4. Report.
    train.check_finite_results(results)
    if jax.process_index() == 0:  # one writer in a multi-host run
        train.write_json(Path(s.workdir) / "results.json", results)
        best, bounds = first
        if s.figures:
            vae.figures(Path(s.workdir), best, ds, x_eval["test"], bounds, log, s.seed)
    return results


#: What the table and results.json summarise over seeds.
SUMMARY = (
    "test_neg_elbo",
    "test_nll",
    "test_bpd",  # a Gaussian decoder's
    "kl",
    "active_units",
    "mutual_information",
    "seconds",
)


def evaluate(s: Settings, ds: data.Dataset, best, fitted, x_test, seed: int):
    """3. One model's results: the importance-sampled NLL on the test images, with its
    error bars and the posterior's diagnostics; and :func:`vae.evaluate_bounds`'s."""
    t0 = time.perf_counter()
    n_eval = min(len(ds.test) if s.eval_examples is None else s.eval_examples, len(ds.test))
    eval_key = jax.random.key(seed + 7)
    bounds = vae.evaluate_bounds(best, x_test[:n_eval], k=s.eval_k, key=eval_key)
    # The whole test set's ELBO terms, by the float32 model with the key of the epochs'
    # rows (the same numbers as the best row's when training was in float32, not when it
    # was in bfloat16).
    row = vae.negative_elbo({"test": x_test}, eval_key)(best, fitted.best_epoch)
    run = {
        "seed": seed,
        "test_neg_elbo": row["test_neg_elbo"],
        "test_nll": bounds["nll"],
        "test_nll_mc_se": bounds["nll_mc_se"],
        "test_nll_data_se": bounds["nll_data_se"],
        "ess_mean": bounds["ess_mean"],
        "ess_min": bounds["ess_min"],
        "eval_neg_elbo": bounds["neg_elbo"],  # the ELBO on the same images as test_nll
        "eval_k": s.eval_k,
        "eval_examples": n_eval,
        "kl": row["test_kl"],
        "reconstruction": row["test_reconstruction"],
        "active_units": bounds["active_units"],
        "kl_per_dimension": bounds["kl_per_dimension"],
        "mutual_information": bounds["mutual_information"],
        "latents": s.model_config().latents,
        "params": models.count_params(best),
        "epochs": s.epochs,
        "best_epoch": fitted.best_epoch,
        "final_fit": s.final_fit,  # then best_epoch is the count chosen, trained on train + val
        "seconds": round(fitted.seconds, 1),
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }
    if s.likelihood == "gaussian":  # a density on dequantized grey levels: in bits per pixel
        run["test_bpd"] = vae.bits_per_dimension(bounds["nll"], x_test.shape[-1])
    return run, bounds


def main(argv: list[str] | None = None) -> int:
    settings = config.parse(Settings, argv, description=__doc__)
    with cli.errors_exit():
        stages = [stage_name(settings, seed) for seed in seeds(settings)]
        stages += [f"{stage}/final" for stage in stages] if settings.final_fit else []
        cli.check_workdir(Path(settings.workdir), stages, settings.resume)
        cli.setup(settings.distributed)
        results = experiment(settings)
        print(vae.format_table(results))
        figures = "figures and " if settings.figures else ""
        print(f"results, metrics, {figures}checkpoints in {settings.workdir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
