"""TransformConv2D: exactness against independent references, Keras citizenship, errors.

Tolerance: float32 outputs are compared with float64 references at
max |difference| <= 1e-4 * max(1, max |reference|).
"""

import json
import os
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras.src import testing

import reference
from tf_transform_conv import TransformConv2D
from tf_transform_conv.ops import families
from tf_transform_conv.ops import transforms as transforms_lib

RTOL = 1e-4
IMPLEMENTATIONS = ("materialized", "factored")


def assert_close(actual, expected, rtol=RTOL, what="output"):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    diff = float(np.abs(actual - expected).max(initial=0.0))
    assert diff <= rtol * scale, f"{what}: max abs diff {diff:.3g} > {rtol:g} * {scale:.3g}"


def random_layer(rng, implementation, **kwargs):
    """A built layer with random base kernel, scale and bias."""
    layer = TransformConv2D(implementation=implementation, **kwargs)
    return layer


def randomize(layer, rng):
    for var in layer.weights:
        var.assign(rng.normal(size=var.shape).astype("float32"))


# ----------------------------------------------------------------------------
# Exactness: property-based sweep over the argument space


@st.composite
def layer_cases(draw):
    preset = draw(st.sampled_from(["rotations", "d4", "flips", "shifts", "all"]))
    names = transforms_lib.PRESETS[preset]
    square = preset in ("rotations", "d4", "all")
    sizes = [(1, 1), (3, 3), (5, 5)] + ([] if square else [(3, 5), (2, 3)])
    kernel_size = draw(st.sampled_from(sizes))
    if transforms_lib.degenerate_reason(names, kernel_size):
        names = ("identity",)  # every other transform is refused on a 1x1 kernel
    strides = draw(st.sampled_from([1, 2]))
    dilation = 1 if strides > 1 else draw(st.sampled_from([1, 2]))
    padding = draw(st.sampled_from(["valid", "same"]))
    groups = draw(st.sampled_from([1, 2, 4]))
    scale = draw(st.booleans())
    use_bias = draw(st.booleans())
    n = draw(st.integers(1, 3))
    explicit = draw(st.booleans())
    family = draw(st.sampled_from(families.FAMILIES))
    kwargs = dict(
        kernel_size=kernel_size,
        strides=strides,
        dilation_rate=dilation,
        padding=padding,
        depth_groups=groups,
        scale=scale,
        use_bias=use_bias,
        transforms=list(names),
        transform_family=family,
    )
    if explicit:
        filters = draw(st.integers(n, 10))
        seed = draw(st.integers(0, 2**16))
        rng = np.random.default_rng(seed)
        assignment = np.stack(
            [rng.integers(0, n, (groups, filters)), rng.integers(0, len(names), (groups, filters))],
            axis=-1,
        )
        kwargs.update(filters=filters, base_filters=n, assignment=assignment.tolist())
    else:
        kwargs.update(filters=n * len(names))
    kh, kw = kernel_size
    min_h = (kh - 1) * dilation + 1
    min_w = (kw - 1) * dilation + 1
    h = draw(st.integers(min_h, min_h + 6))
    w = draw(st.integers(min_w, min_w + 6))
    c_in = groups * draw(st.integers(1, 2))
    return kwargs, (2, h, w, c_in)


def full_params(layer):
    """Every (group, output)'s family parameters: the identity for templates,
    the rows of `layer.transform` (in group, output order) for the others."""
    identity = families.identity_params(layer.transform_family, layer.kernel_size)
    params = np.tile(identity.astype(np.float64), layer.templates.shape + (1,))
    if layer.transform is not None:
        params[~layer.templates] = np.asarray(layer.transform, np.float64).T
    return params


def reference_output(layer, x):
    base = np.asarray(layer.base_kernel, np.float64)
    scale = None if layer.scale_weight is None else np.asarray(layer.scale_weight, np.float64)
    kernel = reference.materialize_learned(
        base, layer.assignment, layer.transforms, layer.transform_family, full_params(layer),
        scale,
    )
    bias = None if layer.bias is None else np.asarray(layer.bias, np.float64)
    out = reference.conv2d(x, kernel, bias, layer.strides, layer.padding, layer.dilation_rate)
    return out, kernel


