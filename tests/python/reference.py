"""Independent pure-PyTorch reference of UltraMem (spec /work/shared/spec/ULTRAMEM.md, sections 3-5) and of
the PKM baseline (section 7). Written from the spec; it never calls the C++ ops. Everything is
differentiable through plain autograd (the indices carry no gradient).

Shapes (spec notation): s_row, s_col [T, H, r, n]; cores [C, H, r, r]; u, v [H, r];
values [N, Dv]; perm [E*N]; scores [T, H*m, C]; index [T, H*m] (grid addresses i*n + j).
Ordering: score descending, ties by the smaller index (row/col index in stage 1, grid address in stage 2
and in brute force); NaN ranks as -inf.
"""
import torch


def _rank_desc(score, key):
    """Per row of the last dim: permutation sorting by score descending, ties by key ascending.

    score, key: [..., K]. key must hold distinct values per row.
    """
    score = torch.where(torch.isnan(score), torch.full_like(score, float("-inf")), score)
    by_key = torch.argsort(key, dim=-1)  # ascending key first ...
    s = torch.gather(score, -1, by_key)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # ... then a stable sort on score
    return torch.gather(by_key, -1, order)


def core_scores(s_row, s_col, cores, index):
    """Exact per-core scores G_c = sum_ab S_row[a, i] Core_c[a, b] S_col[b, j] of the grid addresses.

    s_row, s_col: [T, H, r, n]; cores [C, H, r, r]; index [T, H, m] -> [T, H, m, C].
    """
    T, H, r, n = s_row.shape
    i = torch.div(index, n, rounding_mode="floor")
    j = index % n
    R = torch.gather(s_row, 3, i.unsqueeze(2).expand(T, H, r, i.shape[-1]))   # [T, H, r, m]
    Cc = torch.gather(s_col, 3, j.unsqueeze(2).expand(T, H, r, j.shape[-1]))  # [T, H, r, m]
    return torch.einsum("thak,chab,thbk->thkc", R, cores, Cc)


def tdqkr_bruteforce(s_row, s_col, cores, m):
    """Top-m of the full n x n grid by sum_c G_c. Returns (scores [T, H*m, C], index [T, H*m])."""
    T, H, r, n = s_row.shape
    csum = cores.sum(0)                                                      # [H, r, r]
    full = torch.einsum("thai,hab,thbj->thij", s_row, csum, s_col).reshape(T, H, n * n)
    addr = torch.arange(n * n).expand(T, H, n * n)
    index = torch.gather(addr, -1, _rank_desc(full.detach(), addr)[..., :m])  # [T, H, m]
    scores = core_scores(s_row, s_col, cores, index)
    return scores.reshape(T, H * m, cores.shape[0]), index.reshape(T, H * m)


def tdqkr_two_stage(s_row, s_col, cores, u, v, m_first, m, m_neg=0):
    """Spec section 4: rank-1 filter with the given u, v, top-m_first per side, exact rescoring of the
    m_first x m_first candidates with the core sum, top-m. Returns (scores [T, H*m, C], index [T, H*m]).
    m_neg > 0: the two-sign filter, per side the m_first - m_neg largest filter scores, then the m_neg
    most negative of the rest; only the same-sign blocks are rescored. u, v of shape [H, R, r]: the
    rank-R filter, rows ranked by sum_k (u[h, k] . S[:, i])^2, every pair rescored."""
    T, H, r, n = s_row.shape
    m_pos = m_first - m_neg
    with torch.no_grad():
        pos = torch.arange(n).expand(T, H, n)

        def side(f):
            top = _rank_desc(f, pos)[..., :m_pos]                            # [T, H, m_pos]
            if m_neg == 0:
                return top
            neg = (-f).scatter(-1, top, float("-inf"))                       # the kept rows rank last
            return torch.cat([top, _rank_desc(neg, pos)[..., :m_neg]], -1)  # [T, H, m_first]

        if u.dim() == 3:  # rank-R filter: the squared norm of the R filter scores
            I_row = side(torch.einsum("hka,thai->thki", u, s_row).pow(2).sum(2))
            I_col = side(torch.einsum("hkb,thbj->thkj", v, s_col).pow(2).sum(2))
        else:
            I_row = side(torch.einsum("ha,thai->thi", u, s_row))             # [T, H, m1] row indices
            I_col = side(torch.einsum("hb,thbj->thj", v, s_col))
        R = torch.gather(s_row, 3, I_row.unsqueeze(2).expand(T, H, r, m_first))
        Cc = torch.gather(s_col, 3, I_col.unsqueeze(2).expand(T, H, r, m_first))
        G = torch.einsum("thax,hab,thby->thxy", R, cores.sum(0), Cc)         # [T, H, m1, m1]
        addr = I_row.unsqueeze(-1) * n + I_col.unsqueeze(-2)
        if m_neg == 0:
            G, addr = G.reshape(T, H, m_first * m_first), addr.reshape(T, H, m_first * m_first)
        else:
            blocks = [(slice(0, m_pos), slice(0, m_pos), m_pos), (slice(m_pos, m_first), slice(m_pos, m_first), m_neg)]
            G = torch.cat([G[..., a, b].reshape(T, H, k * k) for a, b, k in blocks], -1)
            addr = torch.cat([addr[..., a, b].reshape(T, H, k * k) for a, b, k in blocks], -1)
        index = torch.gather(addr, -1, _rank_desc(G, addr)[..., :m])         # [T, H, m]
    scores = core_scores(s_row, s_col, cores, index)
    return scores.reshape(T, H * m, cores.shape[0]), index.reshape(T, H * m)


