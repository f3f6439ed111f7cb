"""torch.ops.ultramem.{tdqkr, tdqkr_exact, pooled_lookup, ultramem_decode} against the independent pure-PyTorch reference.

usage: python3 test_ops.py [--ops-lib PATH/libultramem_ops.so] [unittest args]
       (or set ULTRAMEM_OPS_LIB)
"""
import itertools
import os
import sys
import unittest

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_args import take_arg  # noqa: E402
import reference as ref  # noqa: E402



OPS_LIB = take_arg("--ops-lib", "ULTRAMEM_OPS_LIB")


def setUpModule():
    if not OPS_LIB:
        raise RuntimeError("pass --ops-lib PATH or set ULTRAMEM_OPS_LIB to libultramem_ops.so")
    torch.ops.load_library(OPS_LIB)


def tdqkr(*args):
    return torch.ops.ultramem.tdqkr(*args)


def pooled_lookup(*args):
    return torch.ops.ultramem.pooled_lookup(*args)


def rand_tdqkr(T, H, r, n, C, dtype, gen):
    s_row = torch.randn(T, H, r, n, generator=gen, dtype=torch.float64).to(dtype)
    s_col = torch.randn(T, H, r, n, generator=gen, dtype=torch.float64).to(dtype)
    cores = torch.rand(C, H, r, r, generator=gen, dtype=torch.float64).to(dtype)
    u, v, _ = ref.rank1_filter(cores.double())
    return s_row, s_col, cores, u.to(dtype).contiguous(), v.to(dtype).contiguous()


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


