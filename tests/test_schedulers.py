"""Warmup-stable-decay: the pure multipliers, and the Composer schedulers on a real State."""

import math

import pytest
import torch
from composer import Trainer
from composer.core import Callback, State, Timestamp
from composer.devices import DeviceCPU
from composer.models import ComposerClassifier
from composer.optim import compile_composer_scheduler
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from modernbert_train.optim import build_optimizer, decay_multiplier, warmup_multiplier, wsd_multiplier
from modernbert_train.train.schedulers import (
    WarmupConstantScheduler,
    WarmupDecayScheduler,
    WarmupStableDecayScheduler,
    build_scheduler,
)

# warmup 100, stable to 800, decay to 1000; at t=850 a quarter of the decay is done.
WSD = dict(warmup=100, decay_start=800, total=1000)


@pytest.mark.parametrize(
    ("t", "shape", "alpha_f", "expected"),
    [
        (0, "1-sqrt", 0.0, 0.0),
        (50, "1-sqrt", 0.0, 0.5),
        (100, "1-sqrt", 0.0, 1.0),
        (800, "1-sqrt", 0.0, 1.0),
        (850, "linear", 0.0, 0.75),
        (850, "1-sqrt", 0.0, 0.5),
        (850, "cosine", 0.0, 0.5 * (1 + math.cos(math.pi / 4))),
        (850, "1-sqrt", 0.1, 0.1 + 0.9 * 0.5),
        (1000, "1-sqrt", 0.1, 0.1),
        (1500, "linear", 0.1, 0.1),
    ],
)
def test_wsd_multiplier(t, shape, alpha_f, expected):
    got = wsd_multiplier(t, **WSD, decay_shape=shape, final_multiplier=alpha_f)
    assert got == pytest.approx(expected, abs=1e-12)


def test_warmup_start_decay_only_and_no_decay():
    assert wsd_multiplier(50, **WSD, warmup_start=0.2) == pytest.approx(0.6)
    assert warmup_multiplier(0, warmup=0) == 1.0
    # plain cosine decay from the first step, and a zero-length decay that never decays
    assert decay_multiplier(500, decay_start=0, total=1000, decay_shape="cosine") == pytest.approx(0.5)
    assert wsd_multiplier(1000, warmup=10, decay_start=1000, total=1000) == 1.0
    with pytest.raises(ValueError, match="warmup <= decay_start"):
        wsd_multiplier(10, warmup=900, decay_start=800, total=1000)
    with pytest.raises(ValueError, match="decay_shape='square'"):
        wsd_multiplier(900, **WSD, decay_shape="square")


def make_state(max_duration, dataloader_len=None):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    state = State(
        model=model,
        rank_zero_seed=0,
        run_name="schedule-test",
        device=DeviceCPU(),
        max_duration=max_duration,
        optimizers=optimizer,
    )
    if dataloader_len is not None:
        state.set_dataloader(list(range(dataloader_len)), "train", dataloader_len)
    return state


def at(scheduler, state, ssr=1.0, **counts):
    state.timestamp = Timestamp(**counts)
    return scheduler(state, ssr)


def test_wsd_in_batches_and_fractions():
    state = make_state("1000ba")
    wsd = WarmupStableDecayScheduler(t_warmup="100ba", t_decay="0.2dur", decay_shape="1-sqrt")
    assert at(wsd, state, batch=0) == 0.0
    assert at(wsd, state, batch=50) == pytest.approx(0.5)
    assert at(wsd, state, batch=799) == 1.0
    assert at(wsd, state, batch=850) == pytest.approx(1 - math.sqrt(0.25))
    assert at(wsd, state, batch=1000) == 0.0
    # ssr=2 stretches the decay (t_decay in batches) but not the warmup, as Composer's schedulers do.
    stretched = WarmupStableDecayScheduler(t_warmup="100ba", t_decay="200ba", decay_shape="linear")
    assert at(stretched, state, ssr=2.0, batch=50) == pytest.approx(0.5)
    assert at(stretched, state, ssr=2.0, batch=700) == pytest.approx(0.75)  # t_max 1000, decay 400


