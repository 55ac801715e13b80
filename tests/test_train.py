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
import re
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
    sys.modules[spec.name] = module  # AutoGraph looks functions' modules up there
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
# Fast: arguments and data


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
    assert args.transforms == "identity"  # the scalar family after the identity
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
    with pytest.raises(SystemExit):
        train.parse_args(["--mode", "prune", "--subtract-mean"])
    assert "--subtract-mean needs --allocation global" in capsys.readouterr().err
    assert train.parse_args(["--subtract-mean", "--allocation", "global"]).subtract_mean
    for argv, message in [
        (["--lr", "-1"], "--lr and --prune-power must be > 0 (got -1, 3)"),
        (["--lr", "nan"], "numbers must be finite (got --lr nan)"),
        (["--momentum", "1.5"], "--momentum and --label-smoothing must be in [0, 1)"),
        (["--weight-decay", "-0.1"], "--warmup-epochs and --weight-decay must be >= 0"),
        (["--seed", "-1"], "--seed, --cpu-devices and --prune-frequency must be >= 0"),
        (["--lr-steps", "0.5", "1.5"], "--lr-steps are fractions of training, in [0, 1]"),
        (["--mixup", "inf"], "numbers must be finite (got --mixup inf)"),
        (["--run-dir", __file__], f"--run-dir {__file__}: is a file, not a folder"),
        (["--run-dir", f"{__file__}/run"], f"cannot be made: {__file__} is a file, not a folder"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_inner_distillation_needs_a_teacher(train, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--inner-kd-weight", "1"])
    assert "--inner-kd-weight and --inner-kd-layers need --teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--inner-kd-weight", "-1"])
    assert "--inner-kd-weight must be >= 0" in capsys.readouterr().err


def test_flags_that_distil_nothing_or_shrink_digits_are_usage_errors(train, tmp_path, capsys):
    teacher = tmp_path / "teacher.keras"
    teacher.write_text("checked later, when the package is imported")
    with pytest.raises(SystemExit):
        train.parse_args(["--teacher", str(teacher), "--kd-weight", "0"])
    assert "--teacher with --kd-weight 0 needs --inner-kd-weight > 0" in capsys.readouterr().err
    args = train.parse_args(["--teacher", str(teacher), "--kd-weight", "0",
                             "--inner-kd-weight", "1"])
    assert args.inner_kd_weight == 1.0
    with pytest.raises(SystemExit):
        train.parse_args(["--dataset", "digits", "--image-size", "4"])
    assert "--dataset digits needs --image-size >= 8 (got 4)" in capsys.readouterr().err


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


# ----------------------------------------------------------------------------
# Fast: what a start checks, and what it leaves behind


def run_in_process(args):
    """Runs the script as `python train.py ARGS` would, in a fresh interpreter.

    Prints whether TensorFlow and Keras were imported and the exit status,
    as the last line.
    """
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]\n"
        "status = 0\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    status = exit.code\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules, status)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("args, status", [
    (["--help"], 0),
    (["--final-sparsity", "1.5"], 2),
    (["--mode", "distill"], 2),
])
def test_help_and_argument_errors_do_not_import_tensorflow(args, status):
    proc = run_in_process(args)
    assert proc.stdout.splitlines()[-1] == f"False False {status}", proc.stdout + proc.stderr
    if status:
        assert "train.py: error:" in proc.stderr


def test_startup_quieting_is_the_tfconv_launchers(train):
    """One copy of `quiet_tensorflow_startup`: the `tfconv` launcher's, installed with the package."""
    import tfconv

    assert train.quiet_tensorflow_startup is tfconv.quiet_tensorflow_startup
    assert not hasattr(train, "STARTUP_NOISE")


def test_startup_prints_no_tensorflow_log_lines(tmp_path):
    """TensorFlow is imported, devices start, a model is read; no C++ or absl log line shows."""
    import keras

    keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)]).save(tmp_path / "m.keras")
    proc = run_in_process(["--dataset", "synthetic", "--synthetic-size", "16", "--mode", "prune",
                           "--init-from", str(tmp_path / "m.keras"),
                           "--run-dir", str(tmp_path / "run"), *FAST])
    assert proc.stdout.splitlines()[-1] == "True True 2", proc.stdout + proc.stderr
    assert "the model takes inputs of shape (8, 8, 3)" in proc.stderr
    lines = (proc.stdout + proc.stderr).splitlines()
    noise = [line for line in lines if re.match(r"[IWEF]\d{4} ", line) or "absl::" in line]
    assert not noise, noise
    assert not (tmp_path / "run").exists()