class TdqkrTest(unittest.TestCase):
    def check_case(self, T, H, r, n, C, m_first, m, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        s_row, s_col, cores, u, v = rand_tdqkr(T, H, r, n, C, dtype, gen)
        what = "T=%d H=%d r=%d n=%d C=%d m_first=%d m=%d %s" % (T, H, r, n, C, m_first, m, dtype)
        scores, index = tdqkr(s_row, s_col, cores, u, v, m_first, m)
        self.assertEqual(tuple(scores.shape), (T, H * m, C), what)
        self.assertEqual(tuple(index.shape), (T, H * m), what)
        self.assertEqual(scores.dtype, dtype, what)
        self.assertEqual(index.dtype, torch.int64, what)
        rs, ri = ref.tdqkr_two_stage(s_row, s_col, cores, u, v, m_first, m)
        self.assertTrue(torch.equal(index, ri), "indices differ from the reference: " + what)
        torch.testing.assert_close(scores, rs, msg=lambda s: what + ": " + s, **tol(dtype))
        if m_first == n:  # the filter keeps every row and column: exact top-m of the whole grid
            bs, bi = ref.tdqkr_bruteforce(s_row, s_col, cores, m)
            self.assertTrue(torch.equal(index, bi), "indices differ from brute force: " + what)
            torch.testing.assert_close(scores, bs, msg=lambda s: what + ": " + s, **tol(dtype))
        # kept candidates are sorted by the summed score, descending
        total = scores.double().sum(-1).view(T, H, m)
        self.assertTrue(bool((total[..., :-1] >= total[..., 1:] - 1e-5).all()), what)

    def test_against_reference(self):
        seed = 0
        for dtype in (torch.float64, torch.float32):
            for H, C, r in itertools.product((1, 2), (1, 2, 3), (1, 2, 3)):
                n = 7
                for m_first, m in ((3, 1), (3, 9), (4, 5), (n, 6)):
                    seed += 1
                    self.check_case(4, H, r, n, C, m_first, m, dtype, seed)

    def check_against_two_stage(self, what, dtype, s_row, s_col, cores, u, v, m_first, m, m_neg=0):
        """tdqkr equals the two-stage reference (indices exactly, scores to rounding); returns the indices."""
        scores, index = tdqkr(s_row, s_col, cores, u, v, m_first, m, m_neg)
        rs, ri = ref.tdqkr_two_stage(s_row, s_col, cores, u, v, m_first, m, m_neg)
        self.assertTrue(torch.equal(index, ri), "indices differ from the reference: " + what)
        torch.testing.assert_close(scores, rs, msg=lambda s: what + ": " + s, **tol(dtype))
        return index

    def test_two_sign_filter(self):
        seed = 500
        for dtype in (torch.float64, torch.float32):
            for (T, H, r, n, C, m_first, m, m_neg) in ((4, 1, 2, 9, 2, 4, 6, 2), (5, 2, 3, 13, 2, 7, 20, 3),
                                                        (3, 2, 2, 8, 1, 8, 32, 4), (4, 1, 1, 6, 2, 2, 2, 1)):
                seed += 1
                gen = torch.Generator().manual_seed(seed)
                s_row, s_col, cores, u, v = rand_tdqkr(T, H, r, n, C, dtype, gen)
                what = "two-sign T=%d H=%d r=%d n=%d C=%d m_first=%d m=%d m_neg=%d %s" % (
                    T, H, r, n, C, m_first, m, m_neg, dtype)
                index = self.check_against_two_stage(what, dtype, s_row, s_col, cores, u, v, m_first, m, m_neg)
                # keyword form, as the schema names it
                _, index_kw = torch.ops.ultramem.tdqkr(s_row, s_col, cores, u, v, m_first, m, m_neg=m_neg)
                self.assertTrue(torch.equal(index_kw, index), what)

    def test_rank_r_filter(self):
        seed = 550
        for dtype in (torch.float64, torch.float32):
            for (T, H, r, n, C, m_first, m, R) in ((4, 1, 2, 9, 2, 4, 6, 2), (5, 2, 3, 13, 2, 7, 20, 2),
                                                    (3, 2, 2, 8, 1, 8, 32, 1), (4, 1, 3, 11, 2, 5, 9, 3)):
                seed += 1
                gen = torch.Generator().manual_seed(seed)
                s_row, s_col, cores, _, _ = rand_tdqkr(T, H, r, n, C, dtype, gen)
                u, v = ref.rank_r_filter(cores.double(), R)
                u, v = u.to(dtype), v.to(dtype)
                what = "rank-%d T=%d H=%d r=%d n=%d C=%d m_first=%d m=%d %s" % (R, T, H, r, n, C, m_first, m, dtype)
                self.check_against_two_stage(what, dtype, s_row, s_col, cores, u, v, m_first, m)

    def test_rank_r_bad_settings_name_the_field(self):
        gen = torch.Generator().manual_seed(8)
        s_row, s_col, cores, _, _ = rand_tdqkr(2, 1, 2, 8, 2, torch.float32, gen)
        u3 = torch.randn(1, 3, 2)  # R = 3 > r = 2
        with self.assertRaisesRegex(RuntimeError, "filter_rank"):
            tdqkr(s_row, s_col, cores, u3, u3, 4, 4)
        u2 = torch.randn(1, 2, 2)
        with self.assertRaisesRegex(RuntimeError, "m_neg"):
            tdqkr(s_row, s_col, cores, u2, u2, 4, 4, 2)

    def test_two_sign_bad_split_names_the_field(self):
        gen = torch.Generator().manual_seed(7)
        s_row, s_col, cores, u, v = rand_tdqkr(2, 1, 2, 8, 2, torch.float32, gen)
        with self.assertRaisesRegex(RuntimeError, "m_neg"):
            tdqkr(s_row, s_col, cores, u, v, 4, 4, 4)
        with self.assertRaisesRegex(RuntimeError, r"m_pos\^2 \+ m_neg\^2"):
            tdqkr(s_row, s_col, cores, u, v, 4, 9, 2)

    def test_exact_top_m(self):
        seed = 600
        for dtype in (torch.float64, torch.float32):
            for (T, H, r, n, C, m) in ((4, 1, 2, 9, 2, 6), (3, 2, 3, 7, 3, 49), (2, 2, 1, 12, 1, 70)):
                seed += 1
                gen = torch.Generator().manual_seed(seed)
                s_row, s_col, cores, _, _ = rand_tdqkr(T, H, r, n, C, dtype, gen)
                what = "exact T=%d H=%d r=%d n=%d C=%d m=%d %s" % (T, H, r, n, C, m, dtype)
                scores, index = torch.ops.ultramem.tdqkr_exact(s_row, s_col, cores, m)
                bs, bi = ref.tdqkr_bruteforce(s_row, s_col, cores, m)
                self.assertTrue(torch.equal(index, bi), "indices differ from brute force: " + what)
                torch.testing.assert_close(scores, bs, msg=lambda s: what + ": " + s, **tol(dtype))
        with self.assertRaisesRegex(RuntimeError, "m must be in"):
            torch.ops.ultramem.tdqkr_exact(s_row, s_col, cores, 0)

    def test_edge_shapes(self):
        for dtype in (torch.float64, torch.float32):
            self.check_case(3, 2, 2, 1, 2, 1, 1, dtype, 100)     # n = 1: a single slot
            self.check_case(2, 1, 1, 5, 1, 5, 25, dtype, 101)    # m = n*n: the whole grid
            self.check_case(0, 2, 2, 6, 2, 3, 4, dtype, 102)     # no tokens
            self.check_case(5, 2, 3, 16, 2, 16, 256, dtype, 103)  # m = m_first^2 = n^2
            self.check_case(5, 2, 2, 33, 3, 9, 40, dtype, 104)

    def test_ties_break_by_smaller_index(self):
        # All scores equal: stage 1 keeps rows/cols 0..m_first-1, stage 2 the smallest grid addresses.
        T, H, r, n, C = 2, 2, 2, 5, 2
        s_row = torch.ones(T, H, r, n, dtype=torch.float64)
        s_col = torch.ones(T, H, r, n, dtype=torch.float64)
        cores = torch.ones(C, H, r, r, dtype=torch.float64)
        u = torch.full((H, r), 0.5 ** 0.5, dtype=torch.float64)
        scores, index = tdqkr(s_row, s_col, cores, u, u.clone(), 3, 5)
        expect = torch.tensor([0, 1, 2, 5, 6]).repeat(T, H)
        self.assertTrue(torch.equal(index, expect), str(index))
        rs, ri = ref.tdqkr_two_stage(s_row, s_col, cores, u, u.clone(), 3, 5)
        self.assertTrue(torch.equal(ri, expect), str(ri))
        # brute force over the whole grid: the 5 smallest grid addresses
        bs, bi = ref.tdqkr_bruteforce(s_row, s_col, cores, 5)
        self.assertTrue(torch.equal(bi, torch.arange(5).repeat(T, H)), str(bi))
        scores, index = tdqkr(s_row, s_col, cores, u, u.clone(), n, 5)
        self.assertTrue(torch.equal(index, bi), str(index))

    def test_noncontiguous_inputs(self):
        gen = torch.Generator().manual_seed(7)
        s_row, s_col, cores, u, v = rand_tdqkr(4, 2, 2, 9, 2, torch.float64, gen)
        s_row_nc = s_row.transpose(0, 1).contiguous().transpose(0, 1)
        self.assertFalse(s_row_nc.is_contiguous())
        a = tdqkr(s_row_nc, s_col, cores, u, v, 4, 6)
        b = tdqkr(s_row, s_col, cores, u, v, 4, 6)
        self.assertTrue(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))

    def test_gradcheck(self):
        for H, C, r in ((1, 1, 1), (2, 2, 2), (2, 3, 3)):
            gen = torch.Generator().manual_seed(10 * H + C + r)
            s_row, s_col, cores, u, v = rand_tdqkr(3, H, r, 6, C, torch.float64, gen)
            m_first, m = 4, 5
            _, index0 = tdqkr(s_row, s_col, cores, u, v, m_first, m)

            def f(sr, sc, co):
                scores, index = tdqkr(sr, sc, co, u, v, m_first, m)
                # the selection must not change under the finite-difference perturbation
                if not torch.equal(index, index0):
                    raise AssertionError("selection changed under perturbation; pick other inputs")
                return scores

            inputs = tuple(t.clone().requires_grad_(True) for t in (s_row, s_col, cores))
            self.assertTrue(torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-6))
            # and the gradients equal the reference's autograd gradients
            g = torch.randn(3, H * m, C, generator=gen, dtype=torch.float64)
            ours = torch.autograd.grad((f(*inputs) * g).sum(), inputs)
            rs, _ = ref.tdqkr_two_stage(*inputs, u, v, m_first, m)
            theirs = torch.autograd.grad((rs * g).sum(), inputs)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    def test_no_grad_through_u_v(self):
        gen = torch.Generator().manual_seed(3)
        s_row, s_col, cores, u, v = rand_tdqkr(2, 2, 2, 6, 2, torch.float64, gen)
        u.requires_grad_(True)
        v.requires_grad_(True)
        s_row.requires_grad_(True)
        scores, index = tdqkr(s_row, s_col, cores, u, v, 4, 4)
        self.assertFalse(index.requires_grad)
        gu = torch.autograd.grad(scores.sum(), [s_row, u], allow_unused=True)
        self.assertIsNotNone(gu[0])
        self.assertTrue(gu[1] is None or bool((gu[1] == 0).all()))


