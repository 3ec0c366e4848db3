"""The seed's freezing strategies, as trainlib FreezeSchedules over the backbone's stages.

    none       everything trains from the first step (VARS).
    fixed      the backbone is frozen for the first `freeze_epochs` epochs (only the pooling and the
               heads train), then everything trains; freeze_epochs=0 keeps it frozen for the whole
               run (a linear probe of the pretrained features).
    gradual    the backbone stages unfreeze one at a time from the top: the last stage (layer4) at
               epoch freeze_epochs, the one below at 2 x freeze_epochs, ..., the stem last.
    advanced   the gradual order, but the next stage unfreezes when the monitored validation metric
               (trainer.monitor), smoothed by an exponential moving average with momentum
               `gradient_momentum`, has not improved for `adaptive_patience` validations: the
               backbone opens when the heads stop learning, not on a calendar.

The seed's own implementation is not public; these are our definitions, written down here and in
docs/recipes/mvfoul.md. Every decision comes from the epoch or from reduced validation metrics,
so all ranks agree, and a resumed run trains the same parameters (FreezeSchedule's state is
checkpointed, the smoothed value with it).
"""
from __future__ import annotations

import math
from typing import Any

from trainlib.freezing import FreezeSchedule
from trainlib.state import TrainState

BACKBONE = "net.backbone"


class SmoothedFreezeSchedule(FreezeSchedule):
    """FreezeSchedule whose plateau rule sees an exponential moving average of the monitored value."""

    def __init__(self, *args: Any, momentum: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.momentum, self.smoothed = momentum, None

    def on_validation_end(self, state: TrainState, metrics: dict) -> None:
        value = metrics.get(self.monitor)
        if value is not None and math.isfinite(value):
            m = self.momentum
            self.smoothed = value if self.smoothed is None else m * self.smoothed + (1 - m) * value
            metrics = {**metrics, self.monitor: self.smoothed}
        super().on_validation_end(state, metrics)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "smoothed": self.smoothed}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.smoothed = state.get("smoothed")


def freezing_callbacks(cfg: Any, stages: list[str]) -> list[FreezeSchedule]:
    """The schedule for model.freezing_strategy; `stages` are the backbone's stages in forward order
    (model.backbone_blocks, prefixed with the wrapper's `net.`)."""
    m, every = cfg.model, cfg.model.freeze_epochs
    strategy = m.freezing_strategy
    if strategy == "none":
        return []
    if strategy == "fixed":
        return [FreezeSchedule([BACKBONE], unfreeze_at=[every] if every > 0 else [])]
    groups = [*reversed(stages[1:]), BACKBONE]  # top stage first; the last group is the rest (stem and all)
    if strategy == "gradual":
        step = max(every, 1)
        return [FreezeSchedule(groups, unfreeze_at=[step * (i + 1) for i in range(len(groups))])]
    return [SmoothedFreezeSchedule(groups, patience=m.adaptive_patience, monitor=cfg.trainer.monitor,
                                   mode=cfg.trainer.mode, momentum=m.gradient_momentum)]
