"""One `TransformConv2D` in a `.tflite` file, per lowering, against its dense `Conv2D`.

For each layer shape (H x W x C in, C out, 3x3, "same", stride 1 by default,
2 with --strides 1 2) and each base ratio n / C (default assignment, as
`models.DEFAULT_TRANSFORMS`: 1/2 -> identity and rot180, 1/4 -> the four
rotations, 1/8 -> d4), a one-layer model

    keras.Input((H, W, C)) -> TransformConv2D(C, 3, base_filters=C*ratio,
        padding="same", strides=s, scale=True, use_bias=True)

gets random weights (seeded numpy normal base kernel, scale and bias), and
its dense twin `Conv2D(C, 3, padding="same", strides=s)` gets
`layer.materialized_kernel()` (the scale included) and the same bias. Three
float32 files are written with `export.export_tflite`:

    dense     the twin, exported as it is (it holds no TransformConv2D)
    grouped   lowering="grouped": a 1x1 product CONV_2D, then a grouped
              CONV_2D spreading the products (`tf_transform_conv.export.grouped`)
    slices    lowering="slices": the Keras factored path, a product then
              strided slices and additions
    scalar    the same layer with `transform_family="scalar"` (the same bases,
              scale and bias; per-tap multipliers 1 + 0.1 normal), written
              with lowering="grouped": its spread kernel holds scale times
              multiplier where the discrete one holds the scale

With --assignments fitted (besides or instead of "default"), a row's layer
gets the uneven assignment converted and pruned models get: a random
He-normal C-filter kernel (seeded) is fitted with
`assignment.fit_assignment(kernel, C*ratio, transforms="d4")` (the
`transform_model(..., transforms="d4")` default; criterion
"reconstruction"), and the layer takes its bases, assignment and scales. One
base then builds more filters than another, and the grouped form pads every
base's group to the largest: the row reports that padding (the spread
convolution's outputs over the filters; 1.0 under the default assignment)
and the largest group (`slots`).

Each file is checked against the TransformConv2D model with
`export.verify_tflite(..., rtol=1e-4)` on 2 random samples.

Timing: batch-1 latency in the LiteRT interpreter, `ai_edge_litert`
`Interpreter(model_path, num_threads=k)` (default delegates, i.e. XNNPACK),
k = 1 and 2. The six interpreters of one shape and ratio (3 files x 2 thread
counts) are interleaved: after a warm-up and an untimed round, each round
times a loop of calls per interpreter, the order rotating from round to
round; a row reports the median over the rounds of the time per call, and
ratios form / dense measured in the same run.

Target: the scalar family's grouped file within 1.1x the discrete grouped
file's latency, and within 1.1x its bytes plus the multipliers' 4 bytes each.

Writes JSON (benchmark, command, timestamp, machine with the load average,
versions, config, complete, rows, wall_s) atomically, and a PNG beside it of
the latency ratios grouped / dense and slices / dense (1 thread) per shape,
one panel per ratio. The `.tflite` files go to a temporary folder (or
--keep-files DIR). Each row holds: shape, stride, ratio, transforms,
base_filters, params (dense and transformed, `cost.model_cost`), dense and
grouped-form MACs, and per form the file bytes, operator counts, XNNPACK
delegate nodes, max relative difference from Keras, and ms per thread count.

Usage:
    python benchmarks/tflite_lowering.py                  # every shape and ratio, stride 1
    python benchmarks/tflite_lowering.py --quick          # smoke test (2 shapes, ratio 1/4)
    python benchmarks/tflite_lowering.py --shapes 56x56x64 --ratios 1/4 --strides 1 2
    python benchmarks/tflite_lowering.py --shapes 32x32x16 16x16x64 8x8x128 \
        --ratios 1/2 1/4 1/8 --assignments default fitted --repeats 3 --loop-ms 30 \
        --out benchmarks/results/tflite_lowering_fitted.json   # uneven assignments
"""

