"""The channels structured removal removes together: `channel_groups` and its analysis.

`channel_groups(model)` finds the channels that must be removed together:
the output channels of one convolution, or of every convolution writing into
one residual stream (an `Add`, or another element-wise merge, couples
channel `i` of each of its inputs), followed through the layers that treat
channels one by one (batch norm, activations, pooling, padding, dropout,
depthwise convolutions with `depth_multiplier=1`, `Concatenate` on the
channel axis, the package's `ChannelPad`), on the one channel analysis
`graph.channels.ChannelGraph`.

A group is a set of channel classes reached by producers whose outputs share
a class; its channel order is the order in its widest producer output (in
the CIFAR ResNets' option-A shortcuts, the last stage's stream: the stem's
channels sit in its middle, the padded channels around them), and every
producer in the group must list its channels in that order. Channels that
reach the model's output or input, a layer this module does not follow
(`Flatten` of a map larger than 1x1, `Reshape`, `LayerNormalization`,
custom layers, ...), a layer called more than once, a convolution with
`groups > 1`, or the input of a nested model (whose input shape is fixed;
the groups inside it are followed) make their whole group unprunable, with
the reason in `ChannelGroup.reason`. Only `channels_last` models are
followed (a `channels_first` layer is a layer this module does not follow).
A convolution or `Dense` that is not followed (`channels_first`, grouped,
a depth multiplier other than 1, separable, transposed, called more than
once, ...) still has its own group, unprunable, with the reason.

`GroupAnalysis` (from `analyze_groups`) is what removal, DAFP, the knapsack
and the group saliencies read: the groups, each tensor's place in them, and
the calls of the graph.
"""

import dataclasses

import keras
import numpy as np

from tf_transform_conv.graph.channels import CHANNELWISE_LAYERS
from tf_transform_conv.graph.channels import ELEMENTWISE_MERGES
from tf_transform_conv.graph.channels import ChannelGraph
from tf_transform_conv.graph.channels import channel_count
from tf_transform_conv.graph.nodes import check_graph_model
from tf_transform_conv.layers.channel_pad import ChannelPad
from tf_transform_conv.layers.transform_conv import TransformConv2D

