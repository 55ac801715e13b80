"""Structured filter removal: channel groups, removal against a zeroed-filter reference, costs.

The reference for a removal is the original model with the removed
channels silenced: their filters and biases zeroed in every producer and
their batch-norm scales and offsets zeroed, so those channels carry zeros
everywhere and the next layers ignore them. The smaller model must compute
the same outputs within 1e-5 (absolute, float32, outputs of order 1).
"""

import keras
import numpy as np
import pytest

import tf_transform_conv as tc
from tf_transform_conv import TransformConv2D
from tf_transform_conv.structured import channel_groups
from tf_transform_conv.structured import removal_cost
from tf_transform_conv.structured import remove_filters

ATOL = 1e-5


def residual_model(seed=0):
    """Conv, BN, a residual stream of two producers, a depthwise layer, a Dense head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    a = keras.layers.BatchNormalization(name="stem_bn")(a)
    a = keras.layers.ReLU()(a)
    b = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, name="inner")(a)
    b = keras.layers.BatchNormalization(name="inner_bn")(b)
    b = keras.layers.ReLU()(b)
    b = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(b)
    b = keras.layers.BatchNormalization(name="dw_bn")(b)
    b = keras.layers.Conv2D(8, 1, name="project")(b)
    b = keras.layers.BatchNormalization(name="project_bn")(b)
    x = keras.layers.Add(name="add")([a, b])
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def randomize_batch_norms(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n),
                               rng.normal(0, 0.3, n), rng.uniform(0.5, 1.5, n)])


def silenced(model, keep):
    """A copy of `model` whose removed channels are zero everywhere (the reference)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    groups = {g.name: g for g in channel_groups(model)}
    for name, kept in keep.items():
        group = groups[name]
        for path in group.producers + group.batch_norms:
            layer = copy.get_layer(path)
            width = layer.get_weights()[0].shape[-1]
            # In a residual stream with padded channels, a producer's channel
            # j is group channel j + offset: the producer is centred.
            offset = (group.channels - width) // 2
            drop = np.ones(width, bool)
            drop[[k - offset for k in kept if 0 <= k - offset < width]] = False
            weights = layer.get_weights()
            if isinstance(layer, keras.layers.BatchNormalization):
                weights[0][drop] = 0.0
                weights[1][drop] = 0.0
            else:
                weights[0][..., drop] = 0.0
                if len(weights) > 1:
                    weights[1][drop] = 0.0
            layer.set_weights(weights)
    return copy


