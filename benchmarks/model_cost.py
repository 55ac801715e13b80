"""Whole-model cost of `TransformConv2D` twins against their dense models.

For each model (default: CIFAR ResNet-56, 32x32x3, 10 classes; and
MobileNetV2, 1000 classes, at a reduced input size set by --mobilenet-size,
default 96x96x3, to keep the run short on a small CPU) the dense model
(`conv=None`) and its transformed twins (`conv=conv_factory(base_ratio=r)`,
default r = 1/2, 1/4, 1/8) are built with random weights
(`keras.utils.set_random_seed` before each build) and measured:

    params, MACs, adds   `cost.model_cost`: parameters, multiply-adds of the
                         paths the Keras model runs (`implementation="auto"`),
                         the factored paths' additions, and `dense_macs`
    .keras               size of `model.save(...)`
    .tflite f32 / int8   size of `export.export_tflite` (default lowering
                         "auto": every TransformConv2D written in a compact
                         form, the grouped one where it applies; int8: full
                         integer, calibrated on a few random samples); each
                         file's operator counts and lowerings, and its max
                         relative difference from the Keras model on 2
                         random samples (`export.verify_tflite`)
    LiteRT               batch-1 latency of the float32 file with
                         `ai_edge_litert` `Interpreter(model_path,
                         num_threads=k)` (default delegates, i.e. XNNPACK),
                         k = 1 and 2
    XLA                  batch-32 forward throughput of the Keras model,
                         `model(x, training=False)` inside
                         `tf.function(jit_compile=True)`

The models are built and exported first (in --jobs processes, default 2),
then timed in this process with nothing else of the benchmark running.
Timings are interleaved: every variant of one model (dense and each ratio, and
for LiteRT each thread count) runs once per round, the order rotating from
round to round; after a warm-up (and an untimed round) each round times a loop
of calls per variant; a row reports the median over the rounds of the time per
call. Ratios are transformed / dense of the same model measured in the same
run.

Targets, at base ratio 1/4 on ResNet-56, printed as PASS/MISS with the values:
float32 `.tflite` <= 0.3x dense; LiteRT batch-1 latency <= 0.6x dense with 1
and with 2 threads; XLA batch-32 forward time <= 0.4x dense.

Writes JSON (machine with the load average, versions, command, timestamp,
config, rows, targets) atomically, and a PNG of the ratios beside it. The
`.keras` and `.tflite` files go to a temporary folder (or --keep-files DIR).

Usage:
    python benchmarks/model_cost.py                      # ResNet-56, MobileNetV2 96x96
    python benchmarks/model_cost.py --quick              # smoke test (ratio 1/4, 64x64)
    python benchmarks/model_cost.py --models resnet56 --ratios 1/4 --repeats 5
"""

import argparse
import collections
import concurrent.futures
import datetime
import fractions
import multiprocessing
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
from tf_transform_conv import build_model, conv_factory  # noqa: E402
from tf_transform_conv.cost import model_cost  # noqa: E402
from tf_transform_conv.export import export_tflite, verify_tflite  # noqa: E402
from tf_transform_conv.layers import TransformConv2D  # noqa: E402

CIFAR_MODELS = ("resnet20", "resnet32", "resnet56", "resnet110", "vgg16_cifar")
MODEL_CHOICES = (*CIFAR_MODELS, "mobilenet_v2")
DEFAULT_MODELS = ("resnet56", "mobilenet_v2")
THREADS = (1, 2)
XLA_BATCH = 32
VERIFY_SAMPLES = 2
DENSE = "dense"

# Float32 files agree with Keras to about 1e-6 of the output scale (export.py).
FLOAT_MAX_REL_DIFF = 1e-4