@settings(max_examples=80)
@given(case=layer_cases(), seed=st.integers(0, 2**16))
def test_both_paths_match_numpy_and_conv2d(case, seed):
    kwargs, input_shape = case
    rng = np.random.default_rng(seed)
    x = rng.normal(size=input_shape).astype("float32")
    outputs = {}
    for implementation in IMPLEMENTATIONS:
        layer = TransformConv2D(implementation=implementation, **kwargs)
        layer.build(input_shape)
        if not outputs:
            randomize(layer, rng)
            weights = [np.asarray(v) for v in layer.weights]
        else:
            layer.set_weights(weights)
        outputs[implementation] = np.asarray(layer(x))
        expected, kernel = reference_output(layer, x)
        assert_close(outputs[implementation], expected, what=implementation)
        # training=True runs the same forward (with the dense gradient attached).
        assert_close(layer(x, training=True), expected, what=f"{implementation}, training")
        # The library's materialised kernel is the reference kernel ...
        assert_close(layer.materialized_kernel(), kernel, what="materialized_kernel")
        # ... and a plain Conv2D holding it computes the same output.
        conv = keras.layers.Conv2D(
            layer.filters,
            layer.kernel_size,
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            use_bias=layer.use_bias,
        )
        conv.build(input_shape)
        conv.set_weights(
            [np.asarray(layer.materialized_kernel())]
            + ([np.asarray(layer.bias)] if layer.use_bias else [])
        )
        assert_close(outputs[implementation], conv(x), what=f"{implementation} vs Conv2D")
    assert_close(outputs["factored"], outputs["materialized"], what="factored vs materialized")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(filters=8, kernel_size=3, transforms="rotations", padding="same"),
        dict(filters=10, kernel_size=3, transforms="shifts", strides=2, padding="same", scale=True),
        dict(filters=8, kernel_size=(3, 5), transforms="flips", dilation_rate=2, depth_groups=2, scale=True),
        dict(
            filters=6, kernel_size=3, transforms="d4", base_filters=2, depth_groups=4, scale=True,
            assignment=[[[0, 0], [1, 3], [0, 7], [1, 5], [1, 1], [0, 2]]] * 2
            + [[[1, 0], [1, 3], [0, 6], [0, 4], [1, 2], [0, 1]]] * 2,
        ),
    ],
    ids=["rotations", "shifts-stride2-scale", "flips-dilated-groups2", "explicit-groups4"],
)
def test_gradients_match_reference(implementation, kwargs):
    rng = np.random.default_rng(7)
    x = tf.constant(rng.normal(size=(2, 9, 9, 4)).astype("float32"))
    layer = TransformConv2D(implementation=implementation, bias_initializer="random_normal", **kwargs)
    layer.build(x.shape)
    randomize(layer, rng)
    upstream = rng.normal(size=layer.compute_output_shape(x.shape)).astype("float32")

    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x) * upstream)
    grads = tape.gradient(loss, [x] + layer.trainable_weights)
    grads = dict(zip(["input"] + [v.name for v in layer.trainable_weights], grads))

    # Reference: a Conv2D holding the materialised kernel gives dL/dW, dL/dbias
    # and dL/dx; dL/dB and dL/dscale follow from W = scale * T(B) by the adjoint
    # of each transform, computed here with the numpy definitions.
    conv = keras.layers.Conv2D(
        layer.filters, layer.kernel_size, strides=layer.strides,
        padding=layer.padding, dilation_rate=layer.dilation_rate,
    )
    conv.build(x.shape)
    conv.set_weights([np.asarray(layer.materialized_kernel()), np.asarray(layer.bias)])
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(conv(x) * upstream)
    gx, gw, gb = tape.gradient(loss, [x, conv.kernel, conv.bias])
    gw = np.asarray(gw, np.float64)

    base = np.asarray(layer.base_kernel, np.float64)
    scale = np.ones(layer.filters) if layer.scale_weight is None else np.asarray(layer.scale_weight)
    groups = layer.depth_groups
    cg = base.shape[2] // groups
    g_base = np.zeros_like(base)
    g_scale = np.zeros(layer.filters)
    for g in range(groups):
        ch = slice(g * cg, (g + 1) * cg)
        for o, (b, t) in enumerate(layer.assignment[g]):
            name = layer.transforms[t]
            transformed = reference.TRANSFORMS[name](base[:, :, ch, b])
            g_scale[o] += np.sum(gw[:, :, ch, o] * transformed)
            # Adjoint of a partial permutation: push each gradient tap back to its source.
            probe = np.arange(base.shape[0] * base.shape[1], dtype=float).reshape(base.shape[:2]) + 1
            src = reference.TRANSFORMS[name](probe).reshape(-1).astype(int) - 1
            flat = gw[:, :, ch, o].reshape(-1, cg) * scale[o]
            g_flat = g_base[:, :, ch, b].reshape(-1, cg)
            for u, v in enumerate(src):
                if v >= 0:
                    g_flat[v] += flat[u]
            g_base[:, :, ch, b] = g_flat.reshape(base.shape[0], base.shape[1], cg)

    assert_close(grads["input"], gx, what="d/dinput")
    assert_close(grads["bias"], gb, what="d/dbias")
    assert_close(grads["base_kernel"], g_base, what="d/dbase_kernel")
    if layer.scale:
        assert_close(grads["scale"], g_scale, what="d/dscale")


def test_channels_first_matches_channels_last():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 7, 8, 4)).astype("float32")
    kwargs = dict(filters=8, kernel_size=3, transforms="rotations", padding="same", strides=2)
    last = TransformConv2D(**kwargs, data_format="channels_last")
    last.build(x.shape)
    randomize(last, rng)
    for implementation in IMPLEMENTATIONS:
        first = TransformConv2D(**kwargs, data_format="channels_first", implementation=implementation)
        first.build((2, 4, 7, 8))
        first.set_weights(last.get_weights())
        y = first(np.transpose(x, (0, 3, 1, 2)))
        assert_close(np.transpose(np.asarray(y), (0, 2, 3, 1)), last(x))
        assert first.compute_output_shape((2, 4, 7, 8)) == (2, 8, 4, 4)


def test_compiled_matches_eager():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 10, 10, 8)).astype("float32")
    for implementation in IMPLEMENTATIONS:
        layer = TransformConv2D(16, 3, transforms="d4", padding="same", scale=True,
                                depth_groups=2, implementation=implementation)
        eager = layer(x)
        compiled = tf.function(layer, jit_compile=True)(x)
        assert_close(compiled, eager)


# ----------------------------------------------------------------------------
# Inspection and the "auto" choice


