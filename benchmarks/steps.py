"""Speed of kdvae's compiled train steps, beside the machine's fp32 GEMM rate.

For each step (the MLP teacher, the CNN teacher, the student alone, distillation with
a live teacher and with cached teacher logits, the VAE) and batch size:

* milliseconds per step (median over rounds of 5 steps dispatched back to back, as
  ``kdvae.train.fit`` runs them) and samples per second;
* the step's compile time (cold: no persistent cache), the memory XLA plans for it
  and, on a GPU, the allocator's peak so far;
* ``fraction_of_gemm``: the step's matrix-multiply FLOPs per second over the rate of
  a 2048^2 fp32 GEMM timed between the rounds (per round, then the median);
* ``matmul_bound``: the same fraction for the step's matrix multiplies run alone, at
  their own shapes (the most the step could reach), and ``matmul_share``, their
  part of the step's time.

    python benchmarks/steps.py                 # table
    python benchmarks/steps.py --json          # one JSON object
    python benchmarks/steps.py --epoch         # also one full 60,000-example epoch each
    python benchmarks/steps.py --ablations     # also what dropout, max-norm, Adam and
                                               # binarization cost the teacher and VAE
    python benchmarks/steps.py --methods       # also each distillation method's cached
                                               # step over KD's (target: <= 1.1x at 512)
    python benchmarks/steps.py --estimators    # also the VAE's STL and DReG steps over
                                               # the plain ones (target: <= 1.15x)
    python benchmarks/steps.py --bfloat16      # also each step computing in bfloat16,
                                               # over float32 (the --dtype setting)

Targets (batch 512, CPU): teacher >= 0.85, distill_cached >= 0.90, vae >= 0.80 of
the GEMM rate; distill_cached <= 1.1x the student step; compile < 2 s. The last two are
met; the first three are not, and ``matmul_bound`` and ``--ablations`` show what
bounds them (see the README's "Speed").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kdvae import distill, models, train, vae

try:
    from benchmarks import reference
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import reference

MALLOC_HELP = "leave glibc's malloc as it is (no kdvae.train.keep_freed_host_memory)"


def keep_freed_host_memory(default_malloc: bool) -> bool:
    """As the examples do (before JAX computes), unless ``default_malloc``."""
    return False if default_malloc else train.keep_freed_host_memory()


STEPS = ("teacher", "cnn_teacher", "student", "distill_live", "distill_cached", "vae")


class Gemm:
    """An ``n x n`` fp32 matrix multiply, timed between the steps it is compared with."""

    def __init__(self, n: int = 2048):
        self.flops = 2 * n**3
        self.a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        self.b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        self.matmul = jax.jit(jnp.matmul)
        self.matmul(self.a, self.b).block_until_ready()

    def rate(self) -> float:
        """FLOP/s of one multiply."""
        t = time.perf_counter()
        self.matmul(self.a, self.b).block_until_ready()
        return self.flops / (time.perf_counter() - t)


_DOT = re.compile(
    r"stablehlo\.dot_general .*?(?:batching_dims = \[([\d, ]*)\] x \[([\d, ]*)\], )?"
    r"contracting_dims = \[([\d, ]*)\] x \[([\d, ]*)\].*?"
    r": \(tensor<([\dx]+)xf32>, tensor<([\dx]+)xf32>\)"
)


def _ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",")) if text and text.strip() else ()


def matmuls_alone(lowered) -> tuple[Callable, list[jax.Array], float]:
    """The step's own fp32 matrix multiplies (from its StableHLO), as one program.

    Each ``dot_general`` of the step runs on random operands of the same shapes,
    independently of the others: the time the step would take if it did nothing but
    its matrix multiplies, at the shapes its layers give them. Also returns their
    FLOPs, the step's useful work (XLA's own count adds element-wise and integer
    operations, such as the dropout masks' hashing).
    """
    text = lowered.as_text()
    # The text is counted, not the executions: a product in a called function or a loop
    # body would be counted once. The steps here have none; refuse rather than miscount.
    functions = text.split("func.func ")
    if any("dot_general" in f for f in functions[1:] if not f.startswith("public @main")):
        raise NotImplementedError("a matrix multiply outside @main: its calls are not counted")
    if "stablehlo.while" in text and "dot_general" in text.split("stablehlo.while", 1)[1]:
        raise NotImplementedError("a matrix multiply after a loop: it may be in the loop body")
    specs = []
    for m in _DOT.finditer(text):
        lb, rb, lc, rc, lhs, rhs = m.groups()
        shapes = [tuple(int(d) for d in t.split("x")) for t in (lhs, rhs)]
        specs.append((shapes, ((_ints(lc), _ints(rc)), (_ints(lb), _ints(rb)))))
    if not specs:
        raise ValueError("no fp32 matrix multiply found in the step (other dtypes are not timed)")
    flops = 0.0
    for (lhs, rhs), ((lc, rc), (lb, rb)) in specs:
        lhs_free = math.prod(d for i, d in enumerate(lhs) if i not in lc + lb)
        rhs_free = math.prod(d for i, d in enumerate(rhs) if i not in rc + rb)
        contracted = math.prod(lhs[i] for i in lc)
        flops += 2.0 * math.prod(lhs[i] for i in lb) * lhs_free * rhs_free * contracted
    keys = jax.random.split(jax.random.key(3), 2 * len(specs))
    operands = [
        jax.random.normal(k, shape, jnp.float32)
        for k, shape in zip(keys, [s for shapes, _ in specs for s in shapes], strict=True)
    ]

    def run(operands):
        pairs = zip(operands[::2], operands[1::2], strict=True)
        return [jax.lax.dot_general(a, b, dims) for (a, b), (_, dims) in zip(pairs, specs)]

    return jax.jit(run), operands, flops


def _classifier(name: str, seed: int = 0, without: tuple[str, ...] = (), dtype="float32"):
    config = models.CLASSIFIER_PRESETS[name]
    if "dropout" in without:
        config = dataclasses.replace(config, input_dropout=0.0, hidden_dropout=0.0)
    if "max_norm" in without:
        config = dataclasses.replace(config, max_norm=None)
    return models.make_classifier(config, dtype=dtype, rngs=nnx.Rngs(seed))


# What --ablations takes out of a step, one part at a time and all together.
ABLATIONS = {
    "teacher": ("dropout", "max_norm", "adam"),
    "vae": ("binarization", "adam"),
}


def build(step: str, batch: int, rows: int, without: tuple[str, ...] = (), dtype="float32"):
    """A Trainer, its data and context for one benchmarked step, its model computing in
    ``dtype``.

    ``without`` takes parts out, to see what they cost: ``"dropout"``, ``"max_norm"``
    (the teacher's), ``"binarization"`` (the VAE's dynamic one, for a fixed threshold)
    and ``"adam"`` (plain SGD instead).
    """
    data, context = bench_data(step, rows), None
    if step in ("teacher", "cnn_teacher", "student"):
        preset = {"teacher": "hinton_teacher", "cnn_teacher": "cnn_teacher"}.get(
            step, "hinton_student"
        )
        model = _classifier(preset, without=without, dtype=dtype)
        loss_fn = distill.classification_loss()
    elif step.startswith("distill"):
        teacher = _classifier("hinton_teacher", 1)
        graphdef, teacher_state = nnx.split(teacher)
        model = _classifier("hinton_student", dtype=dtype)
        method = step.partition(":")[2] or "kd"  # e.g. distill_cached:dkd
        loss_fn = distill.distillation_objective(method, teacher_graphdef=graphdef)
        if not step.startswith("distill_cached"):
            context = {"teacher": teacher_state}
    elif step.startswith("vae"):  # vae, or e.g. vae:stl, vae_iwae50, vae_iwae50:dreg
        model = models.make_vae(models.VAE_PRESETS["flax"], dtype=dtype, rngs=nnx.Rngs(0))
        name, _, gradient = step.partition(":")
        iwae = name.startswith("vae_iwae")
        loss_fn = vae.objective(
            objective="iwae" if iwae else "elbo",
            k=int(name[len("vae_iwae") :]) if iwae else 1,
            gradient=gradient or "reparameterized",
            dynamic_binarization="binarization" not in without,
        )
        context = {"epoch": jnp.int32(0)}
    else:
        raise ValueError(f"unknown step {step!r}")
    tx = optax.sgd(1e-3) if "adam" in without else optax.adam(1e-3)
    return train.Trainer(model, tx, loss_fn), data, context


def bench_data(step: str, rows: int) -> dict[str, jax.Array]:
    """Random uint8 images ``[rows, 28, 28, 1]``, and labels (and cached teacher logits)
    for the classifier steps."""
    images = jax.random.randint(jax.random.key(0), (rows, 28, 28, 1), 0, 256).astype(jnp.uint8)
    if step.startswith("vae"):
        return {"images": images}
    data = {"images": images, "labels": jax.random.randint(jax.random.key(1), (rows,), 0, 10)}
    if step.startswith("distill_cached"):
        data["teacher_logits"] = jax.random.normal(jax.random.key(2), (rows, 10))
    return data


def ablate(step: str, batch: int, rounds: int, steps_per_round: int = 5) -> dict[str, float]:
    """Median ms per step of ``step`` whole and without each of its parts (and all).

    The variants are timed in interleaved rounds, so their differences are what each
    part costs, measured under the same conditions.
    """
    parts = ABLATIONS[step]
    variants = {"whole": (), **{f"without {p}": (p,) for p in parts}, "without all": parts}
    builds = {name: (step, without) for name, without in variants.items()}
    times = _interleaved(builds, batch, rounds, steps_per_round)
    return {name: round(t * 1e3, 3) for name, t in times.items()}


def methods_over_kd(batch: int, rounds: int, steps_per_round: int = 5) -> dict[str, float]:
    """Each distillation method's cached-logits step time over KD's (medians of
    interleaved rounds, so the ratios share the machine's conditions)."""
    builds = {method: (f"distill_cached:{method}", ()) for method in distill.METHODS}
    times = _interleaved(builds, batch, rounds, steps_per_round)
    return {method: round(t / times["kd"], 3) for method, t in times.items()}


#: Each lower-variance estimator's step and the plain step it is timed against.
ESTIMATORS = {
    "stl": ("vae:stl", "vae"),
    "dreg k=5": ("vae_iwae5:dreg", "vae_iwae5"),
    "dreg k=50": ("vae_iwae50:dreg", "vae_iwae50"),
}


def estimators_over_plain(batch: int, rounds: int, steps_per_round: int = 5) -> dict:
    """Each STL or DReG step's time over the plain reparameterized step's, at the same
    objective and k (medians of interleaved rounds; target: at most 1.15x)."""
    steps = sorted({step for pair in ESTIMATORS.values() for step in pair})
    times = _interleaved({step: (step, ()) for step in steps}, batch, rounds, steps_per_round)
    return {name: round(times[new] / times[plain], 3) for name, (new, plain) in ESTIMATORS.items()}


def _interleaved(builds: dict, batch: int, rounds: int, steps_per_round: int) -> dict:
    """Median seconds per step of each ``{name: (step, without)}``, timed in interleaved
    rounds so that every variant shares the machine's conditions."""
    runners = {
        name: _library_runner(step, batch, without, steps_per_round)
        for name, (step, without) in builds.items()
    }
    return _rounds(runners, rounds)


def _rounds(runners: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median seconds per step of each runner, over ``rounds`` interleaved rounds."""
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times[name].append(run())
    return {name: float(np.median(t)) for name, t in times.items()}


def _versus(runners: dict[str, Callable[[], float]], rounds: int) -> dict:
    """Two runners timed in interleaved rounds: ``{<a>_ms, <b>_ms, ratio: a / b}``."""
    times = _rounds(runners, rounds)
    (a, time_a), (b, time_b) = times.items()
    return {f"{a}_ms": round(time_a * 1e3, 3), f"{b}_ms": round(time_b * 1e3, 3),
            "ratio": round(time_a / time_b, 3)}  # fmt: skip


def overhead(steps: list[str], batch: int, rounds: int, steps_per_round: int = 5) -> dict:
    """kdvae's step time over the hand-written one's (:mod:`reference`), per step."""
    return {
        step: _versus(
            {
                "kdvae": _library_runner(step, batch, (), steps_per_round),
                "hand_written": _reference_runner(step, batch, steps_per_round),
            },
            rounds,
        )
        for step in steps
    }


def mixed_precision(steps: list[str], batch: int, rounds: int, steps_per_round: int = 5) -> dict:
    """Each step computing in bfloat16 over float32 (interleaved rounds, medians)."""
    return {
        step: _versus(
            {
                dtype: _library_runner(step, batch, (), steps_per_round, dtype)
                for dtype in ("bfloat16", "float32")
            },
            rounds,
        )
        for step in steps
    }


def _prepare(step: str, batch: int, without: tuple[str, ...] = (), dtype: str = "float32"):
    """``build``'s trainer, its data and context placed on the mesh, an order of 8
    batches, and zeroed metric sums."""
    trainer, data, context = build(step, batch, 8 * batch, without, dtype)
    data, context = train.replicate((data, context), trainer.mesh)
    order = jnp.arange(8 * batch).reshape(8, batch)
    sums = trainer.metric_sums(dict.fromkeys(trainer.metric_names(data, context), 0.0))
    return trainer, data, context, order, sums


def _timer(one_step: Callable[[int], jax.Array], steps_per_round: int) -> Callable[[], float]:
    """A function timing ``steps_per_round`` calls of ``one_step(i)`` dispatched back to
    back (seconds per step); called once here to compile and warm up."""

    def run():
        t = time.perf_counter()
        for i in range(steps_per_round):
            loss = one_step(i)
        loss.block_until_ready()
        return (time.perf_counter() - t) / steps_per_round

    run()
    return run


def _library_runner(
    step: str, batch: int, without: tuple[str, ...], steps_per_round: int, dtype: str = "float32"
):
    """kdvae's step, as :func:`kdvae.train.run_epoch` calls it."""
    trainer, data, context, order, sums = _prepare(step, batch, without, dtype)
    state, key = [trainer.leaves, sums], jax.random.key(0)

    def one_step(i):
        state[0], state[1], loss = trainer.step(
            state[0], state[1], data, order, np.int32(i % 8), key, context
        )
        return loss

    return _timer(one_step, steps_per_round)


def _reference_runner(step: str, batch: int, steps_per_round: int):
    """The hand-written step of :mod:`reference`, on the same data."""
    run_step, state = reference.make(step)
    data, state = bench_data(step, 8 * batch), [state]
    order, key = jnp.arange(8 * batch).reshape(8, batch), jax.random.key(0)

    def one_step(i):
        state[0], loss = run_step(state[0], data, order, np.int32(i % 8), key)
        return loss

    return _timer(one_step, steps_per_round)


def measure(step: str, batch: int, gemm: Gemm, rounds: int, steps_per_round: int = 5) -> dict:
    trainer, data, context, order, sums = _prepare(step, batch)
    key = jax.random.key(0)
    args = (trainer.leaves, sums, data, order, np.int32(0), key, context)

    t = time.perf_counter()
    lowered = trainer.step.lower(*args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    memory = compiled.memory_analysis()
    planned = None
    if memory is not None:
        planned = int(
            memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
        )

    dots, operands, flops = matmuls_alone(lowered)
    jax.block_until_ready(dots(operands))
    state = trainer.leaves
    for i in range(3):  # warm-up
        state, sums, loss = trainer.step(state, sums, data, order, np.int32(i % 8), key, context)
    loss.block_until_ready()
    # Rounds of `steps_per_round` steps dispatched back to back (as `fit` does: it waits
    # only every few steps), then as many runs of the step's matrix multiplies alone,
    # then one GEMM. Ratios are taken per round, so a slow spell of this shared machine
    # cancels out.
    ms, fractions, bounds, shares = [], [], [], []
    for r in range(rounds):
        t = time.perf_counter()
        for i in range(steps_per_round):
            index = np.int32((r * steps_per_round + i) % 8)
            state, sums, loss = trainer.step(state, sums, data, order, index, key, context)
        loss.block_until_ready()
        seconds = (time.perf_counter() - t) / steps_per_round
        t = time.perf_counter()
        for _ in range(steps_per_round):
            out = dots(operands)
        jax.block_until_ready(out)
        dot_seconds = (time.perf_counter() - t) / steps_per_round
        rate = gemm.rate()
        ms.append(seconds * 1e3)
        fractions.append(flops / seconds / rate)
        bounds.append(flops / dot_seconds / rate)
        shares.append(dot_seconds / seconds)
    ms = float(np.median(ms))
    return {
        "ms_per_step": round(ms, 3),
        "samples_per_s": round(batch / ms * 1e3, 1),
        "compile_s": round(compile_s, 3),
        "gflop_per_step": round(flops / 1e9, 4),
        "achieved_gflops": round(flops / ms / 1e6, 2),
        "fraction_of_gemm": round(float(np.median(fractions)), 3),
        "fraction_of_gemm_iqr": [round(float(q), 3) for q in np.percentile(fractions, [25, 75])],
        "matmul_bound": round(float(np.median(bounds)), 3),
        "matmul_share": round(float(np.median(shares)), 3),
        "planned_bytes": planned,
        # The allocator's high-water mark so far in this process, where the device
        # keeps one (GPUs, TPUs; not the CPU).
        "device_peak_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
    }


def epoch_seconds(step: str, batch: int = 128, rows: int = 60_000) -> float:
    """Wall seconds of one full epoch through :func:`kdvae.train.fit`, compile included."""
    trainer, data, context = build(step, batch, rows)
    t = time.perf_counter()
    train.fit(
        trainer,
        data,
        train.Loop(epochs=1, batch_size=batch, seed=0),
        evaluate=lambda m, e: {},
        context=lambda e: context,
        stage=train.Stage(progress=False),
    )
    return round(time.perf_counter() - t, 2)


#: The optional timings, each a flag: what it also times.
EXTRAS = {
    "ablations": "the teacher and VAE steps without each of their parts (batch 512)",
    "overhead": "a hand-written JAX step of each workload against kdvae's",
    "methods": "every distillation method's cached step against KD's",
    "estimators": "the VAE's STL and DReG steps against the plain ones",
    "bfloat16": "each step computing in bfloat16 against float32",
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch-sizes", default="128,512")
    p.add_argument("--steps", default=",".join(STEPS))
    p.add_argument("--rounds", type=int, default=20, help="timed rounds of 5 steps each")
    p.add_argument("--epoch", action="store_true", help="also time a 60,000-example epoch")
    for name, help in EXTRAS.items():
        p.add_argument(f"--{name}", action="store_true", help=f"also time {help}")
    p.add_argument("--default-malloc", action="store_true", help=MALLOC_HELP)
    args = p.parse_args(argv)
    # No persistent compilation cache here: compile_s is a cold compile.
    out: dict = {"kept_freed_host_memory": keep_freed_host_memory(args.default_malloc)}

    gemm = Gemm()
    out |= {
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "gemm_gflops": round(float(np.median([gemm.rate() for _ in range(10)])) / 1e9, 2),
    }
    if not args.json:
        print(f"kept freed host memory (kdvae.train.keep_freed_host_memory): "
              f"{out['kept_freed_host_memory']}")  # fmt: skip
    for step in args.steps.split(","):
        out[step] = {}
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            r = measure(step, batch, gemm, args.rounds)
            out[step][str(batch)] = r
            if not args.json:
                print(f"{step:>15} b={batch:<4} {r['ms_per_step']:8.2f} ms "
                      f"{r['samples_per_s']:10.0f} samples/s  compile {r['compile_s']:.2f} s  "
                      f"{r['achieved_gflops']:7.1f} GFLOP/s = {r['fraction_of_gemm']:.2f} of GEMM "
                      f"(matmuls alone {r['matmul_bound']:.2f}; "
                      f"{r['matmul_share']:.0%} of the step)",
                      flush=True)  # fmt: skip
    if "student" in out and "distill_cached" in out:
        out["distill_cached_over_student"] = {
            b: round(out["distill_cached"][b]["ms_per_step"] / out["student"][b]["ms_per_step"], 3)
            for b in out["student"]
        }
    if args.epoch:
        out["epoch_seconds"] = {s: epoch_seconds(s) for s in args.steps.split(",")}
    if args.overhead:
        out["overhead"] = {
            b: overhead(args.steps.split(","), int(b), args.rounds)
            for b in args.batch_sizes.split(",")
        }
    if args.bfloat16:
        out["bfloat16"] = {
            b: mixed_precision(args.steps.split(","), int(b), args.rounds)
            for b in args.batch_sizes.split(",")
        }
    if args.estimators:
        out["estimators_over_plain"] = {
            b: estimators_over_plain(int(b), args.rounds) for b in args.batch_sizes.split(",")
        }
    if args.methods:
        out["methods_over_kd"] = {
            b: methods_over_kd(int(b), args.rounds) for b in args.batch_sizes.split(",")
        }
    if args.ablations:
        out["ablations_ms"] = {s: ablate(s, 512, args.rounds) for s in ABLATIONS}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"GEMM: {out['gemm_gflops']} GFLOP/s on {out['device']}")
        for b, steps in out.get("overhead", {}).items():
            for step, r in steps.items():
                ms = f"kdvae {r['kdvae_ms']:.2f} ms, hand-written {r['hand_written_ms']:.2f} ms"
                print(f"overhead {step:>15} b={b:<4} {ms}: {r['ratio']:.3f}x")
        for b, steps in out.get("bfloat16", {}).items():
            for step, r in steps.items():
                ms = f"float32 {r['float32_ms']:.2f} ms, bfloat16 {r['bfloat16_ms']:.2f} ms"
                print(f"bfloat16 {step:>15} b={b:<4} {ms}: {r['ratio']:.3f}x")
        for k in (
            "distill_cached_over_student",
            "methods_over_kd",
            "estimators_over_plain",
            "epoch_seconds",
            "ablations_ms",
        ):
            if k in out:
                print(f"{k}: {out[k]}")
    return out


if __name__ == "__main__":
    main()