def pooled_lookup(values, index, scores, perm, E):
    """Spec section 5 (IVE + MCS): out[t, p*Dv + slice c] = sum over kept k in group p of
    scores[t, k, c] * values[row_k, slice c]; v = perm[g], p = v // N, row = v % N. Sums with scatter_add."""
    N, Dv = values.shape
    T, K, C = scores.shape
    assert Dv % C == 0
    vidx = perm[index]                                                     # [T, K]
    group = torch.div(vidx, N, rounding_mode="floor")
    row = vidx % N
    gathered = values[row].reshape(T, K, C, Dv // C)                       # [T, K, C, Dv/C]
    weighted = (gathered * scores.unsqueeze(-1)).reshape(T, K, Dv)
    pooled = torch.zeros(T, E, Dv, dtype=values.dtype)
    pooled = pooled.scatter_add(1, group.unsqueeze(-1).expand(T, K, Dv), weighted)
    return pooled.reshape(T, E * Dv)


def pooled_lookup_loop(values, index, scores, perm, E):
    """Same as pooled_lookup, as explicit loops (a second, even more literal reference)."""
    N, Dv = values.shape
    T, K, C = scores.shape
    Ds = Dv // C
    out = torch.zeros(T, E * Dv, dtype=values.dtype)
    for t in range(T):
        for k in range(K):
            vv = int(perm[index[t, k]])
            p, row = vv // N, vv % N
            for c in range(C):
                out[t, p * Dv + c * Ds:p * Dv + (c + 1) * Ds] += scores[t, k, c] * values[row, c * Ds:(c + 1) * Ds]
    return out


# ---- the layers ----------------------------------------------------------------------------------

def qk_norm(x, scale, kind, eps=1e-6):
    """Normalises over the last dim with a learned scale: RMS (x * rsqrt(mean(x^2) + eps)) or LayerNorm
    without bias ((x - mean) * rsqrt(var + eps), biased var)."""
    if kind == "rms":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale
    if kind == "layer":
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) * torch.rsqrt(var + eps) * scale
    raise ValueError(kind)


def ultramem_scores(p, x, cfg):
    """Query and key scoring (spec section 3). Returns s_row, s_col [T, H, r, n] and the flattened x."""
    Dk = cfg["Dk"]
    u = x.reshape(-1, cfg["D"])
    q = u @ p["wq"]                                                        # [T, 2*Dk]
    q_row = qk_norm(q[:, :Dk], p["q_scale"][0], cfg["qk_norm"])
    q_col = qk_norm(q[:, Dk:], p["q_scale"][1], cfg["qk_norm"])
    keys = p["keys"]                                                       # [H, 2, n, Dk, r]
    kn = qk_norm(keys.transpose(3, 4), p["k_scale"][:, None, None, :], cfg["qk_norm"])  # norm over Dk
    kn = kn.transpose(3, 4)                                                # [H, 2, n, Dk, r]
    s_row = torch.einsum("td,hida->thai", q_row, kn[:, 0])
    s_col = torch.einsum("td,hida->thai", q_col, kn[:, 1])
    return s_row, s_col


