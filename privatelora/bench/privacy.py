"""``bench privacy``: what an honest-but-curious cloud recovers from the traffic it receives.

The victim is one device with a private M tuned on its own text (the Sonnets, which the
tiny model never saw). It runs real split generations in process; every message the cloud
receives (hand-offs up, replies ``M A h``) and sends (``A h``, hand-offs down) is recorded.
The attacker has the public checkpoint (it can download it even though its processes do
not load the device's tensors) and public text of its own (Paradise Lost), but no M, no
token ids, no text of the user. It attacks:

- **tokens** (the prompt and every token handed in): ``nearest_row`` (the closest
  embedding row to each hand-off row), ``replay`` (with public device head layers: run
  them, M = 0, position by position over the whole vocabulary, keep the closest), and
  ``inverter`` (an MLP trained on the attacker's own text to map a boundary state to its
  token; trained with the configuration's noise when there is noise);
- **outputs** (the device's greedy tokens): ``lm_head`` (final norm and LM head of the
  returned state), ``replay_tail`` (the public tail layers first) and ``inverter``;
- **M**: least squares on the ``(A h, M A h)`` pairs, against the number of tokens seen;
- **labels** in tuning: from the gradient sent up (``bench/privacy_labels.py``).

Configurations (``SETTINGS``): device head or tail layers carrying the tuned M or M = 0;
Gaussian noise at the cut (``DevicePart(cut_noise=σ)``, σ times each row's RMS); and device
head layers whose M starts from a per-device secret random M and is then tuned on the
user's text like the rest (the bench draws the secret from ``seed`` so runs repeat; a
device would draw it from ``os.urandom``). Against the secret the attacker also trains an
inverter on states made with secrets of its own (``inverter_secret_aware``).

Each ``recovered`` is an exact-recovery rate (M: the share of M matrices recovered to a
relative error below 1e-3) next to a no-traffic ``baseline`` (the attacker's best guess
without traffic: its own text's most frequent token; M = 0). Each configuration also
reports its price: ``utility_cost`` (held-out perplexity minus the default's, the
perplexity computed with the same private M merged into Hugging Face's model, which the
split matches exactly; noise added at the cut) and ``speed_cost`` (the device's compute
time per generated token over the default's, minus 1, measured in process: device layers
move work onto the device, which a phone pays for).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from privatelora.config import PrivateLoRAConfig

VICTIM_TEXT, PUBLIC_TEXT = "sonnets", "paradise_lost"
M_TOL = 1e-3


@dataclass(frozen=True)
class Setting:
    config: str
    head: int = 0                 # device head layers
    tail: int = 0                 # device tail layers
    private_m: bool = True        # the tuned M (False: M = 0, the layers are plain public ones)
    noise: float = 0.0            # cut noise (x RMS of each hand-off row)
    secret: float = 0.0           # head layers' M start from a per-device secret random M of this scale (then tuned)

    @property
    def defence(self) -> str:
        parts = []
        if self.head:
            parts.append(f"{self.head} device head layer{'s' if self.head > 1 else ''}")
        if self.tail:
            parts.append(f"{self.tail} device tail layer{'s' if self.tail > 1 else ''}")
        if (self.head or self.tail):
            parts[-1] += " with private M" if self.private_m else ", M = 0"
        if self.secret:
            parts[-1] = parts[-1].replace("with private M", f"with private M tuned from a secret of scale {self.secret:g}")
        if self.noise:
            parts.append(f"cut noise {self.noise:g} x RMS")
        return " + ".join(parts) or "none"


SETTINGS = (
    Setting("default"),
    Setting("head1", head=1), Setting("head2", head=2),
    Setting("head1-public", head=1, private_m=False), Setting("head2-public", head=2, private_m=False),
    Setting("tail1", tail=1), Setting("tail2", tail=2),
    Setting("tail1-public", tail=1, private_m=False), Setting("tail2-public", tail=2, private_m=False),
    Setting("noise0.5", noise=0.5), Setting("noise1", noise=1.0), Setting("noise2", noise=2.0),
    Setting("noise4", noise=4.0), Setting("noise8", noise=8.0),
    Setting("head2-noise1", head=2, noise=1.0),
    Setting("head1-secret2", head=1, secret=2.0), Setting("head1-secret4", head=1, secret=4.0),
    Setting("head2-secret4", head=2, secret=4.0),
)
QUICK = ("default", "head1", "tail1", "noise8")


@dataclass
class Traffic:
    """What the cloud received and sent in one configuration's run, and the ground truth."""
    up: list = field(default_factory=list)        # (positions, tokens, hidden rows) per hand-off up
    down: list = field(default_factory=list)      # (session, positions, hidden rows) per hand-off down
    pairs: dict = field(default_factory=dict)     # (layer, target) -> list of (a rows, m rows)
    seqs: dict = field(default_factory=dict)      # session -> full token sequence (prompt + output)
    prompt_len: dict = field(default_factory=dict)