def expect_usage_error(capsys, call):
    """Runs `call`, which must exit with status 2; returns the error line."""
    with pytest.raises(SystemExit) as error:
        call()
    assert error.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


def test_unknown_model_and_unusable_base_ratio_are_usage_errors(train, tmp_path, capsys):
    run_dir = tmp_path / "run"
    message = expect_usage_error(capsys, lambda: train.main(
        ["--model", "resnet999", "--dataset", "synthetic", "--run-dir", str(run_dir)]))
    assert "--model resnet999: no such model" in message and "resnet20" in message
    message = expect_usage_error(capsys, lambda: train.main(
        ["--mode", "transform", "--base-ratio", "0.3", "--dataset", "synthetic",
         "--run-dir", str(run_dir)]))
    assert "--base-ratio 0.3" in message and "pass --transforms" in message
    assert "`transforms`" not in message
    message = expect_usage_error(capsys, lambda: train.main(
        ["--mode", "transform", "--transforms", "d4", "--dataset", "synthetic",
         "--run-dir", str(run_dir)]))
    assert "--base-ratio must be 1/8 = 0.125 (got 0.25)" in message
    message = expect_usage_error(capsys, lambda: train.main(
        ["--mode", "transform", "--transforms", "rot45", "--dataset", "synthetic",
         "--run-dir", str(run_dir)]))
    assert "--transforms rot45: " in message
    message = expect_usage_error(capsys, lambda: train.main(
        ["--model", "mobilenet_v2", "--width", "0.5", "--dataset", "synthetic",
         "--run-dir", str(run_dir)]))
    assert "--width: mobilenet_v2 has no width" in message and "resnet20" in message
    message = expect_usage_error(capsys, lambda: train.main(
        ["--width", "0", "--dataset", "synthetic", "--run-dir", str(run_dir)]))
    assert "--width must be in (0, 4], got 0.0" in message
    (tmp_path / "m.keras").write_bytes(b"checked later")
    message = expect_usage_error(capsys, lambda: train.main(
        ["--width", "0.5", "--mode", "prune", "--init-from", str(tmp_path / "m.keras"),
         "--dataset", "synthetic", "--run-dir", str(run_dir)]))
    assert "--init-from brings its own widths" in message
    assert not run_dir.exists()


def test_unusable_model_files_are_usage_errors(train, tmp_path, capsys):
    import keras

    (tmp_path / "text.keras").write_text("not a model\n")
    (tmp_path / "text.h5").write_text("not a model\n")
    keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
                      keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
                     ).save(tmp_path / "small.keras")
    keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(),
                      keras.layers.Dense(7)]).save(tmp_path / "seven.keras")
    run_dir = tmp_path / "run"
    base = ["--dataset", "synthetic", "--synthetic-size", "16", "--run-dir", str(run_dir), *FAST]
    cases = [
        (["--mode", "prune", "--init-from", str(tmp_path / "text.keras")],
         f"--init-from {tmp_path / 'text.keras'}: not a valid .keras file: it is not a zip"),
        (["--teacher", str(tmp_path / "text.h5")],
         f"--teacher {tmp_path / 'text.h5'}: not a valid Keras .h5 file: it is not an HDF5"),
        (["--mode", "convert", "--init-from", str(tmp_path / "small.keras")],
         "the model takes inputs of shape (8, 8, 3), but the data are (32, 32, 3) images "
         "(--image-size 32, RGB); pass --image-size 8"),
        (["--teacher", str(tmp_path / "seven.keras")],
         "the model outputs (7,), but synthetic has 10 classes"),
    ]
    for args, expected in cases:
        message = expect_usage_error(capsys, lambda: train.main(base + args))
        assert expected in message, message
    assert not run_dir.exists()