def rand_pool(T, K, N, Dv, E, C, dtype, gen, repeat_rows=False):
    values = torch.randn(N, Dv, generator=gen, dtype=torch.float64).to(dtype)
    perm = torch.randperm(E * N, generator=gen)
    hi = 3 if repeat_rows else E * N  # repeated rows: only a few addresses are used
    index = torch.randint(0, min(hi, E * N), (T, K), generator=gen)
    scores = torch.randn(T, K, C, generator=gen, dtype=torch.float64).to(dtype)
    return values, index, scores, perm


class PooledLookupTest(unittest.TestCase):
    def test_against_reference(self):
        seed = 0
        for dtype in (torch.float64, torch.float32):
            for E, C, repeat in itertools.product((1, 4, 9), (1, 2, 4), (False, True)):
                seed += 1
                gen = torch.Generator().manual_seed(seed)
                T, K, N, Dv = 5, 7, 6, 8
                values, index, scores, perm = rand_pool(T, K, N, Dv, E, C, dtype, gen, repeat)
                what = "E=%d C=%d repeat=%s %s" % (E, C, repeat, dtype)
                out = pooled_lookup(values, index, scores, perm, E)
                self.assertEqual(tuple(out.shape), (T, E * Dv), what)
                expect = ref.pooled_lookup(values, index, scores, perm, E)
                torch.testing.assert_close(out, expect, msg=lambda s: what + ": " + s, **tol(dtype))
                loop = ref.pooled_lookup_loop(values, index, scores, perm, E)
                torch.testing.assert_close(expect, loop, **tol(dtype))

    def test_same_address_twice_is_summed(self):
        # Two hits of one address in one token must add up (scatter-add, not overwrite).
        values = torch.arange(8, dtype=torch.float64).view(4, 2)
        perm = torch.arange(4)
        index = torch.tensor([[2, 2, 1]])
        scores = torch.tensor([[[1.0], [2.0], [10.0]]], dtype=torch.float64)
        out = pooled_lookup(values, index, scores, perm, 1)
        expect = 3 * values[2] + 10 * values[1]
        torch.testing.assert_close(out[0], expect)

    def test_empty(self):
        values = torch.randn(4, 6, dtype=torch.float64)
        perm = torch.randperm(16)
        out = pooled_lookup(values, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, 2, dtype=torch.float64),
                            perm, 4)
        self.assertEqual(tuple(out.shape), (0, 24))
        out = pooled_lookup(values, torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 2, dtype=torch.float64),
                            perm, 4)
        self.assertTrue(torch.equal(out, torch.zeros(2, 24, dtype=torch.float64)))

    def test_gradcheck(self):
        for E, C, repeat in ((1, 1, False), (4, 2, True), (9, 4, False)):
            gen = torch.Generator().manual_seed(E * 10 + C)
            values, index, scores, perm = rand_pool(3, 5, 4, 8, E, C, torch.float64, gen, repeat)
            values.requires_grad_(True)
            scores.requires_grad_(True)
            f = lambda vv, ss: pooled_lookup(vv, index, ss, perm, E)  # noqa: E731
            self.assertTrue(torch.autograd.gradcheck(f, (values, scores), eps=1e-6, atol=1e-8))
            g = torch.randn(3, E * 8, generator=gen, dtype=torch.float64)
            ours = torch.autograd.grad((f(values, scores) * g).sum(), (values, scores))
            theirs = torch.autograd.grad((ref.pooled_lookup(values, index, scores, perm, E) * g).sum(),
                                         (values, scores))
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    def test_sparse_grad(self):
        for dtype in (torch.float64, torch.float32):
            gen = torch.Generator().manual_seed(5)
            values, index, scores, perm = rand_pool(6, 4, 10, 8, 4, 2, dtype, gen, repeat_rows=True)
            values.requires_grad_(True)
            g = torch.randn(6, 32, generator=gen, dtype=torch.float64).to(dtype)
            (dense,) = torch.autograd.grad((pooled_lookup(values, index, scores, perm, 4, False) * g).sum(), values)
            (sparse,) = torch.autograd.grad((pooled_lookup(values, index, scores, perm, 4, True) * g).sum(), values)
            self.assertFalse(dense.is_sparse)
            self.assertTrue(sparse.is_sparse)
            self.assertTrue(sparse.is_coalesced())
            self.assertTrue(torch.equal(sparse.to_dense(), dense))
            # only the rows hit are stored
            hit = torch.unique(perm[index] % 10)
            self.assertTrue(torch.equal(sparse._indices()[0], hit))
            # and the value gradient equals the reference's
            (r,) = torch.autograd.grad((ref.pooled_lookup(values, index, scores, perm, 4) * g).sum(), values)
            torch.testing.assert_close(dense, r, **tol(dtype))


