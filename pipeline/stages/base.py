"""What a stage is: its declaration (:class:`Stage`) and what it receives when it runs (:class:`Context`).

The runner (:mod:`pipeline.orchestration.runner`) decides which stages run; a stage module only
declares itself with these.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

from pipeline.config import Config
from pipeline.storage.catalog import Catalog
from pipeline.storage.store import RunStore


@dataclass(frozen=True)
class Stage:
    """A step of the pipeline.

    Attributes
    ----------
    name : str
    deps : tuple of str
        Upstream stages whose outputs this stage reads.
    params : callable
        ``params(cfg) -> dict``: the config values that change the result.
    outputs : tuple of str
        Catalog names (:mod:`pipeline.storage.catalog`) of the artifacts that must exist once the
        stage is done.
    run : callable
        ``run(ctx) -> Outputs | dict``: computes, and returns its tables and JSON for the runner to
        write (:class:`Outputs`) with a summary for the manifest; stages that stream large results
        (arrays, images) write them as they go through ``ctx.catalog`` and return the summary.
    inputs : callable
        ``inputs(cfg) -> dict``: hashes of external files the stage reads (model, dataset).
    version : str
        Bumped by hand only for a change the code hash cannot see; the code version also hashes
        the stage module and every `pipeline` module it imports (:mod:`pipeline.codeversion`).
    optional : tuple of str
        Upstream stages read when present (the report shows "not computed" otherwise): they are
        not required, but a rerun of one makes this stage stale.
    """

    name: str
    deps: tuple
    params: Callable
    outputs: tuple
    run: Callable
    inputs: Callable = lambda cfg: {}
    version: str = "1"
    optional: tuple = ()


@dataclass
class Context:
    """What a stage's runner-side code gets: the config, the store and a logger."""

    cfg: Config
    store: RunStore
    debug: bool = False
    notes: list = field(default_factory=list)

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    @property
    def catalog(self) -> Catalog:
        """The run directory's artifacts by name: the only way a stage reads or writes them."""
        return Catalog(self.store)


@dataclass
class Outputs:
    """What a stage returns: artifacts by catalog name, written by the runner, and its summary.

    Attributes
    ----------
    artifacts : dict
        ``{name: DataFrame | dict | None}``; ``None`` removes an artifact a previous run left
        (e.g. a table that no longer applies).
    summary : dict
        Recorded in ``manifest.json`` under the stage.
    """

    artifacts: dict
    summary: dict = field(default_factory=dict)
