"""The memory layers as torch.nn.Modules: UltraMem (spec sections 3-6, V2 in section 11), the PKM baseline
(section 7) and Engram (section 12).

Their keyword arguments are the C++ config fields (src/ultramem/nn/memory_config.h) and their
parameters carry the C++ names and shapes, so a layer's state_dict is the checkpoint's
`memories.<k>.*` tensors. Built with the same seed, a layer holds the same initial weights as the C++
one. Forward and backward run the registered ops (torch.ops.ultramem.tdqkr, pooled_lookup); with grad
mode off the UltraMem layer calls the fused no-grad op (ultramem_decode) the C++ inference path calls.
Engram's rows come from the op engram_rows, the C++ layer's hash.
"""
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ._ops import ops

ULTRAMEM_DEFAULTS = OrderedDict([
    ("D", 256), ("n", 64), ("E", 4), ("Dk", 64), ("Dv", 128), ("r", 2), ("C", 2), ("H", 2), ("m", 16),
    ("m_first", 0), ("filter", "rank1"), ("m_neg", 0), ("filter_rank", 0), ("qk_norm", "rms"),
    ("qk_scale_init", 0.0), ("aux_loss", True), ("aux_alpha", 0.001), ("aux_tau", 0.15),
    ("aux_reduction", "mean"), ("value_init", "paper"), ("value_std", 0.02), ("num_layers", 4),
    ("sparse_value_grad", False), ("track_stats", True), ("stats_window", 4096), ("retrieval_sample", 64),
    ("seed", 0), ("permutation_key", 0),
    # UltraMemV2 (spec section 11): each a switch of its own; the defaults are V1.
    ("query_per_rank", False), ("single_projection", False), ("Dp", 0), ("inner_ratio", 4.0), ("score_var", 0.1),
])

# The UltraMemV2 template (UltraMemConfig::v2_defaults): query per rank, one projection, pre-values of
# Dv / 3, the V2 init, no aux loss, one head with Dk 128 and m 32.
ULTRAMEM_V2_DEFAULTS = OrderedDict(ULTRAMEM_DEFAULTS)
ULTRAMEM_V2_DEFAULTS.update(query_per_rank=True, single_projection=True, Dp=128 // 3, H=1, Dk=128, m=32, m_first=32,
                            aux_loss=False, value_init="v2")

PKM_DEFAULTS = OrderedDict([
    ("D", 256), ("n", 64), ("Dk", 64), ("Dv", 256), ("H", 4), ("m", 32), ("query_norm", "batch"),
    ("softmax", True), ("shared_query", False), ("value_std", 0.0), ("sparse_value_grad", False), ("seed", 0),
])

ENGRAM_DEFAULTS = OrderedDict([
    ("D", 256), ("heads", 4), ("d_e", 256), ("rows", 65536), ("kernel", 4), ("value_std", 0.02), ("conv_std", 0.0),
    ("sparse_value_grad", False), ("seed", 0),
])

_CHOICES = {
    "filter": ("rank1", "two_sign", "rank_r"), "qk_norm": ("rms", "layer"), "aux_reduction": ("mean", "sum"),
    "value_init": ("paper", "fixed", "v2"), "query_norm": ("batch", "layer", "none"),
}
VALUE_FORMATS = {torch.float32: "fp32", torch.float64: "fp32", torch.bfloat16: "bf16", torch.int8: "int8"}


def _config(who, defaults, given):
    """defaults updated with `given`; unknown keys, wrong types and bad choices raise ValueError / TypeError
    naming the field as `who.field`."""
    cfg = OrderedDict(defaults)
    for k, v in given.items():
        if k not in defaults:
            raise ValueError("%s.%s: unknown field (fields: %s)" % (who, k, ", ".join(defaults)))
        want = type(defaults[k])
        if want is bool:
            ok = isinstance(v, bool)
        elif want is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif want is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            v = float(v) if ok else v
        else:
            ok = isinstance(v, str)
        if not ok:
            raise TypeError("%s.%s: expected %s, got %r" % (who, k, want.__name__, v))
        if k in _CHOICES and v not in _CHOICES[k]:
            raise ValueError("%s.%s: expected one of %s, got %r" % (who, k, ", ".join(_CHOICES[k]), v))
        cfg[k] = v
    return cfg


def _fail(who, field, what):
    raise ValueError("%s.%s: %s" % (who, field, what))


def first_stage_m(c):
    return c["m_first"] if c["m_first"] > 0 else c["m"]


def filter_negatives(c):
    """The kernels' m_neg: 0 but for the two_sign filter (m_neg, or m_first / 2)."""
    if c["filter"] != "two_sign":
        return 0
    return c["m_neg"] if c["m_neg"] > 0 else first_stage_m(c) // 2


def filter_vector_count(c):
    """The kernels' filter_rank: R for rank_r, 0 for the signed rank-1 filters."""
    if c["filter"] != "rank_r":
        return 0
    return c["filter_rank"] if c["filter_rank"] > 0 else c["r"]


