"""The whole C++ language model against the independent pure-PyTorch model in model_reference.py.

For each config (parity_ultramem.json, parity_pkm.json: dense, MoE and no-FFN blocks, skip-layer
memories), runs dump_model, reads its safetensors dump and recomputes the logits, the aux losses, the
loss and the gradient of every parameter from the saved weights with Python autograd.

usage: python3 test_model_parity.py [--dump-model PATH/dump_model] [unittest args]  (or ULTRAMEM_DUMP_MODEL)
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_args import take_arg  # noqa: E402
import model_reference as mref  # noqa: E402
from ultramem import safetensors as safetensors_io  # noqa: E402



DUMP_MODEL = take_arg("--dump-model", "ULTRAMEM_DUMP_MODEL")
DATA_KEYS = {"tokens", "targets", "logits", "loss"}


def assert_subset(test, want, got, path="config"):
    """Every key of `want` (the config file) has the same value in `got` (the config the model used)."""
    if isinstance(want, dict):
        test.assertIsInstance(got, dict, path)
        for k, v in want.items():
            test.assertIn(k, got, path + "." + k)
            assert_subset(test, v, got[k], path + "." + k)
    elif isinstance(want, float):
        test.assertAlmostEqual(want, got, msg=path, delta=1e-12 * abs(want))
    else:
        test.assertEqual(want, got, path)


class ModelParityTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not DUMP_MODEL:
            raise RuntimeError("pass --dump-model PATH or set ULTRAMEM_DUMP_MODEL")
        cls.tmp = tempfile.TemporaryDirectory(prefix="ultramem_model_parity_")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def dump(self, config_path, dtype, seed):
        out = os.path.join(self.tmp.name, "%s_%s_%d.safetensors" % (os.path.basename(config_path), dtype, seed))
        cmd = [DUMP_MODEL, out, "--config", config_path, "--dtype", dtype, "--seed", str(seed)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        self.assertEqual(res.returncode, 0, "dump_model failed: %s\n%s" % (" ".join(cmd), res.stderr))
        return safetensors_io.load(out)

    def run_case(self, config_path, dtype="double", seed=1234):
        """Dumps the model of `config_path` and checks it against the reference. float64 dumps are compared
        tightly; float32 dumps against the reference evaluated in float64 on the same (float32) weights."""
        with open(config_path) as f:
            file_cfg = json.load(f)
        t, meta = self.dump(config_path, dtype, seed)
        cfg = json.loads(meta["config"])
        what = "%s (%s, seed %d)" % (os.path.basename(config_path), dtype, seed)
        assert_subset(self, file_cfg, cfg)
        self.assertEqual(meta["dtype"], dtype)

        saved_dtype = torch.float64 if dtype == "double" else torch.float32
        param_names = sorted(k[len("grad."):] for k in t if k.startswith("grad."))
        aux_names = sorted(k[len("aux."):] for k in t if k.startswith("aux."))
        buffer_names = [k for k in t if k not in DATA_KEYS and not k.startswith(("grad.", "aux.")) and
                        k not in param_names]
        for name in param_names:
            self.assertIn(name, t, what + ": gradient without parameter")
            self.assertEqual(t[name].dtype, saved_dtype, name)
            self.assertEqual(t["grad." + name].shape, t[name].shape, name)

        # the reference runs in float64 (leaves are float64 copies of the saved weights)
        params = {k: t[k].double().requires_grad_(True) for k in param_names}
        tensors = dict(params)
        for k in buffer_names:
            tensors[k] = t[k].double() if t[k].is_floating_point() else t[k]
        P = mref.UsageTracker(tensors)
        loss, logits, aux = mref.loss_and_logits(P, cfg, t["tokens"], t["targets"])
        self.assertEqual(sorted(P.used & set(param_names)), param_names,
                         what + ": parameters the reference never used")
        grads = torch.autograd.grad(loss, [params[k] for k in param_names], allow_unused=True)

        if dtype == "double":
            tol = dict(rtol=1e-8, atol=1e-10)
            gtol = lambda g: tol  # noqa: E731
        else:
            tol = dict(rtol=1e-4, atol=1e-5)
            gtol = lambda g: dict(rtol=1e-3, atol=1e-4 * float(g.abs().max()))  # noqa: E731
        B, T = t["tokens"].shape
        self.assertEqual((B, T), (2, min(cfg["max_seq_len"], 12)))
        self.assertEqual(tuple(t["logits"].shape), (B, T, cfg["vocab_size"]))
        check = torch.testing.assert_close
        check(t["logits"].double(), logits.detach(), msg=lambda s: what + ": logits: " + s, **tol)
        self.assertEqual(aux_names, sorted(aux), what + ": aux loss names")
        for name in aux_names:
            check(t["aux." + name].double(), aux[name].detach(), msg=lambda s, n=name: what + ": aux." + n + ": " + s,
                  **tol)
        check(t["loss"].double(), loss.detach(), msg=lambda s: what + ": loss: " + s, **tol)
        for name, g in zip(param_names, grads):
            self.assertIsNotNone(g, what + ": the reference loss does not depend on " + name)
            got = t["grad." + name].double()
            self.assertTrue(bool(torch.isfinite(got).all()), what + ": grad." + name + " not finite")
            self.assertGreater(float(got.abs().max()), 0.0, what + ": grad." + name + " is all zero")
            check(got, g, msg=lambda s, n=name: what + ": grad." + n + ": " + s, **gtol(g))
        return t, cfg, aux

    def expect_structure(self, t, cfg):
        kinds = mref.ffn_kinds(cfg)
        self.assertEqual(set(kinds), {"dense", "moe", "none"}, "the config should have every FFN kind")
        placement = mref.parse_placement(cfg["memory"]["placement"])
        self.assertTrue(any(r < w for r, w in placement), "a skip-layer memory")
        self.assertTrue(any(r == w for r, w in placement), "a memory in parallel with its block")
        self.assertTrue(any(kinds[r - 1] == "none" for r, _ in placement), "a memory reading at a no-FFN block")
        for k in range(len(placement)):
            self.assertIn("grad.memories.%d.values" % k, t)
        self.assertNotIn("grad.memories.%d.values" % len(placement), t)
        # a no-FFN block that no memory reads has no FFN norm
        for b, kind in enumerate(kinds):
            read = any(r == b + 1 for r, _ in placement)
            self.assertEqual("blocks.%d.ffn_norm.weight" % b in t, kind != "none" or read, "block %d" % b)

    def test_ultramem_double(self):
        t, cfg, aux = self.run_case(os.path.join(HERE, "parity_ultramem.json"))
        self.expect_structure(t, cfg)
        self.assertTrue(cfg["tie_embeddings"])
        self.assertNotIn("lm_head", t)
        self.assertGreater(float(aux["tucker"]), 0.0)
        self.assertGreater(float(aux["moe_balance"]), 0.0)

    def test_pkm_double(self):
        t, cfg, aux = self.run_case(os.path.join(HERE, "parity_pkm.json"))
        self.expect_structure(t, cfg)
        self.assertIn("grad.lm_head", t)
        self.assertIn("grad.memories.0.ln.weight", t)
        self.assertIn("grad.memories.0.wo", t)
        self.assertNotIn("aux.tucker", t)
        self.assertEqual(cfg["moe"]["top_k"], 1, "covers the un-renormalised top-1 routing")

    def test_pkm_batchnorm_other_tokens_double(self):
        with open(os.path.join(HERE, "parity_pkm.json")) as f:
            cfg = json.load(f)
        cfg["memory"]["pkm"]["query_norm"] = "batch"
        path = os.path.join(self.tmp.name, "parity_pkm_batchnorm.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        t, _, _ = self.run_case(path, seed=77)
        self.assertIn("grad.memories.1.bn.weight", t)

    def test_pkm_shared_query_no_softmax_double(self):
        # The first steps of the ablation ladder: no softmax over the m scores, one query for all heads.
        with open(os.path.join(HERE, "parity_pkm.json")) as f:
            cfg = json.load(f)
        cfg["memory"]["pkm"].update({"softmax": False, "shared_query": True, "query_norm": "batch"})
        path = os.path.join(self.tmp.name, "parity_pkm_shared.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        t, out_cfg, _ = self.run_case(path, seed=13)
        self.assertFalse(out_cfg["memory"]["pkm"]["softmax"])
        self.assertTrue(out_cfg["memory"]["pkm"]["shared_query"])
        D, Dk = out_cfg["d_model"], out_cfg["memory"]["pkm"]["Dk"]
        self.assertEqual(list(t["grad.memories.0.wq"].shape), [D, 2 * Dk])

    def test_ultramem_float32(self):
        self.run_case(os.path.join(HERE, "parity_ultramem.json"), dtype="float", seed=5)


if __name__ == "__main__":
    unittest.main(verbosity=1)
