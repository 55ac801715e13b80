"""The model rewrites export converts: each `TransformConv2D` in its deployment form.

`deployment_model(model, lowering)` returns the model `export_tflite`
converts and `{layer name: (form, reason)}`: each `TransformConv2D` in the
form `lowering.lowering_choice` picks (grouped, slices or dense), then the
channel-order pass (`export.channel_order`); `factored_model(model)` the
Keras factored rewrite (for SavedModel); `float32_model(model)` the float32
twin of a mixed-precision model.
"""

import keras
import numpy as np

from tf_transform_conv import _compat
from tf_transform_conv._checks import check_bool
from tf_transform_conv.export import channel_order
from tf_transform_conv.export.checks import check_no_wrappers
from tf_transform_conv.export.checks import check_static_inputs
from tf_transform_conv.export.file_bytes import default_product_op
from tf_transform_conv.export.grouped import GroupedTransformConv2D
from tf_transform_conv.export.lowering import LOWERINGS
from tf_transform_conv.export.lowering import LoweringDecision
from tf_transform_conv.export.lowering import basis_decision
from tf_transform_conv.export.lowering import lowering_decision
from tf_transform_conv.graph.nodes import is_graph_model
from tf_transform_conv.graph.rewrite import rewrite_model
from tf_transform_conv.layers.filter_basis_conv import FilterBasisConv2D
from tf_transform_conv.layers.transform_conv import TransformConv2D

__all__ = [
    "PointwiseDense",
    "deploy",
    "deployment_model",
    "factored_model",
    "float32_model",
    "lowering_per_layer",
    "lowering_values",
    "sparse_dense_as_convolutions",
]


def _needs_rewrite(model):
    return [
        layer.name
        for layer in _compat.layers_of(model)
        if isinstance(layer, TransformConv2D) and layer.implementation_used != "factored"
    ]


def factored_model(model):
    """The model with every `TransformConv2D` on its factored path, weights unchanged.

    Each `TransformConv2D` that does not already run factored at inference
    is replaced by one with the same configuration except
    `implementation="factored"` and the same weights (a clone made with
    `graph.rewrite_model`; other layers keep their
    weights too). A model with nothing to rewrite is returned as it is.

    Args:
        model: a built Sequential or Functional model with fully known input
            dimensions apart from the batch.

    Returns:
        A model computing the same function (to float32 rounding).

    Raises:
        ValueError: if the model holds pruning wrappers (strip it first),
            has inputs of unknown size, or is not a built Functional
            or Sequential model.
    """
    check_no_wrappers(model, "factored_model")
    check_static_inputs(model, "factored_model")
    return factored(model)


def factored(model):
    """`factored_model` on a checked model."""
    pending = _needs_rewrite(model)
    if not pending:
        return model
    if not is_graph_model(model):
        raise ValueError(
            f"{type(model).__name__} is a subclassed model, whose layers cannot be "
            f"rewritten; its TransformConv2D layers {pending} would export their "
            "materialised (dense) kernel. Construct them with "
            "implementation='factored' in the model's code, or build the model "
            "as a Functional or Sequential model."
        )

    def replace(layer):
        if isinstance(layer, TransformConv2D) and layer.implementation_used != "factored":
            config = layer.get_config()
            config["implementation"] = "factored"
            return type(layer).from_config(config), layer.get_weights()
        return None

    return rewrite_model(model, replace)


def deployment_model(model, lowering="auto", keep_order=True, quantization=None):
    """The model as `export_tflite` converts it, and the form each `TransformConv2D` took.

    Each `TransformConv2D` is replaced by its grouped form
    (`export.grouped.GroupedTransformConv2D`), its factored Keras path, or a
    `keras.layers.Conv2D` holding its materialised kernel, as
    `lowering.lowering_choice(layer, lowering)` says; other layers keep their
    weights. The compact forms store only the bases (and the transforms'
    entries). The result is for conversion (the grouped form runs TensorFlow
    ops and holds its kernels as constants), not for training or `.keras`
    files.

    Args:
        model: a built Sequential or Functional model, stripped of
            pruning wrappers, with fully known input dimensions apart from
            the batch.
        lowering: `"auto"` (default), `"grouped"`, `"slices"` or `"dense"`
            for every layer, or a dict from `TransformConv2D` names to one
            of these (layers not named: `"auto"`).
        keep_order: bool (default True): run
            `channel_order.propagate_channel_order` on the result, so that
            grouped layers keep their base-major channel order through batch
            norm, activations and residual additions (no reorder operators)
            and batch norms fold into the convolutions before them. False
            keeps every layer's filter order, for comparisons.
        quantization: the file's quantization (None, `"dynamic"`,
            `"float16"` or `"int8"`; default None): `"auto"` weighs the
            forms' bytes in such a file, and in a quantized one the grouped
            form writes its products as a fully-connected operator (which
            has no bias operand; see `export.grouped`).

    Returns:
        `(deployed, choices)`: the rewritten model, and a dict from each
        rewritten `TransformConv2D`'s name to `(form, reason)` as decided
        for it (`form`: `"grouped"`, `"slices"` or `"dense"`).

    Raises:
        ValueError: as `factored_model`, for an unknown `lowering` or layer
            name, or for `"grouped"` with a layer that cannot take it.
    """
    requested = lowering_per_layer(model, lowering)
    check_bool(keep_order, "keep_order")
    check_no_wrappers(model, "deployment_model")
    check_static_inputs(model, "deployment_model")
    deployed, decisions = deploy(model, requested, keep_order, quantization)
    return deployed, {name: (d.form, d.reason) for name, d in decisions.items()}


