"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

import argparse
import fractions
import json
import math
import os
import platform
import re
import time

import numpy as np


def machine_info(**extra):
    """The machine a benchmark ran on: platform, processor model, cores, plus `extra`."""
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        processor = names[0] if names else processor
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": processor,
        "cpu_count": os.cpu_count(),
        **extra,
    }


def tf_machine_info():
    """`machine_info` with TensorFlow's devices and the load average."""
    import tensorflow as tf

    devices = [d.name.replace("/physical_device:", "") for d in tf.config.list_physical_devices()]
    return machine_info(devices=devices, load_average=list(os.getloadavg()))


def litert_versions():
    """Versions of what the TFLite benchmarks use (None for LiteRT if missing)."""
    from importlib import metadata

    import keras
    import matplotlib
    import tensorflow as tf

    import tf_transform_conv

    try:
        litert = metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        litert = None
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "numpy": np.__version__,
        "ai_edge_litert": litert,
        "matplotlib": matplotlib.__version__,
        "tf_transform_conv": tf_transform_conv.__version__,
    }


# Command-line values

#: Base ratios the benchmarks take: `models.DEFAULT_TRANSFORMS` has transforms for them.
RATIO_CHOICES = ("1/2", "1/4", "1/8")


def parse_shape(text):
    """argparse type: `"HxWxC"` with positive integers."""
    if not re.fullmatch(r"\d+x\d+x\d+", text) or 0 in shape_dims(text):
        raise argparse.ArgumentTypeError(
            f"expected HxWxC with positive integers, e.g. 56x56x64; got {text!r}"
        )
    return text


def shape_dims(shape):
    """`"HxWxC"` -> `(H, W, C)`."""
    return tuple(int(v) for v in shape.split("x"))


def parse_ratio(text):
    """argparse type: one of `RATIO_CHOICES`, returned as `"1/k"`."""
    try:
        ratio = fractions.Fraction(text)
    except (ValueError, ZeroDivisionError):
        ratio = None
    if ratio is None or ratio.numerator != 1 or f"1/{ratio.denominator}" not in RATIO_CHOICES:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(RATIO_CHOICES)}; got {text!r}"
        )
    return f"1/{ratio.denominator}"


def ratio_denominator(ratio):
    """`"1/k"` -> `k`."""
    return fractions.Fraction(ratio).denominator


def table(rows, columns):
    """A text table: `columns` are `(header, width, format function of a row)`."""
    header = " ".join(f"{name:>{w}}" for name, w, _ in columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(" ".join(f"{fmt(row):>{w}}" for _, w, fmt in columns))
    return "\n".join(lines)


def write_json(path, payload):
    """Writes `payload` to `path` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def save_figure(fig, path):
    """Saves a matplotlib figure as PNG atomically, then closes it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# Timing


class Timer:
    """One callable to be timed in interleaved rounds; seconds per call."""

    def __init__(self, run_once, loop_s, min_calls, warmup=3):
        self.run_once = run_once
        for _ in range(warmup):
            run_once()
        start = time.perf_counter()
        run_once()
        single = time.perf_counter() - start
        self.calls = max(min_calls, math.ceil(loop_s / max(single, 1e-6)))
        self.samples = []

    def run(self, record=True):
        start = time.perf_counter()
        self.run_once(self.calls)
        seconds = (time.perf_counter() - start) / self.calls
        if record:
            self.samples.append(seconds)

    @property
    def median_ms(self):
        return 1e3 * float(np.median(self.samples))


def run_rounds(timers, repeats):
    """One untimed round, then `repeats` rounds, the order rotating each round."""
    order = list(timers)
    for timer in order:
        timer.run(record=False)
    for rep in range(repeats):
        shift = rep % len(order)
        for timer in order[shift:] + order[:shift]:
            timer.run()


def litert_runner(path, threads, seed):
    """Invokes a batch-1 interpreter of `path`; returns `run(calls=1)`."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    x = np.random.default_rng(seed).normal(size=detail["shape"]).astype(detail["dtype"])
    interpreter.set_tensor(detail["index"], x)

    def run(calls=1):
        for _ in range(calls):
            interpreter.invoke()

    run.interpreter = interpreter
    return run


def delegated_ops(interpreter):
    """DELEGATE nodes after the default (XNNPACK) delegation, or None if unknown."""
    try:
        details = interpreter._get_ops_details()
    except Exception:  # noqa: BLE001 - a private API: leave it out rather than fail
        return None
    return sum(op["op_name"] == "DELEGATE" for op in details)
