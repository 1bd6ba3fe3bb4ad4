"""What the remedy adds to the remedied model's run directory (the rest of it is a normal run)."""

MODEL = "model.keras"                     # the fine-tuned copy, saved with plain Keras
SUMMARY = "remedy.json"                   # cue, augmentations, settings, split sizes, headline figures, seconds
SPLIT = "remedy_split.parquet"            # index, label, split (fine-tuned | held-out)
VERDICTS = "remedy_verdicts.parquet"      # per class, held-out images: verdicts and cue losses before / after
ACCURACY = "remedy_accuracy.parquet"      # per split and pass: accuracy before / after, paired change, CIs
CLUSTERS = "remedy_clusters.parquet"      # the original's clusters whose cue sensitivity changed most
HISTORY = "remedy_history.parquet"        # per fine-tune epoch: loss, accuracy, counterfactual images, seconds
PAGE = "before-after"                     # the offline page (index.html, style.css, img/)
REPORT = "report"                         # the remedied run's own report