def test_cifar_without_tensorflow_datasets_says_what_to_install(train, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(SystemExit) as error:
        train.main(["--dataset", "cifar10", "--run-dir", str(tmp_path / "run"), *FAST])
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert "pip install tensorflow-datasets" in message
    assert "--dataset digits" in message and "--dataset synthetic" in message
    assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_the_run_folder_as_it_found_it(train, tmp_path, monkeypatch):
    """A convert run that fails after writing converted.keras: nothing of it is left."""
    import keras

    keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, name="c"),
                      keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
                     ).save(tmp_path / "tiny.keras")
    converted = []

    def failing_compile(*args, **kwargs):
        converted.extend(p.name for p in tmp_path.rglob("converted.keras"))
        raise RuntimeError("failed while compiling")

    monkeypatch.setattr(train, "compile_model", failing_compile)
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    for run_dir in (tmp_path / "new", kept):
        with pytest.raises(RuntimeError, match="failed while compiling"):
            train.main(["--dataset", "synthetic", "--synthetic-size", "16", "--mode", "convert",
                        "--init-from", str(tmp_path / "tiny.keras"), "--run-dir", str(run_dir),
                        *FAST])
    assert converted == ["converted.keras", "converted.keras"]  # the failure came after it
    assert not (tmp_path / "new").exists()
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


def test_a_finished_run_is_not_retrained(train, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "ckpt").mkdir(parents=True)
    results = json.dumps({"finished": True, "mode": "dense", "epochs": 3, "test_accuracy": 0.75})
    (run_dir / "results.json").write_text(results)
    command = ["--dataset", "synthetic", "--synthetic-size", "16", "--run-dir", str(run_dir),
               *FAST]
    for extra in ([], ["--resume"]):
        message = expect_usage_error(capsys, lambda: train.main(command + extra))
        assert f"{run_dir} holds a finished run (dense, 3 epochs, test accuracy 0.7500" in message
        assert "pass --fresh" in message
    assert (run_dir / "results.json").read_text() == results
    # Trained to the end (the backup is gone) but stopped before results.json.
    (run_dir / "results.json").unlink()
    (run_dir / "ckpt" / "last.json").write_text('{"epoch": 3}')
    message = expect_usage_error(capsys, lambda: train.main(command))
    assert "holds a model trained for 3 epochs" in message and "pass --fresh" in message


