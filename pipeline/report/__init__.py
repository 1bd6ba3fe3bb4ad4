"""The static, offline HTML report of a run: ``reports/<name>/index.html`` and pages beside it.

- :mod:`.data` — the run's tables and model outputs, read from the run directory only;
- :mod:`.pages` — one builder per page kind (index, layer, unit gallery, class) turning tables
  into template values;
- :mod:`.shortcuts` — the shortcut finder's findings ("Is the model relying on the wrong cue?") and
  the cue sensitivities on unit and cluster cards;
- :mod:`.figures` — matplotlib figures; :mod:`.atlas` — activation atlases;
- :mod:`.assets` — every image file of the report (thumbnails come from the run's stored
  ``thumbnails`` array, never the user's files);
- :mod:`.build` — renders the Jinja2 templates (autoescaped) into ``<out>.partial`` and
  publishes the folder by rename;
- ``templates/`` and ``static/style.css`` — the pages' HTML and their one stylesheet.

- :mod:`.explorer` — the interactive maps of the layer pages (BokehJS stored in ``js/``, per-layer data
  in ``explorer/``, hover thumbnails in sprite sheets under ``img/sprites/``).

Pages carry a Content-Security-Policy that allows no network; links are relative, so the folder opens
from ``file://`` and can be zipped and mailed. Pages without the explorer allow no script at all;
layer pages with it allow scripts from the report folder only (``script-src 'self'``: no inline script,
no eval) and inline styles (BokehJS styles its views with ``<style>`` elements).
"""


def build_report(run_dir, out_dir, **kwargs):
    """See :func:`pipeline.report.build.build_report`."""
    from pipeline.report.build import build_report as build

    return build(run_dir, out_dir, **kwargs)