def deploy(model, requested, keep_order=True, quantization=None):
    """`deployment_model` on a model already checked (`check_no_wrappers`,
    `check_static_inputs`); `requested`: `layer -> lowering`; `quantization`:
    the file's, whose bytes `"auto"` weighs and which picks how the grouped
    form writes its products (`file_bytes.default_product_op`).

    Returns `(deployed, decisions)`: decisions maps each rewritten layer's
    name to its `lowering.LoweringDecision`.
    """
    layers = [
        layer
        for layer in _compat.layers_of(model)
        if isinstance(layer, TransformConv2D)
    ]
    bases = [
        layer
        for layer in _compat.layers_of(model)
        if isinstance(layer, FilterBasisConv2D) and layer.built
    ]
    if not layers and not (bases and is_graph_model(model)):
        if keep_order and channel_order.rewrites(model):
            # A clone: the pass calls the layers it leaves unchanged.
            clone = rewrite_model(model, lambda layer: None)
            return channel_order.propagate_channel_order(clone)[0], {}
        return model, {}
    if not is_graph_model(model):
        # Raises the subclassed-model error unless every layer already runs factored.
        return factored(model), {
            layer.name: LoweringDecision(
                "slices", "a subclassed model: its layers already run factored", None, {})
            for layer in layers
        }
    choices = {}

    def replace(layer):
        if isinstance(layer, FilterBasisConv2D) and layer.built:
            decision = basis_decision(layer, quantization)
            choices[layer.name] = decision
            return _dense_twin(layer) if decision.form == "dense" else None
        if not isinstance(layer, TransformConv2D):
            return None
        decision = lowering_decision(layer, requested(layer), quantization, keep_order)
        choices[layer.name] = decision
        form = decision.form
        if form == "grouped":
            return GroupedTransformConv2D.from_layer(
                layer, plan=decision.plan, product_op=default_product_op(quantization),
                quantization=quantization), None
        if form == "dense":
            return _dense_twin(layer)
        config = layer.get_config()
        config["implementation"] = "factored"
        return type(layer).from_config(config), layer.get_weights()

    deployed = rewrite_model(model, replace)
    if keep_order:
        deployed, _ = channel_order.propagate_channel_order(deployed)
    return deployed, choices


def _dense_twin(layer):
    """A `Conv2D` holding the layer's materialised kernel, and its weights (a
    `TransformConv2D` or a `FilterBasisConv2D`)."""
    conv = keras.layers.Conv2D(
        layer.filters,
        layer.kernel_size,
        strides=layer.strides,
        padding=layer.padding,
        data_format=layer.data_format,
        dilation_rate=layer.dilation_rate,
        activation=layer.activation,
        use_bias=layer.use_bias,
        name=layer.name,
        dtype=layer.dtype_policy,
    )
    weights = [np.asarray(keras.ops.convert_to_numpy(layer.materialized_kernel()))]
    if layer.bias is not None:
        weights.append(np.asarray(keras.ops.convert_to_numpy(layer.bias)))
    return conv, weights


