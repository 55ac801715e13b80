"""Every pruning verb on Keras's JAX backend: trains, strips, saves, reloads and exports.

The snippets run in one JAX-backend process for the session (`jax_backend`,
`tests/jax_worker.py`); each returns what the assertions here check.
"""

import textwrap

import pytest

PRELUDE = """
import os, tempfile
import numpy as np, keras, tensorflow_model_optimization as tfmot
import tf_transform_conv as tc

def model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))

rng = np.random.default_rng(0)
x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
y = rng.integers(0, 2, 16)
folder = tempfile.mkdtemp()

def wrap(verb, m, schedule):
    if verb == "prune_model":
        return tc.prune_model(m, schedule, tc.Reconstruction(transforms="rotations",
                                                             transform_family="scalar"))
    if verb == "prune_low_magnitude":
        return tc.prune_low_magnitude(m, schedule)
    if verb == "prune_interspace":
        return tc.prune_interspace(m, schedule, basis="dct")
    if verb == "prune_interspace_of_transform_conv":
        converted, _ = tc.transform_model(m, base_ratio=0.5,
                                          reconstruction=tc.Reconstruction(transforms="rotations"))
        return tc.prune_interspace(converted, schedule, basis="dct")
    raise ValueError(verb)

def weights(m):
    return [np.asarray(w) for w in m.weights]

def pruned_entries_nonzero(m):
    count = 0
    for layer in m.layers:
        if hasattr(layer, "mask"):
            count += int(np.count_nonzero(np.asarray(layer.pruned_weight)[np.asarray(layer.mask) == 0]))
    return count
"""

VERBS = ["prune_model", "prune_low_magnitude", "prune_interspace",
         "prune_interspace_of_transform_conv"]


@pytest.mark.parametrize("verb, optimizer", [
    ("prune_model", "adam"), ("prune_low_magnitude", "adam"), ("prune_low_magnitude", "sgd"),
    ("prune_interspace", "adam"), ("prune_interspace_of_transform_conv", "sgd"),
])
def test_every_verb_trains_strips_saves_reloads_and_exports_on_jax(jax_backend, verb, optimizer):
    result = jax_backend.run(PRELUDE + """
verb, optimizer = args
schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4, frequency=2)
wrapped = wrap(verb, model(), schedule)
wrapped.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
wrapped.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[tc.UpdateTransformPruningStep()])
found = [l for l in wrapped.layers if isinstance(l, tc.pruning.PruningWrapper)]
wrapped.save(os.path.join(folder, "wrapped.keras"))
reloaded = keras.saving.load_model(os.path.join(folder, "wrapped.keras"), safe_mode=True)
stripped = tc.strip_model(wrapped)
stripped.save(os.path.join(folder, "stripped.keras"))
stripped_again = keras.saving.load_model(os.path.join(folder, "stripped.keras"), safe_mode=True)
export = tc.export_tflite(stripped, os.path.join(folder, "m.tflite"))
check = tc.verify_tflite(export.path, stripped, x[:4])
scale = float(np.abs(np.asarray(wrapped(x))).max())
result = dict(
    sparsities=[w.sparsity for w in found],
    steps=[int(np.asarray(w.pruning_step)) for w in found],
    pruned_nonzero=pruned_entries_nonzero(wrapped),
    reload_error=float(np.abs(np.asarray(reloaded(x)) - np.asarray(wrapped(x))).max()) / scale,
    strip_error=float(np.abs(np.asarray(stripped(x)) - np.asarray(wrapped(x))).max()) / scale,
    stripped_reload_error=float(np.abs(np.asarray(stripped_again(x)) - np.asarray(stripped(x))).max()) / scale,
    stripped_classes=sorted({type(l).__name__ for l in stripped.layers}),
    tflite_error=check.max_rel_diff,
)
""", verb, optimizer)
    assert result["steps"] and set(result["steps"]) == {7}  # 2 epochs of 4 batches
    assert all(abs(s - 0.5) <= 0.07 for s in result["sparsities"]), result["sparsities"]
    assert result["pruned_nonzero"] == 0
    assert result["reload_error"] <= 1e-5
    assert result["strip_error"] <= 1e-5
    assert result["stripped_reload_error"] <= 1e-6
    assert not {"TransformPruning", "MagnitudePruning", "InterspacePruning"} & set(
        result["stripped_classes"])
    assert result["tflite_error"] <= 1e-4


