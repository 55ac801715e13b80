# ruff: noqa: F821  (keras and tfmot come from the imports the test prepends)
"""A tfmot pruning script (block, M-by-N, policy), run by tests/test_sparsity.py with tfmot's or this package's imports prepended."""

import sys
import numpy as np

d = np.load(sys.argv[1])
P = tfmot.sparsity.keras.prune_low_magnitude


def build(wrap=lambda layer: layer, wrap_head=lambda layer: layer):
    inputs = keras.Input((9, 9, 3))
    x = keras.layers.ZeroPadding2D(1)(inputs)
    x = wrap(keras.layers.Conv2D(8, 3, strides=2, name="stem"))(x)
    x = wrap(keras.layers.Conv2D(16, 1, name="expand"))(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = wrap(keras.layers.Conv2D(12, 1, name="project"))(x)
    x = keras.layers.GlobalAveragePooling2D(keepdims=True)(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, wrap_head(keras.layers.Dense(6, name="head"))(x))


def inner(model, name):
    return [getattr(l, "layer", l) for l in model.layers if getattr(l, "layer", l).name == name][0]


def masks_of(layer):  # instrumentation only: tfmot's and this package's mask variables
    if hasattr(layer, "pruning_vars"):
        return [np.asarray(m) for _, m, _ in layer.pruning_vars]
    return [np.asarray(m) for m in getattr(layer, "masks", [])]


out = {}
for variant in ("block_avg", "block_max", "m_by_n", "policy"):
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.2, 0.75, begin_step=1, end_step=9, frequency=2)
    if variant.startswith("block"):
        pooling = "AVG" if variant == "block_avg" else "MAX"
        model = build(lambda layer: P(layer, pruning_schedule=schedule),
                      lambda layer: P(layer, pruning_schedule=schedule, block_size=(2, 3),
                                      block_pooling_type=pooling))
    elif variant == "m_by_n":
        model = P(build(), pruning_schedule=schedule, sparsity_m_by_n=(2, 4))
    else:
        model = P(build(), pruning_schedule=schedule,
                  pruning_policy=tfmot.sparsity.keras.PruneForLatencyOnXNNPack())
    for name in ("stem", "expand", "dw", "project", "head"):
        inner(model, name).set_weights([d[name + "_k"], d[name + "_b"]])
    wrapped = [l for l in model.layers if masks_of(l)]
    names = [l.layer.name for l in wrapped]
    masks = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if hasattr(self.model, "jax_state_sync"):  # Keras 3 on JAX: variables out of the model
                self.model.jax_state_sync()
            masks.append([m.ravel() for l in wrapped for m in masks_of(l)])

    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(d["x"], d["y"], batch_size=2, epochs=1, shuffle=False, verbose=0,
              callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), Record()])
    stripped = tfmot.sparsity.keras.strip_pruning(model)
    out[variant + "/names"] = np.array(names)
    out[variant + "/masks"] = np.array([np.concatenate(m) for m in masks])
    for name in ("stem", "expand", "dw", "project", "head"):
        kernel = stripped.get_layer(name).weights[0]
        out[variant + "/" + name] = np.asarray(kernel)
np.savez(sys.argv[2], **out)
