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
    """One session's generation: prompt in, tokens out, all on the device.

    With a ``draft`` (``runtime/draft.py``), each chain after the prefill hands in the last
    token plus up to ``draft_tokens`` drafted ones; the target's logits for all of them come
    back from one chain of round trips, ``Sampler.verify`` keeps the agreeing prefix plus
    the target's next token, and the session rewinds past the rejected drafts (the cloud
    truncates its caches to the next hand-off's start)."""

    device: object                           # DeviceSession
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    keep_logits: bool = False                # record logits (tests: prefill rows + each step)
    draft: object | None = None              # NgramDraft / ModelDraft, or None
    draft_tokens: int = 4
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    done: bool = False
    error: Error | None = None
    finish_reason: str | None = None
    round_trips: int = 0                     # messages to the cloud, each answered once
    proposed: int = 0                        # drafted tokens sent for verification
    accepted: int = 0                        # of those, accepted
    verifies: int = 0                        # chains that verified drafts

    resumes: int = 0                         # times the session was rebuilt on a (new) cloud session
    recoveries: list[float] = field(default_factory=list)   # seconds from each loss to being back

    def __post_init__(self):
        if not self.prompt:
            raise PrivateLoRAError("the prompt is empty")
        if self.draft_tokens < 1:
            raise PrivateLoRAError("draft_tokens must be >= 1")
        self.sampler = Sampler(self.params)
        self._drafts: list[int] = []
        self._draft_probs = None
        self._chain: tuple[int, list[int], bool] | None = None   # (start, ids, want_all) in flight
        self._replay: list[int] | None = None     # positions still to replay after a resume
        self._replay_chunk = 2048

    @property
    def session(self) -> int:
        return self.device.session

    def stats(self) -> dict:
        """Round trips and drafting, for reports (no token values)."""
        out = {"round_trips": self.round_trips, "resumes": self.resumes, "recovery_s": list(self.recoveries),
               "round_trips_per_token": self.round_trips / len(self.tokens) if self.tokens else None}
        if self.draft is not None:
            out["draft"] = {"name": getattr(self.draft, "name", "draft"), "proposed": self.proposed,
                            "accepted": self.accepted, "verifies": self.verifies,
                            "accept_rate": self.accepted / self.proposed if self.proposed else None}
        return out

    @property
    def replaying(self) -> bool:
        """True while a resumed session is still replaying the positions before its lost chain."""
        return self._replay is not None

    def finish(self, reason: str = "stop") -> None:
        """End the generation here (the application found a stop string in the text)."""
        self.done, self.finish_reason = True, reason

    def _send(self, msg):
        self.round_trips += 1
        return msg

    def _hand_in(self, ids: list[int], want_all: bool):
        """Start a chain: hand ``ids`` in, remembering them so that a lost chain can be redone."""
        self._chain = (self.device.pos, list(ids), want_all)
        return self._send(self.device.hand_in(ids, want_all=want_all))

    def start(self):
        if self.params.max_new_tokens == 0:
            self.done, self.finish_reason = True, "length"
            return None
        return self._hand_in(self.prompt, self.keep_logits)

    def resume(self, device, max_chunk: int = 2048):
        """Carry on in a fresh device session ``device`` (a new cloud session, on any replica)
        after the cloud lost the old one mid-chain: the cloud's KV cache is only a cache, and
        every token it held is here. Returns the first message for the new session: a
        replay of every position before the lost chain, in hand-offs of at most
        ``max_chunk`` tokens whose answers only rebuild caches, after which ``on`` hands
        the lost chain in again exactly as it was. Nothing is sampled twice, so greedy and
        seeded sampling give the tokens an uninterrupted run gives."""
        if self.done or self._chain is None:
            raise PrivateLoRAError("nothing to resume: the generation has not started or is over")
        if max_chunk < 1:
            raise PrivateLoRAError("max_chunk must be >= 1")
        start, ids, want_all = self._chain
        context = self.prompt + self.tokens
        if len(context) < start:
            raise PrivateLoRAError(f"cannot replay {start} positions from {len(context)} tokens")
        device.comm = self.device.comm          # one session's accounting, whatever carried it
        self.device = device
        self.resumes += 1
        self._replay, self._replay_chunk = list(context[:start]), max_chunk
        return self._next_replay()

    def _next_replay(self):
        """The next replay hand-off, or the lost chain itself once everything before it is back."""
        if not self._replay:
            self._replay = None
            _, ids, want_all = self._chain
            return self._hand_in(ids, want_all)
        part, self._replay = self._replay[:self._replay_chunk], self._replay[self._replay_chunk:]
        return self._send(self.device.hand_in(part, want_all=False))

    def on(self, msg):
        if isinstance(msg, Activations):
            return self._send(self.device.reply(msg))
        if isinstance(msg, Error):
            self.error, self.done, self.finish_reason = msg, True, "error"
            return None
        if not isinstance(msg, Handoff):
            raise PrivateLoRAError(f"unexpected message {type(msg).__name__}")
        if self._replay is not None:     # a replay's answer: caches rebuilt up to here
            self.device.logits(msg)               # runs any device tail layers; the logits are not used
            return self._next_replay()
        drafts, self._drafts = self._drafts, []
        if drafts:
            logits = self.device.logits(msg, all_rows=True)       # one row per handed-in token
            n, nxt = self.sampler.verify(logits, drafts, self._draft_probs)
            self.proposed, self.accepted, self.verifies = self.proposed + len(drafts), self.accepted + n, \
                self.verifies + 1
            if n < len(drafts):
                self.device.rewind(self.device.pos - (len(drafts) - n))
            emitted = drafts[:n] + [nxt]
            if self.keep_logits:
                self.logits.append(logits[:n + 1].detach().clone())
        else:
            logits = self.device.logits(msg, all_rows=self.keep_logits and not self.tokens)
            if self.keep_logits:
                self.logits.append(logits.detach().clone())
            emitted = [self.sampler(logits[-1])]
        for tok in emitted:
            self.tokens.append(tok)
            if tok in self.params.stop_ids:
                self.done, self.finish_reason = True, "stop"
            elif len(self.tokens) >= self.params.max_new_tokens:
                self.done, self.finish_reason = True, "length"
            if self.done:
                return None
        last = self.tokens[-1]
        room = self.params.max_new_tokens - len(self.tokens) - 1     # drafts beyond it are wasted
        if self.draft is not None and room > 0:
            drafts, self._draft_probs = self.draft.propose(
                self.prompt + self.tokens, min(self.draft_tokens, room), self.sampler)
            self._drafts = list(drafts)
            if self._drafts:
                return self._hand_in([last] + self._drafts, True)
        return self._hand_in([last], self.keep_logits)