def test_default_assignment_blocks():
    layer = TransformConv2D(12, 3, transforms="rotations", depth_groups=2)
    table = layer.assignment
    assert table.shape == (2, 12, 2)
    np.testing.assert_array_equal(table[0, :, 0], [0, 1, 2] * 4)
    np.testing.assert_array_equal(table[0, :, 1], [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3)
    np.testing.assert_array_equal(table[1], table[0])
    assert layer.base_filters == 3
    with pytest.raises(ValueError):
        table[0, 0, 0] = 5  # read-only view: the layer's state cannot be edited by accident


def test_base_filters_from_ratio():
    assert TransformConv2D(16, 3, base_ratio=0.25).base_filters == 4
    assert TransformConv2D(16, 3, base_filters=4).base_filters == 4


def test_parameter_count():
    layer = TransformConv2D(32, 3, transforms="d4", scale=True)
    layer.build((None, 8, 8, 16))
    assert layer.count_params() == 3 * 3 * 16 * 4 + 32 + 32
    assert tuple(layer.base_kernel.shape) == (3, 3, 16, 4)


@pytest.mark.parametrize(
    "kwargs, input_shape, expected, failing",
    [
        (dict(filters=256, transforms="d4"), (None, 14, 14, 256), "factored", None),
        (dict(filters=64, transforms="rotations"), (None, 28, 28, 128), "factored", None),
        # base products half the dense multiply-adds: the additions eat the saving
        (dict(filters=16, transforms=["identity", "rot180"]), (None, 16, 16, 16), "materialized",
         "NOT products/dense multiply-adds 0.5"),
        # stride 2: products at every input pixel, 4x the output pixels
        (dict(filters=16, transforms="rotations", strides=2), (None, 16, 16, 16), "materialized",
         "NOT products/dense multiply-adds 1"),
        (dict(filters=32, transforms="d4"), (None, 16, 16, 3), "materialized",
         "NOT 3 input channels per depth group"),
        (dict(filters=64, transforms="d4"), (None, 56, 56, 64), "factored", None),
        (dict(filters=64, transforms="rotations"), (None, 56, 56, 64), "materialized",
         "NOT products 1.72 MiB per image"),
        (dict(filters=64, transforms="d4"), (None, None, None, 64), "materialized",
         "spatial size unknown"),
        # the sampled and general families' second stage needs wider layers
        (dict(filters=128, transforms="rotations", transform_family="rotation"),
         (None, 14, 14, 128), "factored", None),
        (dict(filters=32, transforms="rotations", transform_family="affine"),
         (None, 14, 14, 32), "materialized", "NOT affine operators with 32 channels"),
        (dict(filters=32, transforms="rotations", transform_family="scalar"),
         (None, 14, 14, 32), "factored", None),
    ],
)
def test_auto_choice_and_reason(kwargs, input_shape, expected, failing):
    layer = TransformConv2D(kernel_size=3, padding="same", **kwargs)
    layer.build(input_shape)
    assert layer.implementation_used == expected, layer.implementation_reason
    if failing:
        assert failing in layer.implementation_reason
    else:
        assert "NOT" not in layer.implementation_reason
        assert "factored under XLA (inference and training)" in layer.implementation_reason or (
            "factored for inference under XLA" in layer.implementation_reason)


def _runs_factored(layer, monkeypatch):
    """A probe: `probe(fn)` says whether calling `fn` ran the layer's factored path."""
    ran = []
    original = layer._factored_forward
    monkeypatch.setattr(layer, "_factored_forward", lambda *a: ran.append(1) or original(*a))

    def probe(fn):
        ran.clear()
        fn()
        return bool(ran)

    return probe


def test_auto_runs_factored_only_under_xla(monkeypatch):
    """Measured: without XLA the factored path's slices run as separate ops
    (1.1-7x slower than the convolution); training steps run it only for wide
    groups whose outputs need no reordering."""
    x = np.zeros((1, 8, 8, 32), "float32")
    narrow = TransformConv2D(32, 3, transforms="d4", padding="same")
    narrow.build(x.shape)
    assert narrow.implementation_used == "factored"
    assert "training (< 64 channels per group)" in narrow.implementation_reason
    runs = _runs_factored(narrow, monkeypatch)
    assert not runs(lambda: narrow(x))  # eager: no XLA
    assert not runs(lambda: tf.function(lambda v: narrow(v))(x))  # graph, no XLA
    assert runs(lambda: tf.function(lambda v: narrow(v), jit_compile=True)(x))
    assert not runs(lambda: tf.function(lambda v: narrow(v, training=True), jit_compile=True)(x))

    x = np.zeros((1, 8, 8, 64), "float32")
    wide = TransformConv2D(64, 3, transforms="d4", padding="same")
    wide.build(x.shape)
    assert "factored under XLA (inference and training)" in wide.implementation_reason
    runs = _runs_factored(wide, monkeypatch)
    assert runs(lambda: tf.function(lambda v: wide(v, training=True), jit_compile=True)(x))
    assert not runs(lambda: tf.function(lambda v: wide(v, training=True))(x))

    rng = np.random.default_rng(0)
    scattered = TransformConv2D(
        64, 3, base_filters=8, transforms="d4", padding="same",
        assignment=np.stack([rng.integers(0, 8, 64), rng.integers(0, 8, 64)], -1).tolist())
    scattered.build(x.shape)
    assert "training (outputs reordered)" in scattered.implementation_reason
    runs = _runs_factored(scattered, monkeypatch)
    assert runs(lambda: tf.function(lambda v: scattered(v), jit_compile=True)(x))
    assert not runs(
        lambda: tf.function(lambda v: scattered(v, training=True), jit_compile=True)(x))

    forced = TransformConv2D(32, 3, transforms="d4", padding="same", implementation="factored")
    forced.build((1, 8, 8, 32))
    assert _runs_factored(forced, monkeypatch)(
        lambda: forced(np.zeros((1, 8, 8, 32), "float32"), training=True))  # requested


def test_factored_training_differentiates_the_dense_convolution():
    """The regression behind unbounded training memory without XLA: the
    factored path's own gradient pads a product-sized tensor per shifted
    slice (StridedSliceGrad). Training steps must use the dense
    convolution's gradient instead."""
    layer = TransformConv2D(32, 3, base_filters=8, transforms="d4", padding="same",
                            implementation="factored", transform_family="scalar")
    x = tf.random.normal((2, 8, 8, 16))
    layer.build(x.shape)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(layer(x, training=True)))
        return tape.gradient(loss, layer.trainable_variables)

    graph = step.get_concrete_function(x).graph
    kinds = {op.type for op in graph.get_operations()}
    activation_slice_grads = [
        op.name for op in graph.get_operations()
        if op.type == "StridedSliceGrad" and op.outputs[0].shape.rank == 4
        and op.outputs[0].shape[0] == x.shape[0]
    ]
    assert not activation_slice_grads
    assert "Conv2DBackpropFilter" in kinds and "Conv2DBackpropInput" in kinds
    # ... and the gradients are those of the factored path differentiated directly.
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(x, training=False)))
    direct = tape.gradient(loss, layer.trainable_variables)
    for got, want in zip(step(x), direct):
        assert_close(tf.convert_to_tensor(got), tf.convert_to_tensor(want), what="gradient")


