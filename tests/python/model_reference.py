"""Independent pure-PyTorch reference of the whole language model (docs/model.md), computed from saved
weights with plain autograd. The memory layers come from reference.py; everything else is written here
without looking at how the C++ computes it:

  h = embedding[tokens]
  for block b = 1 .. n_layers:
      h = h + Attn_b(RMSNorm_attn_b(h))                 causal, RoPE (half-split pairs), 1/sqrt(head_dim)
      u = RMSNorm_ffn_b(h)                              only when an FFN or a memory reads it
      out_k = Memory_k(u) for each memory k reading at b
      h = h + FFN_b(u)                                  SwiGLU, MoE (all experts, masked weights) or none
      h = h + out_k for each memory k writing after b  (placement order)
  logits = RMSNorm_final(h) @ head^T                    head = embedding when tied
  loss = mean cross-entropy + moe_balance + tucker

Parameters are looked up by their C++ module names ("blocks.1.moe.router", "memories.0.wq", ...) in a
UsageTracker, so a test can check that every saved parameter took part in the computation.
"""
import math

import torch

import reference as layer_ref


class UsageTracker:
    """Read-only name -> tensor view over a dict that remembers which names were read."""

    def __init__(self, tensors):
        self._tensors = tensors
        self.used = set()

    def __getitem__(self, name):
        if name not in self._tensors:
            raise KeyError("the reference needs %r, which the dump does not have" % name)
        self.used.add(name)
        return self._tensors[name]

    def __contains__(self, name):
        return name in self._tensors


def parse_placement(text):
    """"1:3/4:4" -> [(1, 3), (4, 4)] (1-based read and write blocks)."""
    out = []
    for part in text.split("/") if text.strip() else []:
        r, w = part.split(":")
        out.append((int(r), int(w)))
    return out


def ffn_kinds(cfg):
    f = cfg.get("ffn", "dense")
    return [f] * cfg["n_layers"] if isinstance(f, str) else list(f)


# ---- dense pieces --------------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rotary(x, theta):
    """x: [B, T, heads, hd] at positions 0..T-1. Feature i is paired with i + hd/2 and the pair, read as
    the complex number x[i] + 1j x[i + hd/2], is multiplied by exp(1j * pos * theta^(-2i/hd))."""
    T, hd = x.shape[1], x.shape[-1]
    half = hd // 2
    inv_freq = torch.tensor([theta ** (-2.0 * i / hd) for i in range(half)], dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]      # [T, half]
    cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    phase = torch.polar(torch.ones_like(angle), angle).to(cdtype)[None, :, None, :]  # [1, T, 1, half]
    z = torch.complex(x[..., :half], x[..., half:]) * phase
    return torch.cat([z.real, z.imag], dim=-1)


def causal_attention(x, wqkv, wo, n_heads, theta):
    """x: [B, T, D]; wqkv: [D, 3D] = query | key | value columns (heads contiguous); wo: [D, D]."""
    B, T, D = x.shape
    hd = D // n_heads
    q, k, v = [(x @ wqkv[:, j * D:(j + 1) * D]).reshape(B, T, n_heads, hd) for j in range(3)]
    q, k = rotary(q, theta), rotary(k, theta)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)                # [B, heads, T, T]
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)                     # key j after query i
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(B, T, D)
    return out @ wo


def silu(x):
    return x * torch.sigmoid(x)


def swiglu(x, w_in, w_out):
    """x: [..., D]; w_in: [D, 2h] (gate columns, then up columns); w_out: [h, D]."""
    h = w_in.shape[1] // 2
    return (silu(x @ w_in[:, :h]) * (x @ w_in[:, h:])) @ w_out


def mixture_of_experts(u, router, w_in, w_out, top_k, balance_coef):
    """u: [..., D]; router [D, K]; w_in [K, D, 2h]; w_out [K, h, D]. Every expert runs on every token and
    the outputs are mixed with a [tokens, K] weight matrix that is zero outside each token's top-k.
    Returns (out [..., D], balance loss scalar)."""
    D = u.shape[-1]
    K = router.shape[1]
    x = u.reshape(-1, D)                                                             # [N, D]
    N = x.shape[0]
    probs = torch.softmax(x @ router, dim=-1)                                        # [N, K]
    chosen = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    mask = torch.zeros(N, K, dtype=torch.bool).scatter(1, chosen, True)
    weight = torch.where(mask, probs, torch.zeros_like(probs))
    if top_k > 1:
        weight = weight / weight.sum(-1, keepdim=True)
    hidden = w_out.shape[1]
    gate_up = torch.einsum("nd,edf->enf", x, w_in)                                   # [K, N, 2h]
    act = silu(gate_up[..., :hidden]) * gate_up[..., hidden:]
    y = torch.einsum("enf,efd->end", act, w_out)                                     # [K, N, D]
    out = torch.einsum("ne,end->nd", weight, y)
    share = mask.sum(0).to(probs.dtype) / float(N * top_k)                           # f_e (a count)
    balance = balance_coef * K * (share * probs.mean(0)).sum()
    return out.reshape(u.shape), balance


