"""The run folder of a restarting training (`training.runs`); atomic JSON (`training.files`)."""

import json
import stat

import keras
import pytest

from tf_transform_conv.training.callbacks import AtomicBackupAndRestore
from tf_transform_conv.training.callbacks import SaveCheckpoint
from tf_transform_conv.training.callbacks import TrainClock
from tf_transform_conv.training.files import write_json_atomic
from tf_transform_conv.training.runs import RUN_OUTPUTS
from tf_transform_conv.training.runs import finished_run
from tf_transform_conv.training.runs import run_callbacks
from tf_transform_conv.training.runs import run_folder
from tf_transform_conv.training.runs import start_over
from tf_transform_conv.training.runs import trim_csv


def test_fresh_deletes_the_run_outputs_only(tmp_path):
    backup = tmp_path / "backup"
    for name in RUN_OUTPUTS:
        path = tmp_path / name
        if "." in name:
            path.write_text("x")
        else:
            (path / "inner").mkdir(parents=True)
    (backup / "x").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    start_over(tmp_path, backup, chief=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_non_chief_deletes_only_its_backup(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "backup-worker-1").mkdir()
    start_over(tmp_path, tmp_path / "backup-worker-1", chief=False)
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_json_outputs_get_the_mode_of_other_files(tmp_path):
    """Not 0600 as a bare temporary file: what open() gives under the umask."""
    (tmp_path / "probe").write_text("")
    write_json_atomic(tmp_path / "results.json", {"a": 1})
    mode = stat.S_IMODE((tmp_path / "results.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "probe").stat().st_mode)
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe", "results.json"]


def test_a_failed_json_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"a": 1})

    class Unwritable:
        def __str__(self):
            raise RuntimeError("cannot")

    with pytest.raises(RuntimeError, match="cannot"):
        write_json_atomic(path, {"b": Unwritable()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_finished_run_says_why_or_nothing(tmp_path):
    backup = tmp_path / "backup"
    assert finished_run(tmp_path, backup) is None
    (tmp_path / "results.json").write_text(json.dumps({"finished": False}))
    assert finished_run(tmp_path, backup) is None  # an interrupted run's results
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "last.json").write_text('{"epoch": 3}')
    assert "holds a model trained for 3 epochs" in finished_run(tmp_path, backup)
    backup.mkdir()
    (backup / "training_metadata.json").write_text('{"epoch": 2, "weights": "w.h5"}')
    assert finished_run(tmp_path, backup) is None  # a backup to continue from
    (tmp_path / "results.json").write_text(json.dumps(
        {"finished": True, "mode": "prune", "epochs": 3, "test_accuracy": 0.5}))
    assert finished_run(tmp_path, backup).startswith(
        f"{tmp_path} holds a finished run (prune, 3 epochs, test accuracy 0.5000")


def test_run_folder_keeps_what_it_found_and_what_was_saved(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with run_folder(kept, kept / "backup", chief=True):
            (kept / "converted.keras").write_text("partial")
            raise RuntimeError
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]
    # Once an epoch is saved, a failure leaves everything for the restart.
    saved = tmp_path / "saved"
    with pytest.raises(RuntimeError):
        with run_folder(saved, saved / "backup", chief=True):
            (saved / "ckpt").mkdir()
            (saved / "ckpt" / "last.json").write_text('{"epoch": 1}')
            raise RuntimeError
    assert (saved / "ckpt" / "last.json").is_file()
    # A non-chief removes nothing.
    other = tmp_path / "other"
    with pytest.raises(RuntimeError):
        with run_folder(other, other / "backup-worker-1", chief=False):
            raise RuntimeError
    assert other.is_dir()


def test_trim_csv_drops_rows_after_the_backup(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,loss\n0,1.0\n1,0.9\n2,0.8\n")
    trim_csv(path, 2)
    assert path.read_text().splitlines() == ["epoch,loss", "0,1.0", "1,0.9"]
    trim_csv(tmp_path / "missing.csv", 0)  # nothing to do
    (tmp_path / "empty.csv").write_text("")
    trim_csv(tmp_path / "empty.csv", 0)


def test_run_callbacks_back_up_before_the_others_and_checkpoint_last(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    middle = keras.callbacks.Callback()
    clock = TrainClock()
    chief = run_callbacks(tmp_path, model, tmp_path / "backup", clock, between=[middle])
    assert [type(c).__name__ for c in chief] == [
        "CSVLogger", "TensorBoard", "AtomicBackupAndRestore", "Callback", "SaveCheckpoint"]
    assert chief[2].clock is clock and chief[4].target is model and chief[3] is middle
    worker = run_callbacks(tmp_path, model, tmp_path / "backup-worker-1", clock, chief=False)
    assert [type(c) for c in worker] == [AtomicBackupAndRestore]
    assert not any(isinstance(c, SaveCheckpoint) for c in worker)