def test_wsd_in_tokens_with_warmup_and_decay_on_different_clocks():
    state = make_state("1e6tok")
    wsd = WarmupStableDecayScheduler(t_warmup="3e4tok", t_decay="0.1dur", decay_shape="linear", alpha_f=0.2)
    assert at(wsd, state, batch=3, token=15_000) == pytest.approx(0.5)
    assert at(wsd, state, batch=50, token=500_000) == 1.0
    assert at(wsd, state, batch=95, token=950_000) == pytest.approx(0.2 + 0.8 * 0.5)
    # A warmup counted in tokens while max_duration counts batches (batch-size warmup changes the ratio).
    state = make_state("1000ba")
    wsd = WarmupStableDecayScheduler(t_warmup="3e4tok", t_decay="0.5dur", decay_shape="linear")
    assert at(wsd, state, batch=10, token=7_500) == pytest.approx(0.25)
    assert at(wsd, state, batch=750, token=9_000_000) == pytest.approx(0.5)


def test_phases_split_into_separate_runs():
    state = make_state("1000ba")
    stable = build_scheduler({"name": "wsd", "t_warmup": "100ba", "t_decay": "0ba"})
    assert [at(stable, state, batch=b) for b in (50, 999, 1000)] == [pytest.approx(0.5), 1.0, 1.0]
    constant = build_scheduler({"name": "constant", "t_warmup": "100ba"})
    assert [at(constant, state, batch=b) for b in (50, 1000)] == [pytest.approx(0.5), 1.0]
    decay_only = build_scheduler(
        {"name": "wsd", "t_warmup": "0ba", "t_decay": "1dur", "decay_shape": "1-sqrt"}
    )
    assert [at(decay_only, state, batch=b) for b in (0, 250, 1000)] == [1.0, pytest.approx(0.5), 0.0]
    cosine = build_scheduler({"name": "cosine", "t_warmup": "0.1dur", "alpha_f": 0.1})
    assert at(cosine, state, batch=550) == pytest.approx(0.1 + 0.9 * 0.5)
    assert isinstance(cosine, WarmupDecayScheduler) and cosine.decay_shape == "cosine"


def test_epochs_count_as_batches():
    state = make_state("2ep", dataloader_len=50)
    linear = build_scheduler({"name": "linear", "t_warmup": "10ba", "alpha_f": 0.0})
    assert at(linear, state, batch=55) == pytest.approx(0.5)  # decay over batches 10..100
    wsd = WarmupStableDecayScheduler(t_warmup="0ba", t_decay="1ep", decay_shape="linear")
    assert at(wsd, state, batch=75) == pytest.approx(0.5)


def test_compiled_into_the_optimizer_lr():
    """Composer's own glue turns the multiplier into the optimizer's lr."""
    state = make_state("100ba")
    state.timestamp = Timestamp(batch=5)
    lr_scheduler = compile_composer_scheduler(WarmupConstantScheduler(t_warmup="20ba"), state)
    assert state.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5 * 5 / 20)
    state.timestamp = Timestamp(batch=30)
    state.optimizers[0].step()  # the order PyTorch expects
    lr_scheduler.step()
    assert state.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5)