def _progress(quiet: bool):
    def say(msg: str):
        if not quiet:
            print(f"[bench privacy] {msg}", file=sys.stderr, flush=True)
    return say


# ---------------------------------------------------------------- the victim's traffic
def record_traffic(bb, cfg: PrivateLoRAConfig, adapter, prompts, new_tokens: int, noise: float = 0.0,
                   noise_seed: int | None = None) -> Traffic:
    """Run greedy generations of ``prompts`` through a real split in process; record what
    crosses the cut. ``noise_seed`` seeds the device's cut noise (the bench's runs repeat;
    a device seeds it from ``secrets``)."""
    from privatelora.model.sampling import SamplingParams
    from privatelora.runtime.cloud import CloudPart
    from privatelora.runtime.device import DevicePart
    from privatelora.runtime.generation import Generation
    from privatelora.runtime.messages import Activations, Handoff, Reply
    from privatelora.runtime.runner import InProcessRunner

    device = DevicePart(bb, cfg, adapter, cut_noise=noise)
    if noise_seed is not None:
        device._noise.manual_seed(noise_seed)
    cloud = CloudPart(bb, cfg)
    tr = Traffic()
    sent_a: dict = {}
    akeys = ("shared",) if cfg.shared_a else cfg.targets
    inner = cloud.run

    def run(batch):
        for req in batch:
            if isinstance(req, Handoff):
                tr.up.append((req.session, req.start, req.hidden.detach().clone()))
            elif isinstance(req, Reply):
                a = dict(zip(akeys, sent_a.pop((req.session, req.layer))))
                for t, m in zip(cfg.targets, req.m):
                    key = "shared" if cfg.shared_a else t
                    tr.pairs.setdefault((req.layer, t), []).append((a[key], m.detach().clone()))
        answers = inner(batch)
        for ans in answers:
            if isinstance(ans, Activations):
                sent_a[(ans.session, ans.layer)] = [x.detach().clone() for x in ans.a]
            elif isinstance(ans, Handoff):
                tr.down.append((ans.session, ans.start, ans.hidden.detach().clone()))
        return answers

    cloud.run = run
    gens = [Generation(device.session(i), list(p), SamplingParams(max_new_tokens=new_tokens))
            for i, p in enumerate(prompts)]
    InProcessRunner(cloud).run(gens)
    for i, (g, p) in enumerate(zip(gens, prompts)):
        tr.seqs[i], tr.prompt_len[i] = list(p) + list(g.tokens), len(p)
    return tr


def _up_rows(tr: Traffic):
    """(hidden rows [n, d], true tokens [n]) of every hand-off up."""
    xs, ys = [], []
    for sid, start, h in tr.up:
        xs.append(h)
        ys.extend(tr.seqs[sid][start:start + h.shape[0]])
    return torch.cat(xs).float(), torch.tensor(ys)