def ultramem_forward(p, x, cfg):
    """UltraMem layer forward from the saved weights p (dict). Returns (out [..., D], scores, index)."""
    s_row, s_col = ultramem_scores(p, x, cfg)
    m_first = cfg["m_first"] if cfg["m_first"] > 0 else cfg["m"]
    m_neg = 0
    u, v = p["u"], p["v"]
    if cfg.get("filter", "rank1") == "two_sign":
        m_neg = cfg.get("m_neg", 0) or m_first // 2
    if cfg.get("filter", "rank1") == "rank_r":
        u, v = rank_r_filter(p["cores"].double(), cfg.get("filter_rank", 0) or p["cores"].shape[-1])
        u, v = u.to(s_row.dtype), v.to(s_row.dtype)
    scores, index = tdqkr_two_stage(s_row, s_col, p["cores"], u, v, m_first, cfg["m"], m_neg)
    pooled = pooled_lookup(p["values"], index, scores, p["perm"], cfg["E"])
    out = pooled @ p["wo"]
    return out.reshape(*x.shape[:-1], cfg["D"]), scores, index


def ultramem_aux_loss(cores, cfg):
    """alpha/(r-1) * sum over i >= 2 of relu(l_i - tau)^2, l = singular values of sum_c Core_c; the mean
    over heads (cfg["aux_reduction"] "mean", the default) or the sum ("sum")."""
    r = cores.shape[-1]
    if not cfg["aux_loss"] or r < 2:
        return torch.zeros((), dtype=cores.dtype)
    sv = torch.linalg.svdvals(cores.sum(0))                                # [H, r] descending
    per_head = cfg["aux_alpha"] / (r - 1) * torch.relu(sv[:, 1:] - cfg["aux_tau"]).pow(2).sum(1)
    return per_head.sum() if cfg.get("aux_reduction", "mean") == "sum" else per_head.mean()


def rank_r_filter(cores, R):
    """The rank-R filter's vectors (u, v) [H, R, r]: the R leading singular pairs of each head's core sum,
    each scaled by sqrt(sigma_k) (signs do not matter: the filter ranks by squares)."""
    U, S, Vh = torch.linalg.svd(cores.sum(0))
    w = S[:, :R].sqrt().unsqueeze(2)                                       # [H, R, 1]
    return (U[:, :, :R].transpose(1, 2) * w).contiguous(), (Vh[:, :R, :] * w).contiguous()


def rank1_filter(cores):
    """Leading singular vectors (u, v) [H, r] of each head's core sum (sign not normalised)."""
    U, S, Vh = torch.linalg.svd(cores.sum(0))
    return U[:, :, 0], Vh[:, 0, :], S


def pkm_forward(p, x, cfg):
    """PKM (Lample et al.): per-head query (row half, col half) after BatchNorm (training mode: batch
    statistics, biased variance, eps 1e-5) or LayerNorm over Dk (eps 1e-5) or nothing; additive scores
    s_row[i] + s_col[j]; exact top-m over the full grid; softmax over the m (unless cfg["softmax"] is
    false); values; optional Dv -> D. cfg["shared_query"]: one [D, 2*Dk] query for all heads.
    Returns (out, weights [T, H*m], index [T, H*m], batch mean, batch var (biased) or None)."""
    D, H, Dk, n, m = cfg["D"], cfg["H"], cfg["Dk"], cfg["n"], cfg["m"]
    u = x.reshape(-1, D)
    T = u.shape[0]
    shared = cfg.get("shared_query", False)
    q = u @ p["wq"]                                                        # [T, H*2*Dk] or [T, 2*Dk]
    stats = None
    if cfg["query_norm"] == "batch":
        mu = q.mean(0)
        var = (q - mu).pow(2).mean(0)
        stats = (mu, var)
        q = (q - mu) / torch.sqrt(var + 1e-5) * p["bn.weight"] + p["bn.bias"]
    q = q.reshape(T, 1, 2, Dk).expand(T, H, 2, Dk) if shared else q.reshape(T, H, 2, Dk)
    if cfg["query_norm"] == "layer":
        mu = q.mean(-1, keepdim=True)
        var = (q - mu).pow(2).mean(-1, keepdim=True)
        q = (q - mu) / torch.sqrt(var + 1e-5) * p["ln.weight"] + p["ln.bias"]
    s = torch.einsum("thsd,hsid->thsi", q, p["keys"])                      # [T, H, 2, n]
    full = (s[:, :, 0, :, None] + s[:, :, 1, None, :]).reshape(T, H, n * n)
    addr = torch.arange(n * n).expand(T, H, n * n)
    index = torch.gather(addr, -1, _rank_desc(full.detach(), addr)[..., :m])  # [T, H, m]
    top = torch.gather(full, -1, index)
    w = (torch.softmax(top, dim=-1) if cfg.get("softmax", True) else top).reshape(T, H * m)
    out = (p["values"][index.reshape(T, H * m)] * w.unsqueeze(-1)).sum(1)  # [T, Dv]
    if "wo" in p:
        out = out @ p["wo"]
    return out.reshape(*x.shape[:-1], D), w, index.reshape(T, H * m), stats
