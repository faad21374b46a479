"""Speed of kdvae's compiled train steps, beside the machine's fp32 GEMM rate.

For each step (the MLP teacher, the CNN teacher, the student alone, distillation with
a live teacher and with cached teacher logits, the VAE) and batch size: the median
milliseconds per step over many steps, samples per second, the first call's compile
time, XLA's FLOP count per step, the memory XLA plans for it, and the achieved FLOP
rate as a fraction of a large fp32 matrix multiply measured in the same run.

    python benchmarks/steps.py                 # table
    python benchmarks/steps.py --json          # one JSON object
    python benchmarks/steps.py --epoch         # also one full 60,000-example epoch each

Targets (batch 512, CPU): teacher >= 0.85, distill_cached >= 0.90, vae >= 0.80 of
the GEMM rate; distill_cached <= 1.1x the student step; compile < 2 s.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kdvae import models, objectives, train

STEPS = ("teacher", "cnn_teacher", "student", "distill_live", "distill_cached", "vae")


def gemm_rate(n: int = 2048, repeats: int = 10) -> float:
    """Median fp32 FLOP/s of an ``n x n`` matrix multiply."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times))


def _classifier(name: str, seed: int = 0):
    return models.make_classifier(models.CLASSIFIER_PRESETS[name], rngs=nnx.Rngs(seed))


def build(step: str, batch: int, rows: int):
    """A Trainer, its data and context for one benchmarked step."""
    images = jax.random.randint(jax.random.key(0), (rows, 28, 28, 1), 0, 256).astype(jnp.uint8)
    labels = jax.random.randint(jax.random.key(1), (rows,), 0, 10)
    data = {"images": images, "labels": labels}
    context = None
    if step in ("teacher", "cnn_teacher", "student"):
        preset = {"teacher": "hinton_teacher", "cnn_teacher": "cnn_teacher"}.get(
            step, "hinton_student"
        )
        model, loss_fn = _classifier(preset), objectives.classification_loss()
    elif step.startswith("distill"):
        teacher = _classifier("hinton_teacher", 1)
        graphdef, teacher_state = nnx.split(teacher)
        model = _classifier("hinton_student")
        loss_fn = objectives.distillation_objective(
            temperature=4.0, alpha=0.5, teacher_graphdef=graphdef
        )
        if step == "distill_cached":
            data["teacher_logits"] = jax.random.normal(jax.random.key(2), (rows, 10))
        else:
            context = {"teacher": teacher_state}
    elif step == "vae":
        model = models.make_vae(models.VAE_PRESETS["flax"], rngs=nnx.Rngs(0))
        loss_fn = objectives.vae_objective()
        data = {"images": images}
        context = {"epoch": jnp.int32(0)}
    else:
        raise ValueError(f"unknown step {step!r}")
    trainer = train.Trainer(model, optax.adam(1e-3), loss_fn)
    return trainer, data, context


def measure(step: str, batch: int, repeats: int) -> dict:
    rows = 8 * batch
    trainer, data, context = build(step, batch, rows)
    data = train.replicate(data, trainer.mesh)
    context = train.replicate(context, trainer.mesh)
    order = jnp.arange(rows).reshape(8, batch)
    sums = {k: jnp.float32(0) for k in trainer.metric_names(data, context)}
    key = jax.random.key(0)
    args = (trainer.state, sums, data, order, jnp.int32(0), key, context)

    t = time.perf_counter()
    compiled = trainer.step.lower(*args).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    memory = compiled.memory_analysis()
    planned = None
    if memory is not None:
        planned = int(
            memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
        )

    state = trainer.state
    for i in range(3):  # warm-up
        state, sums, loss = trainer.step(state, sums, data, order, jnp.int32(i % 8), key, context)
    loss.block_until_ready()
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        state, sums, loss = trainer.step(state, sums, data, order, jnp.int32(i % 8), key, context)
        loss.block_until_ready()
        times.append(time.perf_counter() - t)
    ms = float(np.median(times)) * 1e3
    return {
        "ms_per_step": round(ms, 3),
        "samples_per_s": round(batch / ms * 1e3, 1),
        "compile_s": round(compile_s, 3),
        "gflop_per_step": round(flops / 1e9, 4),
        "achieved_gflops": round(flops / ms / 1e6, 2),
        "planned_bytes": planned,
    }


def epoch_seconds(step: str, batch: int = 128, rows: int = 60_000) -> float:
    """Wall seconds of one full epoch through :func:`kdvae.train.fit`, compile included."""
    trainer, data, context = build(step, batch, rows)
    t = time.perf_counter()
    train.fit(
        trainer, data, epochs=1, batch_size=batch, seed=0, evaluate=lambda m, e: {},
        context=lambda e: context, progress=False,
    )  # fmt: skip
    return round(time.perf_counter() - t, 2)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch-sizes", default="128,512")
    p.add_argument("--steps", default=",".join(STEPS))
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--epoch", action="store_true", help="also time a 60,000-example epoch")
    args = p.parse_args(argv)
    train.enable_compilation_cache()

    gemm = gemm_rate()
    out: dict = {
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "gemm_gflops": round(gemm / 1e9, 2),
    }
    for step in args.steps.split(","):
        out[step] = {}
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            r = measure(step, batch, args.repeats)
            r["fraction_of_gemm"] = round(r["achieved_gflops"] * 1e9 / gemm, 3)
            out[step][str(batch)] = r
            if not args.json:
                print(f"{step:>15} b={batch:<4} {r['ms_per_step']:8.2f} ms "
                      f"{r['samples_per_s']:10.0f} samples/s  compile {r['compile_s']:.2f} s  "
                      f"{r['achieved_gflops']:7.1f} GFLOP/s = {r['fraction_of_gemm']:.2f} of GEMM",
                      flush=True)  # fmt: skip
    if "student" in out and "distill_cached" in out:
        out["distill_cached_over_student"] = {
            b: round(out["distill_cached"][b]["ms_per_step"] / out["student"][b]["ms_per_step"], 3)
            for b in out["student"]
        }
    if args.epoch:
        out["epoch_seconds"] = {s: epoch_seconds(s) for s in args.steps.split(",")}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"GEMM: {out['gemm_gflops']} GFLOP/s on {out['device']}")
        for k in ("distill_cached_over_student", "epoch_seconds"):
            if k in out:
                print(f"{k}: {out[k]}")
    return out


if __name__ == "__main__":
    main()
