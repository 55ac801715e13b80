"""Running and checking `.tflite` files in the LiteRT interpreter.

`run_tflite(path, inputs)` runs a file (quantized inputs and outputs
converted), `verify_tflite(path, model, inputs, rtol=1e-4)` compares it with
`model(inputs)` and raises `TFLiteMismatchError` beyond the tolerance, and
`tflite_op_counts` lists a file's operators. LiteRT (`ai_edge_litert`) is
imported when a file is run.
"""

import collections
import dataclasses
import math
import os

import keras
import numpy as np

from tf_transform_conv._checks import check_positive_int
from tf_transform_conv._checks import check_tolerance
from tf_transform_conv.export.checks import inputs_struct
from tf_transform_conv.export.deploy import float32_model
from tf_transform_conv.graph.nodes import is_graph_model

__all__ = ["TFLiteMismatchError", "VerifyResult", "run_tflite", "tflite_op_counts", "verify_tflite"]


class TFLiteMismatchError(ValueError, AssertionError):
    """The `.tflite` file's outputs differ from the Keras model's by more than the tolerance.

    Both a `ValueError` and an `AssertionError`, so tests may expect either.
    """


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """How closely a `.tflite` file reproduces the Keras model (see `verify_tflite`).

    Attributes:
        max_abs_diff: float, the largest `|tflite - keras|` over all outputs.
        max_rel_diff: float, the largest `|tflite - keras| / scale`, where
            `scale` is the largest `|keras|` of that output.
        output_scale: float, the largest `|keras|` over all outputs.
        samples: int, the number of samples compared.
    """

    max_abs_diff: float
    max_rel_diff: float
    output_scale: float
    samples: int

    def to_dict(self):
        """A JSON-serialisable dict of the fields."""
        return dataclasses.asdict(self)


def _read_flatbuffer(path, verb):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(
            f"{verb}: no such file: {path!r}. Pass the path export_tflite wrote."
        )
    with open(path, "rb") as f:
        content = f.read()
    if len(content) < 8 or content[4:8] != b"TFL3":
        raise ValueError(
            f"{verb}: {path!r} is not a TFLite flatbuffer (bytes 4:8 are "
            f"{content[4:8]!r}, expected the identifier b'TFL3'). Pass a .tflite "
            "file written by export_tflite (or tf.lite.TFLiteConverter)."
        )
    return content


