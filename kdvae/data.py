"""Image-classification datasets of the MNIST family (28x28 grey), held in memory as NumPy.

Two sources, one result (a :class:`Dataset` of uint8 images ``[N, 28, 28, 1]`` and int32
labels ``[N]``):

* ``load_dataset(name, data_dir=DIR)`` reads a folder of the four standard MNIST-format IDX
  files (``train-images-idx3-ubyte`` and so on, each optionally gzipped). It needs neither
  TensorFlow nor TFDS, and never imports them.
* ``load_dataset(name)`` goes through TensorFlow Datasets (the ``examples`` extra), which
  downloads and prepares the dataset the first time. TFDS is imported only on this path.

Every way a dataset can fail to load raises :class:`DataError` with a one-line message.
The model side converts with :func:`to_float` and, for a Bernoulli likelihood,
:func:`binarize`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import math
import os
import socket
import zlib
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kdvae import kernels

__all__ = [
    "KNOWN_DATASETS",
    "DataError",
    "Dataset",
    "Split",
    "binarize",
    "dequantize",
    "filter_classes",
    "fingerprint",
    "jitter",
    "load_dataset",
    "load_idx_folder",
    "read_idx",
    "to_float",
    "to_unit_float",
    "with_validation_in_training",
]

_DIGITS = tuple(str(i) for i in range(10))

# Class names of each known dataset, as TFDS names them; the unlabeled one has none.
_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": _DIGITS,
    "fashion_mnist": (
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
    ),
    # Kuzushiji-MNIST: one cursive hiragana per row of the syllabary, romanized.
    "kmnist": ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    "emnist/mnist": _DIGITS,
    "binarized_mnist": (),
}

KNOWN_DATASETS: tuple[str, ...] = tuple(_CLASS_NAMES)
"""Names :func:`load_dataset` accepts; all are 28x28 grey images."""

_UNLABELED = "binarized_mnist"  # TFDS name of the fixed binarization of MNIST, no labels.

# IDX files (LeCun's MNIST format): ((images, labels) of train, (images, labels) of test).
_IDX_FILES = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)
# Magic number -> what the file holds; both are uint8 (type code 0x08), ndim in the low byte.
_IDX_MAGIC = {0x00000803: "images", 0x00000801: "labels"}
_GZIP_MAGIC = b"\x1f\x8b"
_IMAGE_SHAPE = (28, 28)

_TFDS_HOST = ("storage.googleapis.com", 443)  # where TFDS downloads MNIST and its kin
_DATA_DIR_HINT = (
    "pass --data-dir DIR to read a folder of the four MNIST-format IDX files instead "
    "(e.g. /usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist package)"
)


class DataError(Exception):
    """A dataset could not be loaded; the message is one clear line for the user."""


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Images and labels of one split.

    Attributes:
      images: uint8 ``[N, 28, 28, 1]``, grey levels 0..255.
      labels: int32 ``[N]``; -1 where the dataset is unlabeled.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"Split.images must be uint8 [N, H, W, C], got {self.images.dtype} "
                f"{self.images.shape}."
            )
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"Split.labels must be int32 [{len(self.images)}], got {self.labels.dtype} "
                f"{self.labels.shape}."
            )

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, mask_or_indices: ArrayLike) -> Split:
        """A new Split of the rows a boolean mask ``[N]`` or integer indices ``[M]`` pick."""
        rows = np.asarray(mask_or_indices)
        return Split(self.images[rows], self.labels[rows])


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset split three ways, with its class names.

    Attributes:
      name: the dataset's name, one of :data:`KNOWN_DATASETS`.
      train: the training split minus the validation hold-out.
      val: the last ``val_size`` examples of the original training split (for
        ``binarized_mnist``, TFDS's own validation split).
      test: the test split.
      num_classes: 10 for the labeled datasets; 0 for ``binarized_mnist`` (unlabeled).
      class_names: ``num_classes`` names, e.g. ``"0"``..``"9"`` for mnist.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]


def with_validation_in_training(ds: Dataset) -> Dataset:
    """``ds`` with its validation examples appended to the training split and none held
    out: for a final fit once every setting (the epoch count too) is chosen."""
    train = Split(
        np.concatenate([ds.train.images, ds.val.images]),
        np.concatenate([ds.train.labels, ds.val.labels]),
    )
    empty = Split(ds.val.images[:0], ds.val.labels[:0])
    return dataclasses.replace(ds, train=train, val=empty)


# --------------------------------------------------------------------------- IDX files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file of uint8 (gzipped or not) into an array.

    Args:
      path: an IDX file with magic number 0x00000803 (images ``[N, rows, cols]``) or
        0x00000801 (labels ``[N]``). Gzip is recognised by its content, not the name.

    Returns:
      uint8 ``[N, rows, cols]`` or ``[N]``, as the header says.

    Raises:
      DataError: unreadable file or gzip stream, wrong magic number, short header, or a
        payload that is not exactly the size the header gives.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError.
        raise DataError(f"cannot read IDX file {path}: {err}") from err

    if len(raw) < 4:
        raise DataError(f"{path} is not an IDX file: {len(raw)} bytes, no room for a magic number")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in _IDX_MAGIC:
        raise DataError(
            f"{path} is not an MNIST-format IDX file: magic number 0x{magic:08x}, expected "
            "0x00000803 (uint8 images) or 0x00000801 (uint8 labels)"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path} is truncated: its IDX header needs {header} bytes, found {len(raw)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected, found = math.prod(shape), len(raw) - header
    if found != expected:
        problem = "truncated" if found < expected else "followed by extra bytes"
        raise DataError(
            f"{path} is {problem}: its header gives {_IDX_MAGIC[magic]} of shape {shape}, "
            f"i.e. {expected} bytes of data, but found {found}"
        )
    # A copy, so that the arrays are writable like those TFDS returns.
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()


def load_idx_folder(folder: str | os.PathLike) -> tuple[Split, Split]:
    """Reads (train, test) from a folder of the four standard MNIST-format IDX files.

    Args:
      folder: holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each possibly ``.gz``.

    Returns:
      ``(train, test)``, images uint8 ``[N, 28, 28, 1]`` and labels int32 ``[N]``.

    Raises:
      DataError: a missing folder or file, an unreadable file, images that are not
        28x28, or image and label counts that differ.
    """
    folder = Path(folder)
    expected = ", ".join(f"{stem}[.gz]" for pair in _IDX_FILES for stem in pair)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"data directory {folder} is a file, not a folder holding {expected}")
    if not folder.is_dir():
        raise DataError(f"data directory {folder} does not exist; it should hold {expected}")
    paths = {stem: _find_idx(folder, stem) for pair in _IDX_FILES for stem in pair}
    missing = [f"{stem}[.gz]" for stem, path in paths.items() if path is None]
    if missing:
        raise DataError(
            f"data directory {folder} lacks {', '.join(missing)} (it should hold {expected})"
        )
    train, test = (_read_idx_split(paths[images], paths[labels]) for images, labels in _IDX_FILES)
    return train, test


def _find_idx(folder: Path, stem: str) -> Path | None:
    """``folder/stem``, else ``folder/stem.gz``, else None."""
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _read_idx_split(images_path: Path, labels_path: Path) -> Split:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != _IMAGE_SHAPE:
        raise DataError(
            f"{images_path} holds an array of shape {images.shape}, expected 28x28 images "
            "[N, 28, 28]"
        )
    if labels.ndim != 1:
        raise DataError(f"{labels_path} holds an array of shape {labels.shape}, expected labels")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    return Split(images[..., None], labels.astype(np.int32))


# --------------------------------------------------------------------------- datasets


def load_dataset(
    name: str = "mnist",
    *,
    data_dir: str | os.PathLike | None = None,
    val_size: int = 5000,
    tfds_data_dir: str | None = None,
) -> Dataset:
    """Loads a dataset of :data:`KNOWN_DATASETS` into memory.

    Args:
      name: which dataset. With ``data_dir`` it only labels the data (and picks the class
        names), but must still be known.
      data_dir: a folder of the four MNIST-format IDX files (see :func:`load_idx_folder`),
        read without TensorFlow. None: download through TFDS.
      val_size: how many of the last training examples to hold out as ``val``;
        ``0 <= val_size < len(train)``. Ignored for ``binarized_mnist``.
      tfds_data_dir: where TFDS keeps its prepared datasets (None: its default).

    Returns:
      The :class:`Dataset`. ``binarized_mnist`` is unlabeled (labels -1, ``num_classes``
      0), its pixels are 0 or 255, and its ``val`` is TFDS's validation split.

    Raises:
      DataError: an unknown name, a bad ``val_size``, or data that cannot be read or
        downloaded; the message says what to do.
    """
    if name not in _CLASS_NAMES:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}")
    class_names = _CLASS_NAMES[name]

    if name == _UNLABELED:
        if data_dir is not None:
            raise DataError(
                f"{name} is only available through TFDS (without --data-dir); for a folder "
                "of IDX files use mnist and binarize the grey levels instead"
            )
        train, val, test = (
            Split(np.where(split.images > 0, np.uint8(255), np.uint8(0)), split.labels)
            for split in _load_tfds(name, ("train", "validation", "test"), tfds_data_dir)
        )
        return Dataset(name, train, val, test, len(class_names), class_names)

    if data_dir is None:
        train, test = _load_tfds(name, ("train", "test"), tfds_data_dir)
    else:
        train, test = load_idx_folder(data_dir)
        top = max(int(split.labels.max(initial=0)) for split in (train, test))
        if top >= len(class_names):
            raise DataError(
                f"{data_dir} has labels up to {top}, but {name} has {len(class_names)} classes"
            )
    if not 0 <= val_size < len(train):
        raise DataError(
            f"the validation split (val_size, --val-size) must be in [0, {len(train)}) for "
            f"{name} ({len(train)} training examples), got {val_size}"
        )
    cut = len(train) - val_size  # Slices, so train and val are views, not copies.
    train, val = (
        Split(train.images[rows], train.labels[rows])
        for rows in (slice(None, cut), slice(cut, None))
    )
    if len(test) == 0:
        raise DataError(
            f"the test split of {name} is empty ({data_dir or 'TFDS'}): nothing to report"
        )
    return Dataset(name, train, val, test, len(class_names), class_names)


def fingerprint(ds: Dataset) -> dict:
    """What identifies ``ds``: its name, the rows of each split and a sha256 of every image
    and label, in order (stored with checkpoints, so a run resumes on the same data)."""
    digest = hashlib.sha256()
    for split in (ds.train, ds.val, ds.test):
        digest.update(np.ascontiguousarray(split.images).data)
        digest.update(np.ascontiguousarray(split.labels).data)
    return {
        "name": ds.name,
        "rows": {"train": len(ds.train), "val": len(ds.val), "test": len(ds.test)},
        "sha256": digest.hexdigest(),
    }


def _load_tfds(name: str, splits: tuple[str, ...], data_dir: str | None) -> list[Split]:
    """The named splits of a TFDS dataset, downloaded and prepared if need be."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            f"tensorflow_datasets is needed to download {name}: pip install -e '.[examples]', "
            f"or {_DATA_DIR_HINT}"
        ) from None
    absl_logger = logging.getLogger("absl")
    level, _ = absl_logger.level, absl_logger.setLevel(logging.ERROR)  # "no dataset_info.json"
    try:
        prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    finally:
        absl_logger.setLevel(level)
    if not prepared:
        _check_online(name)  # seconds, where TFDS would retry for minutes
    try:
        # Dicts rather than as_supervised, as binarized_mnist has no label to pair.
        tensors = tfds.load(name, split=list(splits), batch_size=-1, data_dir=data_dir)
    except Exception as err:  # No internet, a firewall, a full disk, ...: all end here.
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(
            f"could not download {name} with TFDS ({type(err).__name__}: {reason}); "
            f"{_DATA_DIR_HINT}"
        ) from err
    return [_split_from_tfds(arrays) for arrays in tfds.as_numpy(tensors)]


