"""One quantization scale for the grouped form's kernels in int8 files.

The converter quantizes every convolution and fully-connected kernel per
output channel: a float32 scale and an int64 zero point per channel, and,
for a convolution, an int32 bias with its own per-channel scale and zero
point (28 bytes per channel in all). The grouped form's products
(`export.grouped`) have `kh * kw` output channels per base, each only
`c_in` int8 weights long, so on 16-32-channel layers those parameters took
as many bytes as the weights themselves, and the grouped layer was larger
than its dense twin (`tests/test_quantized_export.py`).

Per-channel scales buy little there: the products are an intermediate
tensor, quantized with one scale for all its channels, and the bases they
come from are filters of one layer, of similar magnitude.
`per_tensor_products` requantizes each product kernel with one scale
(`max |w| / 127`, zero point 0, the converter's symmetric int8 weights),
from its float32 values, and rescales the operator's bias to match. On a
15k-parameter CNN (16-32-32 channels, 32x32 inputs) trained briefly and
pruned to a half, every layer grouped, it changed the int8 file's mean
largest output error against Keras from 0.00166 to 0.00167 (`prune_model`'s
defaults) and from 0.00203 to 0.00211 (`Reconstruction.recommended()`),
for outputs of about 0.3.

The spread convolutions that a selection follows (in int8 files, those of
layers of more than 64 filters) are written normalized
(`export.grouped.GroupedPlan.normalized_spread`): every output channel's
largest weight is 1, so the converter gives all of them the same scale.
`collapse_equal_scales` writes such a kernel's scales, and its bias's, once:
the int8 weights and the outputs do not change, and a 32-filter layer at
ratio 1/2 with a fitted assignment (64 spread channels) saves 1.5 kB. The
normalization has a cost: the spread's output is quantized in normalized
units. On a ResNet-56 converted at 1/4 (random weights) the grouped int8
file's mean output error against Keras went from 0.0181 to 0.0204 for
586,960 -> 506,360 bytes; on a 15k-parameter CNN it did not change.
"""

import numpy as np

__all__ = ["collapse_equal_scales", "per_tensor_products"]

_WEIGHT_OPS = ("CONV_2D", "FULLY_CONNECTED")


