"""`layers: auto`: all conv/dense layers of a small model, a representative set of a deep one."""
import pytest

import zoo
from pipeline.inputs.autolayers import auto_layers, choose
from pipeline.inputs.modelinfo import LayerInfo
from pipeline.inputs.models import KerasModel


def _residual_chain(blocks, size=32):
    """A toy deep graph as LayerInfo + edges: stem conv, `blocks` residual blocks, halving twice."""
    infos = [LayerInfo("stem", "Conv2D", (size, size, 8), True)]
    edges, prev = [], "stem"
    for b in range(blocks):
        s = size // (2 ** (3 * b // blocks))
        a, c, add = f"b{b}_conv1", f"b{b}_conv2", f"b{b}_add"
        infos += [LayerInfo(a, "Conv2D", (s, s, 8), True), LayerInfo(c, "Conv2D", (s, s, 8), True),
                  LayerInfo(add, "Add", (s, s, 8), True)]
        edges += [(prev, a), (a, c), (c, add), (prev, add)]
        prev = add
    infos += [LayerInfo("gap", "GlobalAveragePooling2D", (8,), True), LayerInfo("logits", "Dense", (10,), True)]
    edges += [(prev, "gap"), ("gap", "logits")]
    return infos, edges


def test_a_small_model_keeps_every_convolution_and_dense_layer():
    model = KerasModel(zoo.sequential(), "seq")
    assert [n for n, _ in choose(model, "auto")] == ["conv_a", "conv_b", "out"]


def test_a_deep_model_gets_at_most_16_layers_spread_over_depth_with_reasons():
    infos, edges = _residual_chain(30)
    picks = dict(auto_layers(infos, edges))
    assert len(picks) <= 16
    assert picks["stem"].startswith("stem") and picks["logits"].startswith("logits")
    assert all(name.endswith("_add") for name in picks if name not in ("stem", "logits"))
    blocks = sorted(int(n[1:].split("_")[0]) for n in picks if n.endswith("_add"))
    assert blocks[-1] == 29 and blocks[0] <= 3, "the chosen blocks span the whole depth"
    ends = [n for n, why in picks.items() if "end of the" in why]
    assert len(ends) == 3, "one end per resolution stage (32, 16, 8)"


def test_without_graph_edges_merges_still_count_as_block_outputs():
    infos, _ = _residual_chain(30)
    picks = dict(auto_layers(infos, None))
    assert len(picks) <= 16 and sum(n.endswith("_add") for n in picks) >= 10


def test_all_keeps_every_analysable_layer():
    model = KerasModel(zoo.sequential(), "seq")
    assert len(choose(model, "all")) == sum(i.analysable for i in model.layers)


@pytest.mark.parametrize("arch", ["MobileNetV2", "ResNet50"])
def test_keras_applications_pick_block_outputs_stage_ends_and_logits(arch):
    import keras

    build = getattr(keras.applications, arch)
    extra = {"alpha": 0.35} if arch == "MobileNetV2" else {}
    model = KerasModel(build(input_shape=(64, 64, 3), weights=None, classes=5, **extra), arch)
    picks = dict(choose(model, "auto"))
    assert 8 <= len(picks) <= 16
    assert any(why.startswith("stem") for why in picks.values())
    assert picks["predictions"].startswith("logits")
    assert sum("block output" in why for why in picks.values()) >= 8
    assert len({model.layers[[i.name for i in model.layers].index(n)].output_shape[:2] for n in picks
                if "end of the" in picks[n]}) >= 3
