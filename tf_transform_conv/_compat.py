"""Adapters to private TensorFlow and Keras APIs, in one place.

Every use of an API that Keras or TensorFlow does not publish goes through a
function here, so that a release that moves it breaks one file.
"""

import keras


def compiled_by_xla():
    """Whether the code being traced now will run as one XLA computation.

    True on the JAX backend (whose jitted and eager operations are XLA), and
    on TensorFlow inside a `tf.function(jit_compile=True)` (Keras's
    `compile(jit_compile=True)` traces its train, test and predict steps in
    one); False in TensorFlow's eager mode and in graphs run without XLA.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        return True
    if backend != "tensorflow":
        return False
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    if tf.executing_eagerly():
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))

