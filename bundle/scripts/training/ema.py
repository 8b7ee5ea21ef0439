"""Exponential moving average of a network's weights during training (the authors' prompter: decay 0.99).

A thin switch over ignite's :class:`~ignite.handlers.EMAHandler`: after every training iteration
``ema = decay * ema + (1 - decay) * weights`` (parameters and floating-point buffers, e.g. batch-norm statistics;
the average starts from the network's weights at construction). The averaged copy is what validation runs and what
``best.pt`` stores (:class:`scripts.training.checkpoints.TrainingCheckpointer`, its ``ema`` argument); ``last.pt``
keeps both, so a resumed training continues the same average. With the decay off (None or 0) nothing is copied or
updated and :attr:`WeightEMA.network` is the network itself.
"""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers import EMAHandler

from scripts.parse import as_number


def as_decay(value: Any, name: str) -> float | None:
    """An EMA decay in [0, 1) from a config or command-line value; None (also ``"none"``, 0) means off.

    Raises:
        ValueError: naming the option ``name`` when the value is not a number in [0, 1).
    """
    decay = as_number(value, name, float, 0, optional=True)
    if decay is not None and decay >= 1:
        raise ValueError(f"{name} must be below 1 (the weight kept from the average at each step), got {value!r}")
    return decay or None


class WeightEMA:
    """Keep an exponential moving average of ``network``'s weights, updated at every training iteration.

    Args:
        network: the trained network (the module itself, not a DDP wrapper).
        decay: weight of the running average at each update (0.99 in the authors' prompter training); None or 0:
            off.
        name: the option the decay came from, named in errors (``prompter#hparams#ema``).

    Attach it to the trainer like any handler; give :attr:`network` to the evaluator.
    """

    def __init__(self, network: torch.nn.Module, decay: Any = None, name: str = "ema") -> None:
        self.decay = as_decay(decay, name)
        self.source = network
        self._handler = None if self.decay is None else EMAHandler(network, momentum=1.0 - self.decay,
                                                                    handle_buffers="update")

    @property
    def enabled(self) -> bool:
        return self._handler is not None

    @property
    def network(self) -> torch.nn.Module:
        """The averaged copy when enabled, else the trained network itself."""
        return self._handler.ema_model if self._handler is not None else self.source

    def attach(self, engine: Engine) -> None:
        """Update the average after every iteration of ``engine`` (nothing when off)."""
        if self._handler is not None:
            self._handler.attach(engine, name="ema_momentum", warn_if_exists=False)