def _down_rows(tr: Traffic):
    """Hand-off-down rows at positions whose next token is a greedy output of the device:
    (rows [n, d], the outputs [n], per-session sequences of all down rows for replays)."""
    xs, ys, full = [], [], {}
    for sid, start, h in tr.down:
        seq, plen = tr.seqs[sid], tr.prompt_len[sid]
        for j in range(h.shape[0]):
            pos = start + j
            full.setdefault(sid, {})[pos] = h[j]
            if plen <= pos + 1 < len(seq):
                xs.append(h[j])
                ys.append(seq[pos + 1])
    return (torch.stack(xs).float() if xs else torch.zeros(0)), torch.tensor(ys), full


# ---------------------------------------------------------------- the attacker's tools
def _rms(x, w, eps):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class PublicLayers:
    """The attacker's own forward of public decoder layers (M = 0), written from the
    checkpoint's weights: full sequences, or one position for many candidate tokens at once
    over a committed prefix."""

    def __init__(self, model, layer_ids):
        self.model, self.cfg = model, model.config
        self.layers = [model.model.layers[i] for i in layer_ids]
        self.heads = self.cfg.num_attention_heads
        self.kv = getattr(self.cfg, "num_key_value_heads", None) or self.heads
        self.hd = getattr(self.cfg, "head_dim", None) or self.cfg.hidden_size // self.heads
        self.rotary = model.model.rotary_emb

    def _rope(self, x, pos):
        cos, sin = self.rotary(x[None], torch.as_tensor(pos).reshape(1, -1))
        return cos[0], sin[0]                      # [n, hd]

    @staticmethod
    def _rot(x, cos, sin):                         # x [..., n, hd]
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), -1)
        return x * cos + rot * sin

    def _qkv(self, lyr, x):
        att = lyr.self_attn
        h = lyr.input_layernorm(x)
        q = att.q_proj(h).view(-1, self.heads, self.hd).transpose(0, 1)
        k = att.k_proj(h).view(-1, self.kv, self.hd).transpose(0, 1)
        v = att.v_proj(h).view(-1, self.kv, self.hd).transpose(0, 1)
        return q, k, v

    def _finish(self, lyr, x, o):
        x = x + lyr.self_attn.o_proj(o)
        return x + lyr.mlp(lyr.post_attention_layernorm(x))

    @torch.no_grad()
    def sequence(self, x, start: int = 0):
        """All layers over one causal sequence x [n, d] starting at ``start``."""
        n = x.shape[0]
        cos, sin = self._rope(x, torch.arange(start, start + n))
        for lyr in self.layers:
            q, k, v = self._qkv(lyr, x)
            q, k = self._rot(q, cos, sin), self._rot(k, cos, sin)
            rep = self.heads // self.kv
            o = F.scaled_dot_product_attention(q[None], k.repeat_interleave(rep, 0)[None],
                                               v.repeat_interleave(rep, 0)[None], is_causal=True)[0]
            x = self._finish(lyr, x, o.transpose(0, 1).reshape(n, -1))
        return x

    @torch.no_grad()
    def search(self, targets, embed):
        """Position by position, the token whose state after these layers is closest to
        ``targets[t]`` given the tokens chosen before it (a greedy replay search)."""
        caches = [([], []) for _ in self.layers]
        rep = self.heads // self.kv
        chosen = []
        vocab = embed.shape[0]
        for t in range(targets.shape[0]):
            x = embed.float()                                   # every candidate at position t
            cos, sin = self._rope(x[:1], torch.tensor([t]))
            states = []
            for lyr, (ks, vs) in zip(self.layers, caches):
                states.append(x)
                q, k, v = self._qkv(lyr, x)                     # [H, V, hd], [Hkv, V, hd]
                q, k = self._rot(q, cos, sin), self._rot(k, cos, sin)
                qg = q.reshape(self.kv, rep, vocab, self.hd)
                own = (qg * k[:, None]).sum(-1, keepdim=True)                   # [Hkv, rep, V, 1]
                if ks:
                    kp, vp = torch.stack(ks, 1), torch.stack(vs, 1)              # [Hkv, t, hd]
                    past = torch.einsum("grvd,gtd->grvt", qg, kp)
                    s = torch.cat([past, own], -1) / math.sqrt(self.hd)
                    p = s.softmax(-1)
                    o = torch.einsum("grvt,gtd->grvd", p[..., :-1], vp) + p[..., -1:] * v[:, None]
                else:
                    o = v[:, None].expand(self.kv, rep, vocab, self.hd)
                o = o.reshape(self.heads, vocab, self.hd).transpose(0, 1).reshape(vocab, -1)
                x = self._finish(lyr, x, o)
            tok = int(((x - targets[t].float()) ** 2).sum(-1).argmin())
            chosen.append(tok)
            for (ks, vs), lyr, xin in zip(caches, self.layers, states):   # commit the chosen token's k, v
                _, k, v = self._qkv(lyr, xin[tok:tok + 1])
                ks.append(self._rot(k, cos, sin)[:, 0])
                vs.append(v[:, 0])
        return torch.tensor(chosen)


