"""The static, offline HTML report of a run: ``reports/<name>/index.html`` and pages beside it.

- :mod:`.data` — the run's tables and model outputs, read from the run directory only;
- :mod:`.pages` — one builder per page kind (index, layer, unit gallery, class) turning tables
  into template values;
- :mod:`.figures` — matplotlib figures; :mod:`.atlas` — activation atlases;
- :mod:`.assets` — every image file of the report (thumbnails come from the run's stored
  ``thumbnails`` array, never the user's files);
- :mod:`.build` — renders the Jinja2 templates (autoescaped) into ``<out>.partial`` and
  publishes the folder by rename;
- ``templates/`` and ``static/style.css`` — the pages' HTML and their one stylesheet.

Pages carry a Content-Security-Policy that allows no script and no network; links are relative,
so the folder opens from ``file://`` and can be zipped and mailed.
"""


def build_report(run_dir, out_dir, **kwargs):
    """See :func:`pipeline.report.build.build_report`."""
    from pipeline.report.build import build_report as build

    return build(run_dir, out_dir, **kwargs)
