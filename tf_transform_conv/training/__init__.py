"""Training machinery of the recipes (`examples/train.py`): schedules, callbacks, data, runs.

One idea per module:

- `schedules`: learning-rate schedules on Keras's own (`learning_rate_schedule`,
  `LinearWarmup`, `CosineRestart`: the decay restarted where pruning ends);
- `callbacks`: a backup a kill cannot corrupt (`AtomicBackupAndRestore`),
  a checkpoint per epoch (`SaveCheckpoint`), training seconds across
  restarts (`TrainClock`);
- `runs`: the run folder of a training that restarts (`finished_run`,
  `start_over`, `run_folder`, `trim_csv`);
- `files`: JSON written atomically (`write_json_atomic`);
- `report`: what `results.json` says of the model and machine;
- `data`, `augment`: the datasets (CIFAR-10, ImageNet, digits, synthetic)
  and their seeded, resumable `tf.data` pipelines and augmentations;
- `distribute`: `tf.distribute` strategies and devices.

The modules named here are imported with the package. `data`, `augment`
and `distribute` build `tf.data` pipelines and `tf.distribute` strategies:
they import TensorFlow, so they are imported by name
(`from tf_transform_conv.training import data`), leaving
`import tf_transform_conv` free of TensorFlow on other backends.
"""

from tf_transform_conv.training import callbacks
from tf_transform_conv.training import files
from tf_transform_conv.training import report
from tf_transform_conv.training import runs
from tf_transform_conv.training import schedules
from tf_transform_conv.training.callbacks import AtomicBackupAndRestore
from tf_transform_conv.training.callbacks import SaveCheckpoint
from tf_transform_conv.training.callbacks import TrainClock
from tf_transform_conv.training.callbacks import read_backup
from tf_transform_conv.training.files import write_json_atomic
from tf_transform_conv.training.report import environment
from tf_transform_conv.training.report import layer_details
from tf_transform_conv.training.runs import RUN_OUTPUTS
from tf_transform_conv.training.runs import finished_run
from tf_transform_conv.training.runs import run_folder
from tf_transform_conv.training.runs import start_over
from tf_transform_conv.training.runs import trim_csv
from tf_transform_conv.training.schedules import CosineRestart
from tf_transform_conv.training.schedules import LinearWarmup
from tf_transform_conv.training.schedules import learning_rate_schedule

__all__ = [
    "AtomicBackupAndRestore",
    "CosineRestart",
    "LinearWarmup",
    "RUN_OUTPUTS",
    "SaveCheckpoint",
    "TrainClock",
    "callbacks",
    "environment",
    "files",
    "finished_run",
    "layer_details",
    "learning_rate_schedule",
    "read_backup",
    "report",
    "run_folder",
    "runs",
    "schedules",
    "start_over",
    "trim_csv",
    "write_json_atomic",
]
