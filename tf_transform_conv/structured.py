"""Structured filter removal: a smaller dense model without the filters you drop.

`channel_groups(model)` finds the channels that must be removed together:
the output channels of one convolution, or of every convolution writing into
one residual stream (an `Add`, or another element-wise merge, couples
channel `i` of each of its inputs), followed through the layers that treat
channels one by one (batch norm, activations, pooling, padding, dropout,
depthwise convolutions with `depth_multiplier=1`, `Concatenate` on the
channel axis, the package's `ChannelPad`). `remove_filters(model, keep)`
then builds the smaller model from plain Keras layers: each producing
convolution (`Conv2D`, `Dense`, `TransformConv2D`, which becomes the
`Conv2D` with its materialised kernel) keeps the chosen filters; batch
norms, depthwise convolutions and biases keep the same channels; the next
convolutions and a `Dense` after global pooling lose the matching input
channels; a `ChannelPad` keeps the padding channels that survive.

How channels are followed: every channel of every tensor of the model gets
a class; a producing convolution creates new classes for its outputs, a
channel-wise layer passes its input's classes on, an element-wise merge
declares the classes of channel `i` of its inputs equal, `Concatenate` and
`ChannelPad` lay classes (and new zero-channel classes) side by side. A
group is a set of classes reached by producers whose outputs share a class;
its channel order is the order in its widest producer output (in the CIFAR
ResNets' option-A shortcuts, the last stage's stream: the stem's channels
sit in its middle, the padded channels around them), and every producer in
the group must list its channels in that order. Channels that reach the
model's output or input, a layer this module does not follow (`Flatten` of
a map larger than 1x1, `Reshape`, `LayerNormalization`, custom layers, ...),
a layer called more than once, a convolution with `groups > 1`, or the input
of a nested model (whose input shape is fixed; the groups inside it are
followed) make their whole group unprunable, with the reason in
`ChannelGroup.reason`.

Only `channels_last` models are followed (a `channels_first` layer is a
layer this module does not follow).
"""

import dataclasses

import keras
import numpy as np

from tf_transform_conv import cost as cost_lib
from tf_transform_conv import rewrite as rewrite_lib
from tf_transform_conv._checks import is_int
from tf_transform_conv.layers import TransformConv2D

__all__ = [
    "ChannelGroup",
    "channel_groups",
    "removal_cost",
    "remove_filters",
]


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


# Layers that pass each channel on by itself, without weights.
_NOT_CHANNELWISE_ACTIVATIONS = ("softmax", "log_softmax")


def _channel_pad_class():
    from tf_transform_conv.models import ChannelPad  # models imports much of the package

    return ChannelPad


@dataclasses.dataclass
class _Call:
    """One layer call of the flattened graph."""

    layer: object
    path: str
    kind: str  # "producer", "batch_norm", "depthwise", "channelwise", "merge",
    #            "concat", "pad", "opaque"
    inputs: list
    outputs: list
    input_shapes: list = None


