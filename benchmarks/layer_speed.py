"""Speed of one `TransformConv2D` layer against `Conv2D`, under XLA, per transform family.

For each ResNet-like shape (H x W x C in, C out, 3x3, stride 1, "same") and
each base ratio n / filters (default assignment: 1/2 -> identity and rot180,
1/4 -> the four rotations, 1/8 -> d4), these layers are timed:

    materialized  TransformConv2D(implementation="materialized")
    factored      TransformConv2D(implementation="factored")
    dense         Conv2D(filters), the layer being replaced
    floor         Conv2D(n), the base convolution alone: the best the
                  factored path can reach

the two TransformConv2D paths once per transform family (`--families`; the
discrete family at every ratio, the learned ones at `--family-ratios`), each
for the forward pass and for a training step (called with `training=True`,
loss = mean(y**2), gradients with respect to the input and every trainable
variable, taken under `tf.GradientTape` inside the compiled function as
Keras's `train_step` does), all inside `tf.function(jit_compile=True)`. The
learned families' transform parameters are moved off the identity (random
perturbations), so the timed operators are general ones. All layers of one
shape are timed in the same run, interleaved: after a warm-up (compilation
excluded) each repetition times a loop of several calls per layer, blocking
on the last result; a row reports the median over the repetitions.
Conv2D(filters) is timed once per shape and shared by that shape's rows.
Each row also records what `implementation="auto"` picks, and checks that the
factored and materialized layers, given the same weights, agree.

Targets, PASS/MISS with the worst value: (a) factored forward <= 1.2 x
Conv2D(n); (b) Conv2D(filters) / factored forward >= 3.0 at ratio 1/4 on
56x56x64, 32x32x16 and 28x28x128; (c) materialized training step <= 1.1 x
Conv2D(filters) (these three on the discrete family); (d) factored scalar
forward <= 1.15 x factored discrete; (e) factored rotation and affine forward
<= 1.5 x factored discrete; (f) materialized training step of every learned
family <= 1.15 x Conv2D(filters).

Writes JSON (machine, versions, command, config, rows) and a PNG beside it.

Usage:
    python benchmarks/layer_speed.py                   # every shape, ratio and family
    python benchmarks/layer_speed.py --quick           # smoke test, a few minutes
    python benchmarks/layer_speed.py --shapes 56x56x64 --ratios 1/4 --families discrete scalar
"""

import argparse
import datetime
import fractions
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py, beside this script)
import tf_transform_conv  # noqa: E402
from tf_transform_conv import TransformConv2D  # noqa: E402
from tf_transform_conv.ops import families as tc_families  # noqa: E402
from tf_transform_conv.layers import transform_conv as tc_layers  # noqa: E402

RESNET_SHAPES = (
    "32x32x16",
    "16x16x32",
    "8x8x64",
    "56x56x64",
    "28x28x128",
    "14x14x256",
    "7x7x512",
)
QUICK_SHAPES = ("16x16x32", "8x8x64")
# The default assignment for each ratio 1/k: k transforms, filters/k bases.
TRANSFORMS_FOR_RATIO = {
    2: ["identity", "rot180"],
    4: "rotations",
    8: "d4",
}
PATHS = ("materialized", "factored")
REFERENCES = ("dense", "floor")
VARIANTS = PATHS + REFERENCES
MODES = ("forward", "train")
MODE_TITLES = {"forward": "forward", "train": "train step"}
LEARNED = tuple(f for f in tc_families.FAMILIES if f != "discrete")
# How far the learned families' parameters are moved off the identity.
PERTURBATION = 0.2

