"""What a `.tflite` file holds, read with the LiteRT interpreter (shared by the export tests)."""


def tensor_shapes(path):
    """Shapes of every tensor in a `.tflite` file (constants included)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    return {tuple(int(d) for d in t["shape"]) for t in interpreter.get_tensor_details()}
