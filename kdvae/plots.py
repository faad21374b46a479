"""Figures for the two examples: distillation and the VAE.

Every function is pure: it takes NumPy arrays (or plain lists and dicts) and an output path,
writes one PNG there (creating the parent folder) and returns the path as a ``Path``. It draws
numbers, it does not derive them: the caller computes the probabilities to draw with the
library (e.g. :func:`kdvae.losses.tempered_softmax`), so each formula lives in one place.

Figures are drawn with matplotlib's object-oriented API on an Agg canvas
(``matplotlib.figure.Figure`` and ``fig.savefig``), never through ``pyplot``, so they need no
display and can be drawn from several threads at once. This module imports neither JAX nor
Flax: pass ``np.asarray(x)`` for device arrays.

Images are taken as probabilities in ``[0, 1]`` (floats) or as ``uint8`` in ``[0, 255]``, in
any of the shapes ``[N, H, W]``, ``[N, H * W]`` (square images) or ``[N, H, W, 1]``.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "dark_knowledge_figure",
    "image_grid",
    "latent_scatter",
    "manifold_figure",
    "reconstructions_figure",
    "temperature_figure",
    "training_curves",
]

_DPI = 110
_PAD_VALUE = 0.5  # Grey lines between tiles, distinct from both ink (1) and background (0).


# --------------------------------------------------------------------------------------------
# Helpers.


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def _as_images(images: np.ndarray, *, name: str = "images") -> np.ndarray:
    """Any of ``[N, H, W]``, ``[N, H * W]`` (square), ``[N, H, W, 1]`` -> float ``[N, H, W]``.

    ``uint8`` is scaled from ``[0, 255]`` to ``[0, 1]``; other dtypes are taken as
    probabilities and clipped to ``[0, 1]``.
    """
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    elif x.ndim == 2:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(
                f"{name}: flat images must have a square number of pixels, got shape {x.shape}"
            )
        x = x.reshape(x.shape[0], side, side)
    if x.ndim != 3:
        raise ValueError(
            f"{name}: expected [N, H, W], [N, H*W] or [N, H, W, 1], got shape {np.shape(images)}"
        )
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return np.clip(x.astype(np.float32), 0.0, 1.0)


def _as_image(image: np.ndarray) -> np.ndarray:
    """One image ``[H, W]``, ``[H, W, 1]`` or ``[H * W]`` -> float ``[H, W]`` in ``[0, 1]``."""
    return _as_images(np.asarray(image)[None], name="image")[0]


def _tile(images: np.ndarray, ncols: int, *, pad: int = 1) -> np.ndarray:
    """Float ``[N, H, W]`` -> one ``[rows * (H + pad) + pad, ncols * (W + pad) + pad]`` mosaic.

    Tiles fill row by row; the separating lines are ``_PAD_VALUE`` (grey) and unused cells
    are NaN, which ``_show_mosaic`` draws in white.
    """
    n, h, w = images.shape
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    out = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad), _PAD_VALUE, dtype=np.float32)
    for k in range(n):
        r, c = divmod(k, ncols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        out[top : top + h, left : left + w] = images[k]
    if n < nrows * ncols:  # Blank everything right of the last tile's border, edge included.
        r, c = divmod(n, ncols)
        out[r * (h + pad) + pad :, c * (w + pad) + pad :] = np.nan
    return out


def _show_mosaic(ax, mosaic: np.ndarray) -> None:
    cmap = colormaps["gray"].with_extremes(bad="white")
    ax.imshow(mosaic, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _class_labels(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(s) for s in class_names]
    if len(names) < num_classes:
        raise ValueError(f"class_names has {len(names)} names but there are {num_classes} classes")
    return names[:num_classes]


def _by_temperature(
    probabilities_by_temperature: Mapping[float, np.ndarray],
) -> tuple[list[float], np.ndarray]:
    """``{T: probs [C] or [1, C]}`` -> the temperatures, ascending, and ``[T, C]`` float64."""
    if not probabilities_by_temperature:
        raise ValueError("probabilities_by_temperature is empty")
    items = sorted(
        (float(t), np.asarray(p, dtype=np.float64)) for t, p in probabilities_by_temperature.items()
    )
    probs = []
    for t, p in items:
        p = np.squeeze(p)
        if p.ndim != 1:
            raise ValueError(f"probabilities at T={t:g} must have shape [C], got {p.shape}")
        probs.append(p)
    if any(p.size != probs[0].size for p in probs):
        raise ValueError(f"probability vectors differ in length: {[p.size for p in probs]}")
    return [t for t, _ in items], np.stack(probs)


def _grouped_bars(ax, labels: Sequence[str], values_SxG: np.ndarray, colors=None) -> np.ndarray:
    """One group of bars per column of ``values_SxG``, one bar per series (row, named
    by ``labels``); returns the groups' x."""
    x = np.arange(values_SxG.shape[1])
    width = 0.8 / len(labels)
    colors = colors or _colors("viridis", len(labels))
    for k, (label, v) in enumerate(zip(labels, values_SxG)):
        offset = (k - (len(labels) - 1) / 2) * width
        ax.bar(x + offset, v, width, color=colors[k], label=label)
    return x


