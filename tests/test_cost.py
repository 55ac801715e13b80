"""Tests for `tf_transform_conv.cost`: every count is checked against arithmetic
written out in the test."""

import dataclasses
import json

import keras
import numpy as np
import pytest

import reference
from tf_transform_conv import TransformConv2D
from tf_transform_conv.layers import ChannelGather
from tf_transform_conv.models import cifar_resnet
from tf_transform_conv.cost import (
    LayerCost,
    ModelCost,
    layer_cost,
    model_cost,
    parameter_formula,
)


def _tconv(implementation, **kwargs):
    kwargs.setdefault("padding", "same")
    return TransformConv2D(
        16, 3, base_filters=4, transforms="rotations",
        implementation=implementation, **kwargs,
    )


# ----------------------------------------------------------------------
# Single layers


@pytest.mark.parametrize(
    "layer_args, input_shape, output_shape, macs, params",
    [
        (dict(padding="same"), (10, 10, 8), (10, 10, 16),
         10 * 10 * 3 * 3 * 8 * 16, 3 * 3 * 8 * 16 + 16),
        (dict(padding="valid"), (10, 10, 8), (8, 8, 16),
         8 * 8 * 3 * 3 * 8 * 16, 3 * 3 * 8 * 16 + 16),
        # (11 - 3) // 2 + 1 = 5 rows and columns
        (dict(strides=2), (11, 11, 8), (5, 5, 16),
         5 * 5 * 3 * 3 * 8 * 16, 3 * 3 * 8 * 16 + 16),
        # ceil(11 / 2) = 6
        (dict(strides=2, padding="same"), (11, 11, 8), (6, 6, 16),
         6 * 6 * 3 * 3 * 8 * 16, 3 * 3 * 8 * 16 + 16),
        # effective kernel 5: 10 - 5 + 1 = 6
        (dict(dilation_rate=2), (10, 10, 8), (6, 6, 16),
         6 * 6 * 3 * 3 * 8 * 16, 3 * 3 * 8 * 16 + 16),
        # 2 groups: each filter sees 8 / 2 = 4 channels
        (dict(groups=2, padding="same", use_bias=False), (10, 10, 8), (10, 10, 16),
         10 * 10 * 3 * 3 * 4 * 16, 3 * 3 * 4 * 16),
        (dict(data_format="channels_first"), (8, 10, 10), (16, 8, 8),
         8 * 8 * 3 * 3 * 8 * 16, 3 * 3 * 8 * 16 + 16),
    ],
    ids=["same", "valid", "strides2", "strides2_same", "dilation2", "groups2",
         "channels_first"],
)
def test_conv2d_cost(layer_args, input_shape, output_shape, macs, params):
    cost = layer_cost(keras.layers.Conv2D(16, 3, **layer_args), input_shape)
    assert cost.output_shape == output_shape
    assert cost.macs == macs
    assert cost.dense_macs == macs
    assert cost.adds == 0
    assert cost.params == params
    assert cost.implementation is None
    assert cost.class_name == "Conv2D"


def test_depthwise_conv2d_cost():
    layer = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")
    cost = layer_cost(layer, (6, 6, 4))
    assert cost.output_shape == (6, 6, 8)
    assert cost.macs == 6 * 6 * 3 * 3 * 4 * 2
    assert cost.params == 3 * 3 * 4 * 2 + 4 * 2


def test_depthwise_conv2d_strides():
    layer = keras.layers.DepthwiseConv2D(3, strides=2, use_bias=False)
    cost = layer_cost(layer, (9, 9, 4))  # (9 - 3) // 2 + 1 = 4
    assert cost.macs == 4 * 4 * 3 * 3 * 4
    assert cost.params == 3 * 3 * 4