def test_build_scheduler_from_yaml():
    cfg = OmegaConf.create(
        "{name: wsd, t_warmup: 3e9tok, t_decay: 0.1dur, decay_shape: 1-sqrt, alpha_f: 0.0}"
    )
    wsd = build_scheduler(cfg)
    assert isinstance(wsd, WarmupStableDecayScheduler)
    assert (wsd.t_warmup.value, wsd.t_warmup.unit.value, wsd.t_decay.value) == (3_000_000_000, "tok", 0.1)
    assert build_scheduler({"name": "warmup_stable_decay", "alpha_f": None}).alpha_f == 0.0


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"t_warmup": "1ba"}, r"^scheduler: missing key 'name'; choose from wsd, "),
        ({"name": "onecycle"}, r"^scheduler.name='onecycle': unknown; choose from wsd, "),
        (
            {"name": "wsd", "tdecay": "1ba"},
            r"^scheduler.tdecay: unknown key for name 'wsd'; allowed: t_warmup",
        ),
        (
            {"name": "cosine", "decay_shape": "linear"},
            r"^scheduler.decay_shape: unknown key for name 'cosine'",
        ),
        ({"name": "wsd", "t_warmup": "3e9"}, r"^scheduler t_warmup='3e9': not a duration"),
        (
            {"name": "wsd", "t_warmup": 100},
            r"^scheduler t_warmup=100: expected a duration string with a unit",
        ),
        ({"name": "wsd", "t_decay": "5s"}, r"^scheduler t_decay='5s': unit 'sec' not allowed"),
        ({"name": "wsd", "t_decay": "1.5dur"}, r"^scheduler t_decay='1.5dur': must be >= 0"),
        (
            {"name": "wsd", "decay_shape": "exp"},
            r"^scheduler decay_shape='exp': choose from linear, 1-sqrt, cosine",
        ),
        ({"name": "wsd", "alpha_f": 2}, r"^scheduler alpha_f=2: expected a number in \[0, 1\]"),
    ],
)
def test_bad_config_gives_one_line_error_naming_the_key(cfg, message):
    with pytest.raises(ValueError, match=message) as error:
        build_scheduler(cfg)
    assert "\n" not in str(error.value)


def test_durations_that_cannot_fit_the_run():
    state = make_state("1000ba")
    with pytest.raises(
        ValueError, match=r"^scheduler t_warmup=500ba \(500ba\) runs past the decay start at 400ba"
    ):
        at(WarmupStableDecayScheduler(t_warmup="500ba", t_decay="0.6dur"), state, batch=0)
    with pytest.raises(ValueError, match=r"^scheduler t_decay=1000tok is in tok but t_max=1.0dur in ba"):
        at(WarmupStableDecayScheduler(t_decay="1000tok"), state, batch=0)
    with pytest.raises(ValueError, match=r"^scheduler t_decay=2000ba is longer than t_max"):
        at(WarmupStableDecayScheduler(t_decay="2000ba"), state, batch=0)
    with pytest.raises(RuntimeError, match="the train DataSpec reports 0 tokens per batch"):
        at(WarmupConstantScheduler(t_warmup="1e6tok"), state, batch=10, token=0)


class RecordLr(Callback):
    def __init__(self):
        self.lrs = {}

    def before_train_batch(self, state, logger):
        self.lrs[int(state.timestamp.batch)] = state.optimizers[0].param_groups[0]["lr"]


def fit(save_folder, load_path=None):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    model = ComposerClassifier(net, num_classes=4)
    data = TensorDataset(torch.randn(128, 8), torch.randint(0, 4, (128,)))  # one epoch
    record = RecordLr()
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(data, batch_size=8),
        max_duration="16ba",
        optimizers=build_optimizer(model, lr=1e-2),
        schedulers=build_scheduler(
            {"name": "wsd", "t_warmup": "4ba", "t_decay": "0.5dur", "decay_shape": "linear"}
        ),
        save_folder=str(save_folder),
        save_interval="8ba",
        load_path=load_path,
        device="cpu",
        callbacks=[record],
        progress_bar=False,
    )
    trainer.fit()
    return model, {batch: lr / 1e-2 for batch, lr in record.lrs.items()}


@pytest.mark.slow
def test_trainer_runs_the_schedule_and_resumes_it(tmp_path):
    model, multipliers = fit(tmp_path / "full")
    # Composer steps the schedule before it advances the clock: batch k trains at the multiplier of k - 1.
    expected = {0: 0.0, 1: 0.0, 2: 0.25, 4: 0.75, 5: 1.0, 9: 1.0, 10: 0.875, 15: 0.25}
    assert {batch: multipliers[batch] for batch in expected} == pytest.approx(expected)

    resumed, resumed_multipliers = fit(
        tmp_path / "resumed", load_path=str(tmp_path / "full" / "ep0-ba8-rank0.pt")
    )
    assert resumed_multipliers == pytest.approx({b: m for b, m in multipliers.items() if b >= 8})
    for a, b in zip(model.parameters(), resumed.parameters()):  # optimizer state came back exactly
        assert torch.equal(a, b)