def _interpreter(content, num_threads=None, delegates=True):
    if num_threads is not None:
        check_positive_int(num_threads, "num_threads", expected="None or an int >= 1")
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.interpreter import OpResolverType

    kwargs = {"model_content": content, "num_threads": num_threads}
    if not delegates:
        kwargs["experimental_op_resolver_type"] = (
            OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    return Interpreter(**kwargs)


def tflite_op_counts(flatbuffer):
    """Operator name -> count in a `.tflite` file (bytes or path), before delegation.

    Returns an empty dict when the interpreter cannot list the operators.
    """
    if not isinstance(flatbuffer, (bytes, bytearray)):
        flatbuffer = _read_flatbuffer(flatbuffer, "tflite_op_counts")
    try:
        interpreter = _interpreter(bytes(flatbuffer), delegates=False)
        interpreter.allocate_tensors()
        details = interpreter._get_ops_details()
    except Exception:  # a private API: leave the counts out rather than fail
        return {}
    return dict(collections.Counter(op["op_name"] for op in details))


def _signature_order(names, prefix):
    """Signature names in output (or input) order.

    `prefix`, `prefix_1`, `prefix_2`, ... (how TensorFlow names positional
    arguments and outputs) by their index; other names sorted, as
    `keras.tree.flatten` orders a dict.
    """

    def index(name):
        if name == prefix:
            return 0
        tail = name[len(prefix) + 1 :] if name.startswith(prefix + "_") else ""
        return int(tail) if tail.isdigit() else None

    keys = [index(n) for n in names]
    if any(k is None for k in keys):
        return sorted(names)
    return [n for _, n in sorted(zip(keys, names))]


def _quantize(x, detail):
    scale, zero = detail["quantization"]
    if detail["dtype"] in (np.int8, np.uint8, np.int16) and scale:
        info = np.iinfo(detail["dtype"])
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(detail["dtype"])
    return x.astype(detail["dtype"])


def _dequantize(y, detail):
    scale, zero = detail["quantization"]
    if detail["dtype"] in (np.int8, np.uint8, np.int16) and scale:
        return (y.astype(np.float32) - zero) * scale
    return y.astype(np.float32)


def run_tflite(path, inputs, num_threads=None):
    """Runs a `.tflite` file on `inputs`, looping over the batch when the file's is smaller.

    A last batch smaller than the file's is padded with zeros (and those
    outputs dropped). Integer inputs and outputs (a file converted with
    int8 input/output types) are quantized and dequantized with the file's
    parameters; files from `export_tflite` take float32.

    Args:
        path: the `.tflite` file.
        inputs: an array (a file with one input), or a dict of arrays keyed
            by the file's input names (for files from `export_tflite`, the
            names of the model's `keras.Input`s), or a list of arrays in the
            file's signature order; every array with the same number of
            samples.
        num_threads: interpreter threads (None: the interpreter's default).

    Returns:
        A list of float32 arrays, one per output, in the model's (flattened)
        output order.

    Raises:
        ValueError: for a missing or non-TFLite file, and inputs that do not
            fit the file's.
    """
    content = _read_flatbuffer(path, "run_tflite")
    interpreter = _interpreter(content, num_threads=num_threads)
    signatures = interpreter.get_signature_list()
    if signatures:
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        in_names = _signature_order(list(runner.get_input_details()), "args_0")
        out_names = _signature_order(list(runner.get_output_details()), "output")
        in_details = [runner.get_input_details()[n] for n in in_names]
        out_details = [runner.get_output_details()[n] for n in out_names]

        def invoke(batch):
            result = runner(**dict(zip(in_names, batch)))
            return [result[n] for n in out_names]
    else:
        interpreter.allocate_tensors()
        in_details = interpreter.get_input_details()
        out_details = interpreter.get_output_details()
        in_names = [d["name"] for d in in_details]

        def invoke(batch):
            for detail, x in zip(in_details, batch):
                interpreter.set_tensor(detail["index"], x)
            interpreter.invoke()
            return [interpreter.get_tensor(d["index"]) for d in out_details]

    if isinstance(inputs, dict):
        if set(inputs) != set(in_names):
            raise ValueError(
                f"The file's inputs are named {sorted(in_names)}; received a dict "
                f"with keys {sorted(inputs)}."
            )
        arrays = [np.asarray(inputs[name]) for name in in_names]
    else:
        arrays = [np.asarray(a) for a in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
        if len(arrays) != len(in_details):
            raise ValueError(
                f"The file has {len(in_details)} inputs {in_names}; received "
                f"{len(arrays)} arrays."
            )
        if len(arrays) > 1 and not all(n.startswith("args_0") for n in in_names):
            raise ValueError(
                f"The file has several named inputs {in_names}: pass a dict of "
                "arrays keyed by these names (verify_tflite does this from the model)."
            )
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(
            "Every input needs the same number of samples. Received "
            f"{[a.shape[0] for a in arrays]}."
        )
    file_batch = int(in_details[0]["shape"][0])
    for name, detail, a in zip(in_names, in_details, arrays):
        expected = tuple(int(d) for d in detail["shape"][1:])
        if expected != tuple(a.shape[1:]):
            raise ValueError(
                f"The file's input {name!r} has shape (batch,) + {expected}; "
                f"received an array of shape {a.shape}."
            )
    outputs = [[] for _ in out_details]
    for start in range(0, n, file_batch):
        batch = [a[start : start + file_batch] for a in arrays]
        short = file_batch - batch[0].shape[0]
        if short:
            batch = [np.concatenate([b, np.zeros((short,) + b.shape[1:], b.dtype)]) for b in batch]
        batch = [_quantize(np.asarray(b, np.float32), d) for b, d in zip(batch, in_details)]
        for i, (y, detail) in enumerate(zip(invoke(batch), out_details)):
            y = _dequantize(np.asarray(y), detail)
            outputs[i].append(y[: file_batch - short])
    return [np.concatenate(parts) for parts in outputs]


def _named_inputs(model, inputs):
    """`inputs` (structured like the model's inputs) as a dict keyed by input names."""
    tensors = keras.tree.flatten(inputs_struct(model))
    if len(tensors) == 1 and not isinstance(inputs, (dict, list, tuple)):
        return {tensors[0].name: inputs}
    arrays = keras.tree.flatten(inputs)
    if len(arrays) != len(tensors):
        raise ValueError(
            f"The model has {len(tensors)} inputs; received {len(arrays)} arrays."
        )
    return {t.name: a for t, a in zip(tensors, arrays)}


def verify_tflite(path, model, inputs, rtol=1e-4, num_threads=None):
    """Checks that a `.tflite` file computes what the Keras model computes.

    Runs the file with the LiteRT interpreter on `inputs` (looping over the
    samples when the file's batch is smaller) and compares with
    `model(inputs, training=False)`, output by output; a mixed-precision
    model through its float32 twin (`float32_model`, what `export_tflite`
    converts: the file computes in float32). The difference that
    counts is relative to the output's scale: `max|tflite - keras| /
    max|keras|`. Float32 files agree to about 1e-6; float16 weights give
    about 1e-3; for dynamic-range and int8 files pass a looser `rtol`
    (or `float("inf")`, to only measure) or compare accuracy on real data.

    Args:
        path: the `.tflite` file.
        model: the Keras model it was exported from.
        inputs: what `model` takes: an array (one input), or a list or dict
            of arrays structured like the model's inputs.
        rtol: float >= 0, the largest relative difference accepted
            (`float("inf")`: only measure). Defaults to `1e-4` (float32).
        num_threads: interpreter threads (None: the interpreter's default).

    Returns:
        A `VerifyResult` (max_abs_diff, max_rel_diff, output_scale, samples).

    Raises:
        ValueError: if `rtol` is negative or NaN, `path` is missing or not
            a TFLite flatbuffer (its bytes 4:8 are not `b"TFL3"`), or the
            inputs do not fit the file.
        TFLiteMismatchError: (a `ValueError` and an `AssertionError`) if
            the relative difference exceeds `rtol`, or is NaN.
    """
    rtol = check_tolerance(rtol, "rtol")
    content = _read_flatbuffer(path, "verify_tflite")
    signatures = _interpreter(content).get_signature_list()
    names = next(iter(signatures.values()))["inputs"] if signatures else []
    feed = inputs
    if len(names) > 1 and not all(n.startswith("args_0") for n in names):
        feed = _named_inputs(model, inputs)  # files from export_tflite
    got = run_tflite(path, feed, num_threads=num_threads)
    twin = float32_model(model) if is_graph_model(model) else model
    reference = twin(inputs, training=False)
    reference = [np.asarray(keras.ops.convert_to_numpy(r), np.float32)
                 for r in keras.tree.flatten(reference)]
    if len(got) != len(reference) or any(g.shape != r.shape for g, r in zip(got, reference)):
        raise ValueError(
            "The file's outputs do not match the model's: file "
            f"{[g.shape for g in got]}, model {[r.shape for r in reference]}. "
            "Was the file exported from this model?"
        )
    max_abs, max_rel, scale_all = 0.0, 0.0, 0.0
    for g, r in zip(got, reference):
        diff = float(np.max(np.abs(g - r))) if g.size else 0.0
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        rel = diff / scale if scale > 0 else diff
        if math.isnan(diff):
            max_abs = max_rel = float("nan")
        elif not math.isnan(max_abs):
            max_abs, max_rel = max(max_abs, diff), max(max_rel, rel)
        scale_all = max(scale_all, scale)
    result = VerifyResult(max_abs, max_rel, scale_all, int(got[0].shape[0]) if got else 0)
    if not max_rel <= rtol:
        raise TFLiteMismatchError(
            f"The TFLite file {os.fspath(path)!r} differs from the Keras model: "
            f"max abs diff {max_abs:.3g}, max diff relative to the output scale "
            f"{max_rel:.3g} (output scale {scale_all:.3g}) > rtol={rtol:g}, over "
            f"{result.samples} samples. For a quantized file pass a looser rtol "
            "or compare accuracy on real data."
        )
    return result