@pytest.mark.parametrize(
    "input_shape, macs",
    [((7,), 7 * 5), ((3, 7), 3 * 7 * 5), ((2, 3, 7), 2 * 3 * 7 * 5)],
)
def test_dense_cost_any_rank(input_shape, macs):
    cost = layer_cost(keras.layers.Dense(5), input_shape)
    assert cost.macs == cost.dense_macs == macs
    assert cost.params == 7 * 5 + 5
    assert cost.output_shape == input_shape[:-1] + (5,)


@pytest.mark.parametrize(
    "make, input_shape",
    [
        (lambda: keras.layers.Conv2D(6, 3, groups=3), (5, 5, 6)),
        (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=3), (5, 5, 2)),
        (lambda: keras.layers.Dense(4, use_bias=False), (2, 3)),
        (lambda: _tconv("factored", scale=True), (5, 5, 2)),
        (lambda: _tconv("materialized", use_bias=False), (5, 5, 2)),
    ],
    ids=["conv2d", "depthwise", "dense", "tconv_scale", "tconv_nobias"],
)
def test_unbuilt_formula_matches_built_count(make, input_shape):
    unbuilt = layer_cost(make(), input_shape)
    layer = make()
    layer.build((None,) + input_shape)
    built = layer_cost(layer, input_shape)
    assert unbuilt.params == built.params == layer.count_params()
    assert unbuilt.macs == built.macs


def test_other_layer_counts_params_and_no_macs():
    layer = keras.layers.BatchNormalization()
    layer.build((None, 4, 4, 3))
    cost = layer_cost(layer, (4, 4, 3))
    assert cost.params == 4 * 3 == layer.count_params()
    assert cost.macs == cost.dense_macs == cost.adds == 0
    assert cost.output_shape == (4, 4, 3)


def test_multi_input_layer():
    layer = keras.layers.Concatenate()
    layer.build([(None, 4, 4, 3), (None, 4, 4, 5)])
    cost = layer_cost(layer, [(4, 4, 3), (4, 4, 5)])
    assert cost.output_shape == (4, 4, 8)
    assert cost.params == cost.macs == 0


# ----------------------------------------------------------------------
# TransformConv2D


def test_transform_conv_factored():
    cost = layer_cost(_tconv("factored"), (10, 10, 8))
    assert cost.implementation == "factored"
    assert cost.output_shape == (10, 10, 16)
    # The base convolution. Padding 10x10 to 12x12 would grow the products by
    # 44%, so the factored path pads the products instead of the input.
    assert cost.macs == 10 * 10 * 8 * 3 * 3 * 4
    assert cost.adds == 10 * 10 * 16 * 3 * 3 * 1  # H'W' * filters * taps * groups
    assert cost.dense_macs == 10 * 10 * 3 * 3 * 8 * 16
    assert cost.params == 3 * 3 * 8 * 4 + 16


def test_transform_conv_materialized():
    cost = layer_cost(_tconv("materialized"), (10, 10, 8))
    assert cost.implementation == "materialized"
    assert cost.macs == cost.dense_macs == 10 * 10 * 3 * 3 * 8 * 16
    assert cost.adds == 0
    assert cost.params == 3 * 3 * 8 * 4 + 16


def test_transform_conv_dense_macs_equal_conv2d():
    conv = layer_cost(keras.layers.Conv2D(16, 3, padding="same"), (10, 10, 8))
    for implementation in ("factored", "materialized"):
        cost = layer_cost(_tconv(implementation), (10, 10, 8))
        assert cost.dense_macs == conv.macs


def test_transform_conv_strides_2():
    cost = layer_cost(_tconv("factored", strides=2), (10, 10, 8))
    assert cost.output_shape == (5, 5, 16)
    # The products are computed at every pixel of the input padded to 11x11
    # (+21% <= 25%, so the factored path pads the input), the sums at every output.
    assert cost.macs == 11 * 11 * 8 * 3 * 3 * 4
    assert cost.adds == 5 * 5 * 16 * 3 * 3
    assert cost.dense_macs == 5 * 5 * 3 * 3 * 8 * 16


