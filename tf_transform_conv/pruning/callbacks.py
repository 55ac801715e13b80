"""The pruning callbacks: `UpdateTransformPruningStep` drives the wrappers, `TransformPruningSummaries` logs them.

`UpdatePruningStep` and `PruningSummaries` are the same callbacks under
tfmot's names, `UpdatePruningStep` numbering the batches as tfmot does.
"""

import keras
import numpy as np

from tf_transform_conv._checks import check_positive_int
from tf_transform_conv.pruning.step import advance
from tf_transform_conv.pruning.step import pruning_wrappers
from tf_transform_conv.pruning.step import step_decisions
from tf_transform_conv.pruning.step import taylor_scores
from tf_transform_conv.recalibrate import recalibrate_batch_norm

__all__ = [
    "PruningSummaries",
    "TransformPruningSummaries",
    "UpdatePruningStep",
    "UpdateTransformPruningStep",
]


class UpdateTransformPruningStep(keras.callbacks.Callback):
    """Advances the pruning step before each training batch, like tfmot's `UpdatePruningStep`.

    The step continues from the wrappers' saved `pruning_step`, so a resumed
    run picks up where it stopped.

    Args:
        saliency_data: labelled data (`(x, y)` arrays, a dataset, or batches)
            for wrappers with `criterion="taylor"`: at each pruning step their
            saliencies are accumulated over `saliency_batches` batches of it
            (`taylor_scores`). Required when a wrapper needs it.
        saliency_batches: int, defaults to 4.
        recalibrate_data: optional training inputs: after each pruning step
            the batch-norm statistics are re-estimated from
            `recalibrate_batches` batches of them
            (`recalibrate.recalibrate_batch_norm`).
        recalibrate_batches: int, defaults to 20.
    """

    def __init__(self, saliency_data=None, saliency_batches=4, recalibrate_data=None,
                 recalibrate_batches=20):
        super().__init__()
        self.saliency_data = saliency_data
        self.saliency_batches = check_positive_int(
            saliency_batches, "saliency_batches", expected="a positive int"
        )
        self.recalibrate_data = recalibrate_data
        self.recalibrate_batches = check_positive_int(
            recalibrate_batches, "recalibrate_batches", expected="a positive int"
        )

    def on_train_begin(self, logs=None):
        self._wrappers = pruning_wrappers(self.model)
        if not self._wrappers:
            raise ValueError(
                "UpdateTransformPruningStep found no pruning wrapper in "
                "the model; wrap it with tf_transform_conv.prune_model first "
                "(or prune_low_magnitude / prune_interspace)."
            )
        taylor = [w.name for w in self._wrappers if w.criterion == "taylor"]
        if taylor and self.saliency_data is None:
            raise ValueError(
                f"Wrappers {taylor} rank filters by their Taylor saliency: pass "
                "UpdateTransformPruningStep(saliency_data=(x, y)) (a few batches of "
                "training data)."
            )
        for wrapper in self._wrappers:
            wrapper.step_callback_attached = True
        self.step = max(int(np.asarray(w.pruning_step)) for w in self._wrappers)
        # A fresh training function: one whose tracing failed before (a fit without
        # this callback) cannot be traced again on TensorFlow ("Creating variables
        # on a non-first call to a function decorated with tf.function").
        self.model.make_train_function(force=True)

    def on_train_batch_begin(self, batch, logs=None):
        self.step += 1
        decisions = step_decisions(self._wrappers, self.step)
        due = [w for w, (should_prune, _) in zip(self._wrappers, decisions) if should_prune]
        if keras.backend.backend() == "jax":
            # JAX's fit keeps the variables outside the model between syncs
            # (the model's own are emptied): hand them back only to prune, or
            # to record the step at the last batch of an epoch.
            last = batch + 1 == (self.params or {}).get("steps")
            if not (due or last):
                return
            self.model.jax_state_sync()
        scores = {}
        if any(w.criterion == "taylor" for w in due):
            scores = taylor_scores(self.model, self.saliency_data, self.saliency_batches)
        pruned = advance(self._wrappers, self.step, scores, decisions)
        if pruned and self.recalibrate_data is not None:
            recalibrate_batch_norm(self.model, self.recalibrate_data, self.recalibrate_batches)
        if pruned and keras.backend.backend() == "jax":
            # A traced JAX step holds the masks as constants (pruning.magnitude).
            self.model.make_train_function(force=True)

    def on_epoch_end(self, epoch, logs=None):
        if keras.backend.backend() == "jax":  # the variables are synced here
            for wrapper in self._wrappers:
                wrapper.pruning_step.assign(self.step)

    def on_train_end(self, logs=None):
        for wrapper in self._wrappers:
            wrapper.step_callback_attached = False
        # A later fit without this callback must retrace (and so fail loudly).
        self.model.train_function = None


