"""Adapters to private TensorFlow and Keras APIs, in one place.

Every use of an API that Keras or TensorFlow does not publish goes through a
function here, so that a release that moves it breaks one file.
"""

import functools

import keras
from keras.src.losses import loss as loss_module
from keras.src.models.functional import Functional

if keras.backend.backend() == "jax":
    from keras.src.backend.jax import trainer as jax_trainer
else:
    jax_trainer = None


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



def keep_jax_state_on_failure():
    """Makes Keras's JAX `fit`, `evaluate` and `predict` keep the model's weights when a
    step fails before it returns.

    Keras 3.15's JAX trainer takes the model's variables out of the model
    (each variable's value becomes None) before the first step, passes them
    to the step, and puts back the state the last step returned: `fit` in a
    `finally`, `evaluate` and `predict` only when they end normally. A step
    that fails while it is traced (an error a layer raises, such as a
    pruning wrapper trained without its step callback; labels of the wrong
    shape; an input the model does not take) has returned nothing, so every
    variable stays empty: the trained weights are gone and the model is
    unusable. Patched here, the state taken out is also kept as the state to
    put back (a step that returns replaces it as before), and `evaluate` and
    `predict` put it back when they raise. Idempotent; on other backends,
    nothing.
    """
    if jax_trainer is None:
        return
    trainer = jax_trainer.JAXTrainer
    if getattr(trainer._get_jax_state, "keeps_state_on_failure", False):
        return
    original = trainer._get_jax_state

    @functools.wraps(original)
    def get_jax_state(self, trainable_variables=False, non_trainable_variables=False,
                      optimizer_variables=False, metrics_variables=False,
                      purge_model_variables=False):
        kinds = {"trainable_variables": trainable_variables,
                 "non_trainable_variables": non_trainable_variables,
                 "optimizer_variables": optimizer_variables,
                 "metrics_variables": metrics_variables}
        state = original(self, **kinds)
        if purge_model_variables:
            self._jax_state = dict(zip([k for k, asked in kinds.items() if asked], state))
            self._purge_model_variables(**kinds)
        return state

    get_jax_state.keeps_state_on_failure = True
    trainer._get_jax_state = get_jax_state
    for name in ("evaluate", "predict"):
        setattr(trainer, name, _restoring_on_failure(getattr(trainer, name)))


def _restoring_on_failure(method):
    """`method` of the JAX trainer that puts the model's state back when it raises."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            if getattr(self, "_jax_state", None) and not getattr(self, "_jax_state_synced", True):
                self.jax_state_sync()
            self._jax_state = None
            raise

    return run


def unscale_loss_for_distribution(value):
    """A loss term as one replica would report it, for a metric (Keras scales the
    loss it differentiates by the number of replicas under a distribution strategy)."""
    return loss_module.unscale_loss_for_distribution(value)


def layers_of(model, recursive=True):
    """The layers of `model`, in order, without `model` itself.

    With `recursive`, the layers of nested models (and of layers holding
    layers) follow their container, as `Model._flatten_layers` lists them.
    """
    return list(model._flatten_layers(include_self=False, recursive=recursive))


def is_functional(model):
    """Whether `model` is a Functional model (what `keras.Model(inputs, outputs)` builds)."""
    return isinstance(model, Functional)


def keras_layer_package(cls):
    """The `keras.layers` subpackage that defines `cls` (e.g. "reshaping").

    None for a class that Keras's layers package does not define.
    """
    parts = cls.__module__.split(".")
    if parts[:3] == ["keras", "src", "layers"] and len(parts) > 3:
        return parts[3]
    return None


def producer_node(tensor):
    """The graph node that produced a symbolic Keras tensor."""
    history = tensor._keras_history
    return history.operation._inbound_nodes[history.node_index]


def producer_name(tensor):
    """The name of the layer that produced a symbolic Keras tensor."""
    return tensor._keras_history.operation.name


def functional_graph(model):
    """The Functional graph of a built Sequential or Functional model.

    A Sequential model keeps one privately once built with a known input;
    its nodes are what `Functional._nodes_by_depth` lists.
    """
    if isinstance(model, keras.Sequential):
        graph = model._functional
        if graph is None:
            raise ValueError(
                f"Sequential model '{model.name}' has no graph: build it with an "
                "input, keras.Sequential([keras.Input(shape), ...])."
            )
        return graph
    return model