def test_a_resumed_stream_continues_the_uninterrupted_one(train, monkeypatch):
    """Batches from epoch 2 on, started afresh, equal the uninterrupted stream's.

    Epochs of 3 steps over passes of 5 batches start mid-pass; CIFAR-10's
    random crops and flips (on stand-in images) repeat too.
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 40)

    def fake_cifar(args):
        def split(n):
            return tf.data.Dataset.from_tensor_slices((images[:n], labels[:n]))
        return split(40), split(8), 40, 8

    monkeypatch.setattr(train, "load_tfds", fake_cifar)
    args = train.parse_args(["--dataset", "cifar10", "--batch-size", "8", "--steps-per-epoch",
                             "3", "--seed", "3"])

    def batches(start_epoch, count):
        data, _, _, _, steps = train.make_datasets(args, 10, start_epoch=start_epoch)
        assert steps == 3
        return list(data.take(count).as_numpy_iterator())

    whole = batches(0, 12)
    resumed = batches(2, 6)
    for (x, y), (x2, y2) in zip(whole[6:], resumed):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    # Each pass is a new order of all the images, each batch full.
    first_pass = np.concatenate([y.argmax(1) for _, y in whole[:5]])
    second_pass = np.concatenate([y.argmax(1) for _, y in whole[5:10]])
    assert sorted(first_pass) == sorted(second_pass) == sorted(labels)
    assert not np.array_equal(first_pass, second_pass)


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
    # Per TransformConv2D: its bases and how the .tflite file writes it.
    import keras

    final = keras.saving.load_model(tmp_path / "final.keras", compile=False)
    convs = [l for l in final._flatten_layers() if type(l).__name__ == "TransformConv2D"]
    assert [row["name"] for row in results["layers"]] == [l.name for l in convs]
    for row, layer in zip(results["layers"], convs):
        assert (row["filters"], row["base_filters"]) == (layer.filters, layer.base_filters)
        assert row["base_filters"] * 4 == row["filters"]  # base ratio 0.25
        assert row["transform_family"] == "discrete" and len(row["transforms"]) == 4
        assert row["tflite_lowering"] in ("grouped", "slices", "dense")
        assert "reconstruction_error" not in row


@pytest.mark.slow
def test_inner_distillation_beside_output_distillation(train, dense_run, tmp_path):
    """A transformed student keeps every width: inner distillation without projections."""
    dense_dir, _ = dense_run
    results = train.main(["--dataset", "digits", "--mode", "transform", "--base-ratio", "0.25",
                          "--teacher", str(dense_dir / "final.keras"), "--epochs", "1",
                          "--inner-kd-weight", "2.0", "--inner-kd-layers", "stage1_block3_out",
                          "stage3_block3_out", "--steps-per-epoch", "2", "--no-tflite",
                          "--run-dir", str(tmp_path), *FAST])
    check_results(tmp_path, 1, "transform")
    logs = results["last_epoch_logs"]
    assert logs["inner_kd_loss"] > 0 and "kd_loss" in logs


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
    # The dense network of equal size, the one to beat: its width builds it.
    assert dense["thin_width"] is None and 0 < results["thin_width"] < 1
    assert abs(results["thin_params"] - results["params"]) < 0.05 * results["params"]
    if mode == "prune":
        thin = train.main(["--dataset", "digits", "--mode", "dense", "--width",
                           str(results["thin_width"]), "--epochs", "1", "--steps-per-epoch",
                           "1", "--no-tflite", "--run-dir", str(tmp_path / "thin"), *FAST])
        assert thin["params"] == results["thin_params"]
        assert thin["model"] == f"cifar_resnet20_w{results['thin_width']:g}"
    import keras

    final = keras.saving.load_model(tmp_path / "final.keras", compile=False)
    kinds = {type(layer).__name__ for layer in final.layers}
    assert "TransformConv2D" in kinds and "TransformPruning" not in kinds
    # Per TransformConv2D of the final model; the conversion's fitting error.
    convs = [l for l in final.layers if type(l).__name__ == "TransformConv2D"]
    assert [row["name"] for row in results["layers"]] == [l.name for l in convs]
    for row, layer in zip(results["layers"], convs):
        assert (row["filters"], row["base_filters"]) == (layer.filters, layer.base_filters)
        assert row["base_filters"] < row["filters"] and row["transform_family"] == "discrete"
        assert "tflite_lowering" not in row  # --no-tflite
        if mode == "convert":
            assert 0.0 < row["reconstruction_error"] < 1.0
        else:
            assert "reconstruction_error" not in row


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
    # The scalar family after the identity: no discrete transform in front.
    assert all(tuple(l.transforms) == ("identity",) for l in layers)
    assert not any(l.scale for l in layers)
    stem = layers[0]
    assert stem.depth_groups == 1  # 3 input channels do not split in 2
    assert {l.depth_groups for l in layers[1:]} == {2}
    floors = [min(args.min_bases, l.filters) for l in layers]
    assert all(l.base_filters >= floor for l, floor in zip(layers, floors))
    # Pruned once, at step 1, to the final sparsity over all the wrapped filters.
    from tf_transform_conv.ops.assignment import kept_filters

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


class Interrupted(Exception):
    """Stands for a kill after an epoch's backup and checkpoint were written."""


