"""The pipeline's stages in order. Each module defines ``STAGE``; heavy imports stay inside ``run``."""


def all_stages():
    """Every available stage, in pipeline order."""
    from pipeline.stages import cluster, embed, extract, maximize, probe, report

    return [extract.STAGE, embed.STAGE, cluster.STAGE, probe.STAGE, maximize.STAGE, report.STAGE]