def nearest_rows(x, table):
    d = (x.float() ** 2).sum(-1, keepdim=True) - 2 * x.float() @ table.float().T + (table.float() ** 2).sum(-1)
    return d.argmin(-1)


@torch.no_grad()
def public_states(model, ids, boundary: int, seq: int = 128):
    """(state entering layer ``boundary`` [n, d], the public model's greedy next token [n])
    over the attacker's own text, M = 0, in windows of ``seq`` tokens."""
    xs, ys, grab = [], [], {}
    n = model.config.num_hidden_layers
    mod = model.model.layers[boundary] if boundary < n else model.model.norm

    def hook(_m, args, kwargs):
        grab["x"] = (args[0] if args else kwargs["hidden_states"]).detach()
    h = mod.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for s in range(0, len(ids) - seq + 1, seq):
            out = model(input_ids=ids[s:s + seq][None])
            xs.append(grab["x"][0].float())
            ys.append(out.logits[0].argmax(-1))
    finally:
        h.remove()
    return torch.cat(xs), torch.cat(ys)


def train_inverter(x, y, vocab: int, *, noise: float = 0.0, epochs: int = 8, hidden: int = 1024, seed: int = 0):
    """An MLP from a boundary state to a token, trained on the attacker's own states (with
    the configuration's cut noise added fresh each epoch, as the attacker knows the defence)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d = x.shape[1]
    net = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, hidden), torch.nn.GELU(),
                              torch.nn.Linear(hidden, vocab))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 256):
            b = order[i:i + 256]
            xb = x[b] + (noise * rms[b] * torch.randn(x[b].shape, generator=g) if noise else 0)
            loss = F.cross_entropy(net(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    return lambda q: net(q.float()).argmax(-1)


# ---------------------------------------------------------------- M by least squares
def m_recovery(tr: Traffic, adapter, counts) -> dict:
    """For each number of tokens seen, the share of all M matrices (device-held ones
    included, never seen) recovered below ``M_TOL`` relative error, and the median error of
    those the cloud sees."""
    total = len(adapter.layers) * len(adapter.cfg.targets)
    curve = []
    for n in counts:
        errs = []
        for (layer, t), pairs in sorted(tr.pairs.items()):
            a = torch.cat([p[0] for p in pairs]).double()[:n]
            m = torch.cat([p[1] for p in pairs]).double()[:n]
            if a.shape[0] < n:
                continue
            mt = torch.linalg.lstsq(a, m).solution               # m = a M^T
            true = adapter.get(layer, t).detach().double()
            errs.append(float(torch.linalg.norm(mt.T - true) / torch.linalg.norm(true)))
        if errs:
            curve.append({"tokens_seen": n, "recovered": sum(e < M_TOL for e in errs) / total,
                          "median_rel_error": statistics.median(errs), "matrices_seen": len(errs)})
    return {"matrices": total, "curve": curve}


# ---------------------------------------------------------------- price of a configuration
@torch.no_grad()
def heldout_ppl(bb, adapter, ids, *, cut_layer: int, noise: float, seq: int = 128, seed: int = 0) -> float:
    """Held-out perplexity of the monolithic model with ``adapter`` merged (the split equals
    it), with the cut noise added to the state entering layer ``cut_layer``."""
    from privatelora.model.reference import merged_model
    model = merged_model(bb, adapter)
    g = torch.Generator().manual_seed(seed)

    def hook(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        rms = x.float().pow(2).mean(-1, keepdim=True).sqrt()
        x = (x.float() + noise * rms * torch.randn(x.shape, generator=g)).to(x.dtype)
        if args:
            return (x,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}
    h = model.model.layers[cut_layer].register_forward_pre_hook(hook, with_kwargs=True) if noise else None
    total, count = 0.0, 0
    try:
        for s in range(0, len(ids) - seq, seq):
            w = ids[s:s + seq + 1]
            logits = model(input_ids=w[:-1][None]).logits[0]
            total += float(F.cross_entropy(logits.float(), w[1:], reduction="sum"))
            count += seq
    finally:
        if h is not None:
            h.remove()
    return math.exp(total / max(count, 1))


def seconds_per_token(bb, cfg, adapter, prompt, new_tokens: int, noise: float, repeat: int = 3) -> tuple:
    """(total, device) seconds per token of one in-process greedy generation, medians over
    ``repeat`` runs: the device's share is what a phone pays (device layers move work there)."""
    from privatelora.model.sampling import SamplingParams
    from privatelora.runtime.cloud import CloudPart
    from privatelora.runtime.device import DevicePart
    from privatelora.runtime.generation import Generation
    from privatelora.runtime.runner import InProcessRunner
    device, cloud = DevicePart(bb, cfg, adapter, cut_noise=noise), CloudPart(bb, cfg)
    inner, spent = cloud.run, [0.0]

    def run(batch):
        t = time.perf_counter()
        try:
            return inner(batch)
        finally:
            spent[0] += time.perf_counter() - t
    cloud.run = run
    total, dev = [], []
    for i in range(repeat + 1):
        g = Generation(device.session(i), list(prompt), SamplingParams(max_new_tokens=new_tokens))
        spent[0] = 0.0
        t0 = time.perf_counter()
        InProcessRunner(cloud).run([g])
        if i:                                       # the first run warms up
            n = max(len(g.tokens), 1)
            total.append((time.perf_counter() - t0) / n)
            dev.append((time.perf_counter() - t0 - spent[0]) / n)
    return statistics.median(total), statistics.median(dev)


