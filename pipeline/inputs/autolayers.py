"""``layers: auto``: which layers to analyse, and why.

Small models (at most ``max_layers`` convolution/dense layers) keep every convolution and dense
layer. Deep models — the ``keras.applications`` families and their fine-tuned descendants, with
50–250 layers and 10k–30k units — get a representative set spread over depth instead, because
every analysed layer multiplies the cost of every later stage:

* the **stem** (first convolution);
* **block outputs**: the result of each residual addition or concatenation (after its activation
  when a lone activation follows it, as in ResNet's ``*_out``), and the tensors that feed a
  residual shortcut (MobileNetV2's and EfficientNet's projection outputs, DenseNet's block
  inputs);
* the **end of every resolution stage** (the last block output at each spatial size);
* the **last feature map** and the **logits** (the last dense layer);

then, up to ``max_layers``, further block outputs evenly spaced over depth. Without merges (a
plain deep CNN) the convolutions themselves are the blocks. Pure functions of the layer list and
the graph's edges; no TensorFlow here.
"""
from __future__ import annotations

import fnmatch
from collections import defaultdict

import numpy as np

from pipeline.errors import UserError

#: Layers whose units are learned feature detectors (the small-model rule).
LEARNED_TYPES = {"Conv2D", "SeparableConv2D", "DepthwiseConv2D", "Conv2DTranspose", "Dense",
                 "Conv2d", "MatMul", "DepthwiseConv2dNative"}
_MERGES = {"Add": "residual add", "AddV2": "residual add", "Average": "residual add",
           "Concatenate": "concatenation", "ConcatV2": "concatenation"}
_ACTIVATIONS = {"Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "Relu", "Relu6"}
MAX_LAYERS = 16
NO_LAYER = "no analysable layer found (run `python -m pipeline layers MODEL`)"


def auto_layers(infos, edges=None, max_layers=MAX_LAYERS):
    """The layers ``layers: auto`` analyses, each with the reason it was chosen.

    Parameters
    ----------
    infos : list of LayerInfo
        Every layer in model order.
    edges : iterable of (str, str), optional
        ``(producer, consumer)`` layer-name pairs of the model graph. Without them, block outputs
        are the merge layers alone.
    max_layers : int, default=16
        A model with more convolution/dense layers than this is "deep".

    Returns
    -------
    list of (str, str)
        ``(layer name, reason)`` in model order; empty when nothing is analysable.
    """
    live = [i for i in infos if i.analysable]
    learned = [i for i in live if i.type in LEARNED_TYPES]
    if not learned:
        return [(i.name, "analysable (the model has no convolution or dense layer)") for i in live]
    if len(learned) <= max_layers:
        return [(i.name, "convolution/dense layer") for i in learned]
    order = {i.name: k for k, i in enumerate(infos)}
    blocks = _block_outputs(live, edges) or {i.name: "convolution (no residual blocks found)"
                                             for i in learned if _is_map(i)}
    chosen = _landmarks(live, learned, blocks)
    _fill(chosen, blocks, order, max_layers)
    return sorted(chosen.items(), key=lambda item: order[item[0]])


def _is_map(info):
    return info.output_shape is not None and len(info.output_shape) == 3


def _block_outputs(live, edges):
    """``{name: reason}`` for merge outputs and residual-shortcut sources, in model order."""
    by_name = {i.name: i for i in live}
    consumers, producers = defaultdict(list), defaultdict(list)
    for a, b in edges or ():
        consumers[a].append(b)
        producers[b].append(a)
    found = {}
    for info in live:
        kind = _MERGES.get(info.type)
        if kind is None or not _is_map(info):
            continue
        after = consumers.get(info.name, [])
        out = info.name
        if len(after) == 1 and after[0] in by_name and by_name[after[0]].type in _ACTIVATIONS:
            out = after[0]  # the block's output is the activation of the sum (ResNet's *_out)
        found[out] = f"block output ({kind})"
        for src in producers.get(info.name, []):
            # a tensor that feeds a shortcut *and* a new branch ends the previous block
            if src in by_name and _is_map(by_name[src]) and len(consumers[src]) > 1 and src not in found:
                found[src] = "block output (feeds a shortcut)"
    order = {i.name: k for k, i in enumerate(live)}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0]]))


