"""Callbacks for trainings that last: a backup a kill cannot corrupt, a checkpoint, a clock.

A long training is killed sooner or later (a preempted machine, a time
limit). `AtomicBackupAndRestore` is Keras's `BackupAndRestore` with a
backup that is always complete: a restart continues from the last epoch
saved. `SaveCheckpoint` writes the model being trained (the student of a
distiller, say) as a `.keras` file to reuse after every epoch, and
`TrainClock` counts the seconds of training across restarts, which both
record.
"""

import json
import os
import pathlib
import time

import keras

from tf_transform_conv.training.files import write_json_atomic

__all__ = ["AtomicBackupAndRestore", "SaveCheckpoint", "TrainClock", "read_backup"]

METADATA = "training_metadata.json"


class TrainClock:
    """Seconds of training across restarts: those before this process, plus its own.

    Args:
        before: float >= 0, the seconds earlier processes trained (what a
            backup recorded, see `read_backup`). Defaults to 0.

    Example:

    >>> clock = TrainClock(before=100.0)
    >>> clock.seconds()  # not started: only the earlier seconds
    100.0
    >>> clock.start()
    >>> clock.seconds() >= 100.0
    True
    """

    def __init__(self, before=0.0):
        self.before = float(before)
        if self.before < 0:
            raise ValueError(
                f"Invalid value for argument `before`. Expected a number >= 0. "
                f"Received before={before!r}."
            )
        self.started = None

    def start(self):
        """Starts counting this process's seconds (once; later calls change nothing)."""
        if self.started is None:
            self.started = time.perf_counter()

    def seconds(self):
        """The training seconds so far: `before` plus the time since `start`."""
        running = 0.0 if self.started is None else time.perf_counter() - self.started
        return self.before + running


def read_backup(backup_dir):
    """The metadata of the backup `AtomicBackupAndRestore` committed in `backup_dir`, or None.

    Args:
        backup_dir: a `pathlib.Path` or string, the callback's `backup_dir`.

    Returns:
        None when the folder holds no committed backup, else a dict with
        `epoch` (int, the epochs completed), `batch`, `weights` (the name of
        the weights file in `backup_dir`) and `train_seconds` (float, 0 for
        a backup written without a clock, e.g. by Keras's own
        `BackupAndRestore`).
    """
    path = pathlib.Path(backup_dir) / METADATA
    if not path.is_file():
        return None
    backup = json.loads(path.read_text())
    backup["epoch"] = int(backup["epoch"])
    backup.setdefault("train_seconds", 0.0)
    return backup


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` whose backup a kill never leaves half-written.

    Keras 3.15 writes the weights, then `training_metadata.json`, in place: a
    process killed inside the second write leaves an empty JSON file, on which
    the restart fails (`json.JSONDecodeError`), and one killed between the two
    pairs new weights with the previous epoch count (the epoch would run
    twice). Here each backup's weights go to a new file named by its epoch,
    then the metadata, naming that file, replaces the old atomically
    (`write_json_atomic`): it is the commit point, and a restart always finds
    a complete, matching pair. Older weight files are deleted after the
    commit. The metadata also records `clock`'s training seconds, for a
    restart to count on from (`read_backup`).

    As with Keras's callback, a `fit` that ends normally deletes the backup
    (`delete_checkpoint=True`), and the model must be built before `fit`.

    Args:
        backup_dir: a string, the folder of the backup (one per worker under
            a multi-worker strategy).
        clock: a `TrainClock`, started with training if it is not yet; by
            default a new one counting from 0.
        **kwargs: `keras.callbacks.BackupAndRestore` arguments
            (`save_freq`, `delete_checkpoint`).

    Example:

    >>> import keras, numpy as np, tempfile
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> folder = tempfile.mkdtemp()
    >>> backup = AtomicBackupAndRestore(folder, delete_checkpoint=False)
    >>> _ = model.fit(np.zeros((4, 3)), np.zeros(4), epochs=2, callbacks=[backup], verbose=0)
    >>> read_backup(folder)["epoch"]
    2
    """

    def __init__(self, backup_dir, clock=None, **kwargs):
        super().__init__(backup_dir=os.fspath(backup_dir), **kwargs)
        self.clock = TrainClock() if clock is None else clock

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.clock.start()

    def _save_model(self):
        folder = pathlib.Path(self.backup_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{self._current_epoch}-batch-{self._last_batch_seen}.weights.h5"
        self.model.save_weights(str(folder / name), overwrite=True)
        write_json_atomic(pathlib.Path(self._training_metadata_path), {
            "epoch": self._current_epoch, "batch": self._last_batch_seen, "weights": name,
            "train_seconds": self.clock.seconds()})
        for old in folder.glob("*.weights.h5"):
            if old.name != name:
                old.unlink()

    def _load_model(self):
        backup = read_backup(self.backup_dir)
        if backup is None:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(str(pathlib.Path(self.backup_dir) / backup["weights"]))
        self.model._initial_epoch = backup["epoch"]


class SaveCheckpoint(keras.callbacks.Callback):
    """Saves `model` to `folder/last.keras` after every epoch, with the epoch and training seconds.

    `last.keras` is the model to reuse (to evaluate, fine-tune, distil
    from); `last.json` holds `{"epoch": epochs completed, "train_seconds":
    clock's seconds}`. Both are replaced atomically (a temporary file, then
    a rename), so a kill leaves the previous epoch's pair. The model saved
    is `model`, not necessarily the one `fit` trains: pass the student of a
    distiller, or a pruning-wrapped model. For a restart, the backup of
    `AtomicBackupAndRestore` is what counts.

    Args:
        folder: a `pathlib.Path` or string, created if missing.
        model: the `keras.Model` to save.
        clock: a `TrainClock`; by default a new one, started with
            training.

    Example:

    >>> import keras, numpy as np, pathlib, tempfile
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> checkpoint = SaveCheckpoint(folder, model)
    >>> _ = model.fit(np.zeros((4, 3)), np.zeros(4), epochs=2, callbacks=[checkpoint], verbose=0)
    >>> sorted(p.name for p in folder.iterdir())
    ['last.json', 'last.keras']
    """

    def __init__(self, folder, model, clock=None):
        super().__init__()
        if not isinstance(model, keras.Model):
            raise ValueError(
                "Invalid value for argument `model`. Expected a keras.Model. "
                f"Received {type(model).__name__}."
            )
        self.folder = pathlib.Path(folder)
        self.target = model
        self.clock = TrainClock() if clock is None else clock

    def on_train_begin(self, logs=None):
        self.clock.start()

    def on_epoch_end(self, epoch, logs=None):
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "last.tmp.keras"
        self.target.save(tmp)
        os.replace(tmp, self.folder / "last.keras")
        write_json_atomic(self.folder / "last.json",
                          {"epoch": epoch + 1, "train_seconds": self.clock.seconds()})