def _normal_quantile_grid(n: int, low: float = 0.05, high: float = 0.95) -> np.ndarray:
    """``n`` standard-normal quantiles at probabilities ``linspace(low, high, n)``, ascending.

    Made exactly antisymmetric (``q == -q[::-1]``) when ``low + high == 1``.
    """
    inv_cdf = statistics.NormalDist().inv_cdf
    q = np.array([inv_cdf(p) for p in np.linspace(low, high, n)], dtype=np.float64)
    if math.isclose(low + high, 1.0):
        q = 0.5 * (q - q[::-1])
    return q


# --------------------------------------------------------------------------------------------
# Distillation.


def temperature_figure(
    path: str | os.PathLike,
    logits: Sequence[float] | np.ndarray,
    probabilities_by_temperature: Mapping[float, np.ndarray],
) -> Path:
    """Grouped bars of ``softmax(logits / T)`` for each ``T``: how temperature softens.

    Args:
      path: where to write the PNG.
      logits: ``[C]`` logits of one example (they label the x axis).
      probabilities_by_temperature: ``{T: probs}`` with ``probs`` of shape ``[C]`` (or
        ``[1, C]``): ``kdvae.losses.tempered_softmax(logits, temperature=T)``. Drawn in
        increasing ``T``.

    Returns:
      ``Path(path)``.
    """
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    temperatures, probs_TxC = _by_temperature(probabilities_by_temperature)
    num_classes = logits.size
    if num_classes == 0 or probs_TxC.shape[1] != num_classes:
        raise ValueError(
            f"temperature_figure needs one probability per logit and at least one logit; "
            f"got {num_classes} logits and {probs_TxC.shape[1]} probabilities per temperature"
        )

    fig = _new_figure((max(6.0, 0.9 * num_classes + 2.5), 4.0))
    ax = fig.add_subplot()
    x = _grouped_bars(ax, [f"T = {t:g}" for t in temperatures], probs_TxC)
    ax.axhline(1.0 / num_classes, color="0.4", lw=0.8, ls="--", label="uniform")
    ax.set_xticks(x, [f"{i}\n(z = {z:g})" for i, z in enumerate(logits)])
    ax.set_xlabel("class (logit)")
    ax.set_ylabel("probability  softmax(z / T)")
    ax.set_ylim(0, min(1.0, 1.05 * probs_TxC.max()))
    ax.set_title("Higher temperature softens the softmax")
    ax.legend(fontsize="small")
    return _save(fig, path)