def _check_online(name: str) -> None:
    """``DataError`` naming both offline routes when TFDS's download host is unreachable."""
    try:
        socket.create_connection(_TFDS_HOST, timeout=5).close()
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise DataError(
            f"{name} is not prepared for TFDS, and {_TFDS_HOST[0]} cannot be reached to "
            f"download it ({reason}). Offline, {_DATA_DIR_HINT}; or copy a TFDS folder "
            "prepared on a machine with internet (~/tensorflow_datasets) and point "
            "TFDS_DATA_DIR at it"
        ) from err


def _split_from_tfds(arrays: dict[str, np.ndarray]) -> Split:
    """A Split from TFDS's ``{"image": uint8 [N, 28, 28, 1], "label": int64 [N]}``."""
    images = arrays["image"]
    if "label" not in arrays:  # Unlabeled.
        return Split(images, np.full(len(images), -1, np.int32))
    return Split(images, arrays["label"].astype(np.int32))


def filter_classes(
    split: Split, *, omit: Sequence[int] = (), keep: Sequence[int] | None = None
) -> Split:
    """The rows of ``split`` whose label is not in ``omit`` and, if given, is in ``keep``.

    Checking that the class ids are in ``[0, num_classes)`` is the caller's job.
    """
    mask = ~np.isin(split.labels, np.asarray(omit, np.int32))
    if keep is not None:
        mask &= np.isin(split.labels, np.asarray(keep, np.int32))
    return split.select(mask)


