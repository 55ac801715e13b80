"""Tests of `examples/train.py`: every mode, distillation, Mirrored, multi-worker, restarts.

The end-to-end runs (marked `slow`) train resnet20 for one epoch of a few
steps on digits or synthetic 32x32 images, without XLA, so each takes
seconds; the kill-and-restart, Mirrored and multi-worker runs go through
subprocesses (a SIGKILL, logical CPU devices that must be set before
TensorFlow starts, and one process per worker).
"""

import csv
import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import tf_transform_conv  # noqa: F401  (registers TransformConv2D for loading)

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train.py"
FAST = ["--batch-size", "16", "--no-jit-compile", "--verbose", "0"]


def load_train():
    """Imports the script by path: `examples/` is not a package."""
    spec = importlib.util.spec_from_file_location("train_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train():
    return load_train()


@pytest.fixture(scope="module")
def dense_run(train, tmp_path_factory):
    """One dense resnet20 epoch on digits, reused as the checkpoint of other modes."""
    run_dir = tmp_path_factory.mktemp("dense")
    results = train.main(["--dataset", "digits", "--mode", "dense", "--epochs", "1",
                          "--steps-per-epoch", "3", "--run-dir", str(run_dir), *FAST])
    return run_dir, results


def check_results(run_dir, epochs, mode):
    """results.json is complete, valid JSON, written atomically; returns it."""
    results = json.loads((run_dir / "results.json").read_text())
    assert not list(run_dir.glob("*.tmp")), "results.json was not written atomically"
    assert results["mode"] == mode
    assert results["epochs"] == results["epochs_requested"] == epochs
    assert results["finished"] is True
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert np.isfinite(results["test_loss"])
    assert results["params"] > 0 and results["macs"] > 0
    assert results["optimizer_steps"] == epochs * results["steps_per_epoch"]
    if results["tflite_skipped"] != "--no-tflite":  # export never fails silently
        assert results["tflite_bytes"] > 0 and results["tflite_skipped"] is None, results
    for name in ("log.csv", "ckpt/last.keras", "ckpt/last.json", "final.keras"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").rglob("*tfevents*"))
    return results


def csv_epochs(run_dir):
    with open(run_dir / "log.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def run_script(args, env=None, **kwargs):
    """Starts the script in a subprocess; `env` adds variables, `kwargs` go to Popen."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **kwargs}
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, **options)


def free_ports(count):
    """`count` distinct localhost ports free now (bound to port 0, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# ----------------------------------------------------------------------------
# Fast: arguments, data, schedule, distillation


def test_preset_defaults_and_overrides(train):
    args = train.parse_args(["--preset", "imagenet", "--batch-size", "512", "--epochs", "3"])
    assert (args.dataset, args.model, args.image_size) == ("imagenet2012", "resnet50", 224)
    assert args.epochs == 3 and args.lr == pytest.approx(0.2)  # 0.1 * 512 / 256
    args = train.parse_args(["--mode", "prune"])
    assert (args.dataset, args.model, args.scale) == ("cifar10", "resnet20", True)


def test_paper_presets_set_the_published_recipe(train):
    args = train.parse_args(["--preset", "paper-resnet56"])
    assert (args.mode, args.model, args.epochs, args.optimizer) == ("prune", "resnet56", 300, "sgd")
    assert (args.criterion, args.allocation, args.assign) == ("magnitude", "global", "modulo")
    assert (args.transform_family, args.depth_groups, args.min_bases) == ("scalar", 2, 8)
    assert args.prune_end == pytest.approx(40 / 300) and args.prune_power == 1.0
    assert args.rotation > 0 and args.prune_every_epoch
    assert train.parse_args(["--preset", "paper-vgg16"]).criterion == "taylor"
    args = train.parse_args(["--preset", "paper-resnet50", "--criterion", "taylor",
                             "--batch-size", "1024"])
    assert (args.optimizer, args.min_bases, args.mixup, args.cutmix) == ("adamw", 32, 0.1, 1.0)
    assert args.subtract_mean and args.criterion == "taylor"  # flags win
    assert args.lr == pytest.approx(1e-3)  # 5e-4 * 1024 / 512
    # The other presets keep their defaults.
    args = train.parse_args([])
    assert (args.mode, args.criterion, args.min_bases, args.transform_family) == \
        ("dense", "reconstruction", 1, "discrete")


def test_linear_steps_schedule(train):
    linear = train.WarmupSchedule(1.0, 300, 0, "linear-steps", [25 * k for k in range(1, 12)])
    rates = [float(linear(s)) for s in (0, 24, 25, 150, 299)]
    assert rates == pytest.approx([1.0, 1.0, 1 - 25 / 300, 0.5, 1 - 275 / 300])


def test_batch_augment_rotates_and_mixes(train):
    import tensorflow as tf

    args = train.parse_args(["--rotation", "15", "--mixup", "0.1", "--cutmix", "1.0"])
    augment = train.make_batch_augment(args)
    images = tf.random.uniform((8, 32, 32, 3))
    labels = tf.one_hot(tf.range(8) % 10, 10)
    out_images, out_labels = augment(images, labels)
    assert out_images.shape == images.shape and out_labels.shape == labels.shape
    np.testing.assert_allclose(np.sum(out_labels, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(out_images, images)
    assert train.make_batch_augment(train.parse_args([])) is None


def test_bad_arguments_exit_with_a_message(train, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--final-sparsity", "1.5"])
    assert "--final-sparsity" in capsys.readouterr().err


def test_imagenet_without_files_says_what_to_download(train, tmp_path):
    args = train.parse_args(["--preset", "imagenet", "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as error:
        train.load_tfds(args)
    message = str(error.value)
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert str(tmp_path / "downloads" / "manual") in message


def test_cifar_offline_says_what_to_download(train, tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds, "load", offline)
    args = train.parse_args(["--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as error:
        train.load_tfds(args)
    assert "cifar-10-binary.tar.gz" in str(error.value)
    assert str(tmp_path) in str(error.value)


def test_augmentations_keep_shapes(train):
    import tensorflow as tf

    image = tf.cast(tf.random.uniform((32, 32, 3), 0, 255), tf.uint8)
    assert train.cifar_train_augment(image).shape == (32, 32, 3)
    jpeg = tf.io.encode_jpeg(tf.cast(tf.random.uniform((300, 400, 3), 0, 255), tf.uint8))
    assert train.imagenet_train_crop(jpeg, 224).shape == (224, 224, 3)
    assert train.imagenet_eval_crop(jpeg, 224).shape == (224, 224, 3)


def test_schedule_warms_up_then_decays(train):
    cosine = train.WarmupSchedule(0.1, total_steps=100, warmup_steps=10)
    rates = [float(cosine(s)) for s in (0, 9, 10, 55, 99)]
    assert rates[0] == pytest.approx(0.01) and rates[1] == pytest.approx(0.1)
    assert rates[2] == pytest.approx(0.1) and rates[3] == pytest.approx(0.05, abs=1e-3)
    assert rates[4] < 1e-3
    step = train.WarmupSchedule(0.1, 100, 0, "step", [50, 75])
    assert [float(step(s)) for s in (0, 50, 80)] == pytest.approx([0.1, 0.01, 0.001])


def test_distillation_lowers_kd_loss(train):
    import keras

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 3)).astype("float32")
    y = keras.utils.to_categorical(np.arange(64) % 10, 10)

    def cnn():
        return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3),
                                 keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])

    teacher = cnn()
    teacher.layers[-1].set_weights([w * 5 for w in teacher.layers[-1].get_weights()])
    distiller = train.Distiller(cnn(), teacher, temperature=2.0, weight=1.0)
    distiller.compile(keras.optimizers.Adam(1e-2),
                      keras.losses.CategoricalCrossentropy(from_logits=True))

    def kd():
        return float(distiller.kd_loss(teacher(x), distiller(x)))

    before = kd()
    teacher_weights = [w.copy() for w in teacher.get_weights()]
    distiller.fit(x, y, batch_size=16, epochs=5, verbose=0)
    assert kd() < 0.5 * before, (before, kd())
    for w, w0 in zip(teacher.get_weights(), teacher_weights):
        np.testing.assert_array_equal(w, w0)  # the teacher stays frozen
    # w = 1: the loss is the distillation term alone.
    kd_term = float(distiller.kd_loss(teacher(x), distiller(x)))
    loss = float(distiller.compute_loss(x, y, distiller(x)))
    assert loss == pytest.approx(kd_term, rel=1e-5)


# ----------------------------------------------------------------------------
# Slow: end to end


@pytest.mark.slow
def test_dense_mode_writes_complete_results(dense_run):
    run_dir, results = dense_run
    assert results == check_results(run_dir, 1, "dense")
    assert results["tflite_bytes"] > 0
    assert csv_epochs(run_dir) == [0]


@pytest.mark.slow
def test_transform_mode_with_teacher(train, dense_run, tmp_path):
    """A bfloat16 student of a float32 teacher; its .tflite export (float32) succeeds."""
    dense_dir, dense = dense_run
    results = train.main(["--dataset", "digits", "--mode", "transform", "--base-ratio", "0.25",
                          "--teacher", str(dense_dir / "final.keras"), "--epochs", "1",
                          "--mixed-precision", "mixed_bfloat16",
                          "--steps-per-epoch", "2", "--run-dir", str(tmp_path), *FAST])
    check_results(tmp_path, 1, "transform")
    assert results["tflite_bytes"] > 0
    assert results["params"] < dense["params"] / 2
    assert "kd_loss" in results["last_epoch_logs"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["prune", "convert"])
def test_prune_and_convert_from_dense_checkpoint(train, dense_run, tmp_path, mode):
    dense_dir, dense = dense_run
    results = train.main(["--dataset", "digits", "--mode", mode, "--init-from",
                          str(dense_dir / "ckpt" / "last.keras"), "--final-sparsity", "0.75",
                          "--base-ratio", "0.25", "--epochs", "1", "--steps-per-epoch", "3",
                          "--no-tflite", "--run-dir", str(tmp_path), *FAST])
    check_results(tmp_path, 1, mode)
    assert results["tflite_skipped"] == "--no-tflite"
    assert results["params"] < dense["params"] / 2
    import keras

    final = keras.saving.load_model(tmp_path / "final.keras", compile=False)
    kinds = {type(layer).__name__ for layer in final.layers}
    assert "TransformConv2D" in kinds and "TransformPruning" not in kinds


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["paper-resnet56", "paper-vgg16", "paper-resnet50"])
def test_paper_preset_runs_a_short_epoch(train, tmp_path, preset):
    """Each paper experiment, as its preset sets it up, on 16 synthetic 32x32 images."""
    results = train.main(["--preset", preset, "--dataset", "synthetic", "--synthetic-size", "16",
                          "--image-size", "32", "--epochs", "1", "--steps-per-epoch", "2",
                          "--no-tflite", "--run-dir", str(tmp_path), *FAST])
    check_results(tmp_path, 1, "prune")
    args = train.parse_args(["--preset", preset])
    import keras

    final = keras.saving.load_model(tmp_path / "final.keras", compile=False)
    layers = [l for l in final._flatten_layers() if type(l).__name__ == "TransformConv2D"]
    assert layers and all(l.transform_family == "scalar" for l in layers)
    stem = layers[0]
    assert stem.depth_groups == 1  # 3 input channels do not split in 2
    assert {l.depth_groups for l in layers[1:]} == {2}
    floors = [min(args.min_bases, l.filters) for l in layers]
    assert all(l.base_filters >= floor for l, floor in zip(layers, floors))
    # Pruned once, at step 1, to the final sparsity over all the wrapped filters.
    from tf_transform_conv.assignment import kept_filters

    target = kept_filters(sum(l.filters for l in layers), float(np.float32(args.final_sparsity)))
    assert sum(l.base_filters for l in layers) == max(target, sum(floors))
    assert results["args"]["criterion"] == args.criterion


@pytest.mark.slow
def test_mirrored_over_two_cpu_devices(tmp_path):
    proc = run_script(["--dataset", "synthetic", "--synthetic-size", "64", "--epochs", "1",
                       "--steps-per-epoch", "2", "--strategy", "mirrored", "--cpu-devices", "2",
                       "--no-tflite", "--run-dir", str(tmp_path), *FAST])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    results = check_results(tmp_path, 1, "dense")
    assert results["replicas"] == 2


@pytest.mark.slow
def test_multiworker_two_local_processes(tmp_path):
    """Two MultiWorkerMirrored workers on localhost share one run folder.

    Worker 0 is the chief: it writes results.json, the checkpoints and the
    logs; worker 1 trains in step with it (its gradients are all-reduced with
    the chief's) and writes only its own backup, never the chief's files.
    """
    epochs, steps = 2, 2
    ports = free_ports(2)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    command = ["--dataset", "synthetic", "--synthetic-size", "64", "--epochs", str(epochs),
               "--steps-per-epoch", str(steps), "--strategy", "multiworker", "--no-tflite",
               "--run-dir", str(tmp_path), *FAST]
    logs = [tmp_path.parent / f"{tmp_path.name}-worker-{i}.log" for i in range(2)]
    procs, hung = [], False
    try:
        for i, log in enumerate(logs):
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": i}}
            with open(log, "w") as out:  # a file each: a full pipe would stall a worker
                procs.append(run_script(command, env={"TF_CONFIG": json.dumps(tf_config)},
                                        stdout=out))
        deadline = time.monotonic() + 300
        try:
            for proc in procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # e.g. one waits in a collective for the other
            hung = True
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outs = [log.read_text() for log in logs]
    assert not hung, "a worker hung:\n" + "\n".join(out[-2000:] for out in outs)
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"worker {i}:\n{outs[i][-3000:]}"

    results = check_results(tmp_path, epochs, "dense")  # the chief's
    assert results["replicas"] == 2
    assert results["optimizer_steps"] == epochs * steps
    assert csv_epochs(tmp_path) == list(range(epochs))
    assert "run folder:" in outs[0] and "run folder:" not in outs[1]
    # Only the chief's outputs; the backups (the non-chief's apart, in
    # backup-worker-1) are deleted by BackupAndRestore at the end of fit.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt", "final.keras", "log.csv", "results.json", "tensorboard"]


def test_backup_survives_a_kill_while_writing(train, tmp_path):
    """A half-written newer weights file is ignored: the committed backup is restored."""
    import keras

    def model():
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        m.compile(optimizer="sgd", loss="mse")
        return m

    saved = model()
    backup = train.AtomicBackupAndRestore(backup_dir=str(tmp_path))
    backup.set_model(saved)
    backup.on_epoch_end(0)  # commits epoch 1
    (tmp_path / "epoch-2-batch-0.weights.h5").write_bytes(b"\x89HDF")  # killed mid-write
    assert train.backup_epoch(tmp_path) == 1

    restored = model()
    restore = train.AtomicBackupAndRestore(backup_dir=str(tmp_path))
    restore.set_model(restored)
    restore.on_train_begin()
    assert restored._initial_epoch == 1
    for a, b in zip(saved.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(a, b)
    backup.on_epoch_end(1)  # the next commit replaces the stray file
    assert sorted(p.name for p in tmp_path.glob("*.weights.h5")) == ["epoch-2-batch-0.weights.h5"]
    assert train.backup_epoch(tmp_path) == 2


@pytest.mark.slow
def test_killed_run_restarts_where_it_stopped(tmp_path):
    command = ["--dataset", "synthetic", "--synthetic-size", "128", "--mode", "prune",
               "--epochs", "3", "--steps-per-epoch", "6", "--prune-end", "1.0",
               "--prune-frequency", "1", "--no-tflite", "--run-dir", str(tmp_path), *FAST]
    metadata = tmp_path / "backup" / "training_metadata.json"
    proc = run_script(command)
    deadline = time.monotonic() + 600
    while not metadata.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill:\n{out[-3000:]}"
    assert json.loads(metadata.read_text())["epoch"] < 3
    assert not (tmp_path / "results.json").exists()

    proc = run_script(command)  # the same command again
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming after epoch" in out
    results = check_results(tmp_path, 3, "prune")
    assert results["resumed_from_epoch"] >= 1
    assert csv_epochs(tmp_path) == [0, 1, 2]
    # The pruning schedule ran to the end: the stripped model holds 1/4 of the bases.
    import keras

    final = keras.saving.load_model(tmp_path / "final.keras", compile=False)
    convs = [layer for layer in final.layers if type(layer).__name__ == "TransformConv2D"]
    assert convs and all(layer.base_filters <= layer.filters // 4 + 1 for layer in convs)
