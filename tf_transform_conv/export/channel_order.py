"""An export graph pass: keep each grouped layer's channel order, fold batch norm into it.

The grouped form of a `TransformConv2D` (`export.grouped.GroupedTransformConv2D`)
writes its filters grouped by base ("native" order); restoring the layer's
filter order costs a RESHAPE-TRANSPOSE-RESHAPE (or a GATHER) per layer, and
the batch norm after it then stays a separate MUL and ADD. On an ImageNet
ResNet-18 at a quarter of the bases those operators took about a third of
the grouped model's LiteRT time.

A model computes the same function under any consistent relabelling of the
channels of its intermediate tensors, so `propagate_channel_order` keeps the
native order instead:

1. *Channel spaces.* Tensors whose channels correspond one to one share a
   space: the input and output of a channel-wise layer (batch norm,
   elementwise activations, pooling, spatial padding, dropout, a depthwise
   convolution with one filter per channel) and every input and output of
   an elementwise merge (`Add`, `Multiply`, ...; a residual stream is one
   space). A convolution or `Dense` starts a new space at its output. The
   spaces come from the package's one channel analysis,
   `graph.channels.ChannelGraph`.
2. *An order per space.* A space takes the native order of the grouped
   layers that write it (the one most of them share); spaces holding a
   model input or the output of a layer the pass does not know keep the
   filter order, as do spaces no grouped layer writes.
3. *Rewrite.* Every layer is recreated with its weights permuted to the
   orders of the spaces it reads and writes: a convolution's or `Dense`'s
   input-channel rows, its output channels and bias, batch-norm and
   depthwise parameters per channel, the grouped layer's product kernel
   (its input) and its output gather (none when the space has its native
   order). `layers.ChannelPad` (the zero channels of an "option A"
   shortcut) becomes a 1x1 convolution with a 0/1 kernel that pads and
   reorders at once; a 1x1 pooling before it (the shortcut's subsampling,
   which XNNPACK does not take: the file would split into partitions) becomes
   that convolution's stride. A tensor read by a layer the pass does not know, or
   returned by the model, is gathered back to filter order first.
4. *Batch norm folding.* An inference-mode batch norm whose input is the
   output of a convolution (a `Conv2D` or a grouped layer without an
   activation) that nothing else reads is folded into it: the kernel's
   output channels scaled by `gamma / sqrt(var + eps)`, the bias shifted.
   The converter does this itself for a `Conv2D`, not across a reorder.

The result computes the model's function to float32 rounding (folding
reassociates one multiply). It is built for conversion only: its layers hold
permuted weights, so it is not a drop-in replacement for training.
"""

import collections

import numpy as np

import keras

from tf_transform_conv import _compat
from tf_transform_conv.export.grouped import ELEMENTWISE_ACTIVATIONS
from tf_transform_conv.export.grouped import GroupedTransformConv2D
from tf_transform_conv.graph.channels import CHANNELWISE_LAYERS
from tf_transform_conv.graph.channels import ELEMENTWISE_MERGES
from tf_transform_conv.graph.channels import ChannelGraph
from tf_transform_conv.graph.nodes import is_graph_model
from tf_transform_conv.layers.channel_gather import ChannelGather
from tf_transform_conv.layers.channel_pad import ChannelPad

__all__ = ["ChannelOrderReport", "propagate_channel_order", "rewrites"]


class ChannelOrderReport(collections.namedtuple(
        "ChannelOrderReport", ["native", "gathered", "folded", "gathers"])):
    """What `propagate_channel_order` did.

    Attributes:
        native: names of the grouped layers left in their native order (no
            reorder after their second convolution), and of those whose
            second convolution writes any order (`GroupedPlan.single_group`).
        gathered: names of the grouped layers still reordering their output
            (to the order their space took, or to filter order).
        folded: `{batch norm name: convolution name}` for each folded batch norm.
        gathers: names of the `ChannelGather` layers inserted (before model
            outputs and unknown layers).
    """

    def to_dict(self):
        return {
            "native": list(self.native),
            "gathered": list(self.gathered),
            "folded": dict(self.folded),
            "gathers": list(self.gathers),
        }


def _inverse(order):
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    return inverse


def _elementwise(activation):
    if activation is None:
        return True
    try:
        name = keras.activations.serialize(activation)
    except ValueError:
        return False
    return isinstance(name, str) and name in ELEMENTWISE_ACTIVATIONS


