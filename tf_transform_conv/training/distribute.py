"""`tf.distribute` for the training recipes: devices, the strategy, which worker writes.

`configure_cpu_devices` splits the CPU into logical devices (to try
`MirroredStrategy` without GPUs), `make_strategy` builds the strategy by
name (patching Keras for multi-worker training, see
`patch_keras_for_multiworker`), and `is_chief` says whether this worker
writes the run folder. TensorFlow only: these import it.
"""

import warnings

import keras
import tensorflow as tf
from keras.src.backend.tensorflow import trainer  # private: what the multi-worker patch fixes

__all__ = ["STRATEGIES", "configure_cpu_devices", "is_chief", "make_strategy",
           "patch_keras_for_multiworker"]

STRATEGIES = ("default", "mirrored", "multiworker")


def configure_cpu_devices(count):
    """Splits the first CPU into `count` logical devices, before TensorFlow starts its devices.

    Args:
        count: int, the logical devices; below 1 changes nothing.

    Raises:
        RuntimeError: when TensorFlow has already started its devices in
            this process (any TensorFlow computation starts them): the
            message says to call this first, in a fresh process.
    """
    if count < 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError as error:
        raise RuntimeError(
            f"Cannot split the CPU into {count} logical devices: TensorFlow has already "
            f"started its devices in this process ({error}); do it first, in a fresh process."
        ) from None


def make_strategy(name):
    """The `tf.distribute` strategy called `name`.

    Args:
        name: `"default"` (the current strategy: one device),
            `"mirrored"` (`MirroredStrategy` over the GPUs, or over the
            logical CPU devices when there is no GPU) or `"multiworker"`
            (`MultiWorkerMirroredStrategy`, which reads the cluster from
            `TF_CONFIG`; Keras is patched for it, see
            `patch_keras_for_multiworker`).

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ValueError: for another `name`.
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"Invalid value for argument `name`. Expected one of {list(STRATEGIES)}. "
            f"Received name={name!r}."
        )
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        patch_keras_for_multiworker()
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def patch_keras_for_multiworker():
    """Works around two Keras 3 bugs that stop `fit` under MultiWorkerMirroredStrategy.

    Both are in `keras.src.backend.tensorflow.trainer` and only hit with
    several workers (keras-team/keras#20585); with one worker, or
    MirroredStrategy, Keras takes other paths and this changes nothing.
    Patching twice changes nothing either; a Keras whose trainer lacks what
    is patched gets a warning and no patch.

    1. Before training, Keras builds the model from one batch and first
       `strategy.reduce`s the whole `(x, y)` tuple of per-replica tensors,
       which fails across workers ("Attempt to convert a value (PerReplica...)
       ... to a Tensor"). The batch serves only for its shapes and dtypes: this
       worker's own batch is passed instead.
    2. Each step averages the replicas' metric results (scalars) with
       `strategy.reduce("MEAN", v, axis=0)`, a mean over the batch axis too,
       which scalars lack ("Invalid reduction dimension 0 for input with 0
       dimensions"). The mean across replicas, `axis=None`, is what is meant.
    """
    if getattr(trainer, "patched_for_multiworker", False):
        return
    missing = [name for name in ("reduce_per_replica", "_collective_all_reduce_multi_worker")
               if not hasattr(trainer, name)]
    if missing or not hasattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build"):
        warnings.warn(f"Keras {keras.__version__} differs from the one patched for "
                      "multi-worker training; training may fail")
        return

    symbolic_build = trainer.TensorFlowTrainer._maybe_symbolic_build

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and self._distribute_strategy is not None:
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(
                    lambda v: v.values[0] if isinstance(v, tf.distribute.DistributedValues)
                    else v, next(batches))
                break
            iterator = None
        return symbolic_build(self, iterator=iterator, data_batch=data_batch)

    reduce_per_replica = trainer.reduce_per_replica

    def reduce_across_replicas(values, strategy, reduction):
        if (reduction in ("auto", "mean")
                and trainer._collective_all_reduce_multi_worker(strategy)):
            return keras.tree.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return reduce_per_replica(values, strategy, reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer.reduce_per_replica = reduce_across_replicas
    trainer.patched_for_multiworker = True


def is_chief(strategy):
    """Whether this worker writes the run folder: always, except multi-worker non-chiefs.

    The chief is the task of type `"chief"`, or worker 0 of a cluster
    without one.

    Args:
        strategy: a `tf.distribute.Strategy`.

    Returns:
        bool.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in ("chief", None) or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )
