"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

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
