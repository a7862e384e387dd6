"""Train privatelora's embedded default "tiny" model on the Shakespeare plays.

Builds a byte-level BPE tokenizer and a small Llama (grouped-query attention, untied LM
head) from scratch, trains it on random windows of the plays for a wall-clock budget on the
CPU, measures held-out perplexity on plays it never saw (neither the tokenizer nor the
model), and writes a Hugging Face checkpoint with ``save_pretrained``:

    python benchmarks/train_tiny.py --out privatelora/zoo/tiny --minutes 33 --seed 0

Data: every ``*_gut.txt`` play in ``--corpus`` (default ``../shared/data/corpus/shakespeare``
relative to the repo root), minus the poems (Sonnets, Lucrece, ...: those are kept apart as
users' personalization data) and minus the held-out plays in ``HELD_OUT``. Project Gutenberg
headers and footers, where present, are cut at the ``*** START OF`` / ``*** END OF`` lines.

Reproducibility: with ``--steps N`` the run is a pure function of the seed (same torch
build, same thread count). Without it, the step count is fixed once, from the speed of the
warmup steps, so that training fills ``--minutes``; it is reported (stderr, and the JSON
with ``--json``) so the run can be repeated exactly with ``--steps``. If the machine slows
down so much that training passes 1.15 x ``--minutes``, the run stops there (the JSON says
``"capped": true``); ``--steps N --stop-after K`` repeats such a run exactly.

Draft model (``--draft``): trains instead the "tiny-draft" model, a much smaller Llama
(``DRAFT_MODEL``: hidden 128, 2 layers, 4 query / 2 key-value heads, MLP 352, LM head tied
to the embeddings, 631,424 parameters) that drafts tokens for speculative decoding of
``tiny``. It builds no tokenizer: it reuses the shipped tiny model's (``privatelora/zoo/tiny``,
loaded with ``AutoTokenizer``; same 2,048 ids), so drafted ids are the target's ids. Same data,
held-out plays, schedule and evaluation as above. The weights are rounded to float16 before
the held-out evaluation and saved in float16, and the tiny model's tokenizer files are copied
next to them, so the folder (default ``privatelora/zoo/tiny-draft``, under 2 MB) loads
standalone. Default budget 12 minutes:

    python benchmarks/train_tiny.py --draft --out privatelora/zoo/tiny-draft --minutes 12 --seed 0

Progress goes to stderr; with ``--json`` stdout carries one JSON object and nothing else.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "corpus" / "shakespeare"
DEFAULT_OUT = REPO / "privatelora" / "zoo" / "tiny"
DRAFT_OUT = REPO / "privatelora" / "zoo" / "tiny-draft"
# The draft reuses the tiny model's tokenizer, read from the shipped checkpoint.
TINY_TOKENIZER = DEFAULT_OUT
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Plays kept out of training (tokenizer and model) for validation. Fixed: the model card and
# tests/test_zoo_tiny.py quote numbers measured on them.
HELD_OUT = ("hamlet", "tempest", "twelfth_night")
# Non-dramatic works: not pretraining data (personalization data for users).
POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
         "rape_of_lucrece")

VOCAB_SIZE = 2048
SPECIALS = ("<s>", "</s>")  # ids 0 and 1
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
             initializer_range=0.02)
# --draft: the speculative-decoding draft for tiny; fits in 2 MB as float16 (with tokenizer).
DRAFT_MODEL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                   initializer_range=0.02)

_START = re.compile(r"^\*\*\*\s*START OF", re.M)
_END = re.compile(r"^\*\*\*\s*END OF", re.M)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: between the START and END marker lines, if any."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    m = _START.search(text)
    if m:
        nl = text.find("\n", m.start())
        text = text[nl + 1:] if nl >= 0 else ""
    m = _END.search(text)
    if m:
        text = text[:m.start()]
    return text.strip() + "\n"


def load_plays(corpus: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(train, held_out): play name -> text, name being the file stem less ``_gut``."""
    files = sorted(corpus.glob("*_gut.txt"))
    if not files:
        raise SystemExit(f"no *_gut.txt plays in {corpus}")
    train, held = {}, {}
    for f in files:
        name = f.stem[:-len("_gut")]
        if name in POEMS:
            continue
        text = strip_gutenberg(f.read_text(encoding="utf-8", errors="replace"))
        (held if name in HELD_OUT else train)[name] = text
    missing = set(HELD_OUT) - set(held)
    if missing:
        raise SystemExit(f"held-out plays missing from {corpus}: {sorted(missing)}")
    return train, held


