"""The steps around the batch loop, the same for both engines: list and check the images first,
publish the arrays last. Both go through the run's store.
"""
from __future__ import annotations

from pipeline.errors import UserError
from pipeline.extraction.plan import PROGRESS, ZARR
from pipeline.inputs.dataset import build_dataset


def begin(ctx, plan, size, channels):
    """Fresh start: validate the dataset, write its tables, clear any stale partial arrays."""
    cfg, store = ctx.cfg, ctx.store
    store.discard_partial(ZARR)
    ctx.log("extract: checking images…")
    dataset, skipped, classes = build_dataset(cfg.data, size, channels, cfg.seed)
    ctx.catalog.write("dataset", dataset)
    ctx.catalog.write("skipped", skipped)
    if len(skipped):
        ctx.log(f"extract: {len(skipped)} input(s) skipped, reasons in {store.path('skipped.csv')}")
    # Kept with the progress: a resumed run does not list the images again, yet reports the classes.
    progress = {"plan": plan, "done": [], "nonfinite": {}, "classes": classes}
    store.write_json(PROGRESS, progress)
    return progress


def dataset_of(ctx):
    """The dataset table written by :func:`begin`; a one-line error when every input was skipped."""
    dataset = ctx.catalog.read("dataset")
    if len(dataset) == 0:
        raise UserError("no usable images: every input was skipped (see skipped.csv)")
    return dataset


def finish(ctx, root, progress, names, n):
    """Record the non-finite counts, publish ``activations.zarr`` and return the stage summary."""
    store = ctx.store
    bad = {k: v for k, v in progress["nonfinite"].items() if v}
    root.attrs["nonfinite"] = progress["nonfinite"]
    store.publish_dir(ZARR)
    store.remove(PROGRESS)
    for layer, count in bad.items():
        ctx.log(f"warning: layer {layer} produced {count} NaN/Inf values (stored as they are; "
                "later stages treat affected units as dead)")
    # compute: the batch size and XLA decision the arrays were computed with (extraction.tuning)
    return {"images": int(n), "skipped": int(len(ctx.catalog.read("skipped"))),
            "layers": names, "nonfinite": bad, "classes": progress["classes"],
            "compute": progress.get("compute")}