def inputs_for(model, batch=2, seed=0):
    shape = (batch,) + tuple(model.input_shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_groups_couple_the_residual_stream():
    groups = {g.name: g for g in channel_groups(residual_model())}
    assert set(groups) == {"stem", "inner", "head"}
    stream = groups["stem"]
    assert stream.producers == ("stem", "project")
    assert stream.consumers == ("inner", "head")
    assert stream.batch_norms == ("stem_bn", "project_bn")
    assert (stream.channels, stream.prunable) == (8, True)
    inner = groups["inner"]
    assert inner.consumers == ("dw", "project")
    assert inner.batch_norms == ("inner_bn", "dw_bn")
    assert not groups["head"].prunable
    assert "output" in groups["head"].reason


@pytest.mark.parametrize("keep", [
    {"inner": [0, 2, 5]},
    {"stem": [1, 2, 3, 7]},
    {"stem": [0, 4], "inner": [3]},
])
def test_removal_matches_silenced_channels(keep):
    model = residual_model()
    randomize_batch_norms(model)
    small = remove_filters(model, keep)
    x = inputs_for(model)
    expected = silenced(model, keep)(x, training=False)
    np.testing.assert_allclose(small(x, training=False), expected, atol=ATOL)
    for name, kept in keep.items():
        assert small.get_layer(name).filters == len(kept)


def test_keeping_everything_changes_nothing():
    model = residual_model()
    randomize_batch_norms(model)
    keep = {g.name: g.channels for g in channel_groups(model) if g.prunable}
    small = remove_filters(model, keep)
    x = inputs_for(model)
    np.testing.assert_allclose(small(x), model(x), atol=ATOL)


def test_count_keeps_the_largest_l1_filters():
    model = residual_model()
    kernel = model.get_layer("inner").get_weights()[0]
    norms = np.abs(kernel).sum(axis=(0, 1, 2))
    expected = np.sort(np.argsort(-norms)[:2])
    by_count = remove_filters(model, {"inner": 2})
    by_index = remove_filters(model, {"inner": expected.tolist()})
    x = inputs_for(model)
    np.testing.assert_allclose(by_count(x), by_index(x), atol=ATOL)


def test_removal_cost_predicts_the_smaller_model():
    model = residual_model()
    keep = {"stem": [0, 4, 5], "inner": [1, 3]}
    small = remove_filters(model, keep)
    predicted = removal_cost(model, keep)
    actual = tc.model_cost(small)
    assert predicted.params == actual.params == small.count_params()
    assert predicted.macs == actual.macs
    # By hand: stem 3*3*3*3 + 3, stem_bn 4*3, inner 3*3*3*2, inner_bn 4*2,
    # dw 3*3*2 + 2, dw_bn 4*2, project 2*3 + 3, project_bn 4*3, head 3*3 + 3.
    assert predicted.params == 84 + 12 + 54 + 8 + 20 + 8 + 9 + 12 + 12


def test_sequential_and_nested_models():
    keras.utils.set_random_seed(1)
    block = keras.Sequential([
        keras.Input((6, 6, 4)),
        keras.layers.Conv2D(5, 3, padding="same", name="b_conv"),
        keras.layers.BatchNormalization(name="b_bn"),
        keras.layers.ReLU(),
    ], name="block")
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 1, name="first")(inputs)
    x = block(x)
    x = keras.layers.Conv2D(3, 3, name="last")(x)
    model = keras.Model(inputs, keras.layers.Flatten()(x))
    randomize_batch_norms(block)
    groups = {g.name: g for g in channel_groups(model)}
    assert list(groups) == ["first", "block/b_conv", "last"]
    assert "nested model 'block'" in groups["first"].reason
    assert groups["block/b_conv"].prunable
    small = remove_filters(model, {"block/b_conv": [0, 2, 4]})
    x = inputs_for(model)
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    bn = reference.get_layer("block").get_layer("b_bn")
    w = bn.get_weights()
    w[0][[1, 3]] = 0.0
    w[1][[1, 3]] = 0.0
    bn.set_weights(w)
    np.testing.assert_allclose(small(x), reference(x), atol=ATOL)

    sequential = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, name="c"),
                                   keras.layers.Conv2D(2, 3, name="d")])
    smaller = remove_filters(sequential, {"c": [0, 3]})
    assert smaller.get_layer("d").kernel.shape == (3, 3, 2, 2)


def test_transform_conv_becomes_conv2d():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8, 8, 3))
    x = TransformConv2D(16, 3, base_filters=2, transforms="d4", scale=True, padding="same",
                        name="tc")(inputs)
    x = keras.layers.Conv2D(4, 3, name="next")(x)
    model = keras.Model(inputs, x)
    small = remove_filters(model, {})
    assert type(small.get_layer("tc")) is keras.layers.Conv2D
    x = inputs_for(model)
    np.testing.assert_allclose(small(x), model(x), atol=ATOL)
    smaller = remove_filters(model, {"tc": [0, 5]})
    kernel = np.asarray(model.get_layer("tc").materialized_kernel())
    np.testing.assert_allclose(smaller.get_layer("tc").kernel, kernel[..., [0, 5]], atol=1e-6)


def test_unfollowed_layers_make_groups_unprunable():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    group = channel_groups(model)[0]
    assert not group.prunable and "Flatten" in group.reason
    with pytest.raises(ValueError, match="group 'conv' cannot be pruned.*Flatten"):
        remove_filters(model, {"conv": 2})


