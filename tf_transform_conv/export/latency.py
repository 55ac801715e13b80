"""Measured LiteRT latency: of a `.tflite` file (`tflite_latency`), and of single layers (`LatencyTable`)."""

import hashlib
import json
import math
import os
import tempfile
import time

import keras
import numpy as np

from tf_transform_conv._checks import check_positive_int
from tf_transform_conv.export.tflite import export_tflite

__all__ = ["LatencyTable", "tflite_latency"]


def _time_interpreter(interpreter, repeats, min_seconds, warmup=3):
    """Median milliseconds per `invoke()` over `repeats` timed loops."""
    for _ in range(warmup):
        interpreter.invoke()
    start = time.perf_counter()
    interpreter.invoke()
    single = time.perf_counter() - start
    calls = max(1, math.ceil(min_seconds / max(single, 1e-6)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            interpreter.invoke()
        samples.append((time.perf_counter() - start) / calls)
    return 1e3 * float(np.median(samples))


def tflite_latency(path, threads=1, repeats=7, min_seconds=0.1, seed=0):
    """The median latency of one call of a `.tflite` file in LiteRT, in milliseconds.

    The interpreter (default delegates, i.e. XNNPACK; `threads` threads)
    is given a random normal input of the file's shape (batch 1 for
    `export_tflite`'s default), warmed up with 3 calls, then timed in
    `repeats` loops of enough calls to last `min_seconds` each.

    Args:
        path: the `.tflite` file.
        threads: int >= 1. Defaults to 1.
        repeats: int >= 1, timed loops. Defaults to 7.
        min_seconds: float > 0, the least duration of a loop. Defaults to 0.1.
        seed: int, for the input.

    Returns:
        float, milliseconds per call (the median over the loops).
    """
    from ai_edge_litert.interpreter import Interpreter

    threads = check_positive_int(threads, "threads")
    repeats = check_positive_int(repeats, "repeats")
    interpreter = Interpreter(model_path=os.fspath(path), num_threads=threads)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(seed)
    for detail in interpreter.get_input_details():
        interpreter.set_tensor(
            detail["index"], rng.normal(size=detail["shape"]).astype(detail["dtype"]))
    return _time_interpreter(interpreter, repeats, min_seconds)


class LatencyTable:
    """Measured LiteRT latencies of single layers, cached in a JSON file.

    `layer_latency(layer, input_shape, lowering)` exports a model holding
    only a copy of `layer` (its weights, batch 1; `export.export_tflite` with
    the `lowering` for a `TransformConv2D`) and times it with
    `tflite_latency`. Results are keyed by the layer's class, configuration
    (name left out: layers of the same shape and assignment share an
    entry), input shape, lowering and thread count, kept in memory and, with
    `path`, in a JSON file that is read when the table is made and written
    after each new measurement. Entries stay valid across runs on the same
    machine; delete the file after changing the machine or the TFLite
    export.

    Args:
        path: optional cache file (JSON).
        threads: int >= 1, interpreter threads. Defaults to 1.
        repeats: as `tflite_latency`. Defaults to 5.
        min_seconds: as `tflite_latency`. Defaults to 0.05.

    Example:

    >>> import keras
    >>> table = LatencyTable()
    >>> ms = table.layer_latency(keras.layers.Conv2D(8, 3), (8, 8, 4))
    >>> ms > 0
    True
    """

    def __init__(self, path=None, threads=1, repeats=5, min_seconds=0.05):
        self.path = None if path is None else os.fspath(path)
        self.threads = check_positive_int(threads, "threads")
        self.repeats = check_positive_int(repeats, "repeats")
        self.min_seconds = float(min_seconds)
        self.entries = {}
        self.measured = 0
        if self.path and os.path.exists(self.path):
            with open(self.path) as f:
                self.entries = json.load(f).get("entries", {})

    def key(self, layer, input_shape, lowering=None):
        """The cache key of a measurement."""
        config = dict(layer.get_config())
        config.pop("name", None)
        config.pop("dtype", None)
        text = json.dumps(
            [type(layer).__name__, config, [int(d) for d in input_shape], lowering,
             self.threads], sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()

    def layer_latency(self, layer, input_shape, lowering=None):
        """Milliseconds per call of `layer` alone on one `input_shape` sample.

        Args:
            layer: a Keras layer (built or not; a built layer's weights are
                copied).
            input_shape: its input shape without the batch dimension.
            lowering: for a `TransformConv2D`, the form to export
                (`lowering.LOWERINGS`); None for other layers.
        """
        key = self.key(layer, input_shape, lowering)
        if key not in self.entries:
            self.entries[key] = self._measure(layer, tuple(input_shape), lowering)
            self.measured += 1
            self.save()
        return self.entries[key]["ms"]

    def _measure(self, layer, input_shape, lowering):
        config = dict(layer.get_config())
        config["name"] = "layer"
        copy = type(layer).from_config(config)
        inputs = keras.Input(input_shape, batch_size=1)
        model = keras.Model(inputs, copy(inputs))
        if layer.built and layer.weights:
            copy.set_weights(layer.get_weights())
        with tempfile.TemporaryDirectory(prefix="tfconv-latency-") as folder:
            path = os.path.join(folder, "layer.tflite")
            result = export_tflite(
                model, path, lowering="auto" if lowering is None else lowering)
            ms = tflite_latency(path, self.threads, self.repeats, self.min_seconds)
        return {"ms": ms, "layer": type(layer).__name__, "input_shape": list(input_shape),
                "lowering": result.lowerings.get("layer", lowering), "bytes": result.bytes}

    def save(self):
        """Writes the cache file (atomically), when the table has one."""
        if not self.path:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"threads": self.threads, "entries": self.entries}, f, indent=1)
        os.replace(tmp, self.path)