# ---- memory layers (reference.py) ----------------------------------------------------------------

ULTRAMEM_TENSORS = ["wq", "q_scale", "keys", "k_scale", "cores", "values", "wo", "perm", "u", "v"]


def memory_layer(P, k, cfg, u):
    """Memory k of the model on u [B, T, D]; returns (out [B, T, D], tucker aux loss or None)."""
    mem = cfg["memory"]
    pre = "memories.%d." % k
    if mem["kind"] == "ultramem":
        lc = dict(mem["ultramem"], D=cfg["d_model"])
        p = {name: P[pre + name] for name in ULTRAMEM_TENSORS}
        out, _, _ = layer_ref.ultramem_forward(p, u, lc)
        aux = layer_ref.ultramem_aux_loss(p["cores"], lc) if lc["aux_loss"] and lc["r"] >= 2 else None
        return out, aux
    lc = dict(mem["pkm"], D=cfg["d_model"])
    names = ["wq", "keys", "values"] + (["wo"] if lc["Dv"] != lc["D"] else [])
    if lc["query_norm"] == "batch":
        names += ["bn.weight", "bn.bias"]
    elif lc["query_norm"] == "layer":
        names += ["ln.weight", "ln.bias"]
    p = {name: P[pre + name] for name in names}
    out = layer_ref.pkm_forward(p, u, lc)[0]
    return out, None


# ---- the model -----------------------------------------------------------------------------------

def forward(P, cfg, tokens):
    """P: name -> tensor (a UsageTracker); cfg: the model config dict (model_config_to_json form);
    tokens: [B, T] int64. Returns (logits [B, T, V], {aux name: scalar})."""
    L, eps = cfg["n_layers"], cfg["norm_eps"]
    kinds = ffn_kinds(cfg)
    placement = parse_placement(cfg["memory"]["placement"]) if "memory" in cfg else []
    h = P["embedding"][tokens]                                                       # [B, T, D]
    pending = {}
    balance, tucker = [], []
    for b in range(1, L + 1):
        pre = "blocks.%d." % (b - 1)
        h = h + causal_attention(rms_norm(h, P[pre + "attn_norm.weight"], eps), P[pre + "attn.wqkv"],
                                 P[pre + "attn.wo"], cfg["n_heads"], cfg["rope_theta"])
        readers = [k for k, (r, _) in enumerate(placement) if r == b]
        kind = kinds[b - 1]
        if kind != "none" or readers:
            u = rms_norm(h, P[pre + "ffn_norm.weight"], eps)
            for k in readers:
                pending[k], aux = memory_layer(P, k, cfg, u)
                if aux is not None:
                    tucker.append(aux)
            if kind == "dense":
                h = h + swiglu(u, P[pre + "ffn.w_in"], P[pre + "ffn.w_out"])
            elif kind == "moe":
                moe = cfg["moe"]
                out, bal = mixture_of_experts(u, P[pre + "moe.router"], P[pre + "moe.w_in"], P[pre + "moe.w_out"],
                                              moe["top_k"], moe["balance_coef"])
                h = h + out
                balance.append(bal)
        for k, (_, w) in enumerate(placement):
            if w == b:
                h = h + pending.pop(k)
    assert not pending, "memory outputs never written: %s" % sorted(pending)
    h = rms_norm(h, P["final_norm.weight"], eps)
    head = P["embedding"] if cfg["tie_embeddings"] else P["lm_head"]
    logits = h @ head.t()
    aux = {}
    if balance:
        aux["moe_balance"] = sum(balance)
    if tucker:
        aux["tucker"] = sum(tucker)
    return logits, aux


def cross_entropy(logits, targets):
    """Mean over all positions of logsumexp(logits) - logits[target]."""
    flat = logits.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    picked = flat.gather(1, t[:, None])[:, 0]
    return (torch.logsumexp(flat, dim=-1) - picked).mean()


def loss_and_logits(P, cfg, tokens, targets):
    """Returns (loss = cross-entropy + every aux loss, logits, aux dict)."""
    logits, aux = forward(P, cfg, tokens)
    loss = cross_entropy(logits, targets)
    for v in aux.values():
        loss = loss + v
    return loss, logits, aux