@pytest.mark.slow
def test_a_resumed_run_trains_on_the_data_of_an_uninterrupted_one(train, tmp_path, monkeypatch):
    """Interrupted after epoch 1 of 3 and restarted: epochs 2 and 3 get the same batches.

    Also: the training seconds add up across the two processes, the JSON
    outputs have the mode of the other files, a finished run is not
    retrained, and --fresh trains it again on the same data.
    """
    import stat

    import tensorflow as tf

    seen = []  # per make_datasets call, the batches as fed: image sums and labels
    make_datasets = train.make_datasets

    def recording(*args, **kwargs):
        batches = []
        seen.append(batches)
        data, *rest = make_datasets(*args, **kwargs)

        def record(x, y):
            def note(x, y):
                batches.append(np.concatenate([np.sum(x.numpy(), axis=(1, 2, 3)),
                                               np.argmax(y.numpy(), axis=1)]))
                return y

            noted = tf.py_function(note, [x, y], y.dtype)
            noted.set_shape(y.shape)
            return x, noted

        return (data.map(record), *rest)

    monkeypatch.setattr(train, "make_datasets", recording)
    from tf_transform_conv.training.callbacks import SaveCheckpoint

    save_checkpoint = SaveCheckpoint.on_epoch_end
    interrupt = {"after": None}

    def maybe_interrupt(self, epoch, logs=None):
        save_checkpoint(self, epoch, logs)
        if epoch == interrupt["after"]:
            raise Interrupted

    monkeypatch.setattr(SaveCheckpoint, "on_epoch_end", maybe_interrupt)
    steps, epochs = 3, 3
    command = ["--dataset", "synthetic", "--synthetic-size", "40", "--epochs", str(epochs),
               "--steps-per-epoch", str(steps), "--batch-size", "8", "--no-jit-compile",
               "--verbose", "0", "--no-tflite", "--seed", "5"]
    whole = train.main(command + ["--run-dir", str(tmp_path / "whole")])
    assert whole["resumed_from_epoch"] is None

    run_dir = tmp_path / "resumed"
    interrupt["after"] = 0
    with pytest.raises(Interrupted):
        train.main(command + ["--run-dir", str(run_dir)])
    first_seconds = json.loads((run_dir / "ckpt" / "last.json").read_text())["train_seconds"]
    assert first_seconds > 0
    interrupt["after"] = None
    results = train.main(command + ["--run-dir", str(run_dir)])
    assert results["resumed_from_epoch"] == 1
    check_results(run_dir, epochs, "dense")

    uninterrupted, before_kill, after_restart = seen[0], seen[1], seen[2]
    assert len(uninterrupted) >= epochs * steps and len(after_restart) >= (epochs - 1) * steps
    for a, b in zip(uninterrupted[:steps], before_kill[:steps]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(uninterrupted[steps:epochs * steps], after_restart[:(epochs - 1) * steps]):
        np.testing.assert_array_equal(a, b)

    # The seconds of both processes: the restart's checkpoints count on from the first's.
    last_seconds = json.loads((run_dir / "ckpt" / "last.json").read_text())["train_seconds"]
    assert first_seconds < last_seconds <= results["train_seconds"]
    # The JSON outputs have the mode of the other outputs (umask-derived, not 0600).
    other = stat.S_IMODE((run_dir / "final.keras").stat().st_mode)
    for name in ("results.json", "ckpt/last.json"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == other, name

    # The same command again: refused, the results untouched.
    finished = (run_dir / "results.json").read_bytes()
    with pytest.raises(SystemExit) as error:
        train.main(command + ["--run-dir", str(run_dir)])
    assert error.value.code == 2
    assert (run_dir / "results.json").read_bytes() == finished
    # --fresh starts over: the same data as the uninterrupted run, from epoch 1.
    again = train.main(command + ["--run-dir", str(run_dir), "--fresh"])
    assert again["resumed_from_epoch"] is None and again["epochs"] == epochs
    for a, b in zip(uninterrupted[:epochs * steps], seen[-1][:epochs * steps]):
        np.testing.assert_array_equal(a, b)
    assert csv_epochs(run_dir) == list(range(epochs))


FRESH_LOAD = (
    "import json, sys\n"
    "import keras, numpy as np\n"
    "import tf_transform_conv\n"
    "model = keras.saving.load_model(sys.argv[1])\n"
    "x = np.linspace(-1, 1, 2 * 32 * 32 * 3, dtype='float32').reshape(2, 32, 32, 3)\n"
    "print('RESULT', json.dumps({'learning_rate': model.optimizer.get_config()['learning_rate'],\n"
    "    'output': np.asarray(model(x)).tolist(), 'modules': sorted(\n"
    "    m for m in sys.modules if m.split('.')[0] in ('examples', 'train_example'))}))\n"
)


@pytest.mark.slow
def test_final_model_loads_with_plain_keras_in_a_fresh_process(train, tmp_path):
    """final.keras, compiled with the warm-up schedule of the library, needs no train.py to load."""
    train.main(["--dataset", "synthetic", "--synthetic-size", "32", "--mode", "transform",
                "--schedule", "step", "--warmup-epochs", "1", "--epochs", "1",
                "--steps-per-epoch", "2", "--no-tflite", "--run-dir", str(tmp_path), *FAST])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(tmp_path / "final.keras")],
                               capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    loaded = json.loads(completed.stdout.split("RESULT", 1)[1])
    schedule = loaded["learning_rate"]
    assert schedule["registered_name"] == "tf_transform_conv>LinearWarmup"
    assert schedule["config"]["warmup_steps"] == 2
    assert schedule["config"]["schedule"]["class_name"] == "PiecewiseConstantDecay"
    assert loaded["modules"] == []
    import keras

    here = keras.saving.load_model(tmp_path / "final.keras", compile=False)
    x = np.linspace(-1, 1, 2 * 32 * 32 * 3, dtype="float32").reshape(2, 32, 32, 3)
    np.testing.assert_allclose(loaded["output"], here(x), rtol=1e-5, atol=1e-5)