class BadInputTest(unittest.TestCase):
    def setUp(self):
        gen = torch.Generator().manual_seed(1)
        self.t = rand_tdqkr(2, 2, 2, 6, 2, torch.float64, gen)
        self.p = rand_pool(2, 3, 4, 8, 4, 2, torch.float64, gen)

    def raises(self, fn, *words):
        with self.assertRaises(RuntimeError) as cm:
            fn()
        msg = str(cm.exception)
        for w in words:
            self.assertIn(w, msg)

    def tdqkr_with(self, **kw):
        args = dict(zip(("s_row", "s_col", "cores", "u", "v"), self.t))
        args.update(m_first=4, m=5)
        args.update(kw)
        return lambda: tdqkr(args["s_row"], args["s_col"], args["cores"], args["u"], args["v"], args["m_first"],
                             args["m"])

    def pool_with(self, **kw):
        args = dict(zip(("values", "index", "scores", "perm"), self.p))
        args.update(E=4)
        args.update(kw)
        return lambda: pooled_lookup(args["values"], args["index"], args["scores"], args["perm"], args["E"])

    def test_tdqkr(self):
        s_row, s_col, cores, u, v = self.t
        self.raises(self.tdqkr_with(s_row=s_row.int()), "s_row", "dtype")
        self.raises(self.tdqkr_with(s_row=s_row.half()), "s_row", "dtype")
        self.raises(self.tdqkr_with(s_col=s_col.float()), "dtype")
        self.raises(self.tdqkr_with(cores=cores.half()), "cores", "dtype")
        self.raises(self.tdqkr_with(s_row=s_row[0]), "s_row", "dimensions")
        self.raises(self.tdqkr_with(s_col=s_col[:, :, :, :5]), "s_col", "shape")
        self.raises(self.tdqkr_with(cores=cores[:, :1]), "cores", "shape")
        self.raises(self.tdqkr_with(cores=cores[:0]), "cores")
        self.raises(self.tdqkr_with(u=u[:, :1]), "u", "shape")
        self.raises(self.tdqkr_with(v=v[0]), "v", "dimensions")
        self.raises(self.tdqkr_with(m_first=7), "m_first")
        self.raises(self.tdqkr_with(m_first=0), "m_first")
        self.raises(self.tdqkr_with(m=17), "m must be")
        self.raises(self.tdqkr_with(m=0), "m must be")

    def test_pooled_lookup(self):
        values, index, scores, perm = self.p
        self.raises(self.pool_with(values=values.float()), "dtype")
        self.raises(self.pool_with(values=values.half()), "values", "dtype")
        self.raises(self.pool_with(scores=scores.int()), "scores", "dtype")
        self.raises(self.pool_with(index=index.int()), "index", "dtype")
        self.raises(self.pool_with(perm=perm.int()), "perm", "dtype")
        self.raises(self.pool_with(values=values[0]), "values", "dimensions")
        self.raises(self.pool_with(scores=scores[0]), "scores", "dimensions")
        self.raises(self.pool_with(index=index[:, :2]), "index", "shape")
        bad = index.clone()
        bad[1, 2] = 16
        self.raises(self.pool_with(index=bad), "index[1, 2]", "outside")
        bad[1, 2] = -1
        self.raises(self.pool_with(index=bad), "index[1, 2]", "outside")
        self.raises(self.pool_with(perm=perm[:-1]), "perm", "shape")
        self.raises(self.pool_with(E=0), "E")
        self.raises(self.pool_with(E=0), "E must be")
        bad_perm = perm.clone()
        bad_perm[index[0, 0]] = 99
        self.raises(self.pool_with(perm=bad_perm), "perm[")
        self.raises(self.pool_with(values=values[:, :7]), "Dv", "divisible")
        self.raises(self.pool_with(scores=torch.randn(2, 3, 3, dtype=torch.float64)), "Dv", "divisible")