def _landmarks(live, learned, blocks):
    """Layers always kept on a deep model: stem, resolution-stage ends, last feature map, logits."""
    chosen = {}
    stem = next((i for i in learned if _is_map(i)), None)
    if stem is not None:
        chosen[stem.name] = "stem (first convolution)"
    by_name = {i.name: i for i in live}
    stage_end = {}
    for name in blocks:  # in model order: the last block at each spatial size wins
        stage_end[tuple(by_name[name].output_shape[:2])] = name
    for (h, w), name in stage_end.items():
        chosen.setdefault(name, f"{blocks[name]}; end of the {h}x{w} stage")
    maps = [i for i in live if _is_map(i)]
    if maps:
        last = maps[-1].name
        chosen[last] = f"{chosen[last]}; last feature map" if last in chosen else "last feature map"
    dense = [i for i in learned if not _is_map(i)]
    if dense:
        chosen[dense[-1].name] = "logits (last dense layer)"
    return chosen


def _fill(chosen, blocks, order, max_layers):
    """Add block outputs evenly spaced over depth until ``max_layers`` are chosen (in place)."""
    if len(chosen) > max_layers:  # more stages than room: keep the ends, thin the middle evenly
        names = sorted(chosen, key=order.get)
        keep = {names[int(round(k))] for k in np.linspace(0, len(names) - 1, max_layers)}
        for name in names:
            if name not in keep:
                del chosen[name]
        return
    rest = [b for b in blocks if b not in chosen]
    room = max_layers - len(chosen)
    if room <= 0 or not rest:
        return
    if room < len(rest):
        picks = np.unique(np.rint(np.linspace(0, len(rest) - 1, room + 2)[1:-1]).astype(int))
    else:
        picks = range(len(rest))
    for k in picks:
        name = rest[int(k)]
        chosen.setdefault(name, f"{blocks[name]}; spread over depth")


def choose(model, spec):
    """The layers a run analyses, with reasons: ``layers`` (auto, all or patterns) on a loaded model.

    Parameters
    ----------
    model : KerasModel or GraphModel
        Loaded through :func:`pipeline.inputs.models.load_model` (its ``layers`` list of LayerInfo).
    spec : "auto", "all" or list of str

    Returns
    -------
    list of (str, str)
        ``(name, reason)`` in model order.
    """
    from pipeline.backend.keras_internals import model_edges

    if spec == "auto":
        picks = auto_layers(model.layers, model_edges(model))
        if not picks:
            raise UserError(NO_LAYER)
        return picks
    why = "layers: all" if spec == "all" else "listed in layers"
    return [(n, why) for n in select_layers(model.layers, spec)]


def summary_line(infos, choice, spec):
    """One line saying how many layers were chosen out of how many, and by which rule."""
    live = sum(1 for i in infos if i.analysable)
    learned = sum(1 for i in infos if i.analysable and i.type in LEARNED_TYPES)
    if spec == "auto" and learned > MAX_LAYERS:
        rule = (f"deep model ({learned} convolution/dense layers): stem, block outputs spread over depth, "
                f"stage ends, last feature map and logits; `layers: all` keeps all {live}")
    elif spec == "auto":
        rule = "every convolution/dense layer"
    else:
        rule = "as configured"
    return f"{len(choice)} of {live} analysable layers ({rule})"


def select_layers(infos, spec, edges=None) -> list[str]:
    """Resolve ``layers: auto``, ``all`` or a list of names / glob patterns to layer names.

    Parameters
    ----------
    infos : list of LayerInfo
    spec : "auto", "all" or list of str
        ``auto``: see :func:`auto_layers`; ``all``: every analysable layer.
    edges : list of (str, str), optional
        The model graph (:func:`pipeline.backend.keras_internals.model_edges`), used by ``auto``.

    Raises
    ------
    UserError
        A name or pattern that matches nothing, or a matched layer that is not analysable.
    """
    if spec in ("auto", "all"):
        chosen = ([name for name, _ in auto_layers(infos, edges)] if spec == "auto"
                  else [i.name for i in infos if i.analysable])
        if not chosen:
            raise UserError(NO_LAYER)
        return chosen
    by_name = {i.name: i for i in infos}
    chosen = []
    for pattern in spec:
        hits = [i.name for i in infos if fnmatch.fnmatchcase(i.name, pattern)]
        if not hits:
            raise UserError(f"layer '{pattern}' matches no layer of the model "
                            "(run `python -m pipeline layers MODEL` to list them)")
        if pattern in by_name and not by_name[pattern].analysable:
            raise UserError(f"layer '{pattern}' cannot be analysed: {by_name[pattern].reason}")
        chosen += [h for h in hits if by_name[h].analysable and h not in chosen]
    return chosen
