"""`tf_transform_conv.sparsity` (tfmot's names on Keras 3): block and M-by-N masks, schedules, custom layers, against tfmot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot_ref

import tf_transform_conv as tc
from tf_transform_conv import sparsity
from tf_transform_conv.ops.masks import block_magnitude_mask
from tf_transform_conv.ops.masks import m_by_n_mask

HERE = Path(__file__).resolve().parent


def _tfmot_mask(weights, sparsity_value, block_size=(1, 1), pooling="AVG", m_by_n=None):
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_impl

    pruning = pruning_impl.Pruning(
        lambda: 0, [], tfmot_ref.sparsity.keras.ConstantSparsity(sparsity_value, 0),
        block_size, pooling, sparsity_m_by_n=m_by_n)
    return pruning._maybe_update_block_mask(tf.constant(weights))[1].numpy()


@pytest.mark.parametrize("shape", [(8, 6), (5, 7), (13, 10)])
@pytest.mark.parametrize("block", [(2, 2), (4, 1), (3, 2)])
@pytest.mark.parametrize("pooling", ["AVG", "MAX"])
def test_block_mask_is_tfmots(shape, block, pooling):
    rng = np.random.default_rng(sum(shape) + sum(block))
    for rate in (0.3, 0.8):
        weights = rng.normal(size=shape).astype("float32")
        np.testing.assert_array_equal(
            block_magnitude_mask(np.abs(weights), rate, block, pooling),
            _tfmot_mask(weights, rate, block, pooling))


@pytest.mark.parametrize("shape", [(8, 6), (5, 7), (3, 3, 4, 5), (1, 1, 8, 6), (3, 3, 6, 1)])
@pytest.mark.parametrize("m_by_n", [(2, 4), (1, 4), (3, 8)])
def test_m_by_n_mask_is_tfmots_ties_included(shape, m_by_n):
    weights = np.random.default_rng(len(shape)).normal(size=shape).astype("float32")
    weights.ravel()[:6] = 0.5  # ties
    mask = m_by_n_mask(np.abs(weights), m_by_n)
    np.testing.assert_array_equal(mask, _tfmot_mask(weights, 0.5, m_by_n=m_by_n))


def test_schedules_are_tfmots_without_tfmot():
    for args in [(0.2, 0.8, 1, 7, 3, 2), (0.0, 0.9, 0, 100, 2, 7), (0.3, 0.95, 10, 1000, 3, 50)]:
        ours, theirs = sparsity.PolynomialDecay(*args), tfmot_ref.sparsity.keras.PolynomialDecay(*args)
        for step in range(0, 1100, 7):
            (a, s), (b, t) = ours(step), theirs(step)
            # tfmot's power runs in TensorFlow, whose float32 pow can round the
            # last bit apart from numpy's on some CPUs (seen on AVX-512 EPYC).
            assert bool(a) == bool(b.numpy()), (args, step)
            np.testing.assert_array_max_ulp(np.float32(s), t.numpy(), maxulp=1)
    ours, theirs = sparsity.ConstantSparsity(0.3, 4, 40, 3), tfmot_ref.sparsity.keras.ConstantSparsity(
        0.3, 4, 40, 3)
    for step in range(60):
        assert bool(ours(step)[0]) == bool(theirs(step)[0].numpy())
    # tfmot's nested get_config form is accepted too
    config = theirs.get_config()
    assert sparsity.ConstantSparsity.from_config(config).get_config() == config["config"]
    with pytest.raises(ValueError, match="end_step"):
        sparsity.PolynomialDecay(0.1, 0.5, begin_step=5, end_step=2)


@pytest.mark.slow
def test_a_tfmot_script_with_only_its_imports_changed_gives_tfmots_masks(tmp_path):
    """Block (AVG, MAX), 2:4 and PruneForLatencyOnXNNPack: tfmot on tf_keras, ours on both backends."""
    rng = np.random.default_rng(0)
    arrays = dict(x=rng.normal(size=(20, 9, 9, 3)).astype("float32"),
                  y=rng.normal(size=(20, 6)).astype("float32"))
    shapes = dict(stem=(3, 3, 3, 8), expand=(1, 1, 8, 16), dw=(3, 3, 16, 1),
                  project=(1, 1, 16, 12), head=(12, 6))
    for name, shape in shapes.items():
        arrays[name + "_k"] = (0.3 * rng.normal(size=shape)).astype("float32")
        arrays[name + "_b"] = np.zeros(16 if name == "dw" else shape[-1], "float32")
    np.savez(tmp_path / "in.npz", **arrays)
    body = (HERE / "tfmot_script.py").read_text()
    heads = {
        "tfmot": 'import os; os.environ["TF_USE_LEGACY_KERAS"] = "1"\n'
                 "import tf_keras as keras, tensorflow_model_optimization as tfmot\n",
        "tensorflow": "import keras, tf_transform_conv as tfmot\n",
        "jax": "import keras, tf_transform_conv as tfmot\n",
    }
    results = {}
    for run, head in heads.items():
        (tmp_path / f"run_{run}.py").write_text(head + body)
        env = {**{k: v for k, v in os.environ.items()
                  if not k.startswith(("KERAS", "TF_USE_LEGACY"))},
               "TF_CPP_MIN_LOG_LEVEL": "3",
               "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if run == "tfmot":
            env["TF_USE_LEGACY_KERAS"] = "1"
        else:
            env["KERAS_BACKEND"] = run
        proc = subprocess.run([sys.executable, str(tmp_path / f"run_{run}.py"),
                               str(tmp_path / "in.npz"), str(tmp_path / f"{run}.npz")],
                              capture_output=True, text=True, env=env, timeout=400)
        assert proc.returncode == 0, (run, proc.stderr[-3000:])
        results[run] = np.load(tmp_path / f"{run}.npz")
    reference = results.pop("tfmot")
    sparsities = {"block_avg": 0.75, "block_max": 0.75, "m_by_n": 0.5, "policy": 0.75}
    for variant, final in sparsities.items():
        assert reference[variant + "/masks"].shape[0] == 10  # a mask per batch
        for run, ours in results.items():
            np.testing.assert_array_equal(ours[variant + "/names"], reference[variant + "/names"])
            np.testing.assert_array_equal(ours[variant + "/masks"], reference[variant + "/masks"],
                                          err_msg=f"{run} {variant}")
            for name in shapes:
                np.testing.assert_allclose(ours[f"{variant}/{name}"],
                                           reference[f"{variant}/{name}"], atol=1e-6)
                np.testing.assert_array_equal(ours[f"{variant}/{name}"] == 0,
                                              reference[f"{variant}/{name}"] == 0)
        # the sparsities tfmot reaches: the expand kernel's
        assert np.mean(reference[f"{variant}/expand"] == 0) == pytest.approx(final)


class Scale(keras.layers.Layer, sparsity.PrunableLayer):
    """A custom layer with two weights to prune."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 8), initializer="glorot_uniform")
        self.v = self.add_weight(shape=(8,), initializer="random_normal")

    def call(self, x):
        return ops_matmul(x, self.w) * self.v

    def get_prunable_weights(self):
        return [self.w, self.v]


