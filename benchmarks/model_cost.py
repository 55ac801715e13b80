"""Whole-model cost of `TransformConv2D` twins against their dense models, and where the time goes.

For each model (default: CIFAR ResNet-56 at 32x32x3 with 10 classes, and the
ImageNet ResNet-18 and ResNet-50 at 224x224x3 (--imagenet-size) with 1000;
MobileNetV2 on request, at --mobilenet-size) the dense model (`conv=None`)
and its transformed twins (`conv=conv_factory(base_ratio=r)`, default r =
1/4, 1/8) are built with random weights (`keras.utils.set_random_seed` before
each build), and the 1/4 twin is also exported with `keep_order=False` (the
"restored" variant: each grouped layer restores its filter order after its
second convolution, batch norms stay separate operators; what export wrote
before the channel-order pass). Measured:

    params, MACs         `cost.model_cost` of the Keras model
    .keras               size of `model.save(...)`
    .tflite f32/f16/int8 size of `export.export_tflite` (default lowering
                         "auto"; float16 weights; full integer int8,
                         calibrated on a few random samples); operator
                         counts, and each file's max relative difference
                         from the Keras model on 2 random samples
                         (`export.verify_tflite`)
    LiteRT               batch-1 latency with `ai_edge_litert`
                         `Interpreter(model_path, num_threads=k)` (default
                         delegates, i.e. XNNPACK): float32 with k = 1 and 2,
                         float16 and int8 with k = 1
    layers               (dense and the 1/4 variants) every layer of the graph
                         the float32 file is converted from
                         (`export.deployment_model`), each in its own file
                         with batch-1 inputs of its shapes, timed with 1
                         thread; their sum against the whole file's time,
                         and sums per kind of layer
    XLA                  (CIFAR models; --xla-models) batch-32 forward time of
                         the Keras model, `model(x, training=False)` inside
                         `tf.function(jit_compile=True)`

The models are built and exported first (in --jobs processes, default 2),
then timed in this process with nothing else of the benchmark running.
Timings are interleaved: every variant of one model (and every file kind and
thread count) runs once per round, the order rotating from round to round;
after a warm-up (and an untimed round) each round times a loop of calls per
variant; a row reports the median over the rounds of the time per call.
Ratios are twin / dense of the same model measured in the same run.

Targets at base ratio 1/4, printed as PASS/MISS with the values: ResNet-18
LiteRT 1-thread latency <= 0.6x dense and float32 file <= 0.3x; ResNet-50
latency <= 0.85x; ResNet-56 latency <= 1.2x; every model's float32 file no
larger than its restored variant's, and its whole-file time within 1.15x the
sum of its layers' standalone times; every float32 file within 1e-5 of Keras.

Writes JSON (machine with the load average, versions, command, timestamp,
config, rows, targets) atomically, and a PNG of the ratios beside it. The
`.keras` and `.tflite` files go to a temporary folder (or --keep-files DIR).

Usage:
    python benchmarks/model_cost.py                      # ResNet-56, -18, -50
    python benchmarks/model_cost.py --quick              # smoke test (1/4, ResNet-56 only)
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
from tf_transform_conv.export import deployment_model  # noqa: E402
from tf_transform_conv.graph import graph_nodes  # noqa: E402
from tf_transform_conv.export import export_tflite, verify_tflite  # noqa: E402
from tf_transform_conv.layers import TransformConv2D  # noqa: E402

CIFAR_MODELS = ("resnet20", "resnet32", "resnet56", "resnet110", "vgg16_cifar")
IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50")
MODEL_CHOICES = (*CIFAR_MODELS, *IMAGENET_MODELS, "mobilenet_v2")
DEFAULT_MODELS = ("resnet56", "resnet18", "resnet50")
THREADS = (1, 2)
XLA_BATCH = 32
VERIFY_SAMPLES = 2
DENSE = "dense"
# The same twin exported with keep_order=False: each grouped layer restores
# its filter order (reshape-transpose or gather) and batch norms stay apart.
RESTORED = " restored"
QUANTIZED = ("float16", "int8")

# Float32 files agree with Keras to about 1e-6 of the output scale (export.py).
FLOAT_MAX_REL_DIFF = 1e-5

TARGET_RATIO = "1/4"
# (name, model, rule, key of row["vs_dense"] or of the row, limit); at TARGET_RATIO.
TARGETS = (
    ("resnet18_latency", "resnet18", "LiteRT batch-1 latency, 1 thread <= 0.6x dense",
     "litert_ms_1t", 0.6),
    ("resnet18_file", "resnet18", ".tflite float32 file <= 0.3x dense",
     "tflite_f32_bytes", 0.3),
    ("resnet50_latency", "resnet50", "LiteRT batch-1 latency, 1 thread <= 0.85x dense",
     "litert_ms_1t", 0.85),
    ("resnet56_latency", "resnet56", "LiteRT batch-1 latency, 1 thread <= 1.2x dense",
     "litert_ms_1t", 1.2),
)
# Every model at TARGET_RATIO: the file no larger than with keep_order=False
# (what export wrote before the channel-order pass), and the whole model within
# 1.15x the sum of its layers' standalone times.
MAX_WHOLE_OVER_LAYERS = 1.15

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
        "--imagenet-size", type=int, default=224,
        help="input rows = cols of the ImageNet ResNets (default 224)",
    )
    parser.add_argument(
        "--no-breakdown", dest="breakdown", action="store_false",
        help="skip the per-layer times (each layer of the exported graph as its own "
        "file, dense and the twin at " + TARGET_RATIO + ")",
    )
    parser.add_argument(
        "--xla-models", nargs="*", default=None,
        help="models to time under XLA too (default: the CIFAR ones; batch 32 of "
        "224x224 images is slow on a small CPU)",
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
        "--layer-repeats", type=int, default=5,
        help="timed rounds of the per-layer files (default 5)",
    )
    parser.add_argument(
        "--layer-loop-ms", type=float, default=30.0,
        help="target duration of one timed loop of a per-layer file (default 30)",
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
        help="smoke test: ratio 1/4 only (unless --ratios), ResNet-56 only (unless "
        "--models), MobileNetV2 at 64x64, ImageNet ResNets at 64x64, 3 rounds, "
        "short loops",
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
    if args.quick and "--models" not in (argv if argv is not None else sys.argv):
        args.models = ["resnet56"]
    if args.quick and "--imagenet-size" not in (argv if argv is not None else sys.argv):
        args.imagenet_size = 64
    if args.ratios is None:
        args.ratios = [TARGET_RATIO] if args.quick else ["1/4", "1/8"]
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
    if args.xla_models is None:
        args.xla_models = [m for m in args.models if m in CIFAR_MODELS]
    if args.imagenet_size < 32:
        parser.error("--imagenet-size must be at least 32 (the ResNets downsample 32x)")
    if args.mobilenet_size < 32:
        parser.error("--mobilenet-size must be at least 32 (MobileNetV2 downsamples 32x)")
    return args


def input_shape(name, args):
    if name == "mobilenet_v2":
        return (args.mobilenet_size, args.mobilenet_size, 3)
    if name in IMAGENET_MODELS:
        return (args.imagenet_size, args.imagenet_size, 3)
    return (32, 32, 3)


def variants(args):
    """Dense, each ratio, and the target ratio exported with keep_order=False."""
    extra = [TARGET_RATIO + RESTORED] if TARGET_RATIO in args.ratios else []
    return [DENSE, *args.ratios, *extra]


def split_variant(variant):
    """`(base ratio or None, keep_order)` of a variant name."""
    if variant == DENSE:
        return None, True
    if variant.endswith(RESTORED):
        return variant[: -len(RESTORED)], False
    return variant, True


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
    """Cost, .keras and .tflite sizes, op counts and the TFLite checks of one model.

    Builds the model itself (from the seed), so it can run in a worker process.
    """
    ratio, keep_order = split_variant(variant)
    model = make_model(name, ratio, args)
    shape = input_shape(name, args)
    rng = np.random.default_rng(args.seed)
    samples = rng.normal(size=(max(args.int8_samples, VERIFY_SAMPLES),) + shape)
    samples = samples.astype("float32")
    stem = f"{name}_{'dense' if ratio is None else 'r' + ratio.replace('/', '-')}"
    stem += "" if keep_order else "_restored"

    cost = model_cost(model)
    keras_path = folder / f"{stem}.keras"
    model.save(keras_path)

    files, checks, export_s = {}, {}, {}
    for quantization in (None, *QUANTIZED):
        key = quantization or "f32"
        start = time.perf_counter()
        kwargs = {"representative_data": samples[: args.int8_samples]} \
            if quantization == "int8" else {}
        files[key] = export_tflite(model, folder / f"{stem}_{key}.tflite",
                                   quantization=quantization, keep_order=keep_order, **kwargs)
        export_s[key] = round(time.perf_counter() - start, 2)
        checks[key] = verify_tflite(files[key].path, model, samples[:VERIFY_SAMPLES],
                                    rtol=float("inf"))
    f32 = files["f32"]
    row = {
        "model": name,
        "label": model_label(name, args),
        "input_shape": list(shape),
        "num_classes": int(model.output_shape[-1]),
        "variant": variant,
        "base_ratio": ratio,
        "keep_order": keep_order,
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
        "keras_output_scale": checks["f32"].output_scale,
        "export_s": export_s,
        "_paths": {key: result.path for key, result in files.items()},
    }
    for key, result in files.items():
        row[f"tflite_{key}_bytes"] = result.bytes
        row[f"tflite_{key}_num_ops"] = result.num_ops
        row[f"tflite_{key}_max_rel_diff"] = checks[key].max_rel_diff
        row[f"tflite_{key}_max_abs_diff"] = checks[key].max_abs_diff
    row["tflite_int8_op_counts"] = files["int8"].op_counts
    if args.breakdown and (ratio is None or ratio == TARGET_RATIO):
        row["_layer_files"] = layer_files(model, keep_order, folder / f"{stem}_layers")
    return row


# ----------------------------------------------------------------------
# Per-layer breakdown


def layer_kind(layer):
    """The row of the breakdown table a layer of the exported graph belongs to."""
    kind = type(layer).__name__
    if kind == "GroupedTransformConv2D":
        return "TransformConv2D (grouped)"
    if kind == "TransformConv2D":
        return "TransformConv2D (slices)"
    if kind == "Conv2D":
        return "Conv2D 1x1" if tuple(layer.kernel_size) == (1, 1) else "Conv2D kxk"
    if kind in ("BatchNormalization",):
        return "BatchNormalization"
    if kind in ("ReLU", "Activation"):
        return "activation"
    if kind in ("Add",):
        return "Add"
    if kind in ("ZeroPadding2D", "ChannelPad"):
        return "padding"
    if "Pooling" in kind:
        return "pooling"
    if kind == "Dense":
        return "Dense"
    return kind


def layer_key(layer, node):
    """What a layer's standalone time depends on: equal keys, one file."""
    shapes = tuple(tuple(t.shape[1:]) for t in node.input_tensors)
    if type(layer).__name__ == "GroupedTransformConv2D":
        plan = layer.plan
        config = (layer.filters, layer.kernel_size, layer.strides, layer.padding,
                  layer.dilation_rate, str(layer.activation), plan.product_kernel.shape,
                  plan.spread_kernel.shape, plan.spread_bias is not None, plan.identity,
                  plan.transpose, plan.output_index.shape, layer._bias is not None)
    else:
        config = {k: v for k, v in layer.get_config().items() if k != "name"}
        config = repr(sorted(config.items()))
    weights = tuple(tuple(w.shape) for w in layer.weights)
    return repr((type(layer).__name__, shapes, config, weights))