def _is_linear(activation):
    if activation is None:
        return True
    try:
        return keras.activations.serialize(activation) == "linear"
    except ValueError:
        return False


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _grouped_native(layer):
    """The grouped layer's native order (`native[j]`: the filter at output j), or None.

    None when the second convolution writes padded slots (an uneven
    assignment) or depth groups are summed: its output is then no
    permutation of the filters; and for a `single_group` plan (int8 files),
    which writes the filters in whatever order is asked.
    """
    index = layer.plan.output_index
    if layer.plan.single_group:  # writes any order alike: no preference
        return None
    if index.shape[0] != 1 or layer.plan.spread_outputs() != layer.filters:
        return None
    return _inverse(index[0].astype(np.int64))


def _reads_any_order(layer):
    """Whether a layer's weights can take its input channels in any order.

    Not a grouped layer with depth groups: its product convolution is
    grouped over the input channels.
    """
    if type(layer) is GroupedTransformConv2D:
        return layer.plan.product_kernel.shape[2] == layer.input.shape[-1]
    return True


def _role(layer):
    """How a layer (called once in the model) relates channel orders.

    "producer": its output starts a space and its weights can take any
    input and output order; "channelwise" / "merge": its inputs and
    outputs share one space; "pad": a `ChannelPad`; "barrier": anything
    else (inputs in filter order, output a fixed space).
    """
    kind = type(layer)
    if kind is GroupedTransformConv2D:
        return "producer" if _channels_last(layer) and _elementwise(layer.activation) \
            else "barrier"
    if kind is keras.layers.Conv2D:
        ok = layer.groups == 1 and _channels_last(layer) and _elementwise(layer.activation)
        return "producer" if ok else "barrier"
    if kind is keras.layers.Dense:
        return "producer" if _elementwise(layer.activation) else "barrier"
    if kind is keras.layers.BatchNormalization:
        axis = layer.axis if isinstance(layer.axis, int) else None
        return "channelwise" if axis in (-1, len(layer.input.shape) - 1) else "barrier"
    if kind is keras.layers.DepthwiseConv2D:
        ok = (layer.depth_multiplier == 1 and _channels_last(layer)
              and _elementwise(layer.activation))
        return "channelwise" if ok else "barrier"
    if kind is keras.layers.Activation:
        return "channelwise" if _elementwise(layer.activation) else "barrier"
    if kind in CHANNELWISE_LAYERS:
        return "channelwise" if _channels_last(layer) else "barrier"
    if kind in ELEMENTWISE_MERGES:
        return "merge"
    if kind is ChannelPad:
        return "pad" if _channels_last(layer) else "barrier"
    return "barrier"


def _classify(layer, node):
    """`_role` as a `ChannelGraph` kind: a barrier, or a broadcasting merge, is opaque."""
    role = _role(layer)
    if role in ("channelwise", "merge"):
        channels = {t.shape[-1] for t in node.input_tensors + list(node.outputs)}
        if len(channels) != 1:
            return "opaque", "it broadcasts over channels"
    if role == "barrier":
        return "opaque", "the pass does not follow it"
    return role, ""


def _plan_orders(channels):
    """The order chosen for each space, as a function `tensor -> order or None`.

    A space (tensors whose channels are the same channels in the same order,
    `ChannelGraph.space`) takes the native order most of its grouped writers
    share; spaces holding a model input or the output of a barrier keep the
    filter order (None).
    """
    spaces = {key: channels.space(key) for key in channels.classes}
    fixed = {spaces[id(tensor)] for tensor in channels.inputs}
    natives = collections.defaultdict(list)  # space -> native orders of its grouped writers
    for call in channels.calls:
        if call.kind == "opaque":
            fixed.update(spaces[key] for key in call.outputs)
        elif call.kind == "producer" and type(call.layer) is GroupedTransformConv2D:
            native = _grouped_native(call.layer)
            if native is not None:
                natives[spaces[call.outputs[0]]].append(native)
    chosen = {}
    for space, orders in natives.items():
        if space in fixed:
            continue
        votes = collections.Counter(order.tobytes() for order in orders)
        first = {}
        for order in orders:
            first.setdefault(order.tobytes(), order)
        token = max(votes, key=lambda t: (votes[t], -list(first).index(t)))
        chosen[space] = first[token]
    return lambda tensor: chosen.get(spaces.get(id(tensor)))


def _consumers(nodes, graph):
    """`{tensor id: number of readers}` (a model output counts as a reader)."""
    readers = collections.Counter()
    for node in nodes:
        for tensor in node.input_tensors:
            readers[id(tensor)] += 1
    for tensor in graph.outputs:
        readers[id(tensor)] += 1
    return readers


