"""Quantized files of compact models: smaller than the dense model's, predicted, warned about.

Every compact form (a `TransformConv2D` from `transform_model` or from
structured pruning, a `FilterBasisConv2D`, a `FilterBasisTransformConv2D`,
unstructured-pruned kernels) is exported with `lowering="auto"` in each
quantization and compared with the dense model's file of the same
quantization; `export.file_bytes`'s predictions are compared with the
files the forced forms give. The models are small (8x8 inputs) but their
layers are wide enough (32 -> 64 -> 64 channels) for the compact forms to
pay for their overheads.
"""

import copy
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tf_transform_conv as tc
from tf_transform_conv import export as tc_export
from tf_transform_conv.export import file_bytes
from tf_transform_conv.export import lowering as lowering_lib
from tf_transform_conv.export import grouped as grouped_lib
from tf_transform_conv.export import product_scales
from tf_transform_conv.export import sparse_scales

QUANTIZATIONS = (None, "dynamic", "float16", "int8")
SHAPE = (8, 8, 32)
# `file_bytes` predicts what a layer's form adds to the file: the difference
# between the grouped and the dense file is predicted within this share of
# the dense file. Measured (TF 2.21): off by 2.0% (float32), 3.9% (float16),
# 8.3% (int8) and 6.5% (dynamic range) of the dense file, over-predicting
# the grouped form in the quantized files (the stride-2 layer's four pixel
# phases; in int8 also the spread kernels of this model's d4 transforms
# without a scale, whose channels all peak at 1: the file writes their
# scales once, `export.product_scales.collapse_equal_scales`, but
# `file_bytes` prices that only for the kernels it normalizes, since a batch
# norm folded into the layer would change the peaks), so that `"auto"` errs
# towards the dense form.
PREDICTION_RTOL = {None: 0.08, "float16": 0.08, "dynamic": 0.08, "int8": 0.09}


def dense_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv_a")(inputs)
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same", name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, name="head")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    for layer in model.layers:  # nonzero biases, as a trained model has
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape).astype("float32"))
    return model


def stripped(wrapped):
    tc.update_pruning_step(wrapped, 0)
    return tc.strip_model(wrapped)


def compact_models(model):
    """Each compact form of `model`, by name."""
    transformed, _ = tc.transform_model(model, base_ratio=0.25)
    sparsity = tfmot.sparsity.keras.ConstantSparsity(0.8, 0)
    return {
        "transform_model": transformed,
        "prune_model": stripped(tc.prune_model(model, lambda step: (True, 0.75))),
        "filter_basis": stripped(tc.prune_interspace(model, sparsity, basis="dct")),
        "filter_basis_transform": stripped(
            tc.prune_interspace(transformed, sparsity, basis="dct")),
        "unstructured": stripped(tc.prune_low_magnitude(model, sparsity)),
    }