@pytest.mark.parametrize("verb", VERBS)
def test_training_without_the_callback_fails_and_leaves_the_model_usable_on_jax(jax_backend, verb):
    """The error is raised while the step is traced, after Keras took the variables out of
    the model: they are back, and training with the callback then works."""
    result = jax_backend.run(PRELUDE + """
verb, = args
wrapped = wrap(verb, model(), tfmot.sparsity.keras.ConstantSparsity(0.5, 0))
wrapped.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
before = weights(wrapped)
try:
    wrapped.fit(x, y, verbose=0)
    message = None
except ValueError as error:
    message = str(error)
after = weights(wrapped)
unchanged = all(np.array_equal(a, b) for a, b in zip(before, after))
predicted = wrapped.predict(x, verbose=0)
stripped = tc.strip_model(wrapped)
wrapped.save(os.path.join(folder, "after_error.keras"))
wrapped.fit(x, y, verbose=0, callbacks=[tc.UpdateTransformPruningStep()])
found = [l for l in wrapped.layers if isinstance(l, tc.pruning.PruningWrapper)]
result = dict(message=message, unchanged=unchanged, predicted=list(predicted.shape),
              stripped=len(stripped.layers), sparsities=[w.sparsity for w in found])
""", verb)
    assert "trained without its pruning step callback" in result["message"]
    assert result["unchanged"]
    assert result["predicted"] == [16, 2]
    assert all(abs(s - 0.5) <= 0.07 for s in result["sparsities"]), result["sparsities"]


def test_any_call_that_fails_while_traced_leaves_the_model_usable_on_jax(jax_backend):
    """Keras's JAX evaluate and predict took the variables out and did not put them
    back when the step raised: every later call failed with 'NoneType' object is not
    callable."""
    result = jax_backend.run(PRELUDE + """
calls = {
    "fit_bad_labels": lambda m: m.fit(x, np.zeros((16, 3)), verbose=0,
                                      callbacks=[tc.UpdateTransformPruningStep()]),
    "evaluate_bad_labels": lambda m: m.evaluate(x, np.zeros((16, 3)), verbose=0),
    "predict_bad_inputs": lambda m: m.predict(np.zeros((4, 8, 8, 5), "float32"), verbose=0),
    "test_on_batch_bad_labels": lambda m: m.test_on_batch(x, np.zeros((16, 3))),
}
result = {}
for name, call in calls.items():
    wrapped = wrap("prune_model", model(), tfmot.sparsity.keras.ConstantSparsity(0.5, 0))
    wrapped.compile("adam", "mse")
    wrapped.fit(x, np.eye(2)[y], verbose=0, callbacks=[tc.UpdateTransformPruningStep()])
    trained = lambda: [np.asarray(w) for w in wrapped.trainable_weights]  # not the step
    before, predicted = trained(), wrapped.predict(x, verbose=0)
    try:
        call(wrapped)
        raised = False
    except Exception:
        raised = True
    kept = all(np.array_equal(a, b) for a, b in zip(before, trained()))
    same = bool(np.array_equal(wrapped.predict(x, verbose=0), predicted))
    wrapped.evaluate(x, np.eye(2)[y], verbose=0)
    wrapped.fit(x, np.eye(2)[y], verbose=0, callbacks=[tc.UpdateTransformPruningStep()])
    result[name] = [raised, kept, same, len(tc.strip_model(wrapped).layers)]
""")
    assert {name: got[:3] for name, got in result.items()} == {
        name: [True, True, True] for name in result}, result
    assert len(result) == 4


def test_conversion_and_its_export_on_jax(jax_backend):
    result = jax_backend.run(PRELUDE + """
converted, report = tc.transform_model(model(), sparsity=0.75,
                                       reconstruction=tc.Reconstruction(transforms="d4"))
converted.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
converted.fit(x, y, verbose=0)
export = tc.export_tflite(converted, os.path.join(folder, "converted.tflite"))
result = dict(converted=[r.converted for r in report],
              error=tc.verify_tflite(export.path, converted, x[:4]).max_rel_diff)
for form in ("grouped", "dense"):  # int8: the grouped form as one spread group
    int8 = tc.export_tflite(converted, os.path.join(folder, form + ".tflite"),
                            quantization="int8", representative_data=x, lowering=form)
    result[form] = [int8.lowerings,
                    tc.verify_tflite(int8.path, converted, x, rtol=float("inf")).max_rel_diff]
""")
    assert result["converted"] == [True, True]
    assert result["error"] <= 1e-4
    assert set(result["grouped"][0].values()) == {"grouped"}
    assert result["grouped"][1] <= 1.5 * result["dense"][1] + 0.01, result