@pytest.mark.parametrize("family", families.FAMILIES)
@pytest.mark.parametrize("implementation, training", [("materialized", True),
                                                      ("factored", True), ("factored", False)])
def test_gradients_match_central_differences(family, implementation, training):
    """Every parameter's gradient against central differences of the numpy
    reference, in float64 (step 1e-6; tolerance 1e-6 of the largest)."""
    rng = np.random.default_rng(13)
    kwargs = dict(filters=6, kernel_size=3, base_filters=2, transforms="d4", depth_groups=2,
                  scale=True, padding="same", strides=2, transform_family=family,
                  assignment=np.stack([rng.integers(0, 2, (2, 6)), rng.integers(0, 8, (2, 6))],
                                      -1).tolist())
    layer = TransformConv2D(implementation=implementation, dtype="float64", **kwargs)
    x = rng.normal(size=(2, 7, 6, 4))
    layer.build(x.shape)
    for v in layer.weights:
        noise = rng.normal(size=v.shape)
        v.assign(np.asarray(v) + 0.3 * noise if v.name == "transform" else noise)
    upstream = rng.normal(size=layer.compute_output_shape(x.shape))

    with tf.GradientTape() as tape:
        value = tf.reduce_sum(layer(tf.constant(x), training=training) * upstream)
    grads = dict(zip([v.name for v in layer.trainable_weights],
                     tape.gradient(value, layer.trainable_weights)))

    # The numpy reference loss of the weights, with each (group, output)'s
    # operator recomputed only when its own parameters move.
    values = {v.name: np.asarray(v, np.float64) for v in layer.weights}
    params = full_params(layer)
    operators = reference.learned_operators(family, params, layer.kernel_size)
    pair_of_row = np.argwhere(~layer.templates)

    def loss(values, operators):
        kernel = reference.materialize_learned(
            values["base_kernel"], layer.assignment, layer.transforms, family, None,
            values["scale"], operators,
        )
        out = reference.conv2d(x, kernel, values["bias"], layer.strides, layer.padding,
                               layer.dilation_rate)
        return float(np.sum(out * upstream))

    step = 1e-6
    for name, grad in grads.items():
        numeric = np.zeros_like(values[name])
        for flat in range(numeric.size):
            results = []
            for sign in (1, -1):
                moved = dict(values)
                moved[name] = values[name].copy()
                moved[name].reshape(-1)[flat] += sign * step
                ops_ = operators
                if name == "transform":  # (parameters, transformed filters)
                    column = flat % values[name].shape[1]
                    g, o = pair_of_row[column]
                    ops_ = operators.copy()
                    ops_[g, o] = reference.learned_operator(
                        family, moved[name][:, column], layer.kernel_size)
                results.append(loss(moved, ops_))
            numeric.reshape(-1)[flat] = (results[0] - results[1]) / (2 * step)
        assert_close(np.asarray(tf.convert_to_tensor(grad)), numeric, rtol=1e-6,
                     what=f"d/d{name}")


def test_requested_implementation_is_kept():
    forced = TransformConv2D(256, 3, transforms="d4", implementation="materialized")
    forced.build((None, 14, 14, 256))
    assert (forced.implementation_used, forced.implementation_reason) == ("materialized", "requested")


def test_materialized_kernel_needs_build():
    with pytest.raises(ValueError, match="built layer"):
        TransformConv2D(8, 3).materialized_kernel()


# ----------------------------------------------------------------------------
# Keras citizenship


