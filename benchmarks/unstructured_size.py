"""TFLite file size of unstructured pruning: standard (SP) and interspace (IP) against dense.

Two networks, their weights as initialised (a file's size depends on the
number and layout of the nonzeros, not on their values): the ablation's
(four 3x3 convolutions of 32, 32, 64, 64 filters on 20x20x1 inputs, batch
norm, a 10-way head) and a wider one (3x3 convolutions of 64, 128, 128
filters on 16x16x16 inputs). Every 3x3 convolution is pruned one-shot to each
rate, with `prune_low_magnitude` (SP: plain `Conv2D`s with sparse kernels
once stripped) or `prune_interspace` (IP, DCT basis: `FilterBasisConv2D`s,
whose 1x1 stage holds the sparse coefficients), stripped, exported with
`export_tflite` (which stores mostly-zero kernels in TFLite's sparse
encoding) and checked against Keras with `verify_tflite`. Sizes are ratios
against the dense network's file, exported in the same run.

Both savings stacked: the same networks with every 3x3 convolution a
`TransformConv2D` (four rotations, base ratio 1/4; form `tc`, its rate the
0.75 of the convolution weights it leaves out), and those layers' bases in
the DCT filter basis with their coefficients pruned to `1 - 4 (1 - rate)`
(form `tc-ip-dct`: `FilterBasisTransformConv2D`s, as many nonzero base
weights as SP and IP keep at that rate).

Usage:
    python benchmarks/unstructured_size.py [--rates 0.9 0.95 0.98]
"""

import argparse
import datetime
import os
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

import common  # noqa: E402  (benchmarks/common.py, beside this script)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "unstructured_size.json"


TC_RATIO = 1 / 4


def networks(transform=False):
    """The two networks; with `transform`, their 3x3 convolutions are `TransformConv2D`s."""
    import keras

    import tf_transform_conv as tc

    def conv(filters, **kwargs):
        if not transform:
            return keras.layers.Conv2D(filters, 3, padding="same", **kwargs)
        return tc.TransformConv2D(filters, 3, padding="same", transforms="rotations",
                                  base_filters=round(filters * TC_RATIO), **kwargs)

    keras.utils.set_random_seed(0)
    inputs = keras.Input((20, 20, 1))
    x = inputs
    for index, filters in enumerate((32, 32, 64, 64)):
        x = conv(filters, use_bias=False, name=f"conv{index}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{index}")(x)
        x = keras.layers.ReLU()(x)
        if index in (1, 3):
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    ablation = keras.Model(inputs, keras.layers.Dense(10, name="head")(x), name="ablation")

    inputs = keras.Input((16, 16, 16))
    x = inputs
    for index, filters in enumerate((64, 128, 128)):
        x = conv(filters, activation="relu", name=f"conv{index}")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    wide = keras.Model(inputs, keras.layers.Dense(10, name="head")(x), name="wide")
    return [ablation, wide]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.9, 0.95, 0.98],
                        help=f"weight sparsities (0.9 0.95 0.98); >= {1 - TC_RATIO}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if any(not 1 - TC_RATIO <= r < 1 for r in args.rates):
        parser.error(f"--rates must be in [{1 - TC_RATIO}, 1), got {args.rates}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    import tf_transform_conv as tc

    rows = []
    folder = Path(tempfile.mkdtemp(prefix="unstructured-size-"))
    for model, twin in zip(networks(), networks(transform=True)):
        x = np.random.default_rng(0).normal(
            size=(2,) + tuple(model.input_shape[1:])).astype("float32")
        dense = tc.export_tflite(model, folder / f"{model.name}-dense.tflite")
        rows.append(dict(network=model.name, form="dense", rate=0.0, bytes=dense.bytes,
                         ratio=1.0, nonzeros=tc.model_cost(model).nonzeros,
                         op_counts=dense.op_counts))
        path = folder / f"{model.name}-tc.tflite"
        result = tc.export_tflite(twin, path)
        check = tc.verify_tflite(path, twin, x)
        rows.append(dict(network=model.name, form="tc", rate=1 - TC_RATIO, bytes=result.bytes,
                         ratio=result.bytes / dense.bytes,
                         nonzeros=tc.model_cost(twin).nonzeros,
                         max_rel_diff=check.max_rel_diff, op_counts=result.op_counts))
        for rate in args.rates:
            schedule = lambda step, rate=rate: (True, rate)  # noqa: E731
            coefficients = lambda step, rate=rate: (True, 1 - (1 - rate) / TC_RATIO)  # noqa: E731
            for form in ("sp", "ip-dct", "tc-ip-dct"):
                if form == "sp":
                    pruned = tc.prune_low_magnitude(model, schedule, layers=keras.layers.Conv2D)
                elif form == "ip-dct":
                    pruned = tc.prune_interspace(model, schedule, basis="dct")
                else:
                    pruned = tc.prune_interspace(twin, coefficients, basis="dct")
                tc.update_pruning_step(pruned, 0)
                stripped = tc.strip_model(pruned)
                path = folder / f"{model.name}-{form}-{rate}.tflite"
                result = tc.export_tflite(stripped, path)
                check = tc.verify_tflite(path, stripped, x)
                rows.append(dict(network=model.name, form=form, rate=rate, bytes=result.bytes,
                                 ratio=result.bytes / dense.bytes,
                                 nonzeros=tc.model_cost(stripped).nonzeros,
                                 max_rel_diff=check.max_rel_diff, op_counts=result.op_counts))
    print(f"{'network':<10}{'form':<10}{'rate':>6}{'bytes':>10}{'/ dense':>9}{'nonzeros':>10}")
    for row in rows:
        print(f"{row['network']:<10}{row['form']:<10}{row['rate']:>6}{row['bytes']:>10,}"
              f"{row['ratio']:>9.3f}{row['nonzeros']:>10,}")
    payload = {
        "benchmark": "unstructured_size",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/unstructured_size.py " + shlex.join(argv or sys.argv[1:]),
        "machine": common.machine_info(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "rows": rows,
    }
    common.write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
