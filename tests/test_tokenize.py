"""Prompts are tokenized as transformers does it, and text comes back as it decodes.

For each family and each kind of tokenizer (adds a BOS, defines one without adding it,
has none), ``privatelora generate --prompt TEXT`` with no extra flag gives the tokens of
transformers' own greedy ``generate`` on ``tokenizer(TEXT)``. ``--chat`` renders the chat
template exactly as ``apply_chat_template``; ``TextStream`` never shows half a character
or the start of a stop string. No Ray."""

import json

import pytest
import torch

from privatelora.cli.main import main
from privatelora.model.zoo import FAMILIES, byte_tokenizer, tiny_random
from privatelora.runtime.prompts import PromptError, TextStream, chat_messages, encode_chat, encode_prompt

PROMPT = "Now is the winter of our discontent"
NEW = 12
KINDS = ("adds_bos", "defines_bos", "no_bos")


def tokenizer_of(kind: str):
    from tokenizers import processors
    tok = byte_tokenizer()                   # defines <s> and never adds it
    if kind == "adds_bos":
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    elif kind == "no_bos":
        tok.bos_token = None
    return tok


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved checkpoint per (family, tokenizer kind)."""
    out = {}
    for family in FAMILIES:
        model = tiny_random(family, seed=7).eval()
        for kind in KINDS:
            path = tmp_path_factory.mktemp(f"{family}-{kind}")
            model.save_pretrained(path)
            tokenizer_of(kind).save_pretrained(path)
            out[family, kind] = path
    return out


def run_cli(capsys, *argv) -> dict:
    assert main([*map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def hf_greedy(path, text: str, n: int = NEW) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=n, pad_token_id=tok.eos_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_the_tokenizer_kinds_differ_as_claimed(checkpoints):
    from transformers import AutoTokenizer
    ids = {kind: AutoTokenizer.from_pretrained(checkpoints["llama", kind])(PROMPT)["input_ids"] for kind in KINDS}
    assert ids["adds_bos"][0] == 0 and ids["adds_bos"][1:] == ids["defines_bos"] == ids["no_bos"]
    assert AutoTokenizer.from_pretrained(checkpoints["llama", "defines_bos"]).bos_token_id == 0
    assert AutoTokenizer.from_pretrained(checkpoints["llama", "no_bos"]).bos_token_id is None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_generate_equals_transformers_greedy(checkpoints, capsys, family, kind):
    path = checkpoints[family, kind]
    want = hf_greedy(path, PROMPT)
    res = run_cli(capsys, "generate", "--model", path, "--prompt", PROMPT, "--max-new-tokens", NEW)
    assert res["tokens"] == want
    assert res["prompt_tokens"] == len(encode_prompt(tokenizer_of(kind), PROMPT))


def test_special_token_flags_override_the_tokenizer(checkpoints, capsys):
    adds, defines = checkpoints["llama", "adds_bos"], checkpoints["llama", "defines_bos"]
    n = len(encode_prompt(tokenizer_of("defines_bos"), PROMPT))
    assert run_cli(capsys, "generate", "--model", adds, "--prompt", PROMPT, "--max-new-tokens", 2,
                   "--no-add-special-tokens")["prompt_tokens"] == n
    assert run_cli(capsys, "generate", "--model", adds, "--prompt", PROMPT, "--max-new-tokens", 2)["prompt_tokens"] \
        == n + 1
    # a tokenizer that adds nothing has nothing to add when asked
    assert run_cli(capsys, "generate", "--model", defines, "--prompt", PROMPT, "--max-new-tokens", 2,
                   "--add-special-tokens")["prompt_tokens"] == n


def test_chat_uses_the_checkpoints_template(capsys):
    from transformers import AutoTokenizer
    from privatelora.model.zoo import SHIPPED
    tok = AutoTokenizer.from_pretrained(SHIPPED, local_files_only=True)
    msgs = [{"role": "system", "content": "A room in the castle."}, {"role": "user", "content": "Who's there?"}]
    want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert encode_chat(tok, msgs) == list(want)
    assert want[0] == tok.bos_token_id                   # the template writes the BOS, nothing adds a second
    res = run_cli(capsys, "generate", "--prompt", "Who's there?", "--system", "A room in the castle.", "--chat",
                  "--max-new-tokens", 4)
    assert res["prompt_tokens"] == len(want)


def test_chat_without_a_template_is_a_clear_error(checkpoints, capsys, tmp_path):
    path = checkpoints["llama", "defines_bos"]
    assert main(["generate", "--model", str(path), "--prompt", "hi", "--chat"]) == 2
    assert "no chat template" in capsys.readouterr().err
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    res = run_cli(capsys, "generate", "--model", path, "--prompt", "hi", "--chat", "--chat-template", tmpl,
                  "--max-new-tokens", 2)
    assert res["prompt_tokens"] == len("hi\n")          # one byte token each, no BOS: the template has none
    assert main(["generate", "--model", str(path), "--prompt", "hi", "--chat", "--chat-template",
                 str(tmp_path / "missing.jinja")]) == 2
    assert "cannot read the chat template" in capsys.readouterr().err
    assert main(["generate", "--prompt-ids", "5,6", "--chat"]) == 2
    assert main(["generate", "--prompt", "hi", "--system", "x"]) == 2


def test_chat_messages_are_validated():
    assert chat_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) \
        == [{"role": "user", "content": "ab"}]
    for bad in ([], [{"role": "wizard", "content": "x"}], [{"role": "user"}], ["hi"],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        with pytest.raises(PromptError):
            chat_messages(bad)


def test_text_stream_holds_partial_characters_and_stop_strings():
    tok = byte_tokenizer()
    text = "tu es là. FIN du texte"
    ids = encode_prompt(tok, text)
    assert len(ids) == len(text.encode())               # one token per byte: "à" takes two
    s = TextStream(tok, stop=["FIN"])
    shown = [s.push([i]) for i in ids]
    assert "\ufffd" not in "".join(shown)
    assert s.stopped and "".join(shown) + s.close() == "tu es là. "
    assert s.tokens_used == len("tu es là. FIN".encode())
    # "F" and "FI" were held back (they may start "FIN"); nothing after the stop is shown
    assert all("F" not in piece for piece in shown)
    # without stop strings every piece comes out and joins into the decoded text
    s = TextStream(tok)
    assert "".join(s.push([i]) for i in ids) + s.close() == text and not s.stopped
    # a held-back prefix that does not become a stop string is released
    s = TextStream(tok, stop=["FIX"])
    assert "".join(s.push([i]) for i in ids) + s.close() == text
    # several tokens at once (a verified draft): the stop cuts inside the group
    s = TextStream(tok, stop=["là", "FIN"])
    assert s.push(ids) == "tu es " and s.stopped


def test_prompt_errors():
    with pytest.raises(PromptError):
        encode_prompt(None, "x")
    with pytest.raises(PromptError):
        encode_prompt(byte_tokenizer(), 5)


def _metaspace_tokenizer(text: str):
    """A SentencePiece-style tokenizer (a leading "▁" marks a space, dropped at the start of a
    decode), trained in memory on ``text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_text_stream_equals_the_full_decode_for_each_kind_of_tokenizer():
    from privatelora.model.zoo import SHIPPED
    from transformers import AutoTokenizer
    text = (SHIPPED.parents[1] / "zoo" / "samples" / "heldout.txt").read_text(encoding="utf-8")[:3000]
    text += " Où est là-bas? 東京 ✓"
    for tok in (AutoTokenizer.from_pretrained(SHIPPED, local_files_only=True), byte_tokenizer(),
                _metaspace_tokenizer(text)):
        ids = encode_prompt(tok, text, add_special_tokens=False)
        ids = ids[:200] + [tok.eos_token_id] + ids[200:]         # a special token mid-stream decodes to nothing
        want = tok.decode(ids, skip_special_tokens=True)
        for group in (1, 3):
            s = TextStream(tok)
            pieces = [s.push(ids[i:i + group]) for i in range(0, len(ids), group)]
            assert "".join(pieces) + s.close() == want, (type(tok).__name__, group)
            assert all("\ufffd" not in p for p in pieces)
