"""The one step loop (imagerec._engine): epochs and resume position, callbacks, the schedule,
the moving average of the weights; and that training, pruning, adaptation and the SCAN head
all run on it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import imagerec._engine as engine
from imagerec import ImagerecError, TrainConfig, load_checkpoint, train
from imagerec._engine import EMA, Callback, Loop, StepOutput, WarmupCosine
from imagerec._optim import decay_groups

from .conftest import make_colour_dataset


class Record(Callback):
    def __init__(self):
        self.events = []

    def on_step_start(self, loop):
        self.events.append(("start", loop.epoch, loop.step))

    def on_step_end(self, loop, out):
        self.events.append(("end", loop.epoch, loop.step))

    def on_epoch_end(self, loop):
        self.events.append(("epoch", loop.epoch, loop.step))

    def on_end(self, loop):
        self.events.append(("done", loop.epoch, loop.step))


def test_loop_runs_total_steps_over_epochs_and_resumes_mid_epoch():
    seen = []

    def batches(epoch, first):
        for i in range(first, 4):
            yield (epoch, i)

    def step(batch):
        seen.append(batch)
        return StepOutput(2, 1.0, 1)

    record = Record()
    loop = Loop(step, batches, total=10, steps_per_epoch=4, start=5, callbacks=[record]).run()
    # step 5 is batch 1 of epoch 1; the run stops after 10 steps, mid-epoch 2
    assert seen == [(1, 1), (1, 2), (1, 3), (2, 0), (2, 1)]
    assert loop.step == 10 and loop.epoch == 2
    assert loop.images == 4 and loop.loss == 2.0 and loop.correct == 2  # epoch 2's two steps
    assert [e for e in record.events if e[0] in ("epoch", "done")] == [("epoch", 1, 8), ("epoch", 2, 10), ("done", 2, 10)]
    assert record.events[:2] == [("start", 1, 5), ("end", 1, 6)]


def test_a_callback_stops_the_loop_and_a_step_of_nothing_still_counts():
    class StopAfter3(Callback):
        def on_step_end(self, loop, out):
            if loop.step == 3:
                loop.stop = "enough"

    loop = Loop(lambda b: None, lambda e, f: iter(range(f, 5)), total=100, steps_per_epoch=5, callbacks=[StopAfter3()]).run()
    assert loop.step == 3 and loop.stop == "enough" and loop.images == 0


def test_an_epoch_without_batches_is_an_error_not_an_endless_loop():
    with pytest.raises(ImagerecError, match="no batch"):
        Loop(lambda b: None, lambda e, f: iter(()), total=10, steps_per_epoch=5).run()


def test_warmup_cosine_follows_the_loops_total():
    layer = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(decay_groups(layer.parameters(), 0.0, 0.8), lr=0.0)
    rates = []

    class Read(Callback):
        def on_step_start(self, loop):
            rates.append(optimizer.param_groups[0]["lr"])

        def on_step_end(self, loop, out):
            if loop.step == 5:
                loop.total = 20  # a re-plan stretches the schedule

    loop = Loop(lambda b: None, lambda e, f: iter(range(f, 10)), total=10, steps_per_epoch=10,
                callbacks=[WarmupCosine(optimizer, warmup=0.1), Read()])
    loop.run()
    assert rates[0] == pytest.approx(0.8 / 1)  # round(0.1 * 10) = 1 warm-up step: its end, the peak
    # from step 5 on, the 20-step schedule: 2 warm-up steps, then 18 of cosine
    assert len(rates) == 20
    assert rates[5] == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi * 3 / 18)))
    assert rates[-1] == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi * 17 / 18)))
    assert all(a > b for a, b in zip(rates[5:], rates[6:]))


def test_ema_averages_the_weights_after_each_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    ema = EMA(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    after = []  # the weights after each step

    def step(x):
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after.append(model.weight.detach().clone())
        return StepOutput(len(x), float(loss.detach()) * len(x))

    Loop(step, lambda e, f: iter([torch.ones(2, 4), -torch.ones(2, 4)]), total=2, steps_per_epoch=2, callbacks=[ema]).run()
    # timm's warm-up: step 1 copies the weights, step 2 keeps 1 - 2 ** (-2/3) = 0.37 of the average
    decay = min(0.9, 1 - 2 ** (-2 / 3))
    expected = decay * after[0] + (1 - decay) * after[1]
    assert torch.allclose(ema.module.weight, expected, atol=1e-6)
    assert not torch.allclose(ema.module.weight, model.weight)


def test_every_trainer_runs_on_the_one_loop(tmp_path, monkeypatch):
    """Training, the SimCLR adaptation and the SCAN head (pruning: tests/test_compress.py) all
    run their steps through imagerec._engine.Loop."""
    runs = []
    real_run = Loop.run

    def counting_run(self):
        runs.append(self.step_fn.__qualname__)
        return real_run(self)

    monkeypatch.setattr(engine.Loop, "run", counting_run)
    from imagerec.clustering import DeepClustering  # noqa: PLC0415
    from imagerec.data import load_images  # noqa: PLC0415
    from imagerec.features import adapt_backbone  # noqa: PLC0415

    data = make_colour_dataset(tmp_path / "d", per_class=8)
    train(data, tmp_path / "run", TrainConfig(backbone="seed_cnn", epochs=1, batch_size=8, save_every=0, device="cpu"), progress=False)
    adapt_backbone(load_images(data), "seed_cnn", epochs=1, image_size=32, batch_size=8, progress=False)
    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    DeepClustering(2, epochs=1, self_label_epochs=0, n_heads=1).fit(x)
    assert runs[0] == "Stages.step" and "adapt_backbone" in runs[1] and "_train_scan" in runs[2]


@pytest.mark.parametrize("ema", [0.0, 0.99])
def test_training_with_ema_saves_the_average_as_best(tmp_path, ema):
    data = make_colour_dataset(tmp_path / "d", per_class=12)
    config = TrainConfig(backbone="seed_cnn", epochs=1, batch_size=8, val_fraction=0.25, save_every=0, device="cpu", ema=ema)
    train(data, tmp_path / "run", config, progress=False)
    best, last = load_checkpoint(tmp_path / "run"), load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert best.meta["step"] == last.meta["step"]  # one epoch: both written at its end
    # best holds the averaged weights, last the trained ones (with the optimizer, to resume)
    same = [torch.equal(best.model[k], last.model[k]) for k in last.model if k.endswith("weight")]
    assert all(same) if ema == 0 else not any(same)


def test_ema_must_be_a_decay_below_one():
    with pytest.raises(ImagerecError, match="ema=1.0 must be in"):
        TrainConfig(ema=1.0)
