"""The CNN teacher's train step: kdvae against PyTorch eager, on this machine's CPU.

The same network (conv32-pool-conv64-pool-dense128-dropout-dense10, 3x3 'SAME'
convolutions, ReLU), the same Adam and cross-entropy, the same uint8 images turned into
floats in the step. Each batch size is timed in interleaved rounds (kdvae, then
PyTorch, then kdvae...), and the table gives the medians and their ratio, so a slow
spell of a shared machine touches both.

    pip install torch --index-url https://download.pytorch.org/whl/cpu   # CPU-only build
    python benchmarks/torch_cnn.py
    python benchmarks/torch_cnn.py --batch-sizes 128,512 --rounds 15 --json

Needs ``torch`` (the ``bench-torch`` extra, or the CPU-only wheel above); nothing else
in kdvae does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import steps  # noqa: E402  (this folder's step benchmark: kdvae's side)


def torch_runner(batch: int, steps_per_round: int, threads: int):
    """A function timing ``steps_per_round`` PyTorch eager steps (seconds per step)."""
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(7 * 7 * 64, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, 10),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (8 * batch, 1, 28, 28), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, 8 * batch))
    model.train()

    def one_step(i):
        rows = slice((i % 8) * batch, (i % 8 + 1) * batch)
        x = images[rows].float() / 255.0
        loss = nn.functional.cross_entropy(model(x), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def run():
        t = time.perf_counter()
        for i in range(steps_per_round):
            one_step(i)
        return (time.perf_counter() - t) / steps_per_round

    run()
    return run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="128,512")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds of 5 steps")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--default-malloc", action="store_true", help=steps.MALLOC_HELP)
    args = p.parse_args(argv)
    kept = steps.keep_freed_host_memory(args.default_malloc)  # for PyTorch too: one process
    try:
        import torch
    except ImportError:
        sys.exit("benchmarks/torch_cnn.py needs torch: pip install -e '.[bench-torch]'")
    threads = len(os.sched_getaffinity(0))
    out = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": threads, "kept_freed_host_memory": kept}  # fmt: skip
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        runners = {
            "kdvae": steps._library_runner("cnn_teacher", batch, (), 5),
            "pytorch": torch_runner(batch, 5, threads),
        }
        times = steps._rounds(runners, args.rounds)
        out[str(batch)] = {
            "kdvae_ms": round(times["kdvae"] * 1e3, 2),
            "pytorch_ms": round(times["pytorch"] * 1e3, 2),
            "kdvae_over_pytorch": round(times["kdvae"] / times["pytorch"], 3),
        }
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"torch {out['torch']}, {threads} threads, kept freed host memory: {kept}")
        for batch in args.batch_sizes.split(","):
            r = out[batch]
            ratio = r["kdvae_over_pytorch"]
            print(f"cnn_teacher b={batch:<4} kdvae {r['kdvae_ms']:8.2f} ms  "
                  f"pytorch {r['pytorch_ms']:8.2f} ms  kdvae/pytorch {ratio:.3f}")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