def float32_model(model):
    """The model with every layer computing in float32, weights unchanged.

    A mixed-precision model (`"mixed_float16"`, `"mixed_bfloat16"`) keeps
    float32 variables but computes in 16 bits; the TFLite converter has no
    builtin float16/bfloat16 convolutions and fails on it. `export_tflite`
    converts this float32 twin instead (use `quantization="float16"` for a
    file with 16-bit weights). A model already in float32 is returned as is.
    """
    if all(
        layer.compute_dtype == "float32"
        for layer in _compat.layers_of(model)
        if not isinstance(layer, keras.layers.InputLayer)
    ):
        return model
    if not is_graph_model(model):
        raise ValueError(
            f"{type(model).__name__} is a subclassed mixed-precision model, whose "
            "layers cannot be rebuilt in float32 for export. Build it under "
            "keras.config.set_dtype_policy('float32'), copy the weights, and export that."
        )

    def replace(layer):
        if isinstance(layer, (keras.layers.InputLayer, keras.Model)):
            return None
        config = layer.get_config()
        if "dtype" not in config:
            return None
        config["dtype"] = "float32"
        return layer.__class__.from_config(config), layer.get_weights()

    return rewrite_model(model, replace)


def lowering_per_layer(model, lowering):
    """`layer -> lowering` for `deployment_model`, after checking `lowering`."""

    def check(value, where):
        if value not in LOWERINGS:
            raise ValueError(
                f"Invalid value{where} for argument `lowering`. Expected one of "
                f"{list(LOWERINGS)} (or a dict from layer names to these). "
                f"Received {value!r}."
            )

    if not isinstance(lowering, dict):
        check(lowering, "")
        return lambda layer: lowering
    names = {
        layer.name
        for layer in _compat.layers_of(model)
        if isinstance(layer, TransformConv2D)
    }
    unknown = sorted(set(lowering) - names)
    if unknown:
        raise ValueError(
            f"`lowering` names layers that are not TransformConv2D layers of the "
            f"model: {unknown}. Its TransformConv2D layers: {sorted(names)}."
        )
    for name, value in lowering.items():
        check(value, f" for layer {name!r}")
    return lambda layer: lowering.get(layer.name, "auto")


def lowering_values(deployed):
    return sum(
        layer.plan.stored_values()
        for layer in _compat.layers_of(deployed)
        if isinstance(layer, GroupedTransformConv2D)
    )


class PointwiseDense(keras.layers.Layer):
    """A `Dense` layer written as a 1x1 convolution, for int8 files with sparse kernels.

    XNNPACK (TF 2.21) fails to prepare an int8 FULLY_CONNECTED whose weights
    come from a DENSIFY (a sparse-encoded kernel): the file does not run
    with the default delegates. An int8 CONV_2D with a densified kernel
    runs, so `export_tflite` writes such a `Dense` as a reshape, a 1x1
    convolution and a reshape (`sparse_dense_as_convolutions`). For export
    only: it holds its weights as constants.
    """

    def __init__(self, kernel, bias, activation, **kwargs):
        super().__init__(**kwargs)
        self.kernel_value = np.asarray(kernel, np.float32)
        self.bias_value = None if bias is None else np.asarray(bias, np.float32)
        self.activation = activation

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.kernel_value.shape[-1],)

    def call(self, inputs):
        lead = tuple(inputs.shape[1:-1])
        rows = int(np.prod(lead)) if lead else 1
        units = self.kernel_value.shape[-1]
        x = keras.ops.reshape(inputs, (-1, rows, 1, inputs.shape[-1]))
        kernel = keras.ops.convert_to_tensor(self.kernel_value[None, None], inputs.dtype)
        y = keras.ops.conv(x, kernel, 1, "valid", data_format="channels_last")
        if self.bias_value is not None:
            y = y + keras.ops.convert_to_tensor(self.bias_value, inputs.dtype)
        y = keras.ops.reshape(y, (-1,) + lead + (units,))
        if self.activation is not None:
            y = self.activation(y)
        return y


def sparse_dense_as_convolutions(model, min_zeros):
    """`model` with every `Dense` whose kernel has at least `min_zeros` zeros as a
    `PointwiseDense`, and their names (the model itself where there is none)."""
    names = [
        layer.name
        for layer in _compat.layers_of(model)
        if type(layer) is keras.layers.Dense and layer.built
        and np.mean(np.asarray(layer.kernel) == 0) >= min_zeros
    ]
    if not names or not is_graph_model(model):
        return model, []

    def replace(layer):
        if layer.name not in names:
            return layer, None  # shared: a grouped layer cannot be rebuilt from its config
        bias = None if layer.bias is None else np.asarray(layer.bias)
        return PointwiseDense(np.asarray(layer.kernel), bias, layer.activation,
                              name=layer.name, dtype=layer.dtype_policy), None

    return rewrite_model(model, replace), names