def export(model, path, quantization, lowering="auto"):
    data = np.random.default_rng(1).normal(size=(8,) + SHAPE).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tc.export_tflite(model, path, quantization=quantization, lowering=lowering,
                                  representative_data=data if quantization == "int8" else None)
    assert result.bytes == os.path.getsize(path)
    return result, [str(w.message) for w in caught if "predicted larger" in str(w.message)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """`{(model name, lowering, quantization): (ExportResult, warnings)}`."""
    folder = tmp_path_factory.mktemp("quantized")
    model = dense_model()
    models = {"dense": model, **compact_models(model)}
    out = {}
    for q in QUANTIZATIONS:
        for name, m in models.items():
            out[name, "auto", q] = export(m, folder / f"{name}_{q}.tflite", q)
        for form in ("grouped", "dense"):
            out["transform_model", form, q] = export(
                models["transform_model"], folder / f"tm_{form}_{q}.tflite", q, form)
    return out


COMPACT = ["transform_model", "prune_model", "filter_basis", "filter_basis_transform",
           "unstructured"]


@pytest.mark.parametrize("name", COMPACT)
@pytest.mark.parametrize("quantization", [None, "float16", "int8"])
def test_auto_compact_file_is_smaller_than_the_dense_models(files, name, quantization):
    compact, warned = files[name, "auto", quantization]
    dense, _ = files["dense", "auto", quantization]
    assert compact.bytes < dense.bytes, (name, quantization, compact.lowerings, compact.bytes,
                                         dense.bytes)
    assert not warned and compact.larger_than_dense == ()


@pytest.mark.parametrize("name", COMPACT)
def test_auto_dynamic_range_file_is_no_larger_than_the_dense_models(files, name):
    """Dynamic-range files cannot store sparse kernels (XNNPACK fails to prepare
    the densified hybrid convolution, TF 2.21): the spread kernels, the
    coefficients and pruned kernels are stored dense, and at these sizes
    every compact form is larger than the dense kernel. `"auto"` then writes
    the layers dense: the file is the dense model's."""
    compact, warned = files[name, "auto", "dynamic"]
    dense, _ = files["dense", "auto", "dynamic"]
    assert compact.bytes <= dense.bytes, (name, compact.lowerings, compact.bytes, dense.bytes)
    assert not warned and not compact.sparse_encoding


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_predicted_bytes_match_the_files(files, quantization):
    """Grouped minus dense, predicted per layer and summed, against the two files."""
    grouped, _ = files["transform_model", "grouped", quantization]
    dense, _ = files["transform_model", "dense", quantization]
    predicted = sum(b["grouped"] - b["dense"] for b in grouped.lowering_bytes.values())
    measured = grouped.bytes - dense.bytes
    assert abs(predicted - measured) <= PREDICTION_RTOL[quantization] * dense.bytes, (
        predicted, measured, dense.bytes)
    if quantization is not None:  # erring towards the dense form
        assert predicted >= measured, (predicted, measured)
    # Each layer's dense prediction against the dense file's share of it.
    assert sum(b["dense"] for b in dense.lowering_bytes.values()) <= dense.bytes


def test_an_asked_form_larger_than_dense_warns(files):
    """The int8 grouped form of a layer with 64 channels per base group's product
    pays per-channel scales: where it is predicted larger the export warns."""
    result, warned = files["transform_model", "grouped", "int8"]
    larger = [n for n, b in result.lowering_bytes.items() if b["grouped"] > b["dense"]]
    assert list(result.larger_than_dense) == larger
    assert bool(warned) == bool(larger)
    for name in larger:
        assert repr(name) in warned[0]
    # Asked for dense, nothing is larger than dense.
    assert files["transform_model", "dense", "int8"][0].larger_than_dense == ()


def test_quantization_is_checked():
    model = dense_model()
    transformed, _ = tc.transform_model(model, base_ratio=0.25)
    layer = [l for l in transformed.layers if isinstance(l, tc.TransformConv2D)][0]
    with pytest.raises(ValueError, match="Expected one of .*Received quantization='int4'"):
        lowering_lib.lowering_decision(layer, "auto", "int4")
    with pytest.raises(ValueError, match="Received quantization='int4'"):
        file_bytes.form_bytes(layer, "dense", "int4")


def test_dropping_the_sparse_inputs_scales_keeps_the_outputs(files):
    """The int8 grouped file holds no scales on DENSIFY inputs, and the bytes put
    back (the file as the converter wrote it, rebuilt with the scales copied
    from the densified tensors) compute the same outputs, bit for bit."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    result, _ = files["transform_model", "grouped", "int8"]
    written = open(result.path, "rb").read()
    assert sparse_scales.drop_sparse_input_scales(written) == (written, 0)
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(written))
    densify = [i for i, c in enumerate(model.operatorCodes)
               if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.DENSIFY]
    graph = model.subgraphs[0]
    restored = 0
    for op in graph.operators:
        if op.opcodeIndex in densify:
            source, target = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
            assert source.quantization is None
            source.quantization = copy.deepcopy(target.quantization)
            restored += len(target.quantization.scale)
    assert restored >= 64 * 4  # the spread kernels' outputs, per phase
    with_scales = flatbuffer_utils.convert_object_to_bytearray(model)
    assert len(with_scales) >= len(written) + 12 * restored
    again, dropped = sparse_scales.drop_sparse_input_scales(with_scales)
    assert dropped == restored and len(again) == len(written)
    x = np.random.default_rng(2).normal(size=(1,) + SHAPE).astype("float32")
    outputs = []
    for flatbuffer in (written, with_scales):
        path = os.path.join(os.path.dirname(result.path), "restored.tflite")
        with open(path, "wb") as f:
            f.write(flatbuffer)
        outputs.append(tc_export.run_tflite(path, x))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def _weight_scales(flatbuffer):
    """`[(rows, scales)]` of the stored int8 weights of every convolution and
    fully-connected operator: the kernel's output channels and its scales."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    kinds = {schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.FULLY_CONNECTED}
    graph, found = model.subgraphs[0], {}
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) not in kinds:
            continue
        tensor = graph.tensors[op.inputs[1]]
        data = model.buffers[tensor.buffer].data
        if data is not None and len(data) and tensor.quantization is not None:
            found[int(op.inputs[1])] = (int(tensor.shape[0]), len(tensor.quantization.scale))
    return list(found.values())


