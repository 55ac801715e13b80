"""Dropping the duplicate quantization scales of sparse-encoded constants in a `.tflite` file.

With the sparse encoding (`Optimize.EXPERIMENTAL_SPARSITY`), the converter
writes each sparse constant as a sparse tensor read by a DENSIFY operator,
and in an int8 file gives both tensors, the sparse input and the densified
output, the per-channel scales and zero points: 12 bytes per output channel
twice. DENSIFY copies the values without reading the scales (the
convolution after it reads the output's), so the input's are dead bytes:
in the grouped form, whose spread kernels have an output channel per spread
output, they took an eighth of an int8 file (8,624 of 65,776 bytes in
`tests/test_quantized_export.py`'s model). `drop_sparse_input_scales`
removes them; the interpreter computes the same outputs, bit for bit.
"""

import numpy as np

__all__ = ["drop_sparse_input_scales"]


def drop_sparse_input_scales(flatbuffer):
    """`(flatbuffer, dropped)`: the `.tflite` bytes without the scales of DENSIFY inputs.

    Args:
        flatbuffer: bytes, a `.tflite` file's contents.

    Returns:
        The new bytes (the same object where there was nothing to drop), and
        the number of scales dropped.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    densify = {
        index
        for index, code in enumerate(model.operatorCodes)
        if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.DENSIFY
    }
    dropped = 0
    for subgraph in model.subgraphs:
        readers = {}
        for op in subgraph.operators:
            for tensor in np.asarray(op.inputs).tolist():
                readers[tensor] = readers.get(tensor, 0) + 1
        for op in subgraph.operators:
            if op.opcodeIndex not in densify:
                continue
            source = int(op.inputs[0])
            quantization = subgraph.tensors[source].quantization
            if readers[source] != 1 or quantization is None or quantization.scale is None:
                continue
            dropped += len(quantization.scale)
            subgraph.tensors[source].quantization = None
    if not dropped:
        return flatbuffer, 0
    return flatbuffer_utils.convert_object_to_bytearray(model), dropped