def test_transform_conv_depth_groups_2():
    cost = layer_cost(_tconv("factored", depth_groups=2), (10, 10, 8))
    assert cost.macs == 10 * 10 * 8 * 3 * 3 * 4  # 2 groups of 4 channels
    assert cost.adds == 10 * 10 * 16 * 3 * 3 * 2
    assert cost.dense_macs == 10 * 10 * 3 * 3 * 8 * 16
    assert cost.params == 3 * 3 * 8 * 4 + 16


def test_transform_conv_channels_first_output_shape():
    layer = _tconv("materialized", data_format="channels_first", padding="valid")
    cost = layer_cost(layer, (8, 10, 10))
    assert cost.output_shape == (16, 8, 8)
    assert cost.macs == 8 * 8 * 3 * 3 * 8 * 16


@pytest.mark.parametrize(
    "family, params_per_filter, terms_per_tap",
    [("scalar", 9, 1), ("rotation", 2, 9), ("affine", 6, 9), ("general", 81, 9)],
)
def test_transform_conv_learned_family(family, params_per_filter, terms_per_tap):
    """Transform parameters per transformed filter; the second stage's multiply-adds
    per output value: one per tap (scalar) or per pair of taps."""
    layer = _tconv("factored", transform_family=family, depth_groups=2)
    cost = layer_cost(layer, (10, 10, 8))
    transformed = 2 * (16 - 4)  # per depth group, every output but the 4 bases
    assert layer.num_transformed == transformed
    assert cost.transform_params == transformed * params_per_filter
    assert cost.params == 3 * 3 * 8 * 4 + 16 + transformed * params_per_filter
    assert cost.transform_macs == 10 * 10 * 16 * 2 * 9 * terms_per_tap
    assert cost.macs == 10 * 10 * 8 * 3 * 3 * 4 + cost.transform_macs
    assert cost.adds == 0
    layer.build((None, 10, 10, 8))
    assert layer.count_params() == cost.params
    materialized = layer_cost(_tconv("materialized", transform_family=family), (10, 10, 8))
    assert materialized.macs == materialized.dense_macs and materialized.transform_macs == 0


def test_shifts_second_stage_skips_the_zeroed_taps():
    layer = TransformConv2D(15, 3, transforms="shifts", padding="same", implementation="factored")
    cost = layer_cost(layer, (10, 10, 8))
    # identity keeps 9 taps, each one-tap shift 6: 3 bases per transform.
    assert cost.adds == 10 * 10 * 3 * (9 + 4 * 6)


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_parameter_formula_matches_count_params(scale, use_bias):
    layer = _tconv("materialized", scale=scale, use_bias=use_bias)
    layer.build((None, 5, 5, 3))
    expected = 3 * 3 * 3 * 4 + (16 if scale else 0) + (16 if use_bias else 0)
    assert parameter_formula(3, 3, 16, 4, scale, use_bias) == expected
    assert parameter_formula((3, 3), 3, 16, 4, scale, use_bias) == expected
    assert layer.count_params() == expected
    assert layer_cost(layer, (5, 5, 3)).params == expected


def test_auto_unbuilt_reports_the_path_build_picks():
    picked = set()
    for channels in (4, 128):  # auto picks materialized, then factored
        shape = (6, 6, channels)
        unbuilt = layer_cost(_tconv("auto"), shape)
        layer = _tconv("auto")
        layer.build((None,) + shape)
        assert unbuilt.implementation == layer.implementation_used
        assert layer_cost(layer, shape) == dataclasses.replace(unbuilt, name=layer.name)
        picked.add(unbuilt.implementation)
    assert picked == {"factored", "materialized"}


# ----------------------------------------------------------------------
# Errors


def test_error_unbuilt_other_layer():
    with pytest.raises(ValueError, match="not built"):
        layer_cost(keras.layers.BatchNormalization(), (4, 4, 3))


def test_error_batch_dimension_included():
    with pytest.raises(ValueError, match="3D input_shape"):
        layer_cost(keras.layers.Conv2D(4, 3), (1, 8, 8, 3))


