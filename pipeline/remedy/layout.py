"""What the remedy adds to the remedied model's run directory (the rest of it is a normal run).

The names are the storage catalog's (:mod:`pipeline.storage.catalog`, stage ``remedy``).
"""
from pipeline.storage.catalog import path

MODEL = path("remedy_model")
SUMMARY = path("remedy_summary")
SPLIT = path("remedy_split")
VERDICTS = path("remedy_verdicts")
ACCURACY = path("remedy_accuracy")
CLUSTERS = path("remedy_clusters")
HISTORY = path("remedy_history")
PAGE = path("remedy_page")
REPORT = path("remedy_report")
