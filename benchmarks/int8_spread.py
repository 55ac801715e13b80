"""Why int8 grouped layers ran slower than dense ones, and what merging the spread's groups gains.

The grouped form of a `TransformConv2D` (`tf_transform_conv.export.grouped`)
is a 1x1 product convolution, then a grouped 3x3 *spread* convolution with
one group per base: group `b` reads base `b`'s 9 product channels and writes
the filters built from it (2 at ratio 1/2, 4 at 1/4). Two measurements, in
full-integer int8 files (`export.export_tflite(quantization="int8")`, 16
random calibration samples), batch 1, the LiteRT interpreter with its
default delegates (XNNPACK), interleaved rounds:

spread   the spread convolution alone, `Conv2D(C, 3, groups=G)` on the
         `9 n` product channels (`n = C * ratio` bases), for every divisor
         `G` of `n` (one group per base is `G = n`), against the dense layer
         `Conv2D(C, 3)` on `C` channels, both with random weights. Shows
         where the time goes: XNNPACK's int8 grouped convolution (TF 2.21)
         costs about the same per group whatever the group's width.
layer    a whole layer, `Input(H, W, C) -> TransformConv2D(C, 3, ratio,
         default transforms, scale, relu) -> GlobalAveragePooling2D ->
         Dense(10)`, written three ways: `dense` (lowering="dense"),
         `per-base` (lowering="grouped" with one spread group per base, as
         int8 files wrote it before) and `merged` (lowering="grouped" as
         `export_tflite` writes it now, `GroupedPlan.for_quantization`: up
         to 64 filters one group writing the filters, more in merged groups,
         `int8_spread_groups`). Bytes, latency and the ratio to dense.
models   (--models) whole networks: dense against their
         `conv_factory(base_ratio=1/4)` twins (random weights,
         `keras.utils.set_random_seed(0)` before each build) or, for
         `resnet56_converted`, the dense network converted by
         `transform_model(base_ratio=1/4)` (fitted assignments: padded
         slots in the float32 form), each written with `lowering="auto"`
         and `"grouped"`, as before and as now.

Writes JSON (benchmark, command, timestamp, machine, versions, config, rows,
wall_s) to --out. Usage:

    python benchmarks/int8_spread.py                 # full: 6 shapes x 2 ratios
    python benchmarks/int8_spread.py --quick         # 2 shapes, 1/4 only
    python benchmarks/int8_spread.py --shapes --models resnet56 resnet18 resnet56_converted

Results are ratios measured in one run on one machine; the absolute times
change from machine to machine (an AVX-512 EPYC's int8 convolutions are far
faster than its float ones).
"""

import argparse
import contextlib
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

SHAPES = ("32x32x16", "16x16x32", "16x16x64", "8x8x128", "14x14x256", "7x7x512")
QUICK_SHAPES = ("16x16x32", "8x8x128")
MODELS = ("resnet56", "resnet18", "resnet56_converted")
CALIBRATION_SAMPLES = 16


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", type=common.parse_shape, default=None,
                        help=f"HxWxC input shapes (default {' '.join(SHAPES)})")
    parser.add_argument("--ratios", nargs="+", choices=("1/2", "1/4"), default=None,
                        help="base ratios (default 1/2 1/4; --quick: 1/4)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--loop-ms", type=float, default=50.0,
                        help="milliseconds per timed loop (default 50)")
    parser.add_argument("--models", nargs="*", default=[], choices=MODELS,
                        help="whole networks, dense and their 1/4 twins (default none)")
    parser.add_argument("--imagenet-size", type=int, default=224,
                        help="input rows = cols of resnet18 (default 224)")
    parser.add_argument("--quick", action="store_true", help="2 shapes at 1/4, 3 rounds")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path("benchmarks/results/int8_spread.json"))
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.loop_ms <= 0 or args.imagenet_size < 32:
        parser.error("--repeats must be >= 1, --loop-ms > 0 and --imagenet-size >= 32")
    if args.shapes is None:
        args.shapes = list(QUICK_SHAPES if args.quick else SHAPES)
    if args.ratios is None:
        args.ratios = ["1/4"] if args.quick else ["1/2", "1/4"]
    if args.quick:
        args.repeats = min(args.repeats, 3)
    return args


