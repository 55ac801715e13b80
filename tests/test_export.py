"""TFLite and SavedModel export: the factored rewrite, file sizes, the check, errors, the CLI.

Float32 tolerance: the file's outputs within 1e-4 of the Keras model's,
relative to the output scale (`max|keras|`); float16 weights within 1e-2.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_transform_conv as tc
from tf_transform_conv import TransformConv2D
from tf_transform_conv import cli
from tf_transform_conv import export
from tf_transform_conv.export import checks as export_checks
from tf_transform_conv.export import grouped as grouped_lib
from tf_transform_conv.export import lowering as lowering_lib

from tflite_util import FIXED_OVERHEAD
from tflite_util import overhead_allowance
from tflite_util import tensor_shapes

RTOL = 1e-4


def transform_conv_model(seed=0):
    """Both execution paths, strides, scale, dilation and depth groups."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((10, 10, 4))
    x = TransformConv2D(16, 3, base_filters=4, transforms="rotations", padding="same",
                        activation="relu", implementation="materialized", name="tc_a")(inputs)
    x = TransformConv2D(16, 3, base_filters=2, transforms="d4", strides=2, padding="same",
                        scale=True, name="tc_b")(x)
    x = TransformConv2D(8, 3, base_filters=2, transforms="flips", dilation_rate=2,
                        depth_groups=2, implementation="materialized", name="tc_c")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(5, name="head")(x)
    model = keras.Model(inputs, outputs)
    # Random scales: the scale path must reach the file too.
    layer = model.get_layer("tc_b")
    layer.scale_weight.assign(np.random.default_rng(seed).uniform(-2, 2, 16).astype("float32"))
    return model


def conv_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_a")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, name="head")(x)
    return keras.Model(inputs, outputs)


def stripped_model():
    wrapped = tc.prune_model(conv_model(1), lambda step: (True, 0.75))
    tc.update_pruning_step(wrapped, 0)
    return wrapped, tc.strip_model(wrapped)


def size_model(implementation="materialized", seed=0):
    """Weights dominated by two TransformConv2D layers (the size test's model)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 64))
    x = TransformConv2D(256, 3, base_filters=32, transforms="d4", padding="same",
                        implementation=implementation)(inputs)
    x = TransformConv2D(256, 3, base_filters=32, transforms="d4", padding="same",
                        implementation=implementation)(x)
    return keras.Model(inputs, x)


def inputs_for(model, n=5, seed=0):
    shape = (n,) + tuple(model.inputs[0].shape)[1:]
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def dense_kernel_shapes(model, skip=()):
    """The TFLite (out, kh, kw, in) shape of each TransformConv2D's materialised kernel."""
    return {
        (layer.filters, *layer.kernel_size, layer.base_kernel.shape[2])
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, TransformConv2D) and layer.name not in skip
    }


def assert_factored(result, model):
    """No materialised kernel in the file: it holds the bases (and the grouped form's spreads).

    Layers that `lowering="auto"` wrote dense (a stem: no larger, fewer
    multiply-adds) are left out.
    """
    assert result.op_counts, "the interpreter listed no operators"
    dense = dense_kernel_shapes(
        model, skip={name for name, form in result.lowerings.items() if form == "dense"})
    assert dense, "the model has no TransformConv2D"
    assert not dense & tensor_shapes(result.path), (dense, result.op_counts)


# ----------------------------------------------------------------------------
# Float export matches the Keras model


@pytest.mark.parametrize("kind", ["transform_conv", "transform_model", "stripped"])
def test_float_export_matches_keras_model(kind, tmp_path):
    if kind == "transform_conv":
        model = transform_conv_model()
    elif kind == "transform_model":
        model, _ = tc.transform_model(conv_model(), base_ratio=0.25)
    else:
        _, model = stripped_model()
    # The converted models' layers are small: `"auto"` writes them dense, which
    # takes fewer bytes in the file (`lowering.lowering_choice`); asked for
    # grouped, the file stores the bases.
    lowering = "auto" if kind == "transform_conv" else "grouped"
    result = export.export_tflite(model, tmp_path / "m.tflite", lowering=lowering)
    assert result.path == str(tmp_path / "m.tflite")
    assert result.bytes == os.path.getsize(result.path)
    assert result.quantization is None and result.batch_size == 1
    assert result.params == tc.model_cost(model).params
    assert result.param_bytes == 4 * result.params
    assert_factored(result, model)
    check = export.verify_tflite(result.path, model, inputs_for(model), rtol=RTOL)
    assert check.max_rel_diff <= RTOL, check
    assert check.samples == 5


