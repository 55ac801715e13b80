"""The export graph pass that keeps grouped layers' native channel order and folds batch norm.

Every rewritten model is compared with the Keras model it came from (the
independent reference), on random inputs, with batch norms holding random
statistics so that folding them is visible: float32 within 1e-5 of the output
scale (`max|keras|`) in Keras, and in the `.tflite` file.
"""

import keras
import numpy as np
import pytest

import tf_transform_conv as tc
from tf_transform_conv import TransformConv2D
from tf_transform_conv import export
from tf_transform_conv.export import channel_order
from tf_transform_conv.layers import ChannelGather
from tf_transform_conv.layers import ChannelPad

RTOL = 1e-5


def randomize_batch_norms(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                rng.normal(0, 0.3, beta.shape).astype("float32"),
                rng.normal(0, 0.3, mean.shape).astype("float32"),
                rng.uniform(0.5, 2.0, var.shape).astype("float32"),
            ])
    return model


def inputs_for(model, n=2, seed=1):
    shape = (n,) + tuple(model.inputs[0].shape)[1:]
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def rel_diff(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def deploy(model, keep_order=True, lowering="grouped"):
    deployed, _ = export.deployment_model(model, lowering=lowering, keep_order=keep_order)
    return deployed


def report_of(model, lowering="grouped"):
    deployed = deploy(model, keep_order=False, lowering=lowering)
    return channel_order.propagate_channel_order(deployed)


def cifar_resnet(seed=0):
    keras.utils.set_random_seed(seed)
    model = tc.build_model("resnet20", conv=tc.conv_factory(base_ratio=0.25),
                           input_shape=(16, 16, 3))
    return randomize_batch_norms(model, seed)


@pytest.fixture(scope="module")
def resnet():
    return cifar_resnet()


def test_resnet_keeps_native_order_and_folds_every_batch_norm(resnet):
    rewritten, report = report_of(resnet)
    grouped = [l.name for l in resnet.layers if isinstance(l, TransformConv2D)]
    assert sorted(report.native) == sorted(grouped)
    assert report.gathered == [] and report.gathers == []
    batch_norms = [l.name for l in resnet.layers
                   if isinstance(l, keras.layers.BatchNormalization)]
    assert sorted(report.folded) == sorted(batch_norms)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in rewritten.layers)
    # Option-A shortcuts: every ChannelPad became a 1x1 convolution.
    assert not any(isinstance(l, ChannelPad) for l in rewritten.layers)
    x = inputs_for(resnet)
    assert rel_diff(resnet(x), rewritten(x)) < RTOL


def test_resnet_file_has_no_reorders_and_matches_keras(resnet, tmp_path):
    x = inputs_for(resnet)
    kept = tc.export_tflite(resnet, tmp_path / "kept.tflite", lowering="grouped")
    restored = tc.export_tflite(resnet, tmp_path / "restored.tflite", lowering="grouped",
                                keep_order=False)
    for name in ("TRANSPOSE", "RESHAPE", "GATHER", "MUL"):
        assert kept.op_counts.get(name, 0) == 0, (name, kept.op_counts)
    assert restored.op_counts.get("TRANSPOSE", 0) > 0
    assert kept.num_ops < restored.num_ops
    assert tc.verify_tflite(kept.path, resnet, x).max_rel_diff < RTOL


def test_dense_resnet_subsampled_shortcuts_become_strided_convolutions(tmp_path):
    """Option-A shortcuts (1x1 pooling, then ChannelPad): one strided 1x1
    convolution, so XNNPACK takes the whole file as one partition."""
    keras.utils.set_random_seed(2)
    model = randomize_batch_norms(tc.build_model("resnet20", input_shape=(16, 16, 3)))
    rewritten, report = channel_order.propagate_channel_order(model)
    assert report.native == [] and report.gathers == []
    kinds = [type(l).__name__ for l in rewritten.layers]
    assert "ChannelPad" not in kinds and "MaxPooling2D" not in kinds
    x = inputs_for(model)
    assert rel_diff(model(x), rewritten(x)) < RTOL
    result = tc.export_tflite(model, tmp_path / "dense.tflite")
    assert "MAX_POOL_2D" not in result.op_counts
    # The PAD operators left are the strided convolutions' spatial padding.
    spatial = sum(isinstance(l, keras.layers.ZeroPadding2D) for l in model.layers)
    assert result.op_counts.get("PAD", 0) == spatial
    assert tc.verify_tflite(result.path, model, x).max_rel_diff < RTOL


def test_original_model_is_not_modified(resnet):
    before = [w.copy() for w in resnet.get_weights()]
    deploy(resnet)
    after = resnet.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def grouped_into(outputs_fn, seed=0, base_filters=2):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 4))
    x = TransformConv2D(8, 3, base_filters=base_filters, transforms="rotations",
                        padding="same", scale=True, name="tc")(inputs)
    model = keras.Model(inputs, outputs_fn(x))
    layer = model.get_layer("tc")
    layer.scale_weight.assign(np.random.default_rng(seed).uniform(0.5, 2, 8).astype("float32"))
    return randomize_batch_norms(model, seed)