def dark_knowledge_figure(
    path: str | os.PathLike,
    probabilities_by_temperature: Mapping[float, np.ndarray],
    image: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    true_label: int | None = None,
) -> Path:
    """The teacher's class probabilities for one image at several temperatures (grouped bars).

    Args:
      path: where to write the PNG.
      probabilities_by_temperature: ``{T: probs}`` with ``probs`` of shape ``[C]`` (or
        ``[1, C]``), e.g. the teacher's ``softmax(logits / T)`` for ``T = 1, 5, 10``. Drawn in
        increasing ``T``.
      image: the input, ``[H, W]`` or ``[H, W, 1]``, ``uint8`` or float in ``[0, 1]``; drawn
        to the left when given.
      class_names: ``C`` names for the x axis; default ``0 .. C-1``.
      true_label: the correct class, marked on the axis and in the title.

    Returns:
      ``Path(path)``.
    """
    temperatures, probs = _by_temperature(probabilities_by_temperature)
    num_classes = probs.shape[1]
    names = _class_labels(num_classes, class_names)
    if true_label is not None and not 0 <= true_label < num_classes:
        raise ValueError(f"true_label must be in [0, {num_classes}), got {true_label}")

    bar_width_in = max(6.0, 0.55 * num_classes + 2.0)
    if image is not None:
        fig = _new_figure((bar_width_in + 2.8, 3.8))
        ax_img, ax = fig.subplots(1, 2, width_ratios=[1.0, bar_width_in / 2.8])
        ax_img.imshow(_as_image(image), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax_img.set_xticks([])
        ax_img.set_yticks([])
        ax_img.set_title("input" if true_label is None else f"input (label {names[true_label]})")
    else:
        fig = _new_figure((bar_width_in, 3.8))
        ax = fig.add_subplot()

    x = _grouped_bars(ax, [f"T = {t:g}" for t in temperatures], probs)
    ax.set_xticks(x, names)
    if true_label is not None:
        tick = ax.get_xticklabels()[true_label]
        tick.set_fontweight("bold")
        tick.set_color("tab:red")
    ax.set_xlabel("class" + ("" if true_label is None else "  (true class in red)"))
    ax.set_ylabel("teacher probability")
    ax.set_ylim(0, 1.0)
    ax.set_title("Dark knowledge: the teacher's softened probabilities")
    ax.legend(fontsize="small")
    return _save(fig, path)


def unseen_classes_figure(
    path: str | os.PathLike, cases: Sequence[str], accuracy: Mapping[str, Sequence[float]]
) -> Path:
    """Grouped bars: per case (e.g. the omitted class), the accuracy on the classes the
    transfer set lacked, for each series (e.g. ``"distilled, after the shift"``).

    Args:
      path: where to write the PNG.
      cases: ``G`` names for the x axis.
      accuracy: ``{series: [G] accuracies in [0, 1]}``, drawn in this order; pairs of
        series share a hue (light, then dark).

    Returns:
      ``Path(path)``.
    """
    values = np.asarray(list(accuracy.values()), dtype=np.float64).reshape(len(accuracy), -1)
    if values.shape[1] != len(cases):
        raise ValueError(f"unseen_classes_figure needs {len(cases)} values per series")
    fig = _new_figure((max(6.0, 0.9 * len(cases) + 2.5), 4.5))
    ax = fig.add_subplot()
    colors = [colormaps["tab20"](k) for k in (1, 0, 3, 2, 5, 4, 7, 6)]
    x = _grouped_bars(ax, list(accuracy), values, colors[: len(accuracy)])
    ax.set_xticks(x, cases)
    ax.set_xlabel("classes left out of the transfer set")
    ax.set_ylabel("test accuracy on them")
    ax.set_ylim(0, 1.0)
    ax.set_title("Classes the student never saw: before and after the bias shift")
    # Above the plot, where no bar can be (a bar may reach 1); one row if it fits.
    ncol = len(accuracy) if len(cases) >= 6 else 2
    fig.legend(fontsize="small", ncol=ncol, loc="outside upper center")
    return _save(fig, path)


def intervals_figure(
    path: str | os.PathLike, intervals: Mapping[str, Mapping], xlabel: str = "test errors"
) -> Path:
    """One row per model: its mean (a dot), its 95 % interval (a bar) and every seed's
    value (small marks), to see at a glance which intervals overlap.

    Args:
      path: where to write the PNG.
      intervals: ``{model: {"mean", "ci95": [low, high] or None, "values": [...]}}``, as
        :func:`kdvae.stats.interval` gives; drawn top to bottom in this order.
      xlabel: what the numbers are.

    Returns:
      ``Path(path)``.
    """
    if not intervals:
        raise ValueError("intervals_figure needs at least one model")
    fig = _new_figure((6.5, 0.45 * len(intervals) + 1.2))
    ax = fig.add_subplot()
    for row, stats in enumerate(intervals.values()):
        y = -row
        if stats.get("ci95") is not None:
            ax.plot(stats["ci95"], [y, y], color="tab:blue", lw=2.5, solid_capstyle="butt")
        values = stats.get("values", [])
        ax.plot(values, [y] * len(values), "|", color="0.45", ms=9)
        ax.plot([stats["mean"]], [y], "o", color="tab:blue", ms=6)
    ax.set_yticks([-row for row in range(len(intervals))], list(intervals))
    ax.set_xlabel(f"{xlabel}: mean, 95 % interval, each seed")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def kl_per_dimension_figure(
    path: str | os.PathLike, kl_per_dimension: Sequence[float], threshold: float = 0.01
) -> Path:
    """Each latent's ``KL(q(z_l|x) || N(0, 1))`` (averaged over examples) as a bar, largest
    first, on a log scale: the latents the model uses, and those collapsed onto the prior
    (below ``threshold`` nats, drawn grey).

    Args:
      path: where to write the PNG.
      kl_per_dimension: ``[L]`` nats, one per latent.
      threshold: the line between used and collapsed latents, in nats.

    Returns:
      ``Path(path)``.
    """
    kl = np.asarray(kl_per_dimension, np.float64)
    if kl.ndim != 1 or not kl.size:
        raise ValueError(f"kl_per_dimension must be a non-empty [L] list, got shape {kl.shape}")
    order = np.argsort(-kl)
    fig = _new_figure((max(4.0, 0.25 * kl.size + 1.5), 3.0))
    ax = fig.add_subplot()
    colors = ["tab:blue" if v >= threshold else "0.6" for v in kl[order]]
    ax.bar(np.arange(kl.size), np.maximum(kl[order], 1e-6), color=colors)
    ax.axhline(threshold, color="0.3", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(kl.size), [str(i) for i in order], fontsize=7)
    ax.set_xlabel("latent (sorted by KL)")
    ax.set_ylabel("KL to the prior (nats)")
    used = int(np.sum(kl >= threshold))
    ax.set_title(f"{used} of {kl.size} latents above {threshold} nats", fontsize=9)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Training.


def training_curves(
    path: str | os.PathLike,
    history: Sequence[Mapping],
    *,
    stages: Sequence[str] | None = None,
    keys: Sequence[str] = ("train_loss", "val_accuracy"),
) -> Path:
    """One subplot per metric, one line per stage, against the epoch.

    Args:
      path: where to write the PNG.
      history: rows as in ``metrics.jsonl``, e.g. ``{"stage": "teacher", "epoch": 3,
        "train_loss": ..., "val_accuracy": ...}``. A row without ``"stage"`` belongs to the
        stage ``""`` (drawn without a legend entry); one without ``"epoch"`` is placed at
        its 1-based position within its stage.
      stages: the stages to draw, in this order; default every stage in order of first
        appearance.
      keys: the metrics to draw, one subplot each. A key found in no selected row is
        skipped, as are rows whose value is missing, not a number, or not finite. For the
        VAE: ``("train_loss", "test_neg_elbo", "test_kl", "test_reconstruction")``.

    Returns:
      ``Path(path)``.
    """
    stage_order, series = _series(history, keys, stages)
    plotted = [k for k in keys if k in series]
    # At most three panels a row, rows evenly filled (four keys make a 2 x 2 grid).
    nrows = max(1, math.ceil(len(plotted) / 3))
    ncols = max(1, math.ceil(len(plotted) / nrows))
    fig = _new_figure((max(4.5, 3.8 * ncols), 3.2 * nrows + 0.2))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[max(1, len(plotted)) :]:
        ax.set_axis_off()
    if not plotted:
        axes[0].text(
            0.5,
            0.5,
            "no data for the keys " + (", ".join(map(repr, keys)) or "(none given)"),
            ha="center",
            va="center",
            transform=axes[0].transAxes,
        )
        axes[0].set_axis_off()
        return _save(fig, path)

    colors = dict(zip(stage_order, _colors("tab10", len(stage_order))))
    for ax, key in zip(axes, plotted):
        for stage, (xs, ys) in series[key].items():
            marker = "o" if len(xs) <= 30 else None
            ax.plot(xs, ys, marker=marker, ms=3, color=colors[stage], label=stage or None)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if any(stage for stage in series[key]):
            ax.legend(fontsize="small")
    return _save(fig, path)


def _series(history: Sequence[Mapping], keys: Sequence[str], stages: Sequence[str] | None):
    """The stages in drawing order and ``{key: {stage: (epochs, values)}}`` of finite values."""
    by_stage: dict[str, list[Mapping]] = {}
    for row in history:
        by_stage.setdefault(str(row.get("stage", "")), []).append(row)
    stage_order = list(by_stage) if stages is None else [str(s) for s in stages]
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for key in keys:
        for stage in stage_order:
            xs, ys = [], []
            for i, row in enumerate(by_stage.get(stage, []), start=1):
                y = _finite_number(row.get(key))
                if y is None:
                    continue
                x = _finite_number(row.get("epoch"))
                xs.append(i if x is None else x)
                ys.append(y)
            if xs:
                series.setdefault(key, {})[stage] = (xs, ys)
    return stage_order, series


def _finite_number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _colors(cmap_name: str, n: int) -> list:
    cmap = colormaps[cmap_name]
    if cmap_name == "tab10":
        return [cmap(i % 10) for i in range(n)]
    return [cmap(v) for v in np.linspace(0.1, 0.85, max(n, 1))][:n]


# --------------------------------------------------------------------------------------------
# VAE.


def image_grid(
    path: str | os.PathLike,
    images: np.ndarray,
    *,
    nrow: int = 8,
    title: str | None = None,
) -> Path:
    """Tile images into one grid (grey colormap, black 0 to white 1).

    Args:
      path: where to write the PNG.
      images: ``[N, H, W]``, ``[N, H * W]`` or ``[N, H, W, 1]``, probabilities in ``[0, 1]``
        (or ``uint8``).
      nrow: images per row of the grid (as in ``torchvision.utils.make_grid``).
      title: optional title above the grid.

    Returns:
      ``Path(path)``.
    """
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    x = _as_images(images)
    if x.shape[0] == 0:
        raise ValueError("image_grid needs at least one image")
    mosaic = _tile(x, nrow)
    height, width = mosaic.shape
    scale = max(0.018, 3.0 / max(height, width))  # inches per pixel: at least 3 in across
    fig = _new_figure((width * scale + 0.3, height * scale + (0.5 if title else 0.3)))
    ax = fig.add_subplot()
    _show_mosaic(ax, mosaic)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def reconstructions_figure(
    path: str | os.PathLike,
    originals: np.ndarray,
    reconstructions: np.ndarray,
    *,
    n: int = 8,
) -> Path:
    """The first ``n`` originals above their reconstructions.

    Up to 16 pairs sit in one pair of rows; more wrap into further, evenly filled pairs of rows.

    Args:
      path: where to write the PNG.
      originals: ``[N, H, W]``, ``[N, H * W]`` or ``[N, H, W, 1]`` in ``[0, 1]`` or ``uint8``.
      reconstructions: the decoder's probabilities (``sigmoid(logits)``), any of those
        shapes, same ``N >= n`` and image size as ``originals``.
      n: how many pairs to draw (capped at ``N``).

    Returns:
      ``Path(path)``.
    """
    orig = _as_images(originals, name="originals")
    recon = _as_images(reconstructions, name="reconstructions")
    if orig.shape[1:] != recon.shape[1:]:
        raise ValueError(
            f"image sizes differ: originals {orig.shape}, reconstructions {recon.shape}"
        )
    n = min(n, orig.shape[0], recon.shape[0])
    if n < 1:
        raise ValueError("reconstructions_figure needs at least one pair")
    npairs = math.ceil(n / 16)
    ncols = math.ceil(n / npairs)
    _, h, w = orig.shape

    fig = _new_figure((max(3.5, 0.62 * ncols + 1.3), 1.35 * npairs + 0.5))
    axes = fig.subplots(2 * npairs, 1, squeeze=False)[:, 0]
    for p in range(npairs):
        lo, hi = p * ncols, min((p + 1) * ncols, n)
        for ax, imgs, label in (
            (axes[2 * p], orig, "original"),
            (axes[2 * p + 1], recon, "reconstruction"),
        ):
            strip = _tile(imgs[lo:hi], ncols)
            if hi - lo < ncols:  # A short last strip: widen it so tiles keep one size.
                blank = np.full((strip.shape[0], (ncols - (hi - lo)) * (w + 1)), np.nan)
                strip = np.concatenate([strip, blank], axis=1)
            _show_mosaic(ax, strip)
            ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize="small")
    fig.suptitle("Originals and reconstructions")
    return _save(fig, path)