def _random_weights(model, rng, scale=0.2):
    for weight in model.weights:
        weight.assign((rng.normal(size=weight.shape) * scale).astype("float32"))


def _export(model, path, rng, lowering="auto"):
    from tf_transform_conv.export import export_tflite

    shape = tuple(model.inputs[0].shape[1:])
    data = rng.normal(size=(CALIBRATION_SAMPLES,) + shape).astype("float32")
    export_tflite(model, path, quantization="int8", representative_data=data,
                  lowering=lowering)
    return os.path.getsize(path)


def _time(paths, args):
    """Median ms per call of each file, timed in interleaved rounds (1 thread)."""
    timers = {name: common.Timer(common.litert_runner(path, 1, 0), args.loop_ms / 1e3, 3)
              for name, path in paths.items()}
    common.run_rounds(list(timers.values()), args.repeats)
    return {name: timer.median_ms for name, timer in timers.items()}


def spread_rows(shape, ratio, folder, args, rng):
    """The spread convolution alone, for every group count, against the dense layer."""
    import keras

    h, w, c = common.shape_dims(shape)
    n = c // common.ratio_denominator(ratio)
    paths = {}
    for groups in [g for g in range(1, n + 1) if n % g == 0]:
        keras.backend.clear_session()
        model = keras.Sequential([keras.Input((h, w, 9 * n)),
                                  keras.layers.Conv2D(c, 3, padding="same", groups=groups)])
        _random_weights(model, rng)
        paths[groups] = os.path.join(folder, f"spread_{groups}.tflite")
        _export(model, paths[groups], rng)
    keras.backend.clear_session()
    dense = keras.Sequential([keras.Input((h, w, c)), keras.layers.Conv2D(c, 3, padding="same")])
    _random_weights(dense, rng)
    paths["dense"] = os.path.join(folder, "dense.tflite")
    _export(dense, paths["dense"], rng)
    ms = _time(paths, args)
    return {
        "shape": shape, "ratio": ratio, "bases": n, "dense_ms": ms.pop("dense"),
        "spread_ms": {str(g): v for g, v in ms.items()},
    }


@contextlib.contextmanager
def _per_base_spread_groups():
    """Writes int8 spread convolutions as before: one group per base, padded
    slots and a selection after them (normalized where it can be)."""
    from tf_transform_conv.export import grouped

    saved = grouped.GroupedPlan.for_quantization
    grouped.GroupedPlan.for_quantization = (
        lambda plan, quantization: plan.normalized() if quantization == "int8" else plan)
    try:
        yield
    finally:
        grouped.GroupedPlan.for_quantization = saved