def test_error_unknown_dimension():
    with pytest.raises(ValueError, match="needs every dimension"):
        layer_cost(keras.layers.Conv2D(4, 3), (None, 8, 3))
    with pytest.raises(ValueError, match="needs every dimension"):
        layer_cost(keras.layers.Dense(4), (None, 3))


def test_error_channels_differ_from_built_layer():
    layer = keras.layers.Conv2D(4, 3)
    layer.build((None, 8, 8, 3))
    with pytest.raises(ValueError, match="built for 3 input channels"):
        layer_cost(layer, (8, 8, 5))


def test_error_groups_do_not_divide_channels():
    with pytest.raises(ValueError, match="divisible by depth_groups=2"):
        layer_cost(_tconv("factored", depth_groups=2), (8, 8, 3))


def test_error_bad_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        layer_cost(keras.layers.Dense(4), "abc")


def test_error_model_passed_to_layer_cost(functional):
    with pytest.raises(ValueError, match="model_cost"):
        layer_cost(functional, (8, 8, 3))


def test_error_not_a_model():
    with pytest.raises(ValueError, match="layer_cost"):
        model_cost(keras.layers.Dense(3))


def test_error_unbuilt_model():
    with pytest.raises(ValueError, match="not built"):
        model_cost(keras.Sequential([keras.layers.Dense(3)]))


def test_error_subclassed_model():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    model = Subclassed()
    model(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match="Functional or Sequential"):
        model_cost(model)


# ----------------------------------------------------------------------
# Models


@pytest.fixture(scope="module")
def functional():
    """Input 8x8x3 -> a -> b, Add(a, b) -> factored tconv -> pool -> Dense."""
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", name="b")(a)
    x = keras.layers.Add(name="add")([a, b])
    x = TransformConv2D(
        8, 3, base_filters=2, implementation="factored", name="t"
    )(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(5, name="head")(x)
    return keras.Model(inputs, outputs, name="skip")


@pytest.fixture(scope="module")
def functional_cost(functional):
    return model_cost(functional)


def test_functional_skip_connection(functional, functional_cost):
    cost = functional_cost
    names = [layer.name for layer in cost.layers]
    assert names == ["a", "b", "add", "t", "pool", "head"]
    by_name = {layer.name: layer for layer in cost.layers}
    assert by_name["a"].macs == 8 * 8 * 3 * 3 * 3 * 4
    assert by_name["b"].macs == 8 * 8 * 3 * 3 * 4 * 4
    assert by_name["add"].macs == 0
    t = by_name["t"]  # valid: 8 - 2 = 6
    assert t.output_shape == (6, 6, 8)
    assert t.macs == 8 * 8 * 4 * 3 * 3 * 2
    assert t.adds == 6 * 6 * 8 * 3 * 3
    assert t.dense_macs == 6 * 6 * 3 * 3 * 4 * 8
    assert t.params == 3 * 3 * 4 * 2 + 8
    assert by_name["head"].macs == 8 * 5
    assert cost.macs == (
        8 * 8 * 3 * 3 * 3 * 4 + 8 * 8 * 3 * 3 * 4 * 4 + 8 * 8 * 4 * 3 * 3 * 2 + 8 * 5
    )
    assert cost.params == functional.count_params()


def test_totals_are_sums(functional_cost):
    cost = functional_cost
    assert cost.params == sum(layer.params for layer in cost.layers)
    assert cost.macs == sum(layer.macs for layer in cost.layers)
    assert cost.adds == sum(layer.adds for layer in cost.layers) == 6 * 6 * 8 * 9
    assert cost.dense_macs == sum(layer.dense_macs for layer in cost.layers)
    assert cost.dense_macs - cost.macs == 6 * 6 * 9 * 4 * 8 - 8 * 8 * 4 * 9 * 2


def test_sequential_model():
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    cost = model_cost(model)
    assert [layer.name for layer in cost.layers] == ["conv", "flat", "head"]
    assert cost.macs == 4 * 4 * 3 * 3 * 2 * 4 + 4 * 4 * 4 * 3
    assert cost.params == model.count_params()


def test_nested_model():
    block = keras.Sequential(
        [
            keras.layers.Conv2D(4, 3, padding="same", name="conv"),
            keras.layers.ReLU(name="relu"),
        ],
        name="block",
    )
    inputs = keras.Input((6, 6, 2))
    x = block(inputs)
    x = keras.layers.Flatten(name="flat")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs)
    cost = model_cost(model)
    assert [layer.name for layer in cost.layers] == [
        "block/conv", "block/relu", "flat", "head",
    ]
    assert cost.layers[0].macs == 6 * 6 * 3 * 3 * 2 * 4
    assert cost.macs == 6 * 6 * 3 * 3 * 2 * 4 + 6 * 6 * 4 * 3
    assert cost.params == model.count_params()