def ops_matmul(x, w):
    return keras.ops.matmul(x, w)


keras.saving.register_keras_serializable(package="tests")(Scale)


def test_a_custom_prunable_layer_is_pruned_saved_and_stripped(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(2)(Scale(name="scale")(inputs)))
    pruned = sparsity.prune_low_magnitude(model, sparsity.ConstantSparsity(0.75, 0, frequency=1))
    wrapper = pruned.get_layer("magnitude_pruning_scale")
    x, y = np.random.default_rng(0).normal(size=(8, 6)).astype("float32"), np.zeros((8, 2), "f")
    pruned.compile("sgd", "mse")
    pruned.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[sparsity.UpdatePruningStep()])
    w, v = (np.asarray(t) for t in wrapper.layer.get_prunable_weights())
    assert np.mean(w == 0) == 0.75 and np.mean(v == 0) == 0.75
    np.testing.assert_array_equal(w == 0, np.asarray(wrapper.masks[0]) == 0)
    pruned.save(tmp_path / "p.keras")
    loaded = keras.saving.load_model(tmp_path / "p.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), pruned.predict(x, verbose=0), rtol=1e-6)
    stripped = sparsity.strip_pruning(pruned)
    assert isinstance(stripped.get_layer("scale"), Scale)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), pruned.predict(x, verbose=0),
                               rtol=1e-6)
    # alone: the wrapper of a single layer
    alone = tc.prune_low_magnitude(Scale(name="lone"), lambda step: (True, 0.5))
    lone_model = keras.Sequential([keras.Input((6,)), alone])
    alone.layer.v.assign(np.arange(8, dtype="float32"))
    tc.update_pruning_step(lone_model, 0)
    assert np.asarray(alone.layer.v).tolist() == [0, 0, 0, 0, 4, 5, 6, 7]


