"""The C++ UltraMem and PKM layers against the independent pure-PyTorch reference (reference.py).

Runs the dump_layer binary for several configs, reads its safetensors dump with the package's safetensors reader and
recomputes the output, the aux loss and every gradient from the saved weights with Python autograd.

usage: python3 test_parity.py [--dump-layer PATH/dump_layer] [unittest args]   (or set ULTRAMEM_DUMP_LAYER)
"""
import os
import subprocess
import sys
import tempfile
import unittest

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_args import take_arg  # noqa: E402
import reference as ref  # noqa: E402
from ultramem import safetensors as safetensors_io  # noqa: E402



DUMP_LAYER = take_arg("--dump-layer", "ULTRAMEM_DUMP_LAYER")

INT_KEYS = {"D", "n", "E", "Dk", "Dv", "r", "C", "H", "m", "m_first", "m_neg", "num_layers", "seed", "T", "B", "input_seed",
            "filter_rank", "Dp"}
FLOAT_KEYS = {"qk_scale_init", "aux_alpha", "aux_tau", "value_std"}
BOOL_KEYS = {"aux_loss", "sparse_value_grad", "query_per_rank", "single_projection"}


def parse_meta(meta):
    cfg = {}
    for k, v in meta.items():
        if k in INT_KEYS:
            cfg[k] = int(v)
        elif k in FLOAT_KEYS:
            cfg[k] = float(v)
        elif k in BOOL_KEYS:
            assert v in ("true", "false"), (k, v)
            cfg[k] = v == "true"
        else:
            cfg[k] = v
    return cfg


def tolerances(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-10)
    return dict(rtol=2e-4, atol=2e-5)


class ParityBase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not DUMP_LAYER:
            raise RuntimeError("pass --dump-layer PATH or set ULTRAMEM_DUMP_LAYER")
        cls.tmp = tempfile.TemporaryDirectory(prefix="ultramem_parity_")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def dump(self, name, kind, dtype, **config):
        path = os.path.join(self.tmp.name, name + ".safetensors")
        cmd = [DUMP_LAYER, path, "--kind", kind, "--dtype", dtype]
        if config:
            cmd += ["--config"] + ["%s=%s" % (k, v) for k, v in config.items()]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        self.assertEqual(res.returncode, 0, "dump_layer failed: %s\n%s" % (" ".join(cmd), res.stderr))
        tensors, meta = safetensors_io.load(path)
        cfg = parse_meta(meta)
        self.assertEqual(cfg["kind"], kind)
        for k, v in config.items():  # the overrides took effect
            if k in FLOAT_KEYS:
                self.assertEqual(float(meta[k]), float(v), k)
            else:
                self.assertEqual(meta[k], str(v), k)
        return tensors, cfg

    def check_grads(self, t, params, x, loss, what):
        names = sorted(k[len("grad."):] for k in t if k.startswith("grad.") and k != "grad.x")
        self.assertEqual(sorted(params), names, what + ": parameter sets differ")
        grads = torch.autograd.grad(loss, [params[k] for k in names] + [x], allow_unused=True)
        tol = tolerances(x.dtype)
        for name, g in zip(names + ["x"], grads):
            if g is None:
                g = torch.zeros_like(t["grad." + name])
            torch.testing.assert_close(t["grad." + name], g, msg=lambda s, n=name: "%s: grad.%s: %s" % (what, n, s),
                                       **tol)
            self.assertTrue(bool(torch.isfinite(t["grad." + name]).all()), what + ": grad." + name)