def test_unfollowed_convolutions_are_listed_unprunable_with_their_reason():
    # channels_first: every layer is unfollowed, yet each convolution is a group.
    inputs = keras.Input((3, 8, 8))
    x = keras.layers.Conv2D(8, 3, data_format="channels_first", name="c1")(inputs)
    x = keras.layers.Conv2D(4, 3, data_format="channels_first", name="c2")(x)
    model = keras.Model(
        inputs, keras.layers.GlobalAveragePooling2D(data_format="channels_first")(x))
    groups = channel_groups(model)
    assert [(g.name, g.channels, g.prunable) for g in groups] == [
        ("c1", 8, False), ("c2", 4, False)]
    assert "'c1'" in groups[0].reason and "channels_first" in groups[0].reason
    with pytest.raises(ValueError, match="group 'c1' cannot be pruned.*channels_first"):
        remove_filters(model, {"c1": 4})
    # Keeping every channel of such a group is allowed and changes nothing
    # (compared by weights: TensorFlow runs no channels_first Conv2D on a CPU).
    same = remove_filters(model, {"c1": 8})
    for a, b in zip(same.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    # channels_last: grouped, transposed and depth-multiplied layers sit in
    # running order among the followed groups.
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(8, 1, name="a")(inputs)
    x = keras.layers.Conv2D(8, 3, groups=2, name="g2")(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw2")(x)
    x = keras.layers.Conv2DTranspose(6, 3, name="up")(x)
    x = keras.layers.Conv2D(5, 1, name="b")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(
        keras.layers.GlobalAveragePooling2D()(x)))
    groups = channel_groups(model)
    assert [(g.name, g.channels) for g in groups] == [
        ("a", 8), ("g2", 8), ("dw2", 16), ("up", 6), ("b", 5), ("head", 2)]
    reasons = {g.name: g.reason for g in groups}
    assert "groups=2" in reasons["g2"] and "depth_multiplier=2" in reasons["dw2"]
    assert "Conv2DTranspose" in reasons["up"]
    assert not any(g.prunable for g in groups[:4])
    assert groups[4].prunable


def test_bad_keep_is_rejected():
    model = residual_model()
    with pytest.raises(TypeError, match="Expected a dict"):
        remove_filters(model, [1, 2])
    with pytest.raises(ValueError, match="no channel group is named 'nope'"):
        remove_filters(model, {"nope": 1})
    with pytest.raises(ValueError, match="strictly increasing"):
        remove_filters(model, {"inner": [3, 1]})
    with pytest.raises(ValueError, match=r"strictly increasing.*\[0, 6\)"):
        remove_filters(model, {"inner": [0, 6]})
    with pytest.raises(ValueError, match=r"count in \[1, 6\]"):
        remove_filters(model, {"inner": 0})
    with pytest.raises(ValueError, match="model's output"):
        remove_filters(model, {"head": 1})
    with pytest.raises(ValueError, match="subclassed"):
        class Sub(keras.Model):
            def call(self, x):
                return x
        remove_filters(Sub(), {})


def check_removal(model, keep, tmp_path, x):
    """Keep-all is exact; `keep` matches its predicted cost, saves, reloads and exports."""
    everything = {g.name: g.channels for g in channel_groups(model) if g.prunable}
    np.testing.assert_allclose(remove_filters(model, everything)(x), model(x), atol=ATOL)
    small = remove_filters(model, keep)
    predicted = removal_cost(model, keep)
    assert predicted.params == tc.model_cost(small).params == small.count_params()
    assert predicted.macs == tc.model_cost(small).macs
    assert small.count_params() < model.count_params()
    path = tmp_path / "small.keras"
    small.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(reloaded(x), small(x), atol=ATOL)
    tc.export_tflite(small, tmp_path / "small.tflite")
    tc.verify_tflite(tmp_path / "small.tflite", small, x[:1])
    return small


def test_cifar_resnet56_with_channel_pad(tmp_path):
    model = tc.build_model("resnet56")
    randomize_batch_norms(model)
    groups = {g.name: g for g in channel_groups(model)}
    stream = groups["stem_conv"]
    assert (stream.channels, len(stream.producers), stream.prunable) == (64, 28, True)
    # Keep half of the stream, some of the stage-1 and stage-3 padded channels among them.
    kept_stream = [0, 3, 5, 8, 17, 20, 21, 30, 31, 33, 40, 47, 48, 50, 60, 63]
    keep = {"stem_conv": kept_stream, "stage2_block3_conv1": list(range(0, 32, 3)),
            "stage3_block1_conv1": list(range(1, 64, 3))}
    x = inputs_for(model, batch=2)
    small = check_removal(model, keep, tmp_path, x)
    # Stage 3 pads the stage-2 stream (group channels 16..47) with channels
    # 0..15 and 48..63, stage 2 pads the stem's (24..39) with 16..23 and 40..47.
    assert small.get_layer("stage3_block1_pad").padding == (4, 4)
    assert small.get_layer("stage2_block1_pad").padding == (3, 2)
    expected = silenced(model, keep)(x, training=False)
    np.testing.assert_allclose(small(x, training=False), expected, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("application", ["ResNet50", "MobileNetV2"])
def test_keras_applications(application, tmp_path):
    model = getattr(keras.applications, application)(weights=None, input_shape=(32, 32, 3))
    randomize_batch_norms(model)
    groups = channel_groups(model)
    assert [g.name for g in groups if not g.prunable] == ["predictions"]
    keep = {g.name: max(1, g.channels // 2) for g in groups if g.prunable}
    check_removal(model, keep, tmp_path, inputs_for(model, batch=2))
