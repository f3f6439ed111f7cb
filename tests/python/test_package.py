"""The Python package (python/ultramem) against the C++ library and command.

- LayerTest: UltraMem / PKM built in Python with a seed hold the C++ layer's initial weights (dump_layer),
  their forward and every gradient equal the C++ layer's, double-precision gradcheck passes, the no-grad
  path (the fused op) equals the autograd one, and bad input raises Python exceptions with the C++ message.
- CommandTest: a tiny run trained by `ultramem train` (one file, and sharded with --nproc 2) loads in
  TransformerLM with the same validation loss as `ultramem eval` (fp32, bf16 and int8 values); a checkpoint
  goes C++ -> Python -> C++ with bit-identical tensors; `ultramem train --resume` continues a run from a
  checkpoint Python rewrote and ends where the uninterrupted run ends; greedy generate() gives the CLI's
  text; `ultramem export --format hf` loads with from_pretrained; the example trains and its loss falls.
- InstallTest: `pip install ./python --no-deps --target TMP` works offline and imports in a fresh
  interpreter, finding the op library inside the installed package.

usage: python3 test_package.py --ultramem PATH/ultramem --dump-layer PATH/dump_layer --dump-model PATH/dump_model
       --ops-lib PATH/libultramem_ops.so [unittest args]
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import warnings

import torch

try:
    from torch.func import functional_call  # torch >= 2.0
except ImportError:
    from torch.nn.utils.stateless import functional_call

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from test_args import take_arg  # noqa: E402  (also puts python/ on sys.path)

ULTRAMEM = take_arg("--ultramem", "ULTRAMEM_BIN")
DUMP_LAYER = take_arg("--dump-layer", "ULTRAMEM_DUMP_LAYER")
DUMP_MODEL = take_arg("--dump-model", "ULTRAMEM_DUMP_MODEL")
OPS_LIB = take_arg("--ops-lib", "ULTRAMEM_OPS_LIB")
if OPS_LIB:
    os.environ["ULTRAMEM_OPS_LIB"] = os.path.abspath(OPS_LIB)

import ultramem  # noqa: E402
from ultramem import safetensors as st  # noqa: E402

ULTRAMEM_FIELDS = set(ultramem.layers.ULTRAMEM_DEFAULTS)
PKM_FIELDS = set(ultramem.layers.PKM_DEFAULTS)


def run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)
    if res.returncode != 0:
        raise AssertionError("%s failed (%d):\n%s\n%s" % (" ".join(cmd), res.returncode, res.stdout[-3000:],
                                                            res.stderr[-3000:]))
    return res.stdout


def typed(defaults, meta):
    """dump_layer's string metadata -> the layer's keyword arguments."""
    out = {}
    for k, v in meta.items():
        if k not in defaults:
            continue
        d = defaults[k]
        out[k] = (v == "true") if isinstance(d, bool) else int(v) if isinstance(d, int) else \
            float(v) if isinstance(d, float) else v
    return out


class LayerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not DUMP_LAYER:
            raise RuntimeError("pass --dump-layer PATH or set ULTRAMEM_DUMP_LAYER")
        cls.tmp = tempfile.TemporaryDirectory(prefix="ultramem_package_")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def dump(self, name, kind, dtype="double", **config):
        path = os.path.join(self.tmp.name, name + ".safetensors")
        cmd = [DUMP_LAYER, path, "--kind", kind, "--dtype", dtype]
        if config:
            cmd += ["--config"] + ["%s=%s" % (k, v) for k, v in config.items()]
        run(cmd)
        return st.load(path)

    def layer_case(self, name, kind="ultramem", dtype="double", **config):
        t, meta = self.dump(name, kind, dtype, **config)
        fields = ULTRAMEM_DEFAULTS if kind == "ultramem" else PKM_DEFAULTS
        kwargs = typed(fields, meta)
        layer = (ultramem.UltraMem if kind == "ultramem" else ultramem.PKM)(**kwargs)
        if dtype == "double":
            layer = layer.double()
        if kind == "ultramem":
            layer.refresh_tucker_approx()  # as dump_layer does after the conversion
        own = dict(layer.named_parameters())
        own.update(layer.named_buffers())
        params = [k[len("grad."):] for k in t if k.startswith("grad.") and k != "grad.x"]
        # The same seed gives the C++ layer's initial weights, bit for bit (perm, u, v included).
        for k in params + ["perm", "u", "v"] * (kind == "ultramem"):
            self.assertIn(k, own, "%s: the Python layer lacks %s" % (name, k))
            self.assertTrue(torch.equal(own[k].detach(), t[k]), "%s: %s differs from the C++ layer's init" % (name, k))
        x = t["x"].clone().requires_grad_(True)
        if kind == "pkm" and layer.bn is not None:
            layer.train()
        out = layer(x)
        aux = layer.aux_loss()
        tol = dict(rtol=1e-9, atol=1e-10) if dtype == "double" else dict(rtol=2e-4, atol=2e-5)
        torch.testing.assert_close(out, t["out"], msg=lambda s: "%s: out: %s" % (name, s), **tol)
        torch.testing.assert_close(aux, t["aux_loss"], msg=lambda s: "%s: aux: %s" % (name, s), **tol)
        loss = (out * t["g"]).sum() + aux
        names = sorted(params)
        grads = torch.autograd.grad(loss, [own[k] for k in names] + [x], allow_unused=True)
        for k, g in zip(names + ["x"], grads):
            want = t["grad." + k]
            g = torch.zeros_like(want) if g is None else (g.to_dense() if g.is_sparse else g)
            torch.testing.assert_close(g, want, msg=lambda s, k=k: "%s: grad.%s: %s" % (name, k, s), **tol)
        return layer, t

    def test_ultramem_matches_the_cpp_layer(self):
        self.layer_case("rms")
        self.layer_case("layer_twosign", qk_norm="layer", filter="two_sign", m_neg=3, seed=3)
        self.layer_case("rank_r", filter="rank_r", seed=5, aux_reduction="sum")
        self.layer_case("e9_sparse", n=9, E=9, r=3, C=3, Dv=18, m=4, m_first=7, sparse_value_grad="true", seed=6)
        self.layer_case("f32", dtype="float", seed=11)
        # UltraMemV2: query per rank, one projection, pre-values, the V2 init.
        self.layer_case("v2", query_per_rank="true", single_projection="true", Dp=6, value_init="v2", aux_loss="false",
                        seed=12)
        self.layer_case("v2_prevalues_only", Dp=3, seed=13, sparse_value_grad="true")

    def test_pkm_matches_the_cpp_layer(self):
        self.layer_case("pkm_ln", "pkm", query_norm="layer")
        self.layer_case("pkm_bn", "pkm", query_norm="batch", seed=2)
        self.layer_case("pkm_plain", "pkm", dtype="float", query_norm="none", Dv=32, H=3, m=5, seed=3)

    def test_gradcheck_double(self):
        torch.manual_seed(0)
        layer = ultramem.UltraMem(D=12, n=6, E=4, Dk=5, Dv=8, r=2, C=2, H=2, m=4, m_first=3, seed=9).double()
        x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
        self.assertTrue(torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-7))
        # Each parameter in turn, through the module (functional_call swaps it for the checked tensor).
        for name, p in layer.named_parameters():
            w = p.detach().clone().requires_grad_(True)
            check = torch.autograd.gradcheck(lambda w, name=name: functional_call(layer, {name: w}, (x.detach(),)),
                                             (w,), eps=1e-6, atol=1e-7)
            self.assertTrue(check, name)
        pkm = ultramem.PKM(D=10, n=5, Dk=4, Dv=6, H=2, m=3, query_norm="layer", seed=4).double()
        self.assertTrue(torch.autograd.gradcheck(pkm, (torch.randn(4, 10, dtype=torch.float64, requires_grad=True),),
                                                 eps=1e-6, atol=1e-7))

    def test_engram_layer_gradcheck_state_and_errors(self):
        layer = ultramem.Engram(D=8, heads=2, d_e=8, rows=11, kernel=3, conv_std=0.3, seed=4).double()
        self.assertEqual(layer.table_sizes, [11, 13, 17, 19])
        self.assertEqual(tuple(layer.values.shape), (60, 2))
        tokens = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(1))
        u = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
        self.assertTrue(torch.autograd.gradcheck(lambda u: layer(u, tokens), (u,), eps=1e-6, atol=1e-7))
        for name, p in layer.named_parameters():
            w = p.detach().clone().requires_grad_(True)
            check = torch.autograd.gradcheck(
                lambda w, name=name: functional_call(layer, {name: w}, (u.detach(), tokens)), (w,), eps=1e-6,
                atol=1e-7)
            self.assertTrue(check, name)
        # Rows: the op's hash, inside each table; a prompt then single steps give the whole sequence.
        rows = layer.rows(tokens)
        starts = [0, 11, 24, 41]
        for j, (lo, m) in enumerate(zip(starts, layer.table_sizes)):
            self.assertTrue(bool(((rows[..., j] >= lo) & (rows[..., j] < lo + m)).all()), j)
        with torch.no_grad():
            whole = layer(u, tokens)
            state = layer.make_state(2)
            parts = [layer(u[:, :2], tokens[:, :2], state)] + [layer(u[:, t:t + 1], tokens[:, t:t + 1], state)
                                                                  for t in range(2, 5)]
        torch.testing.assert_close(torch.cat(parts, 1), whole)
        # Under no_grad the layer runs the fused op (torch.ops.ultramem.engram_decode): the autograd logits.
        torch.testing.assert_close(whole, layer(u, tokens).detach(), rtol=1e-12, atol=1e-12)
        # Zero taps by default (the branch starts as its gated value), as in C++.
        self.assertEqual(float(ultramem.Engram(D=8, heads=2, d_e=8, rows=11).conv.abs().sum()), 0.0)
        with self.assertRaisesRegex(ValueError, "EngramConfig.d_e: must be a multiple of 2 \\* heads = 4"):
            ultramem.Engram(D=8, heads=2, d_e=6)
        with self.assertRaisesRegex(ValueError, "EngramConfig.conv_std: must be >= 0"):
            ultramem.Engram(D=8, heads=2, d_e=8, conv_std=-1.0)
        with self.assertRaisesRegex(ValueError, "Engram: tokens must be \\[B, T\\]"):
            layer(u, tokens[:, :3])

    def test_no_grad_path_equals_the_autograd_path_and_records_stats(self):
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
            for filt in ("rank1", "two_sign", "rank_r"):
                layer = ultramem.UltraMem(D=16, n=8, E=4, Dk=6, Dv=8, m=6, m_first=4, filter=filt, seed=2,
                                          stats_window=1000).to(dtype)
                x = torch.randn(2, 5, 16, dtype=dtype)
                want = layer(x)
                with torch.no_grad():
                    got = layer(x)
                torch.testing.assert_close(got, want.detach(), rtol=tol, atol=tol, msg=lambda s: filt + ": " + s)
                s = layer.stats()
                self.assertEqual(s["tokens"], 20)
                self.assertGreater(s["coverage"], 0.0)
                self.assertGreaterEqual(s["recall"], 0.0)
                self.assertLessEqual(s["recall"], 1.0)

    def test_quantised_tables_serve_no_grad_only_and_keep_their_format(self):
        layer = ultramem.UltraMem(D=16, n=8, E=4, Dk=6, Dv=8, m=6, m_first=4, seed=2)
        x = torch.randn(3, 16)
        with torch.no_grad():
            ref = layer(x)
            scale = layer.values.abs().amax(1) / 127
            q = torch.round(layer.values / scale[:, None]).clamp(-127, 127).to(torch.int8)
        layer.set_value_table(q, scale.contiguous())
        self.assertEqual(layer.value_format, "int8")
        layer.double().float()
        self.assertEqual(layer.values.dtype, torch.int8, "dtype conversions keep an int8 table")
        with torch.no_grad():
            got = layer(x)
        torch.testing.assert_close(got, ref, rtol=0, atol=0.02)
        with self.assertRaisesRegex(RuntimeError, "inference only"):
            layer(x)

    def test_errors_are_python_exceptions_with_the_message(self):
        layer = ultramem.UltraMem(D=16, n=8, E=4, Dk=6, Dv=8, m=6, m_first=4, seed=2)
        with self.assertRaisesRegex(TypeError, "input dtype torch.float64 differs"):
            layer(torch.randn(2, 16, dtype=torch.float64))
        with self.assertRaisesRegex(ValueError, r"input must have shape \[..., D=16\]"):
            layer(torch.randn(2, 15))
        with self.assertRaisesRegex(ValueError, "must be a CPU tensor"):
            layer(torch.randn(2, 16, device="meta"))
        with self.assertRaisesRegex(ValueError, "UltraMemConfig.m_first: must be <= n = 8"):
            ultramem.UltraMem(D=16, n=8, m=4, m_first=9)
        with self.assertRaisesRegex(ValueError, "UltraMemConfig.E: must be a square"):
            ultramem.UltraMem(D=16, n=8, E=3, m=4)
        with self.assertRaisesRegex(ValueError, "UltraMemConfig.mfirst: unknown field"):
            ultramem.UltraMem(mfirst=3)
        with self.assertRaisesRegex(TypeError, "UltraMemConfig.n: expected int"):
            ultramem.UltraMem(n="8")
        # The ops' own checks arrive as RuntimeError with the C++ message, not as a crash.
        ops = torch.ops.ultramem
        with self.assertRaisesRegex(RuntimeError, "must be a CPU tensor"):
            ops.pooled_lookup(torch.zeros(4, 2, device="meta"), torch.zeros(1, 2, dtype=torch.long),
                              torch.zeros(1, 2, 1), torch.arange(4), 1, False)
        with self.assertRaisesRegex(RuntimeError, "index"):
            ops.pooled_lookup(torch.zeros(4, 2), torch.full((1, 2), 9, dtype=torch.long), torch.zeros(1, 2, 1),
                              torch.arange(4), 1, False)
        # A missing op library: an OpsLibraryError naming the path, in a fresh interpreter.
        code = ("import ultramem\ntry:\n    ultramem.UltraMem(D=8, n=4, m=2)\nexcept ultramem.OpsLibraryError as e:\n"
                "    print('OpsLibraryError:', e)\n")
        env = dict(os.environ, ULTRAMEM_OPS_LIB="/nonexistent/libultramem_ops.so",
                   PYTHONPATH=os.path.join(ROOT, "python"))
        out = run([sys.executable, "-c", code], env=env)
        self.assertIn("OpsLibraryError: ULTRAMEM_OPS_LIB=/nonexistent/libultramem_ops.so: no such file", out)

    def test_param_groups_and_value_lr_schedule(self):
        model = ultramem.TransformerLM({"vocab_size": 40, "d_model": 16, "n_layers": 2, "n_heads": 2,
                                        "max_seq_len": 8, "ffn_hidden": 24, "ffn": ["dense", "moe"],
                                        "memory": {"kind": "ultramem", "placement": "1:2",
                                                   "ultramem": {"n": 8, "E": 4, "Dk": 4, "Dv": 8, "m": 4}}})
        groups = {g["name"]: g for g in model.param_groups(weight_decay=0.1)}
        self.assertEqual(set(groups), {"decay", "no_decay", "memory_values", "experts"})
        self.assertTrue(any(p is model.blocks[1].moe.w_in for p in groups["experts"]["params"]))
        ids = [id(p) for g in groups.values() for p in g["params"]]
        self.assertEqual(sorted(ids), sorted(id(p) for p in model.parameters()), "every parameter in one group")
        self.assertEqual([p is model.memories[0].values for p in groups["memory_values"]["params"]], [True])
        self.assertTrue(any(p is model.memories[0].cores for p in groups["no_decay"]["params"]))
        self.assertTrue(any(p is model.memories[0].wq for p in groups["decay"]["params"]))
        opt = torch.optim.AdamW(list(groups.values()), lr=1.0)
        sched = ultramem.lr_scheduler(opt, steps=100, warmup_steps=10, value_lr_T=10, expert_lr_T=4)
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        self.assertAlmostEqual(lrs["experts"], 0.4)         # the experts' multiplier 4 (off by default)
        self.assertAlmostEqual(lrs["decay"], 0.1)           # warmup step 0: 1/10 of the peak
        self.assertAlmostEqual(lrs["memory_values"], 1.0)   # ... times 10 for the values
        for _ in range(100):
            opt.step()
            sched.step()
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        self.assertAlmostEqual(lrs["decay"], 0.1)           # the floor
        self.assertAlmostEqual(lrs["memory_values"], 0.1)   # the multiplier has decayed to 1
        self.assertAlmostEqual(lrs["experts"], 0.1)


ULTRAMEM_DEFAULTS = ultramem.layers.ULTRAMEM_DEFAULTS
PKM_DEFAULTS = ultramem.layers.PKM_DEFAULTS

MODEL = {"name": "py-tiny", "vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
         "ffn_hidden": 64, "ffn": ["dense", "moe"], "moe": {"num_experts": 4, "top_k": 2},
         "memory": {"kind": "ultramem", "placement": "1:2",
                    "ultramem": {"n": 8, "E": 4, "Dk": 8, "Dv": 16, "r": 2, "C": 2, "H": 2, "m": 4}}}
TRAIN = {"steps": 6, "batch_size": 4, "seq_len": 32, "lr": 0.003, "eval_every": 0, "eval_batches": 2,
         "log_every": 0, "checkpoint_every": 0}


class CommandTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not ULTRAMEM:
            raise RuntimeError("pass --ultramem PATH or set ULTRAMEM_BIN")
        cls.tmp = tempfile.TemporaryDirectory(prefix="ultramem_package_cmd_")
        w = cls.w = cls.tmp.name
        os.makedirs(os.path.join(w, "corpus"))
        for d in range(1, 9):
            with open(os.path.join(w, "corpus", "doc%d.txt" % d), "w") as f:
                for i in range(120):
                    f.write("The people of district %d will vote on measure %d in the spring session.\n" % (d, i % 7))
        cls.data = os.path.join(w, "data")
        run([ULTRAMEM, "prepare", "--input", os.path.join(w, "corpus"), "--out", cls.data, "--vocab", "300",
             "--val-fraction", "0.25"])
        cls.config = os.path.join(w, "model.json")
        with open(cls.config, "w") as f:
            json.dump({"model": MODEL, "train": TRAIN}, f)
        cls.run_dir = os.path.join(w, "run")
        cls.train(cls.run_dir)
        cls.ckpt = os.path.join(cls.run_dir, "checkpoint.safetensors")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @classmethod
    def train(cls, out, *extra):
        return run([ULTRAMEM, "--threads", "1", "train", cls.config, "--data", cls.data, "--out", out] + list(extra))

    def cli_loss(self, ckpt, *extra):
        out = run([ULTRAMEM, "eval", ckpt, "--data", self.data, "--batch-size", "2", "--seq-len", "32"] + list(extra))
        return json.loads(out)["val_loss"]

    def assert_cpp_initialisation(self, model_config, config_path, name):
        """TransformerLM(model_config) holds the weights dump_model builds from config_path, bit for bit."""
        fresh = ultramem.TransformerLM(model_config)
        dump = os.path.join(self.w, name + ".safetensors")
        run([DUMP_MODEL, dump, "--config", config_path, "--dtype", "float"])
        t, _ = st.load(dump)
        for tensor_name, p in fresh.state_tensors().items():
            self.assertIn(tensor_name, t)
            self.assertTrue(torch.equal(p, t[tensor_name]), "%s differs from the C++ initialisation" % tensor_name)

    def assert_hf_export_loads(self, path, model, folder_name):
        """export --format hf of the checkpoint `path`: from_pretrained gives `model`'s logits, bit for bit.
        Returns the tokens it compared on."""
        folder = os.path.join(self.w, folder_name)
        run([ULTRAMEM, "export", path, folder, "--format", "hf"])
        b = ultramem.TransformerLM.from_pretrained(folder)
        tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            self.assertTrue(torch.equal(model(tokens), b(tokens)))
        return tokens

    def assert_quantized_tables_load(self, path, tag):
        """quantize --values bf16 / int8 of the checkpoint `path`: the CLI's loss stays within 0.02, a mapped
        table gives the copied one's loss, and Python loads the file with the CLI's loss."""
        for fmt in ("bf16", "int8"):
            q = os.path.join(self.w, "%s.%s.safetensors" % (tag, fmt))
            run([ULTRAMEM, "quantize", path, "--values", fmt, "--out", q, "--data", self.data])
            cli = self.cli_loss(q)
            self.assertLess(abs(cli - self.cli_loss(path)), 0.02, fmt)
            self.assertEqual(self.cli_loss(q, "--mmap"), cli, fmt + ": a mapped table gives the copied one's loss")
            loaded = ultramem.TransformerLM.from_checkpoint(q)
            self.assertEqual(loaded.value_format, fmt)
            self.assertLess(abs(self.py_loss(loaded) - cli), 1e-5, fmt)

    def py_loss(self, model):
        return model.evaluate(self.data, batch_size=2, seq_len=32)["val_loss"]

    def test_validation_loss_equals_the_cli_for_every_value_format(self):
        model = ultramem.TransformerLM.from_checkpoint(self.ckpt)
        self.assertEqual(model.value_format, "fp32")
        self.assertLess(abs(self.py_loss(model) - self.cli_loss(self.ckpt)), 1e-5)
        for fmt in ("bf16", "int8"):
            q = os.path.join(self.w, "ckpt.%s.safetensors" % fmt)
            run([ULTRAMEM, "quantize", self.ckpt, "--values", fmt, "--out", q, "--data", self.data])
            m = ultramem.TransformerLM.from_checkpoint(q)
            self.assertEqual(m.value_format, fmt)
            self.assertEqual(m.memories[0].values.dtype, {"bf16": torch.bfloat16, "int8": torch.int8}[fmt])
            self.assertLess(abs(self.py_loss(m) - self.cli_loss(q)), 1e-5, fmt)

    def test_sharded_run_loads_assembled(self):
        out = os.path.join(self.w, "run2")
        self.train(out, "--nproc", "2")
        path = os.path.join(out, "checkpoint.safetensors")
        ck = ultramem.read_checkpoint(path)
        self.assertEqual(ck.shard_world, 2)
        shards = [f for f in os.listdir(out) if f.startswith("checkpoint.") and ".rank" in f]
        self.assertEqual(len(shards), 2, shards)
        model = ultramem.TransformerLM.from_checkpoint(path)
        self.assertLess(abs(self.py_loss(model) - self.cli_loss(path)), 1e-5)
        # Saved from Python: one file the CLI evaluates the same; the shard files of its stem are gone.
        model.save(path)
        self.assertEqual([f for f in os.listdir(out) if f.startswith("checkpoint.") and ".rank" in f], [])
        self.assertLess(abs(self.py_loss(model) - self.cli_loss(path)), 1e-5)
        # A missing shard is an error naming the file.
        self.train(os.path.join(self.w, "run3"), "--nproc", "2")
        p3 = os.path.join(self.w, "run3")
        os.unlink(os.path.join(p3, [f for f in os.listdir(p3) if f.startswith("checkpoint.") and ".rank1-of-2" in f][0]))
        with self.assertRaisesRegex(ultramem.CheckpointError, "rank1-of-2.safetensors is missing"):
            ultramem.read_checkpoint(os.path.join(p3, "checkpoint.safetensors"))

    def test_round_trip_cpp_python_cpp_is_bit_identical(self):
        model = ultramem.TransformerLM.from_checkpoint(self.ckpt)
        py = os.path.join(self.w, "py.safetensors")
        model.save(py)
        back = os.path.join(self.w, "back.safetensors")
        run([ULTRAMEM, "consolidate", py, "--out", back])  # the C++ reader verifies it and writes it again
        a, b = ultramem.read_checkpoint(self.ckpt), ultramem.read_checkpoint(back)
        for part in ("model", "optim"):
            ta, tb = getattr(a, part), getattr(b, part)
            self.assertEqual(sorted(ta), sorted(tb), part)
            for k in ta:
                self.assertEqual(ta[k].dtype, tb[k].dtype, k)
                self.assertTrue(torch.equal(ta[k], tb[k]), "%s.%s differs after the round trip" % (part, k))
        self.assertTrue(torch.equal(a.rng, b.rng))
        self.assertEqual((a.model_config, a.train_config, a.trainer_state),
                         (b.model_config, b.train_config, b.trainer_state))
        self.assertEqual(self.cli_loss(py), self.cli_loss(self.ckpt))
        # The Python file is the C++ writer's layout: the large tables map (eval --mmap needs no copy).
        out = subprocess.run([ULTRAMEM, "eval", py, "--data", self.data, "--batch-size", "2", "--mmap"],
                             capture_output=True, text=True, timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertNotIn("copied instead of mapped", out.stderr)

    def test_resume_from_a_checkpoint_python_rewrote(self):
        whole, split = os.path.join(self.w, "whole"), os.path.join(self.w, "split")
        self.train(whole)
        self.train(split, "--stop-at", "3")
        path = os.path.join(split, "checkpoint.safetensors")
        model = ultramem.TransformerLM.from_checkpoint(path)
        self.assertTrue(model.checkpoint.resumable)
        model.save(path)
        out = self.train(split, "--resume")
        self.assertIn("resumed", out)
        a = ultramem.read_checkpoint(os.path.join(whole, "checkpoint.safetensors"))
        b = ultramem.read_checkpoint(path)
        for k in a.model:
            self.assertTrue(torch.equal(a.model[k], b.model[k]), "%s differs from the uninterrupted run" % k)
        # weights_only drops the training state: such a file evaluates but cannot be resumed.
        weights = os.path.join(self.w, "weights", "checkpoint.safetensors")
        os.makedirs(os.path.dirname(weights))
        ultramem.TransformerLM.from_checkpoint(path, weights_only=True).save(weights)
        self.assertFalse(ultramem.read_checkpoint(weights).resumable)
        self.assertEqual(self.cli_loss(weights), self.cli_loss(path))

    def test_fresh_python_model_is_the_cpp_initialisation(self):
        cfg = dict(TRAIN, steps=1)
        path = os.path.join(self.w, "init.json")
        with open(path, "w") as f:
            json.dump({"model": MODEL, "train": cfg}, f)
        model = ultramem.TransformerLM(MODEL)
        saved = os.path.join(self.w, "fresh.safetensors")
        model.save(saved)
        # The CLI evaluates the Python-built model; a Python-built model equals the C++ one before training.
        ck = ultramem.read_checkpoint(saved)
        self.assertIsNone(ck.train_config)
        self.assertEqual(set(ck.model), set(ultramem.read_checkpoint(self.ckpt).model))
        self.assertLess(abs(self.py_loss(model) - self.cli_loss(saved)), 1e-5)
        # The same seed gives the C++ initialisation, bit for bit (dump_model dumps the weights it built).
        self.assert_cpp_initialisation(MODEL, path, "cpp_init")

    def test_greedy_generation_equals_the_cli(self):
        model = ultramem.TransformerLM.from_checkpoint(self.ckpt)
        self.assertIsNotNone(model.tokenizer, "python3-sentencepiece and the run's tokenizer.model are needed")
        prompts = os.path.join(self.w, "prompts.txt")
        with open(prompts, "w") as f:
            f.write("The people of district\nmeasure 3 in\n")
        out = run([ULTRAMEM, "generate", self.ckpt, "--prompts-file", prompts, "--temperature", "0",
                   "--max-tokens", "12"])
        lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
        self.assertEqual(len(lines), 2)
        for rec in lines:
            self.assertEqual(model.generate(rec["prompt"], max_new_tokens=12, temperature=0), rec["completion"],
                             rec["prompt"])
        ids = model.generate([2, 5, 9], max_new_tokens=5, temperature=0.8, seed=3)
        self.assertEqual(len(ids), 5)
        self.assertEqual(ids, model.generate([2, 5, 9], max_new_tokens=5, temperature=0.8, seed=3), "seeded")
        with self.assertRaisesRegex(ValueError, "token id 300 at \\[0, 1\\] is outside"):
            model(torch.tensor([[1, 300]]))
        with self.assertRaisesRegex(ValueError, "exceed max_seq_len = 32"):
            model(torch.zeros(1, 33, dtype=torch.int64))

    def test_export_hf_loads_with_from_pretrained(self):
        folder = os.path.join(self.w, "hf")
        summary = json.loads(run([ULTRAMEM, "export", self.ckpt, folder, "--format", "hf"]))
        self.assertIsNotNone(summary["tokenizer"])
        for f in ("config.json", "model.safetensors", "tokenizer.model", "generation_config.json"):
            self.assertTrue(os.path.isfile(os.path.join(folder, f)), f)
        t, meta = st.load(os.path.join(folder, "model.safetensors"))
        ck = ultramem.read_checkpoint(self.ckpt)
        D = MODEL["d_model"]
        # [out, in] matrices with descriptive names.
        self.assertTrue(torch.equal(t["layers.0.self_attn.k_proj.weight"], ck.model["blocks.0.attn.wqkv"][:, D:2 * D].t()))
        self.assertTrue(torch.equal(t["layers.0.mlp.down_proj.weight"], ck.model["blocks.0.ffn.w_out"].t()))
        self.assertTrue(torch.equal(t["layers.1.moe.experts.3.up_proj.weight"],
                                    ck.model["blocks.1.moe.w_in"][3][:, 64 // 2:].t()))
        self.assertEqual(tuple(t["memories.0.out_proj.weight"].shape), (D, 4 * 16))
        self.assertFalse(any(k.startswith("blocks.") for k in t))
        a = ultramem.TransformerLM.from_checkpoint(self.ckpt)
        b = ultramem.TransformerLM.from_pretrained(folder)
        for name, p in a.state_tensors().items():
            self.assertTrue(torch.equal(p, b.state_tensors()[name]), name)
        tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            self.assertTrue(torch.equal(a(tokens), b(tokens)))
        self.assertEqual(b.generate("The people", max_new_tokens=6, temperature=0),
                         a.generate("The people", max_new_tokens=6, temperature=0))
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        self.assertEqual((cfg["hidden_size"], cfg["num_hidden_layers"], cfg["model_type"]), (D, 2, "ultramem"))
        # A sharded run is consolidated on export.
        out = os.path.join(self.w, "run_sharded_export")
        self.train(out, "--nproc", "2")
        folder2 = os.path.join(self.w, "hf2")
        summary = json.loads(run([ULTRAMEM, "export", os.path.join(out, "checkpoint.safetensors"), folder2,
                                  "--format", "hf"]))
        self.assertEqual(summary["shards_consolidated"], 2)
        c = ultramem.TransformerLM.from_pretrained(folder2)
        self.assertLess(abs(self.py_loss(c) - self.cli_loss(os.path.join(out, "checkpoint.safetensors"))), 1e-5)
        with self.assertRaisesRegex(ultramem.ExportFormatError, "no config.json"):
            ultramem.TransformerLM.from_pretrained(self.w)

    def test_ultramem_v2_checkpoint_loads_evaluates_and_exports(self):
        model_v2 = dict(MODEL, name="py-tiny-v2", ffn="dense",
                        memory={"kind": "ultramem_v2", "placement": "1:1/2:2",
                                "ultramem_v2": {"n": 8, "E": 4, "Dk": 8, "Dv": 12, "Dp": 4, "r": 2, "C": 2, "H": 1,
                                                "m": 4, "m_first": 4}})
        cfg = os.path.join(self.w, "v2.json")
        with open(cfg, "w") as f:
            json.dump({"model": model_v2, "train": dict(TRAIN, value_lr_T=1.0)}, f)
        out = os.path.join(self.w, "run_v2")
        run([ULTRAMEM, "--threads", "1", "train", cfg, "--data", self.data, "--out", out])
        path = os.path.join(out, "checkpoint.safetensors")
        model = ultramem.TransformerLM.from_checkpoint(path)
        self.assertTrue(all(m.v2_forward for m in model.memories))
        self.assertLess(abs(self.py_loss(model) - self.cli_loss(path)), 1e-5)
        # A fresh Python V2 model is the C++ initialisation too.
        self.assert_cpp_initialisation(model_v2, cfg, "v2_init")
        # Without Dp the pre-values follow the given Dv (1 : 3), as in C++ (UltraMemV2Config test).
        no_dp = json.loads(json.dumps(model_v2))
        del no_dp["memory"]["ultramem_v2"]["Dp"]
        self.assertEqual(ultramem.TransformerLM(no_dp).memories[0].config["Dp"], 12 // 3)
        tokens = self.assert_hf_export_loads(path, model, "hf_v2")
        # The no-grad forward is the fused op with the V2 switches: the autograd forward's logits.
        with torch.no_grad():
            fused = model(tokens)
        self.assertTrue(torch.allclose(fused, model(tokens).detach(), rtol=1e-5, atol=1e-5))
        # quantize stores the V2 values as bf16 / int8; eval and Python load them with the same loss.
        self.assert_quantized_tables_load(path, "v2")

    def test_engram_checkpoint_loads_evaluates_and_generates_like_the_cli(self):
        model_e = dict(MODEL, name="py-tiny-engram", ffn="dense",
                       memory={"kind": "engram", "placement": "1:1/2:2",
                               "engram": {"heads": 2, "d_e": 16, "rows": 97, "kernel": 3, "conv_std": 0.2}})
        cfg = os.path.join(self.w, "engram.json")
        with open(cfg, "w") as f:
            json.dump({"model": model_e, "train": TRAIN}, f)
        out = os.path.join(self.w, "run_engram")
        run([ULTRAMEM, "--threads", "1", "train", cfg, "--data", self.data, "--out", out])
        path = os.path.join(out, "checkpoint.safetensors")
        model = ultramem.TransformerLM.from_checkpoint(path)
        self.assertTrue(all(isinstance(m, ultramem.Engram) for m in model.memories))
        self.assertEqual(len(model.memories), 2)
        self.assertLess(abs(self.py_loss(model) - self.cli_loss(path)), 1e-5)
        # A fresh Python Engram model is the C++ initialisation, bit for bit.
        self.assert_cpp_initialisation(model_e, cfg, "engram_init")
        # Greedy decoding through the KV cache (each Engram memory's state in it) gives the CLI's text.
        prompts = os.path.join(self.w, "engram_prompts.txt")
        with open(prompts, "w") as f:
            f.write("The people of district\nmeasure 3 in\n")
        gen = run([ULTRAMEM, "generate", path, "--prompts-file", prompts, "--temperature", "0", "--max-tokens", "12"])
        lines = [json.loads(l) for l in gen.splitlines() if l.startswith("{")]
        self.assertEqual(len(lines), 2)
        for rec in lines:
            self.assertEqual(model.generate(rec["prompt"], max_new_tokens=12, temperature=0), rec["completion"],
                             rec["prompt"])
        # A saved model reloads in the CLI with the same loss.
        again = os.path.join(self.w, "engram_py.safetensors")
        model.save(again)
        self.assertLess(abs(self.cli_loss(again) - self.cli_loss(path)), 1e-6)
        # export --format hf writes the Engram memories; the folder loads with the same logits.
        self.assert_hf_export_loads(path, model, "hf_engram")
        # quantize stores the Engram tables as bf16 / int8; eval and Python load them with the same loss.
        self.assert_quantized_tables_load(path, "engram")

    def test_example_trains_and_its_loss_falls(self):
        out = run([sys.executable, os.path.join(ROOT, "examples", "train_memory_layer.py"), "--data", self.data,
                   "--steps", "40", "--batch-size", "8", "--seq-len", "32", "--log-every", "5"], timeout=600)
        lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
        summary = lines[-1]
        self.assertTrue(summary["summary"])
        self.assertLess(summary["final_loss"], 0.7 * summary["first_loss"], summary)
        self.assertGreater(lines[-2]["mem.coverage"], 0.0)


class InstallTest(unittest.TestCase):
    def test_pip_install_target_imports_in_a_fresh_interpreter(self):
        with tempfile.TemporaryDirectory(prefix="ultramem_pip_") as tmp:
            target = os.path.join(tmp, "site")
            env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
            run([sys.executable, "-m", "pip", "install", os.path.join(ROOT, "python"), "--no-deps", "--no-index",
                 "--target", target, "-q"], env=env, timeout=300)
            self.assertTrue(os.path.isfile(os.path.join(target, "ultramem", "libultramem_ops.so")),
                            "the wheel carries the op library")
            code = ("import torch, ultramem\n"
                    "m = ultramem.UltraMem(D=8, n=4, E=4, Dk=4, Dv=4, m=2, m_first=2)\n"
                    "y = m(torch.randn(3, 8)); y.sum().backward()\n"
                    "print(ultramem.__file__); print(ultramem.library_path()); print(tuple(y.shape))\n")
            env = {k: v for k, v in os.environ.items() if k not in ("ULTRAMEM_OPS_LIB", "PYTHONPATH")}
            env["PYTHONPATH"] = target
            out = run([sys.executable, "-c", code], env=env, cwd=tmp).splitlines()
            self.assertTrue(out[0].startswith(target), out)
            self.assertEqual(out[1], os.path.join(target, "ultramem", "libultramem_ops.so"))
            self.assertEqual(out[2], "(3, 8)")


if __name__ == "__main__":
    warnings.simplefilter("ignore", UserWarning)
    unittest.main(verbosity=1)