class UltraMemParityTest(ParityBase):
    def run_case(self, name, dtype="double", **config):
        t, cfg = self.dump(name, "ultramem", dtype, **config)
        what = "%s %s" % (name, config)
        fdt = torch.float64 if dtype == "double" else torch.float32
        param_names = ["wq", "q_scale", "keys", "k_scale", "cores", "values", "wo"]
        params = {k: t[k].clone().requires_grad_(True) for k in param_names}
        for k in params:
            self.assertEqual(params[k].dtype, fdt, k)
        p = dict(params)
        p.update(perm=t["perm"], u=t["u"], v=t["v"])
        H, n, E, r, C = cfg["H"], cfg["n"], cfg["E"], cfg["r"], cfg["C"]
        # shapes as in the spec
        self.assertEqual(tuple(t["keys"].shape), (H, 2, n, cfg["Dk"], r))
        self.assertEqual(tuple(t["cores"].shape), (C, H, r, r))
        self.assertEqual(tuple(t["values"].shape), (n * n // E, cfg["Dv"]))
        self.assertEqual(tuple(t["wo"].shape), (E * cfg["Dv"], cfg["D"]))
        # the IVE permutation is a permutation of the E*N grid addresses, and the forward leaves it alone
        self.assertEqual(t["perm"].dtype, torch.int64)
        self.assertTrue(torch.equal(torch.sort(t["perm"]).values, torch.arange(n * n)))
        for b in ("perm", "u", "v"):
            self.assertTrue(torch.equal(t[b], t["post." + b]), b)
        # (u, v) are the leading singular vectors of each head's core sum, positively oriented on first use
        U0, V0, S = ref.rank1_filter(t["cores"].double())
        u, v = t["u"].double(), t["v"].double()
        tol = 1e-10 if dtype == "double" else 1e-6
        torch.testing.assert_close(u.abs(), U0.abs(), rtol=0, atol=tol)
        torch.testing.assert_close(v.abs(), V0.abs(), rtol=0, atol=tol)
        csum = t["cores"].double().sum(0)
        torch.testing.assert_close(torch.einsum("ha,hab,hb->h", u, csum, v), S[:, 0], rtol=tol, atol=tol)
        self.assertTrue(bool(((u.sum(1) + v.sum(1)) >= 0).all()), "sign rule (no history): sum(u)+sum(v) >= 0")

        x = t["x"].clone().requires_grad_(True)
        out, scores, index = ref.ultramem_forward(p, x, cfg)
        aux = ref.ultramem_aux_loss(params["cores"], cfg)
        T = x.numel() // cfg["D"]
        self.assertEqual(tuple(index.shape), (T, H * cfg["m"]))
        tol = tolerances(fdt)
        torch.testing.assert_close(t["out"], out, msg=lambda s: what + ": out: " + s, **tol)
        torch.testing.assert_close(t["aux_loss"], aux, msg=lambda s: what + ": aux_loss: " + s, **tol)
        loss = (out * t["g"]).sum() + aux
        self.check_grads(t, params, x, loss, what)
        return t, cfg, index

    def test_rms_double(self):
        t, cfg, index = self.run_case("rms")
        self.assertGreater(float(t["aux_loss"]), 0.0, "the default config should exercise the aux loss")
        self.assertGreater(len(torch.unique(torch.div(t["perm"][index], 16, rounding_mode="floor"))), 1,
                           "several IVE groups should be hit")

    def test_layernorm_double(self):
        self.run_case("layer", qk_norm="layer", seed=3)

    def test_minimal_shapes_m_first_above_m(self):
        t, cfg, _ = self.run_case("minimal", H=1, C=1, E=1, r=1, n=6, m=3, m_first=5, Dv=8, seed=4)
        self.assertEqual(float(t["aux_loss"]), 0.0)  # r == 1: no aux loss

    def test_m_first_below_m(self):
        # The final top-m comes from the m_first x m_first rescored candidates (spec section 4), so
        # m_first < m is valid while m <= m_first^2; the second case keeps every candidate.
        _, cfg, _ = self.run_case("mfirst_below", n=8, m=12, m_first=4, seed=8)
        self.assertLess(cfg["m_first"], cfg["m"])
        self.run_case("mfirst_all", n=8, m=9, m_first=3, seed=9)

    def test_two_sign_filter_and_summed_aux(self):
        # The two-sign filter (3 + 3 of m_first 6 per side, same-sign blocks) and the aux loss summed
        # over heads.
        t, cfg, _ = self.run_case("twosign", filter="two_sign", m_neg=3, aux_reduction="sum", seed=10)
        self.assertEqual(cfg["filter"], "two_sign")
        self.assertGreater(float(t["aux_loss"]), 0.0)

    def test_float32(self):
        self.run_case("f32", dtype="float", seed=5)

    def test_big_expansion_sparse_grad(self):
        # E = 9, r = C = 3, sparse value gradient (dumped densified), aux loss with a larger alpha
        self.run_case("e9", n=9, E=9, r=3, C=3, Dv=18, m=4, m_first=7, sparse_value_grad="true", aux_alpha=0.5,
                      aux_tau=0.05, seed=6, T=4, B=2)

    def test_aux_off_fixed_init(self):
        t, _, _ = self.run_case("auxoff", aux_loss="false", value_init="fixed", value_std=0.05, qk_scale_init=0.7,
                                seed=7)
        self.assertEqual(float(t["aux_loss"]), 0.0)
        # the scales are created in float32 and then converted
        self.assertTrue(torch.equal(t["q_scale"], torch.full(t["q_scale"].shape, 0.7).to(t["q_scale"].dtype)))


class PKMParityTest(ParityBase):
    def run_case(self, name, dtype="double", **config):
        t, cfg = self.dump(name, "pkm", dtype, **config)
        what = "%s %s" % (name, config)
        fdt = torch.float64 if dtype == "double" else torch.float32
        param_names = [k[len("grad."):] for k in t if k.startswith("grad.") and k != "grad.x"]
        params = {k: t[k].clone().requires_grad_(True) for k in param_names}
        x = t["x"].clone().requires_grad_(True)
        out, w, index, stats = ref.pkm_forward(params, x, cfg)
        tol = tolerances(fdt)
        torch.testing.assert_close(t["out"], out, msg=lambda s: what + ": out: " + s, **tol)
        self.assertEqual(float(t["aux_loss"]), 0.0)
        self.check_grads(t, params, x, (out * t["g"]).sum(), what)
        return t, cfg, stats

    def test_layernorm_double(self):
        t, cfg, _ = self.run_case("pkm_ln", query_norm="layer")
        self.assertIn("ln.weight", t)
        self.assertIn("wo", t)

    def test_batchnorm_double(self):
        t, cfg, (mu, var) = self.run_case("pkm_bn", query_norm="batch", seed=2)
        # training-mode BatchNorm updated its running statistics (momentum 0.1, unbiased variance)
        T = t["x"].numel() // cfg["D"]
        torch.testing.assert_close(t["post.bn.running_mean"], 0.9 * t["bn.running_mean"] + 0.1 * mu.detach())
        torch.testing.assert_close(t["post.bn.running_var"],
                                   0.9 * t["bn.running_var"] + 0.1 * var.detach() * T / (T - 1))
        self.assertEqual(t["bn.num_batches_tracked"].dtype, torch.int64, "BatchNorm counter must stay int64")
        self.assertEqual(int(t["post.bn.num_batches_tracked"]), int(t["bn.num_batches_tracked"]) + 1)

    def test_no_norm_no_projection_float32(self):
        t, _, _ = self.run_case("pkm_plain", dtype="float", query_norm="none", Dv=32, H=3, m=5, seed=3)
        self.assertNotIn("wo", t)


if __name__ == "__main__":
    unittest.main(verbosity=1)
