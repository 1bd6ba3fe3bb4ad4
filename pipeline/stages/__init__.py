"""The pipeline's stages in order. Each module defines ``STAGE``; heavy imports stay inside ``run``."""


def all_stages():
    """Every available stage, in pipeline order."""
    from pipeline.stages import cluster, embed, extract, maximize, report

    return [extract.STAGE, embed.STAGE, cluster.STAGE, maximize.STAGE, report.STAGE]
