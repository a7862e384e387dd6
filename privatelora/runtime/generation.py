"""The per-session generation state machine (sampling itself: ``model/sampling.py``).

``Generation`` drives one session through the protocol: ``start()`` gives the first
message for the cloud; ``on(msg)`` consumes whatever the cloud sent and gives the next
message, or None when the session is finished. It does no IO, so any transport (the
in-process runner, TCP, Ray) can carry its messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from privatelora.config import PrivateLoRAError
from privatelora.model.sampling import Sampler, SamplingParams
from privatelora.runtime.messages import Activations, Error, Handoff


@dataclass
class Generation:
    """One session's generation: prompt in, tokens out, all on the device."""

    device: object                           # DeviceSession
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    keep_logits: bool = False                # record logits (tests: prefill rows + each step)
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    done: bool = False
    error: Error | None = None
    finish_reason: str | None = None

    def __post_init__(self):
        if not self.prompt:
            raise PrivateLoRAError("the prompt is empty")
        self.sampler = Sampler(self.params)

    @property
    def session(self) -> int:
        return self.device.session

    def start(self):
        if self.params.max_new_tokens == 0:
            self.done, self.finish_reason = True, "length"
            return None
        return self.device.hand_in(self.prompt, want_all=self.keep_logits)

    def on(self, msg):
        if isinstance(msg, Activations):
            return self.device.reply(msg)
        if isinstance(msg, Error):
            self.error, self.done, self.finish_reason = msg, True, "error"
            return None
        if not isinstance(msg, Handoff):
            raise PrivateLoRAError(f"unexpected message {type(msg).__name__}")
        logits = self.device.logits(msg, all_rows=self.keep_logits and not self.tokens)
        if self.keep_logits:
            self.logits.append(logits.detach().clone())
        tok = self.sampler(logits[-1])
        self.tokens.append(tok)
        if tok in self.params.stop_ids:
            self.done, self.finish_reason = True, "stop"
        elif len(self.tokens) >= self.params.max_new_tokens:
            self.done, self.finish_reason = True, "length"
        if self.done:
            return None
        return self.device.hand_in([tok], want_all=self.keep_logits)
