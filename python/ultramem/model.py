"""The language model of docs/model.md as a torch.nn.Module, with the C++ parameter names and layouts, so
that any checkpoint `ultramem train` / `quantize` / `consolidate` writes loads here and back.

    h = embedding[tokens]                                  embedding [V, D]
    for each block: h += Attn(RMSNorm(h)); u = RMSNorm(h); memories read u; h += FFN(u);
                    memories placed to write after this block add their output
    logits = RMSNorm(h) @ head^T                           head = embedding when tied

    model = ultramem.TransformerLM.from_checkpoint("runs/ultramem-small/checkpoint.safetensors")
    print(model.evaluate()["val_loss"])                    # = `ultramem eval` on the same checkpoint
    print(model.generate("The", max_new_tokens=20, temperature=0))
"""
import copy
import json
import math
import os
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt_io
from . import data as data_io
from .layers import (ENGRAM_DEFAULTS, PKM, PKM_DEFAULTS, ULTRAMEM_DEFAULTS, ULTRAMEM_V2_DEFAULTS, Engram,
                     UltraMem, rms_norm)
from .training import param_groups

MODEL_DEFAULTS = OrderedDict([
    ("name", "model"), ("vocab_size", 8192), ("d_model", 256), ("n_layers", 4), ("n_heads", 4),
    ("max_seq_len", 256), ("ffn_hidden", 683), ("rope_theta", 10000.0), ("norm_eps", 1e-5), ("init_std", 0.02),
    ("dropout", 0.0), ("tie_embeddings", True), ("seed", 0), ("ffn", "dense"),
    ("moe", OrderedDict([("num_experts", 8), ("top_k", 2), ("expert_hidden", 0), ("balance_coef", 0.01)])),
    ("memory", None),
])
SPARSE_VALUE_GRAD_MIN_ENTRIES = 1 << 22
# Layer-config fields the model sets itself (src/ultramem/nn/model_config.cpp rejects them in the JSON).
_SET_BY_MODEL = ("D", "num_layers", "seed")


def _fail(field, what):
    raise ValueError("ModelConfig.%s: %s" % (field, what))