def with_secret(adapter, n_layers: int, head: int, scale: float, seed: int):
    """A copy of ``adapter`` with a random M of ``scale`` (``randomize_``'s units) added in
    the first ``head`` layers: a per-device secret the cloud cannot replay."""
    from privatelora.model.adapters import PrivateAdapter, m_name
    out = PrivateAdapter(adapter.cfg, n_layers, adapter.fingerprint)
    g = torch.Generator().manual_seed(seed)
    r = adapter.cfg.rank
    with torch.no_grad():
        for name, m in adapter.M.items():
            out.M[name].copy_(m)
        for layer in range(head):
            for t in adapter.cfg.targets:
                out.M[m_name(layer, t)].add_(torch.randn(r, r, generator=g) * scale / r ** 0.5)
    return out


# ---------------------------------------------------------------- the harness
def tune_victim(bb, cfg, corpus, steps: int, quiet: bool, init=None):
    """The victim's private M: tuned through the split on its own text (bench tuning's
    settings), as a user would, from zero or from ``init`` (an adapter it changes)."""
    from privatelora.api import build_split
    from privatelora.bench.tuning import default_lr
    from privatelora.training.baselines import PrivateLoRAMethod
    from privatelora.training.cloud import CloudTrainer
    from privatelora.training.loop import TrainSettings, progress_bar, train
    split = build_split(cfg=cfg, backbone=bb, adapter=init)
    method = PrivateLoRAMethod(split.device, trainer=CloudTrainer(split.cloud))
    s = TrainSettings(steps=steps, batch=8, seq=128, lr=default_lr("privatelora", corpus.name), eval_every=0,
                      eval_tokens=2048)
    train(method, corpus, s, progress=None if quiet else progress_bar("[bench privacy] tuning the victim's M"))
    for p in split.adapter.parameters():
        p.requires_grad_(False)
    return split.adapter