def test_several_inputs_and_outputs_keep_their_order(tmp_path):
    """Inputs named out of alphabetical order, outputs of different sizes."""
    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 16), name="z_image")
    vector = keras.Input((3,), name="a_vector")
    x = TransformConv2D(32, 3, base_filters=8, transforms="rotations",
                        implementation="materialized")(image)
    x = keras.layers.GlobalAveragePooling2D()(x)
    first = keras.layers.Dense(2)(keras.layers.Concatenate()([x, vector]))
    second = keras.layers.Dense(6)(vector)
    model = keras.Model([image, vector], [first, second])
    result = export.export_tflite(model, tmp_path / "m.tflite")
    assert_factored(result, model)
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(3, 8, 8, 16)).astype("float32"),
              rng.normal(size=(3, 3)).astype("float32")]
    export.verify_tflite(result.path, model, inputs, rtol=RTOL)
    outputs = export.run_tflite(result.path, {"z_image": inputs[0], "a_vector": inputs[1]})
    assert [o.shape for o in outputs] == [(3, 2), (3, 6)]


def test_factored_model_rewrites_only_what_is_needed():
    model = transform_conv_model()
    factored = export.factored_model(model)
    paths = {l.name: l.implementation_used for l in factored.layers if isinstance(l, TransformConv2D)}
    assert paths == {"tc_a": "factored", "tc_b": "factored", "tc_c": "factored"}
    x = inputs_for(model)
    np.testing.assert_allclose(factored(x), model(x), atol=RTOL * float(np.abs(model(x)).max()))
    dense = conv_model()
    assert export.factored_model(dense) is dense  # nothing to rewrite


def test_batch_size_pads_the_last_batch(tmp_path):
    model = transform_conv_model()
    result = export.export_tflite(model, tmp_path / "b2.tflite", batch_size=2)
    assert result.batch_size == 2
    outputs = export.run_tflite(result.path, inputs_for(model, n=5))
    assert outputs[0].shape == (5, 5)
    export.verify_tflite(result.path, model, inputs_for(model, n=5), rtol=RTOL)


def test_verify_reports_a_mismatch(tmp_path):
    model = transform_conv_model(seed=0)
    result = export.export_tflite(model, tmp_path / "m.tflite")
    other = transform_conv_model(seed=1)
    with pytest.raises(export.TFLiteMismatchError, match=r"max abs diff .* rtol=0.0001") as err:
        export.verify_tflite(result.path, other, inputs_for(model))
    assert isinstance(err.value, ValueError) and isinstance(err.value, AssertionError)
    # rtol=inf measures without failing.
    check = export.verify_tflite(result.path, other, inputs_for(model), rtol=float("inf"))
    assert check.max_rel_diff > 1e-2
    # A tolerance that is not one is an argument error, not a mismatch.
    for rtol in (-1, float("nan"), "1e-4", None):
        with pytest.raises(ValueError, match=r"Expected a number >= 0") as err:
            export.verify_tflite(result.path, model, inputs_for(model), rtol=rtol)
        assert not isinstance(err.value, export.TFLiteMismatchError)
    for threads in (0, -1, 1.5):
        with pytest.raises(ValueError, match=r"`num_threads`. Expected None or an int >= 1"):
            export.verify_tflite(result.path, model, inputs_for(model), num_threads=threads)
    assert export.verify_tflite(result.path, model, inputs_for(model), rtol=0.01,
                                num_threads=1).max_rel_diff < RTOL


# ----------------------------------------------------------------------------
# Size: the file holds the bases, not the materialised kernel


@pytest.fixture(scope="module")
def size_exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("size")
    model = size_model()
    rng = np.random.default_rng(0)
    results = {
        q: export.export_tflite(
            model, folder / f"{q}.tflite", quantization=q,
            representative_data=(
                rng.normal(size=(16, 16, 16, 64)).astype("float32") if q == "int8" else None
            ),
        )
        for q in export.QUANTIZATIONS
    }
    results["materialized"] = export.export_tflite(
        model, folder / "materialized.tflite", factored=False
    )
    return model, results


