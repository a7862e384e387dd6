"""User data for personalization: bundled texts by name (``sonnets``, ``paradise_lost``,
``areopagitica``: ``privatelora/data/``) or any UTF-8 file (plain or ``.gz``), tokenized on the device, cut
into contiguous train / validation / test parts (no window crosses a cut), and batches.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from privatelora.config import UsageError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
BUNDLED = {"sonnets": "sonnets.txt.gz", "paradise_lost": "paradise_lost.txt.gz", "areopagitica": "areopagitica.txt.gz"}
IGNORE = -100


# ---------------------------------------------------------------- data
def read_text(spec) -> tuple[str, str]:
    """(name, text) of a bundled text name or a UTF-8 file path (plain or .gz)."""
    spec = str(spec)
    path = DATA_DIR / BUNDLED[spec] if spec in BUNDLED else Path(spec)
    if not path.is_file():
        raise UsageError(f"--data {spec!r} is neither a file nor one of {sorted(BUNDLED)}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {str(path)!r} as UTF-8 text: {e}") from None
    if not text.strip():
        raise UsageError(f"{str(path)!r} holds no text")
    return (spec if spec in BUNDLED else path.name), text


def encode_text(tokenizer, text: str) -> torch.Tensor:
    if tokenizer is None:
        raise UsageError("this checkpoint has no tokenizer: tuning needs one to read text")
    fast = getattr(tokenizer, "backend_tokenizer", None)   # no max-length warning on long texts
    ids = fast.encode(text, add_special_tokens=False).ids if fast is not None else \
        tokenizer.encode(text, add_special_tokens=False)
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Corpus:
    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor

    def sizes(self) -> dict:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def split_tokens(name: str, ids: torch.Tensor, val_frac: float = 0.1, test_frac: float = 0.1) -> Corpus:
    """Contiguous parts: train (the start), validation, test (the end)."""
    n = len(ids)
    n_test, n_val = int(n * test_frac), int(n * val_frac)
    return Corpus(name, ids[: n - n_val - n_test], ids[n - n_val - n_test: n - n_test], ids[n - n_test:])


def load_corpus(spec, tokenizer, val_frac=0.1, test_frac=0.1, seq: int = 128) -> Corpus:
    name, text = read_text(spec)
    c = split_tokens(name, encode_text(tokenizer, text), val_frac, test_frac)
    for part in ("train",) + (("val",) if val_frac else ()) + (("test",) if test_frac else ()):
        if len(getattr(c, part)) < seq + 1:
            raise UsageError(f"{name}: {len(getattr(c, part))} {part} tokens, fewer than one window of "
                             f"{seq + 1}; give a longer text or a smaller --seq")
    return c


def sample_batch(ids: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    """``batch`` random windows: inputs w[:-1], labels w[1:] (next-token prediction)."""
    starts = torch.randint(0, len(ids) - seq, (batch,), generator=gen).tolist()
    wins = [ids[s: s + seq + 1].tolist() for s in starts]
    return [w[:-1] for w in wins], [w[1:] for w in wins]


def eval_batches(ids: torch.Tensor, seq: int, max_tokens: int | None = None, batch: int = 8):
    """Non-overlapping windows over ``ids`` (up to ``max_tokens`` predicted tokens), batched."""
    wins = []
    for s in range(0, len(ids) - seq, seq):
        if max_tokens is not None and len(wins) * seq >= max_tokens:
            break
        w = ids[s: s + seq + 1].tolist()
        wins.append((w[:-1], w[1:]))
    return [([w[0] for w in wins[i:i + batch]], [w[1] for w in wins[i:i + batch]])
            for i in range(0, len(wins), batch)]


# ---------------------------------------------------------------- methods


def ce_sum(logits: torch.Tensor, labels) -> torch.Tensor:
    lab = torch.as_tensor(labels, dtype=torch.long, device=logits.device).reshape(-1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), lab, ignore_index=IGNORE, reduction="sum")


def label_count(labels) -> int:
    return sum(1 for s in labels for x in s if x != IGNORE)