GLOBAL_PRUNING = textwrap.dedent(
    """
    import json, sys
    import numpy as np, keras, tensorflow_model_optimization as tfmot
    assert keras.backend.backend() == "jax"
    import tf_transform_conv as tc
    from tf_transform_conv.ops.assignment import kept_filters

    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 10, 16))
    x = keras.layers.Conv2D(32, 3, padding="same", name="a")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(64, 3, name="b")(x)
    outputs = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.75, begin_step=1, end_step=9,
                                                    frequency=2)
    wrapped = tc.prune_model(model, schedule, tc.Reconstruction(
        allocation="global", criterion="magnitude", min_bases=2))
    wrapped.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 10, 10, 16)).astype("float32")
    y = rng.integers(0, 4, 32)
    wrapped.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[
        tc.UpdateTransformPruningStep(recalibrate_data=x, recalibrate_batches=2)])
    found = [l for l in wrapped.layers if isinstance(l, tc.TransformPruning)]
    stripped = tc.strip_model(wrapped)
    export = tc.export_tflite(stripped, args[0])
    got = tc.export.run_tflite(args[0], x[:4])
    result = dict(
        history=[[h["step"] for h in w.pruning_history] for w in found],
        kept=[len(w.kept) for w in found],
        target=kept_filters(96, float(schedule(9)[1])),
        steps=[int(np.asarray(w.pruning_step)) for w in found],
        strip_error=float(np.abs(np.asarray(stripped(x)) - np.asarray(wrapped(x))).max()),
        lowerings=export.lowerings,
        tflite_error=float(np.abs(got - np.asarray(stripped(x[:4]))).max()),
        scale=float(np.abs(np.asarray(stripped(x[:4]))).max()),
    )
    """
)


def test_global_pruning_with_recalibration_then_export_on_jax(tmp_path, jax_backend):
    """Global allocation and batch-norm recalibration in `fit`'s callback, then TFLite."""
    result = jax_backend.run(GLOBAL_PRUNING, tmp_path / "m.tflite")
    # 12 steps (0..11); the schedule prunes at 1, 3, ..., 9, both layers together.
    assert result["history"] == [[1, 3, 5, 7, 9]] * 2
    assert sum(result["kept"]) == result["target"] and min(result["kept"]) >= 2
    assert result["steps"] == [11, 11]  # the saved step survives JAX's fit
    assert result["strip_error"] <= 1e-5 * max(1.0, result["scale"])
    assert "grouped" in result["lowerings"].values(), result["lowerings"]
    assert result["tflite_error"] <= 1e-4 * max(1.0, result["scale"])


def test_the_recommended_route_distilled_from_the_dense_model_on_jax(jax_backend):
    """The recipe the README recommends: the student wrapped by `prune_model` with
    `Reconstruction.recommended()`, trained inside an output-only `InnerDistiller`
    with the pruning callback, then stripped (TensorFlow: tests/test_distill.py)."""
    result = jax_backend.run(PRELUDE + """
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
teacher = model()
teacher.compile("adam", loss)
teacher.fit(x, y, verbose=0)
schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=4, frequency=2)
student = tc.prune_model(model(), schedule, tc.Reconstruction.recommended())
distiller = tc.InnerDistiller(student, teacher, layers=[], output_weight=0.9, temperature=4.0)
learning_rate = tc.training.CosineRestart(1e-3, 8, restart_step=schedule.end_step)
distiller.compile(keras.optimizers.Adam(learning_rate), loss)
before = weights(teacher)
rates = []  # after each epoch of 4 steps (JAX syncs the optimizer's step there)
history = distiller.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[
    tc.UpdateTransformPruningStep(), keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: rates.append(
            float(distiller.optimizer.learning_rate)))])
stripped = tc.strip_model(student)
layers = [l for l in stripped.layers if isinstance(l, tc.TransformConv2D)]
scale = float(np.abs(np.asarray(student(x))).max())
result = dict(
    history=sorted(history.history),
    bases=[l.base_filters for l in layers], families=[l.transform_family for l in layers],
    strip_error=float(np.abs(np.asarray(stripped(x)) - np.asarray(student(x))).max()) / scale,
    teacher_unchanged=all(np.array_equal(a, b) for a, b in zip(before, weights(teacher))),
    rates=rates,
)
""")
    assert result["history"] == ["kd_loss", "loss"]
    # The learning rate restarts from its peak where pruning ends (step 4 of 8):
    # a single cosine over the 8 steps would be at half the peak there.
    assert result["rates"] == pytest.approx([1e-3, 0.0], rel=1e-5, abs=1e-9)
    assert result["bases"] == [2, 2]  # 8 filters pruned at 0.75 keep 2 bases each
    assert result["families"] == ["affine", "affine"]
    assert result["strip_error"] <= 1e-5
    assert result["teacher_unchanged"]