def validate_ultramem(c):
    """The checks of UltraMemConfig::validate (src/ultramem/nn/memory_config.cpp), same messages."""
    w = "UltraMemConfig"
    for f in ("D", "n", "E", "Dk", "Dv", "r", "C", "H", "m", "num_layers", "stats_window"):
        if c[f] < 1:
            _fail(w, f, "must be >= 1, got %d" % c[f])
    for f, top in (("n", 65536), ("E", 1 << 16), ("Dk", 1 << 16), ("Dv", 1 << 16), ("r", 64), ("C", c["Dv"]),
                   ("H", 1024), ("stats_window", 1 << 30)):
        if c[f] > top:
            _fail(w, f, "must be <= %d, got %d" % (top, c[f]))
    s = math.isqrt(c["E"])
    if s * s != c["E"]:
        _fail(w, "E", "must be a square number (1, 4, 9, ...), got %d" % c["E"])
    if c["n"] % s:
        _fail(w, "n", "must be a multiple of sqrt(E) = %d (n = sqrt(E) * n_phys), got %d" % (s, c["n"]))
    if c["Dv"] % c["C"]:
        _fail(w, "Dv", "must be divisible by C = %d (MCS slices), got %d" % (c["C"], c["Dv"]))
    if c["m"] > c["n"] ** 2:
        _fail(w, "m", "must be <= n*n = %d, got %d" % (c["n"] ** 2, c["m"]))
    if c["m_first"] < 0:
        _fail(w, "m_first", "must be >= 0 (0 means m), got %d" % c["m_first"])
    m1 = first_stage_m(c)
    if m1 > c["n"]:
        if c["m_first"] == 0:
            _fail(w, "m_first", "is 0, which means m = %d, but the first stage keeps at most n = %d per side; set "
                  "m_first to a value in [ceil(sqrt(m)), n]" % (c["m"], c["n"]))
        _fail(w, "m_first", "must be <= n = %d, got %d" % (c["n"], c["m_first"]))
    if m1 * m1 < c["m"]:
        _fail(w, "m_first", "must be >= ceil(sqrt(m)) so that its m_first x m_first candidates hold the m = %d kept "
              "ones, got %d (%d candidates)" % (c["m"], m1, m1 * m1))
    if c["m_neg"] < 0:
        _fail(w, "m_neg", "must be >= 0 (0 means m_first / 2), got %d" % c["m_neg"])
    if c["filter"] != "two_sign" and c["m_neg"] != 0:
        _fail(w, "m_neg", "only the two_sign filter takes m_neg (filter is %s), got %d" % (c["filter"], c["m_neg"]))
    if c["filter"] != "rank_r" and c["filter_rank"] != 0:
        _fail(w, "filter_rank", "only the rank_r filter takes filter_rank (filter is %s), got %d"
              % (c["filter"], c["filter_rank"]))
    if c["filter"] == "rank_r" and not 0 <= c["filter_rank"] <= c["r"]:
        _fail(w, "filter_rank", "must be in [1, r = %d] (0 means r), got %d" % (c["r"], c["filter_rank"]))
    if c["filter"] == "two_sign":
        if m1 < 2:
            _fail(w, "m_first", "the two_sign filter needs m_first >= 2 (one candidate from each end), got %d" % m1)
        mn = filter_negatives(c)
        mp = m1 - mn
        if mn >= m1:
            _fail(w, "m_neg", "must be < m_first = %d (the rest come from the positive end), got %d" % (m1, mn))
        if mp * mp + mn * mn < c["m"]:
            _fail(w, "m_neg", "splits m_first = %d into %d + %d, whose same-sign blocks hold %d pairs, fewer than m = "
                  "%d; raise m_first or balance the split" % (m1, mp, mn, mp * mp + mn * mn, c["m"]))
    if c["retrieval_sample"] < 0:
        _fail(w, "retrieval_sample", "must be >= 0 (0 turns the check off)")
    if c["qk_scale_init"] < 0:
        _fail(w, "qk_scale_init", "must be >= 0 (0 means Dk^-0.33)")
    if c["aux_alpha"] < 0:
        _fail(w, "aux_alpha", "must be >= 0")
    if c["value_init"] == "fixed" and not c["value_std"] > 0:
        _fail(w, "value_std", "must be > 0")
    if c["Dp"] < 0:
        _fail(w, "Dp", "must be >= 0 (0: no pre-values), got %d" % c["Dp"])
    if c["Dp"] > 1 << 16:
        _fail(w, "Dp", "must be <= %d, got %d" % (1 << 16, c["Dp"]))
    if c["value_init"] == "v2" and c["Dp"] == 0:
        _fail(w, "value_init", "\"v2\" sizes values and pre-values together and needs Dp > 0")
    if not c["inner_ratio"] > 0 or not c["score_var"] >= 0:
        _fail(w, "inner_ratio" if not c["inner_ratio"] > 0 else "score_var", "must be > 0 (score_var >= 0)")
    if not 0 <= c["seed"] < 1 << 64 or not 0 <= c["permutation_key"] < 1 << 64:
        _fail(w, "seed" if not 0 <= c["seed"] < 1 << 64 else "permutation_key", "must be in [0, 2^64)")


def validate_pkm(c):
    """The checks of PKMConfig::validate, same messages."""
    w = "PKMConfig"
    for f in ("D", "n", "Dk", "Dv", "H", "m"):
        if c[f] < 1:
            _fail(w, f, "must be >= 1, got %d" % c[f])
    for f, top in (("n", 65536), ("Dk", 1 << 16), ("Dv", 1 << 16), ("H", 1024)):
        if c[f] > top:
            _fail(w, f, "must be <= %d, got %d" % (top, c[f]))
    if c["m"] > c["n"]:
        _fail(w, "m", "must be <= n = %d (top-m per side), got %d" % (c["n"], c["m"]))
    if c["value_std"] < 0:
        _fail(w, "value_std", "must be >= 0 (0 means Dv^-0.5)")