def bench_privacy(model: str = "tiny", *, settings=None, quick: bool = False, prompts: int | None = None,
                  prompt_tokens: int | None = None, new_tokens: int | None = None, tune_steps: int | None = None,
                  public_tokens: int | None = None, labels: bool = True, seed: int = 0, quiet: bool = False,
                  backbone=None) -> dict:
    from privatelora.model.adapters import PrivateAdapter
    from privatelora.model.loading import load_backbone
    from privatelora.training.data import encode_text, load_corpus, read_text

    say = _progress(quiet)
    t_all = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(1)   # device, cloud and attacker share this process; see bench.one_thread
    prompts = prompts or (2 if quick else 4)
    prompt_tokens = prompt_tokens or (32 if quick else 48)
    new_tokens = new_tokens or (8 if quick else 16)
    tune_steps = tune_steps if tune_steps is not None else (20 if quick else 100)
    public_tokens = public_tokens or (12_288 if quick else 32_768)
    by_name = {s.config: s for s in SETTINGS}
    chosen = [by_name[c] for c in (settings or (QUICK if quick else [s.config for s in SETTINGS]))]
    if chosen[0].config != "default":
        chosen = [by_name["default"]] + [s for s in chosen if s.config != "default"]

    bb = backbone or load_backbone(model)
    n_layers = bb.n_layers
    embed = bb.model.model.embed_tokens.weight.detach()
    vocab = embed.shape[0]
    victim = load_corpus(VICTIM_TEXT, bb.tokenizer)
    _, public_text = read_text(PUBLIC_TEXT)
    public_ids = encode_text(bb.tokenizer, public_text)[:public_tokens]
    top_public = int(torch.bincount(public_ids, minlength=vocab).argmax())
    # the victim's prompts: held-out windows of its own text (its test part)
    starts = [i * (prompt_tokens + 7) for i in range(prompts)]
    victim_prompts = [victim.test[s:s + prompt_tokens].tolist() for s in starts]

    base_cfg = PrivateLoRAConfig()
    tuned = tune_victim(bb, base_cfg, victim, tune_steps, quiet) if tune_steps else \
        PrivateAdapter(base_cfg, n_layers, bb.fingerprint).randomize_(seed + 1, scale=0.3)
    zero = PrivateAdapter(base_cfg, n_layers, bb.fingerprint)

    out = {"model": bb.name, "fingerprint": bb.fingerprint, "victim_text": VICTIM_TEXT, "public_text": PUBLIC_TEXT,
           "prompts": prompts, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rank": base_cfg.rank,
           "tune_steps": tune_steps, "public_tokens": len(public_ids), "wire_dtype": "fp32", "m_tolerance": M_TOL,
           "most_frequent_public_token": top_public, "results": [], "configs": []}
    inverters: dict = {}

    def inverter(boundary: int, noise: float, outputs: bool = False, secret: float = 0.0):
        key = (boundary, noise, outputs, secret)
        if key not in inverters:
            say(f"training an inverter at layer {boundary} (noise {noise:g}) on {len(public_ids)} public tokens")
            if secret:   # the attacker knows the defence, not the secret: it trains on 4 secrets of its own
                from privatelora.model.reference import merged_model
                part = len(public_ids) // 4
                xs = [public_states(merged_model(bb, with_secret(zero, n_layers, boundary, secret, seed + 7919 + k)),
                                    public_ids[k * part:(k + 1) * part], boundary) for k in range(4)]
                x, greedy = torch.cat([a for a, _ in xs]), torch.cat([b for _, b in xs])
                ids_used = torch.cat([public_ids[k * part:(k + 1) * part][:a.shape[0]] for k, (a, _) in enumerate(xs)])
            else:
                x, greedy = public_states(bb.model, public_ids, boundary)
                ids_used = public_ids[:x.shape[0]]
            # tokens: the token at the position; outputs: the public model's greedy next token
            y = greedy if outputs else ids_used
            inverters[key] = train_inverter(x, y, vocab, noise=noise, epochs=3 if quick else 5, seed=seed)
        return inverters[key]

    def row(s: Setting, signal: str, attack: str, recovered: float, baseline: float, n: int, **extra):
        out["results"].append({"config": s.config, "device_head_layers": s.head, "device_tail_layers": s.tail,
                               "defence": s.defence, "signal": signal, "attack": attack,
                               "recovered": round(recovered, 4), "baseline": round(baseline, 4), "n": n, **extra})

    ppl_ids = victim.test[:2048 if quick else 8192]
    speed_prompt = victim.test[-17:-1].tolist()
    base_spt = None
    base_ppl = None
    for s in chosen:
        t0 = time.perf_counter()
        say(f"{s.config}: {s.defence}")
        cfg = PrivateLoRAConfig(device_head_layers=s.head, device_tail_layers=s.tail)
        adapter = tuned if s.private_m else zero
        if s.secret:   # a secret start the cloud cannot replay, then tuned on the victim's text like the rest
            adapter = with_secret(zero, n_layers, s.head, s.secret, seed + 104729)   # seeded: runs repeat
            if tune_steps:
                adapter = tune_victim(bb, cfg, victim, tune_steps, quiet, init=adapter)
        tr = record_traffic(bb, cfg, adapter, victim_prompts, new_tokens, noise=s.noise, noise_seed=seed)
        # tokens
        x, ids = _up_rows(tr)
        base_tok = float((ids == top_public).float().mean())
        if s.head == 0:
            row(s, "tokens", "nearest_row", float((nearest_rows(x, embed) == ids).float().mean()), base_tok, len(ids))
        else:
            got = []
            for sid, start, h in tr.up:
                if start == 0:                       # the replay starts from each prompt's first position
                    got.append((sid, PublicLayers(bb.model, range(s.head)).search(
                        torch.cat([hh for ss, st, hh in tr.up if ss == sid]), embed)))
            hit = sum(int((g == torch.tensor(tr.seqs[sid][:len(g)])).sum()) for sid, g in got)
            row(s, "tokens", "replay", hit / len(ids), base_tok, len(ids))
            row(s, "tokens", "nearest_row", float((nearest_rows(x, embed) == ids).float().mean()), base_tok, len(ids))
        inv = inverter(s.head, s.noise)
        row(s, "tokens", "inverter", float((inv(x) == ids).float().mean()), base_tok, len(ids))
        if s.secret:
            inv = inverter(s.head, s.noise, secret=s.secret)
            row(s, "tokens", "inverter_secret_aware", float((inv(x) == ids).float().mean()), base_tok, len(ids))
        # outputs
        xd, outs, full = _down_rows(tr)
        base_out = float((outs == top_public).float().mean())
        if s.tail == 0:
            fn = bb.model.model.norm
            pred = bb.model.lm_head(fn(xd)).argmax(-1)
            row(s, "outputs", "lm_head", float((pred == outs).float().mean()), base_out, len(outs))
        else:
            replay = PublicLayers(bb.model, range(n_layers - s.tail, n_layers))
            hits = 0
            for sid, rows in full.items():
                pos = sorted(rows)
                y = replay.sequence(torch.stack([rows[p] for p in pos]).float(), start=pos[0])
                pred = bb.model.lm_head(bb.model.model.norm(y)).argmax(-1)
                seq, plen = tr.seqs[sid], tr.prompt_len[sid]
                hits += sum(int(pred[j]) == seq[p + 1] for j, p in enumerate(pos) if plen <= p + 1 < len(seq))
            row(s, "outputs", "replay_tail", hits / max(len(outs), 1), base_out, len(outs))
        inv_out = inverter(n_layers - s.tail, 0.0, outputs=True)
        row(s, "outputs", "inverter", float((inv_out(xd) == outs).float().mean()), base_out, len(outs))
        # M
        total_tokens = sum(h.shape[0] for _, _, h in tr.up)
        r = base_cfg.rank
        counts = sorted({max(1, r // 2), r - 1, r, 2 * r, total_tokens})
        mrec = m_recovery(tr, adapter, [c for c in counts if c <= total_tokens])
        if s.private_m:
            last = mrec["curve"][-1] if mrec["curve"] else {"recovered": 0.0, "median_rel_error": None,
                                                             "tokens_seen": total_tokens}
            row(s, "M", "least_squares", last["recovered"], 0.0, mrec["matrices"],
                tokens_seen=last["tokens_seen"], median_rel_error=last["median_rel_error"], curve=mrec["curve"])
        # labels (tuning traffic)
        if labels and s.head == 0 and s.noise == 0 and s.private_m:
            from privatelora.bench.privacy_labels import label_attack
            seqs = [tr.seqs[i][:prompt_tokens + 1] for i in sorted(tr.seqs)]
            lab = label_attack(bb, cfg, seqs, private_m=True, adapter=tuned, public_ids=public_ids, seed=seed)
            row(s, "labels", lab.get("attack", "gradient_match"), lab["recovered"], lab["baseline"], lab["labels"])
        # price
        say(f"{s.config}: perplexity and speed")
        ppl = heldout_ppl(bb, adapter, ppl_ids, cut_layer=s.head, noise=s.noise, seed=seed)
        spt, dev = seconds_per_token(bb, cfg, adapter, speed_prompt, 16 if quick else 64, s.noise,
                                     repeat=3 if quick else 9)
        if base_ppl is None:
            base_ppl, base_spt = ppl, dev
        out["configs"].append({"config": s.config, "defence": s.defence, "device_head_layers": s.head,
                               "device_tail_layers": s.tail, "private_m": s.private_m, "cut_noise": s.noise,
                               "heldout_ppl": round(ppl, 3), "utility_cost": round(ppl - base_ppl, 3),
                               "ms_per_token": round(1000 * spt, 3), "device_ms_per_token": round(1000 * dev, 3),
                               "speed_cost": round(dev / base_spt - 1, 3),
                               "seconds": round(time.perf_counter() - t0, 1)})
    out["baseline_tokens"] = next(r["baseline"] for r in out["results"] if r["signal"] == "tokens")
    out["strongest"] = strongest(out["results"])
    out["seconds"] = round(time.perf_counter() - t_all, 1)
    return out


def strongest(results) -> list[dict]:
    """Per (config, signal), the attack that recovers the most."""
    best: dict = {}
    for r in results:
        k = (r["config"], r["signal"])
        if k not in best or r["recovered"] > best[k]["recovered"]:
            best[k] = r
    return [{"config": c, "signal": sig, "attack": r["attack"], "recovered": r["recovered"], "baseline": r["baseline"]}
            for (c, sig), r in best.items()]
