"""Training cost of TransformConv2D models against their dense model: peak memory and step time.

The model is a small CNN on 32x32x1 inputs: a `Conv2D(32)` stem, then 3x3
convolutions with 64, 64, 128 and 128 filters, each followed by batch norm
and ReLU, two max-pools, global average pooling and a 10-way `Dense`. Its
TransformConv2D twins come two ways:

    converted  `transform_model(model, sparsity=0.75, transforms="d4",
               scale=True, transform_family=...)`: fitted, scattered
               assignments (what conversion and pruning produce)
    default    the same network built with `TransformConv2D(base_ratio=1/4,
               transforms="rotations", transform_family=...)`: the default
               block assignment

each with `implementation="auto"` (Keras's choice per layer) or forced
`"factored"`, compiled with Adam and trained with and without
`jit_compile` (Keras turns XLA off by default on CPU). Every configuration
runs in its own process, so its peak resident memory (`ru_maxrss`, which
includes TensorFlow itself: the dense model's row says how much) is its
own: one warm-up epoch (compilation), then `--epochs` timed epochs of
`--steps` batches of `--batch` random images. Ratios are against the dense
model with the same `jit_compile`, measured in the same run, first and last
(the faster of the two is the reference).

Targets (the converted discrete model with `auto`, with and without XLA):
peak memory <= 2x and step time <= 1.2x the dense model's.

Writes JSON (machine, versions, command, rows) and a PNG beside it.

Usage:
    python benchmarks/train_cost.py                         # every configuration
    python benchmarks/train_cost.py --quick                 # two families, auto only
    python benchmarks/train_cost.py --families discrete scalar --paths auto
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import common  # noqa: E402  (benchmarks/common.py, beside this script)

FAMILIES = ("discrete", "scalar", "rotation", "affine", "general")
KINDS = ("converted", "default")
PATHS = ("auto", "factored")
MEMORY_MAX = 2.0
TIME_MAX = 1.2
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "train_cost.json"
QUICK_OUT = DEFAULT_OUT.with_name("train_cost_quick.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=None,
                        help="transform families (default: all; discrete and scalar with --quick)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                        help="how the twins are made (default: both)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=None,
                        help="implementations (default: both; auto with --quick)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--steps", type=int, default=8, help="batches per epoch (default 8)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke test")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON path, the PNG beside it (default {DEFAULT_OUT})")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one configuration, as JSON
    args = parser.parse_args(argv)
    if args.families is None:
        args.families = ["discrete", "scalar"] if args.quick else list(FAMILIES)
    if args.paths is None:
        args.paths = ["auto"] if args.quick else list(PATHS)
    if args.quick:
        args.steps, args.epochs = min(args.steps, 4), min(args.epochs, 1)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if min(args.batch, args.steps, args.epochs) < 1:
        parser.error("--batch, --steps and --epochs must be positive")
    return args


# ----------------------------------------------------------------------
# One configuration (in a child process)


def build(config):
    """The dense model, or a TransformConv2D twin (`config["kind"]`)."""
    import keras

    import tf_transform_conv as tc

    family, kind, path = config["family"], config["kind"], config["path"]

    def conv(filters, name, dense):
        if dense:
            return keras.layers.Conv2D(filters, 3, padding="same", name=name)
        return tc.TransformConv2D(filters, 3, padding="same", base_ratio=0.25,
                                  transforms="rotations", transform_family=family,
                                  implementation=path, name=name)

    default = kind == "default"
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(32, 3, padding="same", name="stem")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    for i, filters in enumerate((64, 64, 128, 128)):
        x = conv(filters, f"conv{i}", dense=not default)(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
        if i in (1, 3):
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    if kind == "converted":
        model, _ = tc.transform_model(
            model,
            sparsity=0.75,
            reconstruction=tc.Reconstruction(transforms="d4", transform_family=family, scale=True),
        )
        if path != "auto":
            def force(layer):
                if isinstance(layer, tc.TransformConv2D):
                    layer_config = layer.get_config()
                    layer_config["implementation"] = path
                    return tc.TransformConv2D.from_config(layer_config), layer.get_weights()
                return None

            model = tc.graph.rewrite_model(model, force)
    return model


def run_child(config):
    import resource
    import time

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    model = build(config)
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=config["jit"])
    rng = np.random.default_rng(0)
    n = config["batch"] * config["steps"]
    x = rng.normal(size=(n, 32, 32, 1)).astype("float32")
    y = rng.integers(0, 10, n)
    start = time.perf_counter()
    model.fit(x, y, batch_size=config["batch"], epochs=1, verbose=0)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    model.fit(x, y, batch_size=config["batch"], epochs=config["epochs"], verbose=0)
    seconds = time.perf_counter() - start
    steps = config["epochs"] * config["steps"]
    print("RESULT " + json.dumps({
        **config,
        "step_ms": 1e3 * seconds / steps,
        "warmup_s": warmup,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": int(model.count_params()),
    }), flush=True)


def measure(config):
    """Runs one configuration in a fresh process; returns its result dict."""
    command = [sys.executable, __file__, "--child", json.dumps(config)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return {**config, "error": (done.stderr or done.stdout)[-2000:]}
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------
# The run


COLUMNS = [
    ("jit", 5, lambda r: "XLA" if r["jit"] else "no"),
    ("model", 9, lambda r: r["kind"]),
    ("family", 8, lambda r: r.get("family") or "-"),
    ("path", 8, lambda r: r.get("path") or "-"),
    ("step ms", 8, lambda r: f"{r['step_ms']:.1f}" if "step_ms" in r else "error"),
    ("peak MB", 8, lambda r: f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else ""),
    ("time/d", 7, lambda r: f"{r['time_ratio']:.2f}" if "time_ratio" in r else ""),
    ("mem/d", 6, lambda r: f"{r['memory_ratio']:.2f}" if "memory_ratio" in r else ""),
]


def add_ratios(rows):
    """Each row's time and memory over the dense reference with the same `jit`
    (the faster of its runs; its memory from the same run)."""
    for jit in (False, True):
        dense = [r for r in rows if r["kind"] == "dense" and r["jit"] == jit and "step_ms" in r]
        if not dense:
            continue
        reference = min(dense, key=lambda r: r["step_ms"])
        for row in rows:
            if row["jit"] == jit and "step_ms" in row:
                row["time_ratio"] = row["step_ms"] / reference["step_ms"]
                row["memory_ratio"] = row["peak_rss_mb"] / reference["peak_rss_mb"]


def targets(rows):
    results = []
    for jit in (False, True):
        case = [r for r in rows if r["kind"] == "converted" and r["family"] == "discrete"
                and r["path"] == "auto" and r["jit"] == jit and "time_ratio" in r]
        if not case:
            continue
        row = case[0]
        ok = row["time_ratio"] <= TIME_MAX and row["memory_ratio"] <= MEMORY_MAX
        results.append({
            "jit": jit, "status": "PASS" if ok else "MISS",
            "time_ratio": row["time_ratio"], "memory_ratio": row["memory_ratio"],
            "rule": f"converted d4 model, auto: time <= {TIME_MAX}x and memory <= "
                    f"{MEMORY_MAX}x the dense model's",
        })
    return results


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "time_ratio" in r and r["kind"] != "dense"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.28 * len(measured) + 1.5), sharey=True)
    labels = [f"{'XLA' if r['jit'] else 'no XLA'} {r['kind']} {r['family']} {r['path']}"
              for r in measured]
    for ax, key, limit, title in ((axes[0], "time_ratio", TIME_MAX, "step time / dense"),
                                  (axes[1], "memory_ratio", MEMORY_MAX, "peak memory / dense")):
        ax.barh(range(len(measured)), [r[key] for r in measured],
                color=["tab:blue" if r["jit"] else "tab:orange" for r in measured])
        ax.axvline(1.0, color="gray", linewidth=1)
        ax.axvline(limit, color="red", linestyle=":", linewidth=1, label=f"target {limit}x")
        ax.set_title(title)
        ax.legend(fontsize="small")
    axes[0].set_yticks(range(len(measured)), labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle("Training a 5-layer CNN (batch 128, Adam): TransformConv2D twins against dense")
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        run_child(json.loads(args.child))
        return
    base = dict(batch=args.batch, steps=args.steps, epochs=args.epochs)
    configs = []
    for jit in (False, True):
        configs.append(dict(base, jit=jit, kind="dense", family=None, path=None))
        for kind in args.kinds:
            for family in args.families:
                for path in args.paths:
                    configs.append(dict(base, jit=jit, kind=kind, family=family, path=path))
        # The reference again at the end: the faster of the two is kept, so a
        # disturbed first run does not flatter every ratio.
        configs.append(dict(base, jit=jit, kind="dense", family=None, path=None))
    payload = {
        "benchmark": "train_cost",
        "command": shlex.join(["python", *sys.argv]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": common.machine_info(load_average=list(os.getloadavg())),
        "config": vars(args) | {"out": str(args.out)},
        "complete": False,
        "rows": [],
    }
    header = " ".join(f"{name:>{w}}" for name, w, _ in COLUMNS)
    print(header + "\n" + "-" * len(header), flush=True)
    for config in configs:
        row = measure(config)
        payload["rows"].append(row)
        print(" ".join(f"{fmt(row):>{w}}" for _, w, fmt in COLUMNS), flush=True)
        if "error" in row:
            print("  " + row["error"].strip().splitlines()[-1], flush=True)
        common.write_json(args.out, payload)
    add_ratios(payload["rows"])
    print("\nratios against the faster of the two dense runs with the same jit_compile:")
    print(header + "\n" + "-" * len(header))
    for row in payload["rows"]:
        print(" ".join(f"{fmt(row):>{w}}" for _, w, fmt in COLUMNS), flush=True)
    payload["targets"] = targets(payload["rows"])
    payload["complete"] = True
    payload["machine"]["load_average_end"] = list(os.getloadavg())
    common.write_json(args.out, payload)
    plot(payload["rows"], args.out.with_suffix(".png"))
    print()
    for t in payload["targets"]:
        print(f"{'XLA' if t['jit'] else 'no XLA'}: {t['rule']}: {t['status']} "
              f"(time {t['time_ratio']:.2f}x, memory {t['memory_ratio']:.2f}x)")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