def test_float_size_is_the_bases_plus_fixed_overhead(size_exports):
    model, results = size_exports
    result = results[None]
    assert result.params == 3 * 3 * 64 * 32 + 256 + 3 * 3 * 256 * 32 + 256
    assert_factored(result, model)
    assert result.bytes <= 1.10 * result.param_bytes + FIXED_OVERHEAD, result
    assert sorted(result.lowerings.values()) == ["grouped", "grouped"], result.lowerings
    assert result.lowering_values == 2 * (9 * 256 + 9 * 32)
    assert result.overhead_bytes <= overhead_allowance(
        result.num_ops, result.lowering_values), result
    # FIXED_OVERHEAD is small against the dense kernel (the test means something) ...
    dense_kernel_bytes = 4 * 3 * 3 * (64 + 256) * 256
    assert FIXED_OVERHEAD < 0.05 * dense_kernel_bytes
    # ... and exporting the materialised path folds that dense kernel into the file.
    materialized = results["materialized"]
    assert "CONV_2D" in materialized.op_counts
    assert dense_kernel_shapes(model) <= tensor_shapes(materialized.path)  # the check bites
    assert materialized.bytes >= dense_kernel_bytes
    assert result.bytes < 0.5 * materialized.bytes
    export.verify_tflite(result.path, model, inputs_for(model, n=2), rtol=RTOL)


@pytest.mark.parametrize("quantization, rtol", [("float16", 1e-2), ("dynamic", 5e-2), ("int8", 0.2)])
def test_quantized_sizes_and_outputs(size_exports, quantization, rtol):
    model, results = size_exports
    result = results[quantization]
    assert result.quantization == quantization
    assert result.param_bytes == {"float16": 2, "dynamic": 1, "int8": 1}[quantization] * result.params
    assert_factored(result, model)
    # Per-channel scales and float32/int32 biases add a little to the weights.
    assert result.bytes <= 1.10 * result.param_bytes + FIXED_OVERHEAD + 16 * 1024, result
    assert result.bytes < results[None].bytes
    export.verify_tflite(result.path, model, inputs_for(model, n=2), rtol=rtol)


def converted_uneven_model(seed=1):
    """Two 3x3 convolutions (He-normal kernels) converted by `transform_model` at
    1/4 (d4): fitted, uneven assignments, one base building more filters than
    another (with seed 1 conv_a's largest group is 2.75x the average)."""
    rng = np.random.default_rng(seed)
    inputs = keras.Input((8, 8, 64))
    x = keras.layers.Conv2D(128, 3, padding="same", activation="relu", name="conv_a")(inputs)
    x = keras.layers.Conv2D(128, 3, padding="same", name="conv_b")(x)
    model = keras.Model(inputs, x)
    for name in ("conv_a", "conv_b"):
        conv = model.get_layer(name)
        fan_in = 9 * conv.kernel.shape[2]
        conv.kernel.assign(
            rng.normal(0, np.sqrt(2 / fan_in), conv.kernel.shape).astype("float32"))
        conv.bias.assign(rng.normal(0, 0.1, conv.bias.shape).astype("float32"))
    model, _ = tc.transform_model(
        model, sparsity=0.75, reconstruction=tc.Reconstruction(transforms="d4"))
    return model


def test_auto_writes_uneven_assignments_grouped(tmp_path):
    # A user's report: converted and pruned models exported with "auto" were
    # 1.6x the size of their grouped export (1,374 operators against 131),
    # the padded layers having gone to slices.
    model = converted_uneven_model()
    layers = [layer for layer in model.layers if isinstance(layer, TransformConv2D)]
    paddings = [
        grouped_lib.grouped_plan(layer).spread_outputs() / layer.filters for layer in layers
    ]
    assert len(layers) == 2 and max(paddings) > 2.0, paddings  # uneven enough to matter
    auto = export.export_tflite(model, tmp_path / "auto.tflite")
    grouped = export.export_tflite(model, tmp_path / "grouped.tflite", lowering="grouped")
    assert auto.lowerings == {layer.name: "grouped" for layer in layers}
    for layer in layers:
        form, reason = lowering_lib.lowering_choice(layer)
        assert form == "grouped" and "fitted assignment" in reason, reason
    assert auto.bytes <= 1.1 * grouped.bytes, (auto.bytes, grouped.bytes)
    assert auto.num_ops == grouped.num_ops
    slices = export.export_tflite(model, tmp_path / "slices.tflite", lowering="slices")
    assert slices.num_ops > 10 * grouped.num_ops and slices.bytes > grouped.bytes
    export.verify_tflite(auto.path, model, inputs_for(model, 2), rtol=RTOL)