@pytest.mark.parametrize("pattern", [dict(block_size=(2, 2)),
                                     dict(block_size=(4, 1), block_pooling_type="MAX"),
                                     dict(sparsity_m_by_n=(2, 4))])
def test_patterns_on_every_layer_type_save_strip_and_export(pattern, tmp_path):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6, 6, 4))
    # Wide enough that the sparse encoding saves bytes (export_tflite uses it only then).
    x = keras.layers.Conv2D(16, 3, padding="same", name="conv")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    x = keras.layers.Conv2D(16, 1, name="pw")(x)
    outputs = keras.layers.Dense(4, name="head")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    pruned = tc.prune_low_magnitude(model, sparsity.ConstantSparsity(0.5, 0, frequency=1),
                                    **pattern)
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 4)).astype("float32")
    pruned.compile("sgd", "mse")
    pruned.fit(x, np.zeros((4, 4), "f"), batch_size=2, epochs=1, verbose=0,
               callbacks=[sparsity.UpdatePruningStep()])
    for wrapper in [l for l in pruned.layers if isinstance(l, tc.MagnitudePruning)]:
        kernel = np.asarray(wrapper.layer.kernel)
        assert np.mean(kernel == 0) >= 0.4, wrapper.name  # half the blocks; edge blocks are cut
        if "sparsity_m_by_n" in pattern:
            np.testing.assert_array_equal(np.asarray(wrapper.mask),
                                          m_by_n_mask(np.abs(np.asarray(wrapper.mask)), (2, 4)))
    pruned.save(tmp_path / "p.keras")
    loaded = keras.saving.load_model(tmp_path / "p.keras", safe_mode=True)
    for a, b in zip(loaded.weights, pruned.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    stripped = tc.strip_model(loaded)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), pruned.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    result = tc.export_tflite(stripped, tmp_path / "p.tflite")
    assert result.sparse_encoding
    assert result.op_counts.get("DENSIFY", 0) >= 1  # TFLite's sparse encoding
    tc.verify_tflite(tmp_path / "p.tflite", stripped, x[:1])