def validate_engram(c):
    """The checks of EngramConfig::validate, same messages."""
    w = "EngramConfig"
    for f in ("D", "heads", "d_e", "rows", "kernel"):
        if c[f] < 1:
            _fail(w, f, "must be >= 1, got %d" % c[f])
    for f, top in (("heads", 64), ("d_e", 1 << 16), ("rows", 1 << 31), ("kernel", 64)):
        if c[f] > top:
            _fail(w, f, "must be <= %d, got %d" % (top, c[f]))
    if c["d_e"] % (2 * c["heads"]):
        _fail(w, "d_e", "must be a multiple of 2 * heads = %d (one slice per table), got %d"
              % (2 * c["heads"], c["d_e"]))
    if not c["value_std"] > 0:
        _fail(w, "value_std", "must be > 0")
    if not c["conv_std"] >= 0:
        _fail(w, "conv_std", "must be >= 0 (0: the taps start at zero)")
    if not 0 <= c["seed"] < 1 << 64:
        _fail(w, "seed", "must be in [0, 2^64)")


def _check_input(who, x, D, weight):
    if not isinstance(x, torch.Tensor):
        raise TypeError("%s: input must be a torch.Tensor, got %s" % (who, type(x).__name__))
    if x.device.type != "cpu":
        raise ValueError("%s: input must be a CPU tensor (the ops run on the CPU), got device %s" % (who, x.device))
    if x.dim() < 1 or x.shape[-1] != D:
        raise ValueError("%s: input must have shape [..., D=%d], got %s" % (who, D, list(x.shape)))
    if x.dtype != weight.dtype:
        raise TypeError("%s: input dtype %s differs from the layer's %s" % (who, x.dtype, weight.dtype))


