"""Data parallelism: training on a 4-device mesh equals training on one device.

A subprocess gets 4 virtual CPU devices (``--xla_force_host_platform_device_count=4``;
the device count is fixed when JAX starts) and trains the same tiny models for 2 epochs
on ``data_mesh(jax.devices()[:1])`` and on the 4-device ``data_mesh()``: a plain
classifier, a student distilled from a live teacher, and a VAE. It reports the largest
differences; the tests here hold them to a float tolerance.

Why not bit for bit: on 4 devices each computes the gradient of its quarter of the batch
and XLA all-reduces the four partial sums; on one device the batch is reduced in one
go. Float addition is not associative, so the two differ by rounding (~1e-7 relative per
step), and Adam's normalisation by sqrt(v) can magnify a rounding difference in a
near-zero gradient coordinate. Measured over the 16 steps: parameter differences of at
most ~2e-7 (float32 resolution at these magnitudes is ~3e-8), history metrics equal to
~1e-7 relative; the tolerance, 1e-5, leaves a margin of 50. A real bug (a batch seen
twice, another data order or dropout key per device, a gradient summed rather than
averaged over the devices: the classifier uses plain SGD, which, unlike Adam, does not
hide a gradient scale) moves parameters by ~1e-3 or more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ATOL = RTOL = 1e-5  # parameters and history metrics; see the module docstring
KINDS = ("classifier", "distill", "vae")

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from kdvae import models, objectives, train

sys.path.insert(0, sys.argv[1])
from conftest import class_patterns

train.enable_compilation_cache(sys.argv[3])  # the resumed runs recompile the same step

assert jax.device_count() == 4, jax.devices()
images, labels = class_patterns(256, seed=0)
data = {"images": images, "labels": labels}
shardings = []  # (kind, devices in the mesh, the batch's sharding inside the step)


def recorded(kind, loss_fn, mesh_size):
    def wrapped(model, batch, key, context):
        jax.debug.inspect_array_sharding(
            batch["images"], callback=lambda s: shardings.append((kind, mesh_size, repr(s),
            len(s.device_set), s.is_fully_replicated)))
        return loss_fn(model, batch, key, context)
    return wrapped


def setup(kind, mesh):
    rngs = nnx.Rngs(0)
    context = None
    if kind == "classifier":
        model = models.MLPClassifier((32,), hidden_dropout=0.2, rngs=rngs)
        loss_fn = objectives.classification_loss(jitter_pixels=1)
    elif kind == "distill":
        teacher = models.MLPClassifier((16,), rngs=nnx.Rngs(1))
        graphdef, state = nnx.split(teacher)
        teacher_state = train.replicate(state, mesh)
        context = lambda epoch: {"teacher": teacher_state}
        model = models.MLPClassifier((32,), rngs=rngs)
        loss_fn = objectives.distillation_objective(
            temperature=2.0, alpha=0.5, teacher_graphdef=graphdef)
    else:
        model = models.VAE(encoder_widths=(32,), decoder_widths=(32,), latents=4, rngs=rngs)
        loss_fn = objectives.vae_objective(kl_warmup_epochs=2)
        context = lambda epoch: {"epoch": jnp.int32(epoch)}
    loss_fn = recorded(kind, loss_fn, mesh.devices.size)
    tx = optax.sgd(0.1) if kind == "classifier" else optax.adam(1e-3)
    return train.Trainer(model, tx, loss_fn, mesh=mesh), context


def run(kind, mesh, epochs=2, **kwargs):
    trainer, context = setup(kind, mesh)
    result = train.fit(trainer, data, epochs=epochs, batch_size=32, seed=0,
                       evaluate=lambda model, epoch: {}, context=context, progress=False,
                       **kwargs)
    params = [np.asarray(x) for x in jax.tree.leaves(trainer.model_state())]
    history = [{k: v for k, v in row.items() if k.startswith("train_")}
               for row in result.history]
    return trainer, params, history


report = {}
one_device = train.data_mesh(jax.devices()[:1])
four = train.data_mesh()
for kind in ("classifier", "distill", "vae"):
    _, p1, h1 = run(kind, one_device)
    trainer, p4, h4 = run(kind, four)
    leaf = trainer.model_state()
    leaf = jax.tree.leaves(leaf)[0]
    report[kind] = {
        "max_abs": max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p4)),
        "max_rel": max(float(np.max(np.abs(a - b) / (np.abs(a) + 1e-6))) for a, b in zip(p1, p4)),
        "scale": max(float(np.max(np.abs(a))) for a in p1),
        "bitwise": all(np.array_equal(a, b) for a, b in zip(p1, p4)),
        "history_1": h1, "history_4": h4,
        "param_devices": len(leaf.sharding.device_set),
        "param_replicated": bool(leaf.sharding.is_fully_replicated),
    }

# Resume on 4 devices: 1 epoch + a resumed 2nd equals 2 epochs, bit for bit.
ckpt = train.Checkpointer(sys.argv[2])
run("classifier", four, epochs=1, checkpointer=ckpt)
_, resumed, _ = run("classifier", four, checkpointer=ckpt, resume=True)
_, straight, _ = run("classifier", four)
report["resume_bitwise"] = all(np.array_equal(a, b) for a, b in zip(resumed, straight))

try:
    train.fit(setup("classifier", four)[0], data, epochs=1, batch_size=30, seed=0,
              evaluate=lambda m, e: {}, progress=False)
    report["batch_30"] = "no error"
except train.ConfigError as err:
    report["batch_30"] = str(err)
report["shardings"] = sorted(set(shardings))
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    folder = tmp_path_factory.mktemp("sharding")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(REPO / "tests"), str(folder / "ckpt"),
         str(folder / "jax_cache")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][len("REPORT") :])


@pytest.mark.parametrize("kind", KINDS)
def test_four_devices_train_like_one(report, kind):
    r = report[kind]
    assert r["max_abs"] <= ATOL + RTOL * r["scale"], r
    assert len(r["history_1"]) == len(r["history_4"]) == 2
    for row_1, row_4 in zip(r["history_1"], r["history_4"], strict=True):
        assert row_1.keys() == row_4.keys() and "train_loss" in row_1
        for key in row_1:
            assert row_4[key] == pytest.approx(row_1[key], rel=RTOL, abs=ATOL), key
    # The parameters live, replicated, on all 4 devices.
    assert r["param_devices"] == 4 and r["param_replicated"]


def test_the_batch_is_split_over_the_devices(report):
    seen = {(kind, size): (devices, replicated) for kind, size, _, devices, replicated
            in report["shardings"]}  # fmt: skip
    for kind in KINDS:
        assert seen[(kind, 1)] == (1, True)
        assert seen[(kind, 4)] == (4, False), report["shardings"]
    # The 4-device batch sharding is over the "data" axis.
    assert any("data" in text for _, size, text, _, _ in report["shardings"] if size == 4)


def test_resume_on_four_devices_is_exact(report):
    assert report["resume_bitwise"]


def test_batch_size_must_split_over_the_devices(report):
    message = report["batch_30"]
    assert "multiple of the device count (4)" in message