def _bn_scale_shift(bn):
    """`(scale, shift)` with `bn(x) = x * scale + shift` at inference (float64)."""
    weights = {w.path.split("/")[-1]: np.asarray(keras.ops.convert_to_numpy(w), np.float64)
               for w in bn.weights}
    mean, var = weights["moving_mean"], weights["moving_variance"]
    gamma = weights.get("gamma", np.ones_like(mean))
    beta = weights.get("beta", np.zeros_like(mean))
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale, beta - mean * scale


def _foldable_producer(layer):
    if type(layer) is GroupedTransformConv2D:
        return _is_linear(layer.activation)
    if type(layer) is keras.layers.Conv2D:
        return _is_linear(layer.activation) and layer.groups == 1 and _channels_last(layer)
    return False


def _plan_folds(nodes, roles, readers, single, by_output):
    """`{producer node id: batch-norm node}` for each batch norm to fold."""
    folds = {}
    for node in nodes:
        layer = node.operation
        if type(layer) is not keras.layers.BatchNormalization or roles[id(node)] == "barrier":
            continue
        if id(layer) not in single or len(node.input_tensors) != 1:
            continue
        source = by_output.get(id(node.input_tensors[0]))
        if (source is None or id(source.operation) not in single
                or roles[id(source)] != "producer" or not _foldable_producer(source.operation)
                or readers[id(node.input_tensors[0])] != 1 or id(source) in folds):
            continue
        folds[id(source)] = node
    return folds


def _is_subsample(layer):
    """A 1x1 max or average pooling: it only keeps every `strides`-th pixel."""
    return (
        type(layer) in (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)
        and tuple(layer.pool_size) == (1, 1)
        and layer.padding == "valid"
        and _channels_last(layer)
    )


def _producers(nodes):
    """`{tensor id: the node that computes it}`."""
    return {id(tensor): node for node in nodes for tensor in node.outputs}


def _plan_subsamples(nodes, roles, readers, single, by_output):
    """`{pad node id: subsample node}`: a 1x1 pooling read only by a `ChannelPad`,
    whose 1x1 convolution then takes the pooling's strides (one operator instead
    of two; XNNPACK delegates no 1x1 pooling)."""
    plans = {}
    for node in nodes:
        if roles[id(node)] != "pad" or id(node.operation) not in single:
            continue
        source = by_output.get(id(node.input_tensors[0]))
        if (source is not None and _is_subsample(source.operation)
                and id(source.operation) in single and roles[id(source)] != "barrier"
                and readers[id(node.input_tensors[0])] == 1):
            plans[id(node)] = source
    return plans


def _new_conv(layer, kernel, bias):
    config = layer.get_config()
    config["use_bias"] = bias is not None
    new = type(layer).from_config(config)
    new.build(layer.input.shape)
    new.set_weights([kernel] if bias is None else [kernel, bias])
    return new


def _permuted_producer(layer, in_order, out_order, fold):
    """A copy of a `Conv2D` or `Dense` reading `in_order`, writing `out_order`, `fold` folded."""
    kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), np.float64)
    bias = None if layer.bias is None else np.asarray(
        keras.ops.convert_to_numpy(layer.bias), np.float64)
    if fold is not None:
        scale, shift = fold
        kernel = kernel * scale
        bias = shift if bias is None else bias * scale + shift
    if in_order is not None:
        kernel = np.take(kernel, in_order, axis=-2)
    if out_order is not None:
        kernel = kernel[..., out_order]
        bias = None if bias is None else bias[out_order]
    dtype = np.float32
    return _new_conv(layer, kernel.astype(dtype), None if bias is None else bias.astype(dtype))


