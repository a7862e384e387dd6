"""The tiny model zoo: small Llama-family models built from configs, nothing downloaded.

``tiny`` resolves to the shipped trained model when ``zoo/tiny`` exists in the package,
and otherwise to a small random Llama with a byte-level tokenizer. ``tiny-llama``,
``tiny-mistral`` and ``tiny-qwen2`` are random models of each supported family, with the
features that matter for parity: grouped-query attention, q/k/v biases (Qwen2), sliding
window (Mistral), untied LM head.
"""

from __future__ import annotations

from pathlib import Path

import torch

from privatelora.config import PrivateLoRAError

FAMILIES = ("llama", "mistral", "qwen2")
SHIPPED = Path(__file__).resolve().parents[1] / "zoo" / "tiny"   # privatelora/zoo/tiny: data, not code


def byte_tokenizer():
    """A byte-level tokenizer (256 byte symbols + <s>, </s>), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def tiny_config(family: str = "llama", **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=258, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    if family == "llama":
        cfg = LlamaConfig(**{**common, **overrides})
    elif family == "mistral":
        cfg = MistralConfig(**{**common, "sliding_window": 24, **overrides})
    elif family == "qwen2":
        # windows on the upper layers only, as Qwen2 does with max_window_layers
        cfg = Qwen2Config(**{**common, "use_sliding_window": True, "sliding_window": 24,
                             "max_window_layers": 2, **overrides})
    else:
        raise PrivateLoRAError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")
    return cfg


def tiny_random(family: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised tiny model of ``family`` (deterministic in ``seed``)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # HF inits biases at zero; random ones make the Qwen2 test bite
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.05)
    return model


def load_tiny(name: str = "tiny"):
    """(model, tokenizer) for ``tiny`` or ``tiny-<family>``."""
    if name == "tiny":
        if not (SHIPPED / "config.json").is_file():   # never stand in a random model for the trained one
            raise PrivateLoRAError(f"the shipped tiny model is missing from this installation ({SHIPPED})")
        from transformers import AutoModelForCausalLM, AutoTokenizer
        return (AutoModelForCausalLM.from_pretrained(SHIPPED, local_files_only=True),
                AutoTokenizer.from_pretrained(SHIPPED, local_files_only=True))
    family = name[len("tiny-"):] if name.startswith("tiny-") else None
    if family not in FAMILIES:
        raise PrivateLoRAError(f"unknown model {name!r}: use a local path, 'tiny' or one of "
                               + ", ".join(f"tiny-{f}" for f in FAMILIES))
    return tiny_random(family), byte_tokenizer()