def _products(model):
    deployed, _ = tc_export.deployment_model(model, lowering="grouped", quantization="int8")
    return [kernel for layer in deployed.layers
            if isinstance(layer, tc_export.GroupedTransformConv2D)
            for kernel in layer.plan.product_kernels()]


def test_int8_product_kernels_have_one_scale(files):
    """The grouped form's products (144 = 16 bases x 9 taps for `conv_a`; the
    stride-2 `conv_b` per pixel phase) are quantized with one scale; every
    other kernel keeps one per output channel."""
    result, _ = files["transform_model", "grouped", "int8"]
    scales = _weight_scales(open(result.path, "rb").read())
    assert (144, 1) in scales
    per_tensor = [rows for rows, n in scales if n == 1]
    assert len(per_tensor) >= 1 + 2  # conv_a's products and conv_b's distinct phases
    assert all(n in (1, rows) for rows, n in scales)
    assert sum(rows for rows, n in scales if n == rows) < sum(rows for rows, _ in scales) - 200


def test_per_tensor_products_keep_the_outputs_and_leave_other_kernels(files, tmp_path,
                                                                     monkeypatch):
    """Requantizing the products per tensor: the file computes what Keras does
    as closely as the per-channel file (within 1.5x its error), a file
    without those kernels is left as it is, and a second pass finds nothing."""
    transformed = compact_models(dense_model())["transform_model"]
    kernels = _products(transformed)
    result, _ = files["transform_model", "grouped", "int8"]
    written = open(result.path, "rb").read()
    assert product_scales.per_tensor_products(written, kernels) == (written, 0)
    dense_file = open(files["transform_model", "dense", "int8"][0].path, "rb").read()
    assert product_scales.per_tensor_products(dense_file, kernels) == (dense_file, 0)
    # The converter's file, per channel: rebuilt by exporting without the pass.
    with monkeypatch.context() as patch:
        patch.setattr(tc_export.tflite, "per_tensor_products",
                      lambda flatbuffer, kernels: (flatbuffer, 0))
        per_channel = export(transformed, tmp_path / "per_channel.tflite", "int8", "grouped")[0]
    converted = open(per_channel.path, "rb").read()
    again, count = product_scales.per_tensor_products(converted, kernels)
    assert count >= 3  # conv_a's products, conv_b's distinct phases
    assert len(converted) - len(again) >= 12 * (144 - 1)
    assert _weight_scales(again) == _weight_scales(written)
    x = np.random.default_rng(5).normal(size=(16,) + SHAPE).astype("float32")
    reference = np.asarray(transformed(x))
    errors = [np.abs(tc_export.run_tflite(path, x) - reference).mean()
              for path in (per_channel.path, result.path)]
    assert errors[1] <= 1.5 * errors[0] + 1e-6, errors


