"""The remedy: fine-tune a copy of a model with counterfactual augmentation aimed at the cue the
shortcut finder flagged, then analyse the copy on the same images and show before -> after.

``augment`` (seeded per image and epoch, composable counterfactuals), ``split`` (the seeded,
class-stratified fine-tune / held-out split), ``finetune`` (the deterministic training loop),
``evaluate`` (before -> after tables) are pure; ``run`` does the I/O of ``python -m pipeline remedy``
and ``page`` writes its offline page.
"""