def load_tiny_tokenizer():
    """The shipped tiny model's tokenizer (for --draft): the draft must share its ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER, local_files_only=True)
    if len(tok) != VOCAB_SIZE or [tok.convert_ids_to_tokens(i) for i in (0, 1)] != list(SPECIALS):
        raise SystemExit(f"unexpected tokenizer in {TINY_TOKENIZER}: vocab {len(tok)}")
    return tok


def train_tokenizer(texts: list[str]):
    """A byte-level BPE ``PreTrainedTokenizerFast``: no unknown tokens, exact round trip."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2,
                                  special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", clean_up_tokenization_spaces=False,
                                   model_max_length=MODEL["max_position_embeddings"])


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """Bytes of text behind each token id (0 for specials), for bits per byte."""
    # ByteLevel spells each byte as exactly one printable character (GPT-2's table)
    lens = torch.zeros(len(tokenizer), dtype=torch.long)
    for tok, i in tokenizer.get_vocab().items():
        if tok not in SPECIALS:
            lens[i] = len(tok)
    return lens


def encode_doc(tokenizer, text: str) -> list[int]:
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor, seq: int, max_windows: int | None = None):
    """(sum of nats, predicted tokens) over non-overlapping windows of ``seq`` tokens."""
    model.eval()
    n = (len(ids) - 1) // seq
    if max_windows is not None:
        n = min(n, max_windows)
    total, count = 0.0, 0
    for b in range(0, n, 16):
        rows = [ids[i * seq:(i + 1) * seq + 1] for i in range(b, min(n, b + 16))]
        x = torch.stack(rows)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return total, count