@pytest.mark.parametrize(
    "init_kwargs",
    [
        dict(filters=8, kernel_size=3, transforms="rotations", implementation="materialized"),
        dict(filters=8, kernel_size=3, transforms="rotations", implementation="factored",
             padding="same", scale=True),
        dict(filters=6, kernel_size=(3, 5), transforms="flips", base_filters=2, depth_groups=2,
             assignment=[[0, 0], [1, 1], [0, 2], [1, 3], [1, 0], [0, 1]], implementation="factored"),
        dict(filters=8, kernel_size=3, transforms="rotations", transform_family="affine",
             implementation="factored", padding="same"),
        dict(filters=8, kernel_size=3, transforms="rotations", transform_family="scalar",
             implementation="materialized", scale=True),
    ],
    ids=["materialized", "factored-scale", "flips-explicit-groups", "affine-factored",
         "scalar-materialized"],
)
def test_keras_layer_conformance(init_kwargs):
    """The checks Keras runs on its own layers: config, build, symbolic call,
    serialisation, training and mixed precision."""
    case = testing.TestCase()
    trainable = (1 + 1 + int(init_kwargs.get("scale", False))
                 + int(init_kwargs.get("transform_family", "discrete") != "discrete"))
    case.run_layer_test(
        TransformConv2D,
        init_kwargs=init_kwargs,
        input_shape=(2, 7, 7, 4),
        expected_output_shape=TransformConv2D(**init_kwargs).compute_output_shape((2, 7, 7, 4)),
        expected_num_trainable_weights=trainable,
        expected_num_non_trainable_weights=0,
        expected_num_seed_generators=0,
        expected_num_losses=0,
        supports_masking=False,
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fit_with_and_without_jit_agree(implementation):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, size=(16,))

    def train(jit_compile):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([
            keras.Input((8, 8, 3)),
            TransformConv2D(8, 3, transforms="rotations", padding="same", scale=True,
                            activation="relu", implementation=implementation),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4),
        ])
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile,
        )
        before = model.layers[0].base_kernel.numpy().copy()
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return before, model.layers[0].get_weights(), history.history["loss"]

    before, weights_jit, loss_jit = train(True)
    _, weights_eager, loss_eager = train(False)
    assert not np.allclose(before, weights_jit[0]), "training did not move the base kernel"
    for a, b in zip(weights_jit, weights_eager):
        assert_close(a, b, rtol=1e-4)
    np.testing.assert_allclose(loss_jit, loss_eager, rtol=1e-4)


@pytest.mark.parametrize("family", ["discrete", "scalar", "rotation"])
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_mixed_precision(policy, implementation, family):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 9, 9, 8)).astype("float32")
    kwargs = dict(filters=16, kernel_size=3, transforms="d4", scale=True, padding="same",
                  implementation=implementation, transform_family=family)
    full = TransformConv2D(**kwargs)
    full.build(x.shape)
    randomize(full, rng)
    mixed = TransformConv2D(**kwargs, dtype=policy)
    mixed.build(x.shape)
    mixed.set_weights(full.get_weights())
    y = mixed(x)
    assert y.dtype == policy.split("_")[1]
    assert mixed.base_kernel.dtype == "float32"
    if mixed.transform is not None:
        assert mixed.transform.dtype == "float32"
    # Training steps too (the factored path's dense gradient in 16 bits).
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.cast(mixed(x, training=True), "float32"))
    grads = tape.gradient(loss, mixed.trainable_weights)
    assert all(g is not None and np.isfinite(np.asarray(tf.convert_to_tensor(g))).all()
               for g in grads)
    # bfloat16 keeps 8 bits of mantissa: ~1e-2 relative, summed over 72 terms.
    assert_close(np.asarray(tf.cast(y, "float32")), full(x), rtol=0.05 if "bfloat" in policy else 5e-3)


def test_learned_family_config_round_trip():
    layer = TransformConv2D(
        6, 3, base_filters=2, transforms="d4", depth_groups=2, transform_family="rotation",
        assignment=[[0, 0], [1, 1], [0, 2], [1, 3], [1, 0], [0, 1]],
        templates=[True, False, False, False, False, True], transform_regularizer="l2",
    )
    config = layer.get_config()
    json.dumps(config)
    clone = TransformConv2D.from_config(config)
    assert clone.get_config() == config
    np.testing.assert_array_equal(clone.templates, layer.templates)
    assert clone.num_transformed == layer.num_transformed == 8


def test_config_round_trip_and_registered_serialization():
    layer = TransformConv2D(
        6, (3, 5), base_filters=2, transforms="flips", depth_groups=2, scale=True,
        assignment=[[0, 0], [1, 1], [0, 2], [1, 3], [1, 0], [0, 1]],
        activation="relu", kernel_regularizer="l2", name="tc",
    )
    config = layer.get_config()
    json.dumps(config)
    clone = TransformConv2D.from_config(config)
    assert clone.get_config() == config
    np.testing.assert_array_equal(clone.assignment, layer.assignment)
    # Registered: deserialises with no custom_objects.
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, TransformConv2D)
    assert restored.get_config() == config


@pytest.mark.parametrize("family", ["discrete", "scalar", "affine"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_keras_file_round_trip_in_safe_mode(tmp_path, implementation, family):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 12, 12, 16)).astype("float32")
    assignment = np.stack([rng.integers(0, 4, 32), rng.integers(0, 8, 32)], axis=-1)
    model = keras.Sequential([
        keras.Input((12, 12, 16)),
        TransformConv2D(32, 3, base_filters=4, transforms="d4", assignment=assignment,
                        scale=True, padding="same", implementation=implementation,
                        transform_family=family),
    ])
    randomize(model.layers[0], rng)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded(x), model(x))
    np.testing.assert_array_equal(loaded.layers[0].assignment, model.layers[0].assignment)
    # The file holds the bases, not the materialised kernel (3*3*16*32 floats = 18 KB).
    dense = keras.Sequential([keras.Input((12, 12, 16)), keras.layers.Conv2D(32, 3)])
    dense_path = tmp_path / "dense.keras"
    dense.save(dense_path)
    layer = model.layers[0]
    saved = 4 * (3 * 3 * 16 * 28 - (0 if layer.transform is None else np.asarray(layer.transform).size))
    assert path.stat().st_size < dense_path.stat().st_size - 0.9 * saved