# --------------------------------------------------------------------------- model inputs


def to_float(images: ArrayLike) -> np.ndarray | jax.Array:
    """uint8 images ``[N, ...]`` (e.g. ``[N, 28, 28, 1]``) -> float32 ``[N, 784]`` in [0, 1].

    A ``jax.Array`` (also a tracer, under ``jit``) is converted with ``jnp`` and stays on its
    device; anything else with NumPy.
    """
    xp = jnp if isinstance(images, jax.Array) else np
    images = xp.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"to_float expects uint8 images (0..255), got dtype {images.dtype}.")
    flat = images.reshape(images.shape[0], math.prod(images.shape[1:]))
    return flat.astype(xp.float32) / 255.0


def binarize(
    key: jax.Array | None,
    images: ArrayLike,
    *,
    dynamic: bool = True,
    threshold: float = 0.5,
) -> jax.Array:
    """Binarizes grey levels in [0, 1] to 0/1, for a Bernoulli likelihood.

    Args:
      key: a PRNG key (a fresh one per batch); may be None when ``dynamic=False``.
      images: float grey levels in [0, 1], any shape (e.g. ``[N, 784]``).
      dynamic: True draws each pixel from Bernoulli(grey level), a new binarization per
        call (Salakhutdinov & Murray, 2008): ``jax.random.bernoulli``'s draws, computed
        faster on a CPU (:mod:`kdvae.kernels`); False thresholds: ``images > threshold``.
        Must be a Python bool (static under ``jit``).
      threshold: the cut for ``dynamic=False``.

    Returns:
      float32 0/1, the shape of ``images``.
    """
    images = jnp.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(
            f"binarize expects float grey levels in [0, 1] (see to_float), got {images.dtype}."
        )
    if not dynamic:
        return (images > threshold).astype(jnp.float32)
    if key is None:
        raise ValueError("binarize(dynamic=True) needs a PRNG key, got None.")
    return kernels.bernoulli(key, images).astype(jnp.float32)