class _Analysis:
    """Channel classes of every tensor of a model, and the groups they form."""

    def __init__(self, model):
        self.model = model
        self.parent = []
        self.blocked = {}  # class id -> reason
        self.classes = {}  # tensor key -> int array of class ids
        self.alias = {}  # id of an inner tensor of a nested model -> key of the outer one
        self.calls = []
        self.uses = {}
        self._count_uses(model)
        inputs = keras.tree.flatten(model.inputs)
        for tensor in inputs:
            self.classes[id(tensor)] = self._fresh(
                _channels(tensor), blocked="the channels of the model's input")
        self._walk(model, "")
        for tensor in keras.tree.flatten(model.outputs):
            self._block(self.classes[self._key(tensor)], "they are the model's output")
        self._make_groups()

    # --- union-find over channel classes

    def _fresh(self, count, blocked=None):
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        ids = np.arange(start, start + count, dtype=np.int64)
        if blocked:
            self._block(ids, blocked)
        return ids

    def find(self, c):
        root = c
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[c] != root:
            self.parent[c], c = root, self.parent[c]
        return root

    def roots(self, ids):
        return np.array([self.find(int(c)) for c in ids], dtype=np.int64)

    def _union(self, a, b):
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def _block(self, ids, reason):
        for c in ids:
            self.blocked.setdefault(int(c), reason)

    # --- walking the graph

    def _key(self, tensor):
        return self.alias.get(id(tensor), id(tensor))

    def _count_uses(self, model):
        for node in rewrite_lib.graph_nodes(model):
            layer = node.operation
            self.uses[id(layer)] = self.uses.get(id(layer), 0) + 1
            if isinstance(layer, keras.Model) and self.uses[id(layer)] == 1:
                self._count_uses(layer)

    def _walk(self, model, prefix):
        for node in rewrite_lib.graph_nodes(model):
            layer = node.operation
            if not isinstance(layer, keras.layers.Layer) or isinstance(
                layer, keras.layers.InputLayer
            ):
                if not isinstance(layer, keras.layers.InputLayer):
                    self._opaque(node, prefix, f"operation {type(layer).__name__}")
                continue
            if isinstance(layer, keras.Model):
                if self.uses[id(layer)] > 1 or not rewrite_lib.is_graph_model(layer):
                    self._opaque(node, prefix, "a nested model called more than once"
                                 if self.uses[id(layer)] > 1 else "a subclassed model")
                    continue
                for inner, outer in zip(keras.tree.flatten(layer.inputs), node.input_tensors):
                    self.alias[id(inner)] = self._key(outer)
                    self._block(self.classes[self._key(outer)],
                                f"they enter the nested model '{prefix + layer.name}', "
                                "whose input shape is fixed")
                self._walk(layer, prefix + layer.name + "/")
                for inner, outer in zip(keras.tree.flatten(layer.outputs), node.output_tensors):
                    self.alias[id(outer)] = self._key(inner)
                continue
            self._layer_call(layer, node, prefix)

    def _opaque(self, node, prefix, reason):
        layer = node.operation
        name = prefix + getattr(layer, "name", type(layer).__name__)
        why = f"they pass through '{name}' ({reason})"
        for tensor in node.input_tensors:
            self._block(self.classes[self._key(tensor)], why)
        for tensor in node.output_tensors:
            self.classes[id(tensor)] = self._fresh(_channels(tensor), blocked=why)
        self.calls.append(_Call(layer, name, "opaque",
                                [self._key(t) for t in node.input_tensors],
                                [id(t) for t in node.output_tensors],
                                [tuple(t.shape)[1:] for t in node.input_tensors]))

    def _layer_call(self, layer, node, prefix):
        path = prefix + layer.name
        kind, reason = _kind(layer, node)
        if kind != "opaque" and self.uses[id(layer)] > 1:
            kind, reason = "opaque", "a layer called more than once"
        if kind == "opaque":
            self._opaque(node, prefix, reason)
            return
        ins = [self._key(t) for t in node.input_tensors]
        outs = [id(t) for t in node.output_tensors]
        inputs = [self.classes[k] for k in ins]
        if kind == "producer":
            out = self._fresh(_channels(node.output_tensors[0]))
        elif kind in ("batch_norm", "depthwise", "channelwise"):
            out = inputs[0]
        elif kind == "merge":
            for other in inputs[1:]:
                for a, b in zip(inputs[0], other):
                    self._union(a, b)
            out = inputs[0]
        elif kind == "concat":
            out = np.concatenate(inputs)
        else:  # pad
            before, after = layer.padding
            out = np.concatenate([self._fresh(before), inputs[0], self._fresh(after)])
        self.classes[outs[0]] = out
        self.calls.append(_Call(layer, path, kind, ins, outs,
                                [tuple(t.shape)[1:] for t in node.input_tensors]))

    # --- groups

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
            blocked_roots.setdefault(self.find(c), reason)
        self.groups, self.group_roots, self.root_position = [], {}, {}
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

    def group(self, name):
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
        for call in self.calls:
            if call.path == path:
                return call
        raise KeyError(path)


def _channels(tensor):
    shape = tuple(tensor.shape)
    return int(shape[-1]) if shape and shape[-1] is not None else 0


def _kind(layer, node):
    """How `layer` treats channels: a `_Call.kind`, and why when "opaque"."""
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
    if isinstance(layer, rewrite_lib.CHANNELWISE_LAYERS):
        return "channelwise", ""
    if isinstance(layer, rewrite_lib.ELEMENTWISE_MERGES):
        widths = {_channels(t) for t in node.input_tensors}
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
    if isinstance(layer, _channel_pad_class()):
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
    rewrite_lib.check_graph_model(model, "channel_groups()")
    return list(_Analysis(model).groups)


def _analysis(model, verb):
    rewrite_lib.check_graph_model(model, verb)
    return _Analysis(model)


def _weights(layer):
    """The layer's weights as numpy arrays; a `TransformConv2D`'s as its `Conv2D`'s."""
    if isinstance(layer, TransformConv2D):
        kernel = keras.ops.convert_to_numpy(layer.materialized_kernel())
        return [kernel] + ([keras.ops.convert_to_numpy(layer.bias)] if layer.use_bias else [])
    return layer.get_weights()