def normalise_config(config):
    """A model config (a dict as in configs/*.json or a checkpoint's model_config, a run config
    {"model": ..., "train": ...}, or the path of either) with every default filled in and the checks of
    ModelConfig::validate that Python relies on; ValueError / TypeError name the field."""
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    if not isinstance(config, dict):
        raise TypeError("model config: expected a dict or a JSON file, got %s" % type(config).__name__)
    if "model" in config and isinstance(config["model"], dict):
        config = config["model"]
    c = copy.deepcopy(MODEL_DEFAULTS)
    for k, v in config.items():
        if k not in MODEL_DEFAULTS:
            raise ValueError("%s: unknown key" % k)
        if k == "moe":
            for mk, mv in v.items():
                if mk not in c["moe"]:
                    raise ValueError("moe.%s: unknown key" % mk)
                c["moe"][mk] = mv
        else:
            c[k] = copy.deepcopy(v)
    for k in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "ffn_hidden"):
        if not isinstance(c[k], int) or isinstance(c[k], bool) or c[k] < 1:
            _fail(k, "must be an integer >= 1, got %r" % (c[k],))
    if c["vocab_size"] < 2:
        _fail("vocab_size", "must be >= 2, got %d" % c["vocab_size"])
    if c["d_model"] % c["n_heads"] or (c["d_model"] // c["n_heads"]) % 2:
        _fail("n_heads", "must divide d_model = %d into heads of even size (RoPE), got %d"
              % (c["d_model"], c["n_heads"]))
    if not 0 <= c["dropout"] < 1:
        _fail("dropout", "must be in [0, 1), got %r" % c["dropout"])
    kinds = [c["ffn"]] * c["n_layers"] if isinstance(c["ffn"], str) else list(c["ffn"])
    if len(kinds) == 1:
        kinds = kinds * c["n_layers"]
    if len(kinds) != c["n_layers"]:
        _fail("ffn", "needs 1 or n_layers = %d entries, got %d" % (c["n_layers"], len(kinds)))
    for i, k in enumerate(kinds):
        if k not in ("dense", "moe", "none"):
            raise ValueError('ffn[%d]: expected "dense", "moe" or "none", got "%s"' % (i, k))
    moe = c["moe"]
    if "moe" in kinds and not 1 <= moe["top_k"] <= moe["num_experts"]:
        _fail("moe.top_k", "must be in [1, num_experts = %d], got %d" % (moe["num_experts"], moe["top_k"]))
    mem = c["memory"] or {}
    kind = mem.get("kind", "ultramem")
    if kind not in ("ultramem", "ultramem_v2", "pkm", "engram"):
        raise ValueError('memory.kind: expected "ultramem", "ultramem_v2", "pkm" or "engram", got "%s"' % kind)
    placement = parse_placement(mem.get("placement", ""), c["n_layers"])
    for name, defaults in (("ultramem", ULTRAMEM_DEFAULTS), ("ultramem_v2", ULTRAMEM_DEFAULTS), ("pkm", PKM_DEFAULTS),
                           ("engram", ENGRAM_DEFAULTS)):
        for k in mem.get(name, {}):
            if k in _SET_BY_MODEL or (k == "inner_ratio" and name != "pkm"):
                raise ValueError("memory.%s.%s: set by the model" % (name, k))
            if k not in defaults:
                raise ValueError("memory.%s.%s: unknown key" % (name, k))
    for k in mem:
        if k not in ("kind", "placement", "ultramem", "ultramem_v2", "pkm", "engram"):
            raise ValueError("memory.%s: unknown key" % k)
    c["memory"] = {"kind": kind, "placement": mem.get("placement", ""), "ultramem": dict(mem.get("ultramem", {})),
                   "pkm": dict(mem.get("pkm", {}))}
    for only in ("ultramem_v2", "engram"):  # written only for their kind, as the C++ writes them
        if kind == only:
            c["memory"][only] = dict(mem.get(only, {}))
    c["_ffn_kinds"] = kinds
    c["_placement"] = placement
    return c


def public_config(c):
    """The config as the C++ model_config_to_json writes it (without the derived fields)."""
    return OrderedDict((k, copy.deepcopy(v)) for k, v in c.items() if not k.startswith("_"))


def parse_placement(text, n_layers):
    """"1:3/4:4" -> [(1, 3), (4, 4)] (1-based read and write blocks), checked against n_layers."""
    out = []
    for part in text.split("/") if text.strip() else []:
        try:
            r, w = (int(x) for x in part.split(":"))
        except ValueError:
            raise ValueError('memory.placement: "%s" is not READ:WRITE' % part) from None
        if not 1 <= r <= w <= n_layers:
            raise ValueError("memory.placement: %s: need 1 <= read <= write <= n_layers = %d" % (part, n_layers))
        out.append((r, w))
    return out


def memory_layer_config(c, k):
    """Memory k's layer config: the template with D, num_layers, seed + 1 + k and the sparse-gradient rule."""
    mem = c["memory"]
    seed = c["seed"] + 1 + k
    if mem["kind"] in ("ultramem", "ultramem_v2"):
        v2 = mem["kind"] == "ultramem_v2"
        lc = dict(ULTRAMEM_V2_DEFAULTS) if v2 else {}
        lc.update(mem[mem["kind"]], D=c["d_model"], num_layers=c["n_layers"], seed=seed)
        if v2:
            lc["inner_ratio"] = c["ffn_hidden"] / c["d_model"]   # k_inner of the V2 init
            if "Dp" not in mem["ultramem_v2"]:                     # Dp : Dv = 1 : 3 for the given Dv
                lc["Dp"] = max(1, lc["Dv"] // 3)
        full = dict(ULTRAMEM_DEFAULTS, **lc)
        rows = full["n"] * full["n"] // max(1, full["E"])
        lc.setdefault("sparse_value_grad", rows * (full["Dv"] + full["Dp"]) >= SPARSE_VALUE_GRAD_MIN_ENTRIES)
    elif mem["kind"] == "engram":
        lc = dict(mem["engram"], D=c["d_model"], seed=seed)
    else:
        lc = dict(mem["pkm"], D=c["d_model"], seed=seed)
        full = dict(PKM_DEFAULTS, **lc)
        lc.setdefault("sparse_value_grad", full["n"] * full["n"] * full["Dv"] >= SPARSE_VALUE_GRAD_MIN_ENTRIES)
    return lc


# ---- the dense pieces ------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim; weight [D] starts at 1."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Causal self-attention with RoPE (half-split pairs): wqkv [D, 3D] (query | key | value columns,
    heads contiguous), wo [D, D], no biases."""

    def __init__(self, c, gen, out_std):
        super().__init__()
        D = c["d_model"]
        self.n_heads, self.head_dim, self.dropout = c["n_heads"], D // c["n_heads"], c["dropout"]
        draw = (lambda shape, std: torch.normal(0.0, std, size=shape, generator=gen)) if gen is not None else \
            (lambda shape, std: torch.empty(*shape))
        self.wqkv = nn.Parameter(draw((D, 3 * D), c["init_std"]))
        self.wo = nn.Parameter(draw((D, D), out_std))
        half = self.head_dim // 2
        inv_freq = torch.pow(torch.tensor(c["rope_theta"], dtype=torch.float64),
                             -torch.arange(0, half, dtype=torch.float64) * (2.0 / self.head_dim))
        angles = torch.arange(0, c["max_seq_len"], dtype=torch.float64).unsqueeze(1) * inv_freq.unsqueeze(0)
        self._cos, self._sin = angles.cos(), angles.sin()                    # [max_seq_len, hd/2], not saved

    def _rope(self, x, pos0):
        T = x.shape[2]
        cos = self._cos[pos0:pos0 + T].to(x.dtype)
        sin = self._sin[pos0:pos0 + T].to(x.dtype)
        x1, x2 = x.chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

    def forward(self, x, pos0=0, cache=None):
        """x [B, T, D] at positions pos0..; cache: (k, v) [B, nh, S, hd] written at pos0.. when given."""
        B, T, D = x.shape
        nh, hd = self.n_heads, self.head_dim
        q, k, v = (x @ self.wqkv).view(B, T, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # [B, nh, T, hd]
        q = self._rope(q, pos0) * (1.0 / math.sqrt(hd))
        k = self._rope(k, pos0)
        if cache is not None:
            cache[0][:, :, pos0:pos0 + T] = k
            cache[1][:, :, pos0:pos0 + T] = v
            k, v = cache[0][:, :, :pos0 + T], cache[1][:, :, :pos0 + T]
        S = pos0 + T
        scores = q @ k.transpose(2, 3)                                      # [B, nh, T, S]
        if T > 1:
            future = torch.arange(S).unsqueeze(0) > (torch.arange(T) + pos0).unsqueeze(1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, -1)
        if self.dropout > 0:
            probs = F.dropout(probs, self.dropout, self.training)
        return (probs @ v).transpose(1, 2).reshape(B, T, D) @ self.wo


def swiglu(x, w_in, w_out):
    """(silu(x W_gate) * (x W_up)) W_down with w_in = [W_gate | W_up] [D, 2h], w_out [h, D]."""
    gate, up = (x @ w_in).chunk(2, -1)
    return (F.silu(gate) * up) @ w_out


class SwiGLU(nn.Module):
    def __init__(self, D, hidden, gen, in_std, out_std):
        super().__init__()
        draw = (lambda shape, std: torch.normal(0.0, std, size=shape, generator=gen)) if gen is not None else \
            (lambda shape, std: torch.empty(*shape))
        self.w_in = nn.Parameter(draw((D, 2 * hidden), in_std))            # [D, 2*hidden]
        self.w_out = nn.Parameter(draw((hidden, D), out_std))              # [hidden, D]

    def forward(self, x):
        return swiglu(x, self.w_in, self.w_out)


class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts: router [D, K], w_in [K, D, 2h], w_out [K, h, D]; renormalised
    weights when top_k > 1; balance loss coef * K * sum_e f_e P_e (docs/model.md)."""

    def __init__(self, D, moe, hidden, gen, in_std, out_std):
        super().__init__()
        K = moe["num_experts"]
        self.top_k, self.balance_coef = moe["top_k"], moe["balance_coef"]
        draw = (lambda shape, std: torch.normal(0.0, std, size=shape, generator=gen)) if gen is not None else \
            (lambda shape, std: torch.empty(*shape))
        self.router = nn.Parameter(draw((D, K), in_std))
        self.w_in = nn.Parameter(draw((K, D, 2 * hidden), in_std))
        self.w_out = nn.Parameter(draw((K, hidden, D), out_std))
        self.balance_loss = torch.zeros(())

    def forward(self, x):
        D, K, k = self.router.shape[0], self.router.shape[1], self.top_k
        xf = x.reshape(-1, D)
        T = xf.shape[0]
        probs = torch.softmax(xf @ self.router, -1)                         # [T, K]
        top_w, top_e = probs.topk(k, -1)
        if k > 1:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        flat_e = top_e.reshape(-1)
        order = torch.sort(flat_e, stable=True).indices
        token = torch.div(order, k, rounding_mode="floor")
        weight = top_w.reshape(-1).index_select(0, order)
        counts = torch.bincount(flat_e, minlength=K)
        xs = xf.index_select(0, token).split(counts.tolist(), 0)
        ys = [swiglu(xs[e], self.w_in[e], self.w_out[e]) for e in range(K) if counts[e] > 0]
        out = torch.zeros_like(xf)
        if ys:
            out = out.index_add(0, token, torch.cat(ys, 0) * weight.unsqueeze(1))
        f = counts.to(probs.dtype) / float(max(1, T * k))
        self.balance_loss = (f * probs.mean(0)).sum() * (self.balance_coef * K) if T else torch.zeros(())
        return out.view(x.shape)


class Block(nn.Module):
    def __init__(self, c, b, memory_reads_here, gen):
        super().__init__()
        out_std = c["init_std"] / math.sqrt(2.0 * c["n_layers"])
        self.kind = c["_ffn_kinds"][b]
        self.attn_norm = RMSNorm(c["d_model"], c["norm_eps"])
        self.attn = Attention(c, gen, out_std)
        self.ffn_norm = RMSNorm(c["d_model"], c["norm_eps"]) if self.kind != "none" or memory_reads_here else None
        if self.kind == "dense":
            self.ffn = SwiGLU(c["d_model"], c["ffn_hidden"], gen, c["init_std"], out_std)
        elif self.kind == "moe":
            hidden = c["moe"]["expert_hidden"] or c["ffn_hidden"] // c["moe"]["top_k"]
            self.moe = MoE(c["d_model"], c["moe"], hidden, gen, c["init_std"], out_std)


# ---- the model -------------------------------------------------------------------------------------

class TransformerLM(nn.Module):
    """Decoder-only LM with UltraMem / UltraMemV2 / PKM / Engram memories (docs/model.md).

    TransformerLM(config) builds a fresh model (a dict, a JSON path; the C++ draws: the same seed gives
    the same weights as `ultramem train`'s initialisation); `from_checkpoint(path)` loads any checkpoint
    the CLI writes (fp32 / bf16 / int8 value tables, sharded runs assembled); `from_pretrained(dir)`
    an `ultramem export --format hf` folder. `save(path)` writes a checkpoint the CLI can eval,
    generate from and (when the model came from a resumable checkpoint) resume training from.
    """

    def __init__(self, config, init=True):
        super().__init__()
        c = normalise_config(config)
        self.cfg = c
        gen = torch.Generator().manual_seed(c["seed"]) if init else None
        V, D = c["vocab_size"], c["d_model"]
        self.embedding = nn.Parameter(torch.normal(0.0, c["init_std"], size=(V, D), generator=gen) if init
                                      else torch.empty(V, D))
        placement = c["_placement"]
        reads = [[k for k, (r, _) in enumerate(placement) if r == b + 1] for b in range(c["n_layers"])]
        self._reads_at = reads
        self._writes_at = [[k for k, (_, w) in enumerate(placement) if w == b + 1] for b in range(c["n_layers"])]
        self.blocks = nn.ModuleList(Block(c, b, bool(reads[b]), gen) for b in range(c["n_layers"]))
        self.final_norm = RMSNorm(D, c["norm_eps"])
        self.lm_head = None
        if not c["tie_embeddings"]:
            self.lm_head = nn.Parameter(torch.normal(0.0, c["init_std"], size=(V, D), generator=gen) if init
                                        else torch.empty(V, D))
        layer = {"pkm": PKM, "engram": Engram}.get(c["memory"]["kind"], UltraMem)
        self.memories = nn.ModuleList(layer(init=init, **memory_layer_config(c, k)) for k in range(len(placement)))
        self._aux = {}
        self.checkpoint = None      # the Checkpoint this model was loaded from (training state kept for save)
        self.tokenizer = None       # a sentencepiece processor when one was found (generate with text)
        self.source_path = None

    @property
    def config(self):
        """The model config as the C++ writes it (a dict)."""
        return public_config(self.cfg)

    # ---- forward ---------------------------------------------------------------------------------------
    def _check_tokens(self, tokens, limit, limit_name):
        who = "TransformerLM.forward"
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 2:
            raise TypeError("%s: tokens must be a [B, T] int64 tensor, got %s" % (
                who, "%s %s" % (tokens.dtype, list(tokens.shape)) if isinstance(tokens, torch.Tensor)
                else type(tokens).__name__))
        if tokens.numel() == 0:
            raise ValueError("%s: tokens must not be empty" % who)
        if tokens.shape[1] > limit:
            raise ValueError("%s: %d tokens per sequence exceed %s = %d" % (who, tokens.shape[1], limit_name, limit))
        bad = (tokens < 0) | (tokens >= self.cfg["vocab_size"])
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError("%s: token id %d at [%d, %d] is outside [0, vocab_size = %d)"
                             % (who, int(tokens[b, t]), b, t, self.cfg["vocab_size"]))

    def forward(self, tokens):
        """tokens [B, T] int64 -> logits [B, T, V]; records this forward's aux losses (aux_losses())."""
        self._check_tokens(tokens, self.cfg["max_seq_len"], "max_seq_len")
        return self._run(tokens, 0, None, record_aux=True)

    def _run(self, tokens, pos0, cache, record_aux):
        c = self.cfg
        p = c["dropout"] if self.training else 0.0

        def branch(x):
            return F.dropout(x, p, True) if p > 0 else x
        h = F.embedding(tokens, self.embedding)                             # [B, T, D]
        pending = {}
        balance = None
        for b, blk in enumerate(self.blocks):
            h = h + branch(blk.attn(blk.attn_norm(h), pos0, None if cache is None else cache[b]))
            if blk.ffn_norm is not None:
                u = blk.ffn_norm(h)                                          # the FFN input memories read
                for k in self._reads_at[b]:
                    m = self.memories[k]
                    if isinstance(m, Engram):
                        pending[k] = m(u, tokens, None if cache is None else cache.memory_states[k])
                    else:
                        pending[k] = m(u)
                if blk.kind == "dense":
                    h = h + branch(blk.ffn(u))
                elif blk.kind == "moe":
                    h = h + branch(blk.moe(u))
                    if record_aux:
                        balance = blk.moe.balance_loss if balance is None else balance + blk.moe.balance_loss
            for k in self._writes_at[b]:
                h = h + branch(pending.pop(k))
        h = self.final_norm(h)
        head = self.embedding if self.lm_head is None else self.lm_head
        logits = h @ head.t()
        if record_aux:
            self._aux = {}
            if balance is not None:
                self._aux["moe_balance"] = balance
            tucker = [m.aux_loss() for m in self.memories if isinstance(m, UltraMem) and m.config["aux_loss"]
                      and m.config["r"] >= 2]
            if tucker:
                self._aux["tucker"] = sum(tucker[1:], tucker[0])
        return logits

    def aux_losses(self):
        """{"moe_balance", "tucker"} of the last forward (coefficients applied), where present."""
        return dict(self._aux)

    def loss(self, tokens, targets):
        """Mean cross-entropy plus every aux loss, as the trainer minimises it."""
        logits = self(tokens)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        for v in self._aux.values():
            loss = loss + v
        return loss

    def param_groups(self, weight_decay=0.1, memory_weight_decay=0.0):
        """AdamW groups decay / no_decay / memory_values (training.param_groups)."""
        return param_groups(self, weight_decay, memory_weight_decay)

    def after_optimizer_step(self):
        """Refreshes every memory's rank-1 filter from its cores (call after each optimizer step)."""
        for m in self.memories:
            m.refresh_tucker_approx()

    def telemetry(self):
        """{"mem<k>.<stat>": value} of every memory layer (their stats() windows)."""
        out = {}
        for k, m in enumerate(self.memories):
            for name, v in m.stats().items():
                out["mem%d.%s" % (k, name)] = v
        return out

    @property
    def value_format(self):
        """The memory value tables' storage: fp32, bf16 or int8 (fp32 without UltraMem or Engram layers)."""
        fmts = {m.value_format for m in self.memories if isinstance(m, (UltraMem, Engram))}
        return fmts.pop() if len(fmts) == 1 else ("fp32" if not fmts else "mixed")

    # ---- checkpoints -----------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path, weights_only=False):
        """Loads a checkpoint written by the CLI (or by save()): any value format, sharded runs assembled.
        The training state (optimizer, trainer state, generator) is kept for save() unless weights_only.
        The run folder's tokenizer.model, when present and sentencepiece is installed, becomes .tokenizer."""
        ck = ckpt_io.read_checkpoint(path)
        model = cls(ck.model_config, init=False)
        model.load_tensors(ck.model, ck.path)
        for key in ("key_format", "weight_format"):
            fmt = ck.metadata.get(key, "fp32")
            if fmt != "fp32":
                warnings.warn("%s: metadata %s = %s: the C++ commands round the %s to it at load; Python computes "
                              "with the stored float32 ones (`ultramem eval --%s fp32` gives the same loss)"
                              % (path, key, fmt, "keys" if key == "key_format" else "dense weights",
                                 "keys" if key == "key_format" else "weights"))
        if weights_only:
            ck.optim, ck.rng, ck.trainer_state = OrderedDict(), None, None
        ck.model = OrderedDict((k, None) for k in ck.model)  # the names and order only: the model holds the data
        model.checkpoint = ck
        model.source_path = os.path.abspath(path)
        model.tokenizer = load_tokenizer(os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.model"))
        model.eval()
        return model

    load = from_checkpoint

    @classmethod
    def from_pretrained(cls, folder):
        """Loads an `ultramem export --format hf` folder (hf.py)."""
        from .hf import load_pretrained
        return load_pretrained(cls, folder)

    def load_tensors(self, tensors, source="tensors"):
        """Copies C++-named tensors ("blocks.0.attn.wqkv", "memories.0.values", ...) into the model; a value
        table keeps its stored format (with memories.<k>.values_scale for int8). Missing, unexpected or
        mis-shaped tensors raise ValueError naming them."""
        own = OrderedDict(self.named_parameters())
        own.update(self.named_buffers())
        tables = {}
        for k, m in enumerate(self.memories):
            if isinstance(m, (UltraMem, Engram)):
                tables["memories.%d.values" % k] = m
        names = set(tensors)
        missing = [n for n in own if n not in names and n not in tables]
        unexpected = [n for n in names if n not in own and not (n.endswith(".values_scale") and
                                                                 n[:-len("_scale")] in tables)]
        if missing or unexpected:
            raise ValueError("%s: does not fit the model: missing %s, unexpected %s" % (source, missing or "none",
                                                                                         unexpected or "none"))
        with torch.no_grad():
            for name, t in tensors.items():
                if name in tables:
                    layer = tables[name]
                    weight = layer.wq if isinstance(layer, UltraMem) else layer.wk
                    if t.dtype in (torch.float32, torch.float64) and t.dtype == weight.dtype:
                        layer.set_value_table(t.clone() if not t.is_contiguous() else t)
                    else:
                        layer.set_value_table(t.contiguous(), tensors.get(name + "_scale"))
                    continue
                if name.endswith(".values_scale"):
                    continue
                dst = own[name]
                if tuple(dst.shape) != tuple(t.shape) or dst.dtype != t.dtype:
                    raise ValueError("%s: tensor %s is %s %s, the model's %s %s" % (
                        source, name, t.dtype, list(t.shape), dst.dtype, list(dst.shape)))
                dst.copy_(t)
        for m in self.memories:
            if isinstance(m, UltraMem):
                m._keys_cache = None

    def state_tensors(self):
        """The model's tensors under their C++ names, as a checkpoint stores them."""
        out = OrderedDict()
        for name, p in self.named_parameters():
            out[name] = p.detach()
        for name, b in self.named_buffers():
            out[name] = b.detach()
        return out

    def save(self, path, keep_training_state=True):
        """Writes a checkpoint at `path` that `ultramem eval`, `generate`, `quantize` and `serve` read. A model
        loaded from a checkpoint keeps its metadata and, with keep_training_state, its optimizer state, trainer
        state and generator, so `ultramem train --resume` continues from a file saved into its run folder.
        Returns the checksum."""
        tensors = self.state_tensors()
        prev = self.checkpoint
        if prev is not None:  # the loaded file's order first (a round trip writes the same file)
            order = [n for n in prev.model if n in tensors] + [n for n in tensors if n not in prev.model]
            tensors = OrderedDict((n, tensors[n]) for n in order)
        meta = dict(prev.metadata) if prev is not None else {}
        fmt = self.value_format
        if fmt in ("bf16", "int8"):
            meta["value_format"] = fmt
        else:
            meta.pop("value_format", None)
        keep = keep_training_state and prev is not None
        out = ckpt_io.Checkpoint(tensors, self.config, optim=prev.optim if keep else None,
                                 rng=prev.rng if keep else None,
                                 train_config=prev.train_config if keep else None,
                                 trainer_state=prev.trainer_state if keep else None, metadata=meta)
        return ckpt_io.save_checkpoint(path, out)

    # ---- evaluation and generation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data_dir=None, batch_size=8, seq_len=0, max_batches=0):
        """Validation loss on a prepared folder's val split, batched as `ultramem eval` batches it (default
        folder: the run's, from run.json next to the checkpoint). Returns {"val_loss", "perplexity",
        "bits_per_byte", "tokens", "batches"}."""
        if data_dir is None:
            data_dir = self._run_data_dir()
        seq_len = seq_len or self.cfg["max_seq_len"]
        if seq_len > self.cfg["max_seq_len"]:
            raise ValueError("seq_len %d exceeds max_seq_len %d" % (seq_len, self.cfg["max_seq_len"]))
        tokens, manifest = data_io.validation_tokens(data_dir)
        was_training = self.training
        self.eval()
        nll, count, batches = 0.0, 0, 0
        try:
            for inputs, targets in data_io.eval_batches(tokens, batch_size, seq_len, max_batches):
                logits = self(inputs)
                nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             reduction="sum"))
                count += targets.numel()
                batches += 1
        finally:
            self.train(was_training)
        loss = nll / count
        split = manifest["splits"]["val"]
        return {"val_loss": loss, "perplexity": math.exp(loss),
                "bits_per_byte": loss / math.log(2.0) * split["tokens"] / split["bytes"],
                "tokens": count, "batches": batches}

    def _run_data_dir(self):
        record = os.path.join(os.path.dirname(self.source_path or ""), "run.json")
        if self.source_path and os.path.isfile(record):
            with open(record) as f:
                d = json.load(f).get("data_dir")
            if d:
                return d
        return "data/prepared/sotu-v8192"

    def make_cache(self, batch, max_len=None):
        """A KV cache: per block (k, v) [batch, n_heads, max_len, head_dim]; .memory_states holds each Engram
        memory's decoding state (None for the other kinds)."""
        c = self.cfg
        max_len = max_len or c["max_seq_len"]
        hd = c["d_model"] // c["n_heads"]
        dt = self.embedding.dtype
        cache = KVCache((torch.zeros(batch, c["n_heads"], max_len, hd, dtype=dt),
                         torch.zeros(batch, c["n_heads"], max_len, hd, dtype=dt)) for _ in range(c["n_layers"]))
        cache.memory_states = [m.make_state(batch) if isinstance(m, Engram) else None for m in self.memories]
        return cache

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens=200, temperature=0.8, top_k=0, top_p=1.0, seed=0, stop_at_eos=True):
        """Continues `prompt` (token ids, or text when the model has a tokenizer) with a KV cache, one token
        per step: greedy with temperature 0 (the same tokens as `ultramem generate --temperature 0`), else
        sampled from softmax(logits / temperature) after top-k and top-p (the draws come from torch's
        generator seeded with `seed`, not the CLI's). Stops at max_new_tokens, at EOS (id 2 of the
        prepared tokenizer, or the tokenizer's), or when the context is full. Returns the new ids, or the
        text when the prompt was text."""
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 0:
            raise ValueError("generate: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 0")
        text = isinstance(prompt, str)
        if text:
            if self.tokenizer is None:
                raise ValueError("generate: a text prompt needs a tokenizer (python3-sentencepiece and the run's "
                                 "tokenizer.model); pass token ids instead")
            # EOS first: documents are separated by EOS in the training data, so it marks a document start
            # (the CLI's prompt encoding).
            ids = [self.tokenizer.eos_id()] + self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("generate: empty prompt")
        eos = self.tokenizer.eos_id() if self.tokenizer is not None else 2
        was_training = self.training
        self.eval()
        try:
            limit = self.cfg["max_seq_len"]
            if len(ids) > limit:
                raise ValueError("generate: the prompt's %d tokens exceed max_seq_len %d" % (len(ids), limit))
            cache = self.make_cache(1, limit)
            tokens = torch.tensor([ids], dtype=torch.int64)
            self._check_tokens(tokens, limit, "max_seq_len")
            logits = self._run(tokens, 0, cache, record_aux=False)[0, -1]
            gen = torch.Generator().manual_seed(seed)
            out, pos = [], len(ids)
            while len(out) < max_new_tokens:
                nxt = _sample(logits, temperature, top_k, top_p, gen)
                out.append(nxt)
                if (stop_at_eos and nxt == eos) or pos >= limit:
                    break
                logits = self._run(torch.tensor([[nxt]]), pos, cache, record_aux=False)[0, -1]
                pos += 1
        finally:
            self.train(was_training)
        if text:
            return self.tokenizer.decode([t for t in out if t != eos])
        return out


class KVCache(list):
    """Per block (k, v); memory_states: per memory, its decoding state or None."""
    memory_states = ()


def _sample(logits, temperature, top_k, top_p, gen):
    logits = logits.float()
    if temperature == 0:
        return int(torch.argmax(logits))
    z = logits / temperature
    if 0 < top_k < z.numel():
        kth = torch.topk(z, top_k).values[-1]
        z = torch.where(z >= kth, z, torch.full_like(z, float("-inf")))
    p = torch.softmax(z.double(), -1)
    if top_p < 1:
        sp, idx = torch.sort(p, descending=True, stable=True)
        before = torch.cumsum(sp, 0) - sp
        drop = before >= top_p * float(sp.sum())
        drop[0] = False
        p = p.scatter(0, idx[drop], 0.0)
    return int(torch.multinomial(p, 1, generator=gen))


def load_tokenizer(path):
    """A sentencepiece processor for `path`, or None when the file or the sentencepiece module is missing."""
    if not os.path.isfile(path):
        return None
    try:
        import sentencepiece
    except ImportError:
        return None
    return sentencepiece.SentencePieceProcessor(model_file=path)
