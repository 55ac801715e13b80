"""Does LiteRT's XNNPACK run our pruned 1x1 convolutions faster? Dense against sparse files.

A MobileNetV2 (keras.applications, random weights) at 224x224 (width 1.0)
and a smaller one (width 0.5, 128x128), and the same two built in the shape
`PruneForLatencyOnXNNPack` checks (`xnnpack_*`: stride-2 convolutions after
`ZeroPadding2D`, "valid"; global average pooling with `keepdims=True`),
every 1x1 `Conv2D` pruned one-shot
by magnitude (`ops.masks.magnitude_mask`) to each rate, the rest dense (the
3x3 stem, the depthwise convolutions and the classifier), then exported:

- `dense`: the unpruned network (`export_tflite`);
- `sparse@r`: the pruned network, `export_tflite`, which stores the mostly
  zero kernels in TFLite's sparse encoding (`EXPERIMENTAL_SPARSITY`: each is
  a constant followed by a DENSIFY operator);
- `zeros@r`: the same pruned weights converted without
  `EXPERIMENTAL_SPARSITY` (dense encoding holding the zeros).

Each file runs in LiteRT (`ai_edge_litert.interpreter.Interpreter`, default
delegates, i.e. XNNPACK, `num_threads=1`, batch 1, a fixed random input);
the timing is interleaved: every round times every file once (a loop of
calls lasting at least `--min-seconds`), over `--rounds` rounds, and the
median per call is reported with the ratio to the dense file of the same
network. Outputs (the 1000 logits, no softmax) are compared with Keras' to
check every file computes the same network.

Usage:
    python benchmarks/sparse_inference.py [--rates 0.75 0.9] [--rounds 9]
"""

import argparse
import datetime
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common  # noqa: E402  (benchmarks/common.py, beside this script)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sparse_inference.json"

#: (name, width multiplier, input side): keras.applications' MobileNetV2, and the
#: same network in the shape `PruneForLatencyOnXNNPack` checks ("xnnpack_").
NETWORKS = (("mobilenet_v2_1.0_224", 1.0, 224), ("mobilenet_v2_0.5_128", 0.5, 128),
            ("xnnpack_v2_1.0_224", 1.0, 224), ("xnnpack_v2_0.5_128", 0.5, 128))

#: MobileNetV2's inverted residual blocks: (expansion, filters, repeats, stride).
BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1))


