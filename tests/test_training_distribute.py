"""`tf.distribute` helpers of the training recipes (`tf_transform_conv.training.distribute`).

Mirrored and multi-worker training run end to end in test_train.py (subprocesses).
"""

import pytest
import tensorflow as tf

from tf_transform_conv.training import distribute


def test_default_strategy_is_the_chief():
    strategy = distribute.make_strategy("default")
    assert strategy is tf.distribute.get_strategy()
    assert distribute.is_chief(strategy)
    distribute.configure_cpu_devices(0)  # nothing to do


class Resolver:
    def __init__(self, task_type, task_id, cluster):
        self.task_type, self.task_id, self.cluster = task_type, task_id, cluster

    def cluster_spec(self):
        return tf.train.ClusterSpec(self.cluster)


class Strategy:
    def __init__(self, resolver):
        self.cluster_resolver = resolver


@pytest.mark.parametrize("task_type, task_id, cluster, chief", [
    ("worker", 0, {"worker": ["a:1", "b:1"]}, True),
    ("worker", 1, {"worker": ["a:1", "b:1"]}, False),
    ("chief", 0, {"chief": ["c:1"], "worker": ["a:1"]}, True),
    ("worker", 0, {"chief": ["c:1"], "worker": ["a:1"]}, False),
])
def test_the_chief_is_the_chief_task_or_worker_0(task_type, task_id, cluster, chief):
    assert distribute.is_chief(Strategy(Resolver(task_type, task_id, cluster))) is chief


def test_patching_twice_changes_nothing():
    from keras.src.backend.tensorflow import trainer

    distribute.patch_keras_for_multiworker()
    patched = trainer.reduce_per_replica
    distribute.patch_keras_for_multiworker()
    assert trainer.reduce_per_replica is patched and trainer.patched_for_multiworker


def test_bad_strategy_name():
    with pytest.raises(ValueError, match=r"`name`.*Received name='tpu'"):
        distribute.make_strategy("tpu")
