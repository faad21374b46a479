"""The benchmark scripts run, report what they promise, and count FLOPs right.

No speed is asserted here (timings live in the scripts' output, not in tests).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import load_script

from kdvae import distill, kernels


@pytest.fixture(scope="module")
def steps():
    return load_script("benchmarks/steps.py")


def test_matmuls_alone_finds_every_matmul_of_a_step_and_counts_its_flops(steps):
    batch = 16
    trainer, data, context = steps.build("student", batch, 4 * batch)
    sums = trainer.metric_sums(dict.fromkeys(trainer.metric_names(data, context), 0.0))
    order = jnp.arange(4 * batch).reshape(4, batch)
    lowered = trainer.step.lower(
        trainer.leaves, sums, data, order, jnp.int32(0), jax.random.key(0), context
    )
    dots, operands, flops = steps.matmuls_alone(lowered)
    # 784-800-800-10: three forward products, three weight gradients, and the input
    # gradients of the two upper layers (none for the images).
    sizes = [(784, 800), (800, 800), (800, 10)]
    forward = sum(2 * batch * a * b for a, b in sizes)
    assert flops == 3 * forward - 2 * batch * 784 * 800
    outputs = dots(operands)
    assert len(outputs) == 8 and all(o.dtype == jnp.float32 for o in outputs)


def test_steps_json_reports_every_field(steps):
    out = io.StringIO()
    jnp.ones(1).block_until_ready()  # JAX has started: the malloc settings stay as they are
    with contextlib.redirect_stdout(out):
        result = steps.main(["--json", "--steps", "student,distill_cached,vae",
                             "--batch-sizes", "16", "--rounds", "2", "--methods",
                             "--overhead", "--bfloat16"])  # fmt: skip
    assert json.loads(out.getvalue()) == result
    assert result["device"] and result["devices"] >= 1 and result["gemm_gflops"] > 0
    assert result["kept_freed_host_memory"] is False
    for step in ("student", "distill_cached", "vae"):
        r = result[step]["16"]
        assert r["ms_per_step"] > 0 and r["samples_per_s"] > 0 and r["compile_s"] > 0
        assert 0 < r["fraction_of_gemm"] and 0 < r["matmul_bound"] and 0 < r["matmul_share"]
        assert r["planned_bytes"] > 0
    ratios = result["methods_over_kd"]["16"]
    assert ratios.keys() == set(distill.METHODS) and ratios["kd"] == 1.0
    assert all(r > 0 for r in ratios.values())
    for step, r in result["overhead"]["16"].items():
        assert r["ratio"] == pytest.approx(r["kdvae_ms"] / r["hand_written_ms"], rel=0.01), step
    for step, r in result["bfloat16"]["16"].items():
        assert r["ratio"] == pytest.approx(r["bfloat16_ms"] / r["float32_ms"], rel=0.01), step
    ratio = result["distill_cached_over_student"]["16"]
    assert ratio == pytest.approx(
        result["distill_cached"]["16"]["ms_per_step"] / result["student"]["16"]["ms_per_step"],
        abs=1e-3,
    )


def test_losses_benchmark_runs(tmp_path):
    losses = load_script("benchmarks/losses.py")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        losses.main(["--repeats", "2", "--calls", "1", "--distillation-batches", "8",
                     "--elbo-batches", "8", "--json", str(tmp_path / "out.json")])  # fmt: skip
    assert (tmp_path / "out.json").exists() and "distillation" in out.getvalue()


def test_ablations_take_the_parts_out(steps, monkeypatch):
    trainer, _, _ = steps.build("teacher", 16, 64, ("dropout", "max_norm", "adam"))
    model = trainer.model
    assert (model.input_dropout, model.hidden_dropout, model.max_norm) == (0.0, 0.0, None)
    whole, _, _ = steps.build("teacher", 16, 64)
    assert whole.model.hidden_dropout == 0.5 and whole.model.max_norm == 3.5
    # SGD keeps no moments; Adam keeps two per parameter.
    assert len(jax.tree.leaves(trainer.state)) < len(jax.tree.leaves(whole.state))
    # The variants' plumbing, without compiling four steps to time them.
    monkeypatch.setattr(steps, "_library_runner", lambda *args: lambda: 1e-3)
    times = steps.ablate("vae", 16, rounds=1)
    assert set(times) == {"whole", "without binarization", "without adam", "without all"}
    assert all(t > 0 for t in times.values())


def test_estimators_are_timed_against_their_plain_steps(steps, monkeypatch):
    for pair in steps.ESTIMATORS.values():
        for step in pair:
            trainer, data, _ = steps.build(step, 8, 16)
            assert set(data) == {"images"} and trainer.model.latents == 20
    # The plumbing, without compiling six steps: each step's "time" is its name's length.
    monkeypatch.setattr(steps, "_library_runner", lambda step, *args: lambda: len(step))
    ratios = steps.estimators_over_plain(16, rounds=1)
    assert ratios == {
        "stl": round(len("vae:stl") / len("vae"), 3),
        "dreg k=5": round(len("vae_iwae5:dreg") / len("vae_iwae5"), 3),
        "dreg k=50": round(len("vae_iwae50:dreg") / len("vae_iwae50"), 3),
    }


def test_sampling_benchmark_checks_equal_results_and_reports_speedups():
    sampling = load_script("benchmarks/sampling.py")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = sampling.main(["--rounds", "1", "--batches", "4", "--json"])
    assert json.loads(out.getvalue()) == result
    rows = [v for k, v in result.items() if k != "device"]
    assert all(r["speedup"] > 0 for r in rows)
    assert sum(r.get("draws", 0) > 0 for r in rows) == 6  # 3 samplers x 2 sizes
    layers = [k for k, r in result.items() if k != "device" and r.get("batch") == 4]
    assert len(layers) == 4 and {k.split()[0] for k in layers} == {"conv", "pool"}
    # Each path is compiled from a fresh trace (jax.jit caches traces by function).
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    hlo = [sampling._compiled(p, kernels.conv2d_same, (x, w)).as_text() for p in ("cpu", "gpu")]
    assert "convolution" not in hlo[0] and "convolution" in hlo[1]


def test_matmuls_alone_refuses_products_it_would_count_wrong(steps):
    a = jnp.ones((4, 4))
    in_loop = jax.jit(lambda a: jax.lax.fori_loop(0, 3, lambda i, x: x @ a, a)).lower(a)
    with pytest.raises(NotImplementedError, match="outside @main|loop"):
        steps.matmuls_alone(in_loop)
    inner = jax.jit(lambda a: a @ a)
    called_twice = jax.jit(lambda a: inner(a) + inner(2 * a)).lower(a)
    with pytest.raises(NotImplementedError, match="outside @main"):
        steps.matmuls_alone(called_twice)
    with pytest.raises(ValueError, match="no fp32 matrix multiply"):
        steps.matmuls_alone(jax.jit(lambda a: a + 1).lower(a))


@pytest.mark.parametrize("step", ["student", "distill_cached", "distill_live"])
def test_the_hand_written_step_computes_kdvaes_loss(steps, step):
    """The overhead's reference does the same work: with kdvae's parameters (and
    teacher) it gives kdvae's loss on the same batch."""
    import optax

    reference = steps.reference
    batch = 16
    trainer, data, context = steps.build(step, batch, 4 * batch)
    sums = trainer.metric_sums(dict.fromkeys(trainer.metric_names(data, context), 0.0))
    order, key = jnp.arange(4 * batch).reshape(4, batch), jax.random.key(0)

    def pairs(model):
        return [(layer.kernel[...], layer.bias[...]) for layer in model.layers]

    params = jax.tree.map(jnp.copy, pairs(trainer.model))  # both steps donate their state
    run, _ = reference.make(step)
    if step == "distill_live":  # kdvae's teacher, as steps.build makes it
        teacher = pairs(steps._classifier("hinton_teacher", 1))
        run, _ = reference.make(step, teacher=teacher)
    _, _, expected = trainer.step(trainer.leaves, sums, data, order, 1, key, context)
    _, loss = run((params, optax.adam(1e-3).init(params)), data, order, 1, key)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_gpu_check_runs_everything_and_prints_one_table(tiny_idx_dir, tmp_path):
    """On the CPU, with short runs: the table has every step and both targets."""
    gpu_check = load_script("benchmarks/gpu_check.py")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = gpu_check.main([
            "--data-dir", str(tiny_idx_dir), "--workdir", str(tmp_path),
            "--steps-args", "--steps student --batch-sizes 16 --rounds 1",
            "--distill-args", "--val-size 200 --batch-size 32 --teacher hinton_student "
                              "--teacher-epochs 1 --student-epochs 1 --methods kd "
                              "--no-figures",
            "--vae-args", "--val-size 200 --batch-size 32 --epochs 2 --eval-k 2 "
                          "--eval-examples 20 --no-figures",
        ])  # fmt: skip
    text = out.getvalue()
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == result
    assert "student" in text and "16" in text
    assert "quick_preset_s" in text and "(target < 60.0" in text
    assert "vae_epoch_s" in text and "(target < 0.5" in text
    assert result["quick_preset_s"] > 0 and result["vae_epoch_s"] > 0
    assert set(result["quick_preset_test_errors"]) == {"teacher", "student", "kd"}


def test_torch_benchmark_says_what_it_needs_without_torch(monkeypatch, capsys):
    torch_cnn = load_script("benchmarks/torch_cnn.py")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(SystemExit, match=r"needs torch: pip install -e '\.\[bench-torch\]'"):
        torch_cnn.main(["--batch-sizes", "8", "--rounds", "1"])


def test_torch_benchmark_times_both_steps():
    pytest.importorskip("torch")  # an optional extra: CI does not install it
    torch_cnn = load_script("benchmarks/torch_cnn.py")
    jnp.ones(1).block_until_ready()  # JAX has started: the malloc settings stay as they are
    result = torch_cnn.main(["--batch-sizes", "8", "--rounds", "1", "--json"])
    assert result["kept_freed_host_memory"] is False
    r = result["8"]
    assert r["kdvae_ms"] > 0 and r["pytorch_ms"] > 0
    assert r["kdvae_over_pytorch"] == pytest.approx(r["kdvae_ms"] / r["pytorch_ms"], rel=0.02)
