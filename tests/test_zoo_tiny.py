"""The shipped default model, privatelora/zoo/tiny: loads offline, is the Llama we say it is,
fits in the repo, and has actually learnt Shakespeare (held-out loss far below chance).

Trained by benchmarks/train_tiny.py; numbers quoted from its model card (README.md there).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "privatelora" / "zoo" / "tiny"
HAMLET = REPO.parent / "shared" / "data" / "corpus" / "shakespeare" / "hamlet_gut.txt"

# A fixed 2,000-token slice of Hamlet (held out from training), scored as 4 windows of 500.
SLICE_START, SLICE_LEN, WINDOW = 30_000, 2_000, 500
# The shipped model measures 3.900 nats/token on this slice (ppl 49.4; 3.83 over the whole
# play); chance is ln(2048) = 7.62 and random inits of the same shape score 7.64-7.69. The
# threshold is the measured value plus 0.1 nats: float noise across machines and thread counts
# is ~1e-5, so only a wrong, damaged or untrained checkpoint fails it.
MAX_SLICE_LOSS = 4.0
MAX_BYTES = 25_000_000


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TINY, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(TINY, local_files_only=True)
    return model.eval(), tok


def slice_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        x = ids.view(-1, WINDOW)
        logits = model(input_ids=x[:, :-1]).logits
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1)).item()


def test_checkpoint_files_and_size():
    names = {p.name for p in TINY.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    total = sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())
    assert total < MAX_BYTES, f"zoo/tiny is {total / 1e6:.1f} MB"


def test_is_llama_with_gqa(tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, tok = tiny
    cfg = model.config
    assert isinstance(cfg, LlamaConfig) and isinstance(model, LlamaForCausalLM)
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert not cfg.tie_word_embeddings
    assert cfg.vocab_size == len(tok)
    assert model.dtype == torch.float32
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert (cfg.bos_token_id, cfg.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)


def test_tokenizer_round_trips_verse(tiny):
    _, tok = tiny
    for text in ("But, soft! what light through yonder window breaks?",
                 "Rom.\nIt is the east, and Juliet is the sun.\n\n[Exit.]\n",
                 "  odd   spacing, digits 1623 and caf\u00e9 \u00e0 la mode\n"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < len(tok) for i in ids)
    # byte-level BPE, not bytes: a line of verse takes well under one token per byte
    line = "To be, or not to be,--that is the question:--"
    assert len(tok.encode(line)) < len(line) / 2


def test_heldout_loss_beats_threshold_and_random_init(tiny):
    from transformers import AutoModelForCausalLM

    if not HAMLET.is_file():
        pytest.skip(f"corpus not found at {HAMLET}")
    model, tok = tiny
    ids = tok(HAMLET.read_text(encoding="utf-8"), add_special_tokens=False,
              verbose=False).input_ids
    ids = torch.tensor(ids[SLICE_START:SLICE_START + SLICE_LEN])
    assert len(ids) == SLICE_LEN
    loss = slice_loss(model, ids)
    assert loss < MAX_SLICE_LOSS, f"held-out loss {loss:.3f} (ppl {math.exp(loss):.1f})"

    torch.manual_seed(0)
    random_init = AutoModelForCausalLM.from_config(model.config).eval()
    assert slice_loss(random_init, ids) > MAX_SLICE_LOSS + 2  # the threshold bites