def test_runs_and_matches_on_jax_backend(jax_backend):
    script = textwrap.dedent(
        """
        import numpy as np, jax, jax.numpy as jnp, keras
        assert keras.backend.backend() == "jax"
        import sys; sys.path.insert(0, TESTS_DIR)
        import reference
        from tf_transform_conv import TransformConv2D
        from tf_transform_conv.ops import families
        rng = np.random.default_rng(0)
        x = rng.normal(size=(2, 9, 9, 4)).astype("float32")
        worst = 0.0
        def full_params(layer):
            identity = families.identity_params(layer.transform_family, layer.kernel_size)
            params = np.tile(identity.astype(np.float64), layer.templates.shape + (1,))
            if layer.transform is not None:
                params[~layer.templates] = np.asarray(layer.transform).T
            return params
        for impl in ("materialized", "factored"):
            for family in families.FAMILIES:
                for kw in (dict(transforms="d4", padding="same", scale=True, depth_groups=2),
                           dict(transforms="shifts", strides=2, padding="valid")):
                    layer = TransformConv2D(8 * (kw["transforms"] == "d4") + 5 * (kw["transforms"] == "shifts"),
                                            3, implementation=impl, transform_family=family, **kw)
                    layer.build(x.shape)
                    for v in layer.weights:
                        v.assign(rng.normal(size=v.shape).astype("float32"))
                    scale = None if layer.scale_weight is None else np.asarray(layer.scale_weight)
                    kernel = reference.materialize_learned(
                        np.asarray(layer.base_kernel), layer.assignment, layer.transforms,
                        family, full_params(layer), scale)
                    want = reference.conv2d(x, kernel, np.asarray(layer.bias), layer.strides,
                                            layer.padding, layer.dilation_rate)
                    eager = np.asarray(layer(x))
                    jitted = np.asarray(jax.jit(lambda v: layer(v))(x))
                    grads = jax.grad(lambda v: jnp.sum(layer(v, training=True) ** 2))(x)
                    assert np.isfinite(np.asarray(grads)).all()
                    for got in (eager, jitted):
                        worst = max(worst, float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max())))
        result = worst
        """
    ).replace("TESTS_DIR", repr(os.path.dirname(__file__)))
    worst = jax_backend.run(script)
    assert worst <= RTOL, worst


# ----------------------------------------------------------------------------
# Bad input: each a clear error naming the argument and what is allowed


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(filters=0, kernel_size=3), r"filters.*strictly positive.*filters=0"),
        (dict(filters=8, kernel_size=3, base_filters=0), r"base_filters.*\[1, filters=8\].*base_filters=0"),
        (dict(filters=8, kernel_size=3, base_filters=9), r"base_filters.*\[1, filters=8\].*base_filters=9"),
        (dict(filters=8, kernel_size=3, base_filters=2, base_ratio=0.25), r"either `base_filters` or `base_ratio`, not both"),
        (dict(filters=8, kernel_size=3, base_ratio=1.5), r"base_ratio.*\(0, 1\].*1.5"),
        (dict(filters=8, kernel_size=3, base_ratio=0.3), r"whole number of base filters.*2.4"),
        (dict(filters=8, kernel_size=3, assignment=[[0, 0]] * 8), r"explicit `assignment` needs.*base_filters.*base_ratio"),
        (dict(filters=10, kernel_size=3, transforms="rotations"), r"divisible by len\(transforms\).*filters=10.*4 transforms"),
        (dict(filters=8, kernel_size=3, base_filters=4, transforms="rotations"), r"filters == base_filters \* len\(transforms\).*filters=8, base_filters=4.*= 16"),
        (dict(filters=4, kernel_size=3, base_filters=2, assignment=[[0, 0]] * 3), r"shape \(filters, 2\) = \(4, 2\).*Received shape \(3, 2\)"),
        (dict(filters=2, kernel_size=3, base_filters=2, assignment=[[0, 0], [2, 0]]), r"base indices must lie in \[0, base_filters=2\)"),
        (dict(filters=2, kernel_size=3, base_filters=2, assignment=[[0, 0], [1, 4]]), r"transform indices must lie in \[0, 4\)"),
        (dict(filters=2, kernel_size=3, base_filters=2, assignment=[[0, 0.5], [1, 0]]), r"integers"),
        (dict(filters=8, kernel_size=3, implementation="fast"), r"implementation.*'auto', 'materialized', 'factored'.*'fast'"),
        (dict(filters=8, kernel_size=3, padding="causal"), r"padding.*'valid' or 'same'.*'causal'"),
        (dict(filters=8, kernel_size=(3, 5)), r"need a square kernel"),
        (dict(filters=10, kernel_size=1, transforms="shifts", base_filters=2),
         r"`transforms`: transforms \['shift_up', 'shift_down', 'shift_left', 'shift_right'\] move "
         r"every tap of a 1x1 kernel out: their filters would be zero"),
        (dict(filters=8, kernel_size=1), r"on a 1x1 kernel transforms 'rot90' = 'identity', 'rot180' = "
         r"'identity', 'rot270' = 'identity': their filters would be copies"),
        (dict(filters=8, kernel_size=(1, 3), transforms="flips"),
         r"'flip_v' = 'identity', 'rot180' = 'flip_h'.*Received transforms=\['identity', 'flip_h'"),
        (dict(filters=8, kernel_size=3, transforms=["spin"]), r"Unknown transform 'spin'"),
        (dict(filters=8, kernel_size=3, strides=2, dilation_rate=2), r"strides > 1.*dilation_rate > 1"),
        (dict(filters=8, kernel_size=3, depth_groups=0), r"depth_groups.*strictly positive"),
        (dict(filters=8, kernel_size=3, data_format="NHWC"), r"data_format.*'channels_last' or 'channels_first'"),
        (dict(filters=8, kernel_size=0), r"kernel_size.*strictly positive"),
        (dict(filters=True, kernel_size=3), r"`filters`\. Expected a strictly positive int\. Received filters=True\."),
        (dict(filters=8.0, kernel_size=3), r"`filters`\. Expected a strictly positive int\. Received filters=8\.0\."),
        (dict(filters=8, kernel_size="3"),
         r"`kernel_size`\. Expected a strictly positive int or a tuple of 2 strictly positive ints "
         r"\(not a string\)\. Received kernel_size='3'\."),
        (dict(filters=8, kernel_size="33"), r"\(not a string\)\. Received kernel_size='33'\."),
        (dict(filters=8, kernel_size=3.0), r"tuple of 2 strictly positive ints\. Received kernel_size=3\.0\."),
        (dict(filters=8, kernel_size=(3, 3, 3)), r"Received kernel_size=\(3, 3, 3\)\."),
        (dict(filters=8, kernel_size=True), r"Received kernel_size=True\."),
        (dict(filters=8, kernel_size=3, strides="2"), r"`strides`.*\(not a string\)\. Received strides='2'\."),
        (dict(filters=8, kernel_size=3, scale="yes"), r"`scale`\. Expected True or False\. Received scale='yes'\."),
        (dict(filters=8, kernel_size=3, use_bias=1), r"`use_bias`\. Expected True or False\. Received use_bias=1\."),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformConv2D(**kwargs)


