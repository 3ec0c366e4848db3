"""The mvfoul freezing strategies train exactly the parameters docs/recipes/mvfoul.md says, epoch by
epoch (recipes/mvfoul/freezing.py on the engine's FreezeSchedule)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trainlib.freezing import resolve
from recipes.mvfoul import FoulRecognizer, build_mvfoul_model, callbacks


class State:
    """What FreezeSchedule touches of a TrainState: the epoch and set_trainable (applied directly)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.epoch = model, 0

    def set_trainable(self, changes: dict) -> list:
        for name, train in resolve(self.model, changes).items():
            self.model.get_parameter(name).requires_grad_(train)
        return []


def config(strategy: str, freeze_epochs: int = 2, patience: int = 2, momentum: float = 0.0) -> SimpleNamespace:
    model = SimpleNamespace(backbone_name="tiny3d", freezing_strategy=strategy, freeze_epochs=freeze_epochs,
                            adaptive_patience=patience, gradient_momentum=momentum)
    return SimpleNamespace(model=model, trainer=SimpleNamespace(monitor="val/leaderboard_value", mode="max"))


def training_parts(model: FoulRecognizer) -> set[str]:
    """Which top-level parts get gradients after one backward (backbone stages named)."""
    model.zero_grad(set_to_none=True)
    clips = torch.randint(0, 255, (2, 2, 3, 4, 16, 16), dtype=torch.uint8)
    out = model(clips)
    (out["action"].sum() + out["offence"].sum()).backward()
    parts = set()
    for name, p in model.named_parameters():
        if p.grad is not None:
            parts.add(".".join(name.split(".")[:3]) if name.startswith("net.backbone") else name.split(".")[1])
    return parts


HEADS = {"aggregation", "inter", "fc_action", "fc_offence"} - {"aggregation"}  # max pooling has no weights
STAGES = ["net.backbone.stem", "net.backbone.layer1", "net.backbone.layer2", "net.backbone.layer3"]


def run_epochs(strategy: str, epochs: int, values=(), **kw) -> list[set[str]]:
    torch.manual_seed(0)
    model = FoulRecognizer(build_mvfoul_model("tiny3d", "max"))
    schedules = callbacks(config(strategy, **kw))
    state = State(model)
    for cb in schedules:
        cb.on_fit_start(state)
    seen = []
    for epoch in range(epochs):
        state.epoch = epoch
        for cb in schedules:
            cb.on_train_epoch_start(state)
        seen.append(training_parts(model))
        for cb in schedules:
            cb.on_validation_end(state, {"val/leaderboard_value": values[epoch] if epoch < len(values) else 50.0})
    return seen


def test_none_trains_everything():
    assert run_epochs("none", 1) == [HEADS | set(STAGES)]


def test_fixed_freezes_the_backbone_then_releases_it():
    seen = run_epochs("fixed", 4, freeze_epochs=2)
    assert seen[:2] == [HEADS, HEADS] and seen[2:] == [HEADS | set(STAGES)] * 2
    assert run_epochs("fixed", 3, freeze_epochs=0) == [HEADS] * 3  # 0: frozen for the whole run


def test_gradual_opens_one_stage_at_a_time_from_the_top():
    seen = run_epochs("gradual", 8, freeze_epochs=2)
    top = list(reversed(STAGES))
    expected = [HEADS, HEADS] + [HEADS | set(top[:1])] * 2 + [HEADS | set(top[:2])] * 2 + [HEADS | set(top[:3])] * 2
    assert seen == expected


def test_advanced_opens_on_a_smoothed_plateau():
    # improving, then flat: with patience 2 the top stage opens after two validations without a new best
    seen = run_epochs("advanced", 6, values=[10, 20, 20, 20, 20, 20], patience=2)
    assert seen[:4] == [HEADS] * 4 and seen[4] == HEADS | {"net.backbone.layer3"}
    # momentum smooths: a noisy dip does not count as a plateau when the average still rises
    noisy = run_epochs("advanced", 6, values=[10, 30, 25, 40, 35, 50], patience=2, momentum=0.5)
    assert noisy == [HEADS] * 6
    raw = run_epochs("advanced", 6, values=[10, 30, 25, 28, 35, 50], patience=2, momentum=0.0)
    assert raw[4] == HEADS | {"net.backbone.layer3"}


@pytest.mark.parametrize("strategy", ["fixed", "gradual", "advanced"])
def test_schedule_state_survives_a_resume(strategy):
    schedules = callbacks(config(strategy))
    saved = [cb.state_dict() for cb in schedules]
    again = callbacks(config(strategy))
    for cb, s in zip(again, saved):
        cb.load_state_dict(s)
        assert cb.state_dict() == s