def filter_norms(analysis, name):
    """The L1 norm of each channel of group `name`, summed over its producers."""
    scores = np.zeros(analysis.group(name).channels)
    for path in analysis.group(name).producers:
        call = analysis.call_of(path)
        kernel = _weights(call.layer)[0]
        norms = np.abs(kernel.reshape(-1, kernel.shape[-1])).sum(axis=0)
        _, places = analysis.positions(call.outputs[0])
        np.add.at(scores, places, norms)
    return scores


def _resolve_keep(analysis, keep):
    """`{group name: sorted kept positions}` for the groups `keep` shrinks."""
    if not isinstance(keep, dict):
        raise TypeError(
            "Invalid value for argument `keep`. Expected a dict mapping group "
            "names (see channel_groups()) to kept channel indices or a count. "
            f"Received keep of type {type(keep).__name__}."
        )
    names = {g.name: g for g in analysis.groups}
    out = {}
    for name, value in keep.items():
        if name not in names:
            raise ValueError(
                f"Invalid value for argument `keep`: no channel group is named "
                f"{name!r}. Groups are {sorted(names)}."
            )
        group = names[name]
        if is_int(value):
            count = int(value)
            if not 1 <= count <= group.channels:
                raise ValueError(
                    f"Invalid value for argument `keep`: group {name!r} has "
                    f"{group.channels} channels; expected a count in [1, "
                    f"{group.channels}]. Received keep[{name!r}]={value!r}."
                )
            if count == group.channels:
                kept = np.arange(count)
            else:
                scores = filter_norms(analysis, name)
                kept = np.sort(np.argsort(-scores, kind="stable")[:count])
        else:
            try:
                kept = np.asarray(value)
                ok = kept.ndim == 1 and kept.size >= 1 and (
                    np.issubdtype(kept.dtype, np.integer))
            except (TypeError, ValueError):
                ok = False
            if not ok or kept.min() < 0 or kept.max() >= group.channels or np.any(
                np.diff(kept) <= 0
            ):
                raise ValueError(
                    f"Invalid value for argument `keep`: expected, for group "
                    f"{name!r}, a count or a non-empty, strictly increasing "
                    f"sequence of channel indices in [0, {group.channels}). "
                    f"Received keep[{name!r}]={value!r}."
                )
        if len(kept) < group.channels:
            if not group.prunable:
                raise ValueError(
                    f"Invalid value for argument `keep`: group {name!r} cannot be "
                    f"pruned: {group.reason}. Received keep[{name!r}] with "
                    f"{len(kept)} of {group.channels} channels."
                )
            out[name] = kept.astype(np.int64)
    return out


def remove_filters(model, keep):
    """A smaller dense model without the filters that `keep` leaves out.

    For each group of `channel_groups(model)` named in `keep`, its
    producing convolutions keep only the chosen output filters (kernel and
    bias), and every layer depending on those channels follows: batch norms
    and depthwise convolutions keep the same channels, the next
    convolutions and a `Dense` after global pooling keep the matching input
    channels (kernel rows), a `ChannelPad` keeps the padding channels that
    survive. Every other weight is copied. The result has only plain Keras
    layers (and `ChannelPad`): each `TransformConv2D` becomes the `Conv2D`
    with its materialised kernel, so it exports and runs anywhere. Keeping
    every channel computes what `model` computes.

    Args:
        model: a built Sequential or Functional `keras.Model`.
        keep: dict mapping group names (`ChannelGroup.name`) to either a
            strictly increasing sequence of kept channel indices (positions
            in the group) or an int count, which keeps that many channels of
            largest L1 norm (summed over the group's producers). Groups not
            named keep every channel.

    Returns:
        A new `keras.Model` (the input model is unchanged). It is compiled
        like `model` where that can be rebuilt.

    Raises:
        TypeError: if `keep` is not a dict.
        ValueError: if `model` is not a built Sequential or Functional
            model, `keep` names an unknown group, gives indices out of
            range, unsorted, repeated or empty, a count out of range, or
            shrinks a group that is not prunable (the message says why).

    Example:

    >>> import keras, numpy as np
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    >>> x = keras.layers.BatchNormalization(name="bn")(x)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    >>> small = remove_filters(model, {"conv": [0, 2, 5]})
    >>> small.get_layer("conv").filters, tuple(small.get_layer("head").kernel.shape)
    (3, (3, 2))
    """
    analysis = _analysis(model, "remove_filters()")
    plan = _Plan(analysis, keep)
    return rewrite_lib.rewrite_model(model, plan.replacement)