def _permuted_grouped(layer, in_order, out_order, fold):
    """A grouped layer reading `in_order` and writing `out_order` (None: filter order)."""
    plan = layer.plan
    product = plan.product_kernel
    if in_order is not None:
        product = np.take(product, in_order, axis=2)
    spread = plan.spread_kernel
    spread_bias = plan.spread_bias
    bias = layer._bias
    output_index = plan.output_index
    if fold is not None:
        scale, shift = fold
        spread = spread.astype(np.float64).copy()
        groups = output_index.shape[0]
        for k in range(groups):
            spread[..., output_index[k]] *= scale
        if groups == 1:
            spread_bias = np.zeros(spread.shape[-1]) if spread_bias is None \
                else spread_bias.astype(np.float64).copy()
            spread_bias[output_index[0]] = spread_bias[output_index[0]] * scale + shift
        else:
            bias = shift if bias is None else bias * scale + shift
        spread = spread.astype(np.float32)
        spread_bias = None if spread_bias is None else spread_bias.astype(np.float32)
        bias = None if bias is None else np.asarray(bias, np.float32)
    transpose = plan.transpose
    if out_order is not None:
        output_index = output_index[:, out_order]
        bias = None if bias is None else bias[out_order]
        transpose = None
    new_plan = plan.with_kernels(product, spread, spread_bias=spread_bias,
                                 output_index=output_index.astype(np.int32),
                                 transpose=transpose)
    return GroupedTransformConv2D(
        filters=layer.filters, kernel_size=layer.kernel_size, strides=layer.strides,
        padding=layer.padding, dilation_rate=layer.dilation_rate,
        data_format=layer.data_format, activation=layer.activation, bias=bias,
        plan=new_plan, product_op=layer.product_op, name=layer.name, dtype=layer.dtype_policy,
    )


def _permuted_channelwise(layer, order):
    """A copy of a batch norm or depthwise convolution with per-channel weights in `order`."""
    config = layer.get_config()
    new = type(layer).from_config(config)
    new.build(layer.input.shape)
    weights = []
    for w in layer.get_weights():
        if type(layer) is keras.layers.DepthwiseConv2D and w.ndim == 4:
            weights.append(np.take(w, order, axis=2))
        else:
            weights.append(w[order])
    new.set_weights(weights)
    return new


def _pad_as_conv(layer, in_order, out_order, channels_in, input_shape, strides=1):
    """A 1x1 `Conv2D` with a 0/1 kernel: `ChannelPad` from `in_order` to
    `out_order`, after subsampling by `strides`."""
    before = layer.padding[0]
    channels_out = channels_in + sum(layer.padding)
    kernel = np.zeros((1, 1, channels_in, channels_out), np.float32)
    position = np.arange(channels_in) if in_order is None else _inverse(in_order)
    targets = np.arange(channels_out) if out_order is None else out_order
    for j, filter_channel in enumerate(targets):
        source = filter_channel - before
        if 0 <= source < channels_in:
            kernel[0, 0, position[source], j] = 1.0
    conv = keras.layers.Conv2D(channels_out, 1, strides=strides, use_bias=False,
                               name=layer.name, dtype=layer.dtype_policy)
    conv.build(input_shape)
    conv.set_weights([kernel])
    return conv


def _analysis(model):
    """`(graph, channels, nodes, single, roles, readers, by_output, subsamples, grouped)` of
    a graph model: its channel analysis (`graph.channels.ChannelGraph`) and what the
    rewrite reads of it."""
    graph = _compat.functional_graph(model)
    channels = ChannelGraph(model, _classify, descend=False)
    nodes = [call.node for call in channels.calls]
    single = {key for key, count in channels.uses.items() if count == 1}
    roles = {id(call.node): "barrier" if call.kind == "opaque" else call.kind
             for call in channels.calls}
    readers = _consumers(nodes, graph)
    by_output = _producers(nodes)
    subsamples = _plan_subsamples(nodes, roles, readers, single, by_output)
    grouped = [n for n in nodes if type(n.operation) is GroupedTransformConv2D]
    return graph, channels, nodes, single, roles, readers, by_output, subsamples, grouped


def rewrites(model):
    """Whether `propagate_channel_order` would rebuild `model` (else it returns it as is).

    It rebuilds graph models holding a grouped layer or a subsampled
    `ChannelPad`. The rebuilt model calls the layers it leaves unchanged, so
    give it a clone of a model whose layers must stay untouched.
    """
    if not is_graph_model(model):
        return False
    *_, subsamples, grouped = _analysis(model)
    return bool(grouped or subsamples)


