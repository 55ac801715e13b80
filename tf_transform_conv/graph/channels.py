"""Which channels of a model's tensors are the same channel: one analysis for every pass.

Structured removal needs to know which output channels must go together
(every convolution writing into one residual stream); the export pass that
keeps grouped layers' channel order needs to know which tensors must share
one channel order. Both are the same question, answered here once.

Every channel of every tensor of the model gets a *class*. A caller's
`classify(layer, node) -> (kind, reason)` says how each layer call relates
its inputs' channels to its outputs':

- `"producer"` (a convolution, `Dense`): its output channels are new classes;
- `"channelwise"` (batch norm, activations, pooling, ...) and any kind the
  caller lists in `passes` (e.g. `"batch_norm"`, `"depthwise"`): output
  channel `i` is input channel `i`;
- `"merge"` (`Add` and the other element-wise merges): channel `i` of every
  input and of the output are one class (a union-find joins them);
- `"concat"`: the output's classes are the inputs' side by side;
- `"pad"`: a `ChannelPad` (`layer.padding == (before, after)`): new classes
  before and after the input's;
- `"opaque"`: anything the caller does not follow: new classes for its
  outputs, and the call is recorded with the caller's reason.

A layer called more than once is opaque ("a layer called more than once").
With `descend=True` a nested Sequential or Functional model called once is
walked into: its inputs take the classes of the tensors it is called on (a
`"nested"` call records that entry), and its outputs those of its inner
outputs; otherwise it is opaque. Operations that are not layers are opaque.

Two tensors share a *space* (one channel order) when their channels are the
same classes in the same order: `space(key)`.
"""

import dataclasses

import keras
import numpy as np

from tf_transform_conv import _compat
from tf_transform_conv.graph.nodes import graph_nodes
from tf_transform_conv.graph.nodes import is_graph_model

__all__ = ["CHANNELWISE_LAYERS", "ELEMENTWISE_MERGES", "ChannelGraph", "LayerCall"]

# Layers that act on each channel separately at inference, without weights
# (pooling and padding only in channels_last, which callers check).
CHANNELWISE_LAYERS = (
    keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU,
    keras.layers.Dropout, keras.layers.SpatialDropout2D, keras.layers.GaussianNoise,
    keras.layers.GaussianDropout, keras.layers.AlphaDropout,
    keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D,
    keras.layers.ZeroPadding2D, keras.layers.Cropping2D, keras.layers.UpSampling2D,
    keras.layers.Identity, keras.layers.ActivityRegularization,
)

# Merges that combine their inputs channel by channel.
ELEMENTWISE_MERGES = (
    keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply,
    keras.layers.Average, keras.layers.Maximum, keras.layers.Minimum,
)


@dataclasses.dataclass
class LayerCall:
    """One call of the flattened graph.

    Attributes:
        layer: the layer (or operation, or nested model) called.
        node: its Keras graph node.
        path: the layer's name, prefixed `"nested/"` inside a nested model.
        kind: what `classify` said (see the module docstring), or
            `"nested"` for the entry into a nested model.
        reason: why the call is opaque ("" otherwise).
        inputs: the keys of its input tensors (`ChannelGraph.key`).
        outputs: the keys of its output tensors.
        input_shapes: the input shapes without the batch dimension.
    """

    layer: object
    node: object
    path: str
    kind: str
    reason: str
    inputs: list
    outputs: list
    input_shapes: list


def channel_count(tensor):
    """The size of a tensor's last axis (0 when unknown or scalar)."""
    shape = tuple(tensor.shape)
    return int(shape[-1]) if shape and shape[-1] is not None else 0


