"""Learning-rate and pruning schedules (`tf_transform_conv.training.schedules`).

The learning rates are compared, step by step, with the values of the
schedule `examples/train.py` defined before it used Keras's (`old_rate`, its
formulas in plain Python). One difference is intended: the warm-up follows
Keras's `CosineDecay` (`peak * step / warmup_steps`, 0 at step 0) where the
old one ran a step ahead (`peak * (step + 1) / warmup_steps`).
"""

import math

import keras
import numpy as np
import pytest

from tf_transform_conv.training.schedules import CosineRestart
from tf_transform_conv.training.schedules import LinearWarmup
from tf_transform_conv.training.schedules import learning_rate_schedule
from tf_transform_conv.training.schedules import pruning_schedule


def old_rate(step, peak, total_steps, warmup_steps=0, kind="cosine", boundaries=()):
    """The rate the old `train.WarmupSchedule(peak, total_steps, warmup_steps, kind,
    boundaries)` gave."""
    if step < warmup_steps:
        return peak * (step + 1) / max(1, warmup_steps)
    if kind == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
        return 0.5 * peak * (1.0 + math.cos(math.pi * progress))
    if kind == "step":
        return peak * 0.1 ** sum(step >= b for b in boundaries)
    passed = sum((b - a) for a, b in zip([0, *boundaries], boundaries) if step >= b)
    return peak * (1.0 - passed / max(1, total_steps))


CASES = [  # (kind, peak, total_steps, warmup_steps, boundaries): the presets' shapes
    ("cosine", 0.1, 100, 10, []),  # cifar10
    ("cosine", 0.1, 50, 0, []),
    ("cosine", 0.1, 8, 8, []),  # one epoch of warm-up and one of training
    ("step", 0.1, 100, 0, [50, 75]),  # paper CIFAR presets
    ("step", 0.2, 90, 5, [30, 60, 80]),  # imagenet: warm-up, then 10x drops
    ("linear-steps", 5e-4, 300, 0, [25 * k for k in range(1, 12)]),  # paper-resnet50
    ("linear-steps", 1.0, 2, 0, [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]),  # the same, two steps
    ("step", 0.1, 10, 3, [2, 6]),  # a drop inside the warm-up
]


@pytest.mark.parametrize("kind, peak, total, warmup, boundaries", CASES)
def test_rates_are_the_old_schedules(kind, peak, total, warmup, boundaries):
    schedule = learning_rate_schedule(kind, peak, total, warmup_steps=warmup,
                                      boundaries=boundaries)
    for step in range(total + 3):
        got = float(schedule(step))
        if step >= warmup:
            # float32 against float64: relative 1e-5, and 1e-6 of the peak where the
            # cosine nears 0.
            assert got == pytest.approx(old_rate(step, peak, total, warmup, kind, boundaries),
                                        rel=1e-5, abs=1e-6 * peak), step
        else:  # the intended difference: the ramp of Keras's CosineDecay, one step later
            target = float(schedule(warmup))
            assert got == pytest.approx(target * step / warmup, rel=1e-5, abs=1e-9), step
            if step >= 1 and not (kind == "step" and min(boundaries) <= warmup):
                assert got == pytest.approx(
                    old_rate(step - 1, peak, total, warmup, kind, boundaries), rel=1e-5), step


def test_linear_steps_schedule():
    linear = learning_rate_schedule("linear-steps", 1.0, 300,
                                    boundaries=[25 * k for k in range(1, 12)])
    rates = [float(linear(s)) for s in (0, 24, 25, 150, 299)]
    assert rates == pytest.approx([1.0, 1.0, 1 - 25 / 300, 0.5, 1 - 275 / 300])