__all__ = ["ChannelGroup", "GroupAnalysis", "analyze_groups", "channel_groups", "dense_weights"]


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that are removed together (one convolution's, or one residual stream's).

    Attributes:
        name: str, the group's name: the name of its first producing
            layer (inside a nested model, prefixed `"nested/layer"`).
        producers: tuple of str, the layers (`Conv2D`, `Dense`,
            `TransformConv2D`) whose output channels are these channels, in
            the order the model runs them.
        consumers: tuple of str, the layers with weights over these channels
            as input channels: the next convolutions, a `Dense` after
            global pooling, depthwise convolutions.
        channels: int, the number of channels of the group (the width of
            its widest producer output).
        prunable: bool, whether `remove_filters` may remove any of them.
        reason: str, why not ("" when prunable).
        batch_norms: tuple of str, the `BatchNormalization` layers that
            normalise these channels.
    """

    name: str
    producers: tuple
    consumers: tuple
    channels: int
    prunable: bool
    reason: str = ""
    batch_norms: tuple = ()


# Activations that mix the channels of a position.
_NOT_CHANNELWISE_ACTIVATIONS = ("softmax", "log_softmax")

# The kinds this module gives layers that pass channels through one by one.
_PASSING = ("batch_norm", "depthwise")


class GroupAnalysis:
    """The channel groups of a model, and where every tensor's channels sit in them.

    Attributes:
        graph: the `ChannelGraph` (kinds: those of `ChannelGraph`, plus
            `"batch_norm"` and `"depthwise"`, which pass channels through).
        groups: list of `ChannelGroup`, in running order of their first
            producers.
        group_roots: dict, group name -> the class ids of its channels, in
            the group's order.
    """

    def __init__(self, model):
        self.model = model
        self.graph = ChannelGraph(model, _kind, descend=True, passes=_PASSING)
        self.blocked = {}  # class id -> reason
        graph = self.graph
        for tensor in graph.inputs:
            self._block(graph.classes[id(tensor)], "the channels of the model's input")
        for call in graph.calls:
            if call.kind == "opaque":
                why = f"they pass through '{call.path}' ({call.reason})"
                for key in call.inputs + call.outputs:
                    self._block(graph.classes[key], why)
            elif call.kind == "nested":
                for key in call.inputs:
                    self._block(graph.classes[key],
                                f"they enter the nested model '{call.path}', "
                                "whose input shape is fixed")
        for tensor in graph.outputs:
            self._block(graph.classes[graph.key(tensor)], "they are the model's output")
        self._make_groups()

    @property
    def calls(self):
        """The graph's calls (`graph.channels.LayerCall`), in running order."""
        return self.graph.calls

    @property
    def classes(self):
        """Tensor key -> class ids of its channels."""
        return self.graph.classes

    def roots(self, ids):
        """The representatives of class ids."""
        return self.graph.roots(ids)

    def _block(self, ids, reason):
        for c in ids:
            self.blocked.setdefault(int(c), reason)

    def _make_groups(self):
        producers = [call for call in self.calls if call.kind == "producer"]
        owner = {}  # root -> index of its group's first producer
        link = list(range(len(producers)))

        def find(i):
            while link[i] != i:
                i = link[i]
            return i

        roots_of = []
        for i, call in enumerate(producers):
            roots = self.roots(self.classes[call.outputs[0]])
            roots_of.append(roots)
            for r in roots:
                j = owner.setdefault(int(r), i)
                a, b = find(i), find(j)
                if a != b:
                    link[max(a, b)] = min(a, b)
        members = {}
        for i in range(len(producers)):
            members.setdefault(find(i), []).append(i)
        blocked_roots = {}
        for c, reason in self.blocked.items():
            blocked_roots.setdefault(self.graph.find(c), reason)
        self.groups, self.group_roots, self.root_position = [], {}, {}
        starts = []  # index in self.calls of each group's first producer
        call_index = {id(call): i for i, call in enumerate(self.calls)}
        for first, indices in sorted(members.items()):
            widest = max(indices, key=lambda i: len(set(roots_of[i].tolist())))
            order = roots_of[widest]
            position = {int(r): p for p, r in enumerate(order)}
            reason = ""
            if len(position) != len(order):
                reason = f"'{producers[widest].path}' writes one channel twice"
            for i in indices:
                places = [position.get(int(r), -1) for r in roots_of[i]]
                if reason:
                    break
                if min(places) < 0 or any(b <= a for a, b in zip(places, places[1:])):
                    reason = (
                        f"the coupled channels of '{producers[i].path}' and "
                        f"'{producers[widest].path}' are not in one consistent order"
                    )
            if not reason:
                for r in order:
                    if int(r) in blocked_roots:
                        reason = blocked_roots[int(r)]
                        break
            name = producers[first].path
            roots = set(position)
            batch_norms, consumers = [], []
            for call in self.calls:
                if call.kind not in ("producer", "batch_norm", "depthwise"):
                    continue
                if any(int(r) in roots for r in self.roots(self.classes[call.inputs[0]])):
                    (batch_norms if call.kind == "batch_norm" else consumers).append(call.path)
            starts.append(call_index[id(producers[first])])
            self.groups.append(ChannelGroup(
                name=name,
                producers=tuple(producers[i].path for i in indices),
                consumers=tuple(consumers),
                channels=len(order),
                prunable=not reason,
                reason=reason,
                batch_norms=tuple(batch_norms),
            ))
            self.group_roots[name] = order
            for p, r in enumerate(order):
                self.root_position[int(r)] = (name, p)
        # A layer that writes channels but is not followed (a channels_first
        # or grouped convolution, a depth multiplier, a shared layer, ...) is
        # listed too, unprunable, so a user asking for it learns why.
        named = {group.name for group in self.groups}
        for index, call in enumerate(self.calls):
            channels = _written_channels(call)
            if call.kind != "opaque" or channels is None or call.path in named:
                continue
            named.add(call.path)
            starts.append(index)
            self.groups.append(ChannelGroup(
                name=call.path,
                producers=(call.path,),
                consumers=(),
                channels=channels,
                prunable=False,
                reason=f"structured removal does not follow '{call.path}' ({call.reason})",
            ))
        self.groups = [group for _, group in sorted(
            zip(starts, self.groups), key=lambda pair: pair[0])]

    def group(self, name):
        """The `ChannelGroup` named `name` (a KeyError if none)."""
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def positions(self, key):
        """`(group names, positions)` of the channels of tensor `key` (None where in no group)."""
        names, places = [], []
        for r in self.roots(self.classes[key]):
            name, p = self.root_position.get(int(r), (None, -1))
            names.append(name)
            places.append(p)
        return names, np.array(places)

    def call_of(self, path):
        """The `LayerCall` of the layer at `path` (a KeyError if none)."""
        for call in self.calls:
            if call.path == path:
                return call
        raise KeyError(path)