class ChannelGraph:
    """The channel classes of every tensor of a Sequential or Functional model.

    Args:
        model: a built Sequential or Functional model.
        classify: `(layer, node) -> (kind, reason)` for each layer called
            once (see the module docstring for the kinds).
        descend: whether to walk into nested graph models (else they are
            opaque).
        passes: further kinds that pass channels through as
            `"channelwise"` does (a caller's finer names for its own use).

    Attributes:
        inputs, outputs: the model's input and output tensors (flat lists).
        calls: list of `LayerCall`, in running order.
        classes: dict, tensor key -> int array of class ids, one per channel.
    """

    def __init__(self, model, classify, descend=True, passes=()):
        self.classify = classify
        self.descend = descend
        self.passes = ("channelwise",) + tuple(passes)
        self.parent = []
        self.classes = {}
        self.alias = {}  # id of an inner tensor of a nested model -> key of the outer one
        self.calls = []
        self.uses = {}
        graph = _compat.functional_graph(model)
        self.inputs = keras.tree.flatten(graph.inputs)
        self.outputs = keras.tree.flatten(graph.outputs)
        self._count_uses(graph)
        for tensor in self.inputs:
            self.classes[id(tensor)] = self._fresh(channel_count(tensor))
        self._walk(graph, "")

    # --- union-find over channel classes

    def _fresh(self, count):
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, c):
        """The representative of class `c`."""
        root = c
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[c] != root:
            self.parent[c], c = root, self.parent[c]
        return root

    def roots(self, ids):
        """The representatives of an array of class ids."""
        return np.array([self.find(int(c)) for c in ids], dtype=np.int64)

    def _union(self, a, b):
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    # --- tensors

    def key(self, tensor):
        """The key of a symbolic tensor (an inner input of a nested model maps to its outer tensor)."""
        return self.alias.get(id(tensor), id(tensor))

    def space(self, key):
        """A hashable name of the space of tensor `key`: its channels' classes, in order."""
        return self.roots(self.classes[key]).tobytes()

    # --- walking the graph

    def _count_uses(self, model):
        for node in graph_nodes(model):
            layer = node.operation
            self.uses[id(layer)] = self.uses.get(id(layer), 0) + 1
            if (self.descend and isinstance(layer, keras.Model)
                    and self.uses[id(layer)] == 1 and is_graph_model(layer)):
                self._count_uses(layer)

    def _walk(self, model, prefix):
        for node in graph_nodes(model):
            layer = node.operation
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if not isinstance(layer, keras.layers.Layer):
                self._record(node, prefix, "opaque", f"operation {type(layer).__name__}")
                continue
            if isinstance(layer, keras.Model) and self.descend:
                if self.uses[id(layer)] > 1 or not is_graph_model(layer):
                    self._record(node, prefix, "opaque", "a nested model called more than once"
                                 if self.uses[id(layer)] > 1 else "a subclassed model")
                    continue
                self._record(node, prefix, "nested", "")
                for inner, outer in zip(keras.tree.flatten(layer.inputs), node.input_tensors):
                    self.alias[id(inner)] = self.key(outer)
                self._walk(layer, prefix + layer.name + "/")
                for inner, outer in zip(keras.tree.flatten(layer.outputs), node.output_tensors):
                    self.alias[id(outer)] = self.key(inner)
                continue
            if self.uses[id(layer)] > 1:
                kind, reason = "opaque", "a layer called more than once"
            else:
                kind, reason = self.classify(layer, node)
            self._record(node, prefix, kind, reason)

    def _record(self, node, prefix, kind, reason):
        layer = node.operation
        ins = [self.key(t) for t in node.input_tensors]
        outs = [id(t) for t in node.output_tensors]
        inputs = [self.classes[k] for k in ins]
        if kind == "opaque":
            for tensor in node.output_tensors:
                self.classes[id(tensor)] = self._fresh(channel_count(tensor))
        elif kind == "producer":
            self.classes[outs[0]] = self._fresh(channel_count(node.output_tensors[0]))
        elif kind in self.passes:
            self.classes[outs[0]] = inputs[0]
        elif kind == "merge":
            for other in inputs[1:]:
                for a, b in zip(inputs[0], other):
                    self._union(a, b)
            self.classes[outs[0]] = inputs[0]
        elif kind == "concat":
            self.classes[outs[0]] = np.concatenate(inputs)
        elif kind == "pad":
            before, after = layer.padding
            self.classes[outs[0]] = np.concatenate(
                [self._fresh(before), inputs[0], self._fresh(after)])
        elif kind != "nested":
            raise ValueError(f"Unknown channel kind {kind!r} for '{layer.name}'.")
        self.calls.append(LayerCall(
            layer, node, prefix + getattr(layer, "name", type(layer).__name__), kind, reason,
            ins, outs, [tuple(t.shape)[1:] for t in node.input_tensors]))