def test_bad_inputs_raise_clear_errors():
    layer = TransformConv2D(8, 3, depth_groups=4)
    with pytest.raises(ValueError, match=r"input channels \(6\) must be divisible by depth_groups=4 "
                                         r"in layer 'transform_conv2d.*'"):
        layer.build((None, 8, 8, 6))
    with pytest.raises(ValueError, match=r"expected ndim=4"):
        TransformConv2D(8, 3)(np.zeros((2, 8, 8), "float32"))
    layer = TransformConv2D(8, 3)
    layer(np.zeros((1, 5, 5, 3), "float32"))
    with pytest.raises(ValueError, match=r"axis -1 of input shape to have value 3"):
        layer(np.zeros((1, 5, 5, 4), "float32"))


def test_default_assignment_needs_no_output_permutation():
    layer = TransformConv2D(16, 3, transforms="d4", depth_groups=2)
    layer.build((None, 8, 8, 4))
    assert layer._tables.plan.output_index is None
    assert len(layer._tables.plan.segments) == 8  # one per transform block




def test_gathered_sums_match_reference_for_every_family(monkeypatch):
    """Assignments too scattered for contiguous segments take the per-tap gather route."""
    from tf_transform_conv.ops import factored

    monkeypatch.setattr(factored, "MAX_SLICE_TERMS", 0)
    rng = np.random.default_rng(11)
    assignment = np.stack([rng.integers(0, 3, (2, 12)), rng.integers(0, 12, (2, 12))], axis=-1)
    x = rng.normal(size=(2, 6, 7, 4)).astype("float32")
    for family in families.FAMILIES:
        layer = TransformConv2D(12, 3, base_filters=3, transforms="all", assignment=assignment,
                                depth_groups=2, scale=True, padding="same",
                                implementation="factored", transform_family=family)
        layer.build(x.shape)
        randomize(layer, rng)
        expected, _ = reference_output(layer, x)
        assert_close(layer(x), expected, what=family)


# ----------------------------------------------------------------------------
# Learned families: templates and starting points


def test_templates_are_each_bases_first_identity_output():
    layer = TransformConv2D(6, 3, base_filters=2, transforms=["identity", "rot90"],
                            transform_family="scalar",
                            assignment=[[1, 0], [0, 1], [1, 0], [0, 0], [0, 0], [1, 1]])
    np.testing.assert_array_equal(layer.templates[0], [True, False, False, True, False, False])
    assert layer.num_transformed == 4
    layer.build((None, 5, 5, 3))
    assert tuple(layer.transform.shape) == (9, 4)
    assert layer.count_params() == 3 * 3 * 3 * 2 + 6 + 4 * 9  # bases, bias, multipliers


def test_default_layout_learns_every_output_but_the_bases():
    layer = TransformConv2D(16, 3, transforms="rotations", transform_family="rotation",
                            depth_groups=2)
    np.testing.assert_array_equal(layer.templates, np.arange(16)[None].repeat(2, 0) < 4)
    layer.build((None, 8, 8, 4))
    assert tuple(layer.transform.shape) == (2, 2 * 12)


def test_learned_default_assignment_may_repeat_the_transforms():
    """The paper's layout: few templates, every other filter a learned transform."""
    layer = TransformConv2D(8, 3, base_filters=2, transforms="identity", transform_family="scalar")
    np.testing.assert_array_equal(layer.assignment[0], [[o % 2, 0] for o in range(8)])
    np.testing.assert_array_equal(layer.templates[0], [True, True] + [False] * 6)
    with pytest.raises(ValueError, match=r"filters == base_filters \* len\(transforms\)"):
        TransformConv2D(8, 3, base_filters=2, transforms="identity")


@pytest.mark.parametrize("family", ["scalar", "rotation", "affine", "general"])
def test_switching_family_keeps_the_outputs(family):
    """A learned layer starts exactly as its discrete layer."""
    rng = np.random.default_rng(14)
    x = rng.normal(size=(2, 8, 8, 6)).astype("float32")
    kwargs = dict(filters=12, kernel_size=3, transforms="shifts", base_filters=3, scale=True,
                  assignment=np.stack([rng.integers(0, 3, 12), rng.integers(0, 5, 12)], -1).tolist(),
                  padding="same")
    discrete = TransformConv2D(**kwargs)
    discrete.build(x.shape)
    randomize(discrete, rng)
    for implementation in IMPLEMENTATIONS:
        learned = TransformConv2D(transform_family=family, implementation=implementation, **kwargs)
        learned.build(x.shape)
        learned.set_weights(discrete.get_weights() + [np.asarray(learned.transform)])
        np.testing.assert_allclose(learned(x), discrete(x), atol=1e-5)
        np.testing.assert_array_equal(
            learned.materialized_kernel(), discrete.materialized_kernel()
        )