FACTORED_OVER_FLOOR_MAX = 1.2  # target (a)
DENSE_OVER_FACTORED_MIN = 3.0  # target (b)
TARGET_B_RATIO = "1/4"
TARGET_B_SHAPES = ("56x56x64", "32x32x16", "28x28x128")
MATERIALIZED_TRAIN_OVER_DENSE_MAX = 1.1  # target (c)
SCALAR_OVER_DISCRETE_MAX = 1.15  # target (d)
SAMPLED_OVER_DISCRETE_MAX = 1.5  # target (e)
LEARNED_TRAIN_OVER_DENSE_MAX = 1.15  # target (f)
# Both paths must agree to this fraction of the output scale.
MAX_REL_DIFF = 1e-4

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "layer_speed.json"
QUICK_OUT = DEFAULT_OUT.with_name("layer_speed_quick.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", nargs="+", type=common.parse_shape, default=None,
        help=f"input shapes HxWxC (in = out channels); default: all of "
        f"{' '.join(RESNET_SHAPES)} ({' '.join(QUICK_SHAPES)} with --quick)",
    )
    parser.add_argument(
        "--ratios", nargs="+", type=common.parse_ratio, default=None,
        help="base ratios n/filters of the discrete family, among "
        f"{' '.join(f'1/{k}' for k in TRANSFORMS_FOR_RATIO)}; default: all",
    )
    parser.add_argument(
        "--families", nargs="+", choices=tc_families.FAMILIES,
        default=list(tc_families.FAMILIES),
        help="transform families to time (default: all)",
    )
    parser.add_argument(
        "--family-ratios", nargs="+", type=common.parse_ratio, default=["1/4"],
        help="base ratios at which the learned families are timed (default 1/4)",
    )
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument(
        "--repeats", type=int, default=None,
        help="timed repetitions per layer; the median is reported "
        "(default 10, 3 with --quick)",
    )
    parser.add_argument(
        "--loop-ms", type=float, default=None,
        help="target duration of one timed loop; sets the calls per loop "
        "(default 100, 30 with --quick)",
    )
    parser.add_argument(
        "--min-calls", type=int, default=3, help="fewest calls in a timed loop (default 3)"
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke test: small shapes, few repeats, short loops",
    )
    parser.add_argument(
        "--out", type=Path, default=None,
        help=f"JSON path, the PNG is written beside it (default {DEFAULT_OUT}, "
        f"{QUICK_OUT.name} with --quick)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = list(QUICK_SHAPES if args.quick else RESNET_SHAPES)
    if args.ratios is None:
        args.ratios = [f"1/{k}" for k in TRANSFORMS_FOR_RATIO]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 10
    if args.loop_ms is None:
        args.loop_ms = 30.0 if args.quick else 100.0
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    for shape in args.shapes:
        for ratio in set(args.ratios) | set(args.family_ratios):
            if common.shape_dims(shape)[2] % common.ratio_denominator(ratio):
                parser.error(f"{shape}: {common.shape_dims(shape)[2]} channels do not "
                             f"divide into bases at ratio {ratio}")
    if min(args.batch, args.repeats, args.min_calls) < 1 or args.loop_ms <= 0:
        parser.error("--batch, --repeats, --min-calls and --loop-ms must be positive")
    return args


def cases(args):
    """The (ratio, family) pairs timed for every shape, in table order."""
    pairs = []
    for ratio in sorted(set(args.ratios) | set(args.family_ratios), key=common.ratio_denominator):
        for family in args.families:
            wanted = args.ratios if family == "discrete" else args.family_ratios
            if ratio in wanted:
                pairs.append((ratio, family))
    return pairs


# ----------------------------------------------------------------------
# Layers and compiled steps


def transform_conv(channels, ratio, family, implementation):
    k = common.ratio_denominator(ratio)
    return TransformConv2D(
        channels, 3, padding="same", base_filters=channels // k,
        transforms=TRANSFORMS_FOR_RATIO[k], transform_family=family,
        implementation=implementation,
    )


def compiled_steps(layer):
    """The layer's forward pass and training step, each one XLA computation."""

    @tf.function(jit_compile=True)
    def forward(x):
        return layer(x, training=False)

    @tf.function(jit_compile=True)
    def train_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_mean(tf.square(layer(x, training=True)))
        grads = tape.gradient(loss, [x, *layer.trainable_variables])
        return loss, grads

    return {"forward": forward, "train": train_step}


# ----------------------------------------------------------------------
# Timing


def block(result):
    """Waits for `result`: a forward output, or a train step's (loss, grads).

    One XLA computation yields all its outputs together, so the loss stands
    for the gradients.
    """
    first = result[0] if isinstance(result, tuple) else result
    first.numpy()


def time_loop(fn, x, calls):
    """Seconds per call over `calls` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        result = fn(x)
    block(result)
    return (time.perf_counter() - start) / calls


class Timer:
    """One compiled function to be timed; collects seconds per call."""

    def __init__(self, fn, x, loop_s, min_calls):
        self.fn, self.x = fn, x
        start = time.perf_counter()
        block(fn(x))  # compiles
        self.compile_s = time.perf_counter() - start
        block(fn(x))  # warm-up
        single = time_loop(fn, x, 1)
        self.calls = max(min_calls, math.ceil(loop_s / max(single, 1e-6)))
        self.samples = []

    def run(self, record=True):
        seconds = time_loop(self.fn, self.x, self.calls)
        if record:
            self.samples.append(seconds)

    @property
    def median_ms(self):
        return 1e3 * float(np.median(self.samples))


def perturb(layer, rng):
    """Moves a learned layer's transform parameters off the identity."""
    if layer.transform is not None:
        noise = rng.normal(scale=PERTURBATION, size=layer.transform.shape)
        layer.transform.assign(np.asarray(layer.transform) + noise.astype("float32"))


def time_shape(shape, pairs, args):
    """Times every layer of one shape, interleaved; returns its rows."""
    h, w, c = common.shape_dims(shape)
    rng = np.random.default_rng(args.seed)
    x = tf.random.normal((args.batch, h, w, c), seed=args.seed)
    layers = {("dense", None, None): keras.layers.Conv2D(c, 3, padding="same")}
    for ratio in dict.fromkeys(r for r, _ in pairs):
        n = c // common.ratio_denominator(ratio)
        layers[("floor", ratio, None)] = keras.layers.Conv2D(n, 3, padding="same")
    for ratio, family in pairs:
        for path in PATHS:
            layers[(path, ratio, family)] = transform_conv(c, ratio, family, path)
    for layer in layers.values():
        layer.build(x.shape)
    for ratio, family in pairs:  # same weights, so the two paths must agree
        perturb(layers[("materialized", ratio, family)], rng)
        layers[("factored", ratio, family)].set_weights(
            layers[("materialized", ratio, family)].get_weights()
        )
    timers = {}
    for key, layer in layers.items():
        for mode, fn in compiled_steps(layer).items():
            timers[key + (mode,)] = Timer(fn, x, args.loop_ms / 1e3, args.min_calls)

    order = list(timers.values())
    for timer in order:  # one untimed round, so every layer starts warm
        timer.run(record=False)
    for rep in range(args.repeats):
        shift = rep % len(order)  # rotate so no layer always runs first
        for timer in order[shift:] + order[:shift]:
            timer.run()

    return [row_for(shape, ratio, family, timers, x) for ratio, family in pairs]


def row_for(shape, ratio, family, timers, x):
    h, w, c = common.shape_dims(shape)

    def timer(variant, mode):
        if variant == "dense":
            return timers[("dense", None, None, mode)]
        if variant == "floor":
            return timers[("floor", ratio, None, mode)]
        return timers[(variant, ratio, family, mode)]

    ms = {m: {v: timer(v, m).median_ms for v in VARIANTS} for m in MODES}
    materialized = timer("materialized", "forward").fn(x).numpy()
    factored = timer("factored", "forward").fn(x).numpy()
    mismatch = float(np.max(np.abs(factored - materialized)) / np.max(np.abs(materialized)))
    auto = transform_conv(c, ratio, family, "auto")
    auto.build(x.shape)
    return {
        "shape": shape,
        "height": h,
        "width": w,
        "channels": c,
        "ratio": ratio,
        "family": family,
        "base_filters": auto.base_filters,
        "transforms": list(auto.transforms),
        "auto": auto.implementation_used,
        "auto_reason": auto.implementation_reason,
        "cost": {
            k: v for k, v in auto.cost((h, w, c)).items() if k != "output_shape"
        },
        "factored_vs_materialized_max_rel_diff": mismatch,
        "ms": ms,
        "ratios": {
            "factored_fwd_over_floor_fwd": ms["forward"]["factored"] / ms["forward"]["floor"],
            "dense_fwd_over_factored_fwd": ms["forward"]["dense"] / ms["forward"]["factored"],
            "materialized_train_over_dense_train": (
                ms["train"]["materialized"] / ms["train"]["dense"]
            ),
            "factored_train_over_dense_train": ms["train"]["factored"] / ms["train"]["dense"],
        },
        "calls_per_loop": {
            m: {v: timer(v, m).calls for v in VARIANTS} for m in MODES
        },
        "compile_s": {
            m: {v: round(timer(v, m).compile_s, 3) for v in VARIANTS} for m in MODES
        },
        "samples_ms": {
            m: {v: [1e3 * s for s in timer(v, m).samples] for v in VARIANTS}
            for m in MODES
        },
    }


def add_family_ratios(rows):
    """Each learned row's factored forward over the discrete row's (same shape and ratio)."""
    discrete = {(r["shape"], r["ratio"]): r for r in rows if r["family"] == "discrete"}
    for row in rows:
        reference = discrete.get((row["shape"], row["ratio"]))
        if reference is not None:
            row["ratios"]["factored_fwd_over_discrete_factored_fwd"] = (
                row["ms"]["forward"]["factored"] / reference["ms"]["forward"]["factored"]
            )


# ----------------------------------------------------------------------
# Targets


def check_targets(rows):
    """The targets: PASS/MISS (or None without rows) and the worst row."""

    def worst(name, rule, limit, key, selected, pick):
        values = [(row["ratios"][key], row) for row in selected if key in row["ratios"]]
        result = {"target": name, "rule": rule, "limit": limit, "status": None,
                  "worst": None, "where": None}
        if values:
            value, row = pick(values, key=lambda item: item[0])
            passed = value <= limit if pick is max else value >= limit
            result.update(status="PASS" if passed else "MISS", worst=value,
                          where=f"{row['shape']} {row['ratio']} {row['family']}")
        return result

    discrete = [r for r in rows if r["family"] == "discrete"]
    learned = [r for r in rows if r["family"] != "discrete"]
    return [
        worst("a", f"factored forward <= {FACTORED_OVER_FLOOR_MAX}x Conv2D(n)",
              FACTORED_OVER_FLOOR_MAX, "factored_fwd_over_floor_fwd", discrete, max),
        worst("b", f"Conv2D(filters) / factored forward >= {DENSE_OVER_FACTORED_MIN} "
              f"at {TARGET_B_RATIO} on {', '.join(TARGET_B_SHAPES)}",
              DENSE_OVER_FACTORED_MIN, "dense_fwd_over_factored_fwd",
              [r for r in discrete if r["ratio"] == TARGET_B_RATIO
               and r["shape"] in TARGET_B_SHAPES], min),
        worst("c", f"materialized train step <= {MATERIALIZED_TRAIN_OVER_DENSE_MAX}x "
              "Conv2D(filters)",
              MATERIALIZED_TRAIN_OVER_DENSE_MAX, "materialized_train_over_dense_train",
              discrete, max),
        worst("d", f"factored scalar forward <= {SCALAR_OVER_DISCRETE_MAX}x factored discrete",
              SCALAR_OVER_DISCRETE_MAX, "factored_fwd_over_discrete_factored_fwd",
              [r for r in learned if r["family"] == "scalar"], max),
        worst("e", f"factored rotation and affine forward <= {SAMPLED_OVER_DISCRETE_MAX}x "
              "factored discrete",
              SAMPLED_OVER_DISCRETE_MAX, "factored_fwd_over_discrete_factored_fwd",
              [r for r in learned if r["family"] in tc_families.SAMPLED], max),
        worst("f", f"materialized train step of every learned family <= "
              f"{LEARNED_TRAIN_OVER_DENSE_MAX}x Conv2D(filters)",
              LEARNED_TRAIN_OVER_DENSE_MAX, "materialized_train_over_dense_train",
              learned, max),
    ]


# ----------------------------------------------------------------------
# Output: table, JSON, plot

SHORT_NAMES = {"materialized": "mater", "factored": "factor", "dense": "dense", "floor": "floor"}
COLUMN_GROUPS = (
    # (group title, [(header, width, format function of a row)])
    ("", [
        ("shape", 9, lambda r: r["shape"]),
        ("ratio", 5, lambda r: r["ratio"]),
        ("family", 8, lambda r: r["family"]),
        ("n", 3, lambda r: str(r["base_filters"])),
        ("auto", 6, lambda r: SHORT_NAMES[r["auto"]]),
    ]),
    *[(f"{MODE_TITLES[m]}, ms", [
        (SHORT_NAMES[v], 7, lambda r, m=m, v=v: f"{r['ms'][m][v]:.2f}") for v in VARIANTS
    ]) for m in MODES],
    ("ratios", [
        ("fac/flr", 7, lambda r: f"{r['ratios']['factored_fwd_over_floor_fwd']:.2f}"),
        ("dns/fac", 7, lambda r: f"{r['ratios']['dense_fwd_over_factored_fwd']:.2f}"),
        ("fac/dis", 7, lambda r: (
            f"{r['ratios']['factored_fwd_over_discrete_factored_fwd']:.2f}"
            if "factored_fwd_over_discrete_factored_fwd" in r["ratios"] else "")),
        ("mat/dns", 7, lambda r: f"{r['ratios']['materialized_train_over_dense_train']:.2f}"),
    ]),
)
LEGEND = (
    "Median ms per call. mater/factor: TransformConv2D materialized/factored; "
    "dense: Conv2D(filters);\nfloor: Conv2D(n). fac/flr = factored/floor, "
    "dns/fac = dense/factored and fac/dis = factored/factored discrete, forward;\n"
    "mat/dns = materialized/dense, train step."
)


def _join_groups(cells):
    return " | ".join(" ".join(group) for group in cells)


def table_header():
    titles, headers = [], []
    for title, columns in COLUMN_GROUPS:
        width = sum(w for _, w, _ in columns) + len(columns) - 1
        titles.append([f"{title:^{width}}"])
        headers.append([f"{name:>{w}}" for name, w, _ in columns])
    line = _join_groups(headers)
    return f"{LEGEND}\n\n{_join_groups(titles).rstrip()}\n{line}\n{'-' * len(line)}"


def table_row(row):
    return _join_groups(
        [[f"{fmt(row):>{w}}" for _, w, fmt in columns] for _, columns in COLUMN_GROUPS]
    )


def target_line(result):
    if result["status"] is None:
        return f"({result['target']}) {result['rule']}: n/a (no rows measured)"
    return (f"({result['target']}) {result['rule']}: {result['status']}, "
            f"worst {result['worst']:.2f} ({result['where']})")


def machine_info():
    devices = []
    for device in tf.config.list_physical_devices():
        details = tf.config.experimental.get_device_details(device)
        name = device.name.replace("/physical_device:", "")
        devices.append(f"{name} ({details['device_name']})" if "device_name" in details else name)
    return common.machine_info(devices=devices, load_average=list(os.getloadavg()))


def versions():
    import matplotlib

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "numpy": np.__version__,
        "matplotlib": matplotlib.__version__,
        "tf_transform_conv": tf_transform_conv.__version__,
    }


