"""Activation atlas: a 2-D image embedding cut into a grid, each cell shown by one image.

A cell's picture is the image whose (standardised) activations are closest to the cell's average
activation vector: a real image standing for what the layer sees in that region of the map.
With feature visualizations of the averaged vectors (a later maximize option) the same cells
could show synthetic images instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Cell:
    row: int        # 0 = top
    col: int
    member: int     # position (in the arrays given to atlas_cells) of the representative image
    count: int
    label: int      # most common label in the cell (-1 = unlabelled)


def atlas_cells(xy, acts, labels, grid) -> list[Cell]:
    """Bin ``xy`` into ``grid`` x ``grid`` cells and pick each non-empty cell's representative.

    Parameters
    ----------
    xy : array of shape (n, 2)
        Embedding coordinates.
    acts : array of shape (n, C)
        The same images' activations (standardised per unit by the caller).
    labels : array of shape (n,) of int
    grid : int

    Examples
    --------
    >>> xy = np.array([[0, 0], [0.1, 0], [1, 1]])
    >>> acts = np.array([[0.0], [1.0], [5.0]])
    >>> [(c.row, c.col, c.count) for c in atlas_cells(xy, acts, np.array([0, 0, 1]), 2)]
    [(0, 1, 1), (1, 0, 2)]
    """
    xy = np.asarray(xy, dtype=float)
    acts = np.asarray(acts, dtype=np.float32)
    labels = np.asarray(labels)
    ok = np.isfinite(xy).all(axis=1)
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        return []
    lo, hi = xy[idx].min(axis=0), xy[idx].max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    ij = np.minimum(((xy[idx] - lo) / span * grid).astype(int), grid - 1)
    rows, cols = grid - 1 - ij[:, 1], ij[:, 0]  # y grows upwards, like the scatter plot
    key = rows * grid + cols
    cells = []
    for k in np.unique(key):
        members = idx[key == k]
        centre = acts[members].mean(axis=0)
        nearest = members[np.argmin(((acts[members] - centre) ** 2).sum(axis=1))]
        labs = labels[members]
        labs = labs[labs >= 0]
        label = _mode(labs)
        cells.append(Cell(int(k // grid), int(k % grid), int(nearest), len(members), label))
    return cells


def _mode(labels) -> int:
    """The most common label (the smallest on ties; -1 when empty), without arrays sized by the label."""
    if not len(labels):
        return -1
    values, counts = np.unique(labels, return_counts=True)
    return int(values[counts.argmax()])


def atlas_image(cells, grid, thumbnails, colours, cell_px=48):
    """Draw the atlas: each cell's thumbnail framed in its majority class's colour.

    Parameters
    ----------
    cells : list of Cell
    grid : int
    thumbnails : mapping of int to uint8 array (h, w, C)
        Keyed by ``Cell.member``.
    colours : mapping of int to RGB floats
        Label -> frame colour (missing = grey).
    """
    from PIL import Image

    pad = 2
    canvas = Image.new("RGB", (grid * cell_px, grid * cell_px), (250, 250, 250))
    inner = cell_px - 2 * pad
    for cell in cells:
        thumb = thumbnails.get(cell.member)
        if thumb is None:
            continue
        colour = tuple(int(255 * v) for v in colours.get(cell.label, (0.62, 0.62, 0.62)))
        x, y = cell.col * cell_px, cell.row * cell_px
        canvas.paste(Image.new("RGB", (cell_px - 1, cell_px - 1), colour), (x, y))
        img = to_pil(thumb).convert("RGB").resize((inner - 1, inner - 1), Image.Resampling.BILINEAR)
        canvas.paste(img, (x + pad, y + pad))
    return canvas


def to_pil(array):
    """A uint8 ``(h, w, 1|3)`` array as a Pillow image."""
    from PIL import Image

    a = np.asarray(array, dtype=np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return Image.fromarray(a)
