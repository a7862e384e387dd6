"""Sampling on the device, and the per-session generation state machine.

``Generation`` drives one session through the protocol: ``start()`` gives the first
message for the cloud; ``on(msg)`` consumes whatever the cloud sent and gives the next
message, or None when the session is finished. It does no IO, so any transport (the
in-process runner, TCP, Ray) can carry its messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import PrivateLoRAError
from .protocol import Activations, Error, Handoff


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0        # 0: greedy
    top_p: float = 1.0
    seed: int | None = None         # seeds the sampler of this session
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise PrivateLoRAError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise PrivateLoRAError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise PrivateLoRAError("top_p must be in (0, 1]")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.gen = torch.Generator()
        self.gen.manual_seed(params.seed if params.seed is not None else 0)

    def __call__(self, logits: torch.Tensor) -> int:
        """``logits`` [vocab] -> next token id."""
        p = self.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sp, idx = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, -1) - sp < p.top_p   # smallest prefix reaching top_p
            sp = sp * keep
            probs = torch.zeros_like(probs).scatter_(0, idx, sp)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.gen))


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