import argparse
import datetime
import fractions
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py, beside this script)
from tf_transform_conv.ops.assignment import fit_assignment  # noqa: E402
from tf_transform_conv.cost import model_cost  # noqa: E402
from tf_transform_conv.export import TFLiteMismatchError  # noqa: E402
from tf_transform_conv.export import export_tflite, verify_tflite  # noqa: E402
from tf_transform_conv.layers import TransformConv2D  # noqa: E402
from tf_transform_conv.export.grouped import grouped_plan  # noqa: E402
from tf_transform_conv.export.lowering import lowering_choice  # noqa: E402
from tf_transform_conv.models import DEFAULT_TRANSFORMS  # noqa: E402

SHAPES = (
    "32x32x16",
    "16x16x32",
    "8x8x64",
    "56x56x64",
    "28x28x128",
    "14x14x256",
    "7x7x512",
)
QUICK_SHAPES = ("32x32x16", "8x8x64")
QUICK_RATIO = "1/4"
STRIDE_CHOICES = (1, 2)
ASSIGNMENTS = ("default", "fitted")
FITTED_TRANSFORMS = "d4"  # what transform_model / prune_model fit by default
FORMS = ("dense", "grouped", "slices", "scalar")
LOWERED = ("grouped", "slices", "scalar")
SCALAR_MAX = 1.1  # the scalar family's grouped file against the discrete one
THREADS = (1, 2)
KERNEL = 3
VERIFY_SAMPLES = 2
# Float32 files agree with Keras to about 1e-6 of the output scale (export.py).
MAX_REL_DIFF = 1e-4

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "tflite_lowering.json"
QUICK_OUT = RESULTS / "tflite_lowering_quick.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", nargs="+", type=common.parse_shape, default=None,
        help=f"input shapes HxWxC (in = out channels); default: all of "
        f"{' '.join(SHAPES)} ({' '.join(QUICK_SHAPES)} with --quick)",
    )
    parser.add_argument(
        "--ratios", nargs="+", type=common.parse_ratio, default=None,
        help=f"base ratios n/filters, among {' '.join(common.RATIO_CHOICES)} "
        f"(default all; {QUICK_RATIO} with --quick)",
    )
    parser.add_argument(
        "--strides", nargs="+", type=int, choices=STRIDE_CHOICES, default=[1],
        help="strides of the layer (default 1; '--strides 1 2' adds stride-2 rows)",
    )
    parser.add_argument(
        "--assignments", nargs="+", choices=ASSIGNMENTS, default=["default"],
        help="'default': the layer's default assignment; 'fitted': the uneven one "
        "fit_assignment gives on a random kernel (transforms d4), as converted and "
        "pruned models get (default: default)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None,
        help="timed rounds per file and thread count, the median is reported "
        "(default 7, 3 with --quick)",
    )
    parser.add_argument(
        "--loop-ms", type=float, default=None,
        help="target duration of one timed loop; sets the calls per loop "
        "(default 100, 30 with --quick)",
    )
    parser.add_argument(
        "--min-calls", type=int, default=1, help="fewest calls in a timed loop (default 1)"
    )
    parser.add_argument(
        "--quick", action="store_true",
        help=f"smoke test: shapes {' '.join(QUICK_SHAPES)}, ratio {QUICK_RATIO} "
        "(unless --shapes / --ratios), 3 rounds, short loops",
    )
    parser.add_argument(
        "--out", type=Path, default=None,
        help=f"JSON path, the PNG is written beside it (default {DEFAULT_OUT}, "
        f"{QUICK_OUT.name} with --quick)",
    )
    parser.add_argument(
        "--keep-files", type=Path, default=None,
        help="folder to keep the .tflite files in (default: a temporary folder, "
        "deleted at the end)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = list(QUICK_SHAPES if args.quick else SHAPES)
    if args.ratios is None:
        args.ratios = [QUICK_RATIO] if args.quick else list(common.RATIO_CHOICES)
    args.shapes = list(dict.fromkeys(args.shapes))
    args.ratios = sorted(set(args.ratios), key=lambda r: -fractions.Fraction(r))
    args.strides = sorted(set(args.strides))
    args.assignments = [a for a in ASSIGNMENTS if a in args.assignments]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.loop_ms is None:
        args.loop_ms = 30.0 if args.quick else 100.0
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if min(args.repeats, args.min_calls) < 1 or args.loop_ms <= 0:
        parser.error("--repeats, --min-calls and --loop-ms must be positive")
    for shape in args.shapes:
        for ratio in args.ratios:
            if common.shape_dims(shape)[2] % common.ratio_denominator(ratio):
                parser.error(f"{shape}: {common.shape_dims(shape)[2]} channels do not "
                             f"divide into bases at ratio {ratio}")
    return args


def row_label(row):
    label = f"{row['shape']} s{row['stride']} {row['ratio']}"
    return label if row["assignment"] == "default" else f"{label} {row['assignment']}"


# ----------------------------------------------------------------------
# Models, files and the static measurements


def layer_transforms(ratio, assignment):
    if assignment == "fitted":
        return FITTED_TRANSFORMS
    return DEFAULT_TRANSFORMS[common.ratio_denominator(ratio)]


def make_models(shape, stride, ratio, seed, assignment="default"):
    """The TransformConv2D model with random weights, its dense Conv2D twin and
    its scalar-family twin (same weights, random multipliers)."""
    h, w, c = common.shape_dims(shape)
    k = common.ratio_denominator(ratio)
    rng = np.random.default_rng(seed)
    fan_in = KERNEL * KERNEL * c
    transforms = layer_transforms(ratio, assignment)
    fit = None
    extra = {}
    if assignment == "fitted":
        kernel = rng.normal(0.0, math.sqrt(2.0 / fan_in), (KERNEL, KERNEL, c, c))
        fit = fit_assignment(kernel.astype("float32"), c // k, transforms=transforms)
        transforms = fit.transforms
        extra = {"assignment": fit.assignment}
    inputs = keras.Input((h, w, c))
    layer = TransformConv2D(
        c, KERNEL, base_filters=c // k, transforms=transforms,
        padding="same", strides=stride, scale=True, use_bias=True, name="transform_conv",
        **extra,
    )
    model = keras.Model(inputs, layer(inputs), name="transformed")
    if fit is None:
        layer.base_kernel.assign(
            rng.normal(0.0, math.sqrt(2.0 / fan_in), layer.base_kernel.shape).astype("float32"))
        layer.scale_weight.assign(
            (1.0 + 0.1 * rng.normal(size=layer.scale_weight.shape)).astype("float32"))
    else:
        layer.base_kernel.assign(np.asarray(fit.base_kernel, "float32"))
        layer.scale_weight.assign(np.asarray(fit.scale, "float32"))
    layer.bias.assign((0.1 * rng.normal(size=layer.bias.shape)).astype("float32"))

    dense_inputs = keras.Input((h, w, c))
    conv = keras.layers.Conv2D(c, KERNEL, padding="same", strides=stride, name="conv")
    dense = keras.Model(dense_inputs, conv(dense_inputs), name="dense")
    conv.set_weights([
        keras.ops.convert_to_numpy(layer.materialized_kernel()),
        keras.ops.convert_to_numpy(layer.bias),
    ])

    scalar_inputs = keras.Input((h, w, c))
    scalar_layer = TransformConv2D(
        c, KERNEL, base_filters=c // k, transforms=transforms,
        padding="same", strides=stride, scale=True, use_bias=True,
        transform_family="scalar", name="transform_conv", **extra,
    )
    scalar = keras.Model(scalar_inputs, scalar_layer(scalar_inputs), name="scalar")
    multipliers = 1.0 + 0.1 * rng.normal(size=scalar_layer.transform.shape)
    scalar_layer.set_weights(layer.get_weights() + [multipliers.astype("float32")])
    return layer, model, dense, scalar


def output_hw(shape, stride):
    h, w, _ = common.shape_dims(shape)
    return math.ceil(h / stride), math.ceil(w / stride)  # padding="same"


# Multiply-adds per sample, computed here from the shape (not by `cost`, which
# counts the path the Keras model runs): the dense layer, H'*W'*9*C*C; the
# grouped form, its 1x1 product convolution at the input resolution,
# H*W*9*C*n, plus its grouped 3x3 spread convolution at the output
# resolution, (3*3)**2 multiply-adds per output filter and pixel under the
# default assignment (n bases x C/n filters each), H'*W'*81*C.


def dense_macs(shape, stride):
    _, _, c = common.shape_dims(shape)
    ho, wo = output_hw(shape, stride)
    return ho * wo * KERNEL * KERNEL * c * c


def grouped_macs(shape, stride, base_filters, spread_outputs=None):
    """As above; the spread convolution writes `spread_outputs` channels (C, or
    more when an uneven assignment pads the groups)."""
    h, w, c = common.shape_dims(shape)
    ho, wo = output_hw(shape, stride)
    taps = KERNEL * KERNEL
    products = h * w * taps * c * base_filters
    spread = ho * wo * taps * taps * (c if spread_outputs is None else spread_outputs)
    return {"products": products, "spread": spread, "total": products + spread}


def verify(path, model, samples):
    """(max_rel_diff, passed) of a file against `model` (rtol `MAX_REL_DIFF`)."""
    try:
        result = verify_tflite(path, model, samples, rtol=MAX_REL_DIFF)
        return result.max_rel_diff, True
    except TFLiteMismatchError:
        result = verify_tflite(path, model, samples, rtol=float("inf"))
        return result.max_rel_diff, False


def build_row(shape, stride, ratio, folder, args, assignment="default"):
    """Builds, exports and verifies the files of one shape, stride, ratio and assignment."""
    keras.backend.clear_session()
    h, w, c = common.shape_dims(shape)
    layer, model, dense, scalar = make_models(shape, stride, ratio, args.seed, assignment)
    plan = grouped_plan(layer)
    models = {"dense": model, "grouped": model, "slices": model, "scalar": scalar}
    samples = np.random.default_rng(args.seed + 1).normal(
        size=(VERIFY_SAMPLES, h, w, c)).astype("float32")
    stem = f"{shape}_s{stride}_r{ratio.replace('/', '-')}_{assignment}"
    gmacs = grouped_macs(shape, stride, layer.base_filters, plan.spread_outputs())
    transforms = layer_transforms(ratio, assignment)
    row = {
        "shape": shape,
        "input_shape": [h, w, c],
        "output_shape": [int(d) for d in model.output_shape[1:]],
        "stride": stride,
        "ratio": ratio,
        "assignment": assignment,
        # The grouped form's spread outputs over the filters (1.0: no padding)
        # and the most filters one base builds.
        "padding": plan.spread_outputs() / layer.filters,
        "slots": int(plan.slots),
        "transforms": transforms if isinstance(transforms, str) else list(transforms),
        "base_filters": int(layer.base_filters),
        "keras_implementation": layer.implementation_used,
        # What export_tflite(lowering="auto") writes for this layer, and why.
        "auto_lowering": list(lowering_choice(layer)),
        "params": {"dense": int(model_cost(dense).params),
                   "transformed": int(model_cost(model).params),
                   "scalar": int(model_cost(scalar).params)},
        "multipliers": int(np.prod(scalar.get_layer("transform_conv").transform.shape)),
        "macs": {"dense": dense_macs(shape, stride), "grouped": gmacs["total"],
                 "grouped_products": gmacs["products"], "grouped_spread": gmacs["spread"]},
        "bytes": {}, "param_bytes": {}, "num_ops": {}, "op_counts": {}, "lowerings": {},
        "max_rel_diff": {}, "verified": {}, "export_s": {},
    }
    for form in FORMS:
        start = time.perf_counter()
        path = folder / f"{stem}_{form}.tflite"
        if form == "dense":
            result = export_tflite(dense, path)
        else:
            lowering = "grouped" if form == "scalar" else form
            result = export_tflite(models[form], path, lowering=lowering)
        row["export_s"][form] = round(time.perf_counter() - start, 2)
        row["bytes"][form] = result.bytes
        row["param_bytes"][form] = result.param_bytes
        row["num_ops"][form] = result.num_ops
        row["op_counts"][form] = result.op_counts
        row["lowerings"][form] = result.lowerings
        # Every file against its TransformConv2D model: the dense one also checks the twin.
        row["max_rel_diff"][form], row["verified"][form] = verify(
            result.path, models[form], samples)
        row.setdefault("_paths", {})[form] = result.path
    return row


# ----------------------------------------------------------------------
# Timing


def time_row(row, args):
    """Interleaved batch-1 LiteRT latency of the row's three files, per thread count."""
    timers = {}
    row["delegate_nodes"] = {}
    for form in FORMS:
        for threads in THREADS:
            runner = common.litert_runner(row["_paths"][form], threads, args.seed)
            row["delegate_nodes"].setdefault(form, common.delegated_ops(runner.interpreter))
            timers[(form, threads)] = common.Timer(
                runner, args.loop_ms / 1e3, args.min_calls, warmup=5)
    common.run_rounds(timers.values(), args.repeats)
    row["ms"], row["calls_per_loop"], row["samples_ms"] = {}, {}, {}
    for form in FORMS:
        for threads in THREADS:
            timer = timers[(form, threads)]
            key = f"{threads}t"
            row["ms"].setdefault(form, {})[key] = timer.median_ms
            row["calls_per_loop"].setdefault(form, {})[key] = timer.calls
            row["samples_ms"].setdefault(form, {})[key] = [1e3 * s for s in timer.samples]


def add_ratios(row):
    """`row["vs_dense"]`: each lowered form's bytes, ms and MACs over the dense file's."""
    row["vs_dense"] = {
        form: {
            "bytes": row["bytes"][form] / row["bytes"]["dense"],
            **{f"ms_{t}t": row["ms"][form][f"{t}t"] / row["ms"]["dense"][f"{t}t"]
               for t in THREADS},
        }
        for form in LOWERED
    }
    row["vs_dense"]["grouped"]["macs"] = row["macs"]["grouped"] / row["macs"]["dense"]
    row["scalar_vs_grouped"] = {
        **{f"ms_{t}t": row["ms"]["scalar"][f"{t}t"] / row["ms"]["grouped"][f"{t}t"]
           for t in THREADS},
        "bytes": row["bytes"]["scalar"] / (row["bytes"]["grouped"] + 4 * row["multipliers"]),
    }


def scalar_target(rows):
    """The scalar family's grouped file against the discrete one: PASS/MISS and the worst."""
    if not rows:
        return None
    worst_ms = max(rows, key=lambda r: r["scalar_vs_grouped"]["ms_1t"])
    worst_bytes = max(rows, key=lambda r: r["scalar_vs_grouped"]["bytes"])
    ms = worst_ms["scalar_vs_grouped"]["ms_1t"]
    size = worst_bytes["scalar_vs_grouped"]["bytes"]
    return {
        "rule": f"scalar grouped file <= {SCALAR_MAX}x the discrete grouped file's 1-thread "
                f"latency and <= {SCALAR_MAX}x its bytes + 4 per multiplier",
        "status": "PASS" if ms <= SCALAR_MAX and size <= SCALAR_MAX else "MISS",
        "worst_ms_ratio": ms, "where_ms": row_label(worst_ms),
        "worst_bytes_ratio": size, "where_bytes": row_label(worst_bytes),
    }


# ----------------------------------------------------------------------
# Output: table, JSON, plot


def _ratio(form, key):
    return lambda r: f"{r['vs_dense'][form][key]:.3f}"


COLUMNS = (
    # (header, width, format function of a row)
    ("shape", 9, lambda r: r["shape"]),
    ("stride", 6, lambda r: str(r["stride"])),
    ("ratio", 5, lambda r: r["ratio"]),
    ("assign", 7, lambda r: r["assignment"]),
    ("pad", 4, lambda r: f"{r['padding']:.2f}"),
    ("dense ms", 8, lambda r: f"{r['ms']['dense']['1t']:.3f}"),
    ("grp/d 1t", 8, _ratio("grouped", "ms_1t")),
    ("grp/d 2t", 8, _ratio("grouped", "ms_2t")),
    ("slc/d 1t", 8, _ratio("slices", "ms_1t")),
    ("slc/d 2t", 8, _ratio("slices", "ms_2t")),
    ("grp/d B", 7, _ratio("grouped", "bytes")),
    ("slc/d B", 7, _ratio("slices", "bytes")),
    ("grp ops", 7, lambda r: str(r["num_ops"]["grouped"])),
    ("slc ops", 7, lambda r: str(r["num_ops"]["slices"])),
    ("grp/d MACs", 10, _ratio("grouped", "macs")),
    ("scl/grp 1t", 10, lambda r: f"{r['scalar_vs_grouped']['ms_1t']:.3f}"),
    ("scl/grp B", 9, lambda r: f"{r['scalar_vs_grouped']['bytes']:.3f}"),
    ("auto", 7, lambda r: r["auto_lowering"][0]),
)
LEGEND = """\
One 3x3 "same" layer, C in = C out filters, batch 1, float32 files in LiteRT
(default delegates: XNNPACK). dense ms: the dense Conv2D file, 1 thread.
grp/d, slc/d: the grouped / slices lowering over the dense file, same run, for
latency with 1 (1t) and 2 (2t) threads and file bytes (B). ops: operators in
the file. grp/d MACs: the grouped form's multiply-adds (1x1 products at the
input resolution + the 3x3 grouped spread) over the dense layer's. scl/grp:
the scalar family's grouped file over the discrete one, 1-thread latency and
bytes (against the discrete file's bytes + 4 per multiplier). assign: the
layer's assignment (default, or fitted by fit_assignment: uneven); pad: the
grouped form's spread outputs over the filters. auto: the form
export_tflite(lowering="auto") picks. Medians over rounds."""


def plot(rows, args, path):
    """Latency ratios lowered / dense (1 thread) per shape, one panel per ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.ratios), figsize=(max(7.0, 4.2 * len(args.ratios) + 1.5), 4.2),
                             squeeze=False, sharey=True)
    styles = {"grouped": ("o", "-"), "slices": ("s", "--"), "scalar": ("^", ":")}
    top = 1.2
    for ax, ratio in zip(axes[0], args.ratios):
        for stride in args.strides:
            subset = [r for r in rows if r["ratio"] == ratio and r["stride"] == stride]
            labels = [r["shape"] + ("" if r["assignment"] == "default" else " fit")
                      for r in subset]
            if not subset:
                continue
            x = np.arange(len(subset))
            for form in LOWERED:
                marker, line = styles[form]
                values = [r["vs_dense"][form]["ms_1t"] for r in subset]
                top = max(top, max(values) * 1.1)
                label = f"{form} / dense" + (f", stride {stride}" if len(args.strides) > 1
                                             else "")
                ax.plot(x, values, marker=marker, linestyle=line,
                        alpha=1.0 if stride == 1 else 0.6, label=label)
            ax.set_xticks(x, labels, rotation=45, ha="right",
                          fontsize="small")
        ax.axhline(1.0, color="gray", linewidth=1)
        ax.set_title(f"base ratio {ratio}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[0]:
        ax.set_ylim(0, top)
    axes[0][0].set_ylabel("LiteRT latency / dense Conv2D (1 thread)")
    fig.suptitle("TransformConv2D in a .tflite file, per lowering (LiteRT batch 1; "
                 "lower is better)", fontsize="medium")
    fig.tight_layout()
    common.save_figure(fig, path)


# ----------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        sys.exit("This benchmark exports with TensorFlow: run it with KERAS_BACKEND=tensorflow.")
    started = time.perf_counter()
    payload = {
        "benchmark": "tflite_lowering",
        "command": shlex.join(["python", *sys.argv]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "machine": common.tf_machine_info(),
        "versions": common.litert_versions(),
        "config": {
            "shapes": args.shapes,
            "ratios": args.ratios,
            "strides": args.strides,
            "assignments": args.assignments,
            "fitted": "fit_assignment(He-normal C-filter kernel, C*ratio, transforms='d4'): "
                      "the layer takes its bases, assignment and scales",
            "layer": "TransformConv2D(C, 3, base_filters=C*ratio, "
                     "transforms=DEFAULT_TRANSFORMS[1/ratio], padding='same', "
                     "strides=s, scale=True, use_bias=True)",
            "transforms": {r: DEFAULT_TRANSFORMS[common.ratio_denominator(r)] for r in args.ratios},
            "dense": "Conv2D(C, 3, padding='same', strides=s) holding "
                     "layer.materialized_kernel() (scale included) and the bias",
            "forms": {
                "dense": "export_tflite(dense_model, path)",
                "grouped": "export_tflite(model, path, lowering='grouped')",
                "slices": "export_tflite(model, path, lowering='slices')",
                "scalar": "export_tflite(scalar_model, path, lowering='grouped')",
            },
            "weights": "numpy default_rng(seed): base kernel normal(0, sqrt(2 / (9 C))), "
                       "scale 1 + 0.1 normal, bias 0.1 normal",
            "verify": f"verify_tflite(file, transformed model, {VERIFY_SAMPLES} standard "
                      f"normal samples, rtol={MAX_REL_DIFF:g})",
            "macs": "dense H'*W'*9*C*C; grouped H*W*9*C*n (1x1 products) + "
                    "H'*W'*81*C (grouped spread), computed from the shape",
            "repeats": args.repeats,
            "loop_ms": args.loop_ms,
            "min_calls": args.min_calls,
            "litert": "ai_edge_litert Interpreter(model_path, num_threads=k), default "
                      "delegates, float32 file, batch 1",
            "litert_threads": list(THREADS),
            "statistic": "median over rounds of (loop time / calls); the 4 files x 2 "
                         "thread counts of one shape and ratio interleaved",
            "delegate_nodes": "DELEGATE nodes in the 1-thread interpreter after the "
                              "default delegation: XNNPACK partitions",
            "quick": args.quick,
            "seed": args.seed,
        },
        "complete": False,
        "rows": [],
    }
    machine = payload["machine"]
    print(f"{machine['processor']}, {machine['cpu_count']} CPUs, load average "
          f"{' '.join(f'{v:.2f}' for v in machine['load_average'])}; TF {tf.__version__}, "
          f"Keras {keras.__version__}, LiteRT {payload['versions']['ai_edge_litert']}")
    print(f"shapes {' '.join(args.shapes)}; strides {' '.join(map(str, args.strides))}; "
          f"base ratios {' '.join(args.ratios)}; {args.repeats} rounds", flush=True)

    def log(line):
        print(f"[{time.perf_counter() - started:5.0f} s] {line}", flush=True)

    with tempfile.TemporaryDirectory(prefix="tflite-lowering-") as tmp:
        folder = args.keep_files or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for shape in args.shapes:
            for stride in args.strides:
                for ratio, assignment in [(r, a) for r in args.ratios
                                          for a in args.assignments]:
                    row = build_row(shape, stride, ratio, folder, args, assignment)
                    log(f"{row_label(row)}: exported in "
                        f"{sum(row['export_s'].values()):.0f} s ("
                        + ", ".join(f"{f} {row['num_ops'][f]} ops" for f in FORMS)
                        + f"); timing LiteRT, {args.repeats} rounds")
                    time_row(row, args)
                    add_ratios(row)
                    del row["_paths"]
                    payload["rows"].append(row)
                    common.write_json(args.out, payload)  # partial results survive

    payload["scalar_target"] = scalar_target(payload["rows"])
    payload["complete"] = True
    payload["machine"]["load_average_end"] = list(os.getloadavg())
    payload["wall_s"] = round(time.perf_counter() - started, 1)
    common.write_json(args.out, payload)
    png = args.out.with_suffix(".png")
    plot(payload["rows"], args, png)

    print()
    print(LEGEND)
    print()
    print(common.table(payload["rows"], COLUMNS))
    for row in payload["rows"]:
        for form in FORMS:
            if not row["verified"][form]:
                print(f"WARNING: {row_label(row)} {form}: the file differs from Keras by "
                      f"{row['max_rel_diff'][form]:.2g} of the output scale "
                      f"(expected <= {MAX_REL_DIFF:g})")
            nodes = row["delegate_nodes"][form]
            if nodes == 0:
                print(f"NOTE: {row_label(row)} {form}: no XNNPACK delegate node; the "
                      "interpreter runs every operator itself")
            elif nodes is not None and nodes > 1:
                print(f"NOTE: {row_label(row)} {form}: {nodes} XNNPACK partitions (some "
                      "operators run outside the delegate)")
        for form in LOWERED:
            got = set(row["lowerings"][form].values())
            if got != {"grouped" if form == "scalar" else form}:
                print(f"WARNING: {row_label(row)} {form}: the file was written as {got}")
    target = payload["scalar_target"]
    if target:
        print(f"\n{target['rule']}: {target['status']} (worst latency "
              f"{target['worst_ms_ratio']:.3f}, {target['where_ms']}; worst bytes "
              f"{target['worst_bytes_ratio']:.3f}, {target['where_bytes']})")
    print(f"\nload average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"{payload['wall_s']:.0f} s in all")
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