# ----------------------------------------------------------------------------
# int8 accuracy on the digits


@pytest.mark.slow
def test_int8_accuracy_within_one_point_of_float(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        TransformConv2D(16, 3, base_filters=4, transforms="rotations", padding="same",
                        activation="relu"),
        TransformConv2D(32, 3, base_filters=4, transforms="d4", padding="same",
                        activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=15, batch_size=32, verbose=0)
    float_acc = float(np.mean(np.argmax(model.predict(x_test, verbose=0), -1) == y_test))
    assert float_acc > 0.9

    result = export.export_tflite(model, tmp_path / "digits.tflite", quantization="int8",
                                  representative_data=x_train[:200])
    assert_factored(result, model)
    (logits,) = export.run_tflite(result.path, x_test)
    int8_acc = float(np.mean(np.argmax(logits, -1) == y_test))
    print(f"digits accuracy: float {float_acc:.4f}, int8 {int8_acc:.4f}, {result.bytes} bytes")
    assert abs(int8_acc - float_acc) <= 0.01, (int8_acc, float_acc)


# ----------------------------------------------------------------------------
# Errors


def test_pruning_wrappers_must_be_stripped(tmp_path):
    wrapped, _ = stripped_model()
    with pytest.raises(ValueError, match=r"strip first: tf_transform_conv.strip_model\(model\)"):
        export.export_tflite(wrapped, tmp_path / "m.tflite")
    with pytest.raises(ValueError, match="strip first"):
        export.export_saved_model(wrapped, tmp_path / "saved")
    assert not os.listdir(tmp_path)


def test_int8_needs_representative_data(tmp_path):
    with pytest.raises(ValueError, match="pass representative_data="):
        export.export_tflite(transform_conv_model(), tmp_path / "m.tflite", quantization="int8")
    with pytest.raises(ValueError, match="only with quantization='int8'"):
        export.export_tflite(transform_conv_model(), tmp_path / "m.tflite",
                             representative_data=np.zeros((4, 10, 10, 4), "float32"))


def test_representative_data_shape_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"\(num_samples,\) \+ \(10, 10, 4\)"):
        export.export_tflite(transform_conv_model(), tmp_path / "m.tflite", quantization="int8",
                             representative_data=np.zeros((4, 8, 8, 4), "float32"))


def test_unknown_quantization_and_batch_size(tmp_path):
    with pytest.raises(ValueError, match=r"Expected one of \[None, 'dynamic', 'float16', 'int8'\]"):
        export.export_tflite(transform_conv_model(), tmp_path / "m.tflite", quantization="int4")
    with pytest.raises(ValueError, match="Received batch_size=0"):
        export.export_tflite(transform_conv_model(), tmp_path / "m.tflite", batch_size=0)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_model_exports_its_float32_twin(policy, tmp_path):
    """The converter has no 16-bit convolutions: the file computes in float32."""
    keras.config.set_dtype_policy(policy)
    try:
        model = transform_conv_model()
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.get_layer("tc_b").compute_dtype != "float32"
    twin = export.float32_model(model)
    assert {layer.compute_dtype for layer in twin.layers} == {"float32"}
    assert export.float32_model(twin) is twin  # nothing left to rewrite
    result = export.export_tflite(model, tmp_path / "m.tflite")
    assert_factored(result, model)
    x = inputs_for(model)
    export.verify_tflite(result.path, twin, x, rtol=RTOL)  # exactly the float32 twin
    # verify_tflite compares the 16-bit model through that twin, like with like
    # (against its 16-bit outputs bfloat16 missed 1e-2).
    check = export.verify_tflite(result.path, model, x, rtol=RTOL)
    assert check.max_rel_diff < 1e-5
    ours = np.asarray(model(x, training=False), np.float32)
    theirs = export.run_tflite(result.path, x)[0]
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) > 10 * check.max_rel_diff


def test_unknown_spatial_size_is_an_error(tmp_path):
    inputs = keras.Input((None, None, 4))
    outputs = TransformConv2D(8, 3, base_filters=2, transforms="rotations")(inputs)
    model = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match=r"fully known input dimensions .* keras.Input\(\(H, W, C\)\)"):
        export.export_tflite(model, tmp_path / "m.tflite")