def test_xnnpack_policy_checks_the_model_and_prunes_only_1x1():
    inputs = keras.Input((9, 9, 3))
    x = keras.layers.ZeroPadding2D(1)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2)(x)
    x = keras.layers.Conv2D(8, 1, name="pw")(x)
    x = keras.layers.GlobalAveragePooling2D(keepdims=True)(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
    pruned = sparsity.prune_low_magnitude(model, pruning_policy=sparsity.PruneForLatencyOnXNNPack())
    assert [l.layer.name for l in pruned.layers if isinstance(l, tc.MagnitudePruning)] == ["pw"]
    bad = keras.Sequential([keras.Input((9, 9, 3)), keras.layers.Conv2D(8, 3, strides=2),
                            keras.layers.GlobalAveragePooling2D()])
    with pytest.raises(ValueError, match="3x3 Conv2D with stride 2"):
        sparsity.prune_low_magnitude(bad, pruning_policy=sparsity.PruneForLatencyOnXNNPack())


def test_bad_patterns_are_named():
    with pytest.raises(ValueError, match="block_size"):
        sparsity.prune_low_magnitude(keras.layers.Dense(2), block_size=(0, 2))
    with pytest.raises(ValueError, match="block_pooling_type"):
        sparsity.prune_low_magnitude(keras.layers.Dense(2), block_pooling_type="MIN")
    with pytest.raises(ValueError, match="sparsity_m_by_n"):
        sparsity.prune_low_magnitude(keras.layers.Dense(2), sparsity_m_by_n=(4, 4))


JAX_SNIPPET = """
import os, tempfile
import numpy as np, keras
import tf_transform_conv as tc
from tf_transform_conv import sparsity

@keras.saving.register_keras_serializable(package="jax_tests")
class Scale(keras.layers.Layer, sparsity.PrunableLayer):
    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 4), initializer="glorot_uniform")
    def call(self, x):
        return keras.ops.matmul(x, self.w)
    def get_prunable_weights(self):
        return [self.w]

import json
block, pooling, m_by_n = json.loads(args[0])
pattern = dict(block_size=tuple(block), block_pooling_type=pooling,
               sparsity_m_by_n=tuple(m_by_n) if m_by_n else None)
keras.utils.set_random_seed(1)
inputs = keras.Input((6, 6, 4))
h = keras.layers.Conv2D(32, 3, padding="same", name="conv")(inputs)  # the encoding saves bytes
h = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(h)
h = keras.layers.GlobalAveragePooling2D()(h)
h = Scale(name="scale")(h)
model = keras.Model(inputs, keras.layers.Dense(4, name="head")(h))
pruned = tc.prune_low_magnitude(model, sparsity.ConstantSparsity(0.5, 0, frequency=1), **pattern)
x = np.random.default_rng(0).normal(size=(4, 6, 6, 4)).astype("float32")
pruned.compile("sgd", "mse")
pruned.fit(x, np.zeros((4, 4), "f"), batch_size=2, epochs=2, verbose=0,
           callbacks=[sparsity.UpdatePruningStep()])
# an error inside the traced step leaves the model usable
try:
    pruned.fit(x, np.zeros((4, 5), "f"), batch_size=2, epochs=1, verbose=0,
               callbacks=[sparsity.UpdatePruningStep()])
except Exception:
    pass
before = pruned.predict(x, verbose=0)
path = os.path.join(tempfile.mkdtemp(), "p.keras")
pruned.save(path)
loaded = keras.saving.load_model(path, safe_mode=True)
stripped = tc.strip_model(loaded)
wrappers = [l for l in pruned.layers if isinstance(l, tc.MagnitudePruning)]
# TFLite: the layers this package exports (the custom layer is left out of the file)
plain = keras.Model(stripped.input, stripped.get_layer("dw").output)
exported = tc.export_tflite(plain, os.path.join(tempfile.mkdtemp(), "p.tflite"))
tc.verify_tflite(exported.path, plain, x[:1])
result = dict(
    densify=exported.op_counts.get("DENSIFY", 0),
    names=sorted(w.layer.name for w in wrappers),
    zeros={w.layer.name: float(np.mean(np.asarray(w.pruned_weight) == 0)) for w in wrappers},
    # Every masked entry is zero (a kept entry may be zero too: a block the
    # mask brought back holds the zeros it was pruned to).
    masks_kept=all(not np.asarray(w.pruned_weight)[np.asarray(w.mask) == 0].any()
                   for w in wrappers),
    loaded_diff=float(np.abs(loaded.predict(x, verbose=0) - before).max()),
    stripped_diff=float(np.abs(stripped.predict(x, verbose=0) - before).max()),
)
"""


@pytest.mark.parametrize("block, pooling, m_by_n", [
    ((2, 2), "AVG", None), ((1, 1), "AVG", (2, 4)),
    pytest.param((4, 1), "MAX", None, marks=pytest.mark.slow)])
def test_patterns_and_a_custom_layer_on_jax(jax_backend, block, pooling, m_by_n):
    result = jax_backend.run(JAX_SNIPPET, json.dumps([block, pooling, m_by_n]))
    assert result["names"] == ["conv", "dw", "head", "scale"]
    for name, zeros in result["zeros"].items():
        assert zeros >= 0.4, (name, zeros)  # half the blocks (edge blocks cut), or 2 of 4
        if m_by_n:
            assert zeros == pytest.approx(0.5, abs=0.15), name
    assert result["masks_kept"]
    assert result["densify"] >= 1  # the sparse encoding
    assert result["loaded_diff"] <= 1e-6 and result["stripped_diff"] <= 1e-5


def test_summaries_scope_and_a_list_of_layers(tmp_path):
    layers = sparsity.prune_low_magnitude(
        [keras.layers.Dense(4, name="a"), keras.layers.ReLU(), keras.layers.Dense(2, name="b")],
        pruning_schedule=sparsity.ConstantSparsity(0.5, 1, frequency=1))
    assert [type(l).__name__ for l in layers] == ["MagnitudePruning", "ReLU", "MagnitudePruning"]
    model = keras.Sequential([keras.Input((3,))] + layers)
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    model.fit(x, np.zeros((4, 2), "f"), batch_size=2, verbose=0,
              callbacks=[sparsity.UpdatePruningStep(),
                         sparsity.PruningSummaries(str(tmp_path / "logs"), update_freq=1)])
    assert [float(l.sparsity) for l in model.layers if isinstance(l, tc.MagnitudePruning)] == [
        0.5, 0.5]
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))
    model.save(tmp_path / "m.keras")
    with sparsity.prune_scope():
        loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    with pytest.raises(ValueError, match="log_dir"):
        sparsity.PruningSummaries("")


