"""Tests of kdvae.data: IDX files, dataset loading (folder and TFDS), and model inputs."""

from __future__ import annotations

import contextlib
import errno
import gzip
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdvae import data as data_module
from kdvae.data import (
    KNOWN_DATASETS,
    DataError,
    Dataset,
    Split,
    binarize,
    filter_classes,
    load_dataset,
    load_idx_folder,
    read_idx,
    to_float,
)

REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
N_TRAIN, N_TEST = 12, 4

# --------------------------------------------------------------------------- helpers


def write_idx(
    path: Path,
    array: np.ndarray,
    *,
    gz: bool | None = None,
    magic: int | None = None,
    extra: bytes = b"",
    cut: int = 0,
) -> None:
    """Writes `array` in the IDX format (uint8), gzipped if `gz` (default: a .gz name).

    `magic` overrides the magic number; `cut` bytes are dropped from the end and `extra`
    bytes appended, before compression.
    """
    array = np.asarray(array, np.uint8)
    magic = 0x0800 | array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    data = data[: len(data) - cut] + extra
    if path.suffix == ".gz" if gz is None else gz:
        data = gzip.compress(data)
    path.write_bytes(data)


def fake_images(n: int, shape: tuple[int, ...] = (28, 28)) -> np.ndarray:
    return (np.arange(n * math.prod(shape)) % 251).astype(np.uint8).reshape(n, *shape)


def fake_labels(n: int) -> np.ndarray:
    return (np.arange(n) % 10).astype(np.uint8)


def make_idx_folder(folder: Path) -> Path:
    """The four MNIST files: the training ones gzipped, the test ones plain."""
    folder.mkdir(exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", fake_images(N_TRAIN))
    write_idx(folder / "train-labels-idx1-ubyte.gz", fake_labels(N_TRAIN))
    write_idx(folder / "t10k-images-idx3-ubyte", fake_images(N_TEST))
    write_idx(folder / "t10k-labels-idx1-ubyte", fake_labels(N_TEST))
    return folder


@pytest.fixture
def idx_folder(tmp_path: Path) -> Path:
    return make_idx_folder(tmp_path / "mnist")


def error_message(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, "a DataError message must be one line"
    return message


def split_of(labels) -> Split:
    labels = np.asarray(labels, np.int32)
    return Split(fake_images(len(labels))[..., None], labels)


# --------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_round_trips_images(tmp_path, name):
    images = fake_images(5)
    write_idx(tmp_path / name, images)
    got = read_idx(tmp_path / name)
    assert got.dtype == np.uint8 and got.shape == (5, 28, 28)
    np.testing.assert_array_equal(got, images)
    assert got.flags.writeable


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_labels_and_sniffs_gzip(tmp_path, gz):
    # The name has no .gz either way: gzip is recognised by its content.
    write_idx(tmp_path / "labels", fake_labels(7), gz=gz)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "labels")), fake_labels(7))


def test_load_idx_folder(idx_folder):
    train, test = load_idx_folder(idx_folder)
    for split, n in [(train, N_TRAIN), (test, N_TEST)]:
        assert len(split) == n
        assert split.images.shape == (n, 28, 28, 1) and split.images.dtype == np.uint8
        assert split.labels.shape == (n,) and split.labels.dtype == np.int32
        np.testing.assert_array_equal(split.images[..., 0], fake_images(n))
        np.testing.assert_array_equal(split.labels, fake_labels(n))


def test_load_dataset_from_folder_holds_out_the_last_training_rows(idx_folder):
    data = load_dataset("kmnist", data_dir=idx_folder, val_size=5)
    assert isinstance(data, Dataset)
    assert data.name == "kmnist"
    assert (len(data.train), len(data.val), len(data.test)) == (N_TRAIN - 5, 5, N_TEST)
    train, _ = load_idx_folder(idx_folder)
    np.testing.assert_array_equal(data.train.images, train.images[:-5])
    np.testing.assert_array_equal(data.val.images, train.images[-5:])
    np.testing.assert_array_equal(data.val.labels, train.labels[-5:])
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (28, 28, 1)
        assert split.labels.dtype == np.int32
    assert data.num_classes == 10 and len(data.class_names) == 10
    assert data.class_names[0] == "o"  # Kuzushiji-MNIST's names, as in TFDS.


def test_load_dataset_from_folder_with_no_validation(idx_folder):
    data = load_dataset("mnist", data_dir=str(idx_folder), val_size=0)
    assert (len(data.train), len(data.val)) == (N_TRAIN, 0)
    assert data.val.images.shape == (0, 28, 28, 1)
    assert data.class_names == tuple("0123456789")