class UltraMemDecodeTest(unittest.TestCase):
    """The fused no-grad layer forward against the reference layer (reference.ultramem_forward)."""

    def layer(self, dtype, seed, H=2, n=8, E=4, Dk=8, Dv=16, r=2, C=2, D=24):
        gen = torch.Generator().manual_seed(seed)
        N = n * n // E
        p = {
            "wq": torch.randn(D, 2 * Dk, generator=gen, dtype=torch.float64) / Dk ** 0.5,
            "q_scale": 0.5 + torch.rand(2, Dk, generator=gen, dtype=torch.float64),
            "keys": torch.randn(H, 2, n, Dk, r, generator=gen, dtype=torch.float64),
            "k_scale": 0.5 + torch.rand(2, Dk, generator=gen, dtype=torch.float64),
            "cores": torch.rand(C, H, r, r, generator=gen, dtype=torch.float64),
            "values": torch.randn(N, Dv, generator=gen, dtype=torch.float64),
            "wo": torch.randn(E * Dv, D, generator=gen, dtype=torch.float64) / (E * Dv) ** 0.5,
        }
        p = {k: t.to(dtype) for k, t in p.items()}
        p["perm"] = torch.randperm(n * n, generator=gen)
        u, v, _ = ref.rank1_filter(p["cores"].double())
        p["u"], p["v"] = u.to(dtype).contiguous(), v.to(dtype).contiguous()
        cfg = {"D": D, "Dk": Dk, "E": E, "qk_norm": "rms"}
        return p, cfg

    def decode(self, p, x, cfg, m, m_first, m_neg=0, values=None, scale=None, filter_rank=0):
        kn = ref.qk_norm(p["keys"].transpose(3, 4), p["k_scale"][:, None, None, :], cfg["qk_norm"])  # [H, 2, n, r, Dk]
        u, v = p["u"], p["v"]
        if filter_rank:
            u, v = ref.rank_r_filter(p["cores"].double(), filter_rank)
            u, v = u.to(p["cores"].dtype), v.to(p["cores"].dtype)
        kn_all, kf = torch.ops.ultramem.fold_filter_keys(kn[:, 0].contiguous(), kn[:, 1].contiguous(), u, v)
        return torch.ops.ultramem.ultramem_decode(
            x, p["wq"], p["q_scale"], p["cores"], kn_all, kf, p["values"] if values is None else values, scale,
            p["perm"], p["wo"], m, m_first, m_neg=m_neg, rms_norm=cfg["qk_norm"] == "rms", filter_rank=filter_rank)

    def test_matches_reference_layer(self):
        seed = 700
        for dtype in (torch.float64, torch.float32):
            for T, m, m_first, m_neg in ((1, 4, 6, 0), (5, 5, 6, 3), (40, 9, 3, 0), (3, 2, 2, 1)):
                seed += 1
                p, cfg = self.layer(dtype, seed)
                x = torch.randn(T, cfg["D"], generator=torch.Generator().manual_seed(seed), dtype=dtype)
                lc = dict(cfg, m=m, m_first=m_first, filter="two_sign" if m_neg else "rank1", m_neg=m_neg)
                want, _, _ = ref.ultramem_forward(p, x, lc)
                with torch.no_grad():
                    got = self.decode(p, x, cfg, m, m_first, m_neg)
                what = "T=%d m=%d m_first=%d m_neg=%d %s" % (T, m, m_first, m_neg, dtype)
                self.assertEqual(tuple(got.shape), (T, cfg["D"]), what)
                torch.testing.assert_close(got, want, msg=lambda s: what + ": " + s, **tol(dtype))

    def test_rank_r_filter_matches_reference_layer(self):
        seed = 760
        for dtype in (torch.float64, torch.float32):
            for T, m, m_first, R in ((1, 4, 6, 2), (5, 5, 6, 1), (40, 9, 3, 2)):
                seed += 1
                p, cfg = self.layer(dtype, seed)
                x = torch.randn(T, cfg["D"], generator=torch.Generator().manual_seed(seed), dtype=dtype)
                lc = dict(cfg, m=m, m_first=m_first, filter="rank_r", filter_rank=R)
                want, _, _ = ref.ultramem_forward(p, x, lc)
                with torch.no_grad():
                    got = self.decode(p, x, cfg, m, m_first, filter_rank=R)
                what = "rank-%d T=%d m=%d m_first=%d %s" % (R, T, m, m_first, dtype)
                torch.testing.assert_close(got, want, msg=lambda s: what + ": " + s, **tol(dtype))

    def test_bf16_and_int8_value_tables(self):
        p, cfg = self.layer(torch.float32, 800)
        x = torch.randn(6, cfg["D"], generator=torch.Generator().manual_seed(801))
        lc = dict(cfg, m=4, m_first=6)
        bf16 = p["values"].to(torch.bfloat16)
        want, _, _ = ref.ultramem_forward(dict(p, values=bf16.float()), x, lc)
        torch.testing.assert_close(self.decode(p, x, cfg, 4, 6, values=bf16), want, rtol=1e-5, atol=1e-5)
        scale = (p["values"].abs().amax(1) / 127).contiguous()
        q = torch.round(p["values"] / scale[:, None]).clamp(-127, 127).to(torch.int8)
        want, _, _ = ref.ultramem_forward(dict(p, values=q.float() * scale[:, None]), x, lc)
        torch.testing.assert_close(self.decode(p, x, cfg, 4, 6, values=q, scale=scale), want, rtol=1e-5, atol=1e-5)

    def test_compact_keys(self):
        # bf16 keys score exactly as the float keys they widen to; int8 keys (one scale per row) as the
        # dequantised keys up to rounding.
        p, cfg = self.layer(torch.float32, 950)
        x = torch.randn(6, cfg["D"], generator=torch.Generator().manual_seed(951))
        kn = ref.qk_norm(p["keys"].transpose(3, 4), p["k_scale"][:, None, None, :], cfg["qk_norm"])
        kn_all, kf = torch.ops.ultramem.fold_filter_keys(kn[:, 0].contiguous(), kn[:, 1].contiguous(), p["u"], p["v"])
        args = (p["values"], None, p["perm"], p["wo"], 4, 6)

        def run(kn_t, kf_t, **kw):
            return torch.ops.ultramem.ultramem_decode(x, p["wq"], p["q_scale"], p["cores"], kn_t, kf_t, *args, **kw)

        b_kn, b_kf = kn_all.to(torch.bfloat16), kf.to(torch.bfloat16)
        self.assertTrue(torch.equal(run(b_kn, b_kf), run(b_kn.float(), b_kf.float())))

        def int8(t):
            scale = t.abs().amax(-1) / 127
            return torch.round(t / scale[..., None]).clamp(-127, 127).to(torch.int8), scale.contiguous()

        q_kn, s_kn = int8(kn_all)
        q_kf, s_kf = int8(kf)
        got = run(q_kn, q_kf, kn_scale=s_kn, kf_scale=s_kf)
        want = run(q_kn.float() * s_kn[..., None], q_kf.float() * s_kf[..., None])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        with self.assertRaisesRegex(RuntimeError, "kn_scale"):
            run(q_kn, q_kf)

    def test_bad_arguments_name_the_field(self):
        p, cfg = self.layer(torch.float32, 900)
        x = torch.randn(2, cfg["D"])
        with self.assertRaisesRegex(RuntimeError, "ultramem_decode: x"):
            self.decode(p, torch.randn(2, cfg["D"] + 1), cfg, 4, 6)
        with self.assertRaisesRegex(RuntimeError, "m_neg"):
            self.decode(p, x, cfg, 4, 6, m_neg=6)
        with self.assertRaisesRegex(RuntimeError, "values_scale"):
            self.decode(p, x, cfg, 4, 6, values=p["values"].to(torch.int8))
        with self.assertRaisesRegex(RuntimeError, "keys.kf"):  # rank-1 filter keys with filter_rank = 2
            kn = ref.qk_norm(p["keys"].transpose(3, 4), p["k_scale"][:, None, None, :], cfg["qk_norm"])
            kn_all, kf = torch.ops.ultramem.fold_filter_keys(kn[:, 0].contiguous(), kn[:, 1].contiguous(), p["u"], p["v"])
            torch.ops.ultramem.ultramem_decode(x, p["wq"], p["q_scale"], p["cores"], kn_all, kf, p["values"], None,
                                               p["perm"], p["wo"], 4, 6, filter_rank=2)
        with self.assertRaisesRegex(RuntimeError, "filter_rank"):
            self.decode(p, x, cfg, 4, 6, filter_rank=3)
        bad_perm = p["perm"].clone()
        bad_perm[5] = 64  # n*n = 64 slots
        with self.assertRaisesRegex(RuntimeError, r"perm\[5\] = 64 is outside \[0, 64\)"):
            self.decode(dict(p, perm=bad_perm), x, cfg, 4, 6)