MIGRATION_SCRIPT = """
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np, tf_keras as keras, tensorflow_model_optimization as tfmot
out = sys.argv[1]
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(8, 3, name="conv"),
                          keras.layers.BatchNormalization(name="bn"),
                          keras.layers.Flatten(), keras.layers.Dense(4, name="head")])
pruned = tfmot.sparsity.keras.prune_low_magnitude(
    model, pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.75, 0, frequency=1))
pruned.compile("sgd", "mse")
x = np.random.default_rng(0).normal(size=(8, 6, 6, 3)).astype("float32")
pruned.fit(x, np.zeros((8, 4), "f"), batch_size=4, verbose=0,
           callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
stripped = tfmot.sparsity.keras.strip_pruning(pruned)
stripped.save_weights(os.path.join(out, "weights.h5"))
stripped.save(os.path.join(out, "model.h5"))
np.savez(os.path.join(out, "ref.npz"), x=x, y=stripped.predict(x, verbose=0),
         conv=stripped.get_layer("conv").kernel.numpy())
"""


@pytest.mark.slow
def test_a_stripped_tfmot_models_h5_files_load_and_prune_on(tmp_path):
    """The guide's migration: tfmot strips and saves HDF5; Keras 3 loads it and prunes on."""
    (tmp_path / "run_migration.py").write_text(MIGRATION_SCRIPT)
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, str(tmp_path / "run_migration.py"), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = np.load(tmp_path / "ref.npz")
    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(8, 3, name="conv"),
                              keras.layers.BatchNormalization(name="bn"),
                              keras.layers.Flatten(), keras.layers.Dense(4, name="head")])
    model.load_weights(tmp_path / "weights.h5")
    np.testing.assert_array_equal(np.asarray(model.get_layer("conv").kernel), reference["conv"])
    np.testing.assert_allclose(model.predict(reference["x"], verbose=0), reference["y"],
                               atol=1e-6)
    whole = keras.saving.load_model(tmp_path / "model.h5", compile=False)
    np.testing.assert_allclose(whole.predict(reference["x"], verbose=0), reference["y"],
                               atol=1e-6)
    pruned = sparsity.prune_low_magnitude(
        model, pruning_schedule=sparsity.ConstantSparsity(0.75, 0, frequency=1))
    pruned.compile("sgd", "mse")
    pruned.fit(reference["x"], np.zeros((8, 4), "f"), batch_size=4, verbose=0,
               callbacks=[sparsity.UpdatePruningStep()])
    conv = pruned.get_layer("magnitude_pruning_conv")
    np.testing.assert_array_equal(np.asarray(conv.mask) == 0, reference["conv"] == 0)