def test_load_dataset_from_folder_imports_no_tensorflow(idx_folder):
    code = (
        "import sys; from kdvae.data import load_dataset; "
        f"load_dataset('mnist', data_dir={str(idx_folder)!r}, val_size=2); "
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'tensorflow_datasets')); "
        "assert not leaked, leaked"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


# --------------------------------------------------------------------------- errors


def _rewrite(stem: str, array: np.ndarray, **kwargs):
    return lambda folder: write_idx(folder / stem, array, gz=False, **kwargs)


def _replace_gz(stem: str, array: np.ndarray, **kwargs):
    def mutate(folder: Path) -> None:
        (folder / f"{stem}.gz").unlink()
        write_idx(folder / stem, array, gz=False, **kwargs)

    return mutate


def _corrupt_gzip(folder: Path) -> None:
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])  # Cuts off the deflate end and the CRC.


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda folder: (folder / "t10k-labels-idx1-ubyte").unlink(),
            ["lacks t10k-labels-idx1-ubyte[.gz]", "mnist"],
        ),
        (
            _rewrite("t10k-labels-idx1-ubyte", fake_labels(N_TEST), magic=0x00000C01),
            ["t10k-labels-idx1-ubyte", "magic number 0x00000c01", "0x00000801"],
        ),
        (
            _rewrite("t10k-images-idx3-ubyte", fake_images(N_TEST), cut=5),
            ["t10k-images-idx3-ubyte is truncated", f"{N_TEST * 784} bytes", "found 3131"],
        ),
        (
            lambda folder: (folder / "t10k-images-idx3-ubyte").write_bytes(
                bytes.fromhex("00000803 00000004")  # Magic and N; rows and cols missing.
            ),
            ["truncated", "header needs 16 bytes, found 8"],
        ),
        (
            _rewrite("t10k-labels-idx1-ubyte", fake_labels(N_TEST), extra=b"\0\0"),
            ["extra bytes", f"{N_TEST} bytes", f"found {N_TEST + 2}"],
        ),
        (
            lambda folder: (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0"),
            ["not an IDX file: 2 bytes"],
        ),
        (_corrupt_gzip, ["cannot read IDX file", "train-labels-idx1-ubyte.gz"]),
        (
            _replace_gz("train-labels-idx1-ubyte", fake_labels(N_TRAIN - 1)),
            [f"holds {N_TRAIN} images but", f"holds {N_TRAIN - 1} labels"],
        ),
        (
            _rewrite("t10k-images-idx3-ubyte", fake_images(N_TEST, (32, 32))),
            ["t10k-images-idx3-ubyte", "(4, 32, 32)", "28x28"],
        ),
        (
            _rewrite("t10k-labels-idx1-ubyte", fake_images(N_TEST)),
            ["t10k-labels-idx1-ubyte", "expected labels"],
        ),
        (
            _rewrite("t10k-labels-idx1-ubyte", np.full(N_TEST, 25)),
            ["labels up to 25", "10 classes"],
        ),
    ],
    ids=[
        "missing-file",
        "magic",
        "truncated-payload",
        "truncated-header",
        "extra-bytes",
        "too-short",
        "bad-gzip",
        "count-mismatch",
        "not-28x28",
        "images-as-labels",
        "label-out-of-range",
    ],
)
def test_bad_idx_folder_raises_one_clear_line(idx_folder, mutate, expected):
    mutate(idx_folder)
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", data_dir=idx_folder, val_size=2)
    message = error_message(excinfo)
    for part in expected:
        assert part in message