def removal_cost(model, keep):
    """What `model_cost(remove_filters(model, keep))` will report, without building it.

    Each layer call is costed by `cost.layer_cost` with the input channels
    and filters it will keep, so a search over `keep` (a budget) can compare
    candidates before removing anything.

    Args:
        model: a built Sequential or Functional `keras.Model`.
        keep: as for `remove_filters`.

    Returns:
        A `cost.ModelCost`, one entry per layer call (nested layers named
        `"nested/layer"`, as `model_cost` names them).

    Raises:
        TypeError, ValueError: as `remove_filters`.

    Example:

    >>> import keras
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    >>> removal_cost(model, {"conv": 3}).params  # 3*3*3*3 + 3 + 3*2 + 2
    92
    """
    analysis = _analysis(model, "removal_cost()")
    plan = _Plan(analysis, keep)
    layers, seen = [], set()
    for call in analysis.calls:
        layer = call.layer
        if not isinstance(layer, keras.layers.Layer):  # an operation: no cost, as model_cost
            continue
        if isinstance(layer, keras.Model):  # a nested model this module does not follow
            nested = cost_lib.model_cost(layer)
            for entry in nested.layers:
                layers.append(dataclasses.replace(
                    entry, name=call.path + "/" + entry.name,
                    params=entry.params if id(layer) not in seen else 0))
            seen.add(id(layer))
            continue
        shapes = [tuple(shape[:-1]) + (int(plan.mask_of(key).sum()),)
                  for key, shape in zip(call.inputs, call.input_shapes)]
        shape = shapes[0] if len(shapes) == 1 else shapes
        replaced = plan.replacement(layer) if call.kind != "opaque" else None
        if replaced is not None:
            layer = replaced[0]
            layer.build((None,) + shape)
        entry = cost_lib.layer_cost(layer, shape)
        if id(call.layer) in seen:
            entry = dataclasses.replace(entry, params=0, transform_params=0)
        seen.add(id(call.layer))
        layers.append(dataclasses.replace(entry, name=call.path))
    return cost_lib.ModelCost(layers=layers, name=model.name)


class _Plan:
    """Which channels `keep` removes, and the layer that replaces each affected one."""

    def __init__(self, analysis, keep):
        self.analysis = analysis
        kept = _resolve_keep(analysis, keep)
        self.removed = set()
        for name, positions in kept.items():
            order = analysis.group_roots[name]
            mask = np.ones(len(order), bool)
            mask[positions] = False
            self.removed.update(int(r) for r in order[mask])
        self.calls = {id(call.layer): call for call in analysis.calls if call.kind != "opaque"}
        self._masks = {}

    def mask_of(self, key):
        """Which channels of tensor `key` survive."""
        if key not in self._masks:
            self._masks[key] = np.array(
                [int(r) not in self.removed
                 for r in self.analysis.roots(self.analysis.classes[key])], dtype=bool)
        return self._masks[key]

    def replacement(self, layer):
        """None (clone `layer` as it is), or `(new_layer, weights)`."""
        call = self.calls.get(id(layer))
        if call is None or call.kind in ("channelwise", "merge", "concat"):
            return None
        keep_in = self.mask_of(call.inputs[0])
        keep_out = self.mask_of(call.outputs[0])
        if call.kind == "pad":
            before, after = layer.padding
            config = layer.get_config()
            config["padding"] = (int(keep_out[:before].sum()),
                                 int(keep_out[len(keep_out) - after:].sum()))
            return layer.__class__.from_config(config), None
        if keep_in.all() and keep_out.all() and not isinstance(layer, TransformConv2D):
            return None
        weights = _weights(layer)
        if call.kind == "producer":
            kernel = weights[0][..., keep_in, :][..., keep_out]
            new = [kernel] + [w[keep_out] for w in weights[1:]]
            if isinstance(layer, keras.layers.Dense):
                config = layer.get_config()
                config["units"] = int(keep_out.sum())
                return keras.layers.Dense.from_config(config), new
            config = (_conv2d_config(layer) if isinstance(layer, TransformConv2D)
                      else layer.get_config())
            config["filters"] = int(keep_out.sum())
            return keras.layers.Conv2D.from_config(config), new
        if call.kind == "depthwise":
            new = [weights[0][:, :, keep_in, :]] + [w[keep_in] for w in weights[1:]]
            return layer.__class__.from_config(layer.get_config()), new
        # batch norm: every weight is per channel
        return layer.__class__.from_config(layer.get_config()), [w[keep_in] for w in weights]


def _conv2d_config(layer):
    """The config of the `Conv2D` that computes what `TransformConv2D` `layer` computes."""
    return dict(
        name=layer.name,
        filters=layer.filters,
        kernel_size=layer.kernel_size,
        strides=layer.strides,
        padding=layer.padding,
        data_format=layer.data_format,
        dilation_rate=layer.dilation_rate,
        activation=keras.activations.serialize(layer.activation),
        use_bias=layer.use_bias,
        dtype=layer.dtype_policy,
        trainable=layer.trainable,
    )
