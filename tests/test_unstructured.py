"""Unstructured pruning: MagnitudePruning, InterspacePruning, FilterBasisConv2D, export, cost."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import scipy.fft
import tensorflow as tf
import tensorflow_model_optimization as tfmot

import tf_transform_conv as tc
from tf_transform_conv.cost import model_cost
from tf_transform_conv.export import lowering
from tf_transform_conv.export import sparse_layers
from tf_transform_conv.ops.basis import dct_basis
from tf_transform_conv.ops.masks import magnitude_mask
from tf_transform_conv.pruning import PruningWrapper

# float32 outputs of sums of a few hundred products: relative to the output scale.
RTOL = 1e-5


def assert_close(a, b, rtol=RTOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1e-12, float(np.abs(b).max()))
    assert float(np.abs(a - b).max()) <= rtol * scale, float(np.abs(a - b).max()) / scale


def np_conv2d(x, kernel, strides=(1, 1), padding="valid", dilation=(1, 1)):
    """NHWC convolution in numpy, the reference for every convolution here."""
    kh, kw, c, f = kernel.shape
    (sh, sw), (dh, dw) = strides, dilation
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    n, h, w, _ = x.shape
    if padding == "same":
        oh, ow = -(-h // sh), -(-w // sw)
        ph, pw = max((oh - 1) * sh + eh - h, 0), max((ow - 1) * sw + ew - w, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    oh, ow = (x.shape[1] - eh) // sh + 1, (x.shape[2] - ew) // sw + 1
    y = np.zeros((n, oh, ow, f), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i * dh: i * dh + (oh - 1) * sh + 1: sh,
                      j * dw: j * dw + (ow - 1) * sw + 1: sw, :]
            y += np.einsum("nhwc,cf->nhwf", patch, kernel[i, j])
    return y


def conv_model(seed=0, dense=True):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="conv_b")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, name="head")(x) if dense else x
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 8, 8, 4)).astype("float32"), rng.integers(0, 4, 16)


def wrappers(model):
    return [l for l in model.layers if isinstance(l, PruningWrapper)]


def prune(kind, model, schedule, **kwargs):
    if kind == "sp":
        return tc.prune_low_magnitude(model, schedule, **kwargs)
    return tc.prune_interspace(model, schedule, basis="standard" if kind == "ip" else "dct",
                               **kwargs)


# ----------------------------------------------------------------------------
# The arithmetic


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_magnitude_mask_is_tfmots_mask(sparsity):
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_impl

    rng = np.random.default_rng(int(sparsity * 100))
    weights = rng.normal(size=(3, 3, 4, 5)).astype("float32")
    weights[0, 0, :2] = 0.5  # ties
    reference = pruning_impl.Pruning(
        lambda: 0, [], tfmot.sparsity.keras.ConstantSparsity(sparsity, 0), (1, 1), "AVG"
    )._update_mask(tf.constant(weights))[1].numpy()
    np.testing.assert_array_equal(magnitude_mask(np.abs(weights), sparsity), reference)


@pytest.mark.parametrize("kernel_size", [(3, 3), (5, 5), (3, 5)])
def test_dct_basis_is_the_orthonormal_2d_dct(kernel_size):
    basis = dct_basis(kernel_size)
    np.testing.assert_allclose(basis @ basis.T, np.eye(basis.shape[0]), atol=1e-6)
    w = np.random.default_rng(0).normal(size=kernel_size)
    np.testing.assert_allclose(basis @ w.ravel(), scipy.fft.dctn(w, norm="ortho").ravel(),
                               atol=1e-5)


# ----------------------------------------------------------------------------
# The wrappers compute what the wrapped layer computes


@pytest.mark.parametrize("layer, shape, kinds", [
    (lambda: keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu"),
     (2, 7, 7, 4), ("sp", "ip", "ip-dct")),
    (lambda: keras.layers.Conv2D(6, (3, 5), dilation_rate=2), (2, 9, 11, 4), ("sp", "ip-dct")),
    (lambda: keras.layers.Conv2D(6, 3, groups=2), (2, 6, 6, 4), ("sp",)),
    (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (2, 6, 6, 4), ("sp",)),
    (lambda: keras.layers.Dense(5, activation="tanh"), (2, 3, 4), ("sp",)),
])
@pytest.mark.parametrize("depth_groups", [1, 2])
def test_sparsity_zero_computes_the_wrapped_layer(layer, shape, kinds, depth_groups):
    x = np.random.default_rng(1).normal(size=shape).astype("float32")
    for kind in kinds:
        if kind == "sp" and depth_groups == 2:
            continue
        plain = layer()
        expected = np.asarray(plain(x))
        if kind == "sp":
            wrapper = tc.MagnitudePruning(plain, lambda step: (True, 0.0))
        else:
            wrapper = tc.InterspacePruning(plain, lambda step: (True, 0.0),
                                           basis="standard" if kind == "ip" else "dct",
                                           depth_groups=depth_groups)
        model = keras.Sequential([keras.Input(shape[1:]), wrapper])
        assert tc.update_pruning_step(model, 0) == [wrapper.name]
        assert wrapper.sparsity == 0.0
        assert_close(model(x), expected)


def test_interspace_with_the_standard_basis_starts_as_standard_pruning(data):
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.8, 0)
    sp = prune("sp", conv_model(dense=False), schedule)
    ip = prune("ip", conv_model(dense=False), schedule,
               layers=["conv_a", "conv_b"])
    ip = tc.prune_low_magnitude(ip, schedule, layers=["depthwise"])
    for model in (sp, ip):
        tc.update_pruning_step(model, 0)
    assert [type(w).__name__ for w in wrappers(ip)] == ["InterspacePruning"] * 2 + [
        "MagnitudePruning"]
    for ours, theirs in zip(wrappers(sp), wrappers(ip)):
        np.testing.assert_array_equal(np.asarray(ours.mask), np.asarray(theirs.mask))
    assert_close(ip(data[0]), sp(data[0]))


# ----------------------------------------------------------------------------
# Training under a schedule


@pytest.mark.parametrize("kind, jit", [
    ("sp", True),
    pytest.param("ip", False, marks=pytest.mark.slow),
    ("ip-dct", True),
])
def test_sparsity_follows_the_schedule_and_pruned_entries_stay_zero(data, kind, jit, tmp_path):
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.2, 0.9, begin_step=1, end_step=7,
                                                    frequency=2)
    model = prune(kind, conv_model(), schedule)
    found = wrappers(model)
    assert len(found) == (4 if kind == "sp" else 2)
    record = []

    def check(batch, logs):
        step = int(np.asarray(found[0].pruning_step))
        for wrapper in found:
            mask = np.asarray(wrapper.mask)
            kernel = np.asarray(wrapper.layer.kernel)
            assert np.all(kernel[mask == 0] == 0), (wrapper.name, step)
            record.append((wrapper.name, step, wrapper.sparsity, mask.size))

    model.compile(optimizer=keras.optimizers.Adam(0.05), jit_compile=jit,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*data, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[
        tc.UpdateTransformPruningStep(),
        keras.callbacks.LambdaCallback(on_train_batch_end=check),
        tc.TransformPruningSummaries(str(tmp_path / "logs")),
    ])
    assert os.listdir(tmp_path / "logs")
    reached = {}
    for name, step, sparsity, size in record:
        reached.setdefault(name, {})[step] = (sparsity, size)
    for name, steps in reached.items():
        assert sorted(steps) == list(range(8))
        current = 0.0
        for step, (sparsity, size) in sorted(steps.items()):
            should_prune, target = schedule(step)
            if bool(should_prune):
                current = float(target)
            # tfmot's rounding: round(size * (1 - s)) entries kept.
            assert abs(sparsity - current) <= 0.5 / size + 1e-7, (name, step, sparsity)
        assert abs(sparsity - 0.9) <= 0.5 / size + 1e-7


def test_update_follows_the_schedule_for_a_lone_wrapper():
    wrapper = tc.MagnitudePruning(keras.layers.Dense(8), tfmot.sparsity.keras.ConstantSparsity(
        0.5, begin_step=3, frequency=100))
    wrapper.build((None, 4))
    assert int(np.asarray(wrapper.pruning_step)) == -1
    assert wrapper.update(2) is False and wrapper.sparsity == 0.0
    before = np.abs(np.asarray(wrapper.layer.kernel))
    assert wrapper.update(3) is True and wrapper.sparsity == 0.5
    assert int(np.asarray(wrapper.pruning_step)) == 3
    pruned = np.asarray(wrapper.mask) == 0
    assert np.all(np.asarray(wrapper.layer.kernel)[pruned] == 0)
    assert before[~pruned].min() > before[pruned].max()  # the largest half kept
    assert wrapper.pruning_history == [{"step": 3, "sparsity": 0.5}]


def test_training_without_the_callback_fails_loudly(data):
    model = prune("sp", conv_model(), tfmot.sparsity.keras.ConstantSparsity(0.5, 0))
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="UpdateTransformPruningStep"):
        model.fit(*data, epochs=1, verbose=0)


@pytest.mark.slow
def test_standard_pruning_matches_tfmots_prune_low_magnitude(tmp_path):
    """Same weights, schedule and SGD steps in tfmot (legacy Keras) and here: same masks."""
    rng = np.random.default_rng(0)
    arrays = dict(
        x=rng.normal(size=(20, 5, 5, 2)).astype("float32"),
        y=rng.normal(size=(20, 3)).astype("float32"),
        conv_k=(0.3 * rng.normal(size=(3, 3, 2, 6))).astype("float32"),
        conv_b=np.zeros(6, "float32"),
        head_k=(0.2 * rng.normal(size=(54, 3))).astype("float32"),
        head_b=np.zeros(3, "float32"),
    )
    np.savez(tmp_path / "in.npz", **arrays)
    script = textwrap.dedent("""
        import os, sys
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        import numpy as np, tf_keras, tensorflow_model_optimization as tfmot
        d = np.load(sys.argv[1])
        model = tf_keras.Sequential([
            tf_keras.Input((5, 5, 2)), tf_keras.layers.Conv2D(6, 3, name="conv"),
            tf_keras.layers.Flatten(), tf_keras.layers.Dense(3, name="head")])
        model.get_layer("conv").set_weights([d["conv_k"], d["conv_b"]])
        model.get_layer("head").set_weights([d["head_k"], d["head_b"]])
        schedule = tfmot.sparsity.keras.PolynomialDecay(
            0.2, 0.8, begin_step=1, end_step=7, frequency=2)
        pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
        pruned.compile(tf_keras.optimizers.SGD(0.01), "mse")
        layers = [l for l in pruned.layers if getattr(l, "pruning_vars", None)]
        masks = []
        class Record(tf_keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                masks.append([np.asarray(l.pruning_vars[0][1]) for l in layers])
        pruned.fit(d["x"], d["y"], batch_size=2, epochs=1, shuffle=False, verbose=0,
                   callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), Record()])
        stripped = tfmot.sparsity.keras.strip_pruning(pruned)
        np.savez(sys.argv[2], masks=np.array([[m.ravel() for m in ms] for ms in masks],
                                             dtype=object),
                 conv=stripped.get_layer("conv").kernel.numpy(),
                 head=stripped.get_layer("head").kernel.numpy())
    """)
    (tmp_path / "reference.py").write_text(script)
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, str(tmp_path / "reference.py"),
                           str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = np.load(tmp_path / "out.npz", allow_pickle=True)

    model = keras.Sequential([keras.Input((5, 5, 2)), keras.layers.Conv2D(6, 3, name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(3, name="head")])
    model.get_layer("conv").set_weights([arrays["conv_k"], arrays["conv_b"]])
    model.get_layer("head").set_weights([arrays["head_k"], arrays["head_b"]])
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.2, 0.8, begin_step=1, end_step=7,
                                                    frequency=2)
    pruned = tc.prune_low_magnitude(model, schedule)
    found = wrappers(pruned)
    for wrapper in found:  # tfmot numbers the first batch 1, this package 0
        wrapper.pruning_step.assign(0)
    masks = []
    pruned.compile(keras.optimizers.SGD(0.01), "mse")
    pruned.fit(arrays["x"], arrays["y"], batch_size=2, epochs=1, shuffle=False, verbose=0,
               callbacks=[tc.UpdateTransformPruningStep(), keras.callbacks.LambdaCallback(
                   on_train_batch_end=lambda batch, logs: masks.append(
                       [np.asarray(w.mask).ravel() for w in found]))])
    assert len(masks) == len(reference["masks"]) == 10
    for ours, theirs in zip(masks, reference["masks"]):
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)
    stripped = tc.strip_model(pruned)
    assert_close(stripped.get_layer("conv").kernel, reference["conv"])
    assert_close(stripped.get_layer("head").kernel, reference["head"])
    assert 1 - np.mean(masks[-1][0]) == pytest.approx(1 - round(54 * 0.2) / 54)


# ----------------------------------------------------------------------------
# Strip, save and load


@pytest.mark.parametrize("kind", [
    "sp", pytest.param("ip", marks=pytest.mark.slow), "ip-dct"])
def test_strip_save_and_load_keep_outputs_mask_and_step(data, kind, tmp_path):
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.75, 0, frequency=3)
    model = prune(kind, conv_model(), schedule)
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*data, batch_size=4, epochs=1, verbose=0,
              callbacks=[tc.UpdateTransformPruningStep()])
    x = data[0]
    model.save(tmp_path / "wrapped.keras")
    loaded = keras.saving.load_model(tmp_path / "wrapped.keras", safe_mode=True)
    assert_close(loaded(x), model(x))
    for ours, theirs in zip(wrappers(model), wrappers(loaded)):
        np.testing.assert_array_equal(np.asarray(ours.mask), np.asarray(theirs.mask))
        assert int(np.asarray(theirs.pruning_step)) == 3
        assert type(theirs.schedule).__name__ == "ConstantSparsity"

    stripped = tc.strip_model(model)
    names = {type(l).__name__ for l in stripped.layers}
    assert not any(isinstance(l, PruningWrapper) for l in stripped.layers)
    assert ("FilterBasisConv2D" in names) == (kind != "sp")
    assert_close(stripped(x), model(x))
    stripped.save(tmp_path / "stripped.keras")
    reloaded = keras.saving.load_model(tmp_path / "stripped.keras", safe_mode=True)
    assert_close(reloaded(x), model(x))
    for layer in stripped.layers:
        weight = (layer.coefficients if isinstance(layer, tc.FilterBasisConv2D)
                  else getattr(layer, "kernel", None))
        if weight is not None and layer.name.startswith("conv"):
            assert np.mean(np.asarray(weight) == 0) == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize("kwargs, shape", [
    (dict(padding="same"), (2, 7, 7, 4)),
    (dict(strides=2, dilation_rate=1, padding="valid"), (2, 9, 8, 4)),
    (dict(kernel_size=(3, 5), dilation_rate=2, depth_groups=2), (2, 10, 12, 4)),
    (dict(depth_groups=4, use_bias=False, activation="relu", padding="same"), (1, 5, 5, 4)),
    (dict(data_format="channels_first", padding="same"), (2, 4, 6, 6)),
])
def test_filter_basis_conv_matches_numpy(kwargs, shape):
    kwargs = {"kernel_size": 3, **kwargs}
    layer = tc.FilterBasisConv2D(5, **kwargs)
    rng = np.random.default_rng(2)
    x = rng.normal(size=shape).astype("float32")
    layer.build(shape)
    taps = layer.kernel_size[0] * layer.kernel_size[1]
    groups = layer.depth_groups
    basis = rng.normal(size=(groups, taps, taps)).astype("float32")
    coefficients = rng.normal(size=layer.coefficients.shape).astype("float32")
    coefficients[rng.random(coefficients.shape) < 0.8] = 0
    weights = [layer.basis_to_depthwise(basis, layer.kernel_size), coefficients]
    if layer.use_bias:
        weights.append(rng.normal(size=5).astype("float32"))
    layer.set_weights(weights)
    # Reference: W[:, :, c, o] = sum_j C[j, c, o] F_{group(c), j}.
    channels = coefficients.shape[1]
    group = np.arange(channels) // (channels // groups)
    kernel = np.einsum("cjt,jco->tco", basis[group], coefficients).reshape(
        *layer.kernel_size, channels, 5)
    assert_close(layer.materialized_kernel(), kernel)
    nhwc = np.transpose(x, (0, 2, 3, 1)) if layer.data_format == "channels_first" else x
    expected = np_conv2d(nhwc, kernel, layer.strides, layer.padding, layer.dilation_rate)
    if layer.use_bias:
        expected = expected + weights[2]
    if kwargs.get("activation") == "relu":
        expected = np.maximum(expected, 0)
    if layer.data_format == "channels_first":
        expected = np.transpose(expected, (0, 3, 1, 2))
    got = layer(x)
    assert got.shape == expected.shape == layer.compute_output_shape(shape)
    assert_close(got, expected)
    jitted = tf.function(layer.__call__, jit_compile=True)
    assert_close(jitted(tf.constant(x)), expected)


# ----------------------------------------------------------------------------
# Deployment and cost


def weighty_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 16))
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv_a")(inputs)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="head")(x))


def test_tflite_at_ninety_percent_is_at_most_a_fifth_of_the_dense_file(tmp_path):
    model = weighty_model()
    x = np.random.default_rng(3).normal(size=(3, 8, 8, 16)).astype("float32")
    dense = tc.export_tflite(model, tmp_path / "dense.tflite")
    assert "DENSIFY" not in dense.op_counts  # no sparse encoding for dense weights
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.9, 0)
    for kind in ("sp", "ip-dct"):
        pruned = prune(kind, model, schedule, layers=["conv_a", "conv_b"])
        tc.update_pruning_step(pruned, 0)
        stripped = tc.strip_model(pruned)
        path = tmp_path / f"{kind}.tflite"
        result = tc.export_tflite(stripped, path)
        assert result.bytes <= 0.2 * dense.bytes, (kind, result.bytes, dense.bytes)
        assert result.op_counts.get("DENSIFY", 0) >= 2  # the kernels are stored sparse
        if kind != "sp":  # depthwise basis stage, then a 1x1 with the coefficients
            assert result.op_counts["DEPTHWISE_CONV_2D"] == 2
        tc.verify_tflite(path, stripped, x)


def test_cost_reports_nonzeros_and_both_forms():
    model = conv_model()
    schedule = lambda step: (True, 0.75)  # noqa: E731
    sp = tc.prune_low_magnitude(model, schedule, layers=["conv_a"])
    ip = tc.prune_interspace(model, schedule, basis="dct", layers=["conv_a"])
    for pruned in (sp, ip):
        tc.update_pruning_step(pruned, 0)
    sp_cost = model_cost(sp).layers[0]
    dense_cost = model_cost(model).layers[0]
    assert sp_cost.params == dense_cost.params == 3 * 3 * 4 * 8 + 8
    assert sp_cost.nonzeros == round(288 * 0.25) + 8
    assert sp_cost.macs == dense_cost.macs == 8 * 8 * 288
    assert sp_cost.nonzero_macs == 8 * 8 * 72
    assert model_cost(tc.strip_model(sp)).layers[0] == dataclass_replace(
        sp_cost, name="conv_a", class_name="Conv2D")

    ip_cost = model_cost(ip).layers[0]
    assert ip_cost.params == 296 + 81 and ip_cost.nonzeros == 72 + 81 + 8
    assert ip_cost.macs == dense_cost.macs
    assert ip_cost.nonzero_macs == 8 * 8 * (4 * 81 + 72)  # dense DCT basis, sparse coefficients
    stripped = model_cost(tc.strip_model(ip))
    basis_cost = stripped.layers[0]
    assert basis_cost.class_name == "FilterBasisConv2D"
    assert basis_cost.params == ip_cost.params and basis_cost.nonzeros == ip_cost.nonzeros
    assert basis_cost.macs == 8 * 8 * 4 * 9 * (9 + 8)
    assert basis_cost.dense_macs == dense_cost.macs
    assert basis_cost.nonzero_macs == ip_cost.nonzero_macs
    assert stripped.nonzeros == model_cost(model).params - (288 - 72) + 81
    lines = []
    stripped.summary(print_fn=lines.append)
    assert any(line.startswith("  nonzero:") for line in lines)


def dataclass_replace(cost, **changes):
    import dataclasses

    return dataclasses.replace(cost, **changes)


# ----------------------------------------------------------------------------
# A TransformConv2D's bases in the filter basis


def transform_conv_model(seed=0, implementation="auto", depth_groups=1):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 4))
    x = tc.TransformConv2D(8, 3, base_filters=2, transform_family="scalar",
                           transforms="identity", scale=True, padding="same",
                           depth_groups=depth_groups, implementation=implementation,
                           name="tc_a")(inputs)
    x = keras.layers.BatchNormalization(name="bn_a")(x)
    x = keras.layers.ReLU()(x)
    x = tc.TransformConv2D(8, 3, base_filters=2, transforms="rotations", strides=2,
                           padding="same", activation="relu",
                           implementation=implementation, name="tc_b")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(x))


@pytest.mark.parametrize("kwargs, basis_groups, shape", [
    (dict(transforms="rotations", padding="same", scale=True), 1, (2, 7, 7, 4)),
    (dict(transform_family="scalar", transforms="identity", strides=2, depth_groups=2),
     2, (2, 9, 8, 4)),
    (dict(transform_family="affine", transforms="identity", depth_groups=2, use_bias=False),
     1, (1, 6, 6, 4)),
    (dict(transforms="flips", kernel_size=(3, 5), dilation_rate=2, implementation="factored"),
     1, (2, 10, 12, 4)),
])
def test_filter_basis_transform_conv_matches_numpy_bases(kwargs, basis_groups, shape):
    kwargs = {"kernel_size": 3, "base_filters": 1, **kwargs}
    filters = 4
    layer = tc.FilterBasisTransformConv2D(filters, basis_groups=basis_groups, **kwargs)
    reference = tc.TransformConv2D(filters, **kwargs)  # holds the bases themselves
    rng = np.random.default_rng(4)
    x = rng.normal(size=shape).astype("float32")
    layer.build(shape)
    reference.build(shape)
    taps = layer.kernel_size[0] * layer.kernel_size[1]
    basis = rng.normal(size=(basis_groups, taps, taps)).astype("float32")
    weights = [rng.normal(size=w.shape).astype("float32") for w in reference.weights]
    coefficients = weights[0]
    coefficients[rng.random(coefficients.shape) < 0.7] = 0
    layer.set_weights(weights + [basis])
    # B[:, :, c, b] = sum_j C[j, c, b] F_{group(c), j}, in numpy.
    c = coefficients.reshape(taps, -1, coefficients.shape[-1])
    group = np.arange(c.shape[1]) // (c.shape[1] // basis_groups)
    bases = np.einsum("cjt,jcb->tcb", basis[group], c).reshape(coefficients.shape)
    reference.set_weights([bases] + weights[1:])
    assert_close(layer.materialized_kernel(), reference.materialized_kernel())
    expected = np.asarray(reference(x))
    assert_close(layer(x), expected)
    jitted = tf.function(layer.__call__, jit_compile=True)
    assert_close(jitted(tf.constant(x)), expected)


@pytest.mark.parametrize("implementation", ["materialized", "factored"])
@pytest.mark.parametrize("basis, depth_groups", [("standard", 1), ("dct", 2)])
def test_interspace_of_a_transform_conv_at_sparsity_zero_computes_the_layer(
        data, implementation, basis, depth_groups):
    model = transform_conv_model(implementation=implementation, depth_groups=2)
    expected = np.asarray(model(data[0]))
    pruned = tc.prune_interspace(model, lambda step: (True, 0.0), basis=basis,
                                 depth_groups=depth_groups)
    found = wrappers(pruned)
    assert [w.layer.name for w in found] == ["tc_a", "tc_b"]
    # tc_b has one channel group: one basis whatever depth_groups asks.
    assert [w.depth_groups for w in found] == [depth_groups, 1]
    assert [w.layer.implementation_used for w in found] == [implementation] * 2
    tc.update_pruning_step(pruned, 0)
    assert_close(pruned(data[0]), expected)
    stripped = tc.strip_model(pruned)
    assert [type(l).__name__ for l in stripped.layers if l.name.startswith("tc")] == [
        "FilterBasisTransformConv2D"] * 2
    assert_close(stripped(data[0]), expected)


@pytest.mark.parametrize("jit", [True, False])
def test_interspace_of_a_transform_conv_trains_under_the_schedule(data, jit, tmp_path):
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.2, 0.8, begin_step=0, end_step=4,
                                                    frequency=2)
    model = tc.prune_interspace(transform_conv_model(), schedule, basis="dct")
    found = wrappers(model)
    before = {w.name: [np.asarray(v).copy() for v in (w.basis_filters, w.layer.transform)
                       if v is not None] for w in found}
    sparsities = []

    def check(batch, logs):
        for wrapper in found:
            mask = np.asarray(wrapper.mask)
            assert np.all(np.asarray(wrapper.layer.base_kernel)[mask == 0] == 0)
        sparsities.append([w.sparsity for w in found])

    model.compile(optimizer=keras.optimizers.Adam(0.05), jit_compile=jit,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*data, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[
        tc.UpdateTransformPruningStep(), keras.callbacks.LambdaCallback(on_train_batch_end=check),
    ])
    size = np.asarray(found[0].mask).size
    # Steps 0, 2 and 4 prune; the coefficients keep round(size * (1 - s)).
    assert len(sparsities) == 8
    current = None
    for step, reached in enumerate(sparsities):
        should_prune, target = schedule(step)
        if bool(should_prune):
            current = float(target)
        assert reached[0] == pytest.approx(current, abs=0.5 / size + 1e-7), step
    assert current == pytest.approx(0.8)
    for wrapper in found:  # the basis and the transforms train with the coefficients
        for old, new in zip(before[wrapper.name], (wrapper.basis_filters, wrapper.layer.transform)):
            assert not np.allclose(old, np.asarray(new))

    x = data[0]
    model.save(tmp_path / "wrapped.keras")
    loaded = keras.saving.load_model(tmp_path / "wrapped.keras", safe_mode=True)
    assert_close(loaded(x), model(x))
    stripped = tc.strip_model(model)
    assert_close(stripped(x), model(x))
    stripped.save(tmp_path / "stripped.keras")
    reloaded = keras.saving.load_model(tmp_path / "stripped.keras", safe_mode=True)
    assert_close(reloaded(x), model(x))
    layer = reloaded.get_layer("tc_a")
    assert type(layer) is tc.FilterBasisTransformConv2D
    assert np.mean(np.asarray(layer.base_kernel) == 0) == pytest.approx(0.8, abs=0.02)


def wide_transform_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 32))
    x = tc.TransformConv2D(64, 3, base_filters=16, transforms="rotations", padding="same",
                           scale=True, name="tc_a")(inputs)
    x = keras.layers.BatchNormalization(name="bn_a")(x)
    x = keras.layers.ReLU()(x)
    x = tc.TransformConv2D(64, 3, base_filters=16, transforms="rotations", padding="same",
                           activation="relu", name="tc_b")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="head")(x))


def test_a_filter_basis_transform_conv_exports_its_sparse_coefficients(tmp_path):
    model = wide_transform_model()
    x = np.random.default_rng(5).normal(size=(3, 8, 8, 32)).astype("float32")
    plain = tc.export_tflite(model, tmp_path / "plain.tflite")
    pruned = tc.prune_interspace(model, tfmot.sparsity.keras.ConstantSparsity(0.9, 0),
                                 basis="dct")
    tc.update_pruning_step(pruned, 0)
    stripped = tc.strip_model(pruned)
    assert sparse_layers(stripped) == ["tc_a", "tc_b"]
    path = tmp_path / "basis.tflite"
    result = tc.export_tflite(stripped, path)
    assert set(result.lowerings.values()) == {"grouped"}
    assert "filter basis" in lowering.lowering_choice(stripped.get_layer("tc_a"))[1]
    tc.verify_tflite(path, stripped, x, rtol=1e-5)
    # Products, basis mixing and spread per layer, all convolutions (one
    # XNNPACK partition), the coefficients stored sparse.
    assert result.op_counts["CONV_2D"] == 6 and result.op_counts.get("GATHER", 0) == 0
    assert result.op_counts["DENSIFY"] >= 2
    # 13,824 base weights in the plain file, a tenth of them in this one.
    saved = 4 * 0.9 * 9 * (32 + 64) * 16
    assert result.bytes <= plain.bytes - 0.75 * saved, (result.bytes, plain.bytes)


def test_a_basis_per_channel_group_and_stride_two_export_exactly(data, tmp_path):
    model = transform_conv_model(depth_groups=2)
    pruned = tc.prune_interspace(model, lambda step: (True, 0.6), basis="dct", depth_groups=2)
    tc.update_pruning_step(pruned, 0)
    rng = np.random.default_rng(6)
    for wrapper in wrappers(pruned):  # trained bases: a different one per group
        wrapper.basis_filters.assign(rng.normal(size=wrapper.basis_filters.shape))
    stripped = tc.strip_model(pruned)
    assert [stripped.get_layer(n).basis_groups for n in ("tc_a", "tc_b")] == [2, 1]
    path = tmp_path / "groups.tflite"
    # Asked for: at these sizes `"auto"` writes the layers dense, which is smaller.
    result = tc.export_tflite(stripped, path, lowering="grouped")
    assert result.lowerings == {"tc_a": "grouped", "tc_b": "grouped"}
    tc.verify_tflite(path, stripped, data[0], rtol=1e-5)


def test_cost_of_a_transform_conv_in_a_filter_basis():
    inputs = keras.Input((12, 12, 16))
    layer = tc.TransformConv2D(32, 3, base_filters=4, transforms="d4", scale=True,
                               padding="same", implementation="factored", name="t")
    model = keras.Model(inputs, layer(inputs))
    pruned = tc.prune_interspace(model, lambda step: (True, 0.75), basis="dct")
    tc.update_pruning_step(pruned, 0)
    plain = model_cost(model).layers[0]
    wrapped = model_cost(pruned).layers[0]
    stripped = model_cost(tc.strip_model(pruned)).layers[0]
    assert plain.params == 9 * 16 * 4 + 32 + 32
    assert wrapped.params == stripped.params == plain.params + 81
    assert wrapped.nonzeros == stripped.nonzeros == plain.params + 81 - 432
    assert wrapped.macs == stripped.macs == plain.macs == 144 * 16 * 9 * 4
    assert wrapped.dense_macs == plain.dense_macs
    # Products with the 144 nonzero coefficients, then 81 basis taps per
    # (base, pixel): the grouped TFLite form's work.
    assert wrapped.nonzero_macs == stripped.nonzero_macs == 144 * 144 + 144 * 4 * 81
    assert plain.nonzero_macs == plain.macs


# ----------------------------------------------------------------------------
# Bad input


def test_bad_arguments_are_named():
    schedule = lambda step: (False, 0.0)  # noqa: E731
    with pytest.raises(ValueError, match="MagnitudePruning cannot wrap Conv2DTranspose"):
        tc.MagnitudePruning(keras.layers.Conv2DTranspose(4, 3), schedule)
    with pytest.raises(ValueError, match="1x1 kernel"):
        tc.InterspacePruning(keras.layers.Conv2D(4, 1), schedule)
    with pytest.raises(ValueError, match="groups=2"):
        tc.InterspacePruning(keras.layers.Conv2D(4, 3, groups=2), schedule)
    with pytest.raises(ValueError, match=r"`basis`.*Received basis='haar'"):
        tc.prune_interspace(conv_model(), schedule, basis="haar")
    with pytest.raises(ValueError, match=r"Received depth_groups=0"):
        tc.InterspacePruning(keras.layers.Conv2D(4, 3), schedule, depth_groups=0)
    wrapper = tc.InterspacePruning(keras.layers.Conv2D(4, 3), schedule, depth_groups=3)
    with pytest.raises(ValueError, match="divisible by depth_groups=3"):
        wrapper.build((None, 8, 8, 4))
    with pytest.raises(ValueError, match="`schedule`"):
        tc.prune_low_magnitude(conv_model(), 0.5)
    with pytest.raises(ValueError, match="load the model first"):
        tc.prune_low_magnitude("model.keras", schedule)
    with pytest.raises(ValueError, match=r"No eligible layer is named \['head'\]"):
        tc.prune_interspace(conv_model(), schedule, layers=["head"])
    with pytest.raises(ValueError, match="wrapped no layer"):
        tc.prune_interspace(conv_model(), schedule, layers=lambda layer: False)
    grouped = tc.TransformConv2D(8, 3, base_filters=2, depth_groups=2)
    with pytest.raises(ValueError, match="depth_groups=4 must divide the layer's depth_groups=2"):
        tc.InterspacePruning(grouped, schedule, depth_groups=4)
    with pytest.raises(ValueError, match="1x1 kernel"):
        tc.InterspacePruning(tc.TransformConv2D(8, 1, transforms="identity"), schedule)
    with pytest.raises(ValueError, match="basis_groups=2 must divide depth_groups=1"):
        tc.FilterBasisTransformConv2D(8, 3, base_filters=2, basis_groups=2)
    with pytest.raises(ValueError, match="already in a filter basis"):
        tc.InterspacePruning(tc.FilterBasisTransformConv2D(8, 3, base_filters=2), schedule)
    wrapped = tc.prune_low_magnitude(conv_model(), schedule)
    with pytest.raises(ValueError, match=r"still holds pruning wrappers \[.magnitude_pruning_conv_a."):
        tc.export_tflite(wrapped, "/tmp/never-written.tflite")


def test_a_wrapped_layer_is_not_wrapped_twice():
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, 0)  # cloned by its config
    ip = tc.prune_interspace(conv_model(), schedule)
    both = tc.prune_low_magnitude(ip, schedule)
    kinds = sorted(type(l).__name__ for l in wrappers(both))
    assert kinds == ["InterspacePruning"] * 2 + ["MagnitudePruning"] * 2