def per_tensor_products(flatbuffer, kernels):
    """`(flatbuffer, requantized)`: the file with `kernels` quantized per tensor.

    Args:
        flatbuffer: bytes, an int8 `.tflite` file's contents.
        kernels: the float32 product kernels written in the file, Keras
            layout `(1, 1, c_in, out)`. A convolution or fully-connected
            operator's int8 weight is taken for one of them where it has
            its shape (TFLite layout) and dequantizes to its values within
            half a quantization step.

    Returns:
        The new bytes (the same object where nothing matched) and how many
        weight tensors were requantized.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    # TFLite holds weights output-channel first: (out, 1, 1, in) or (out, in).
    candidates = [np.asarray(k, np.float32).reshape(-1, np.shape(k)[-1]).T for k in kernels]
    if not candidates:
        return flatbuffer, 0
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    builtins = {getattr(schema.BuiltinOperator, name) for name in _WEIGHT_OPS}
    codes = {
        index for index, code in enumerate(model.operatorCodes)
        if max(code.builtinCode, code.deprecatedBuiltinCode) in builtins
    }
    requantized = 0
    for subgraph in model.subgraphs:
        done = {}  # weight tensor -> its new scale
        for op in subgraph.operators:
            if op.opcodeIndex not in codes or len(op.inputs) < 2:
                continue
            weight = int(op.inputs[1])
            if weight not in done:
                found = _requantize(model, subgraph.tensors[weight], candidates)
                if found is None:
                    continue
                done[weight] = found
                requantized += 1
            scale = done[weight]
            if len(op.inputs) > 2 and op.inputs[2] >= 0:
                _rescale_bias(model, subgraph.tensors[int(op.inputs[2])],
                              subgraph.tensors[int(op.inputs[0])], scale)
    if not requantized:
        return flatbuffer, 0
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), requantized


def _requantize(model, tensor, candidates):
    """Requantizes `tensor` per tensor if it holds one of `candidates`: its new
    scale, or None."""
    quantization = tensor.quantization
    if quantization is None or quantization.scale is None or len(quantization.scale) < 2:
        return None
    data = model.buffers[tensor.buffer].data
    if data is None or len(data) == 0 or quantization.quantizedDimension != 0:
        return None  # computed (a densified sparse kernel) or quantized otherwise
    values = np.frombuffer(bytes(bytearray(data)), np.int8)
    scales = np.asarray(quantization.scale, np.float32)
    if values.size % len(scales):
        return None
    dequantized = values.reshape(len(scales), -1).astype(np.float32) * scales[:, None]
    for kernel in candidates:
        if kernel.shape != dequantized.shape:
            continue
        if np.all(np.abs(dequantized - kernel) <= 0.5001 * scales[:, None] + 1e-12):
            break
    else:
        return None
    scale = np.float32(np.abs(kernel).max() / 127.0) if np.any(kernel) else np.float32(1.0)
    new = np.clip(np.round(kernel / scale), -127, 127).astype(np.int8)
    model.buffers[tensor.buffer].data = np.frombuffer(new.tobytes(), np.uint8)
    quantization.scale = np.asarray([scale], np.float32)
    quantization.zeroPoint = np.zeros(1, np.int64)
    return scale


def _rescale_bias(model, bias, inputs, scale):
    """An int32 bias quantized per channel -> per tensor, at input scale times `scale`."""
    quantization = bias.quantization
    data = model.buffers[bias.buffer].data
    if quantization is None or quantization.scale is None or data is None or len(data) == 0:
        return
    if len(quantization.scale) == 1:
        return  # already rescaled (a bias two operators share)
    real = (np.frombuffer(bytes(bytearray(data)), np.int32).astype(np.float64)
            * np.asarray(quantization.scale, np.float64))
    # The interpreter checks the bias scale against the product of the two
    # float32 scales, so it is computed in float32 as they are.
    bias_scale = np.float32(inputs.quantization.scale[0]) * np.float32(scale)
    new = np.clip(np.round(real / np.float64(bias_scale)), -(2 ** 31), 2 ** 31 - 1)
    model.buffers[bias.buffer].data = np.frombuffer(new.astype(np.int32).tobytes(), np.uint8)
    quantization.scale = np.asarray([bias_scale], np.float32)
    quantization.zeroPoint = np.zeros(1, np.int64)


def collapse_equal_scales(flatbuffer):
    """`(flatbuffer, collapsed)`: convolution kernels whose per-channel scales are
    all equal, and their biases, quantized with that one scale.

    A kernel stored sparse is read through a DENSIFY operator: its output
    (the tensor the convolution reads) holds the scales. The int8 values do
    not change; one scale equal to every channel's is the same quantization.

    Args:
        flatbuffer: bytes, an int8 `.tflite` file's contents.

    Returns:
        The new bytes (the same object where nothing was collapsed) and how
        many kernels were.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    convolution = {
        index for index, code in enumerate(model.operatorCodes)
        if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.CONV_2D
    }
    collapsed = 0
    for subgraph in model.subgraphs:
        done = set()  # weight tensors collapsed (identical kernels are stored once)
        for op in subgraph.operators:
            if op.opcodeIndex not in convolution or len(op.inputs) < 2:
                continue
            weight = int(op.inputs[1])
            if weight not in done:
                if not _collapse(subgraph.tensors[weight]):
                    continue
                done.add(weight)
                collapsed += 1
            if len(op.inputs) > 2 and op.inputs[2] >= 0:
                _collapse(subgraph.tensors[int(op.inputs[2])])
    if not collapsed:
        return flatbuffer, 0
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), collapsed


def _collapse(tensor):
    """Quantizes `tensor` per tensor if its per-channel scales are all one value
    (and its zero points 0); whether it did."""
    quantization = tensor.quantization
    if quantization is None or quantization.scale is None or len(quantization.scale) < 2:
        return False
    scales = np.asarray(quantization.scale, np.float32)
    zeros = np.asarray(quantization.zeroPoint if quantization.zeroPoint is not None else [0])
    if np.any(scales != scales[0]) or np.any(zeros != 0):
        return False
    quantization.scale = scales[:1].copy()
    quantization.zeroPoint = np.zeros(1, np.int64)
    return True