def layer_files(model, keep_order, folder):
    """Each layer of the graph `export_tflite` converts, as its own float32 file.

    Returns a list of `{name, kind, key}` in graph order and writes one file
    per distinct key, `folder/<index>.tflite` (its path under `files`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    deployed, _ = deployment_model(model, keep_order=keep_order)
    entries, files = [], {}
    for node in graph_nodes(deployed):
        layer = node.operation
        key = layer_key(layer, node)
        entries.append({"name": layer.name, "kind": layer_kind(layer), "key": key})
        if key in files:
            continue
        inputs = [keras.Input(batch_shape=(1,) + tuple(t.shape[1:]), dtype=t.dtype)
                  for t in node.input_tensors]
        local = {id(t): x for t, x in zip(node.input_tensors, inputs)}
        call_args, call_kwargs = node.arguments.fill_in(local)
        standalone = keras.Model(inputs, layer(*call_args, **call_kwargs))
        path = folder / f"{len(files)}.tflite"
        with tempfile.TemporaryDirectory(prefix="layer-") as tmp:
            standalone.export(tmp, verbose=False)
            path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(tmp).convert())
        files[key] = str(path)
    return {"layers": entries, "files": files}


def time_layers(row, args):
    """Standalone 1-thread latency of each distinct layer file; per-layer and per-kind sums."""
    spec = row.pop("_layer_files")
    timers = {
        key: common.Timer(common.litert_runner(path, 1, args.seed), args.layer_loop_ms / 1e3,
                          args.min_calls, warmup=3)
        for key, path in spec["files"].items()
    }
    common.run_rounds(timers.values(), args.layer_repeats)
    layers = []
    for entry in spec["layers"]:
        layers.append({"name": entry["name"], "kind": entry["kind"],
                       "ms": timers[entry["key"]].median_ms})
    by_kind = collections.defaultdict(float)
    for entry in layers:
        by_kind[entry["kind"]] += entry["ms"]
    row["layers"] = layers
    row["layers_by_kind_ms"] = dict(by_kind)
    row["layers_sum_ms"] = float(sum(e["ms"] for e in layers))
    row["distinct_layer_files"] = len(timers)


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


LITERT_TIMINGS = (("f32", 1), ("f32", 2), ("float16", 1), ("int8", 1))


def litert_key(quantization, threads):
    return f"litert_ms_{threads}t" if quantization == "f32" else f"litert_{quantization}_ms_1t"


def time_litert(rows, args):
    """Interleaved batch-1 latency of every row's files: float32 with 1 and 2
    threads, float16 and int8 with 1."""
    timers = {}
    for row in rows:
        for quantization, threads in LITERT_TIMINGS:
            runner = common.litert_runner(row["_paths"][quantization], threads, args.seed)
            if quantization == "f32":
                row.setdefault("litert_delegate_nodes",
                               common.delegated_ops(runner.interpreter))
            timers[(row["variant"], quantization, threads)] = common.Timer(
                runner, args.loop_ms / 1e3, args.min_calls, warmup=5)
    common.run_rounds(timers.values(), args.repeats)
    for row in rows:
        for quantization, threads in LITERT_TIMINGS:
            timer = timers[(row["variant"], quantization, threads)]
            key = litert_key(quantization, threads)
            row[key] = timer.median_ms
            row.setdefault("calls_per_loop", {})[key] = timer.calls
            row.setdefault("samples_ms", {})[key] = [1e3 * s for s in timer.samples]


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
    "tflite_float16_bytes", "tflite_int8_bytes", "tflite_f32_num_ops", "litert_ms_1t",
    "litert_ms_2t", "litert_float16_ms_1t", "litert_int8_ms_1t", "xla_ms",
)


def add_ratios(rows):
    """`row["vs_dense"]`: each measurement over the dense model's, same run."""
    for row in rows:
        row["macs_plus_adds"] = row["macs"] + row["adds"]
    dense = next(r for r in rows if r["variant"] == DENSE)
    for row in rows:
        row["vs_dense"] = {k: row[k] / dense[k] for k in RATIO_KEYS
                           if row.get(k) is not None and dense.get(k)}
        if "layers_sum_ms" in row:
            row["whole_over_layers"] = row["litert_ms_1t"] / row["layers_sum_ms"]