def predicted_bytes(ids: torch.Tensor, seq: int, lens: torch.Tensor) -> int:
    n = (len(ids) - 1) // seq
    return sum(int(lens[ids[i * seq + 1:(i + 1) * seq + 1]].sum()) for i in range(n))


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--draft", action="store_true",
                    help="train the small draft model for speculative decoding of tiny "
                         "(reuses tiny's tokenizer; float16; default --out "
                         "privatelora/zoo/tiny-draft, default --minutes 12)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default privatelora/zoo/tiny, or "
                         "privatelora/zoo/tiny-draft with --draft)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="training wall-clock budget (default 33, or 12 with --draft)")
    ap.add_argument("--steps", type=int, default=None,
                    help="exact number of optimizer steps (overrides --minutes; reproducible)")
    ap.add_argument("--stop-after", type=int, default=None, metavar="K",
                    help="end after K of the --steps steps, schedule unchanged (repeats a run "
                         "that the wall-clock cap cut short)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4, help="windows per step")
    ap.add_argument("--seq", type=int, default=512,
                    help="window length in tokens (the model's full context: train every position)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = DRAFT_OUT if args.draft else DEFAULT_OUT
    if args.minutes is None:
        args.minutes = 12.0 if args.draft else 33.0
    dims = DRAFT_MODEL if args.draft else MODEL
    if not 1 <= args.seq <= dims["max_position_embeddings"]:
        ap.error(f"--seq must be 1..{dims['max_position_embeddings']}")

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()

    train_txt, held_txt = load_plays(args.corpus)
    log(f"corpus {args.corpus}: {len(train_txt)} training plays, held out {sorted(held_txt)}")

    t0 = time.time()
    tok = load_tiny_tokenizer() if args.draft else train_tokenizer(list(train_txt.values()))
    sample_line = "But, soft! what light through yonder window breaks?\n"
    assert tok.decode(tok.encode(sample_line, add_special_tokens=False)) == sample_line
    lens = token_byte_lengths(tok)
    train_ids = torch.tensor([i for t in train_txt.values() for i in encode_doc(tok, t)])
    held_ids = {n: torch.tensor(encode_doc(tok, t)) for n, t in held_txt.items()}
    train_bytes = sum(len(t.encode()) for t in train_txt.values())
    log(f"tokenizer{f' (from {TINY_TOKENIZER})' if args.draft else ''}: vocab {len(tok)}, "
        f"{len(train_ids)} training tokens "
        f"({train_bytes / len(train_ids):.2f} bytes/token), {time.time() - t0:.1f}s")

    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **dims)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters ({n_params * 4 / 2**20:.1f} MiB fp32)")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    val_probe = torch.cat([held_ids[n] for n in HELD_OUT])  # quick progress probe
    budget = args.minutes * 60.0
    total = args.steps if args.steps else None
    # Steps timed to size the run: the first ones are slow, and the schedule needs the total
    # only once warmup is over, so time the whole warmup (a short probe misjudges a machine
    # whose load varies).
    probe = (5, max(25, args.warmup))
    step, ema, t_train, t_probe, capped = 0, None, time.time(), 0.0, False
    while True:
        if total is None and step == probe[0]:
            t_probe = time.time()
        if total is None and step == probe[1]:
            per_step = (time.time() - t_probe) / (probe[1] - probe[0])
            total = max(probe[1] + 1, int((budget - (time.time() - t_train)) / per_step) + step)
            log(f"{per_step:.3f}s/step -> {total} steps to fill {args.minutes:g} min "
                f"(repeat exactly with --steps {total})")
        if total is not None and step >= total:
            break
        if args.stop_after is not None and step >= args.stop_after:
            log(f"stopping after step {step} of {total} (--stop-after)")
            break
        if not args.steps and time.time() - t_train > 1.15 * budget:
            capped = True  # the machine slowed down: stop rather than overrun the budget
            log(f"wall-clock cap hit at step {step}/{total}: stopping early")
            break
        lr = lr_at(step, total or 10**9, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s:s + args.seq + 1] for s in starts.tolist()])
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size),
                                                 x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0 or step == total:
            el = time.time() - t_train
            msg = (f"step {step}/{total or '?'} loss {ema:.3f} lr {lr:.2e} "
                   f"{step * args.batch * args.seq / el:.0f} tok/s {el / 60:.1f} min")
            if step % 500 == 0 or step == total:
                s, c = eval_loss(model, val_probe, args.seq, max_windows=32)
                msg += f" | held-out probe {s / c:.3f}"
            log(msg)
    train_s = time.time() - t_train
    tokens_seen = step * args.batch * args.seq
    if args.draft:
        # shipped in float16: round now, so the evaluation and the sample are of those weights
        # (fp16 -> fp32 is exact, and the CPU computes in fp32)
        model.half().float()

    # final held-out evaluation over all three plays, windows of the training length
    per_play, tot_nats, tot_tok, tot_bytes = {}, 0.0, 0, 0
    for name in HELD_OUT:
        s, c = eval_loss(model, held_ids[name], args.seq)
        b = predicted_bytes(held_ids[name], args.seq, lens)
        per_play[name] = {"tokens": c, "loss": s / c, "ppl": math.exp(s / c),
                          "bits_per_byte": s / math.log(2) / b}
        tot_nats, tot_tok, tot_bytes = tot_nats + s, tot_tok + c, tot_bytes + b
    held_loss = tot_nats / tot_tok
    log(f"held-out loss {held_loss:.4f}/token, ppl {math.exp(held_loss):.2f}, "
        f"{tot_nats / math.log(2) / tot_bytes:.4f} bits/byte over {tot_tok} tokens")

    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.draft:
        model.half().save_pretrained(args.out, safe_serialization=True)
        model.float()
        for name in TOKENIZER_FILES:  # byte for byte the tiny model's tokenizer
            shutil.copyfile(TINY_TOKENIZER / name, args.out / name)
    else:
        model.save_pretrained(args.out, safe_serialization=True)
        tok.save_pretrained(args.out)

    prompt = "Rom.\n"
    torch.manual_seed(args.seed)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=120, do_sample=True, temperature=0.8,
                             top_p=0.95, top_k=0)
    sample = tok.decode(out[0], skip_special_tokens=True)
    log("sample:\n" + sample)

    summary = {
        "params": n_params, "config": {k: v for k, v in cfg.to_dict().items()
                                       if k in ("vocab_size", *dims)},
        "train_plays": sorted(train_txt), "held_out": list(HELD_OUT),
        "train_tokens": len(train_ids), "train_bytes": train_bytes,
        "steps": step, "schedule_steps": total, "batch": args.batch, "seq": args.seq,
        "lr": args.lr,
        "tokens_seen": tokens_seen, "epochs": tokens_seen / len(train_ids),
        "train_minutes": train_s / 60, "total_minutes": (time.time() - t_start) / 60,
        "threads": args.threads, "seed": args.seed, "capped": capped,
        "final_train_loss_ema": ema,
        "heldout": {"tokens": tot_tok, "bytes": tot_bytes, "loss": held_loss,
                    "ppl": math.exp(held_loss),
                    "bits_per_byte": tot_nats / math.log(2) / tot_bytes, "per_play": per_play},
        "sample_prompt": prompt, "sample": sample, "out": str(args.out),
        "torch": torch.__version__,
    }
    if args.draft:
        summary.update(draft=True, dtype="float16", tokenizer_from=str(TINY_TOKENIZER),
                       out_bytes=sum(f.stat().st_size for f in args.out.iterdir()
                                     if f.is_file()))
    if args.json:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