class TransformPruningSummaries(keras.callbacks.Callback):
    """Writes each wrapper's sparsity and reconstruction error to TensorBoard.

    Args:
        log_dir: the TensorBoard log directory.
        update_freq: `"epoch"` (default) or a number of batches.
    """

    def __init__(self, log_dir, update_freq="epoch"):
        super().__init__()
        if update_freq != "epoch" and not (
            isinstance(update_freq, int) and update_freq > 0
        ):
            raise ValueError(
                "Expected update_freq='epoch' or a positive number of batches. "
                f"Received update_freq={update_freq!r}."
            )
        self.log_dir = log_dir
        self.update_freq = update_freq
        self._writer = None

    def _write(self):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            for wrapper in pruning_wrappers(self.model):
                step = int(np.asarray(wrapper.pruning_step))
                for name, value in wrapper.summary_scalars().items():
                    tf.summary.scalar(f"{wrapper.name}/{name}", value, step=step)
        self._writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        if self.update_freq != "epoch" and (batch + 1) % self.update_freq == 0:
            if keras.backend.backend() == "jax":  # the variables are outside the model
                self.model.jax_state_sync()
            self._write()

    def on_epoch_end(self, epoch, logs=None):
        if self.update_freq == "epoch":
            self._write()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class UpdatePruningStep(UpdateTransformPruningStep):
    """tfmot's `UpdatePruningStep`: `UpdateTransformPruningStep`, the first batch numbered 1.

    tfmot's callback sets a fresh wrapper's step to 0 when training begins,
    and the wrapper counts each training batch from there, so the first
    batch is step 1 (`UpdateTransformPruningStep` numbers it 0). The same
    schedule then prunes at the same batches as in tfmot, and an M-by-N
    wrapper (`sparsity_m_by_n`) makes its mask at the first batch. A
    resumed run continues from the saved step.
    """

    def __init__(self):
        super().__init__()

    def on_train_begin(self, logs=None):
        for wrapper in pruning_wrappers(self.model):
            if int(np.asarray(wrapper.pruning_step)) < 0:
                wrapper.pruning_step.assign(0)
        super().on_train_begin(logs)


class PruningSummaries(TransformPruningSummaries):
    """tfmot's `PruningSummaries`: each wrapper's sparsity written to TensorBoard.

    `TransformPruningSummaries` under tfmot's name and arguments: the
    scalars are `{wrapper}/sparsity` (tfmot's are named after its mask and
    threshold variables; this package keeps no threshold).

    Args:
        log_dir: a non-empty string, the TensorBoard log directory.
        update_freq: `"epoch"` (default) or a number of batches.
    """

    def __init__(self, log_dir, update_freq="epoch"):
        if not isinstance(log_dir, str) or not log_dir:
            raise ValueError(
                "Invalid value for argument `log_dir`. Expected a non-empty string. "
                f"Received log_dir={log_dir!r}.")
        super().__init__(log_dir, update_freq=update_freq)