@pytest.mark.parametrize("rate", [0.75, 0.5])
def test_small_layers_compact_int8_file_is_smaller(tmp_path, rate):
    """16-32-channel layers (a 15k-parameter CNN) pruned by `prune_model`'s
    defaults to a quarter and to a half: the int8 file `"auto"` writes is
    smaller than the dense model's, its last layer grouped. The fitted
    assignment pads that layer's spread to twice the filters in the float32
    form; the int8 form writes it as one group of the 32 filters, which at
    a half saves more than the fifth of the layer's bytes `"auto"` asks of
    an int8 layer (with the padded slots it saved 7%)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = inputs
    for k, width in enumerate((16, 32, 32)):
        x = keras.layers.Conv2D(width, 3, padding="same", strides=2 if k == 1 else 1,
                                name=f"c{k}")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    compact = stripped(tc.prune_model(model, lambda step: (True, rate)))
    data = np.random.default_rng(1).normal(size=(8, 16, 16, 3)).astype("float32")
    sizes = {}
    for name, m in (("dense", model), ("compact", compact)):
        sizes[name] = tc.export_tflite(m, tmp_path / f"{name}.tflite", quantization="int8",
                                       representative_data=data)
    result = sizes["compact"]
    assert result.bytes < sizes["dense"].bytes, (result.lowerings, result.bytes,
                                                 sizes["dense"].bytes)
    assert result.lowerings["c2"] == "grouped"
    decision = lowering_lib.lowering_decision(compact.get_layer("c2"), "auto", "int8")
    saving = 1 - decision.form_bytes["grouped"] / decision.form_bytes["dense"]
    assert saving >= lowering_lib.AUTO_INT8_MIN_SAVING, saving
    plan = grouped_lib.grouped_plan(compact.get_layer("c2"))
    # The float32 form pads the fitted assignment's slots; the int8 form does not.
    assert plan.spread_outputs() > plan.for_quantization("int8").written_outputs() == 32


def test_an_int8_sparse_dense_layer_runs_as_a_convolution(tmp_path):
    """XNNPACK cannot prepare an int8 FULLY_CONNECTED whose kernel a DENSIFY
    rebuilds: a sparse `Dense` kernel is written as a 1x1 convolution, and
    the file runs with the default delegates, close to Keras."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4, 4, 8))
    x = keras.layers.Flatten()(inputs)
    outputs = keras.layers.Dense(64, activation="relu", name="fc")(x)
    model = keras.Model(inputs, outputs)
    kernel = np.asarray(model.get_layer("fc").kernel)
    kernel[np.random.default_rng(0).random(kernel.shape) < 0.8] = 0.0
    model.get_layer("fc").kernel.assign(kernel)
    x = np.random.default_rng(4).normal(size=(8, 4, 4, 8)).astype("float32")
    result = tc.export_tflite(model, tmp_path / "fc.tflite", quantization="int8",
                              representative_data=x)
    assert result.sparse_encoding and result.op_counts.get("DENSIFY", 0) == 1
    assert "FULLY_CONNECTED" not in result.op_counts and result.op_counts["CONV_2D"] == 1
    tc_export.verify_tflite(result.path, model, x, rtol=0.2)


