"""The run folder of a training that restarts: what is in it, when it is finished, starting over.

A run folder holds everything one training writes (`RUN_OUTPUTS`): the
checkpoint `ckpt/last.keras` and `ckpt/last.json` (`SaveCheckpoint`), the
CSV and TensorBoard logs, `results.json` (with `"finished": true` once the
last epoch is evaluated), `final.keras`, `model.tflite`, and for a
conversion `converted.keras` / `converted.json`; beside them the backup
folder (`AtomicBackupAndRestore`) that a restart continues from. The
functions here answer the questions a restart asks: is the run finished
(`finished_run`), start over (`start_over`), clean up after a start that
failed (`run_folder`), drop the log rows of epochs the backup does not hold
(`trim_csv`), and `run_callbacks` lists the callbacks that fill it, in the
order that makes a restart exact.
"""

import contextlib
import csv
import json
import pathlib
import shutil

import keras

from tf_transform_conv.training.callbacks import AtomicBackupAndRestore
from tf_transform_conv.training.callbacks import SaveCheckpoint
from tf_transform_conv.training.callbacks import read_backup

__all__ = ["RUN_OUTPUTS", "finished_run", "remove_path", "run_callbacks", "run_folder",
           "start_over", "trim_csv"]

# What a run writes into its folder, besides the backups: what `start_over` deletes.
RUN_OUTPUTS = ("ckpt", "converted.keras", "converted.json", "final.keras", "model.tflite",
               "results.json", "log.csv", "tensorboard")


def remove_path(path):
    """Deletes `path`: a folder with its contents, a file or a link; nothing if it is missing.

    A link to a folder is removed as a link, leaving the folder it points to.

    Args:
        path: a `pathlib.Path`.
    """
    path = pathlib.Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def finished_run(run_dir, backup_dir):
    """Why restarting in `run_dir` would train from scratch over a finished run, or None.

    A run is finished when its `results.json` says so. A checkpoint
    (`ckpt/last.json`) without a backup to continue from is a training that
    ended (Keras deletes the backup then) but was stopped before writing
    `results.json`: restarting would not continue it either.

    Args:
        run_dir: a `pathlib.Path`, the run folder.
        backup_dir: a `pathlib.Path`, this worker's backup folder.

    Returns:
        A sentence naming `run_dir` and what it holds, or None when a start
        there trains anew or continues a backup.

    Example:

    >>> import json, pathlib, tempfile
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> finished_run(run, run / "backup") is None
    True
    >>> _ = (run / "results.json").write_text(json.dumps(
    ...     {"finished": True, "mode": "dense", "epochs": 3, "test_accuracy": 0.75}))
    >>> "holds a finished run (dense, 3 epochs, test accuracy 0.7500" in finished_run(
    ...     run, run / "backup")
    True
    """
    run_dir, backup_dir = pathlib.Path(run_dir), pathlib.Path(backup_dir)
    results = run_dir / "results.json"
    if results.is_file():
        done = json.loads(results.read_text())
        if done.get("finished"):
            return (f"{run_dir} holds a finished run ({done.get('mode')}, {done.get('epochs')} "
                    f"epochs, test accuracy {done.get('test_accuracy', float('nan')):.4f}; "
                    "see its results.json)")
    checkpoint = run_dir / "ckpt" / "last.json"
    if read_backup(backup_dir) is None and checkpoint.is_file():
        epochs = json.loads(checkpoint.read_text()).get("epoch")
        return (f"{run_dir} holds a model trained for {epochs} epochs (ckpt/last.keras) "
                "but no backup to continue from and no finished results.json")
    return None


def start_over(run_dir, backup_dir, chief):
    """Deletes this worker's backup and, on the chief, the run's outputs (`RUN_OUTPUTS`).

    Anything else in `run_dir` (notes, other files) stays.

    Args:
        run_dir: a `pathlib.Path`, the run folder.
        backup_dir: a `pathlib.Path`, this worker's backup folder.
        chief: bool, whether this worker writes the run folder (the only
            one under a single-worker strategy).
    """
    run_dir = pathlib.Path(run_dir)
    remove_path(backup_dir)
    if chief:
        for name in RUN_OUTPUTS:
            remove_path(run_dir / name)