def dequantize(key: jax.Array | None, images: ArrayLike) -> jax.Array:
    """uint8 images ``[N, ...]`` -> float32 ``[N, D]`` in ``[0, 1)``: ``(pixel + u) / 256``
    with ``u ~ U(0, 1)`` per pixel, or ``u = 1/2`` with ``key=None``.

    Uniform dequantization (Theis et al. 2016): a continuous density on it is a density
    on the 256 grey levels once ``D log 256`` nats are added (see bits per dimension in
    :mod:`kdvae.vae`).
    """
    images = jnp.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"dequantize expects uint8 images (0..255), got dtype {images.dtype}.")
    flat = images.reshape(images.shape[0], -1).astype(jnp.float32)
    u = 0.5 if key is None else kernels.uniform(key, flat.shape)
    return (flat + u) / 256.0


def to_unit_float(images: jax.Array) -> jax.Array:
    """uint8 images ``[B, 28, 28, 1]`` -> float32 ``[B, 28, 28, 1]`` in ``[0, 1]``.

    :func:`to_float`, keeping the image shape (for :func:`jitter`).
    """
    return to_float(images).reshape(images.shape)


def jitter(key: jax.Array, x_BHWC: jax.Array, *, max_shift: int = 2) -> jax.Array:
    """Translate each image by up to ``max_shift`` pixels in each direction (zero fill).

    Hinton et al. (2015) trained the big MNIST net on inputs "jittered by up to two
    pixels in any direction".
    """
    if max_shift == 0:
        return x_BHWC
    b, h, w, _ = x_BHWC.shape
    s = max_shift
    shifts = jax.random.randint(key, (b, 2), 0, 2 * s + 1)
    padded = jnp.pad(x_BHWC, ((0, 0), (s, s), (s, s), (0, 0)))

    def crop(image, shift):
        return jax.lax.dynamic_slice(image, (shift[0], shift[1], 0), (h, w, image.shape[-1]))

    return jax.vmap(crop)(padded, shifts)
