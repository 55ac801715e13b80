"""`graph.channels.ChannelGraph`: the one analysis of which channels of a model's tensors are the same."""

import keras
import numpy as np
import pytest

from tf_transform_conv.graph.channels import ChannelGraph
from tf_transform_conv.graph.groups import GroupAnalysis
from tf_transform_conv.graph.groups import channel_groups
from tf_transform_conv.layers import ChannelPad

KINDS = {
    keras.layers.Conv2D: "producer",
    keras.layers.BatchNormalization: "channelwise",
    keras.layers.ReLU: "channelwise",
    keras.layers.Add: "merge",
    keras.layers.Concatenate: "concat",
    ChannelPad: "pad",
}


def classify(layer, node):
    kind = KINDS.get(type(layer))
    return (kind, "") if kind else ("opaque", "not followed")


def residual_model():
    inputs = keras.Input((8, 8, 4))
    a = keras.layers.Conv2D(6, 3, padding="same", name="a")(inputs)
    b = keras.layers.BatchNormalization(name="bn")(a)
    c = keras.layers.Conv2D(6, 3, padding="same", name="c")(keras.layers.ReLU(name="r")(b))
    s = keras.layers.Add(name="add")([b, c])
    p = ChannelPad((1, 1), name="pad")(s)
    d = keras.layers.Conv2D(8, 1, name="d")(p)
    cat = keras.layers.Concatenate(name="cat")([d, p])
    out = keras.layers.Flatten(name="flat")(cat)
    return keras.Model(inputs, out)


def test_spaces_follow_channelwise_layers_and_merges_not_producers():
    model = residual_model()
    graph = ChannelGraph(model, classify)
    key = {call.path: call for call in graph.calls}
    space = lambda path: graph.space(key[path].outputs[0])  # noqa: E731
    assert space("a") == space("bn") == space("r") == space("c") == space("add")
    assert space("d") != space("add")
    pad = graph.roots(graph.classes[key["pad"].outputs[0]])
    assert pad[1:-1].tolist() == graph.roots(graph.classes[key["add"].outputs[0]]).tolist()
    assert len(set(pad.tolist())) == 8  # the two padded channels are new
    cat = graph.roots(graph.classes[key["cat"].outputs[0]])
    d = graph.roots(graph.classes[key["d"].outputs[0]])
    assert cat.tolist() == d.tolist() + pad.tolist()
    assert key["flat"].kind == "opaque" and key["flat"].reason == "not followed"


def test_a_layer_called_twice_is_opaque_whatever_its_kind():
    inputs = keras.Input((8, 8, 4))
    conv = keras.layers.Conv2D(4, 3, padding="same", name="shared")
    model = keras.Model(inputs, conv(conv(inputs)))
    graph = ChannelGraph(model, classify)
    assert [(c.kind, c.reason) for c in graph.calls] == [
        ("opaque", "a layer called more than once")] * 2


def test_nested_models_are_walked_into_or_opaque():
    inner_in = keras.Input((8, 8, 4))
    inner = keras.Model(inner_in, keras.layers.ReLU(name="inner_relu")(inner_in), name="inner")
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    model = keras.Model(inputs, keras.layers.Add(name="add")([inner(x), x]))
    walked = ChannelGraph(model, classify, descend=True)
    assert [(c.path, c.kind) for c in walked.calls] == [
        ("a", "producer"), ("inner", "nested"), ("inner/inner_relu", "channelwise"),
        ("add", "merge")]
    flat = ChannelGraph(model, classify, descend=False)
    assert [(c.path, c.kind) for c in flat.calls][1] == ("inner", "opaque")


def test_an_unknown_kind_is_an_error():
    inputs = keras.Input((4, 4, 2))
    model = keras.Model(inputs, keras.layers.ReLU()(inputs))
    with pytest.raises(ValueError, match="Unknown channel kind 'sideways'"):
        ChannelGraph(model, lambda layer, node: ("sideways", ""))


def test_structured_groups_are_built_on_the_same_graph():
    model = residual_model()
    analysis = GroupAnalysis(model)
    assert isinstance(analysis.graph, ChannelGraph)
    groups = {g.name: g for g in channel_groups(model)}
    assert groups["a"].producers == ("a", "c")  # coupled through the residual add
    assert groups["a"].batch_norms == ("bn",)
    assert not groups["a"].prunable  # it reaches the Flatten the analysis does not follow
    assert "flat" in groups["a"].reason
    np.testing.assert_array_equal(analysis.group_roots["a"],
                                  analysis.roots(analysis.classes[analysis.call_of("add").outputs[0]]))