def propagate_channel_order(model):
    """Rewrites a deployment model so grouped layers keep their native order.

    See the module docstring for the pass. Subclassed models, and models
    with neither a grouped layer nor a subsampled `ChannelPad`, come back
    unchanged.

    Args:
        model: a Sequential or Functional model as `export.deployment_model`
            returns it (float32, `GroupedTransformConv2D` layers in it).

    Returns:
        `(model, report)`: a Functional model computing the same function
        (to float32 rounding) and a `ChannelOrderReport`. It calls the layers
        of `model` that need no change (they gain a node), and replaces the
        others with new layers; `model` itself is not modified.
    """
    empty = ChannelOrderReport([], [], {}, [])
    if not is_graph_model(model):
        return model, empty
    (graph, channels, nodes, single, roles, readers, by_output, subsamples,
     grouped) = _analysis(model)
    if not grouped and not subsamples:
        return model, empty
    order_of = _plan_orders(channels)
    folds = _plan_folds(nodes, roles, readers, single, by_output)
    folded_bns = {id(bn_node): source for source, bn_node in folds.items()}
    merged_subsamples = {id(node) for node in subsamples.values()}

    new_inputs = [
        keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype,
                    name=_compat.producer_name(t))
        for t in graph.inputs
    ]
    tensors = {id(old): new for old, new in zip(graph.inputs, new_inputs)}
    orders = {id(old): None for old in graph.inputs}  # order each new tensor is in
    report = ChannelOrderReport([], [], {}, [])

    def to_order(old, target):
        """The new tensor of `old` in `target` order (None: filter order)."""
        new, current = tensors[id(old)], orders[id(old)]
        if current is None and target is None:
            return new
        if current is not None and target is not None and np.array_equal(current, target):
            return new
        inverse = np.arange(new.shape[-1]) if current is None else _inverse(current)
        indices = inverse if target is None else inverse[target]
        source = _compat.producer_name(old)
        name = f"{source}_to_{'filter' if target is None else 'space'}_order_{len(report.gathers)}"
        report.gathers.append(name)
        return ChannelGather(indices.tolist(), name=name)(new)

    for node in nodes:
        layer = node.operation
        role = roles[id(node)]
        out = node.outputs[0] if len(node.outputs) == 1 else None
        out_order = order_of(out) if out is not None and role != "barrier" else None
        if id(node) in folded_bns or id(node) in merged_subsamples:
            source_out = node.input_tensors[0]
            tensors[id(out)], orders[id(out)] = tensors[id(source_out)], orders[id(source_out)]
            continue
        if role == "barrier":
            local = {id(t): to_order(t, None) for t in node.input_tensors}
            new_layer = layer
        else:
            in_orders = [order_of(t) for t in node.input_tensors]
            if not _reads_any_order(layer):
                in_orders = [None] * len(in_orders)
            local = {id(t): to_order(t, o) for t, o in zip(node.input_tensors, in_orders)}
            in_order = in_orders[0] if in_orders else None
            fold = None
            if id(node) in folds:
                bn = folds[id(node)].operation
                fold = _bn_scale_shift(bn)
                report.folded[bn.name] = layer.name
            if role == "producer" and type(layer) is GroupedTransformConv2D:
                native = _grouped_native(layer)
                if layer.plan.single_group:
                    # One spread group writes the filters in any order asked.
                    new_layer = _permuted_grouped(layer, in_order, out_order, fold)
                    report.native.append(layer.name)
                elif native is not None and out_order is not None and np.array_equal(
                        native, out_order):
                    # Native order: the output index becomes the identity.
                    new_layer = _permuted_grouped(layer, in_order, native, fold)
                    report.native.append(layer.name)
                else:
                    new_layer = _permuted_grouped(layer, in_order, out_order, fold)
                    report.gathered.append(layer.name)
            elif role == "producer":
                if in_order is None and out_order is None and fold is None:
                    new_layer = layer
                else:
                    new_layer = _permuted_producer(layer, in_order, out_order, fold)
            elif role == "pad":
                subsample = subsamples.get(id(node))
                if in_order is None and out_order is None and subsample is None:
                    new_layer = layer
                else:
                    source = node.input_tensors[0] if subsample is None \
                        else subsample.input_tensors[0]
                    strides = 1 if subsample is None else subsample.operation.strides
                    new_layer = _pad_as_conv(layer, in_order, out_order, source.shape[-1],
                                             source.shape, strides)
            elif role == "channelwise" and out_order is not None and layer.get_weights():
                new_layer = _permuted_channelwise(layer, out_order)
            else:
                new_layer = layer
        args, kwargs = node.arguments.fill_in(local)
        outputs = keras.tree.flatten(new_layer(*args, **kwargs))
        for old, new in zip(node.outputs, outputs):
            tensors[id(old)] = new
            orders[id(old)] = None if role == "barrier" else order_of(old)

    outputs = [to_order(t, None) for t in graph.outputs]
    rebuilt = keras.Model(
        keras.tree.pack_sequence_as(graph._inputs_struct, new_inputs),
        keras.tree.pack_sequence_as(graph._outputs_struct, outputs),
        name=model.name,
    )
    return rebuilt, report