def _written_channels(call):
    """How many output channels a convolution or `Dense` call writes (None for other layers)."""
    layer = call.layer
    if isinstance(layer, keras.layers.Dense):
        return int(layer.units)
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        shape = call.input_shapes[0] if call.input_shapes else ()
        axis = 0 if getattr(layer, "data_format", None) == "channels_first" else -1
        if not shape or shape[axis] is None:
            return None
        return int(shape[axis]) * int(layer.depth_multiplier)
    if isinstance(layer, (TransformConv2D, keras.layers.Conv1D, keras.layers.Conv2D,
                          keras.layers.Conv3D, keras.layers.Conv1DTranspose,
                          keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose,
                          keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        return int(layer.filters)
    return None


def _kind(layer, node):
    """How `layer` treats channels for structured removal: a `ChannelGraph` kind, and why when "opaque"."""
    cls = type(layer).__name__
    data_format = getattr(layer, "data_format", "channels_last")
    if data_format not in (None, "channels_last"):
        return "opaque", f"{cls} with data_format={data_format!r}"
    if len(node.output_tensors) != 1:
        return "opaque", f"{cls} with several outputs"
    if isinstance(layer, TransformConv2D):
        return "producer", ""
    if isinstance(layer, keras.layers.Conv2D):
        if layer.groups != 1:
            return "opaque", f"grouped convolution, groups={layer.groups}"
        return "producer", ""
    if isinstance(layer, keras.layers.Dense):
        return "producer", ""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        if layer.depth_multiplier != 1:
            return "opaque", f"depth_multiplier={layer.depth_multiplier}"
        return "depthwise", ""
    if isinstance(layer, keras.layers.BatchNormalization):
        rank = len(node.input_tensors[0].shape)
        if layer.axis not in (-1, rank - 1):
            return "opaque", f"BatchNormalization over axis {layer.axis}"
        return "batch_norm", ""
    if isinstance(layer, keras.layers.Activation):
        name = keras.activations.serialize(layer.activation)
        name = name if isinstance(name, str) else str(name)
        if any(bad in name for bad in _NOT_CHANNELWISE_ACTIVATIONS):
            return "opaque", f"activation {name!r} mixes channels"
        return "channelwise", ""
    if isinstance(layer, keras.layers.PReLU):
        return "opaque", "PReLU"
    if isinstance(layer, CHANNELWISE_LAYERS):
        return "channelwise", ""
    if isinstance(layer, ELEMENTWISE_MERGES):
        widths = {channel_count(t) for t in node.input_tensors}
        if len(widths) != 1:
            return "opaque", f"{cls} broadcasting over channels"
        return "merge", ""
    if isinstance(layer, keras.layers.Concatenate):
        rank = len(node.output_tensors[0].shape)
        if layer.axis not in (-1, rank - 1):
            return "opaque", f"Concatenate on axis {layer.axis}"
        return "concat", ""
    if isinstance(layer, keras.layers.Flatten):
        shape = tuple(node.input_tensors[0].shape)[1:-1]
        if all(d == 1 for d in shape):
            return "channelwise", ""
        return "opaque", "Flatten of a map larger than 1x1 mixes channels into positions"
    if isinstance(layer, ChannelPad):
        return "pad", ""
    return "opaque", f"{cls}: not followed by channel_groups"


def channel_groups(model):
    """The groups of channels of `model` that structured removal removes together.

    One group per set of coupled output channels: a convolution's own
    outputs, or every convolution writing into one residual stream. A
    depthwise convolution, batch norm or other channel-wise layer belongs to
    the group of its input. See the module docstring for what is followed
    and what makes a group unprunable.

    Args:
        model: a built Sequential or Functional `keras.Model` (nested
            models are followed), `channels_last`.

    Returns:
        A list of `ChannelGroup`, in the order the model runs their first
        producers.

    Raises:
        ValueError: if `model` is not a built Sequential or Functional model.

    Example:

    >>> import keras
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    >>> x = keras.layers.BatchNormalization(name="bn")(x)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    >>> [(g.name, g.channels, g.prunable, g.consumers) for g in channel_groups(model)]
    [('conv', 8, True, ('head',)), ('head', 2, False, ())]
    """
    return list(analyze_groups(model, "channel_groups()").groups)


def analyze_groups(model, verb):
    """The `GroupAnalysis` of `model`; `verb` names the caller in the error for a model without a graph."""
    check_graph_model(model, verb)
    return GroupAnalysis(model)


def dense_weights(layer):
    """The layer's weights as numpy arrays; a `TransformConv2D`'s as its `Conv2D`'s (materialised kernel, bias)."""
    if isinstance(layer, TransformConv2D):
        kernel = keras.ops.convert_to_numpy(layer.materialized_kernel())
        return [kernel] + ([keras.ops.convert_to_numpy(layer.bias)] if layer.use_bias else [])
    return layer.get_weights()
