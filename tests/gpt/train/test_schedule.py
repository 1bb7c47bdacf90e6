"""The learning-rate schedules: cosine and warmup-stable-decay by their usual definitions, and a wsd run extended
and annealed from a checkpoint of its stable phase, exactly, in one process."""
from __future__ import annotations

import shutil

import pytest

from helpers import SHAKESPEARE, plan, read_metrics
from gpt.config import schema
from gpt.config.train import TrainConfig
from gpt.collectives.process_group import DistEnv
from gpt.errors import ConfigError
from gpt.train.schedule import first_max_steps, lr_at
from gpt.train.trainer import Trainer

WSD = ["model=tiny", "train.warmup_steps=2", "train.log_interval=1", "train.eval_interval=0", "train.progress=false",
       "train.lr=3e-3", "train.min_lr=3e-4", f"data.text_path={SHAKESPEARE}", "checkpoint.interval_steps=4",
       "train.schedule=wsd", "train.decay_fraction=0.25"]


def test_wsd_warms_up_holds_then_decays_to_min_lr_as_megatron_and_torchtitan():
    t = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, t) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and set(lrs[10:81]) == {1.0}  # the decay from step 80
    assert lrs[90] == pytest.approx(0.1 + 0.9 * 0.5) and lrs[99] == pytest.approx(0.1 + 0.9 / 20)  # linear
    sqrt = TrainConfig(**{**vars(t), "decay_shape": "sqrt"})
    assert lr_at(85, sqrt) == pytest.approx(0.1 + 0.9 * (1 - 0.25 ** 0.5))
    longer = TrainConfig(**{**vars(t), "max_steps": 300})  # the steps before either decay do not depend on max_steps
    assert [lr_at(s, longer) for s in range(81)] == lrs[:81]
    cosine = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(55, cosine) == pytest.approx(0.55) and lr_at(100, cosine) == 0.1  # half way, then min_lr


@pytest.mark.parametrize(("overrides", "refused"), [
    ({"decay_steps": 80}, "train.decay_steps=80 is not valid: null with train.schedule=wsd"),
    ({"decay_fraction": 1.5}, "train.decay_fraction=1.5 is not valid"),
    ({"decay_fraction": 0.95}, "the decay would start at step 5, inside the 10 warm-up steps"),
    ({"decay_shape": "exp"}, "train.decay_shape='exp' is not valid: one of linear, sqrt, cosine"),
    ({"schedule": "step"}, "train.schedule='step' is not valid: one of cosine, wsd")])
def test_a_wsd_setting_that_cannot_run_is_one_line(overrides, refused):
    with pytest.raises(ConfigError, match=refused) as e:
        TrainConfig(**{"max_steps": 100, "warmup_steps": 10, "schedule": "wsd", **overrides}).validate()
    assert "\n" not in str(e.value)


def test_first_max_steps_starts_the_anneal_at_the_checkpoint():
    for step in (8, 30, 4000, 4001):
        for fraction in (0.1, 0.2, 0.25, 0.5):
            m = first_max_steps(step, fraction)
            t = TrainConfig(max_steps=m, warmup_steps=0, schedule="wsd", decay_fraction=fraction)
            assert t.decay_start >= step and TrainConfig(**{**vars(t), "max_steps": m - 1}).decay_start < step
    assert first_max_steps(4000, 0.2) == 5000


def by_step(run_dir) -> dict[int, tuple[float, float]]:
    """(loss, lr) of each step, the last record of a step winning (a resumed run writes its steps again)."""
    return {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(run_dir)}


@pytest.mark.slow
def test_wsd_extends_and_anneals_from_its_stable_phase_exactly(tmp_path_factory):
    prepared = tmp_path_factory.getbasetemp() / "schedule-data"

    def fit(run_dir, *overrides: str):
        plan(run_dir, *WSD, f"data.dir={prepared}", *overrides)
        trainer = Trainer(schema.load(run_dir / "config.yaml"), DistEnv(), run_dir)
        trainer.fit()
        return trainer

    root = tmp_path_factory.mktemp("wsd")
    whole = by_step(fit(root / "whole", "train.max_steps=16").run_dir)  # decays from step 12
    fit(short := root / "short", "train.max_steps=12")  # decays from step 9: checkpoints 4, 8 stable, 12 decayed
    assert {s: whole[s] for s in range(1, 10)} == {s: v for s, v in by_step(short).items() if s <= 9}

    shutil.copytree(short, extended := root / "extended")  # the same run, stopped at its stable step 8
    shutil.rmtree(extended / "checkpoints" / "step_00000012")
    assert fit(extended, "train.max_steps=16").step == 16
    assert by_step(extended) == whole  # steps 1-8 as taken, 9-16 as the uninterrupted run's

    branch = fit(root / "anneal", f"resume={short / 'checkpoints' / 'step_00000008'}",
                 f"train.max_steps={first_max_steps(8, 0.2)}", "train.decay_fraction=0.2")
    annealed = by_step(branch.run_dir)
    assert sorted(annealed) == [9, 10] and annealed[9] == whole[9]  # the decay's first step is still at lr
    assert annealed[10][1] == pytest.approx(3e-4 + 0.5 * 2.7e-3)
