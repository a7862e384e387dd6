"""Sampling on the device: logits -> next token (greedy, or seeded temperature / top-p),
and the verification of drafted tokens (speculative decoding).

``verify`` keeps the output exact. Greedy: the longest prefix of drafts that agrees with the
target's argmax, then the target's own next token, so the tokens are those of plain
greedy decoding. Sampling: standard speculative sampling (Leviathan et al. 2023, Chen et
al. 2023): accept draft d with probability min(1, p(d) / q(d)), else sample from the
normalized residual max(0, p - q) and stop; after K acceptances sample one more token from
p. Every emitted token is then distributed exactly as the target's (processed)
distribution p, whatever the draft proposes. A deterministic draft (n-gram lookup) has
q = one-hot at its token.
"""

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

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution this sampler draws from: softmax at the temperature, cut to the
        smallest top-p prefix (not renormalized: multinomial normalizes), on the CPU."""
        p = self.params
        probs = torch.softmax(logits.float().cpu() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sp, idx = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, -1) - sp < p.top_p   # smallest prefix reaching top_p
            sp = sp * keep
            probs = torch.zeros_like(probs).scatter_(0, idx, sp)
        return probs

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def uniform(self) -> float:
        return float(torch.rand(1, generator=self.gen))

    def __call__(self, logits: torch.Tensor) -> int:
        """``logits`` [vocab] -> next token id."""
        if self.greedy:
            return int(torch.argmax(logits))
        return self.draw(self.probs(logits))

    def verify(self, logits: torch.Tensor, drafts: list[int], draft_probs=None) -> tuple[int, int]:
        """Check ``drafts`` (K tokens) against the target's ``logits`` [K + 1, vocab] (row i
        predicts the token after draft i, row 0 the first draft). Returns (how many drafts
        are accepted, the token that follows them). ``draft_probs``: the draft's
        distribution for each drafted token (None: a deterministic draft)."""
        k = len(drafts)
        if logits.shape[0] != k + 1:
            raise PrivateLoRAError(f"verifying {k} drafts needs {k + 1} rows of logits, got {logits.shape[0]}")
        if self.greedy:
            n = 0
            while n < k and int(torch.argmax(logits[n])) == drafts[n]:
                n += 1
            return n, int(torch.argmax(logits[n]))
        for i, d in enumerate(drafts):
            p = self.probs(logits[i])
            p = p / p.sum()
            if draft_probs is None or draft_probs[i] is None:
                q = torch.zeros_like(p)
                q[d] = 1.0
            else:
                q = draft_probs[i].float().cpu()
                q = q / q.sum()
            if q[d] > 0 and self.uniform() < min(1.0, float(p[d] / q[d])):
                continue
            residual = (p - q).clamp_min(0)
            return i, self.draw(residual if residual.sum() > 0 else p)
        return k, self.draw(self.probs(logits[k]))
