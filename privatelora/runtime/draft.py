"""Drafts for speculative decoding: they run on the device only and propose tokens that the
target (the split model) then verifies, several per chain of round trips.

A draft never changes the output: ``Sampler.verify`` keeps exactly the tokens (greedy) or
the distribution (sampling) of plain decoding. A draft only changes how many tokens one
chain of round trips yields.

- ``NgramDraft``: no model. The longest recent match of the context's last n tokens
  (n = ``max_n`` .. 1) in the session's own context proposes the tokens that followed it.
  Deterministic: its distribution is one-hot at each proposed token.
- ``ModelDraft``: a small causal LM that shares the target's tokenizer (a local Llama-family
  checkpoint, or ``tiny``: the draft shipped for the tiny model in
  ``privatelora/zoo/tiny-draft``), with its own KV cache that follows the accepted context.
  Greedy for a greedy session; for a sampled session it samples from its own distribution
  at the session's temperature / top-p and reports that distribution.

``load_draft(spec, backbone)`` turns ``ngram`` / ``tiny`` / a path into a draft, refusing a
checkpoint whose vocabulary differs from the target's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from privatelora.config import PrivateLoRAError
from privatelora.model.sampling import Sampler

TINY_DRAFT = Path(__file__).resolve().parents[1] / "zoo" / "tiny-draft"


class NgramDraft:
    """Prompt-lookup drafting from the session's own context."""

    name = "ngram"

    def __init__(self, max_n: int = 3):
        self.max_n = max_n

    def propose(self, context: list[int], k: int, sampler: Sampler | None = None):
        for n in range(min(self.max_n, len(context) - 1), 0, -1):
            tail = context[-n:]
            # the most recent earlier occurrence of the tail (not the tail itself)
            for start in range(len(context) - n - 1, -1, -1):
                if context[start:start + n] == tail:
                    follow = context[start + n:start + n + k]
                    if follow:
                        return list(follow), None
        return [], None

    def reset(self) -> None:
        pass


class ModelDraft:
    """A small causal LM on the device, its cache kept in step with the accepted context."""

    def __init__(self, model, name: str = "model"):
        self.model = model.eval()
        self.name = name
        self.vocab = model.config.vocab_size
        self.max_positions = model.config.max_position_embeddings
        self.gen = torch.Generator().manual_seed(0)
        self.reset()

    def reset(self) -> None:
        self.cache = None
        self.seen: list[int] = []       # tokens the cache holds

    def _crop(self, keep: int) -> None:
        """Keep the first ``keep`` positions of the cache (transformers removes by count)."""
        drop = self.cache.get_seq_length() - keep
        if drop > 0:
            self.cache.crop(-drop)
        self.seen = self.seen[:keep]

    @torch.no_grad()
    def _feed(self, ids: list[int]) -> torch.Tensor:
        if self.cache is None:
            from transformers import DynamicCache
            self.cache = DynamicCache(config=self.model.config)
            self.cache.activate_past_recording()   # sliding-window layers must be able to roll back
        out = self.model(input_ids=torch.tensor([ids]), cache=self.cache, use_cache=True)
        self.cache = out.cache
        self.seen.extend(ids)
        return out.logits[0, -1]

    @torch.no_grad()
    def propose(self, context: list[int], k: int, sampler: Sampler | None = None):
        if len(context) + k > self.max_positions:
            k = self.max_positions - len(context)
        if k <= 0:
            return [], None
        # the context only grows by accepted tokens: keep the cached common prefix and feed the
        # rest, at least the last token, whose logits start the drafts
        common = 0
        for a, b in zip(self.seen, context):
            if a != b:
                break
            common += 1
        keep = min(common, len(context) - 1)
        if keep == 0:
            self.reset()
        elif keep < len(self.seen):
            self._crop(keep)
        logits = self._feed(context[keep:])
        greedy = sampler is None or sampler.greedy
        tokens, probs = [], []
        for i in range(k):
            if greedy:
                tok = int(torch.argmax(logits))
            else:
                q = sampler.probs(logits)
                tok = int(torch.multinomial(q, 1, generator=self.gen))
                probs.append(q)
            tokens.append(tok)
            if i + 1 < k:
                logits = self._feed([tok])
        # forget the proposals: only what the target accepts becomes context
        if len(self.seen) > len(context):
            self._crop(len(context))
        return tokens, (None if greedy else probs)


def load_draft(spec: str, backbone=None):
    """``ngram``, ``tiny`` or a local checkpoint directory -> a draft; the checkpoint must
    share the target's vocabulary (``backbone``: the target, for that check)."""
    if spec == "ngram":
        return NgramDraft()
    path = TINY_DRAFT if spec == "tiny" else Path(spec)
    if not (path / "config.json").is_file():
        what = "the shipped tiny draft is missing from this installation" if spec == "tiny" else \
            "not a local checkpoint directory (no config.json)"
        raise PrivateLoRAError(f"--draft {spec}: {what} ({path})")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    if cfg.model_type not in ("llama", "mistral", "qwen2"):
        raise PrivateLoRAError(f"--draft {spec}: a {cfg.model_type} model; drafts are Llama-family checkpoints")
    if backbone is not None:
        target = backbone.model.config.vocab_size
        if cfg.vocab_size != target:
            raise PrivateLoRAError(f"--draft {spec}: its vocabulary has {cfg.vocab_size} tokens, the target's "
                                   f"{target}: a draft must share the target's tokenizer")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    return ModelDraft(model, name="tiny" if spec == "tiny" else str(path))