def layer_row(shape, ratio, folder, args, rng):
    """A whole layer in int8: dense, per-base spread groups, merged spread groups."""
    import keras

    from tf_transform_conv.export.grouped import grouped_plan
    from tf_transform_conv.layers import TransformConv2D
    from tf_transform_conv.models import DEFAULT_TRANSFORMS

    keras.backend.clear_session()
    h, w, c = common.shape_dims(shape)
    k = common.ratio_denominator(ratio)
    inputs = keras.Input((h, w, c))
    layer = TransformConv2D(c, 3, base_filters=c // k, transforms=DEFAULT_TRANSFORMS[k],
                            padding="same", scale=True, activation="relu", name="tc")
    x = keras.layers.GlobalAveragePooling2D()(layer(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    _random_weights(model, rng)
    layer.scale_weight.assign(1.0 + 0.1 * rng.normal(size=layer.scale_weight.shape))
    plan = grouped_plan(layer)
    paths = {form: os.path.join(folder, f"layer_{form}.tflite")
             for form in ("dense", "per-base", "merged")}
    sizes = {"dense": _export(model, paths["dense"], rng, "dense")}
    with _per_base_spread_groups():
        sizes["per-base"] = _export(model, paths["per-base"], rng, "grouped")
    sizes["merged"] = _export(model, paths["merged"], rng, "grouped")
    ms = _time(paths, args)
    return {
        "shape": shape, "ratio": ratio, "bases": int(layer.base_filters),
        "spread_groups": {"per-base": plan.base_groups(),
                          "merged": plan.for_quantization("int8").spread_groups or 1},
        "bytes": sizes, "ms": ms,
        "ms_vs_dense": {form: ms[form] / ms["dense"] for form in ("per-base", "merged")},
    }


def model_row(name, folder, args, rng):
    """A whole network in int8: dense, and its 1/4 twin with `"auto"` and `"grouped"`,
    per-base and merged spread groups."""
    import keras

    from tf_transform_conv import models
    from tf_transform_conv import transform_model
    from tf_transform_conv.export import export_tflite
    from tf_transform_conv.layers import TransformConv2D

    cifar = name.startswith("resnet56")
    shape = (32, 32, 3) if cifar else (args.imagenet_size,) * 2 + (3,)
    kwargs = {} if cifar else {"input_shape": shape}
    built = {}
    for variant, conv in (("dense", None), ("1/4", models.conv_factory(base_ratio=0.25))):
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        if name == "resnet56_converted" and conv is not None:
            built[variant] = transform_model(built["dense"], base_ratio=0.25)[0]
        else:
            built[variant] = models.build_model(name.split("_")[0], conv=conv, **kwargs)
    data = rng.normal(size=(CALIBRATION_SAMPLES,) + shape).astype("float32")
    paths, sizes, grouped_layers = {}, {}, {}

    def write(label, model, lowering):
        paths[label] = os.path.join(folder, f"{name}_{label.replace(' ', '_')}.tflite")
        result = export_tflite(model, paths[label], quantization="int8",
                               representative_data=data, lowering=lowering)
        sizes[label] = result.bytes
        grouped_layers[label] = sum(form == "grouped" for form in result.lowerings.values())

    write("dense", built["dense"], "auto")
    for lowering in ("auto", "grouped"):
        with _per_base_spread_groups():
            write(f"{lowering} per-base", built["1/4"], lowering)
        write(f"{lowering} merged", built["1/4"], lowering)
    ms = _time(paths, args)
    return {
        "model": name, "input_shape": list(shape),
        "transform_layers": sum(isinstance(layer, TransformConv2D)
                                for layer in built["1/4"].layers),
        "grouped_layers": grouped_layers, "bytes": sizes, "ms": ms,
        "ms_vs_dense": {label: ms[label] / ms["dense"] for label in ms if label != "dense"},
    }


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    start = time.time()
    rng = np.random.default_rng(0)
    spread, layers, networks = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for shape in args.shapes:
            for ratio in args.ratios:
                spread.append(spread_rows(shape, ratio, folder, args, rng))
                row = spread[-1]
                groups = " ".join(f"G{g}={v / row['dense_ms']:.2f}"
                                  for g, v in row["spread_ms"].items())
                print(f"spread {shape} {ratio}: dense {row['dense_ms'] * 1e3:.1f} us; "
                      f"spread / dense: {groups}", flush=True)
                layers.append(layer_row(shape, ratio, folder, args, rng))
                row = layers[-1]
                print(f"layer  {shape} {ratio}: bytes {row['bytes']}; ms / dense: per-base "
                      f"{row['ms_vs_dense']['per-base']:.2f} (G={row['spread_groups']['per-base']}),"
                      f" merged {row['ms_vs_dense']['merged']:.2f} "
                      f"(G={row['spread_groups']['merged']})", flush=True)
        for name in args.models:
            networks.append(model_row(name, folder, args, rng))
            row = networks[-1]
            for label in row["bytes"]:
                ratio = row["ms_vs_dense"].get(label, 1.0)
                print(f"model  {name} {label:16s} {row['bytes'][label]:>11,} bytes "
                      f"{row['ms'][label]:8.3f} ms {ratio:5.2f}x dense "
                      f"({row['grouped_layers'][label]} grouped of {row['transform_layers']})",
                      flush=True)
    common.write_json(args.out, {
        "benchmark": "int8_spread",
        "command": "python benchmarks/int8_spread.py " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": common.tf_machine_info(),
        "versions": common.litert_versions(),
        "config": {"shapes": args.shapes, "ratios": args.ratios, "models": args.models,
                   "imagenet_size": args.imagenet_size, "repeats": args.repeats,
                   "loop_ms": args.loop_ms, "threads": 1,
                   "calibration_samples": CALIBRATION_SAMPLES},
        "spread": spread,
        "layers": layers,
        "models": networks,
        "wall_s": time.time() - start,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
