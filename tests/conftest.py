"""Shared test fixtures: small, learnable MNIST-shaped data, in memory and as IDX files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache
from test_data import write_idx  # pytest puts tests/ on sys.path (rootdir conftest)

from kdvae import train

REPO = Path(__file__).resolve().parent.parent


def load_script(relative_path: str):
    """A script of the repository (``examples/...``, ``benchmarks/...``) as a module."""
    path = REPO / relative_path
    name = f"script_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # as `import` does
    spec.loader.exec_module(module)
    return module


# Each class k lights a 7x7 block at its own place on a 3x4 grid of a 28x28 image.
_BLOCK = 7


def class_patterns(n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images uint8 ``[n, 28, 28, 1]`` and labels int32 ``[n]``, learnable in a few steps.

    Class ``k`` is a bright 7x7 block at grid cell ``k`` (3 rows x 4 columns) over dim
    uniform noise; every class appears ``n // 10`` or ``n // 10 + 1`` times, in random order.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.int32)
    images = rng.integers(0, 64, size=(n, 28, 28), dtype=np.uint8)
    for k in range(10):
        r, c = 9 * (k // 4), _BLOCK * (k % 4)
        rows = labels == k
        images[rows, r : r + _BLOCK, c : c + _BLOCK] = rng.integers(
            192, 256, size=(int(rows.sum()), _BLOCK, _BLOCK), dtype=np.uint8
        )
    return images[..., None], labels


def noisy_labels(images, labels, *, seed: int, rate: float = 0.1):
    """``labels`` with a fraction ``rate`` redrawn uniformly (some land on the same class)."""
    rng = np.random.default_rng(seed + 100)
    redraw = rng.random(len(labels)) < rate
    return images, np.where(redraw, rng.integers(0, 10, len(labels)), labels).astype(np.int32)


# How many of tiny_idx_dir's 200 test labels the redraw changed (seed 2): the fewest
# errors a model can make there.
NOISY_TEST_LABELS = int(np.sum(noisy_labels(*class_patterns(200, seed=2), seed=2)[1]
                               != class_patterns(200, seed=2)[1]))  # fmt: skip


@pytest.fixture(scope="session")
def tiny_idx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of the four MNIST IDX files: 800 training and 200 test images.

    With ``val_size=200`` that is 600 train, 200 validation and 200 test examples. One
    label in ten is redrawn at random (:data:`NOISY_TEST_LABELS` of the test labels are
    wrong), so no model scores 0 errors and an example that always reported 0 would fail.
    Treat it as read-only: it is shared by the whole session.
    """
    folder = tmp_path_factory.mktemp("tiny_idx")
    for prefix, n, seed in (("train", 800, 1), ("t10k", 200, 2)):
        images, labels = noisy_labels(*class_patterns(n, seed=seed), seed=seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images[..., 0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


_CACHE_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


def session_folder(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder of this test session's, shared by its pytest-xdist workers (each of
    which has its own ``popen-gw<N>`` base temporary folder under the session's)."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if base.name.startswith("popen-gw") else base) / name
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory: pytest.TempPathFactory):
    """JAX's persistent compilation cache, shared by the test modules that use it (and
    both workers) for the whole session.

    Every ``Trainer`` jits a new closure, so the modules that build many of them (the
    examples' tiny runs in several modules) compile the same steps again and again;
    with the cache the repeats are disk reads. The settings (and ``KDVAE_CACHE_DIR``)
    are restored after each module. Use it through
    ``pytestmark = pytest.mark.usefixtures("compilation_cache")``.
    """
    before = {name: getattr(jax.config, name) for name in _CACHE_SETTINGS}
    with pytest.MonkeyPatch.context() as patch:
        # Also where cli.setup() (the examples' main) and subprocesses look.
        patch.setenv("KDVAE_CACHE_DIR", str(session_folder(tmp_path_factory, "jax_cache")))
        train.enable_compilation_cache()
        yield
    for name, value in before.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()