def rms_norm(x, scale, eps):
    """x * rsqrt(mean(x^2) + eps) * scale over the last dim (nn::rms_norm): the model's RMSNorm, UltraMem's
    query/key norm and Engram's three norms."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def _normal(shape, std, gen):
    return torch.normal(0.0, std, size=tuple(shape), generator=gen)


class _ValueTable:
    """The value-table storage of UltraMem and Engram: float32 (trainable), or bf16 / int8 with one float32
    scale per row (`values_scale`) for no-grad forwards, as the C++ layers store them (nn/value_table.h)."""

    @property
    def value_format(self):
        """"fp32" (trainable), "bf16" or "int8" (one float scale per row in `values_scale`; inference only)."""
        return VALUE_FORMATS.get(self.values.dtype, str(self.values.dtype))

    def set_value_table(self, values, scale=None):
        """Installs a value table as stored: values [rows, width] float32 / float64, bfloat16, or int8 with
        scale [rows] float32 (a row is q * scale). bf16 and int8 tables serve no-grad forwards only."""
        who = "%s.set_value_table" % type(self).__name__
        rows, width = self.values.shape
        if not isinstance(values, torch.Tensor) or values.dim() != 2 or tuple(values.shape) != (rows, width):
            raise ValueError("%s: values must be [%d, %d], got %s" % (who, rows, width,
                                                                       list(getattr(values, "shape", []))))
        if values.dtype not in VALUE_FORMATS:
            raise TypeError("%s: values must be float32, float64, bfloat16 or int8, got %s" % (who, values.dtype))
        if (values.dtype == torch.int8) != (scale is not None):
            raise ValueError("%s: int8 values need their scale [%d], other formats none" % (who, rows))
        if scale is not None and (scale.dtype != torch.float32 or tuple(scale.shape) != (rows,)):
            raise ValueError("%s: values_scale must be float32 [%d], got %s %s" % (who, rows, scale.dtype,
                                                                                list(scale.shape)))
        trainable = values.is_floating_point() and values.dtype != torch.bfloat16
        del self.values
        if trainable:
            self.values = nn.Parameter(values)
        else:
            self.register_buffer("values", values)
        if "values_scale" in self._buffers:
            del self._buffers["values_scale"]
        if scale is not None:
            self.register_buffer("values_scale", scale)

    def _apply(self, fn, *args, **kwargs):
        # A bf16 / int8 table and its scales keep their storage through .double(), .float(), ...
        if self.value_format == "fp32":
            return super()._apply(fn, *args, **kwargs)
        kept = {k: self._buffers.pop(k) for k in ("values", "values_scale") if k in self._buffers}
        try:
            return super()._apply(fn, *args, **kwargs)
        finally:
            self._buffers.update(kept)

    def _value_rows(self, index, dtype):
        """Rows `index` [K] of the table as `dtype` [K, width] (dequantised; no-grad only when compact)."""
        if self.value_format == "fp32":
            raise AssertionError("float tables are read by the autograd ops")
        rows = self.values.index_select(0, index).to(dtype)
        if self.value_format == "int8":
            rows = rows * self.values_scale.index_select(0, index).to(dtype).unsqueeze(1)
        return rows


class UltraMem(_ValueTable, nn.Module):
    """UltraMem layer: x [..., D] -> [..., D].

    Parameters (C++ names): wq [D, 2*Dk], q_scale [2, Dk], keys [H, 2, n, Dk, r], k_scale [2, Dk],
    cores [C, H, r, r], values [N, Dv] (N = n*n / E), wo [E*Dv, D]; buffers perm [n*n] int64 (the IVE
    permutation), u, v [H, r] (the rank-1 filter, refreshed from the cores by refresh_tucker_approx()).
    `init=False` allocates the tensors without drawing them (for weights about to be loaded).
    """

    def __init__(self, init=True, **config):
        super().__init__()
        c = _config("UltraMemConfig", ULTRAMEM_DEFAULTS, config)
        validate_ultramem(c)
        self.config = c
        D, n, E, Dk, Dv, r, C, H = (c[k] for k in ("D", "n", "E", "Dk", "Dv", "r", "C", "H"))
        N = n * n // E
        Q = r if c["query_per_rank"] else 1          # query halves per side
        G = 1 if c["single_projection"] else E       # wo: [G*Dv, D]
        Dp = c["Dp"]
        if init:
            gen = torch.Generator().manual_seed(c["seed"])
            v2 = c["value_init"] == "v2"
            qk = c["qk_scale_init"] if c["qk_scale_init"] > 0 else Dk ** (-0.4 if v2 else -0.33)
            vstd = math.sqrt(E / (2.0 * c["m"] * H * c["num_layers"])) if c["value_init"] == "paper" else c["value_std"]
            if v2:
                vstd = (0.2 * c["inner_ratio"] * D / (c["m"] * H * (1.0 + c["score_var"]) * Dp * Dv *
                                                     c["num_layers"])) ** 0.25
            lin = math.sqrt(2.0 / (5.0 * D))
            # The C++ constructor's draws, in its order (src/ultramem/nn/ultramem.cpp).
            self.wq = nn.Parameter(_normal([D, 2 * Q * Dk], lin if v2 else 1.0 / math.sqrt(Dk), gen))
            self.q_scale = nn.Parameter(torch.full((2, Dk), qk))
            self.keys = nn.Parameter(_normal([H, 2, n, Dk, r], 1.0 / math.sqrt(Dk), gen))
            self.k_scale = nn.Parameter(torch.full((2, Dk), qk))
            self.cores = nn.Parameter(torch.rand((C, H, r, r), generator=gen))
            values = torch.empty(N, Dv)
            values.normal_(0.0, vstd, generator=gen)
            self.values = nn.Parameter(values)
            self.wo = nn.Parameter(_normal([G * Dv, D], lin if v2 else 1.0 / math.sqrt(G * Dv), gen))
            if Dp > 0:
                self.wp = nn.Parameter(_normal([D, Dp], lin if v2 else 1.0 / math.sqrt(D), gen))
                self.pre_values = nn.Parameter(_normal([N, Dp], vstd, gen))
            perm = ops().ive_permutation(n * n, _as_int64(c["seed"]), _as_int64(c["permutation_key"]))
        else:
            self.wq = nn.Parameter(torch.empty(D, 2 * Q * Dk))
            self.q_scale = nn.Parameter(torch.empty(2, Dk))
            self.keys = nn.Parameter(torch.empty(H, 2, n, Dk, r))
            self.k_scale = nn.Parameter(torch.empty(2, Dk))
            self.cores = nn.Parameter(torch.empty(C, H, r, r))
            self.values = nn.Parameter(torch.empty(N, Dv))
            self.wo = nn.Parameter(torch.empty(G * Dv, D))
            if Dp > 0:
                self.wp = nn.Parameter(torch.empty(D, Dp))
                self.pre_values = nn.Parameter(torch.empty(N, Dp))
            perm = torch.empty(n * n, dtype=torch.int64)
        self.register_buffer("perm", perm)
        self.register_buffer("u", torch.zeros(H, r))
        self.register_buffer("v", torch.zeros(H, r))
        self._keys_cache = None
        self._core_sv = (0.0, 0.0)
        self.reset_stats()
        self._last = None
        if init:
            self.refresh_tucker_approx()

    # ---- value table storage ---------------------------------------------------------------------
    # ---- forward -----------------------------------------------------------------------------------
    def _norm(self, x, scale):
        if self.config["qk_norm"] == "rms":
            return rms_norm(x, scale, 1e-6)
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + 1e-6) * scale

    def _normalised_keys(self, detach=False):
        """(kn_row, kn_col), each [H, n, r, Dk]: the keys normalised over Dk."""
        keys, ks = (self.keys.detach(), self.k_scale.detach()) if detach else (self.keys, self.k_scale)
        kt = keys.transpose(3, 4)                                            # [H, 2, n, r, Dk]
        return self._norm(kt[:, 0], ks[0]), self._norm(kt[:, 1], ks[1])

    def key_scores(self, u):
        """u [T, D] -> (s_row, s_col), each [T, H, r, n]: the query halves against the normalised keys."""
        c = self.config
        T, Dk, H, r, n = u.shape[0], c["Dk"], c["H"], c["r"], c["n"]
        if c["query_per_rank"]:
            # V2: rank a of each side scores with its own query half.
            q = (u @ self.wq).view(T, 2, r, Dk)                              # [T, 2, r, Dk]
            kt = self.keys.transpose(3, 4)                                   # [H, 2, n, r, Dk]
            return tuple(torch.einsum("tad,hiad->thai", self._norm(q[:, s], self.q_scale[s]),
                                      self._norm(kt[:, s], self.k_scale[s])).contiguous() for s in (0, 1))
        q = u @ self.wq                                                      # [T, 2*Dk]
        q_row = self._norm(q[:, :Dk], self.q_scale[0])
        q_col = self._norm(q[:, Dk:], self.q_scale[1])
        kn_row, kn_col = self._normalised_keys()

        def side(qs, kn):
            k2 = kn.permute(0, 2, 1, 3).reshape(H * r * n, Dk)              # [(H r n), Dk]
            return (qs @ k2.t()).view(T, H, r, n)
        return side(q_row, kn_row), side(q_col, kn_col)

    def filter_vectors(self):
        """The first-stage filter's vectors (no grad): u, v [H, r] (rank1, two_sign) or, for rank_r,
        [H, R, r] from the R leading singular pairs of the core sum, each scaled by sqrt(sigma)."""
        R = filter_vector_count(self.config)
        if R == 0:
            return self.u.detach(), self.v.detach()
        with torch.no_grad():
            U, S, Vh = torch.linalg.svd(self.cores.detach().sum(0).double(), full_matrices=False)
            w = S[:, :R].clamp_min(0).sqrt().unsqueeze(2)                    # [H, R, 1]
            dt = self.cores.dtype
            return ((U[:, :, :R].transpose(1, 2) * w).to(dt).contiguous(), (Vh[:, :R, :] * w).to(dt).contiguous())

    def forward(self, x):
        c = self.config
        _check_input("UltraMem", x, c["D"], self.wq)
        lead = x.shape[:-1]
        u = x.reshape(-1, c["D"])
        if not torch.is_grad_enabled():
            out = self._forward_inference(u.contiguous())
            return out.view(*lead, c["D"])
        if self.value_format != "fp32":
            raise RuntimeError("UltraMem: the value table is %s, which serves inference only: run under "
                               "torch.no_grad(), or load the float32 weights to train" % self.value_format)
        s_row, s_col = self.key_scores(u)                                    # [T, H, r, n] each
        fu, fv = self.filter_vectors()
        dt = s_row.dtype
        scores, index = ops().tdqkr(s_row, s_col, self.cores, fu.to(dt), fv.to(dt), first_stage_m(c), c["m"],
                                    filter_negatives(c))                     # [T, H*m, C], [T, H*m]
        weights = scores * self.pre_value_weights(u, index).unsqueeze(-1) if c["Dp"] > 0 else scores
        pooled = ops().pooled_lookup(self.values, index, weights, self.perm, c["E"], c["sparse_value_grad"])
        if c["single_projection"]:                                           # V2: the E groups' pools summed
            pooled = pooled.view(-1, c["E"], c["Dv"]).sum(1)
        out = pooled @ self.wo                                               # [T, D]
        if c["track_stats"]:
            self._record_stats(u, scores, index, out)
        return out.view(*lead, c["D"])

    @property
    def v2_forward(self):
        """Any UltraMemV2 change of the forward (query per rank, one projection, pre-values); the fused
        no-grad op serves them too."""
        c = self.config
        return c["query_per_rank"] or c["single_projection"] or c["Dp"] > 0

    def pre_value_weights(self, u, index):
        """u [T, D], index [T, K] -> [T, K]: <u wp, pre_values[row]> of each kept slot (V2 pre-values)."""
        c = self.config
        T, K = index.shape
        p = u @ self.wp                                                      # [T, Dp]
        rows = self.perm.index_select(0, index.reshape(-1)).remainder(c["n"] * c["n"] // c["E"])
        pre = F.embedding(rows, self.pre_values, sparse=c["sparse_value_grad"]).view(T, K, c["Dp"])
        return (pre * p.unsqueeze(1)).sum(-1)

    def _folded_keys(self):
        """(kn [2, H*r*n, Dk], kf): the normalised keys and the filter's folded keys, cached until the keys,
        their scales, the filter vectors or (rank_r) the cores change."""
        R = filter_vector_count(self.config)
        stamp = tuple((t.data_ptr(), t._version, t.dtype) for t in
                      (self.keys, self.k_scale, self.u, self.v) + ((self.cores,) if R else ()))
        if self._keys_cache is None or self._keys_cache[0] != stamp:
            with torch.no_grad():
                kn_row, kn_col = self._normalised_keys(detach=True)
                fu, fv = self.filter_vectors()
                kn, kf = ops().fold_filter_keys(kn_row.contiguous(), kn_col.contiguous(), fu.to(kn_row.dtype),
                                                fv.to(kn_row.dtype), self.config["query_per_rank"])
            self._keys_cache = (stamp, kn, kf)
        return self._keys_cache[1], self._keys_cache[2]

    def _forward_inference(self, u):
        """The fused no-grad op (ops/ultramem_decode.h), as the C++ layer's inference path calls it."""
        c = self.config
        if u.dtype not in (torch.float32, torch.float64):
            raise TypeError("UltraMem: input dtype must be float32 or float64, got %s" % u.dtype)
        kn, kf = self._folded_keys()
        scale = self._buffers.get("values_scale")
        args = (u, self.wq.detach(), self.q_scale.detach(), self.cores.detach(), kn, kf, self.values.detach(),
                scale, self.perm, self.wo.detach(), c["m"], first_stage_m(c), filter_negatives(c),
                c["qk_norm"] == "rms", None, None, filter_vector_count(c))
        if c["Dp"] > 0:                                                      # V2 pre-values
            args += (self.wp.detach(), self.pre_values.detach())
        if not c["track_stats"]:
            return ops().ultramem_decode(*args)
        out, scores, index = ops().ultramem_decode_retrieval(*args)
        self._record_stats(u, scores, index, out)
        return out

    # ---- losses, filter refresh ----------------------------------------------------------------------
    def aux_loss(self):
        """Tucker aux loss: alpha/(r-1) * sum_{i>=2} relu(l_i - tau)^2 over the singular values of each head's
        core sum, the mean over heads (aux_reduction "sum": the sum). Zero when off or r == 1."""
        c = self.config
        if not c["aux_loss"] or c["r"] < 2:
            return torch.zeros((), dtype=self.cores.dtype)
        sv = torch.linalg.svdvals(self.cores.sum(0))                         # [H, r] descending
        per_head = torch.relu(sv[:, 1:] - c["aux_tau"]).pow(2).sum(1) * (c["aux_alpha"] / (c["r"] - 1))
        return per_head.mean() if c["aux_reduction"] == "mean" else per_head.sum()

    @torch.no_grad()
    def refresh_tucker_approx(self):
        """Recomputes the rank-1 filter (u, v) from the SVD of each head's core sum, keeping each head's
        orientation closest to the previous one (positive sum on first use). Call after each optimizer step."""
        U, S, Vh = torch.linalg.svd(self.cores.detach().sum(0).double(), full_matrices=False)
        u_new, v_new = U[:, :, 0].clone(), Vh[:, 0, :].clone()               # [H, r]
        u_old, v_old = self.u.double(), self.v.double()
        for h in range(self.config["H"]):
            un, vn = u_new[h], v_new[h]
            if float(u_old[h].abs().sum()) == 0 and float(v_old[h].abs().sum()) == 0:
                flip = float(un.sum() + vn.sum()) < 0
            else:
                keep = float((un - u_old[h]).abs().sum() + (vn - v_old[h]).abs().sum())
                flipped = float((-un - u_old[h]).abs().sum() + (-vn - v_old[h]).abs().sum())
                flip = flipped < keep
            if flip:
                un.neg_()
                vn.neg_()
        self.u.copy_(u_new)
        self.v.copy_(v_new)
        self._core_sv = (float(S[:, 0].mean()), float(S[:, 1].mean()) if self.config["r"] >= 2 else 0.0)
        self._keys_cache = None

    # ---- telemetry -----------------------------------------------------------------------------------
    def reset_stats(self):
        c = self.config
        self._hits = torch.zeros(c["n"] * c["n"], dtype=torch.int64)
        self._window = dict(tokens=0, top1=0.0, topm=0.0, output_std=0.0, found=0, slots=0, mass_kept=0.0,
                            mass_exact=0.0, retrieval_tokens=0)

    @torch.no_grad()
    def _record_stats(self, u, scores, index, out):
        c, w = self.config, self._window
        T = index.shape[0]
        if T == 0:
            return
        k = min(T, c["retrieval_sample"] - w["retrieval_tokens"])
        if k > 0:
            s_row, s_col = self.key_scores(u[:k].detach().to(self.wq.dtype))
            ex_scores, ex_index = ops().tdqkr_exact(s_row, s_col, self.cores.detach(), c["m"])
            kept = index[:k].reshape(k, c["H"], c["m"], 1)
            truth = ex_index.reshape(k, c["H"], 1, c["m"])
            w["found"] += int(kept.eq(truth).any(-1).sum())
            w["slots"] += k * c["H"] * c["m"]
            w["mass_kept"] += float(scores[:k].double().sum())
            w["mass_exact"] += float(ex_scores.double().sum())
            w["retrieval_tokens"] += k
        self._hits += torch.bincount(index.reshape(-1), minlength=self._hits.numel())
        total = scores.detach().sum(-1).view(T, c["H"], c["m"]).double()
        w["top1"] += float(total[:, :, 0].sum())
        w["topm"] += float(total.sum())
        w["tokens"] += T
        w["output_std"] = float(out.detach().double().std())
        if w["tokens"] >= c["stats_window"]:
            self._last = self.stats()
            self.reset_stats()

    def stats(self):
        """The window's telemetry (as nn::MemoryStats): coverage, kl_uniform, top1_score, topm_score,
        output_std, core_l1, core_l2, tokens, recall, score_mass, retrieval_tokens. Forwards with
        track_stats record it; after stats_window tokens the window is kept and a new one starts."""
        c, w = self.config, self._window
        s = dict(coverage=0.0, kl_uniform=0.0, top1_score=0.0, topm_score=0.0, output_std=0.0,
                 core_l1=self._core_sv[0], core_l2=self._core_sv[1], tokens=0, recall=float("nan"),
                 score_mass=float("nan"), retrieval_tokens=0)
        if w["tokens"] == 0:
            if self._last is not None:
                s = dict(self._last, core_l1=self._core_sv[0], core_l2=self._core_sv[1])
            return s
        s["tokens"] = w["tokens"]
        s["retrieval_tokens"] = w["retrieval_tokens"]
        if w["slots"]:
            s["recall"] = w["found"] / w["slots"]
            s["score_mass"] = w["mass_kept"] / w["mass_exact"] if w["mass_exact"] != 0 else 1.0
        s["output_std"] = w["output_std"]
        s["top1_score"] = w["top1"] / (w["tokens"] * c["H"])
        s["topm_score"] = w["topm"] / (w["tokens"] * c["H"] * c["m"])
        hits = self._hits.double()
        total = float(hits.sum())
        p = hits[hits > 0] / total
        s["coverage"] = float((hits > 0).sum()) / hits.numel()
        s["kl_uniform"] = float((p * torch.log(p * hits.numel())).sum())
        return s

    def extra_repr(self):
        c = self.config
        return "D=%d, n=%d, E=%d, Dk=%d, Dv=%d, r=%d, C=%d, H=%d, m=%d, m_first=%d, filter=%s, values=%s" % (
            c["D"], c["n"], c["E"], c["Dk"], c["Dv"], c["r"], c["C"], c["H"], c["m"], first_stage_m(c), c["filter"],
            self.value_format)