def test_schedule_warms_up_then_decays():
    cosine = learning_rate_schedule("cosine", 0.1, total_steps=100, warmup_steps=10)
    rates = [float(cosine(s)) for s in (0, 9, 10, 55, 99)]
    assert rates[0] == 0.0 and rates[1] == pytest.approx(0.09)
    assert rates[2] == pytest.approx(0.1) and rates[3] == pytest.approx(0.05, abs=1e-3)
    assert rates[4] < 1e-3
    step = learning_rate_schedule("step", 0.1, 100, boundaries=[75, 50])  # any order
    assert [float(step(s)) for s in (0, 50, 80)] == pytest.approx([0.1, 0.01, 0.001])


def test_keras_built_ins_where_they_express_the_schedule():
    schedules = keras.optimizers.schedules
    assert type(learning_rate_schedule("cosine", 0.1, 100, warmup_steps=10)) is \
        schedules.CosineDecay
    assert type(learning_rate_schedule("step", 0.1, 100, boundaries=[50])) is \
        schedules.PiecewiseConstantDecay
    assert type(learning_rate_schedule("linear-steps", 0.1, 100, boundaries=[50])) is \
        schedules.PiecewiseConstantDecay
    warm = learning_rate_schedule("step", 0.1, 100, warmup_steps=5, boundaries=[50])
    assert type(warm) is LinearWarmup and type(warm.schedule) is schedules.PiecewiseConstantDecay


def test_linear_warmup_config_round_trip():
    inner = keras.optimizers.schedules.PiecewiseConstantDecay([9, 19], [0.3, 0.03, 0.003])
    schedule = LinearWarmup(inner, warmup_steps=4, initial_learning_rate=0.01)
    for again in (LinearWarmup.from_config(schedule.get_config()),
                  keras.optimizers.schedules.deserialize(
                      keras.optimizers.schedules.serialize(schedule))):
        assert type(again) is LinearWarmup and again.get_config() == schedule.get_config()
        steps = np.arange(25)
        np.testing.assert_allclose([float(again(s)) for s in steps],
                                   [float(schedule(s)) for s in steps], rtol=1e-7)
    assert float(schedule(0)) == pytest.approx(0.01)
    assert float(schedule(2)) == pytest.approx(0.01 + (0.3 - 0.01) * 2 / 4)
    assert keras.saving.get_registered_name(LinearWarmup) == "tf_transform_conv>LinearWarmup"