def test_shared_layer_params_once_macs_per_call():
    shared = keras.layers.Dense(4, name="shared")
    x1, x2 = keras.Input((5,)), keras.Input((3, 5))
    y1 = shared(x1)
    y2 = keras.layers.Flatten()(shared(x2))
    outputs = keras.layers.Concatenate()([y1, y2])
    model = keras.Model([x1, x2], outputs)
    cost = model_cost(model)
    calls = [layer for layer in cost.layers if layer.name == "shared"]
    assert [c.macs for c in calls] == [5 * 4, 3 * 5 * 4]
    assert sorted(c.params for c in calls) == [0, 5 * 4 + 4]
    assert cost.params == model.count_params() == 5 * 4 + 4
    assert cost.macs == 5 * 4 + 3 * 5 * 4


def test_nested_model_called_twice():
    inner_in = keras.Input((4,))
    inner_out = keras.layers.Dense(2, name="d")(inner_in)
    inner = keras.Model(inner_in, inner_out, name="inner")
    x1, x2 = keras.Input((4,)), keras.Input((4,))
    outputs = keras.layers.Add()([inner(x1), inner(x2)])
    model = keras.Model([x1, x2], outputs)
    cost = model_cost(model)
    calls = [layer for layer in cost.layers if layer.name == "inner/d"]
    assert len(calls) == 2
    assert cost.macs == 2 * 4 * 2
    assert cost.params == model.count_params() == 4 * 2 + 2


def test_error_model_with_unknown_spatial_size():
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    with pytest.raises(ValueError, match="'conv'.*fixed input size"):
        model_cost(keras.Model(inputs, outputs))


def test_non_layer_operations_are_walked_through():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, name="d1")(inputs)
    x = keras.ops.relu(x) + 1.0
    outputs = keras.layers.Dense(2, name="d2")(x)
    cost = model_cost(keras.Model(inputs, outputs))
    assert [layer.name for layer in cost.layers] == ["d1", "d2"]
    assert cost.macs == 4 * 3 + 3 * 2


# ----------------------------------------------------------------------
# Reports


def test_layer_cost_to_dict_round_trip():
    cost = layer_cost(_tconv("factored"), (10, 10, 8))
    data = cost.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert LayerCost(**{**data, "output_shape": tuple(data["output_shape"])}) == cost


def test_model_cost_to_dict_round_trip(functional_cost):
    data = functional_cost.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["macs"] == functional_cost.macs
    assert data["params"] == functional_cost.params
    assert data["adds"] == functional_cost.adds
    assert data["dense_macs"] == functional_cost.dense_macs
    assert [layer["name"] for layer in data["layers"]] == [
        layer.name for layer in functional_cost.layers
    ]