def _divisible(value, by=8):
    return max(by, int(value + by / 2) // by * by)


def xnnpack_mobilenet_v2(alpha, side):
    """MobileNetV2 as XNNPACK's sparse inference wants it (`PruneForLatencyOnXNNPack`
    accepts it): every stride-2 3x3 convolution is `ZeroPadding2D(1)` then
    `"valid"`, and the network ends in `GlobalAveragePooling2D(keepdims=True)`
    before the classifier."""
    import keras
    from keras import layers

    def bn_relu(x, relu=True):
        x = layers.BatchNormalization()(x)
        return layers.ReLU(6.0)(x) if relu else x

    inputs = keras.Input((side, side, 3))
    x = layers.ZeroPadding2D(1)(inputs)
    x = bn_relu(layers.Conv2D(_divisible(32 * alpha), 3, strides=2, use_bias=False)(x))
    channels = _divisible(32 * alpha)
    for expansion, filters, repeats, stride in BLOCKS:
        out = _divisible(filters * alpha)
        for index in range(repeats):
            strides = stride if index == 0 else 1
            y = x
            if expansion != 1:
                y = bn_relu(layers.Conv2D(channels * expansion, 1, use_bias=False)(y))
            if strides == 2:
                y = layers.DepthwiseConv2D(3, strides=2, use_bias=False)(layers.ZeroPadding2D(1)(y))
            else:
                y = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(y)
            y = bn_relu(y)
            y = bn_relu(layers.Conv2D(out, 1, use_bias=False)(y), relu=False)
            x = layers.Add()([x, y]) if strides == 1 and channels == out else y
            channels = out
    x = bn_relu(layers.Conv2D(1280 if alpha <= 1 else _divisible(1280 * alpha), 1,
                              use_bias=False)(x))
    x = layers.GlobalAveragePooling2D(keepdims=True)(x)
    outputs = layers.Dense(1000)(layers.Flatten()(x))  # logits: outputs compared below
    return keras.Model(inputs, outputs)


def network(name, alpha, side):
    import keras

    keras.utils.set_random_seed(0)
    if name.startswith("xnnpack"):
        from tf_transform_conv.sparsity import PruneForLatencyOnXNNPack

        model = xnnpack_mobilenet_v2(alpha, side)
        PruneForLatencyOnXNNPack().ensure_model_supports_pruning(model)
        return model
    return keras.applications.MobileNetV2(
        input_shape=(side, side, 3), alpha=alpha, weights=None, classes=1000,
        classifier_activation=None)


def prune_pointwise(model, rate):
    """A copy of `model` whose 1x1 `Conv2D` kernels keep their largest `1 - rate` entries."""
    import keras

    from tf_transform_conv.ops.masks import magnitude_mask

    pruned = keras.models.clone_model(model)
    pruned.set_weights(model.get_weights())
    count = 0
    for layer in pruned.layers:
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(
                layer, keras.layers.DepthwiseConv2D) and tuple(layer.kernel_size) == (1, 1):
            kernel = np.asarray(layer.kernel)
            layer.kernel.assign(kernel * magnitude_mask(np.abs(kernel), rate))
            count += 1
    return pruned, count


def convert_plain(model, path):
    """The converter without `EXPERIMENTAL_SPARSITY` (zeros stored densely)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        spec = [tf.TensorSpec((1,) + tuple(model.input_shape[1:]), tf.float32)]
        model.export(os.path.join(tmp, "sm"), input_signature=spec, verbose=False)
        flatbuffer = tf.lite.TFLiteConverter.from_saved_model(
            os.path.join(tmp, "sm")).convert()
    Path(path).write_bytes(flatbuffer)
    return len(flatbuffer)


def interpreter(path, x):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=os.fspath(path), num_threads=1)
    runner.allocate_tensors()
    runner.set_tensor(runner.get_input_details()[0]["index"], x)
    return runner


def loop_ms(runner, min_seconds):
    start = time.perf_counter()
    calls = 0
    while True:
        runner.invoke()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return 1e3 * elapsed / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.75, 0.9])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--min-seconds", type=float, default=0.3)
    parser.add_argument("--networks", nargs="+", default=[n for n, _, _ in NETWORKS],
                        choices=[n for n, _, _ in NETWORKS])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import keras

    from tf_transform_conv.export import export_tflite
    from tf_transform_conv.export import tflite_op_counts

    rows = []
    with tempfile.TemporaryDirectory(prefix="sparse-inference-") as tmp:
        files = []  # (network, variant, rate, path, reference output)
        for name, alpha, side in NETWORKS:
            if name not in args.networks:
                continue
            model = network(name, alpha, side)
            x = np.random.default_rng(0).normal(size=(1, side, side, 3)).astype("float32")
            variants = [("dense", 0.0, model)]
            for rate in args.rates:
                pruned, count = prune_pointwise(model, rate)
                variants += [("sparse", rate, pruned), ("zeros", rate, pruned)]
            for variant, rate, m in variants:
                path = Path(tmp) / f"{name}-{variant}-{rate}.tflite"
                if variant == "zeros":
                    size = convert_plain(m, path)
                else:
                    size = export_tflite(m, path).bytes
                files.append(dict(network=name, variant=variant, rate=rate, path=path,
                                  bytes=size, x=x, keras=np.asarray(m(x, training=False)),
                                  pointwise_layers=count,
                                  ops=tflite_op_counts(path.read_bytes())))
                print(f"{name} {variant} {rate}: {size} bytes", flush=True)
        keras.backend.clear_session()
        runners = [interpreter(f["path"], f["x"]) for f in files]
        for f, runner in zip(files, runners):
            runner.invoke()
            out = runner.get_tensor(runner.get_output_details()[0]["index"])
            f["max_abs_diff"] = float(np.abs(out - f["keras"]).max())
            f["samples"] = []
        for _ in range(args.rounds):
            for f, runner in zip(files, runners):
                f["samples"].append(loop_ms(runner, args.min_seconds))
    for f in files:
        dense = next(g for g in files if g["network"] == f["network"] and g["variant"] == "dense")
        ms = float(np.median(f["samples"]))
        rows.append(dict(
            network=f["network"], variant=f["variant"], rate=f["rate"], bytes=f["bytes"],
            ms=ms, ratio_to_dense=ms / float(np.median(dense["samples"])),
            samples_ms=f["samples"], densify_ops=f["ops"].get("DENSIFY", 0),
            pointwise_layers=f["pointwise_layers"], max_abs_diff=f["max_abs_diff"]))
        print(f"{f['network']:22s} {f['variant']:7s} {f['rate']:.2f} "
              f"{ms:8.2f} ms  x{rows[-1]['ratio_to_dense']:.3f}  "
              f"DENSIFY={rows[-1]['densify_ops']}  diff={f['max_abs_diff']:.2e}")
    payload = {
        "command": "python benchmarks/sparse_inference.py " + shlex.join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": common.tf_machine_info(),
        "versions": common.litert_versions(),
        "threads": 1,
        "rows": rows,
    }
    common.write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