TARGET_MODEL = "resnet56"
TARGET_RATIO = "1/4"
# (name, rule, key of row["vs_dense"], limit)
TARGETS = (
    ("tflite_size", ".tflite float32 file <= 0.3x dense", "tflite_f32_bytes", 0.3),
    ("litert_1_thread", "LiteRT batch-1 latency, 1 thread <= 0.6x dense",
     "litert_ms_1t", 0.6),
    ("litert_2_threads", "LiteRT batch-1 latency, 2 threads <= 0.6x dense",
     "litert_ms_2t", 0.6),
    ("xla_forward", f"XLA batch-{XLA_BATCH} forward time <= 0.4x dense", "xla_ms", 0.4),
)

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "model_cost.json"
QUICK_OUT = RESULTS / "model_cost_quick.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", choices=MODEL_CHOICES, default=list(DEFAULT_MODELS),
        help=f"models to measure (default {' '.join(DEFAULT_MODELS)}); the CIFAR "
        "models take 32x32x3 and have 10 classes, mobilenet_v2 takes "
        "--mobilenet-size and has 1000",
    )
    parser.add_argument(
        "--ratios", nargs="+", type=common.parse_ratio, default=None,
        help=f"base ratios of the transformed twins, among {' '.join(common.RATIO_CHOICES)} "
        f"(default all; {TARGET_RATIO} with --quick)",
    )
    parser.add_argument(
        "--mobilenet-size", type=int, default=None,
        help="MobileNetV2 input rows = cols (default 96, 64 with --quick; "
        "the published model uses 224)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None,
        help="timed rounds per variant, the median is reported (default 10, 3 with --quick)",
    )
    parser.add_argument(
        "--loop-ms", type=float, default=None,
        help="target duration of one timed loop; sets the calls per loop "
        "(default 150, 40 with --quick)",
    )
    parser.add_argument(
        "--min-calls", type=int, default=1, help="fewest calls in a timed loop (default 1)"
    )
    parser.add_argument(
        "--jobs", type=int, default=2,
        help="processes building and exporting the models in parallel before any "
        "timing starts (default 2; 1: in this process)",
    )
    parser.add_argument(
        "--int8-samples", type=int, default=16,
        help="random representative samples for the int8 calibration (default 16)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke test: ratio 1/4 only (unless --ratios), MobileNetV2 at 64x64, "
        "3 rounds, short loops",
    )
    parser.add_argument(
        "--out", type=Path, default=None,
        help=f"JSON path, the PNG is written beside it (default {DEFAULT_OUT}, "
        f"{QUICK_OUT.name} with --quick)",
    )
    parser.add_argument(
        "--keep-files", type=Path, default=None,
        help="folder to keep the .keras and .tflite files in (default: a "
        "temporary folder, deleted at the end)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.ratios is None:
        args.ratios = [TARGET_RATIO] if args.quick else list(common.RATIO_CHOICES)
    args.ratios = sorted(set(args.ratios), key=lambda r: -fractions.Fraction(r))
    args.models = list(dict.fromkeys(args.models))
    if args.mobilenet_size is None:
        args.mobilenet_size = 64 if args.quick else 96
    if args.repeats is None:
        args.repeats = 3 if args.quick else 10
    if args.loop_ms is None:
        args.loop_ms = 40.0 if args.quick else 150.0
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if min(args.repeats, args.min_calls, args.int8_samples, args.jobs) < 1 or args.loop_ms <= 0:
        parser.error("--repeats, --min-calls, --int8-samples, --jobs and --loop-ms "
                     "must be positive")
    if args.mobilenet_size < 32:
        parser.error("--mobilenet-size must be at least 32 (MobileNetV2 downsamples 32x)")
    return args


def input_shape(name, args):
    if name == "mobilenet_v2":
        return (args.mobilenet_size, args.mobilenet_size, 3)
    return (32, 32, 3)


def model_label(name, args):
    return f"{name} {'x'.join(str(d) for d in input_shape(name, args))}"


# ----------------------------------------------------------------------
# Building and the static measurements


def make_model(name, ratio, args):
    """The dense model (`ratio` None) or its twin, random weights from the seed."""
    keras.utils.set_random_seed(args.seed)
    conv = None if ratio is None else conv_factory(base_ratio=float(fractions.Fraction(ratio)))
    return build_model(name, conv=conv, input_shape=input_shape(name, args))


def paths_used(model):
    """How many TransformConv2D layers run each path in the Keras model."""
    counts = collections.Counter(
        layer.implementation_used
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, TransformConv2D)
    )
    return {"materialized": counts.get("materialized", 0), "factored": counts.get("factored", 0)}