def test_summary_prints_table_and_totals(functional_cost):
    lines = []
    functional_cost.summary(print_fn=lines.append)
    text = "\n".join(lines)
    for column in ("Layer (type)", "Output shape", "Params", "MACs", "Adds", "Path"):
        assert column in text
    assert "t (TransformConv2D)" in text
    assert "factored" in text
    assert f"Total params: {functional_cost.params:,}" in text
    assert f"Total MACs: {functional_cost.macs:,}" in text
    assert f"Total adds: {functional_cost.adds:,}" in text
    assert f"{functional_cost.dense_macs:,}" in text
    assert "," in f"{functional_cost.macs:,}"  # the totals need separators


def test_empty_model_cost():
    cost = ModelCost(layers=[])
    assert (cost.params, cost.macs, cost.adds, cost.dense_macs) == (0, 0, 0, 0)
    lines = []
    cost.summary(print_fn=lines.append)
    assert "Total MACs: 0" in "\n".join(lines)


# ----------------------------------------------------------------------
# SeparableConv2D and Conv2DTranspose, against direct references that
# count their products as they compute the layer


def _separable_reference(x, depthwise, pointwise, bias, strides, padding):
    """Depthwise (one channel at a time) then pointwise, in float64; and the multiply-adds done."""
    kh, kw, channels, mult = depthwise.shape
    stage, macs = [], 0
    for c in range(channels):  # Keras orders the depthwise outputs c * mult + m
        for m in range(mult):
            y = reference.conv2d(x[..., c:c + 1], depthwise[:, :, c:c + 1, m:m + 1],
                                 strides=strides, padding=padding)[..., 0]
            stage.append(y)
            macs += y[0].size * kh * kw  # one sample: kh * kw products per value
    stage = np.stack(stage, axis=-1)
    out = stage @ pointwise[0, 0] + bias
    macs += stage[0, ..., 0].size * stage.shape[-1] * pointwise.shape[-1]
    return out, macs


def _transpose_reference(x, kernel, bias, strides):
    """A 'valid' transposed convolution by scattering each input value through every tap."""
    kh, kw, filters, channels = kernel.shape
    _, h, w, _ = x.shape
    sh, sw = strides
    out = np.zeros((x.shape[0], (h - 1) * sh + kh, (w - 1) * sw + kw, filters))
    macs = 0
    for i in range(h):
        for j in range(w):
            for u in range(kh):
                for v in range(kw):
                    out[:, i * sh + u, j * sw + v] += x[:, i, j].astype(np.float64) @ kernel[u, v].T
                    macs += channels * filters  # one sample
    return out + bias, macs


@pytest.mark.parametrize("strides, padding", [(1, "same"), (2, "valid")])
def test_separable_conv2d_counts_depthwise_and_pointwise(strides, padding):
    rng = np.random.default_rng(0)
    layer = keras.layers.SeparableConv2D(6, 3, depth_multiplier=2, strides=strides, padding=padding)
    x = rng.normal(size=(2, 9, 9, 4)).astype("float32")
    layer.build(x.shape)
    for v in layer.weights:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    y = np.asarray(layer(x))
    depthwise, pointwise, bias = (np.asarray(v, np.float64) for v in layer.weights)
    expected, macs = _separable_reference(x, depthwise, pointwise, bias, (strides, strides), padding)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    cost = layer_cost(layer, (9, 9, 4))
    assert cost.macs == cost.dense_macs == macs
    oh = 9 if padding == "same" else 4  # (9 - 3) // 2 + 1
    assert cost.macs == oh * oh * (3 * 3 * 4 * 2 + 4 * 2 * 6)
    assert cost.params == 3 * 3 * 4 * 2 + 4 * 2 * 6 + 6 == layer.count_params()
    assert cost.output_shape == (oh, oh, 6) and cost.macs_counted
    unbuilt = keras.layers.SeparableConv2D(6, 3, depth_multiplier=2, strides=strides, padding=padding)
    assert layer_cost(unbuilt, (9, 9, 4)) == dataclasses.replace(cost, name=unbuilt.name)


