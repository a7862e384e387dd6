"""What the device's HTTP API serves, without the HTTP: the models on this device (the
base model and the user's adapters), their text in and out, and the way to the cloud.

A ``DeviceService`` holds one device backbone (embedding, LM head, tokenizer, any device
layers) and one ``DevicePart`` per model name: the base model is M at zero, each adapter
is the user's M. Every generation is one cloud session through ``run_remote``; many run
at once and the cloud batches them. The cloud is a ``cloud`` endpoint or a ``serve``
front door at ``connect``, or, without it, a ``CloudEndpoint`` this process runs itself on
loopback (the whole split in one process, the same path).

Prompts, outputs, token ids and M never leave this process; only the split's low-rank
activations and hand-offs cross to the cloud.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field

from privatelora.config import PrivateLoRAConfig, PrivateLoRAError
from privatelora.model.sampling import SamplingParams
from privatelora.runtime.device import DevicePart
from privatelora.runtime.prompts import PromptError, TextStream, check_prompt, encode_chat, encode_prompt


class ModelNotFound(PrivateLoRAError):
    pass


class CloudFailed(PrivateLoRAError):
    """The cloud could not be reached, refused the session, or lost it for good."""

    def __init__(self, message: str, code: str = "cloud_unavailable"):
        super().__init__(message)
        self.code = code


@dataclass
class Completion:
    """One finished (or finishing) choice."""
    text: str = ""
    finish_reason: str | None = None       # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    resumes: int = 0
    round_trips: int = 0


@dataclass
class Request:
    """One generation: the prompt's ids and how to sample; ``stop``: strings that end it."""
    model: str
    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