class PKM(nn.Module):
    """Product-key memory (Lample et al.), the baseline: x [..., D] -> [..., D].

    Parameters (C++ names): wq [D, H*2*Dk] ([D, 2*Dk] with shared_query), keys [H, 2, n, Dk], values
    [n*n, Dv], wo [Dv, D] when Dv != D, bn (BatchNorm1d over the query features) or ln (LayerNorm over Dk);
    buffers perm, cores, u, v (the constant rank-2 TDQKR emulation of the additive product-key scores).
    """

    def __init__(self, init=True, **config):
        super().__init__()
        c = _config("PKMConfig", PKM_DEFAULTS, config)
        validate_pkm(c)
        self.config = c
        D, n, Dk, Dv, H = c["D"], c["n"], c["Dk"], c["Dv"], c["H"]
        qh = 1 if c["shared_query"] else H
        gen = torch.Generator().manual_seed(c["seed"])
        draw = (lambda shape, std: _normal(shape, std, gen)) if init else (lambda shape, std: torch.empty(*shape))
        vstd = c["value_std"] if c["value_std"] > 0 else 1.0 / math.sqrt(Dv)
        self.wq = nn.Parameter(draw([D, qh * 2 * Dk], 1.0 / math.sqrt(D)))
        self.keys = nn.Parameter(draw([H, 2, n, Dk], 1.0 / math.sqrt(Dk)))
        self.values = nn.Parameter(draw([n * n, Dv], vstd))
        self.wo = nn.Parameter(draw([Dv, D], 1.0 / math.sqrt(Dv))) if Dv != D else None
        self.bn = nn.BatchNorm1d(qh * 2 * Dk) if c["query_norm"] == "batch" else None
        self.ln = nn.LayerNorm(Dk) if c["query_norm"] == "layer" else None
        self.register_buffer("perm", torch.arange(n * n))
        self.register_buffer("cores", torch.eye(2).expand(1, H, 2, 2).contiguous())
        self.register_buffer("u", torch.tensor([1.0, 0.0]).expand(H, 2).contiguous())
        self.register_buffer("v", torch.tensor([0.0, 1.0]).expand(H, 2).contiguous())
        self._output_std, self._tokens = 0.0, 0

    def forward(self, x):
        c = self.config
        _check_input("PKM", x, c["D"], self.wq)
        lead = x.shape[:-1]
        u = x.reshape(-1, c["D"])
        T, H, Dk, n, m = u.shape[0], c["H"], c["Dk"], c["n"], c["m"]
        q = u @ self.wq                                                      # [T, H*2*Dk] or [T, 2*Dk]
        if self.bn is not None:
            q = self.bn(q)
        q = q.view(T, 1, 2, Dk).expand(T, H, 2, Dk) if c["shared_query"] else q.view(T, H, 2, Dk)
        if self.ln is not None:
            q = self.ln(q)
        s = torch.einsum("thsd,hsid->thsi", q, self.keys)                    # [T, H, 2, n]
        ones = torch.ones(T, H, 1, n, dtype=s.dtype)
        s_row = torch.cat([s[:, :, :1], ones], 2)                            # [T, H, 2, n] = [s_row; 1]
        s_col = torch.cat([ones, s[:, :, 1:]], 2)                            # [T, H, 2, n] = [1; s_col]
        dt = s.dtype
        scores, index = ops().tdqkr(s_row, s_col, self.cores.to(dt), self.u.to(dt), self.v.to(dt), m, m, 0)
        w = torch.softmax(scores.view(T, H, m), -1).view(T, H * m, 1) if c["softmax"] else scores
        out = ops().pooled_lookup(self.values, index, w, self.perm, 1, c["sparse_value_grad"])  # [T, Dv]
        if self.wo is not None:
            out = out @ self.wo
        if T:
            self._output_std = float(out.detach().double().std()) if out.numel() > 1 else 0.0
            self._tokens += T
        return out.view(*lead, c["D"])

    def aux_loss(self):
        return torch.zeros((), dtype=self.wq.dtype)

    def refresh_tucker_approx(self):
        """Nothing to refresh (the scores are exact); here so that models treat both kinds alike."""

    def stats(self):
        return dict(output_std=self._output_std, tokens=self._tokens)

    def reset_stats(self):
        self._output_std, self._tokens = 0.0, 0


