"""The attacker's tools of ``bench privacy`` (``bench/privacy.py`` runs them): its own
forward of public decoder layers (full sequences, and a replay search over the vocabulary
one position at a time), a nearest-row lookup, boundary states of its own public text, an
MLP inverter, least-squares recovery of M, and the per-device secret start the harness
measures as a defence. Nothing here reads a victim's token ids or M: the harness scores
the results against them.
"""

from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F

M_TOL = 1e-3


# ---------------------------------------------------------------- the attacker's tools
class PublicLayers:
    """The attacker's replay search through public decoder layers (M = 0), written from the
    checkpoint's weights: one position for every candidate token at once over a committed
    prefix. (Whole sequences through public layers: ``privacy_labels.PublicHead``.)"""

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
def m_recovery(tr, adapter, counts) -> dict:
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