@contextlib.contextmanager
def run_folder(run_dir, backup_dir, chief):
    """Creates `run_dir`; a start that fails before saving an epoch removes what it added.

    The folder is left as this start found it (gone, if it did not exist),
    so that a later run there does not find, say, a `converted.keras` made
    with other arguments. Once an epoch is saved (a backup in
    `backup_dir`, or `ckpt/last.json`) everything stays, for a restart to
    continue. The exception propagates either way.

    Args:
        run_dir: a `pathlib.Path`, the run folder.
        backup_dir: a `pathlib.Path`, this worker's backup folder.
        chief: bool, whether this worker writes the run folder; other
            workers never delete anything.

    Example:

    >>> import pathlib, tempfile
    >>> run = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> try:
    ...     with run_folder(run, run / "backup", chief=True):
    ...         _ = (run / "converted.keras").write_text("partial")
    ...         raise RuntimeError("failed before the first epoch")
    ... except RuntimeError:
    ...     pass
    >>> run.exists()
    False
    """
    run_dir, backup_dir = pathlib.Path(run_dir), pathlib.Path(backup_dir)
    found = set(run_dir.iterdir()) if run_dir.is_dir() else None
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield run_dir
    except BaseException:
        saved = read_backup(backup_dir) is not None or (run_dir / "ckpt" / "last.json").is_file()
        if chief and not saved:
            for path in run_dir.iterdir():
                if found is None or path not in found:
                    remove_path(path)
            if found is None:
                run_dir.rmdir()
        raise


def trim_csv(path, epochs_done):
    """Drops the rows of a `keras.callbacks.CSVLogger` file for epochs from `epochs_done` on.

    At the end of an epoch the CSV row is written before the backup: a kill
    in between leaves a row of an epoch the restart will run again. Nothing
    happens when the file is missing or empty.

    Args:
        path: a `pathlib.Path`, the CSV file (its first column the epoch).
        epochs_done: int, the epochs the backup holds (rows `0 ..
            epochs_done - 1` stay).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < epochs_done]
    if len(kept) != len(rows):
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(kept)


def run_callbacks(run_dir, model, backup_dir, clock, chief=True, between=()):
    """The callbacks that log, back up and checkpoint a training into its run folder.

    In this order: `CSVLogger` (`log.csv`, appended to across restarts) and
    `TensorBoard` (`tensorboard/`), then `AtomicBackupAndRestore` into
    `backup_dir`, then `between`, then `SaveCheckpoint` of `model` into
    `ckpt/`. The order matters: at the end of an epoch the CSV row is
    written before the backup, so a kill in between repeats a row, which
    `trim_csv` drops on restart (the other order would lose it); at the
    start the backup is restored before the callbacks of `between` (a
    pruning step callback, say) read the restored state. Non-chief workers
    only back up.

    Args:
        run_dir: a `pathlib.Path`, the run folder.
        model: the `keras.Model` to checkpoint (the student of a
            distiller, the pruning-wrapped model, ...).
        backup_dir: a `pathlib.Path`, this worker's backup folder.
        clock: a `TrainClock`, carried from the backup across restarts.
        chief: bool, whether this worker writes the run folder. Defaults to
            True.
        between: callbacks to run after the backup is restored and before
            the checkpoint is written.

    Returns:
        A list of `keras.callbacks.Callback`, for `fit`.
    """
    run_dir = pathlib.Path(run_dir)
    callbacks = []
    if chief:
        callbacks += [keras.callbacks.CSVLogger(str(run_dir / "log.csv"), append=True),
                      keras.callbacks.TensorBoard(str(run_dir / "tensorboard"))]
    callbacks.append(AtomicBackupAndRestore(backup_dir=str(backup_dir), clock=clock))
    callbacks += list(between)
    if chief:
        callbacks.append(SaveCheckpoint(run_dir / "ckpt", model, clock))
    return callbacks