def measure_files(name, variant, folder, args):
    """Cost, .keras and .tflite sizes, op counts and the TFLite check of one model.

    Builds the model itself (from the seed), so it can run in a worker process.
    """
    model = make_model(name, None if variant == DENSE else variant, args)
    shape = input_shape(name, args)
    rng = np.random.default_rng(args.seed)
    samples = rng.normal(size=(max(args.int8_samples, VERIFY_SAMPLES),) + shape)
    samples = samples.astype("float32")
    stem = f"{name}_{'dense' if variant == DENSE else 'r' + variant.replace('/', '-')}"

    cost = model_cost(model)
    keras_path = folder / f"{stem}.keras"
    model.save(keras_path)

    start = time.perf_counter()
    f32 = export_tflite(model, folder / f"{stem}_f32.tflite")
    f32_s = time.perf_counter() - start
    check = verify_tflite(f32.path, model, samples[:VERIFY_SAMPLES], rtol=float("inf"))

    start = time.perf_counter()
    int8 = export_tflite(model, folder / f"{stem}_int8.tflite", quantization="int8",
                         representative_data=samples[: args.int8_samples])
    int8_s = time.perf_counter() - start
    int8_check = verify_tflite(int8.path, model, samples[:VERIFY_SAMPLES], rtol=float("inf"))

    return {
        "model": name,
        "label": model_label(name, args),
        "input_shape": list(shape),
        "num_classes": int(model.output_shape[-1]),
        "variant": variant,
        "base_ratio": None if variant == DENSE else variant,
        "keras_model_name": model.name,
        "paths": paths_used(model),
        "params": int(cost.params),
        "macs": int(cost.macs),
        "adds": int(cost.adds),
        "dense_macs": int(cost.dense_macs),
        "keras_bytes": os.path.getsize(keras_path),
        "tflite_f32_bytes": f32.bytes,
        "tflite_f32_param_bytes": f32.param_bytes,
        "tflite_f32_overhead_bytes": f32.overhead_bytes,
        "tflite_f32_num_ops": f32.num_ops,
        "tflite_f32_op_counts": f32.op_counts,
        "tflite_lowerings": dict(collections.Counter(f32.lowerings.values())),
        "tflite_f32_max_rel_diff": check.max_rel_diff,
        "tflite_f32_max_abs_diff": check.max_abs_diff,
        "keras_output_scale": check.output_scale,
        "tflite_int8_bytes": int8.bytes,
        "tflite_int8_num_ops": int8.num_ops,
        "tflite_int8_op_counts": int8.op_counts,
        "tflite_int8_max_rel_diff": int8_check.max_rel_diff,
        "export_s": {"f32": round(f32_s, 2), "int8": round(int8_s, 2)},
        "_tflite_f32_path": f32.path,
    }


# ----------------------------------------------------------------------
# Timing


def xla_runner(model, x):
    """The model's forward pass as one XLA computation; returns `run(calls=1)`."""

    @tf.function(jit_compile=True)
    def forward(inputs):
        return model(inputs, training=False)

    def run(calls=1):
        for _ in range(calls):
            y = forward(x)
        y.numpy()

    start = time.perf_counter()
    run()
    run.compile_s = time.perf_counter() - start
    return run


def time_litert(rows, args):
    """Interleaved batch-1 latency of every row's float32 file, per thread count."""
    timers = {}
    for row in rows:
        for threads in THREADS:
            runner = common.litert_runner(row["_tflite_f32_path"], threads, args.seed)
            row.setdefault("litert_delegate_nodes", common.delegated_ops(runner.interpreter))
            timers[(row["variant"], threads)] = common.Timer(
                runner, args.loop_ms / 1e3, args.min_calls, warmup=5)
    common.run_rounds(timers.values(), args.repeats)
    for row in rows:
        for threads in THREADS:
            timer = timers[(row["variant"], threads)]
            row[f"litert_ms_{threads}t"] = timer.median_ms
            row.setdefault("calls_per_loop", {})[f"litert_{threads}t"] = timer.calls
            row.setdefault("samples_ms", {})[f"litert_{threads}t"] = [
                1e3 * s for s in timer.samples]


def time_xla(rows, models, args):
    """Interleaved batch-32 forward time of every row's Keras model under XLA."""
    shape = tuple(rows[0]["input_shape"])
    x = tf.random.normal((XLA_BATCH,) + shape, seed=args.seed)
    timers = {}
    for row in rows:
        runner = xla_runner(models[row["variant"]], x)
        row["xla_compile_s"] = round(runner.compile_s, 2)
        timers[row["variant"]] = common.Timer(runner, args.loop_ms / 1e3, args.min_calls)
    common.run_rounds(timers.values(), args.repeats)
    for row in rows:
        timer = timers[row["variant"]]
        row["xla_ms"] = timer.median_ms
        row["xla_images_per_s"] = XLA_BATCH / (timer.median_ms / 1e3)
        row.setdefault("calls_per_loop", {})["xla"] = timer.calls
        row.setdefault("samples_ms", {})["xla"] = [1e3 * s for s in timer.samples]