def test_transform_operators_build_the_kernel():
    rng = np.random.default_rng(15)
    layer = TransformConv2D(8, 3, base_filters=2, transforms="d4", transform_family="affine",
                            depth_groups=2, scale=True)
    layer.build((None, 6, 6, 4))
    randomize(layer, rng)
    operators = np.asarray(layer.transform_operators())
    base = np.asarray(layer.base_kernel, np.float64)
    kernel = np.asarray(layer.materialized_kernel())
    scale = np.asarray(layer.scale_weight)
    for k in range(2):
        for o in range(8):
            b = layer.assignment[k, o, 0]
            want = scale[o] * operators[k, o] @ base[:, :, 2 * k:2 * k + 2, b].reshape(9, 2)
            np.testing.assert_allclose(kernel[:, :, 2 * k:2 * k + 2, o].reshape(9, 2), want,
                                       atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(transform_family="spin"), r"transform_family.*'discrete'.*'spin'"),
        (dict(templates=[True] * 8), r"`templates` applies to the learned transform families"),
        (dict(transform_family="scalar", templates=[1] * 8), r"`templates` to be booleans"),
        (dict(transform_family="scalar", templates=[True] * 3),
         r"`templates` of shape \(filters,\) = \(8,\).*Received shape \(3,\)"),
    ],
)
def test_bad_family_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformConv2D(8, 3, transforms="rotations", **kwargs)


def test_valid_padding_on_a_too_small_input_is_an_error_at_build():
    """As Conv2D: no silently empty output."""
    for channels in (3, 32):
        with pytest.raises(ValueError, match=r"Computed output size would be zero or negative"):
            TransformConv2D(8, 5, transforms="rotations")(np.zeros((1, 4, 4, channels), "float32"))


OUTPUT_SIZE_CASES = [
    # (input size, kernel, strides, dilation, padding): Conv2D decides whether it is an error.
    (4, 5, 1, 1, "valid"), (5, 5, 1, 1, "valid"), (3, 5, 2, 1, "valid"), (5, 5, 3, 1, "valid"),
    (2, 3, 2, 1, "valid"), (4, 3, 1, 2, "valid"), (5, 3, 1, 2, "valid"), (6, 3, 1, 3, "valid"),
    (7, 3, 1, 3, "valid"), (1, 3, 1, 1, "same"), (2, 5, 3, 1, "same"), (3, 5, 1, 2, "same"),
]


@pytest.mark.parametrize("size, kernel, strides, dilation, padding", OUTPUT_SIZE_CASES)
@pytest.mark.parametrize("channels", [3, 32])
def test_output_size_check_matches_conv2d(size, kernel, strides, dilation, padding, channels):
    """compute_output_shape and build raise exactly where Conv2D does, else give its shape."""
    shape = (None, size, size, channels)
    args = dict(strides=strides, dilation_rate=dilation, padding=padding)
    try:
        expected = keras.layers.Conv2D(8, kernel, **args).compute_output_shape(shape)
    except ValueError as error:
        assert "Computed output size would be zero or negative" in str(error)
        expected = None
    layer = TransformConv2D(8, kernel, transforms="rotations", **args)
    if expected is None:
        message = (r"Computed output size would be zero or negative for layer 'transform_conv2d.*': "
                   rf"output \(-?\d+, -?\d+\) from the input's spatial size \({size}, {size}\) .*"
                   rf"strides=\({strides}, {strides}\), dilation_rate=\({dilation}, {dilation}\) and "
                   rf"padding='{padding}'")
        with pytest.raises(ValueError, match=message):
            layer.compute_output_shape(shape)
        with pytest.raises(ValueError, match=message):
            layer.build(shape)
        with pytest.raises(ValueError, match=message):
            keras.Sequential([keras.Input(shape[1:]), TransformConv2D(8, kernel, transforms="rotations", **args)])
    else:
        assert tuple(layer.compute_output_shape(shape)) == tuple(expected)
        y = layer(np.zeros((1,) + shape[1:], "float32"))
        assert tuple(y.shape) == (1,) + tuple(expected)[1:]


@pytest.mark.parametrize("implementation", ["materialized", "factored"])
@pytest.mark.parametrize("channels", [3, 32])
def test_too_small_input_after_a_build_for_any_size_raises_when_called(implementation, channels):
    """Built for an unknown spatial size, the layer checks the size it is called on."""
    layer = TransformConv2D(32, 5, base_filters=8, implementation=implementation)
    model = keras.Sequential([keras.Input((None, None, channels)), layer])
    assert tuple(model(np.zeros((1, 5, 5, channels), "float32")).shape) == (1, 1, 1, 32)
    with pytest.raises(ValueError, match=r"Computed output size would be zero or negative.*"
                                         r"spatial size \(3, 3\)"):
        model(np.zeros((1, 3, 3, channels), "float32"))
    with pytest.raises(ValueError, match=r"Computed output size would be zero or negative"):
        layer(np.zeros((1, 3, 4, channels), "float32"))


def test_factored_training_without_xla_warns_once():
    layer = TransformConv2D(8, 3, transforms="rotations", padding="same", implementation="factored")
    x = np.zeros((1, 6, 6, 4), "float32")
    with pytest.warns(UserWarning, match=r"implementation='factored' without XLA.*jit_compile=True"):
        layer(x, training=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x, training=True)  # once per layer
        layer(x)  # inference: no warning
