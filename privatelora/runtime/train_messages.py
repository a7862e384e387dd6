"""The messages of split training: plain dataclasses, no codec (``wire/training.py``).

A training step of one session, with L adapted cloud layers:

    up    TrainHandoff      x_in [n, d] + segment lengths    (embedding / head-layer output)
    down  Activations       A h of cloud layer l             (as in serving)
    up    Reply             M a of cloud layer l             (as in serving)
    down  Handoff           hidden states after the last cloud layer, every row
    up    GradHandoff       dL/d(hidden) of that hand-off [n, d]
    down  GradReply         dL/dm of layer l, one [n, r] per target      (l = last .. first)
    up    GradActivations   dL/da of layer l, one [n, r] per A
    down  GradInput         dL/dx_in [n, d]   (only with device head layers, which carry M)
    down  GradDone          the backward is over (no device head layers)

``TrainHandoff`` with ``backward=False`` is a forward-only pass (held-out loss through the
split): the cloud keeps no graph and answers with the final ``Handoff`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from privatelora.runtime.messages import Message, tupled


@dataclass(frozen=True, repr=False, eq=False)
class TrainHandoff(Message):
    """Device -> cloud: a training forward of ``len(lengths)`` sequences, each from position 0,
    concatenated into ``hidden`` [sum(lengths), hidden]. ``backward``: keep the graph for a
    backward pass (False: forward only, e.g. held-out loss)."""

    session: int
    lengths: tuple[int, ...]
    hidden: torch.Tensor
    backward: bool = True

    def __post_init__(self):
        tupled(self, "lengths")


@dataclass(frozen=True, repr=False, eq=False)
class GradHandoff(Message):
    """Device -> cloud: dL/d(hidden) of the cloud's final hand-off, [n, hidden]."""

    session: int
    grad: torch.Tensor


@dataclass(frozen=True, repr=False, eq=False)
class GradReply(Message):
    """Cloud -> device: dL/dm of one layer, one [n, rank] tensor per target."""

    session: int
    layer: int
    grads: tuple[torch.Tensor, ...]

    def __post_init__(self):
        tupled(self, "grads")


@dataclass(frozen=True, repr=False, eq=False)
class GradActivations(Message):
    """Device -> cloud: dL/da of one layer, one [n, rank] tensor per A (1 with shared_a)."""

    session: int
    layer: int
    grads: tuple[torch.Tensor, ...]

    def __post_init__(self):
        tupled(self, "grads")


@dataclass(frozen=True, repr=False, eq=False)
class GradInput(Message):
    """Cloud -> device: dL/d(x_in) of the first cloud layer's input, [n, hidden]."""

    session: int
    grad: torch.Tensor


@dataclass(frozen=True, repr=False)
class GradDone(Message):
    """Cloud -> device: the backward of this step is over and its graphs are freed."""

    session: int


TRAINING_KINDS = (TrainHandoff, GradHandoff, GradReply, GradActivations, GradInput, GradDone)
UP_TRAINING_KINDS = (TrainHandoff, GradHandoff, GradActivations)
