"""``pipeline.load_run(path)``: a finished run's tables as DataFrames and its arrays as lazy zarr arrays."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import pandas as pd

from pipeline.errors import UserError
from pipeline.storage.arrays import array_key
from pipeline.storage.catalog import TABLES, Catalog
from pipeline.storage.store import RunStore



class Run:
    """A run directory opened for analysis.

    Tables load on first access (``run.clusters``, ``run.dataset`` …; ``None`` when the stage
    that writes them has not run). Arrays stay on disk until sliced.

    Examples
    --------
    >>> run = pipeline.load_run("data/runs/demo")          # doctest: +SKIP
    >>> acts = run.activations("conv3", "mean")[:]          # (N, C) numpy array
    >>> run.clusters.query("layer == 'conv3' and not dead")
    """

    def __init__(self, path):
        self.store = RunStore(path)
        self.catalog = Catalog(self.store)
        self.path = Path(path)
        if not self.catalog.exists("manifest"):
            raise UserError(f"{path} is not a run directory (no manifest.json)")

    def __getattr__(self, name):
        if name in TABLES:
            value = self.catalog.read(name)
            self.__dict__[name] = value
            return value
        raise AttributeError(name)

    @cached_property
    def manifest(self) -> dict:
        return self.catalog.read("manifest")

    @cached_property
    def arrays(self):
        """The ``activations.zarr`` root group (lazy)."""
        return self.catalog.require("activations")

    @property
    def layers_info(self) -> dict:
        """Per extracted layer: kind (map/vector), output shape, type, group path in the store."""
        return dict(self.arrays.attrs["layers"])

    @property
    def layer_names(self) -> list:
        return list(self.arrays.attrs["layer_order"])

    def activations(self, layer, reduction="mean"):
        """The lazy ``(N, C)`` array of ``layer``; vector layers ignore ``reduction``.

        Parameters
        ----------
        layer : str
        reduction : {"mean", "max", "spatial", "spatial_pos"}
        """
        info = self.layers_info.get(layer)
        if info is None:
            raise UserError(f"layer '{layer}' was not extracted (extracted: {', '.join(self.layer_names)})")
        try:
            return self.arrays[array_key(info, reduction)]
        except KeyError:
            raise UserError(f"layer '{layer}' has no '{reduction}' array") from None

    def logits(self):
        return self.arrays["logits"]

    def table(self, name) -> pd.DataFrame | None:
        return getattr(self, name)
