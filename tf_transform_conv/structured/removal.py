"""Structured filter removal: a smaller dense model without the filters you drop.

`remove_filters(model, keep)` builds the smaller model from plain Keras
layers, for the channel groups of `graph.groups.channel_groups(model)` that
`keep` names: each producing convolution (`Conv2D`, `Dense`,
`TransformConv2D`, which becomes the `Conv2D` with its materialised kernel)
keeps the chosen filters; batch norms, depthwise convolutions and biases
keep the same channels; the next convolutions and a `Dense` after global
pooling lose the matching input channels; a `ChannelPad` keeps the padding
channels that survive. `removal_cost(model, keep)` counts what the smaller
model will cost without building it.
"""

import dataclasses

import keras
import numpy as np

from tf_transform_conv._checks import is_int
from tf_transform_conv.cost import ModelCost
from tf_transform_conv.cost import layer_cost
from tf_transform_conv.cost import model_cost
from tf_transform_conv.graph.groups import analyze_groups
from tf_transform_conv.graph.groups import dense_weights
from tf_transform_conv.graph.rewrite import rewrite_model
from tf_transform_conv.layers.transform_conv import TransformConv2D
from tf_transform_conv.saliency import group_norms

__all__ = ["removal_cost", "remove_filters"]


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
            if count == group.channels or not group.prunable:
                kept = np.arange(count)  # an unprunable group raises below
            else:
                scores = group_norms(analysis, name)
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
            if name in analysis.group_roots:  # an unfollowed layer's group, kept whole
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
    analysis = analyze_groups(model, "remove_filters()")
    plan = _Plan(analysis, keep)
    return rewrite_model(model, plan.replacement)


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
    analysis = analyze_groups(model, "removal_cost()")
    plan = _Plan(analysis, keep)
    layers, seen = [], set()
    for call in analysis.calls:
        layer = call.layer
        if call.kind == "nested":  # its layers' calls follow
            continue
        if not isinstance(layer, keras.layers.Layer):  # an operation: no cost, as model_cost
            continue
        if isinstance(layer, keras.Model):  # a nested model this module does not follow
            nested = model_cost(layer)
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
        entry = layer_cost(layer, shape)
        if id(call.layer) in seen:
            entry = dataclasses.replace(entry, params=0, transform_params=0)
        seen.add(id(call.layer))
        layers.append(dataclasses.replace(entry, name=call.path))
    return ModelCost(layers=layers, name=model.name)


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
        self.calls = {id(call.layer): call for call in analysis.calls
                      if call.kind not in ("opaque", "nested")}
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
        weights = dense_weights(layer)
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
