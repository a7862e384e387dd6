"""Sampling on the device: logits -> next token (greedy, or seeded temperature / top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from privatelora.config import PrivateLoRAError


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