def plot(rows, path):
    """Time / Conv2D(filters) across shapes: the discrete family per ratio,
    then every family at each learned-family ratio; one row of panels per pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for ratio in dict.fromkeys(r["ratio"] for r in rows if r["family"] == "discrete"):
        panels.append((f"discrete, ratio {ratio}", ratio,
                       {"materialized": ("discrete", "s-"), "factored": ("discrete", "o-"),
                        "floor": ("discrete", "^--")}))
    for ratio in dict.fromkeys(r["ratio"] for r in rows if r["family"] != "discrete"):
        styles = {f"factored {f}": (f, "o-") for f in dict.fromkeys(
            r["family"] for r in rows if r["ratio"] == ratio)}
        panels.append((f"families, ratio {ratio}", ratio, styles))
    fig, axes = plt.subplots(len(MODES), len(panels), figsize=(4.5 * len(panels), 7),
                             squeeze=False, sharey=True)
    for col, (title, ratio, styles) in enumerate(panels):
        for row_index, mode in enumerate(MODES):
            ax = axes[row_index][col]
            for label, (family, style) in styles.items():
                variant = label.split()[0]
                selected = [r for r in rows if r["ratio"] == ratio and r["family"] == family]
                ax.plot([r["shape"] for r in selected],
                        [r["ms"][mode][variant] / r["ms"][mode]["dense"] for r in selected],
                        style, label=label if "families" in title else variant)
            ax.axhline(1.0, color="gray", linewidth=1, label="Conv2D(filters)")
            ax.axhline(float(fractions.Fraction(ratio)), color="gray",
                       linestyle=":", linewidth=1, label="ideal (ratio)")
            ax.set_yscale("log", base=2)
            ax.set_title(f"{MODE_TITLES[mode]}, {title}")
            ax.tick_params(axis="x", labelrotation=45)
            ax.grid(True, which="both", alpha=0.3)
            if col == 0:
                ax.set_ylabel("time / Conv2D(filters)")
            if row_index == 0:
                ax.legend(fontsize="x-small")
    fig.suptitle("TransformConv2D speed against Conv2D (XLA, 3x3, stride 1)")
    fig.tight_layout()
    common.save_figure(fig, path)


# ----------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        sys.exit("This benchmark times tf.function(jit_compile=True): "
                 "run it with KERAS_BACKEND=tensorflow.")
    keras.utils.set_random_seed(args.seed)
    pairs = cases(args)
    payload = {
        "benchmark": "layer_speed",
        "command": shlex.join(["python", *sys.argv]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "config": {
            "shapes": args.shapes,
            "ratios": args.ratios,
            "families": args.families,
            "family_ratios": args.family_ratios,
            "transforms": {f"1/{k}": t for k, t in TRANSFORMS_FOR_RATIO.items()},
            "batch": args.batch,
            "repeats": args.repeats,
            "loop_ms": args.loop_ms,
            "min_calls": args.min_calls,
            "quick": args.quick,
            "seed": args.seed,
            "kernel_size": [3, 3],
            "strides": [1, 1],
            "padding": "same",
            "dtype": keras.config.floatx(),
            "jit_compile": True,
            "transform_perturbation": PERTURBATION,
            "train_loss": "mean(y**2) of layer(x, training=True); gradients w.r.t. "
                          "input and all trainable variables",
            "statistic": "median over repeats of (loop time / calls)",
            "auto_rule": {
                name: getattr(tc_layers, name, None)
                for name in (
                    "AUTO_MAX_PRODUCT_FRACTION",
                    "AUTO_MIN_GROUP_CHANNELS",
                    "AUTO_MIN_DENSE_OPERATOR_CHANNELS",
                    "AUTO_MIN_TRAINING_GROUP_CHANNELS",
                    "AUTO_MAX_PRODUCT_BYTES",
                )
            },
        },
        "complete": False,
        "rows": [],
    }

    print(f"batch {args.batch}, {args.repeats} repeats, XLA; "
          f"{payload['machine']['processor']}, {payload['machine']['cpu_count']} CPUs, "
          f"devices {', '.join(payload['machine']['devices'])}")
    print(table_header(), flush=True)
    for shape in args.shapes:
        rows = time_shape(shape, pairs, args)
        add_family_ratios(rows)
        for row in rows:
            payload["rows"].append(row)
            print(table_row(row), flush=True)
            if row["factored_vs_materialized_max_rel_diff"] > MAX_REL_DIFF:
                print(f"  WARNING: factored and materialized outputs differ by "
                      f"{row['factored_vs_materialized_max_rel_diff']:.2g} of the output "
                      f"scale (tolerance {MAX_REL_DIFF:g}): timing a wrong result",
                      flush=True)
        common.write_json(args.out, payload)  # partial results survive an interrupted run

    payload["targets"] = check_targets(payload["rows"])
    payload["complete"] = True
    common.write_json(args.out, payload)
    png = args.out.with_suffix(".png")
    plot(payload["rows"], png)

    print()
    for result in payload["targets"]:
        print(target_line(result))
    print(f"\nwrote {args.out} and {png}")


if __name__ == "__main__":
    main()
