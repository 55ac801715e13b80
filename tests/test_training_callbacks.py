"""Callbacks for trainings that last (`tf_transform_conv.training.callbacks`)."""

import json

import keras
import numpy as np
import pytest

from tf_transform_conv.training.callbacks import AtomicBackupAndRestore
from tf_transform_conv.training.callbacks import SaveCheckpoint
from tf_transform_conv.training.callbacks import TrainClock
from tf_transform_conv.training.callbacks import read_backup


def small_model():
    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    m.compile(optimizer="sgd", loss="mse")
    return m


def test_backup_survives_a_kill_while_writing(tmp_path):
    """A half-written newer weights file is ignored: the committed backup is restored."""
    model = small_model

    saved = model()
    clock = TrainClock(before=100.0)  # seconds of earlier processes
    backup = AtomicBackupAndRestore(backup_dir=str(tmp_path), clock=clock)
    backup.set_model(saved)
    clock.start()
    backup.on_epoch_end(0)  # commits epoch 1
    (tmp_path / "epoch-2-batch-0.weights.h5").write_bytes(b"\x89HDF")  # killed mid-write
    committed = read_backup(tmp_path)
    assert committed["epoch"] == 1 and committed["train_seconds"] >= 100.0

    restored = model()
    restore = AtomicBackupAndRestore(backup_dir=str(tmp_path))
    restore.set_model(restored)
    restore.on_train_begin()
    assert restored._initial_epoch == 1
    for a, b in zip(saved.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(a, b)
    backup.on_epoch_end(1)  # the next commit replaces the stray file
    assert sorted(p.name for p in tmp_path.glob("*.weights.h5")) == ["epoch-2-batch-0.weights.h5"]
    assert read_backup(tmp_path)["epoch"] == 2


def test_fit_continues_from_the_backup(tmp_path):
    """A fit stopped after 2 of 4 epochs, then restarted, trains epochs 3 and 4 only."""
    x, y = np.ones((8, 3), "float32"), np.zeros((8, 2), "float32")

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    first = small_model()
    with pytest.raises(KeyboardInterrupt):
        first.fit(x, y, epochs=4, verbose=0,
                  callbacks=[AtomicBackupAndRestore(tmp_path), Stop()])
    assert read_backup(tmp_path)["epoch"] == 2
    again = small_model()
    history = again.fit(x, y, epochs=4, verbose=0, callbacks=[AtomicBackupAndRestore(tmp_path)])
    assert history.epoch == [2, 3]
    assert read_backup(tmp_path) is None  # a finished fit deletes its backup


def test_a_backup_of_keras_own_callback_reads_without_seconds(tmp_path):
    (tmp_path / "training_metadata.json").write_text(json.dumps({"epoch": 3, "batch": 0}))
    assert read_backup(tmp_path) == {"epoch": 3, "batch": 0, "train_seconds": 0.0}
    assert read_backup(tmp_path / "missing") is None


def test_checkpoint_saves_the_given_model_and_the_clock(tmp_path):
    trained = small_model()
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="inner")])
    clock = TrainClock(before=5.0)
    trained.fit(np.ones((4, 3)), np.zeros((4, 2)), epochs=2, verbose=0,
                callbacks=[SaveCheckpoint(tmp_path / "ckpt", inner, clock)])
    again = keras.saving.load_model(tmp_path / "ckpt" / "last.keras")
    assert [layer.name for layer in again.layers] == ["inner"]
    meta = json.loads((tmp_path / "ckpt" / "last.json").read_text())
    assert meta["epoch"] == 2 and meta["train_seconds"] >= 5.0
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.json", "last.keras"]
    with pytest.raises(ValueError, match="Expected a keras.Model"):
        SaveCheckpoint(tmp_path, "model.keras")


def test_clock_adds_the_seconds_before():
    clock = TrainClock(before=2.5)
    assert clock.seconds() == 2.5
    clock.start()
    first = clock.started
    clock.start()  # once
    assert clock.started == first and clock.seconds() >= 2.5
    with pytest.raises(ValueError, match="before"):
        TrainClock(before=-1)
