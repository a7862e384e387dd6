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

from privatelora.bench.privacy_attacks import (  # noqa: F401  (re-exported: the harness's API)
    M_TOL,
    PublicLayers,
    m_recovery,
    nearest_rows,
    public_states,
    train_inverter,
    with_secret,
)
from privatelora.config import PrivateLoRAConfig
from privatelora.training.data import ce_sum, eval_batches, label_count

VICTIM_TEXT, PUBLIC_TEXT = "sonnets", "paradise_lost"


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
        for inputs, labels in eval_batches(ids, seq, batch=1):
            total += float(ce_sum(model(input_ids=torch.tensor(inputs)).logits, labels))
            count += label_count(labels)
    finally:
        if h is not None:
            h.remove()
    return math.exp(total / max(count, 1))


class DeviceTimer:
    """The device's share of in-process greedy generations, per configuration, measured
    round-robin (one generation of each configuration per round) so that drift of the
    machine falls on every configuration alike; ``result()``: per configuration, (total,
    device) seconds per token, medians over the rounds, and the device times' spread."""

    def __init__(self, bb, prompt, new_tokens: int):
        self.bb, self.prompt, self.new_tokens = bb, list(prompt), new_tokens
        self.parts: dict = {}
        self.times: dict = {}

    def add(self, name: str, cfg, adapter, noise: float) -> None:
        from privatelora.runtime.cloud import CloudPart
        from privatelora.runtime.device import DevicePart
        device, cloud = DevicePart(self.bb, cfg, adapter, cut_noise=noise), CloudPart(self.bb, cfg)
        inner, spent = cloud.run, [0.0]

        def run(batch):
            t = time.perf_counter()
            try:
                return inner(batch)
            finally:
                spent[0] += time.perf_counter() - t
        cloud.run = run
        self.parts[name] = (device, cloud, spent)
        self.times[name] = ([], [])
        self._one(name, record=False)             # warm-up

    def _one(self, name: str, record: bool = True) -> None:
        from privatelora.model.sampling import SamplingParams
        from privatelora.runtime.generation import Generation
        from privatelora.runtime.runner import InProcessRunner
        device, cloud, spent = self.parts[name]
        g = Generation(device.session(len(self.times[name][0]) + 1000 * record),
                       self.prompt, SamplingParams(max_new_tokens=self.new_tokens))
        spent[0] = 0.0
        t0 = time.perf_counter()
        InProcessRunner(cloud).run([g])
        dt, n = time.perf_counter() - t0, max(len(g.tokens), 1)
        if record:
            self.times[name][0].append(dt / n)
            self.times[name][1].append((dt - spent[0]) / n)

    def run(self, rounds: int) -> dict:
        for _ in range(rounds):
            for name in self.parts:
                self._one(name)
        return {name: (statistics.median(t), statistics.median(d), min(d), max(d))
                for name, (t, d) in self.times.items()}


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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # device, cloud and attacker share this process; see bench.one_thread
    try:
        with torch.random.fork_rng():          # the caller's random state is left as it was
            torch.manual_seed(seed)
            return _bench(model, settings=settings, quick=quick, prompts=prompts, prompt_tokens=prompt_tokens,
                          new_tokens=new_tokens, tune_steps=tune_steps, public_tokens=public_tokens,
                          labels=labels, seed=seed, quiet=quiet, backbone=backbone)
    finally:
        torch.set_num_threads(threads)


def _bench(model, *, settings, quick, prompts, prompt_tokens, new_tokens, tune_steps, public_tokens, labels,
           seed, quiet, backbone) -> dict:
    from privatelora.model.adapters import PrivateAdapter
    from privatelora.model.loading import load_backbone
    from privatelora.training.data import encode_text, load_corpus, read_text

    say = _progress(quiet)
    t_all = time.perf_counter()
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
    if prompts * (prompt_tokens + 7) > len(victim.test):
        raise ValueError(f"{prompts} prompts of {prompt_tokens} tokens do not fit in the {len(victim.test)} "
                         f"held-out tokens of {VICTIM_TEXT}")
    if prompt_tokens + new_tokens > bb.config.max_position_embeddings:
        raise ValueError(f"--prompt-tokens + --new-tokens is over the model's "
                         f"{bb.config.max_position_embeddings} positions")
    starts = [i * (prompt_tokens + 7) for i in range(prompts)]
    victim_prompts = [victim.test[s:s + prompt_tokens].tolist() for s in starts]

    base_cfg = PrivateLoRAConfig()
    tuned = tune_victim(bb, base_cfg, victim, tune_steps, quiet) if tune_steps else \
        PrivateAdapter(base_cfg, n_layers, bb.fingerprint).randomize_(seed + 1, scale=0.3)
    zero = PrivateAdapter(base_cfg, n_layers, bb.fingerprint)

    out = {"model": bb.name, "fingerprint": bb.fingerprint, "victim_text": VICTIM_TEXT, "public_text": PUBLIC_TEXT,
           "prompts": prompts, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rank": base_cfg.rank,
           "tune_steps": tune_steps, "public_tokens": len(public_ids), "traffic_dtype": base_cfg.dtype,
           "m_tolerance": M_TOL,
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
    base_ppl = None
    timer = DeviceTimer(bb, speed_prompt, 16 if quick else 64)
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
            from privatelora.bench.privacy_labels import PublicHead
            replay = PublicHead.from_backbone(bb, cfg)          # the public tail layers, M = 0
            hits = 0
            for sid, rows in full.items():
                pos = sorted(rows)                               # tail layers get every row back, from 0
                with torch.no_grad():
                    y = replay.replay_tail(torch.stack([rows[p] for p in pos]).float(), [len(pos)])
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
        # labels (tuning traffic; cut noise is a serving defence, tuning sends no noise)
        if labels and s.noise == 0:
            from privatelora.bench.privacy_labels import label_attack
            seqs = [tr.seqs[i][:prompt_tokens + 1] for i in sorted(tr.seqs)]
            lab = label_attack(bb, cfg, seqs, private_m=s.private_m, adapter=adapter, public_ids=public_ids,
                               seed=seed)
            row(s, "labels", lab.get("attack", "gradient_match"), lab["recovered"], lab["baseline"], lab["labels"])
        # price: quality now, speed at the end (round-robin)
        say(f"{s.config}: perplexity")
        ppl = heldout_ppl(bb, adapter, ppl_ids, cut_layer=s.head, noise=s.noise, seed=seed)
        base_ppl = ppl if base_ppl is None else base_ppl
        timer.add(s.config, cfg, adapter, s.noise)
        out["configs"].append({"config": s.config, "defence": s.defence, "device_head_layers": s.head,
                               "device_tail_layers": s.tail, "private_m": s.private_m, "cut_noise": s.noise,
                               "secret_scale": s.secret, "heldout_ppl": round(ppl, 3),
                               "utility_cost": round(ppl - base_ppl, 3), "seconds": round(time.perf_counter() - t0, 1)})
    rounds = 3 if quick else 9
    say(f"device time: {rounds} round-robin rounds of {timer.new_tokens} tokens per configuration")
    speeds = timer.run(rounds)
    base_dev = speeds["default"][1]
    for c in out["configs"]:
        total, dev, lo, hi = speeds[c["config"]]
        c.update({"ms_per_token": round(1000 * total, 3), "device_ms_per_token": round(1000 * dev, 3),
                  "device_ms_range": [round(1000 * lo, 3), round(1000 * hi, 3)],
                  "speed_cost": round(dev / base_dev - 1, 3)})
    out["speed_rounds"] = rounds
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