@pytest.mark.parametrize("strides", [1, 2])
def test_conv2d_transpose_counts_every_input_value_times_every_tap(strides):
    rng = np.random.default_rng(1)
    layer = keras.layers.Conv2DTranspose(5, 3, strides=strides, padding="valid")
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    layer.build(x.shape)
    for v in layer.weights:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    kernel, bias = (np.asarray(v, np.float64) for v in layer.weights)
    expected, macs = _transpose_reference(x, kernel, bias, (strides, strides))
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-4, atol=1e-4)
    cost = layer_cost(layer, (4, 4, 3))
    assert cost.macs == cost.dense_macs == macs == 4 * 4 * 3 * 3 * 3 * 5
    assert cost.output_shape == expected.shape[1:]
    assert cost.params == 3 * 3 * 3 * 5 + 5 == layer.count_params()
    same = layer_cost(keras.layers.Conv2DTranspose(5, 3, strides=2, padding="same"), (4, 4, 3))
    assert same.output_shape == (8, 8, 5) and same.macs == 4 * 4 * 3 * 3 * 3 * 5


# ----------------------------------------------------------------------
# A model still being pruned


@pytest.mark.parametrize(
    "family, scale, depth_groups",
    [("discrete", True, 1), ("discrete", False, 2), ("scalar", True, 2)],
)
def test_pruning_wrapper_costs_what_it_computes(family, scale, depth_groups):
    """The wrapped convolution with its effective kernel: dense multiply-adds;
    trainable parameters only, not the pruning state."""
    import tf_transform_conv as tc
    from tf_transform_conv import pruning

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Conv2D(16, 3, padding="same", name="c")])
    options = tc.Reconstruction(transform_family=family, scale=scale, depth_groups=depth_groups)
    wrapped = tc.prune_model(model, lambda step: (True, 0.5), options)
    tc.update_pruning_step(wrapped, 0)
    wrapper = wrapped.layers[0]
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype("float32")
    expected = reference.conv2d(x, np.asarray(wrapper.effective_kernel(), np.float64),
                                np.asarray(wrapper.layer.bias), padding="same")
    np.testing.assert_allclose(np.asarray(wrapped(x)), expected, rtol=1e-4, atol=1e-4)

    cost = model_cost(wrapped)
    (entry,) = cost.layers
    assert entry.class_name == "TransformPruning" and entry.macs_counted
    assert entry.macs == entry.dense_macs == 8 * 8 * 3 * 3 * 4 * 16 == model_cost(model).macs
    transform = depth_groups * 16 * 9 if family == "scalar" else 0  # 9 multipliers per filter
    assert entry.transform_params == transform
    assert entry.params == 3 * 3 * 4 * 16 + 16 + (16 if scale else 0) + transform
    assert entry.params == sum(int(np.prod(v.shape)) for v in wrapper.trainable_weights)
    assert wrapper.count_params() > entry.params  # step, mask and assignment table left out
    unbuilt = pruning.TransformPruning(keras.layers.Conv2D(16, 3, padding="same", name="u"),
                                       lambda step: (True, 0.5), options)
    assert layer_cost(unbuilt, (8, 8, 4)) == dataclasses.replace(entry, name=unbuilt.name)


# ----------------------------------------------------------------------
# Layers without a formula


class _Doubling(keras.layers.Layer):
    def call(self, x):
        return x * 2.0


class _MyBatchNorm(keras.layers.BatchNormalization):
    pass