def test_unwritable_paths_fail_before_converting(tmp_path, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted before checking the path")

    monkeypatch.setattr(export, "factored_model", no_conversion)
    model = transform_conv_model()
    with pytest.raises(ValueError, match="does not exist. Create it first"):
        export.export_tflite(model, tmp_path / "missing" / "m.tflite")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        export.export_tflite(model, tmp_path / "file" / "m.tflite")
    with pytest.raises(ValueError, match="is a directory"):
        export.export_tflite(model, tmp_path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # Running as root, chmod cannot make a folder unwritable: simulate it.
    monkeypatch.setattr(export_checks.tempfile, "NamedTemporaryFile", denied)
    with pytest.raises(ValueError, match="is not writable"):
        export.export_tflite(model, tmp_path / "m.tflite")


def test_verify_needs_a_tflite_file(tmp_path):
    model = transform_conv_model()
    x = inputs_for(model)
    with pytest.raises(ValueError, match="no such file"):
        export.verify_tflite(tmp_path / "missing.tflite", model, x)
    model.save(tmp_path / "m.keras")
    with pytest.raises(ValueError, match=r"not a TFLite flatbuffer .* b'TFL3'"):
        export.verify_tflite(tmp_path / "m.keras", model, x)
    (tmp_path / "short.tflite").write_bytes(b"TFL")
    with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
        export.verify_tflite(tmp_path / "short.tflite", model, x)


# ----------------------------------------------------------------------------
# SavedModel


@pytest.mark.parametrize("kind", ["transform_model", "stripped"])
def test_saved_model_serves_the_same_outputs(kind, tmp_path):
    if kind == "transform_model":
        model, _ = tc.transform_model(conv_model(), base_ratio=0.25)
    else:
        _, model = stripped_model()
    path = export.export_saved_model(model, tmp_path / "saved")
    loaded = tf.saved_model.load(path)
    x = inputs_for(model, n=3)  # the serve endpoint takes any batch
    served = loaded.serve(x).numpy()
    expected = np.asarray(model(x))
    scale = float(np.abs(expected).max())
    assert float(np.abs(served - expected).max()) <= RTOL * scale
    # Only the bases are stored.
    assert sum(int(np.prod(v.shape)) for v in loaded.variables) == model.count_params()


# ----------------------------------------------------------------------------
# The command


def test_export_command_prints_size_and_verifies(tmp_path, capsys):
    model = transform_conv_model()
    model.save(tmp_path / "m.keras")
    out = tmp_path / "m.tflite"
    assert cli.main(["export", str(tmp_path / "m.keras"), str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.stat().st_size > 0
    assert "file size" in printed and "parameter bytes" in printed
    assert f"{4 * model.count_params():,} bytes" in printed
    assert "verify (8 random inputs)" in printed and ": ok" in printed
    # tc_a (4 input channels) is cheaper dense; see lowering.lowering_choice.
    assert "TransformConv2D  1 dense, 2 grouped" in printed
    assert cli.main(["export", str(tmp_path / "m.keras"), str(out), "--lowering", "slices"]) == 0
    printed = capsys.readouterr().out
    assert "TransformConv2D  3 slices" in printed and ": ok" in printed


def test_export_command_int8_with_representative_npy(tmp_path, capsys):
    model = transform_conv_model()
    model.save(tmp_path / "m.keras")
    samples = tmp_path / "samples.npy"
    np.save(samples, inputs_for(model, n=16))
    out = tmp_path / "m8.tflite"
    assert cli.main(["export", str(tmp_path / "m.keras"), str(out), "--quantization", "int8",
                     "--representative", str(samples)]) == 0
    printed = capsys.readouterr().out
    assert "int8" in printed and "check its accuracy" in printed
    with open(out, "rb") as f:
        assert f.read(8)[4:8] == b"TFL3"


def test_export_command_errors(tmp_path):
    model = transform_conv_model()
    model.save(tmp_path / "m.keras")
    with pytest.raises(SystemExit, match="pass --representative"):
        cli.main(["export", str(tmp_path / "m.keras"), str(tmp_path / "m.tflite"),
                  "--quantization", "int8"])
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["export", str(tmp_path / "missing.keras"), str(tmp_path / "m.tflite")])