def test_a_saved_optimizer_keeps_its_schedule(tmp_path):
    """In this process; examples/train.py's test loads its final.keras in a fresh one."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    schedule = learning_rate_schedule("step", 0.2, 90, warmup_steps=5, boundaries=[30, 60])
    model.compile(keras.optimizers.SGD(schedule), "mse")
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    loaded = keras.optimizers.schedules.deserialize(again.optimizer.get_config()["learning_rate"])
    assert type(loaded) is LinearWarmup
    assert [float(loaded(s)) for s in (0, 3, 5, 30, 61)] == pytest.approx(
        [0.0, 0.12, 0.2, 0.02, 0.002])


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match=r"`kind`.*Received kind='exp'"):
        learning_rate_schedule("exp", 0.1, 10)
    with pytest.raises(ValueError, match=r"`peak`.*Received peak=0"):
        learning_rate_schedule("cosine", 0, 10)
    with pytest.raises(ValueError, match=r"`total_steps`.*Received total_steps=0"):
        learning_rate_schedule("cosine", 0.1, 0)
    with pytest.raises(ValueError, match=r"`warmup_steps`.*Received warmup_steps=-1"):
        learning_rate_schedule("cosine", 0.1, 10, warmup_steps=-1)
    with pytest.raises(ValueError, match=r"`boundaries`.*non-empty"):
        learning_rate_schedule("step", 0.1, 10)
    with pytest.raises(ValueError, match=r"`boundaries`.*Received boundaries=\[5, 11\]"):
        learning_rate_schedule("linear-steps", 0.1, 10, boundaries=[5, 11])
    with pytest.raises(ValueError, match=r"`schedule`.*LearningRateSchedule"):
        LinearWarmup(0.1, 5)


def old_pruning_steps(total, begin, end, frequency):
    """`(begin_step, end_step, frequency)` as examples/train.py computed them before."""
    b = int(begin * (total - 1))
    e = max(b, int(end * (total - 1)))
    frequency = frequency or max(1, (e - b) // 20)
    e = b + (e - b) // frequency * frequency
    if e == b:
        e, frequency = b + 1, 1
    return b, e, frequency


@pytest.mark.parametrize("total, begin, end, frequency", [
    (1000, 0.0, 0.5, None), (1000, 0.1, 0.9, 7), (300, 0.0, 40 / 300, 10), (2, 0.0, 40 / 300, 1),
    (3, 0.0, 1.0, None),
])
def test_pruning_schedule_places_the_polynomial(total, begin, end, frequency):
    schedule = pruning_schedule(total, 0.75, begin, end, power=1.0, frequency=frequency)
    placed = (schedule.begin_step, schedule.end_step, schedule.frequency)
    assert placed == old_pruning_steps(total, begin, end, frequency)
    should_prune, sparsity = schedule(schedule.end_step)
    assert bool(should_prune) and float(sparsity) == pytest.approx(0.75)


def test_bad_pruning_schedule_arguments():
    with pytest.raises(ValueError, match="final_sparsity"):
        pruning_schedule(10, 1.0)
    with pytest.raises(ValueError, match=r"begin=0.6, end=0.5"):
        pruning_schedule(10, 0.5, begin=0.6, end=0.5)
    with pytest.raises(ValueError, match="frequency"):
        pruning_schedule(10, 0.5, frequency=0)


def restart_rate(step, peak, total, restart):
    """`CosineRestart`'s rate in plain Python: two half cosines, the second from `restart`."""
    if step < restart:
        start, span = 0, total
    else:
        start, span = restart, total - restart
    progress = min((step - start) / span, 1.0)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("total, restart", [(100, 40), (2400, 950), (10, 0), (10, 9)])
def test_cosine_restart_rates(total, restart):
    schedule = CosineRestart(3e-3, total, restart)
    for step in range(total + 3):
        assert float(schedule(step)) == pytest.approx(
            restart_rate(step, 3e-3, total, restart), rel=1e-5, abs=1e-9), step
    if restart:  # the peak again at the restart, after a partial decay
        assert float(schedule(restart)) == pytest.approx(3e-3)
        assert float(schedule(restart - 1)) < 3e-3


def test_cosine_restart_is_registered_and_trains_on_a_restored_optimizer(tmp_path):
    schedule = CosineRestart(0.05, decay_steps=20, restart_step=8)
    assert keras.saving.get_registered_name(CosineRestart) == "tf_transform_conv>CosineRestart"
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert type(again) is CosineRestart and again.get_config() == schedule.get_config()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(schedule), "mse")
    x = np.ones((4, 3), "float32")
    model.fit(x, np.zeros((4, 2), "float32"), epochs=9, batch_size=4, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    rate = loaded.optimizer.learning_rate  # at the restored iteration 9: past the restart
    assert int(loaded.optimizer.iterations) == 9
    assert float(rate) == pytest.approx(restart_rate(9, 0.05, 20, 8), rel=1e-5)


def test_bad_cosine_restart_arguments():
    with pytest.raises(ValueError, match=r"`initial_learning_rate`.*Received initial_learning_rate=0"):
        CosineRestart(0, 10, 5)
    with pytest.raises(ValueError, match=r"`decay_steps`.*Received decay_steps=0"):
        CosineRestart(0.1, 0, 0)
    with pytest.raises(ValueError, match=r"`restart_step`.*below decay_steps=10.*restart_step=10"):
        CosineRestart(0.1, 10, 10)
    with pytest.raises(ValueError, match=r"`restart_step`.*Received restart_step=2.5"):
        CosineRestart(0.1, 10, 2.5)
