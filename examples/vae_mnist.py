"""A variational autoencoder on binarized MNIST (Kingma & Welling 2014), end to end.

Trains on the ELBO (or Burda et al.'s IWAE bound), reports the test negative ELBO
every epoch and, at the end, the importance-sampled test negative log-likelihood;
writes results.json, metrics.jsonl, figures and checkpoints to --workdir.

    python examples/vae_mnist.py                                   # flax preset, MNIST
    python examples/vae_mnist.py --dataset fashion_mnist \
        --data-dir /usr/share/datasets/fashion-mnist               # offline IDX files
    python examples/vae_mnist.py --preset 2d --epochs 30           # latent-space pictures
    python examples/vae_mnist.py --preset iwae --objective iwae --k 50 --eval-k 5000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdvae import cli, vae


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__, default_workdir="runs/vae")
    p.add_argument("--preset", default="flax", help="model: flax (default) | iwae | 2d")
    p.add_argument("--epochs", type=int, help="default 20")
    p.add_argument("--latents", type=int, help="latent size (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="default 128")
    p.add_argument("--lr", type=float, dest="learning_rate", help="Adam learning rate (1e-3)")
    p.add_argument("--objective", choices=("elbo", "iwae"), help="training bound (elbo)")
    p.add_argument("--num-samples", type=int, help="z samples per example for the ELBO (1)")
    p.add_argument("--k", type=int, help="importance samples for --objective iwae (5)")
    p.add_argument("--beta", type=float, help="KL weight (1: the true ELBO)")
    p.add_argument("--kl-warmup-epochs", type=int, help="anneal the KL weight over n epochs")
    p.add_argument("--free-bits", type=float, help="nats per latent not penalised (0)")
    p.add_argument("--binarization", choices=("dynamic", "threshold"), help="(dynamic)")
    p.add_argument("--eval-k", type=int, help="importance samples for the test NLL (1000)")
    p.add_argument("--eval-examples", type=int, help="test images for the NLL (all)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with cli.errors_exit():
        config = vae.make_config(
            dataset=args.dataset, data_dir=args.data_dir, workdir=args.workdir,
            seed=args.seed, preset=args.preset, epochs=args.epochs, latents=args.latents,
            batch_size=args.batch_size, learning_rate=args.learning_rate,
            objective=args.objective, num_samples=args.num_samples, k=args.k,
            beta=args.beta, kl_warmup_epochs=args.kl_warmup_epochs,
            free_bits=args.free_bits, binarization=args.binarization, eval_k=args.eval_k,
            eval_examples=args.eval_examples, val_size=args.val_size, resume=args.resume,
            progress=not args.no_progress,
        )  # fmt: skip
        cli.check_workdir(Path(config.workdir), ("vae",), config.resume)
        cli.setup(args.distributed)
        results = vae.run(config)
        print(vae.format_table(results))
        print(f"results, metrics, figures and checkpoints in {config.workdir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