def test_missing_folder_names_the_folder_and_the_files(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_idx_folder(tmp_path / "nowhere")
    message = error_message(excinfo)
    assert str(tmp_path / "nowhere") in message and "does not exist" in message
    assert "train-images-idx3-ubyte[.gz]" in message and "t10k-labels-idx1-ubyte" in message


def test_missing_files_are_all_named(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_idx_folder(tmp_path)
    assert error_message(excinfo).count("-ubyte[.gz]") == 4 + 4  # Missing, then expected.


@pytest.mark.parametrize("val_size", [-1, N_TRAIN, N_TRAIN + 1])
def test_bad_val_size(idx_folder, val_size):
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", data_dir=idx_folder, val_size=val_size)
    assert f"(val_size, --val-size) must be in [0, {N_TRAIN})" in error_message(excinfo)


def test_unknown_dataset_lists_the_known_ones(idx_folder):
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", data_dir=idx_folder)
    message = error_message(excinfo)
    assert "'cifar10'" in message
    assert all(name in message for name in KNOWN_DATASETS)


def test_binarized_mnist_needs_tfds(idx_folder):
    with pytest.raises(DataError, match="only available through TFDS"):
        load_dataset("binarized_mnist", data_dir=idx_folder)


def test_missing_tfds_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # Makes the import fail.
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist")
    message = error_message(excinfo)
    assert "pip install -e '.[examples]'" in message and "--data-dir" in message


def test_split_checks_its_arrays():
    with pytest.raises(ValueError, match="uint8"):
        Split(np.zeros((2, 28, 28, 1), np.float32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="int32"):
        Split(np.zeros((2, 28, 28, 1), np.uint8), np.zeros(3, np.int32))


# --------------------------------------------------------------------------- TFDS


@contextlib.contextmanager
def mock_tfds(data_dir: Path, name: str, splits: tuple[str, ...], num_examples: int):
    """`tfds.testing.mock_data` with the metadata files that `batch_size=-1` needs.

    Without recorded split sizes TFDS batches with `sys.maxsize` and TensorFlow aborts.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = tfds.builder(name, data_dir=data_dir)
    builder.info.set_splits(
        tfds.core.SplitDict(
            [tfds.core.SplitInfo(name=s, shard_lengths=[num_examples], num_bytes=0) for s in splits]
        )
    )
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(
        num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir
    ):
        yield


def test_tfds_mnist(tmp_path):
    with mock_tfds(tmp_path, "mnist", ("train", "test"), num_examples=20):
        data = load_dataset("mnist", val_size=5, tfds_data_dir=str(tmp_path))
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 20)
    for split in (data.train, data.val, data.test):
        assert split.images.shape[1:] == (28, 28, 1) and split.images.dtype == np.uint8
        assert split.labels.dtype == np.int32
        assert split.labels.min() >= 0 and split.labels.max() < 10
    assert data.num_classes == 10 and data.class_names == tuple("0123456789")


def test_tfds_binarized_mnist_is_unlabeled_with_its_own_validation(tmp_path):
    splits = ("train", "validation", "test")
    with mock_tfds(tmp_path, "binarized_mnist", splits, num_examples=6):
        data = load_dataset("binarized_mnist", val_size=5, tfds_data_dir=str(tmp_path))
    assert (len(data.train), len(data.val), len(data.test)) == (6, 6, 6)
    for split in (data.train, data.val, data.test):
        assert split.images.shape == (6, 28, 28, 1) and split.images.dtype == np.uint8
        assert set(np.unique(split.images)) <= {0, 255}
        np.testing.assert_array_equal(split.labels, np.full(6, -1, np.int32))
    assert data.num_classes == 0 and data.class_names == ()


def test_tfds_download_failure_is_one_line_pointing_to_data_dir(monkeypatch, tmp_path):
    """The host answers, but the download fails (a proxy, a full disk)."""
    tfds = pytest.importorskip("tensorflow_datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'storage.googleapis.com'\nretries exhausted")

    monkeypatch.setattr(data_module, "_check_online", lambda name: None)
    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(DataError) as excinfo:
        load_dataset("fashion_mnist")
    message = error_message(excinfo)
    assert "could not download fashion_mnist" in message
    assert "ConnectionError: Failed to resolve" in message
    assert "--data-dir DIR" in message and "/usr/share/datasets/fashion-mnist" in message
    assert isinstance(excinfo.value.__cause__, ConnectionError)


def test_offline_first_run_fails_in_seconds_naming_both_routes(monkeypatch, tmp_path):
    """Found: without a network the first run exited 2 only after 208 s of TFDS's
    download retries. An unprepared dataset and an unreachable host now stop at once."""
    tfds = pytest.importorskip("tensorflow_datasets")

    def unreachable(address, timeout):
        assert address == ("storage.googleapis.com", 443) and timeout <= 5
        raise OSError(errno.EHOSTUNREACH, "No route to host")

    def never(*args, **kwargs):
        raise AssertionError("TFDS was asked to download")

    monkeypatch.setattr(data_module.socket, "create_connection", unreachable)
    monkeypatch.setattr(tfds, "load", never)
    t0 = time.perf_counter()
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", tfds_data_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 10
    message = error_message(excinfo)
    assert message.startswith("mnist is not prepared for TFDS, and storage.googleapis.com ")
    assert "(No route to host)" in message
    assert "--data-dir DIR" in message and "TFDS_DATA_DIR" in message
    # A prepared dataset is read without asking the network.
    monkeypatch.undo()
    monkeypatch.setattr(data_module.socket, "create_connection", unreachable)
    prepared = tmp_path / "prepared"
    with mock_tfds(prepared, "mnist", ("train", "test"), num_examples=20):
        assert len(load_dataset("mnist", val_size=5, tfds_data_dir=str(prepared)).test) == 20


@pytest.mark.parametrize("name", [n for n in KNOWN_DATASETS if n != "binarized_mnist"])
def test_class_names_match_tfds(tmp_path, name):
    tfds = pytest.importorskip("tensorflow_datasets")
    names = tfds.builder(name, data_dir=tmp_path).info.features["label"].names
    if name == "emnist/mnist":  # TFDS leaves these unnamed: "0".."9".
        assert names == [str(i) for i in range(10)]
    with mock_tfds(tmp_path, name, ("train", "test"), num_examples=3):
        data = load_dataset(name, val_size=1, tfds_data_dir=str(tmp_path))
    assert data.class_names == tuple(names)


# --------------------------------------------------------------------------- helpers


def test_filter_classes():
    split = split_of([0, 3, 7, 8, 3, 1, 8])
    np.testing.assert_array_equal(filter_classes(split, omit=[3]).labels, [0, 7, 8, 1, 8])
    np.testing.assert_array_equal(filter_classes(split, keep=(7, 8)).labels, [7, 8, 8])
    np.testing.assert_array_equal(filter_classes(split, omit=[8], keep=[7, 8]).labels, [7])
    assert len(filter_classes(split)) == len(split)
    kept = filter_classes(split, keep=[3])
    np.testing.assert_array_equal(kept.images, split.images[[1, 4]])


def test_select_takes_masks_and_indices():
    split = split_of([5, 6, 7])
    np.testing.assert_array_equal(split.select([True, False, True]).labels, [5, 7])
    np.testing.assert_array_equal(split.select(jnp.array([2, 0])).labels, [7, 5])


def test_to_float_numpy_and_jax():
    images = np.arange(2 * 28 * 28).reshape(2, 28, 28, 1).astype(np.uint8)
    want = images.reshape(2, 784).astype(np.float64) / 255

    got = to_float(images)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (2, 784)
    np.testing.assert_allclose(got, want, rtol=1e-7)

    got = jax.jit(to_float)(jnp.asarray(images))
    assert isinstance(got, jax.Array) and got.dtype == jnp.float32 and got.shape == (2, 784)
    np.testing.assert_allclose(got, want, rtol=1e-7)

    assert to_float(np.zeros((0, 28, 28, 1), np.uint8)).shape == (0, 784)
    with pytest.raises(TypeError, match="uint8"):
        to_float(got)


def test_binarize_dynamic_samples_the_grey_levels():
    grey = jnp.linspace(0.0, 1.0, 11)
    images = jnp.broadcast_to(grey, (20_000, 11))
    key = jax.random.key(0)
    bits = jax.jit(binarize)(key, images)
    assert bits.dtype == jnp.float32 and bits.shape == images.shape
    assert set(np.unique(bits).tolist()) <= {0.0, 1.0}
    # Binomial standard error is at most 0.5 / sqrt(20000) = 0.0035.
    np.testing.assert_allclose(bits.mean(axis=0), grey, atol=0.02)
    np.testing.assert_array_equal(binarize(key, images), bits)
    assert not np.array_equal(binarize(jax.random.key(1), images), bits)


def test_binarize_threshold_is_exact():
    images = np.array([[0.0, 0.3, 0.5, 0.51, 1.0]], np.float32)
    np.testing.assert_array_equal(binarize(None, images, dynamic=False), [[0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(
        binarize(None, images, dynamic=False, threshold=0.2), [[0, 1, 1, 1, 1]]
    )
    with pytest.raises(ValueError, match="key"):
        binarize(None, images)
    with pytest.raises(TypeError, match="float"):
        binarize(jax.random.key(0), np.zeros(3, np.uint8))


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason=f"{FASHION_MNIST_DIR} not installed")
def test_real_fashion_mnist_folder():
    data = load_dataset("fashion_mnist", data_dir=FASHION_MNIST_DIR)
    assert (len(data.train), len(data.val), len(data.test)) == (55_000, 5_000, 10_000)
    for split in (data.train, data.val, data.test):
        assert split.images.shape[1:] == (28, 28, 1) and split.images.dtype == np.uint8
        assert set(np.unique(split.labels).tolist()) == set(range(10))
    assert data.class_names == FASHION_MNIST_NAMES and data.num_classes == 10
    assert data.train.images.max() == 255


def test_dequantize_spreads_each_grey_level_over_its_own_bin():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, 0)
    fixed = np.asarray(data_module.dequantize(None, images))
    np.testing.assert_allclose(fixed[0], (np.arange(256) + 0.5) / 256, rtol=1e-6)
    drawn = np.asarray(data_module.dequantize(jax.random.key(0), images))
    assert drawn.shape == (3, 256) and drawn.dtype == np.float32
    low = np.arange(256) / 256
    assert np.all((drawn >= low) & (drawn < low + 1 / 256))  # [p/256, (p+1)/256)
    assert not np.allclose(drawn[0], drawn[1])  # fresh noise per pixel
    with pytest.raises(TypeError, match="uint8"):
        data_module.dequantize(None, images.astype(np.float32))
