"""Text in and out on the device: prompts tokenized as transformers does, chat templates,
and incremental detokenization with stop strings.

``encode_prompt`` calls the tokenizer itself (``tokenizer(text)``), so its own special-token
handling decides whether a BOS goes first: Llama-style tokenizers add one, GPT-2-style and
many others define a BOS they never add, some have none. ``add_special_tokens`` overrides
that only when it is given. ``encode_chat`` renders a conversation through the
checkpoint's chat template (or one given), which writes any BOS itself.

``TextStream`` turns tokens into text as they arrive (decoding only the newest few
tokens each time), never emitting half a UTF-8 character or the start of what may become
a stop string; the application sees the text a final decode gives, cut before the first
stop string.
"""

from __future__ import annotations

from privatelora.config import PrivateLoRAError


class PromptError(PrivateLoRAError):
    """A prompt or conversation this tokenizer cannot turn into token ids."""


def encode_prompt(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of ``text`` as ``tokenizer(text)`` gives them; ``add_special_tokens`` set
    to True or False overrides the tokenizer's own choice."""
    if tokenizer is None:
        raise PromptError("this checkpoint has no tokenizer: give token ids")
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be text, got {type(text).__name__}")
    kw = {} if add_special_tokens is None else {"add_special_tokens": bool(add_special_tokens)}
    return [int(i) for i in tokenizer(text, **kw)["input_ids"]]


ROLES = ("system", "user", "assistant", "developer", "tool")


def chat_messages(messages) -> list[dict]:
    """Validated ``[{"role", "content"}]``: content is text or a list of text parts
    (``{"type": "text", "text": ...}``, as the OpenAI API sends it), joined into text."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise PromptError(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise PromptError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise PromptError(f"messages[{i}].content[{j}]: only text parts are supported")
                parts.append(p["text"])
            content = "".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise PromptError(f"messages[{i}].content must be text")
        out.append({"role": role, "content": content})
    return out


def has_chat_template(tokenizer, chat_template: str | None = None) -> bool:
    return tokenizer is not None and bool(chat_template or getattr(tokenizer, "chat_template", None))


def encode_chat(tokenizer, messages, chat_template: str | None = None) -> list[int]:
    """Token ids of a conversation rendered by the chat template, ending with the
    assistant's turn opened (``add_generation_prompt``)."""
    if tokenizer is None:
        raise PromptError("this checkpoint has no tokenizer: a chat needs one")
    if not has_chat_template(tokenizer, chat_template):
        raise PromptError("this checkpoint's tokenizer has no chat template: give one with --chat-template FILE")
    msgs = chat_messages(messages)
    try:
        text = tokenizer.apply_chat_template(msgs, chat_template=chat_template, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja raises many types (TemplateError, TypeError, ...)
        raise PromptError(f"the chat template failed: {e}") from e
    # the template writes any special tokens itself: tokenize it as apply_chat_template does
    return encode_prompt(tokenizer, text, add_special_tokens=False)


def check_prompt(ids: list[int], vocab_size: int, max_positions: int, max_new_tokens: int) -> None:
    """Raise ``PromptError`` unless ``ids`` are valid ids that leave room for the output."""
    if not ids:
        raise PromptError("the prompt is empty")
    if any(not isinstance(i, int) or i < 0 or i >= vocab_size for i in ids):
        raise PromptError(f"prompt token ids must be integers in [0, {vocab_size})")
    if len(ids) + max_new_tokens > max_positions:
        raise PromptError(f"the prompt ({len(ids)} tokens) plus {max_new_tokens} new tokens exceeds the "
                          f"model's {max_positions} positions")


class TextStream:
    """Tokens in, text out: ``push(ids)`` returns the text now safe to show, ``close()``
    the rest. After a stop string appears, ``stopped`` is True, the text ends just before
    it, and ``tokens_used`` counts the tokens up to the one that completed it.

    Decoding is incremental, as vLLM does it: each token decodes only a short window (the
    tokens since the last piece, after those of the piece before, which give the tokenizer
    the context it needs, e.g. for a leading space), not the whole output again. A piece that
    ends in a partial character (U+FFFD from an incomplete byte sequence) waits for the
    next token."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.emitted = 0              # characters of the text already returned
        self.text = ""                # decoded text, cut before a stop string once found
        self.stopped = False
        self.tokens_used = 0
        self._prefix = 0              # tokens[_prefix:_read]: the last piece, context of the next
        self._read = 0                # tokens before this one are in ``text``

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool = False) -> None:
        """Append the text of the tokens not yet in ``text``: what tokens[_prefix:] decodes to
        beyond tokens[_prefix:_read]."""
        before = self._decode(self.tokens[self._prefix:self._read])
        after = self._decode(self.tokens[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)

    def push(self, ids) -> str:
        if self.stopped:
            return ""
        for tok in ids:
            self.tokens.append(int(tok))
            self._advance()
            if self.stop:
                # a stop string can only newly appear near the end: search from where it could start
                start = max(0, self.emitted - max(map(len, self.stop)))
                hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
                if hits:
                    self.text, self.stopped = self.text[:min(hits)], True
                    break
        self.tokens_used = len(self.tokens)
        if self.stopped:
            return self._take(len(self.text))
        return self._take(self._safe_end())

    def close(self) -> str:
        """The text not yet returned (the generation is over): a partial character too."""
        if not self.stopped:
            self._advance(final=True)
        return self._take(len(self.text))

    def _safe_end(self) -> int:
        """How far the text may be shown: not a tail that may be the start of a stop string."""
        end, hold = len(self.text), 0
        for s in self.stop:
            for k in range(min(len(s) - 1, end - self.emitted), hold, -1):
                if self.text[end - k:end] == s[:k]:
                    hold = k
                    break
        return end - hold

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted:end], end
        return out