@pytest.mark.parametrize(
    "name, outputs_fn, gathers",
    [
        # A model output: gathered back to filter order.
        ("output", lambda x: x, 1),
        # Flatten mixes channels with positions: its input returns to filter order.
        ("flatten", lambda x: keras.layers.Dense(3)(keras.layers.Flatten()(
            keras.layers.ReLU()(x))), 1),
        # Channel-wise layers carry the order to a Dense, which takes it in its rows.
        ("dense", lambda x: keras.layers.Dense(3)(keras.layers.GlobalMaxPooling2D()(
            keras.layers.DepthwiseConv2D(3, padding="same")(
                keras.layers.BatchNormalization()(x)))), 0),
        # A grouped product convolution (depth groups) reads its input in filter order.
        ("depth_groups_reader", lambda x: TransformConv2D(
            8, 3, base_filters=2, transforms="rotations", depth_groups=2,
            padding="same")(keras.layers.ReLU()(x)), 1),
        # Two readers: the batch norm cannot fold, both branches follow the order.
        ("two_readers", lambda x: keras.layers.Add()([
            keras.layers.BatchNormalization()(x),
            keras.layers.Conv2D(8, 1)(x)]), 1),
    ],
)
def test_orders_return_to_filter_order_where_needed(name, outputs_fn, gathers):
    model = grouped_into(outputs_fn)
    rewritten, report = report_of(model)
    assert report.native == ["tc"]
    assert len(report.gathers) == gathers
    if name == "two_readers":
        assert report.folded == {}
    x = inputs_for(model)
    assert rel_diff(model(x), rewritten(x)) < RTOL


def test_space_written_by_layers_of_different_orders():
    """Two grouped layers with different base counts add into one stream:
    the space takes one native order, the other layer gathers to it."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 4))
    a = TransformConv2D(8, 3, base_filters=2, transforms="rotations", padding="same",
                        name="a")(inputs)
    b = TransformConv2D(8, 3, base_filters=4, transforms=["identity", "rot180"], padding="same",
                        name="b")(inputs)
    c = TransformConv2D(8, 3, base_filters=2, transforms="rotations", padding="same",
                        name="c")(inputs)
    y = keras.layers.ReLU()(keras.layers.Add()([a, b, c]))
    outputs = keras.layers.Conv2D(5, 3)(y)
    model = keras.Model(inputs, outputs)
    rewritten, report = report_of(model)
    assert sorted(report.native) == ["a", "c"]  # the order two of them share
    assert report.gathered == ["b"]
    x = inputs_for(model)
    assert rel_diff(model(x), rewritten(x)) < RTOL


def test_layers_without_a_native_order_keep_filter_order():
    """Depth groups sum several outputs per filter, and a fitted (uneven)
    assignment pads the groups: neither output is a permutation of the filters."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((8, 8, 4))
    x = TransformConv2D(8, 3, base_filters=2, transforms="rotations", depth_groups=2,
                        padding="same", name="groups")(inputs)
    x = keras.layers.BatchNormalization()(x)
    model = randomize_batch_norms(keras.Model(inputs, x))
    rewritten, report = report_of(model)
    # Still gathered to filter order, the batch norm folded all the same.
    assert report.native == [] and report.gathered == ["groups"]
    assert list(report.folded.values()) == ["groups"]
    x = inputs_for(model)
    assert rel_diff(model(x), rewritten(x)) < RTOL

    # Base 0 builds five filters, base 1 three: the spread pads base 1's group.
    uneven = [[[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2], [0, 2]]]
    inputs = keras.Input((8, 8, 4))
    x = TransformConv2D(8, 3, base_filters=2, transforms="rotations", assignment=uneven,
                        padding="same", name="uneven")(inputs)
    model = keras.Model(inputs, keras.layers.BatchNormalization()(x))
    randomize_batch_norms(model)
    rewritten, report = report_of(model)
    assert report.native == [] and report.gathered == ["uneven"]
    assert list(report.folded.values()) == ["uneven"]
    x = inputs_for(model)
    assert rel_diff(model(x), rewritten(x)) < RTOL


def test_sequential_model():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(8, 3, padding="same"),
        TransformConv2D(16, 3, base_filters=4, transforms="rotations", padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        TransformConv2D(16, 3, base_filters=4, transforms="rotations", strides=2),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4),
    ])
    randomize_batch_norms(model)
    rewritten, report = report_of(model)
    assert len(report.native) == 2 and len(report.folded) == 1 and report.gathers == []
    x = inputs_for(model)
    assert rel_diff(model(x), rewritten(x)) < RTOL


@pytest.mark.parametrize("quantization, rtol", [("float16", 2e-2), ("int8", 0.1)])
def test_quantized_files_match(resnet, tmp_path, quantization, rtol):
    """The reordered quantized file computes what the restored one does, within
    its quantization noise, and both what Keras does."""
    x = inputs_for(resnet, n=8)
    kwargs = {"representative_data": x} if quantization == "int8" else {}
    kept = tc.export_tflite(resnet, tmp_path / "k.tflite", quantization=quantization,
                            lowering="grouped", **kwargs)
    assert kept.op_counts.get("TRANSPOSE", 0) == 0
    assert tc.verify_tflite(kept.path, resnet, x[:2], rtol=rtol).max_rel_diff < rtol


def test_channel_gather_layer_round_trip():
    layer = ChannelGather([2, 0, 1])
    x = np.arange(6, dtype="float32").reshape(2, 3)
    np.testing.assert_array_equal(layer(x), x[:, [2, 0, 1]])
    clone = ChannelGather.from_config(layer.get_config())
    assert clone.indices == [2, 0, 1]
    with pytest.raises(ValueError, match="permutation of range\\(3\\)"):
        ChannelGather([0, 0, 1])


def test_keep_order_must_be_bool(resnet, tmp_path):
    with pytest.raises(ValueError, match="keep_order"):
        export.deployment_model(resnet, keep_order="yes")
    with pytest.raises(ValueError, match="keep_order"):
        tc.export_tflite(resnet, tmp_path / "m.tflite", keep_order=1)