RATIO_KEYS = (
    "params", "macs", "macs_plus_adds", "keras_bytes", "tflite_f32_bytes",
    "tflite_int8_bytes", "tflite_f32_num_ops", "litert_ms_1t", "litert_ms_2t", "xla_ms",
)


def add_ratios(rows):
    """`row["vs_dense"]`: each measurement over the dense model's, same run."""
    for row in rows:
        row["macs_plus_adds"] = row["macs"] + row["adds"]
    dense = next(r for r in rows if r["variant"] == DENSE)
    for row in rows:
        row["vs_dense"] = {k: row[k] / dense[k] for k in RATIO_KEYS}


def measure_all_files(folder, args, log):
    """`measure_files` for every model and variant, in `args.jobs` processes.

    Returns {(model, variant): row}. The most expensive exports (the
    transformed ResNets: thousands of operators) are started first.
    """
    jobs = [(name, variant) for name in args.models for variant in (DENSE, *args.ratios)]
    jobs.sort(key=lambda job: (job[1] == DENSE, job[0] == "mobilenet_v2"))
    results = {}

    def done(job, row):
        results[job] = row
        log(f"  {row['label']} {job[1]}: built and exported; float32 in "
            f"{row['export_s']['f32']:.0f} s ({row['tflite_f32_num_ops']} ops), "
            f"int8 in {row['export_s']['int8']:.0f} s")

    if args.jobs == 1:
        for job in jobs:
            done(job, measure_files(*job, folder, args))
        return results
    context = multiprocessing.get_context("spawn")  # a fresh TensorFlow per worker
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {pool.submit(measure_files, *job, folder, args): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            done(futures[future], future.result())
    return results


def time_model(name, rows, args, log):
    """Times every variant of one model (rows from `measure_files`), adds ratios."""
    models = {row["variant"]: make_model(name, row["base_ratio"], args) for row in rows}
    log(f"  {model_label(name, args)}: timing LiteRT (batch 1, threads "
        f"{' and '.join(map(str, THREADS))}), {args.repeats} rounds")
    time_litert(rows, args)
    log(f"  {model_label(name, args)}: timing XLA (batch {XLA_BATCH}), {args.repeats} rounds")
    time_xla(rows, models, args)
    add_ratios(rows)
    for row in rows:
        del row["_tflite_f32_path"]


# ----------------------------------------------------------------------
# Targets


def check_targets(rows):
    row = next((r for r in rows if r["model"] == TARGET_MODEL
                and r["base_ratio"] == TARGET_RATIO), None)
    results = []
    for name, rule, key, limit in TARGETS:
        result = {"target": name, "rule": f"{rule} ({TARGET_MODEL}, ratio {TARGET_RATIO})",
                  "limit": limit, "key": key, "status": None, "value": None}
        if row is not None:
            dense = next(r for r in rows if r["model"] == TARGET_MODEL and r["variant"] == DENSE)
            value = row["vs_dense"][key]
            result.update(status="PASS" if value <= limit else "MISS", value=value,
                          transformed=row[key], dense=dense[key])
        results.append(result)
    return results


def target_line(result):
    if result["status"] is None:
        return f"{result['rule']}: n/a ({TARGET_MODEL} at {TARGET_RATIO} not measured)"
    unit = "bytes" if result["key"].endswith("bytes") else "ms"
    fmt = (lambda v: f"{v:,.0f}") if unit == "bytes" else (lambda v: f"{v:.2f}")
    return (f"{result['status']}  {result['rule']}: {result['value']:.3f}x "
            f"({fmt(result['transformed'])} vs {fmt(result['dense'])} {unit})")


# ----------------------------------------------------------------------
# Output: tables, JSON, plot


def _paths(row):
    p = row["paths"]
    return "-" if p["materialized"] + p["factored"] == 0 else f"{p['materialized']}M{p['factored']}F"


ABSOLUTE_COLUMNS = (
    # (header, width, format function of a row)
    ("model", 17, lambda r: r["label"]),
    ("ratio", 5, lambda r: r["base_ratio"] or "1"),
    ("params", 9, lambda r: f"{r['params']:,}"),
    ("MACs M", 7, lambda r: f"{r['macs'] / 1e6:.1f}"),
    ("adds M", 6, lambda r: f"{r['adds'] / 1e6:.1f}"),
    ("dnsMACs", 7, lambda r: f"{r['dense_macs'] / 1e6:.1f}"),
    ("paths", 7, _paths),
    (".keras KB", 9, lambda r: f"{r['keras_bytes'] / 1e3:,.0f}"),
    ("f32 KB", 7, lambda r: f"{r['tflite_f32_bytes'] / 1e3:,.0f}"),
    ("ops", 5, lambda r: str(r["tflite_f32_num_ops"])),
    ("xnn", 3, lambda r: "?" if r["litert_delegate_nodes"] is None
     else str(r["litert_delegate_nodes"])),
    ("int8 KB", 7, lambda r: f"{r['tflite_int8_bytes'] / 1e3:,.0f}"),
    ("lite1 ms", 8, lambda r: f"{r['litert_ms_1t']:.2f}"),
    ("lite2 ms", 8, lambda r: f"{r['litert_ms_2t']:.2f}"),
    ("XLA ms", 7, lambda r: f"{r['xla_ms']:.1f}"),
    ("XLA im/s", 8, lambda r: f"{r['xla_images_per_s']:,.0f}"),
    ("f32 diff", 8, lambda r: f"{r['tflite_f32_max_rel_diff']:.1e}"),
    ("int8 diff", 9, lambda r: f"{r['tflite_int8_max_rel_diff']:.1e}"),
)
RATIO_COLUMNS = (
    ("model", 17, lambda r: r["label"]),
    ("ratio", 5, lambda r: r["base_ratio"] or "1"),
    *[(header, 7, lambda r, k=key: f"{r['vs_dense'][k]:.3f}") for header, key in (
        ("params", "params"),
        ("MACs", "macs"),
        ("MAC+add", "macs_plus_adds"),
        (".keras", "keras_bytes"),
        ("f32", "tflite_f32_bytes"),
        ("int8", "tflite_int8_bytes"),
        ("ops", "tflite_f32_num_ops"),
        ("lite1", "litert_ms_1t"),
        ("lite2", "litert_ms_2t"),
        ("XLA", "xla_ms"),
    )],
)
LEGEND = """\
MACs: multiply-adds of the paths the Keras model runs (one sample); adds: the
factored paths' additions; dnsMACs: with every TransformConv2D as Conv2D;
paths: TransformConv2D layers materialised (M) / factored (F) in the Keras
model (the .tflite files write every one in a compact form, grouped where it
applies: export lowering "auto"). f32 / int8: .tflite sizes;
ops: operators in the float32 file; xnn: XNNPACK partitions LiteRT made of it
(more than the dense file's: some operators run outside XNNPACK). lite1 /
lite2: LiteRT batch-1 latency, float32 file, 1 / 2 threads; XLA: batch-32
forward, ms per batch and images/s. diff: max |tflite - keras| / max |keras|
on 2 samples. Medians over rounds."""


PLOT_METRICS = (
    ("params", "params"),
    ("macs_plus_adds", "MACs+adds"),
    ("keras_bytes", ".keras"),
    ("tflite_f32_bytes", "tflite f32"),
    ("tflite_int8_bytes", "tflite int8"),
    ("litert_ms_1t", "LiteRT 1 thr"),
    ("litert_ms_2t", "LiteRT 2 thr"),
    ("xla_ms", "XLA b32"),
)


def plot(rows, args, path):
    """Grouped bars: transformed / dense per metric, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 3.6 * len(names)), squeeze=False)
    width = 0.8 / max(1, len(args.ratios))
    positions = np.arange(len(PLOT_METRICS))
    for ax, name in zip(axes[:, 0], names):
        for i, ratio in enumerate(args.ratios):
            row = next(r for r in rows if r["model"] == name and r["base_ratio"] == ratio)
            values = [row["vs_dense"][key] for key, _ in PLOT_METRICS]
            bars = ax.bar(positions + (i - (len(args.ratios) - 1) / 2) * width, values,
                          width, label=f"base ratio {ratio}")
            ax.bar_label(bars, fmt="%.2f", fontsize=6, rotation=90, padding=2)
        ax.axhline(1.0, color="gray", linewidth=1)
        if name == TARGET_MODEL and TARGET_RATIO in args.ratios:
            keys = [key for key, _ in PLOT_METRICS]
            for _, _, key, limit in TARGETS:
                x = keys.index(key)
                ax.hlines(limit, x - 0.45, x + 0.45, colors="red", linestyles="--",
                          linewidth=1.2, label=f"target at {TARGET_RATIO}"
                          if key == TARGETS[0][2] else None)
        ax.set_xticks(positions, [label for _, label in PLOT_METRICS])
        ax.set_ylabel("transformed / dense")
        ax.set_title(model_label(name, args))
        ax.set_ylim(0, max(1.2, ax.get_ylim()[1] * 1.1))
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
    fig.suptitle("TransformConv2D models against dense (same run; lower is better)")
    fig.tight_layout()
    common.save_figure(fig, path)


# ----------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        sys.exit("This benchmark exports with TensorFlow and times "
                 "tf.function(jit_compile=True): run it with KERAS_BACKEND=tensorflow.")
    started = time.perf_counter()
    payload = {
        "benchmark": "model_cost",
        "command": shlex.join(["python", *sys.argv]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "machine": common.tf_machine_info(),
        "versions": common.litert_versions(),
        "config": {
            "models": {name: {"input_shape": list(input_shape(name, args))}
                       for name in args.models},
            "ratios": args.ratios,
            "conv_factory": "conv_factory(base_ratio=r): 1/2 identity+rot180, "
                            "1/4 rotations, 1/8 d4; 1x1 convolutions stay Conv2D",
            "mobilenet_size": args.mobilenet_size,
            "weights": "random, keras.utils.set_random_seed(seed) before each build",
            "repeats": args.repeats,
            "loop_ms": args.loop_ms,
            "min_calls": args.min_calls,
            "int8_samples": args.int8_samples,
            "int8_representative_data": "standard normal samples",
            "verify_samples": VERIFY_SAMPLES,
            "litert": "ai_edge_litert Interpreter(model_path, num_threads=k), default "
                      "delegates, float32 file, batch 1",
            "litert_threads": list(THREADS),
            "xla": "tf.function(lambda x: model(x, training=False), jit_compile=True)",
            "xla_batch": XLA_BATCH,
            "statistic": "median over rounds of (loop time / calls), variants interleaved",
            "litert_delegate_nodes": "DELEGATE nodes in the float32 interpreter after the "
                                     "default delegation: XNNPACK partitions",
            "jobs": args.jobs,
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
    print(f"models: {', '.join(model_label(n, args) for n in args.models)}"
          + (f" (MobileNetV2 at {args.mobilenet_size}x{args.mobilenet_size}, not 224; "
             "1000 classes)" if "mobilenet_v2" in args.models else "")
          + f"; base ratios {' '.join(args.ratios)}; {args.repeats} rounds", flush=True)

    def log(line):
        print(f"[{time.perf_counter() - started:5.0f} s]{line}", flush=True)

    with tempfile.TemporaryDirectory(prefix="model-cost-") as tmp:
        folder = args.keep_files or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        log(f" building and exporting {len(args.models) * (1 + len(args.ratios))} models "
            f"in {args.jobs} process{'es' if args.jobs > 1 else ''}")
        static = measure_all_files(folder, args, log)
        for name in args.models:
            rows = [static[(name, variant)] for variant in (DENSE, *args.ratios)]
            time_model(name, rows, args, log)
            payload["rows"].extend(rows)
            common.write_json(args.out, payload)  # partial results survive an interruption

    payload["targets"] = check_targets(payload["rows"])
    payload["complete"] = True
    payload["machine"]["load_average_end"] = list(os.getloadavg())
    payload["wall_s"] = round(time.perf_counter() - started, 1)
    common.write_json(args.out, payload)
    png = args.out.with_suffix(".png")
    plot(payload["rows"], args, png)

    print()
    print(LEGEND)
    print()
    print(common.table(payload["rows"], ABSOLUTE_COLUMNS))
    print()
    print("Transformed / dense, same run (ops: operators in the float32 .tflite):")
    print(common.table(payload["rows"], RATIO_COLUMNS))
    bad = [r for r in payload["rows"] if not r["tflite_f32_max_rel_diff"] <= FLOAT_MAX_REL_DIFF]
    for row in bad:
        print(f"WARNING: {row['label']} {row['variant']}: the float32 .tflite differs from "
              f"Keras by {row['tflite_f32_max_rel_diff']:.2g} of the output scale "
              f"(expected <= {FLOAT_MAX_REL_DIFF:g})")
    print()
    for result in payload["targets"]:
        print(target_line(result))
    print(f"\nload average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"{payload['wall_s']:.0f} s in all")
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
