"""Tests for kdvae.plots: each figure writes a readable PNG; the helpers compute the right thing.

The probabilities a figure draws come from the library, as the examples compute them
(``kdvae.losses.tempered_softmax``); its own tests are in test_losses.py.
"""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

mpl_image = pytest.importorskip("matplotlib.image")

from kdvae import losses, plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(returned, expected_path):
    assert returned == expected_path
    data = expected_path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    pixels = mpl_image.imread(expected_path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels.shape[2] in (3, 4)
    assert len(data) < 400_000  # Small files.
    return pixels


def _digits(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, 28, 28)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Helpers.


def test_as_images_accepts_the_usual_shapes():
    x = _digits(3)
    for variant in (x, x.reshape(3, 784), x[..., None]):
        np.testing.assert_array_equal(plots._as_images(variant), x)
    u8 = np.full((2, 28, 28, 1), 255, dtype=np.uint8)
    np.testing.assert_allclose(plots._as_images(u8), 1.0)
    with pytest.raises(ValueError, match="square"):
        plots._as_images(np.zeros((2, 783)))


def test_normal_quantile_grid_is_symmetric_and_right():
    q = plots._normal_quantile_grid(20)
    np.testing.assert_array_equal(q, -q[::-1])
    assert np.all(np.diff(q) > 0)
    np.testing.assert_allclose(q[[0, -1]], [-1.6448536, 1.6448536], atol=1e-6)
    assert plots._normal_quantile_grid(5)[2] == 0.0


# --------------------------------------------------------------------------------------------
# Figures.


def _softened(logits, temperatures):
    """``{T: softmax(logits / T)}`` from the library, as the examples compute it."""
    return {t: np.asarray(losses.tempered_softmax(logits, temperature=t)) for t in temperatures}


def test_temperature_figure(tmp_path):
    out = tmp_path / "temperature.png"
    logits = np.arange(1.0, 6.0)
    _check_png(plots.temperature_figure(out, logits, _softened(logits, (1, 2, 5, 10, 20))), out)
    out2 = tmp_path / "nested" / "t.png"
    logits = np.array([0.0, 5.0])
    _check_png(plots.temperature_figure(str(out2), logits, _softened(logits, [0.5])), out2)
    with pytest.raises(ValueError, match="one probability per logit"):
        plots.temperature_figure(tmp_path / "x.png", [1.0, 2.0, 3.0], _softened(logits, [1.0]))
    with pytest.raises(ValueError, match="empty"):
        plots.temperature_figure(tmp_path / "x.png", logits, {})


def test_dark_knowledge_figure_with_and_without_image(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=10) * 4
    probs = _softened(logits, (10, 1, 5))
    out = tmp_path / "dark.png"
    image = (rng.uniform(size=(28, 28, 1)) * 255).astype(np.uint8)
    wide = _check_png(plots.dark_knowledge_figure(out, probs, image, true_label=3), out)
    out2 = tmp_path / "dark_no_image.png"
    narrow = _check_png(
        plots.dark_knowledge_figure(out2, {1.0: probs[1][None]}, class_names=list("abcdefghij")),
        out2,
    )
    assert wide.shape[1] > narrow.shape[1]
    with pytest.raises(ValueError, match="true_label"):
        plots.dark_knowledge_figure(tmp_path / "x.png", probs, true_label=10)
    with pytest.raises(ValueError, match="differ"):
        plots.dark_knowledge_figure(tmp_path / "x.png", {1: np.ones(3) / 3, 5: np.ones(4) / 4})


def test_unseen_classes_figure(tmp_path):
    out = tmp_path / "unseen.png"
    accuracy = {
        "student, before": [0.0, 0.1, 0.0],
        "student, after": [0.3, 0.5, 0.2],
        "distilled, before": [0.4, 0.6, 0.5],
        "distilled, after": [0.8, 0.9, 0.7],
    }
    _check_png(plots.unseen_classes_figure(out, ["omit 0", "omit 3", "keep 7,8"], accuracy), out)
    with pytest.raises(ValueError, match="needs 2 values per series"):
        plots.unseen_classes_figure(tmp_path / "x.png", ["a", "b"], accuracy)


def test_intervals_figure(tmp_path):
    out = tmp_path / "intervals.png"
    intervals = {
        "student": {"mean": 1605.0, "ci95": [1584.4, 1625.6], "values": [1592, 1629, 1603]},
        "kd": {"mean": 1451.6, "ci95": None, "values": [1451.6]},  # one seed: no interval
    }
    _check_png(plots.intervals_figure(out, intervals), out)
    with pytest.raises(ValueError, match="at least one model"):
        plots.intervals_figure(tmp_path / "x.png", {})


def test_kl_per_dimension_figure(tmp_path):
    out = tmp_path / "kl.png"
    _check_png(plots.kl_per_dimension_figure(out, [3.2, 0.0, 1e-4, 0.8]), out)
    with pytest.raises(ValueError, match="kl_per_dimension"):
        plots.kl_per_dimension_figure(tmp_path / "x.png", [])


def test_training_curves_two_stages_and_missing_keys(tmp_path):
    history = [
        {"stage": "teacher", "epoch": e, "train_loss": 1.0 / e, "val_accuracy": 0.9 + e / 100}
        for e in (1, 2, 3)
    ] + [
        {"stage": "student", "epoch": 1, "train_loss": 2.0},  # No val_accuracy in this row.
        {"stage": "student", "epoch": 2, "train_loss": 1.5, "val_accuracy": 0.8},
        {"stage": "student", "epoch": 3, "train_loss": float("nan"), "val_accuracy": None},
    ]
    out = tmp_path / "curves.png"
    two = _check_png(
        plots.training_curves(out, history, keys=("train_loss", "val_accuracy", "absent")), out
    )
    # "absent" is skipped: the figure has the same size as with two keys.
    out2 = tmp_path / "curves2.png"
    _check_png(plots.training_curves(out2, history, keys=("train_loss", "val_accuracy")), out2)
    assert mpl_image.imread(out2).shape == two.shape
    # Selecting one stage, rows without stage or epoch, and nothing to plot at all.
    out3 = tmp_path / "curves3.png"
    _check_png(plots.training_curves(out3, history, stages=["student"]), out3)
    out4 = tmp_path / "curves4.png"
    vae = [{"train_loss": 150.0 - i, "test_neg_elbo": 140.0 - i} for i in range(5)]
    _check_png(plots.training_curves(out4, vae, keys=("train_loss", "test_neg_elbo")), out4)
    out5 = tmp_path / "curves5.png"
    _check_png(plots.training_curves(out5, history, keys=("nothing",)), out5)
    out6 = tmp_path / "curves6.png"
    _check_png(plots.training_curves(out6, []), out6)


@pytest.mark.parametrize("shape", [(20, 28, 28), (20, 784), (20, 28, 28, 1)])
def test_image_grid(tmp_path, shape):
    images = _digits(20).reshape(shape)
    out = tmp_path / "grid.png"
    _check_png(plots.image_grid(out, images, nrow=8, title="samples"), out)


def test_image_grid_single_image_and_bad_nrow(tmp_path):
    out = tmp_path / "one.png"
    _check_png(plots.image_grid(out, _digits(1)), out)
    with pytest.raises(ValueError, match="nrow"):
        plots.image_grid(out, _digits(2), nrow=0)


def test_tile_layout():
    images = np.stack([np.full((2, 2), v, dtype=np.float32) for v in (0.0, 1.0, 0.25)])
    mosaic = plots._tile(images, 2)
    assert mosaic.shape == (2 * 3 + 1, 2 * 3 + 1)
    assert mosaic[1, 1] == 0.0 and mosaic[1, 4] == 1.0 and mosaic[4, 1] == 0.25
    assert mosaic[0, 0] == mosaic[3, 1] == mosaic[4, 3] == mosaic[6, 1] == plots._PAD_VALUE
    # The unused cell is NaN (drawn white), its outer border too.
    assert np.isnan(mosaic[4:, 4:]).all() and not np.isnan(mosaic[:4]).any()


@pytest.mark.parametrize("n", [8, 20])
def test_reconstructions_figure(tmp_path, n):
    originals = (_digits(30, seed=1) * 255).astype(np.uint8)[..., None]
    recon = _digits(30, seed=2).reshape(30, 784)
    out = tmp_path / "recon.png"
    _check_png(plots.reconstructions_figure(out, originals, recon, n=n), out)


def test_reconstructions_figure_checks_sizes(tmp_path):
    with pytest.raises(ValueError, match="sizes differ"):
        plots.reconstructions_figure(tmp_path / "r.png", _digits(4), np.zeros((4, 14, 14)))


@pytest.mark.parametrize("latent_dim", [1, 2, 5])
@pytest.mark.parametrize("label_kind", ["classes", "none", "unlabeled", "some_unlabeled", "many"])
def test_latent_scatter(tmp_path, latent_dim, label_kind):
    rng = np.random.default_rng(0)
    num = 300
    means = rng.normal(size=(num, latent_dim))
    labels = {
        "classes": rng.integers(0, 10, num),
        "none": None,
        "unlabeled": np.full(num, -1),
        "some_unlabeled": np.where(rng.uniform(size=num) < 0.5, -1, rng.integers(0, 3, num)),
        "many": rng.integers(0, 40, num),
    }[label_kind]
    out = tmp_path / "latent.png"
    _check_png(plots.latent_scatter(out, means, labels, class_names=None), out)


def test_latent_scatter_class_names_and_degenerate_pca(tmp_path):
    means = np.zeros((4, 3))  # No variance at all.
    out = tmp_path / "latent.png"
    names = ["zero", "one"]
    _check_png(plots.latent_scatter(out, means, np.array([0, 1, 0, 1]), class_names=names), out)
    with pytest.raises(ValueError, match="labels"):
        plots.latent_scatter(out, np.zeros((4, 2)), np.zeros(3, dtype=int))


@pytest.mark.parametrize("n", [1, 4, 5])
def test_manifold_figure_calls_decode_with_symmetric_grid(tmp_path, n):
    seen = []

    def decode_fn(z):
        seen.append(z)
        # Brightness follows z_1 so the tiles differ.
        p = 1.0 / (1.0 + np.exp(-z[:, :1]))
        return np.broadcast_to(p, (z.shape[0], 784)).astype(np.float32)

    out = tmp_path / "manifold.png"
    _check_png(plots.manifold_figure(out, decode_fn, n=n), out)
    (z,) = seen
    assert z.shape == (n * n, 2) and z.dtype == np.float32
    np.testing.assert_allclose(np.sort(z[:, 0]), -np.sort(z[:, 0])[::-1])
    np.testing.assert_allclose(np.sort(z[:, 1]), -np.sort(z[:, 1])[::-1])
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-7)
    values = np.unique(z[:, 0])
    assert values.size == n
    if n > 1:
        np.testing.assert_allclose(values[[0, -1]], [-1.6448536, 1.6448536], atol=1e-6)
        # Row-major: columns vary in z_1 (ascending), rows in z_2 (descending from the top).
        grid = z.reshape(n, n, 2)
        assert np.all(np.diff(grid[0, :, 0]) > 0) and np.all(np.diff(grid[:, 0, 1]) < 0)


def test_manifold_figure_linear_span_and_bad_output(tmp_path):
    seen = []

    def decode_fn(z):
        seen.append(z)
        return np.zeros((z.shape[0], 28, 28, 1), dtype=np.float32)

    out = tmp_path / "manifold.png"
    _check_png(plots.manifold_figure(out, decode_fn, n=3, span=2.0), out)
    np.testing.assert_allclose(np.unique(seen[0][:, 0]), [-2.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="returned"):
        plots.manifold_figure(out, lambda z: np.zeros((1, 784)), n=3)


def test_figures_can_be_drawn_from_several_threads(tmp_path):
    paths = [tmp_path / f"grid{i}.png" for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        written = list(pool.map(lambda p: plots.image_grid(p, _digits(16), nrow=4), paths))
    assert written == paths
    first = paths[0].read_bytes()
    assert all(p.read_bytes() == first for p in paths)  # Same input, same picture.


def test_plots_imports_neither_jax_nor_flax_nor_pyplot():
    # Load the file on its own, so that what kdvae/__init__.py imports does not count.
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('kdvae_plots', {plots.__file__!r}); "
        "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
        "bad = [m for m in ('jax', 'flax', 'matplotlib.pyplot') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