def wide_model(filters=128, seed=0):
    """8x8x16 -> a 3x3 convolution of `filters` -> head, converted at 1/4:
    more filters than `INT8_SPREAD_GROUP_OUTPUTS`, so int8 files write its
    spread normalized, in merged groups, with a selection after it."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 16))
    x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name="wide")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.Model(inputs, keras.layers.Dense(10, name="head")(x))
    return tc.transform_model(dense, base_ratio=0.25)[0]


def test_equal_scales_are_written_once_and_keep_the_outputs(tmp_path, monkeypatch):
    """`collapse_equal_scales` on the converter's file (the pass turned off):
    the normalized spread kernel, whose channels all peak at 1, and its bias
    take one scale, the file shrinks, and the interpreter computes the same
    outputs, bit for bit; `export_tflite` runs the pass."""
    model = wide_model()
    data = np.random.default_rng(1).normal(size=(8, 8, 8, 16)).astype("float32")

    def write(path):
        return tc.export_tflite(model, path, quantization="int8", representative_data=data,
                                lowering="grouped")

    with monkeypatch.context() as patch:
        patch.setattr(tc_export.tflite, "collapse_equal_scales", lambda flatbuffer: (flatbuffer, 0))
        before = write(tmp_path / "before.tflite")
    written = open(before.path, "rb").read()
    after, collapsed = product_scales.collapse_equal_scales(written)
    assert collapsed >= 1 and len(after) < len(written) - 100 * 12
    assert product_scales.collapse_equal_scales(after) == (after, 0)
    x = np.random.default_rng(5).normal(size=(8, 8, 8, 16)).astype("float32")
    path = tmp_path / "after.tflite"
    path.write_bytes(after)
    np.testing.assert_array_equal(tc_export.run_tflite(path, x),
                                  tc_export.run_tflite(before.path, x))
    exported = open(write(tmp_path / "exported.tflite").path, "rb").read()
    assert _weight_scales(exported) == _weight_scales(after)


def test_the_int8_grouped_form_writes_small_layers_as_one_group():
    """`deployment_model`'s int8 grouped form: up to 64 filters the spread
    convolution is one group writing the filters (no padded slots, no
    selection); wider layers keep their padded slots, normalized, with the
    gains in the selection. float32 files write the plan as it is."""
    model = compact_models(dense_model())["prune_model"]
    forms = {}
    for quantization in (None, "int8"):
        deployed, _ = tc_export.deployment_model(model, lowering="grouped",
                                                 quantization=quantization)
        forms[quantization] = [
            (layer.plan.single_group, layer.plan.normalized_spread(), layer.plan.selects())
            for layer in deployed.layers
            if isinstance(layer, grouped_lib.GroupedTransformConv2D)]
    assert forms[None] == [(False, False, True), (False, False, True)]  # fitted: padded
    assert forms["int8"] == [(True, False, False), (True, False, False)]
    deployed, _ = tc_export.deployment_model(wide_model(), lowering="grouped",
                                             quantization="int8")
    wide = deployed.get_layer("wide").plan
    assert (wide.single_group, wide.normalized_spread(), wide.selects()) == (False, True, True)
    assert wide.spread_groups == wide.int8_spread_groups() > 1


def _conv_filter_shapes(flatbuffer):
    """The filter shapes `(outputs, kh, kw, width)` of every CONV_2D in a file."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    graph = model.subgraphs[0]
    shapes = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.CONV_2D:
            shapes.append(tuple(int(d) for d in graph.tensors[op.inputs[1]].shape))
    return shapes


def test_the_int8_spread_convolution_is_one_group_of_the_filters(files):
    """XNNPACK's int8 grouped convolution costs about as much per group as a
    dense one: the int8 file writes `conv_a`'s spread (16 bases, padded to 8
    slots each: 128 channels in the float32 file, one group of 9 per base,
    then a 1x1 selection) as one group reading all 144 products and writing
    the 64 filters; the stride-2 `conv_b`'s phase spreads (112 padded
    channels) likewise. The file is as close to Keras as the dense model's
    int8 file (max error 0.22 of the output scale for both)."""
    shapes = {q: _conv_filter_shapes(open(files["transform_model", "grouped", q][0].path,
                                          "rb").read())
              for q in (None, "int8")}
    assert (128, 3, 3, 9) in shapes[None] and (64, 1, 1, 128) in shapes[None]
    assert (64, 3, 3, 144) in shapes["int8"]
    assert not any(s[0] in (112, 128) or s[3] in (112, 128) for s in shapes["int8"])
    phases = sorted(s[1:] for s in shapes["int8"] if s[0] == 64 and s[1:3] != (1, 1))
    assert phases == [(1, 2, 64), (2, 1, 64), (2, 2, 64), (3, 3, 144)]  # conv_b's, conv_a's
    assert (64, 1, 1, 16) in shapes["int8"]  # conv_b's centre phase: 1 tap of 16 bases
    transformed = compact_models(dense_model())["transform_model"]
    x = np.random.default_rng(5).normal(size=(16,) + SHAPE).astype("float32")
    errors = [tc_export.verify_tflite(files["transform_model", form, "int8"][0].path,
                                      transformed, x, rtol=float("inf")).max_rel_diff
              for form in ("grouped", "dense")]
    assert errors[0] <= 1.05 * errors[1], errors