def measure_all_files(folder, args, log):
    """`measure_files` for every model and variant, in `args.jobs` processes.

    Returns {(model, variant): row}. The most expensive exports (the
    transformed ResNets: thousands of operators) are started first.
    """
    jobs = [(name, variant) for name in args.models for variant in variants(args)]
    jobs.sort(key=lambda job: (job[1] == DENSE, job[0] in CIFAR_MODELS))
    results = {}

    def done(job, row):
        results[job] = row
        log(f"  {row['label']} {job[1]}: built and exported; float32 in "
            f"{row['export_s']['f32']:.0f} s ({row['tflite_f32_num_ops']} ops), "
            f"float16 in {row['export_s']['float16']:.0f} s, "
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
    log(f"  {model_label(name, args)}: timing LiteRT (batch 1; float32 with "
        f"{' and '.join(map(str, THREADS))} threads, float16 and int8 with 1), "
        f"{args.repeats} rounds")
    time_litert(rows, args)
    for row in rows:
        if "_layer_files" in row:
            log(f"  {model_label(name, args)} {row['variant']}: timing "
                f"{len(row['_layer_files']['files'])} distinct layers standalone, "
                f"{args.layer_repeats} rounds")
            time_layers(row, args)
    if name in args.xla_models:
        models = {row["variant"]: make_model(name, row["base_ratio"], args)
                  for row in rows if row["keep_order"]}
        log(f"  {model_label(name, args)}: timing XLA (batch {XLA_BATCH}), "
            f"{args.repeats} rounds")
        time_xla([row for row in rows if row["keep_order"]], models, args)
    add_ratios(rows)
    for row in rows:
        del row["_paths"]


# ----------------------------------------------------------------------
# Targets


def check_targets(rows):
    """The issue's targets at TARGET_RATIO, plus the file and whole-vs-layers
    checks for every model measured there."""
    def find(model, variant):
        return next((r for r in rows if r["model"] == model and r["variant"] == variant), None)

    results = []
    for name, model, rule, key, limit in TARGETS:
        row = find(model, TARGET_RATIO)
        result = {"target": name, "rule": f"{rule} ({model}, ratio {TARGET_RATIO})",
                  "limit": limit, "status": None, "value": None}
        if row is not None:
            value = row["vs_dense"][key]
            result.update(status="PASS" if value <= limit else "MISS", value=value,
                          detail=f"{row[key]:,.2f} vs {find(model, DENSE)[key]:,.2f}")
        results.append(result)
    for model in dict.fromkeys(r["model"] for r in rows):
        row, restored = find(model, TARGET_RATIO), find(model, TARGET_RATIO + RESTORED)
        if row is None:
            continue
        if restored is not None:
            value = row["tflite_f32_bytes"] / restored["tflite_f32_bytes"]
            results.append({
                "target": f"{model}_file_not_larger",
                "rule": f".tflite float32 file no larger than with keep_order=False "
                        f"({model}, ratio {TARGET_RATIO})",
                "limit": 1.0, "value": value, "status": "PASS" if value <= 1.0 else "MISS",
                "detail": f"{row['tflite_f32_bytes']:,} vs {restored['tflite_f32_bytes']:,} "
                          "bytes"})
        if "whole_over_layers" in row:
            value = row["whole_over_layers"]
            results.append({
                "target": f"{model}_whole_over_layers",
                "rule": f"whole model <= {MAX_WHOLE_OVER_LAYERS}x the sum of its layers "
                        f"standalone, 1 thread ({model}, ratio {TARGET_RATIO})",
                "limit": MAX_WHOLE_OVER_LAYERS, "value": value,
                "status": "PASS" if value <= MAX_WHOLE_OVER_LAYERS else "MISS",
                "detail": f"{row['litert_ms_1t']:.2f} vs {row['layers_sum_ms']:.2f} ms"})
    float_rows = [r for r in rows if r["tflite_f32_max_rel_diff"] is not None]
    worst = max(float_rows, key=lambda r: r["tflite_f32_max_rel_diff"])
    results.append({
        "target": "float32_matches_keras",
        "rule": f"every float32 file within {FLOAT_MAX_REL_DIFF:g} of Keras "
                "(max |tflite - keras| / max |keras|)",
        "limit": FLOAT_MAX_REL_DIFF, "value": worst["tflite_f32_max_rel_diff"],
        "status": "PASS" if worst["tflite_f32_max_rel_diff"] <= FLOAT_MAX_REL_DIFF else "MISS",
        "detail": f"worst: {worst['label']} {worst['variant']}"})
    return results


def target_line(result):
    if result["status"] is None:
        return f"{result['rule']}: n/a (not measured)"
    value = result["value"]
    shown = f"{value:.2g}" if value < 1e-3 else f"{value:.3f}x"
    return f"{result['status']}  {result['rule']}: {shown} ({result['detail']})"


# ----------------------------------------------------------------------
# Output: tables, JSON, plot


def _paths(row):
    p = row["paths"]
    return "-" if p["materialized"] + p["factored"] == 0 else f"{p['materialized']}M{p['factored']}F"


def _ms(key, digits=2):
    return lambda r: "-" if r.get(key) is None else f"{r[key]:.{digits}f}"


def _ratio(key):
    return lambda r: "-" if key not in r["vs_dense"] else f"{r['vs_dense'][key]:.3f}"


ABSOLUTE_COLUMNS = (
    # (header, width, format function of a row)
    ("model", 17, lambda r: r["label"]),
    ("variant", 13, lambda r: r["variant"]),
    ("params", 10, lambda r: f"{r['params']:,}"),
    ("MACs M", 7, lambda r: f"{r['macs'] / 1e6:.1f}"),
    ("f32 KB", 7, lambda r: f"{r['tflite_f32_bytes'] / 1e3:,.0f}"),
    ("f16 KB", 7, lambda r: f"{r['tflite_float16_bytes'] / 1e3:,.0f}"),
    ("int8 KB", 7, lambda r: f"{r['tflite_int8_bytes'] / 1e3:,.0f}"),
    ("ops", 5, lambda r: str(r["tflite_f32_num_ops"])),
    ("xnn", 3, lambda r: "?" if r["litert_delegate_nodes"] is None
     else str(r["litert_delegate_nodes"])),
    ("f32 1t", 7, _ms("litert_ms_1t")),
    ("f32 2t", 7, _ms("litert_ms_2t")),
    ("f16 1t", 7, _ms("litert_float16_ms_1t")),
    ("int8 1t", 7, _ms("litert_int8_ms_1t")),
    ("layers", 7, _ms("layers_sum_ms")),
    ("XLA ms", 7, _ms("xla_ms", 1)),
    ("f32 diff", 8, lambda r: f"{r['tflite_f32_max_rel_diff']:.1e}"),
    ("f16 diff", 8, lambda r: f"{r['tflite_float16_max_rel_diff']:.1e}"),
    ("int8 diff", 9, lambda r: f"{r['tflite_int8_max_rel_diff']:.1e}"),
)
RATIO_COLUMNS = (
    ("model", 17, lambda r: r["label"]),
    ("variant", 13, lambda r: r["variant"]),
    *[(header, 7, _ratio(key)) for header, key in (
        ("params", "params"),
        ("MACs", "macs"),
        ("f32", "tflite_f32_bytes"),
        ("f16", "tflite_float16_bytes"),
        ("int8", "tflite_int8_bytes"),
        ("ops", "tflite_f32_num_ops"),
        ("f32 1t", "litert_ms_1t"),
        ("f32 2t", "litert_ms_2t"),
        ("f16 1t", "litert_float16_ms_1t"),
        ("int8 1t", "litert_int8_ms_1t"),
        ("XLA", "xla_ms"),
    )],
    ("whole/lyr", 9, lambda r: "-" if "whole_over_layers" not in r
     else f"{r['whole_over_layers']:.3f}"),
)
LEGEND = """\
variant: dense, a base ratio (exported as export_tflite does by default), or
"<ratio> restored" (the same twin exported with keep_order=False: every grouped
layer restores its filter order, batch norms stay separate). MACs: multiply-adds
of the Keras model (one sample). f32 / f16 / int8: .tflite sizes (float32,
float16 weights, full integer); ops: operators in the float32 file; xnn:
XNNPACK partitions LiteRT made of it. f32 1t / 2t, f16 1t, int8 1t: LiteRT
batch-1 latency, ms; layers: the sum of the float32 graph's layers, each
timed as its own file (1 thread); whole/lyr: the float32 file's 1-thread
time over that sum. XLA: batch-32 forward, ms. diff: max |tflite - keras| /
max |keras| on 2 samples. Medians over rounds."""


def breakdown_table(rows):
    """Per kind of layer: the sum of standalone times, dense and each twin."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        measured = [r for r in rows if r["model"] == model and "layers" in r]
        if not measured:
            continue
        kinds = list(dict.fromkeys(k for r in measured for k in r["layers_by_kind_ms"]))
        table_rows = []
        for kind in kinds:
            entry = {"kind": kind}
            for r in measured:
                entry[r["variant"]] = r["layers_by_kind_ms"].get(kind, 0.0)
                entry[r["variant"] + " n"] = sum(1 for e in r["layers"] if e["kind"] == kind)
            table_rows.append(entry)
        total = {"kind": "sum of layers"}
        whole = {"kind": "whole model"}
        for r in measured:
            total[r["variant"]], total[r["variant"] + " n"] = r["layers_sum_ms"], len(r["layers"])
            whole[r["variant"]], whole[r["variant"] + " n"] = r["litert_ms_1t"], None
        table_rows += [total, whole]
        columns = [("kind", 26, lambda e: e["kind"])]
        for r in measured:
            v = r["variant"]
            columns.append((f"{v} n", len(v) + 2,
                            lambda e, v=v: "" if e.get(v + " n") is None else str(e[v + " n"])))
            columns.append((f"{v} ms", max(8, len(v) + 3),
                            lambda e, v=v: f"{e.get(v, 0.0):.3f}"))
        lines.append(f"{measured[0]['label']}: LiteRT 1 thread, each layer of the exported "
                     "float32 graph as its own file (n: layers)")
        lines.append(common.table(table_rows, columns))
        lines.append("")
    return "\n".join(lines)


PLOT_METRICS = (
    ("params", "params"),
    ("macs_plus_adds", "MACs+adds"),
    ("tflite_f32_bytes", "tflite f32"),
    ("tflite_int8_bytes", "tflite int8"),
    ("litert_ms_1t", "LiteRT f32 1 thr"),
    ("litert_ms_2t", "LiteRT f32 2 thr"),
    ("litert_float16_ms_1t", "LiteRT f16 1 thr"),
    ("litert_int8_ms_1t", "LiteRT int8 1 thr"),
)


def plot(rows, args, path):
    """Grouped bars: transformed / dense per metric, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    shown = [v for v in variants(args) if v != DENSE]
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 3.6 * len(names)), squeeze=False)
    width = 0.8 / max(1, len(shown))
    positions = np.arange(len(PLOT_METRICS))
    limits = {(model, key): limit for _, model, _, key, limit in TARGETS}
    for ax, name in zip(axes[:, 0], names):
        for i, variant in enumerate(shown):
            row = next(r for r in rows if r["model"] == name and r["variant"] == variant)
            values = [row["vs_dense"].get(key, np.nan) for key, _ in PLOT_METRICS]
            bars = ax.bar(positions + (i - (len(shown) - 1) / 2) * width, values,
                          width, label=variant)
            ax.bar_label(bars, fmt="%.2f", fontsize=6, rotation=90, padding=2)
        ax.axhline(1.0, color="gray", linewidth=1)
        for x, (key, _) in enumerate(PLOT_METRICS):
            if (name, key) in limits:
                ax.hlines(limits[(name, key)], x - 0.45, x + 0.45, colors="red",
                          linestyles="--", linewidth=1.2)
        ax.set_xticks(positions, [label for _, label in PLOT_METRICS], fontsize=8)
        ax.set_ylabel("twin / dense")
        ax.set_title(model_label(name, args) + f" (red: target at {TARGET_RATIO})")
        ax.set_ylim(0, max(1.2, ax.get_ylim()[1] * 1.1))
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
    fig.suptitle("TransformConv2D models against dense (same run; lower is better)")
    fig.tight_layout()
    common.save_figure(fig, path)


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
            "imagenet_size": args.imagenet_size,
            "variants": variants(args),
            "breakdown": args.breakdown,
            "layer_repeats": args.layer_repeats,
            "layer_loop_ms": args.layer_loop_ms,
            "xla_models": args.xla_models,
            "weights": "random, keras.utils.set_random_seed(seed) before each build",
            "repeats": args.repeats,
            "loop_ms": args.loop_ms,
            "min_calls": args.min_calls,
            "int8_samples": args.int8_samples,
            "int8_representative_data": "standard normal samples",
            "verify_samples": VERIFY_SAMPLES,
            "litert": "ai_edge_litert Interpreter(model_path, num_threads=k), default "
                      "delegates, batch 1; float32 with 1 and 2 threads, float16 and "
                      "int8 with 1",
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
        log(f" building and exporting {len(args.models) * len(variants(args))} models "
            f"in {args.jobs} process{'es' if args.jobs > 1 else ''}")
        static = measure_all_files(folder, args, log)
        for name in args.models:
            rows = [static[(name, variant)] for variant in variants(args)]
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
    print("Twin / dense, same run (ops: operators in the float32 .tflite):")
    print(common.table(payload["rows"], RATIO_COLUMNS))
    print()
    print(breakdown_table(payload["rows"]))
    for result in payload["targets"]:
        print(target_line(result))
    print(f"\nload average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"{payload['wall_s']:.0f} s in all")
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