class BlockDecodeTest(unittest.TestCase):
    """The transformer block's no-grad ops against plain PyTorch expressions of the same math."""

    def test_rms_norm(self):
        gen = torch.Generator().manual_seed(40)
        for dtype in (torch.float64, torch.float32):
            for T, D in ((1, 8), (7, 24), (300, 64), (0, 16)):
                x = torch.randn(T, D, generator=gen, dtype=torch.float64).to(dtype)
                w = (0.5 + torch.rand(D, generator=gen, dtype=torch.float64)).to(dtype)
                want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
                torch.testing.assert_close(torch.ops.ultramem.rms_norm(x, w, 1e-5), want, **tol(dtype))
        with self.assertRaisesRegex(RuntimeError, "rms_norm: weight"):
            torch.ops.ultramem.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5)

    def test_swiglu_forward(self):
        gen = torch.Generator().manual_seed(41)
        for dtype in (torch.float64, torch.float32):
            for T, D, h in ((1, 16, 24), (5, 16, 40), (33, 32, 20)):  # few-row kernels and BLAS
                x = torch.randn(T, D, generator=gen, dtype=torch.float64).to(dtype)
                w_in = (torch.randn(D, 2 * h, generator=gen, dtype=torch.float64) / D ** 0.5).to(dtype)
                w_out = (torch.randn(h, D, generator=gen, dtype=torch.float64) / h ** 0.5).to(dtype)
                g, u = (x @ w_in).chunk(2, -1)
                want = (torch.nn.functional.silu(g) * u) @ w_out
                torch.testing.assert_close(torch.ops.ultramem.swiglu_forward(x, w_in, w_out), want, **tol(dtype))
        with self.assertRaisesRegex(RuntimeError, "swiglu_forward: w_out"):
            torch.ops.ultramem.swiglu_forward(torch.randn(2, 8), torch.randn(8, 6), torch.randn(4, 8))

    def test_linear_nt(self):
        gen = torch.Generator().manual_seed(43)
        for dtype in (torch.float64, torch.float32):
            for T, K, N in ((1, 32, 300), (16, 24, 40), (17, 24, 40), (64, 8, 1000)):  # kernel and BLAS sides
                x = torch.randn(T, K, generator=gen, dtype=torch.float64).to(dtype)
                w = torch.randn(N, K, generator=gen, dtype=torch.float64).to(dtype)
                torch.testing.assert_close(torch.ops.ultramem.linear_nt(x, w), x @ w.t(), **tol(dtype))
        with self.assertRaisesRegex(RuntimeError, "linear_nt: w"):
            torch.ops.ultramem.linear_nt(torch.randn(2, 8), torch.randn(5, 7))

    def test_attention_decode_matches_full_causal_attention(self):
        # Decoding position by position with the cache gives the last row of full causal attention.
        gen = torch.Generator().manual_seed(42)
        for dtype in (torch.float64, torch.float32):
            B, nh, hd, P = 3, 4, 8, 12
            D, half = nh * hd, hd // 2
            wqkv = (torch.randn(D, 3 * D, generator=gen, dtype=torch.float64) / D ** 0.5).to(dtype)
            wo = (torch.randn(D, D, generator=gen, dtype=torch.float64) / D ** 0.5).to(dtype)
            inv = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2.0 / hd)
            ang = torch.arange(P, dtype=torch.float64)[:, None] * inv[None, :]
            cos, sin = ang.cos(), ang.sin()
            xs = torch.randn(B, P, D, generator=gen, dtype=torch.float64).to(dtype)

            def rope(z, t):  # z [B, nh, T, hd] at positions [0, T)
                c, s = cos[:t].to(dtype), sin[:t].to(dtype)
                z1, z2 = z[..., :half], z[..., half:]
                return torch.cat([z1 * c - z2 * s, z1 * s + z2 * c], -1)

            ck = torch.zeros(B, nh, P, hd, dtype=dtype)
            cv = torch.zeros(B, nh, P, hd, dtype=dtype)
            for pos in range(P):
                got = torch.ops.ultramem.attention_decode(xs[:, pos], wqkv, wo, cos, sin, ck, cv, pos)
                T = pos + 1
                q, k, v = (xs[:, :T] @ wqkv).view(B, T, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)
                q, k = rope(q, T) / hd ** 0.5, rope(k, T)
                mask = torch.ones(T, T, dtype=torch.bool).triu(1)
                probs = torch.softmax((q @ k.transpose(2, 3)).masked_fill(mask, float("-inf")), -1)
                want = ((probs @ v).transpose(1, 2).reshape(B, T, D) @ wo)[:, -1]
                torch.testing.assert_close(got, want, msg=lambda m: "pos %d %s: %s" % (pos, dtype, m), **tol(dtype))
                torch.testing.assert_close(ck[:, :, pos], k[:, :, -1], **tol(dtype))  # the cache holds the rotated key
            with self.assertRaisesRegex(RuntimeError, "pos must be in"):
                torch.ops.ultramem.attention_decode(xs[:, 0], wqkv, wo, cos, sin, ck, cv, P)


if __name__ == "__main__":
    unittest.main(verbosity=1)