def latent_scatter(
    path: str | os.PathLike,
    means: np.ndarray,
    labels: np.ndarray | None,
    *,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Scatter of the encoder's means, coloured by label.

    ``L == 2`` is drawn as is; ``L > 2`` is projected onto its first two principal
    components (centred, by SVD) and the axes say so; ``L == 1`` is a strip plot, one row
    per class.

    Args:
      path: where to write the PNG.
      means: ``[N, L]`` latent means (``[N]`` is taken as ``L == 1``).
      labels: ``[N]`` integer labels, or ``None``. Label ``-1`` means unlabeled (grey);
        with no labels, or all ``-1``, every point gets one colour. Up to 10 classes get a
        legend, more get a colour bar.
      class_names: names for the legend, indexed by label.

    Returns:
      ``Path(path)``.
    """
    means, labels = _latents_and_labels(means, labels)
    xy, xlabel, ylabel, title = _plane(means, labels)
    fig = _new_figure((6.4, 5.2))
    ax = fig.add_subplot()
    size = float(np.clip(300.0 / math.sqrt(len(xy)), 1.0, 30.0))  # 10 000 points: size 3.
    _scatter_by_label(fig, ax, xy, labels, class_names, size, legend=means.shape[1] != 1)
    if means.shape[1] == 1:  # the strip plot names its rows on the y axis
        if labels is None:
            ax.set_yticks([])
        else:
            ticks = np.unique(labels)
            names = _class_labels(int(ticks.max()) + 1, class_names)
            ax.set_yticks(ticks, [names[t] if t >= 0 else "unlabeled" for t in ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _latents_and_labels(means, labels) -> tuple[np.ndarray, np.ndarray | None]:
    """``[N, L]`` float64 means and ``[N]`` int64 labels (``None`` if absent or all -1)."""
    means = np.asarray(means, dtype=np.float64)
    if means.ndim == 1:
        means = means[:, None]
    if means.ndim != 2 or means.shape[0] == 0:
        raise ValueError(f"means must have shape [N, L] with N >= 1, got {np.shape(means)}")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        if labels.shape[0] != means.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries, means has {len(means)} rows")
        if np.all(labels < 0):
            labels = None
    return means, labels


def _plane(means: np.ndarray, labels: np.ndarray | None):
    """The points to draw ``[N, 2]``, the axis labels and the title: the means as they
    are (``L == 2``), their first two principal components (``L > 2``), or a strip per
    class (``L == 1``)."""
    num, latent_dim = means.shape
    if latent_dim == 2:
        return means, "$z_1$", "$z_2$", "Latent means"
    if latent_dim > 2:
        centred = means - means.mean(axis=0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        components = np.zeros((2, latent_dim))
        components[: min(2, vt.shape[0])] = vt[:2]
        var = s**2
        frac = np.pad(var / var.sum() if var.sum() > 0 else np.zeros_like(var), (0, 2))
        return (
            centred @ components.T,
            f"PC 1 ({100 * frac[0]:.0f}% of variance)",
            f"PC 2 ({100 * frac[1]:.0f}% of variance)",
            f"Latent means: PCA of {latent_dim}-D onto 2-D",
        )
    rng = np.random.default_rng(0)  # only for the strip's jitter; fixed so figures repeat
    rows = np.zeros(num) if labels is None else np.maximum(labels, -1).astype(np.float64)
    xy = np.stack([means[:, 0], rows + rng.uniform(-0.3, 0.3, num)], axis=1)
    return xy, "$z_1$", "class" if labels is not None else "", "Latent means (1-D strip plot)"


def _scatter_by_label(fig, ax, xy, labels, class_names, size: float, legend: bool) -> None:
    """Points coloured by label: unlabeled grey, up to 10 classes with a legend, more
    with a colour bar."""
    kw = dict(s=size, alpha=0.6, linewidths=0)
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], color="tab:blue", **kw)
        return
    unlabeled = labels < 0
    if unlabeled.any():
        ax.scatter(*xy[unlabeled].T, color="0.7", label="unlabeled", **kw)
    classes = np.unique(labels[~unlabeled])
    if classes.size > 10:
        sc = ax.scatter(*xy[~unlabeled].T, c=labels[~unlabeled], cmap="viridis", **kw)
        fig.colorbar(sc, ax=ax, label="label")
        return
    names, colors = _class_labels(int(classes.max()) + 1, class_names), _colors("tab10", 10)
    for c in classes:  # colour by label value, so a class keeps its colour
        ax.scatter(*xy[labels == c].T, color=colors[c % 10], label=names[c], **kw)
    if legend:
        handles = ax.legend(
            title="label",
            fontsize="small",
            markerscale=math.sqrt(30.0 / size),
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
        )
        for handle in handles.legend_handles:
            handle.set_alpha(1.0)


def manifold_figure(
    path: str | os.PathLike,
    decode_fn: Callable[[np.ndarray], np.ndarray],
    *,
    n: int = 20,
    span: float | None = None,
) -> Path:
    """The decoder's images over an ``n x n`` grid of a 2-D latent space, tiled into one image.

    By default the grid runs through the standard-normal quantiles at probabilities
    ``linspace(0.05, 0.95, n)`` in each coordinate (Kingma & Welling 2014, Fig. 4): neighbours
    are equally far apart in prior probability, so the grid is dense where the prior has its
    mass and the tails do not take up the picture. The grid is exactly symmetric about zero.
    Pass ``span`` for an evenly spaced grid ``linspace(-span, span, n)`` instead.
    Columns increase in ``z_1`` to the right, rows increase in ``z_2`` upward.

    Args:
      path: where to write the PNG.
      decode_fn: maps float32 ``z`` of shape ``[n * n, 2]`` to probabilities
        ``[n * n, H * W]`` (or ``[n * n, H, W]`` / ``[n * n, H, W, 1]``), as NumPy.
      n: points per axis.
      span: half-width of an evenly spaced grid; ``None`` (default) for the quantile grid.

    Returns:
      ``Path(path)``.

    References:
      Kingma & Welling, Auto-Encoding Variational Bayes, 2014. https://arxiv.org/abs/1312.6114
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if span is None:
        grid = _normal_quantile_grid(n)
        how = "normal quantiles, p = 0.05 .. 0.95"
    else:
        if not span > 0:
            raise ValueError(f"span must be positive, got {span!r}")
        grid = np.linspace(-span, span, n)
        how = f"evenly spaced, -{span:g} .. {span:g}"
    z1, z2 = np.meshgrid(grid, grid[::-1])  # Row 0 (top) has the largest z_2.
    z = np.stack([z1.ravel(), z2.ravel()], axis=1).astype(np.float32)

    decoded = np.asarray(decode_fn(z))
    if decoded.shape[0] != n * n:
        raise ValueError(f"decode_fn returned {decoded.shape[0]} images for {n * n} latents")
    images = _as_images(decoded, name="decode_fn output")
    _, h, w = images.shape
    mosaic = _tile(images, n, pad=0)

    size = float(np.clip(0.3 * n, 4.0, 8.0))
    fig = _new_figure((size + 0.6, size + 0.7))
    ax = fig.add_subplot()
    ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    # Label about five tiles per axis, placed symmetrically, at the tiles' centres.
    step = max(1, (n - 1) // 4)
    half = set(range(0, (n + 1) // 2, step))
    idx = sorted(half | {n - 1 - i for i in half})
    ax.set_xticks([i * w + (w - 1) / 2 for i in idx], [f"{grid[i]:.2f}" for i in idx])
    ax.set_yticks([i * h + (h - 1) / 2 for i in idx], [f"{grid[::-1][i]:.2f}" for i in idx])
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")
    ax.set_title(f"Decoded latent manifold ({how})", fontsize="medium")
    return _save(fig, path)
