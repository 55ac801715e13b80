"""The JAX backend end to end: pruning with `fit` and its callback, then TFLite export.

Keras picks its backend once per process, so the checks run in a subprocess
with `KERAS_BACKEND=jax` (the layer's own JAX parity is in test_layers.py).
"""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
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
    result = tc.export_tflite(stripped, sys.argv[1])
    got = tc.export.run_tflite(sys.argv[1], x[:4])
    print("RESULT", json.dumps(dict(
        history=[[h["step"] for h in w.pruning_history] for w in found],
        kept=[len(w.kept) for w in found],
        target=kept_filters(96, float(schedule(9)[1])),
        steps=[int(np.asarray(w.pruning_step)) for w in found],
        strip_error=float(np.abs(np.asarray(stripped(x)) - np.asarray(wrapped(x))).max()),
        lowerings=result.lowerings,
        tflite_error=float(np.abs(got - np.asarray(stripped(x[:4]))).max()),
        scale=float(np.abs(np.asarray(stripped(x[:4]))).max()),
    )))
    """
)


def test_pruning_fit_and_export_on_jax(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "m.tflite")], env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout.split("RESULT", 1)[1])
    # 12 steps (0..11); the schedule prunes at 1, 3, ..., 9, both layers together.
    assert result["history"] == [[1, 3, 5, 7, 9]] * 2
    assert sum(result["kept"]) == result["target"] and min(result["kept"]) >= 2
    assert result["steps"] == [11, 11]  # the saved step survives JAX's fit
    assert result["strip_error"] <= 1e-5 * max(1.0, result["scale"])
    assert "grouped" in result["lowerings"].values(), result["lowerings"]
    assert result["tflite_error"] <= 1e-4 * max(1.0, result["scale"])