class Engram(_ValueTable, nn.Module):
    """Engram (spec section 12): a memory addressed by the token ids. forward(u, tokens) with u [B, T, D]
    the layer's input and tokens [B, T] int64 -> [B, T, D].

    For each n-gram order in {2, 3} and each of `heads` hash heads, the last n ids hash (the op
    engram_rows, the C++ layer's hash) to a row of a prime-sized table; the 2*heads rows concatenate
    to e [d_e]; k = e Wk, v = e Wv; alpha = sigmoid(<RMSNorm(u) gate_u, RMSNorm(k) gate_k> / sqrt(D));
    x = alpha v; out = SiLU(causal depthwise conv(RMSNorm(x) conv_norm)) + x.

    Parameters (C++ names): values [sum_j M_j, d_e / (2*heads)] (the stacked tables), wk, wv [d_e, D],
    gate_u, gate_k, conv_norm [D], conv [D, kernel] (conv[:, 0] weighs the current position).
    `init=False` allocates the tensors without drawing them.
    """

    _EPS = 1e-6

    def __init__(self, init=True, **config):
        super().__init__()
        c = _config("EngramConfig", ENGRAM_DEFAULTS, config)
        validate_engram(c)
        self.config = c
        D, d_e, kernel = c["D"], c["d_e"], c["kernel"]
        self.table_sizes = [int(m) for m in ops().engram_table_sizes(c["heads"], c["rows"])]
        total, width = sum(self.table_sizes), d_e // (2 * c["heads"])
        gen = torch.Generator().manual_seed(c["seed"])
        draw = (lambda shape, std: _normal(shape, std, gen)) if init else (lambda shape, std: torch.empty(*shape))
        # The C++ constructor's draws, in its order (src/ultramem/nn/engram.cpp).
        self.values = nn.Parameter(draw([total, width], c["value_std"]))
        self.wk = nn.Parameter(draw([d_e, D], 1.0 / math.sqrt(d_e)))
        self.wv = nn.Parameter(draw([d_e, D], 1.0 / math.sqrt(d_e)))
        self.gate_u = nn.Parameter(torch.ones(D))
        self.gate_k = nn.Parameter(torch.ones(D))
        self.conv_norm = nn.Parameter(torch.ones(D))
        self.conv = nn.Parameter(draw([D, kernel], c["conv_std"]) if c["conv_std"] > 0 else torch.zeros(D, kernel))

    def rows(self, tokens, history=None):
        """tokens [B, T] int64 (history [B, 2]: the two ids before them, None at a sequence start) ->
        [B, T, 2*heads] rows of the stacked table."""
        c = self.config
        return ops().engram_rows(tokens, history, c["heads"], c["rows"], _as_int64(c["seed"]))

    def make_state(self, batch):
        """A decoding state: {"tokens": [B, 2] the latest ids (-1 before any), "conv_input": [B, kernel-1, D]}."""
        c = self.config
        return {"tokens": torch.full((batch, 2), -1, dtype=torch.int64),
                "conv_input": torch.zeros(batch, c["kernel"] - 1, c["D"], dtype=self.wk.dtype)}

    def forward(self, u, tokens, state=None):
        """u [B, T, D], tokens [B, T] int64 -> [B, T, D]. With `state` (make_state) the tokens continue the
        sequence it holds, and it is updated."""
        c = self.config
        _check_input("Engram", u, c["D"], self.wk)
        if u.dim() != 3:
            raise ValueError("Engram: u must be [B, T, D], got %s" % list(u.shape))
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tuple(tokens.shape) != tuple(
                u.shape[:2]):
            raise ValueError("Engram: tokens must be [B, T] = %s int64, got %s" % (
                list(u.shape[:2]), "%s %s" % (tokens.dtype, list(tokens.shape)) if isinstance(tokens, torch.Tensor)
                else type(tokens).__name__))
        B, T, D = u.shape
        idx = self.rows(tokens, None if state is None else state["tokens"])            # [B, T, 2*heads]
        if not torch.is_grad_enabled() and u.dtype == self.wk.dtype and u.dtype in (torch.float32, torch.float64):
            # The fused no-grad op (ops/engram_decode.h), as the C++ layer's inference path calls it.
            P = c["kernel"] - 1
            conv_state = (state["conv_input"].to(u.dtype).contiguous().clone() if state is not None
                          else u.new_zeros(B, P, D))
            out = ops().engram_decode(u.contiguous(), idx.contiguous(), self.values.detach(),
                                      self._buffers.get("values_scale"), self.wk.detach(), self.wv.detach(),
                                      self.gate_u.detach(), self.gate_k.detach(), self.conv_norm.detach(),
                                      self.conv.detach().contiguous(), conv_state)
            if state is not None:
                state["tokens"] = torch.cat([state["tokens"], tokens], 1)[:, T:T + 2].contiguous()
                state["conv_input"] = conv_state
            return out
        if self.value_format == "fp32":
            e = F.embedding(idx.reshape(-1), self.values, sparse=c["sparse_value_grad"]).view(B, T, c["d_e"])
        elif torch.is_grad_enabled():
            raise RuntimeError("Engram: a %s value table serves inference only (grad mode must be off)"
                               % self.value_format)
        else:
            e = self._value_rows(idx.reshape(-1), self.wk.dtype).view(B, T, c["d_e"])
        k, v = e @ self.wk, e @ self.wv                                                 # [B, T, D]
        gate = (rms_norm(u, self.gate_u, self._EPS) * rms_norm(k, self.gate_k, self._EPS)).sum(-1, keepdim=True)
        x = torch.sigmoid(gate / math.sqrt(D)) * v                                      # [B, T, D]
        y = rms_norm(x, self.conv_norm, self._EPS)
        P = c["kernel"] - 1
        before = state["conv_input"].to(y.dtype) if state is not None else y.new_zeros(B, P, D)
        padded = torch.cat([before, y], 1)                                              # [B, P + T, D]
        acc = torch.zeros_like(y)
        for i in range(c["kernel"]):
            acc = acc + padded[:, P - i:P - i + T] * self.conv[:, i]
        if state is not None:
            state["tokens"] = torch.cat([state["tokens"], tokens], 1)[:, T:T + 2].contiguous()
            state["conv_input"] = padded[:, T:T + P].detach().contiguous()
        return F.silu(acc) + x

    def aux_loss(self):
        return torch.zeros((), dtype=self.wk.dtype)

    def refresh_tucker_approx(self):
        """Nothing to refresh; here so that models treat every memory kind alike."""

    def stats(self):
        return {}

    def extra_repr(self):
        c = self.config
        return "D=%d, heads=%d, d_e=%d, rows=%d (tables %s), kernel=%d" % (
            c["D"], c["heads"], c["d_e"], c["rows"], self.table_sizes, c["kernel"])


def _as_int64(u):
    """A uint64 as the int64 with the same bits (the op schema's int)."""
    return u - (1 << 64) if u >= 1 << 63 else u