class DeviceService:
    def __init__(self, backbone, cfg: PrivateLoRAConfig, adapters: dict | None = None, *,
                 base_name: str | None = None, connect: tuple[str, int] | None = None, tls_ca: str | None = None,
                 tls_server_name: str | None = None, wire_dtype: str = "fp32", timeout: float = 60.0,
                 resume_attempts: int = 8, chat_template: str | None = None, draft=None, draft_tokens: int = 4,
                 cloud=None, link=None):
        """``adapters``: name -> ``PrivateAdapter``; ``cloud``: a ``CloudPart`` to serve in
        this process when ``connect`` is None; ``draft``: a function making a fresh draft
        (``runtime/draft.py``) for each generation, or None."""
        if connect is None and cloud is None:
            raise PrivateLoRAError("give the cloud's address or a cloud part to run here")
        self.backbone, self.cfg = backbone, cfg
        self.tokenizer = backbone.tokenizer
        self.base_name = base_name or backbone.name
        self.parts = {self.base_name: DevicePart(backbone, cfg)}
        for name, adapter in (adapters or {}).items():
            if name in self.parts:
                raise PrivateLoRAError(f"model name {name!r} is used twice")
            self.parts[name] = DevicePart(backbone, cfg, adapter)
        mc = backbone.model.config
        self.vocab_size, self.max_positions = mc.vocab_size, mc.max_position_embeddings
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        self.stop_ids = (eos,) if eos is not None else ()
        self.connect, self.tls_ca, self.tls_server_name = connect, tls_ca, tls_server_name
        self.wire_dtype, self.timeout, self.resume_attempts = wire_dtype, timeout, resume_attempts
        self.chat_template, self.draft, self.draft_tokens, self.link = chat_template, draft, draft_tokens, link
        self.cloud_part = cloud
        self.endpoint = None            # the in-process CloudEndpoint, when there is no ``connect``
        self.connector = None
        self.served = 0
        self.active = 0

    # ---- life ---------------------------------------------------------------------------
    async def start(self) -> "DeviceService":
        """Start the in-process cloud (if any) and the connector, in the running loop."""
        from privatelora.serving.remote import AddressConnector
        if self.connect is None:
            from privatelora.serving.endpoint import CloudEndpoint
            self.endpoint = await CloudEndpoint(self.cloud_part, "127.0.0.1", 0).start()
            host, port, ca, name = *self.endpoint.address, None, None
        else:
            (host, port), ca, name = self.connect, self.tls_ca, self.tls_server_name
        self.connector = AddressConnector(host, port, ca=ca, server_hostname=name, link=self.link,
                                          timeout=min(self.timeout, 30.0))
        return self

    async def stop(self) -> None:
        if self.connector is not None:
            await self.connector.close()
        if self.endpoint is not None:
            await self.endpoint.stop()

    @property
    def cloud_address(self) -> str:
        if self.connect is None:
            return "in-process"
        host, port = self.connect
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def health(self) -> dict:
        out = {"status": "ok", "cloud": self.cloud_address, "models": list(self.parts),
               "active": self.active, "served": self.served}
        if self.endpoint is not None:
            out["cloud_sessions"] = self.endpoint.stats()["sessions"]
            try:
                self.endpoint.check_health()
            except RuntimeError as e:
                out.update(status="unhealthy", reason=str(e))
        return out

    # ---- text in ------------------------------------------------------------------------
    def part(self, model: str) -> DevicePart:
        try:
            return self.parts[model]
        except KeyError:
            raise ModelNotFound(f"the model {model!r} does not exist here; the models are: "
                                + ", ".join(self.parts))

    def encode_text(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text)

    def encode_chat(self, messages) -> list[int]:
        return encode_chat(self.tokenizer, messages, self.chat_template)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def check(self, ids: list[int], max_tokens: int) -> None:
        check_prompt(ids, self.vocab_size, self.max_positions, max_tokens)

    def room(self, ids: list[int]) -> int:
        """The most new tokens after ``ids`` that still fit the model's positions."""
        return self.max_positions - len(ids)

    # ---- generation ---------------------------------------------------------------------
    async def generate(self, req: Request, on_text=None) -> Completion:
        """Run one generation; ``on_text(piece)`` sees its text as it comes (streaming).
        Raises ``CloudFailed`` when the cloud cannot carry it."""
        from privatelora.serving.remote import Resume, ResumeFailed, run_remote
        from privatelora.transport import RemoteError
        part = self.part(req.model)
        if self.tokenizer is None:
            raise PromptError("this checkpoint has no tokenizer: the API needs one to return text")
        self.check(req.prompt, req.max_tokens)
        seed = req.seed if req.seed is not None else (None if req.temperature == 0 else secrets.randbits(62))
        params = SamplingParams(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                seed=seed, stop_ids=self.stop_ids)
        text = TextStream(self.tokenizer, req.stop)

        def on_new(gen, tokens):
            piece = text.push(tokens)
            if piece and on_text is not None:
                on_text(piece)
            if text.stopped:
                gen.finish("stop")

        resume = Resume(attempts=self.resume_attempts) if self.resume_attempts else None
        self.active += 1
        try:
            gen = await run_remote(self.connector, part, req.prompt, params, dtype=self.wire_dtype,
                                   timeout=self.timeout, resume=resume, on_new=on_new,
                                   draft=self.draft() if self.draft is not None else None,
                                   draft_tokens=self.draft_tokens)
        except ResumeFailed as e:
            raise CloudFailed(f"cannot reach the cloud at {self.cloud_address}: {e}" if not e.started else
                              f"lost the cloud at {self.cloud_address} and could not resume: {e}")
        except RemoteError as e:
            raise CloudFailed(f"the cloud refused the session: {e}", "cloud_refused")
        except (OSError, asyncio.TimeoutError) as e:
            raise CloudFailed(f"cannot reach the cloud at {self.cloud_address}: {type(e).__name__} {e}")
        finally:
            self.active -= 1
        if gen.error is not None:
            raise CloudFailed(f"the cloud answered {gen.error.code}: {gen.error.reason}", gen.error.code)
        self.served += 1
        rest = text.close()
        if rest and on_text is not None:
            on_text(rest)
        return Completion(text=text.text, finish_reason="stop" if gen.finish_reason == "stop" else "length",
                          prompt_tokens=len(req.prompt),
                          completion_tokens=text.tokens_used if text.stopped else len(gen.tokens),
                          resumes=gen.resumes, round_trips=gen.round_trips)


def draft_factory(spec: str | None, backbone):
    """A function giving a fresh draft per generation (a model draft keeps a per-session
    cache; the weights are loaded once), or None."""
    if not spec:
        return None
    from privatelora.runtime.draft import ModelDraft, NgramDraft, load_draft
    first = load_draft(spec, backbone)
    if isinstance(first, ModelDraft):
        return lambda: ModelDraft(first.model, name=first.name)
    return lambda: NgramDraft(first.max_n) if isinstance(first, NgramDraft) else first
