"""The pipeline's stages in order. Each module defines ``STAGE``; heavy imports stay inside ``run``."""
from pipeline.config import STAGES


def all_stages():
    """Every available stage, in pipeline order."""
    from pipeline.stages import cluster, embed, extract, maximize, probe, report

    by_name = {m.STAGE.name: m.STAGE for m in (cluster, embed, extract, maximize, probe, report)}
    return [by_name[name] for name in STAGES]