def test_layers_without_a_formula_are_marked_not_counted():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = _MyBatchNorm(name="bn")(x)
    x = keras.layers.Reshape((36, 4), name="reshape")(x)
    x = keras.layers.Conv1D(5, 3, name="conv1d")(x)
    y = keras.layers.Dense(5, name="dense")(x)
    x = keras.layers.Dot(axes=2, name="dot")([x, y])
    x = _Doubling(name="doubling")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    cost = model_cost(keras.Model(inputs, x))
    counted = {layer.name: layer.macs_counted for layer in cost.layers}
    assert counted == {"conv": True, "bn": True, "reshape": True, "conv1d": False,
                       "dense": True, "dot": False, "doubling": False, "pool": True}
    assert cost.uncounted == [layer.name for layer in cost.layers if not counted[layer.name]]
    assert sorted(cost.uncounted) == ["conv1d", "dot", "doubling"]
    assert all(layer.macs == layer.dense_macs == 0 for layer in cost.layers if not layer.macs_counted)
    assert cost.macs == 6 * 6 * 3 * 3 * 3 * 4 + 34 * 5 * 5  # conv and dense only
    assert cost.params == (3 * 3 * 3 * 4 + 4) + 4 * 4 + (3 * 4 * 5 + 5) + (5 * 5 + 5)
    lines = []
    cost.summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert sum("not counted" in line for line in lines) == 4  # three rows and the note
    listed = ", ".join(f"{layer.name} ({layer.class_name})"
                       for layer in cost.layers if not layer.macs_counted)
    assert "Conv1D" in listed and "_Doubling" in listed
    assert f"MACs not counted (no formula; left out of the totals): {listed}" in text
    data = cost.to_dict()
    assert data["uncounted"] == cost.uncounted
    assert [layer["macs_counted"] for layer in data["layers"]] == [
        counted[layer.name] for layer in cost.layers]


def test_the_packages_channel_layers_are_counted_as_no_work():
    """ChannelPad (the CIFAR ResNets' shortcuts) and ChannelGather only move values."""
    model = cifar_resnet(8, num_classes=3, input_shape=(8, 8, 3))
    cost = model_cost(model)
    pads = [layer for layer in cost.layers if layer.class_name == "ChannelPad"]
    assert pads and cost.uncounted == []
    assert all(layer.macs_counted and layer.macs == layer.params == 0 for layer in pads)
    inputs = keras.Input((4, 4, 3))
    gathered = ChannelGather([2, 0, 1], name="gather")(inputs)
    layer = model_cost(keras.Model(inputs, gathered)).layers[-1]
    assert (layer.name, layer.macs_counted, layer.macs, layer.params) == ("gather", True, 0, 0)


# ----------------------------------------------------------------------
# The registry of cost rules


def test_a_registered_rule_costs_a_custom_layer_and_its_subclasses():
    from tf_transform_conv.cost import CostTerms
    from tf_transform_conv.cost import register_layer_cost

    class Scale(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")

        def call(self, x):
            return x * self.w

    class Shifted(Scale):
        pass

    @register_layer_cost(Scale)
    def _scale_cost(layer, input_shape, output_shape):
        return CostTerms(params=input_shape[-1], macs=int(np.prod(input_shape)))

    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, Shifted()(Scale()(inputs)))
    cost = model_cost(model)
    assert [(e.params, e.macs, e.macs_counted) for e in cost.layers] == [(3, 48, True)] * 2


def test_a_subclass_without_a_rule_of_its_own_is_costed_as_its_parent():
    class MyConv(keras.layers.Conv2D):
        pass

    mine = layer_cost(MyConv(8, 3, name="c"), (6, 6, 4))
    plain = layer_cost(keras.layers.Conv2D(8, 3, name="c"), (6, 6, 4))
    assert mine == dataclasses.replace(plain, class_name="MyConv")
    assert (mine.params, mine.macs) == (3 * 3 * 4 * 8 + 8, 4 * 4 * 3 * 3 * 4 * 8)


def test_register_layer_cost_takes_only_layer_classes():
    from tf_transform_conv.cost import register_layer_cost

    with pytest.raises(ValueError, match=r"`layer_class`\. Expected a keras\.layers\.Layer subclass"):
        register_layer_cost(int)


def test_cost_terms_of_a_layer_without_a_rule_says_how_to_add_one():
    from tf_transform_conv.cost import cost_terms

    with pytest.raises(ValueError, match="No cost rule is registered for Flatten 'f'.*"
                                         "register_layer_cost"):
        cost_terms(keras.layers.Flatten(name="f"), (2, 2), (4,))
