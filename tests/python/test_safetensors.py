"""ultramem::io safetensors reader/writer (through `dump_layer --load / --write-dtypes`) against the
pure-Python reader and writer of the package (python/ultramem/safetensors.py), plus the reader's validation of corrupt files; and the Python checkpoint
reader of docs/training.md (CheckpointReaderTest, which needs no binary) on every dtype.

usage: python3 test_safetensors.py [--dump-layer PATH/dump_layer] [unittest args]   (or ULTRAMEM_DUMP_LAYER)
       python3 test_safetensors.py CheckpointReaderTest       (the checkpoint reader only, no build needed)
"""
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import unittest
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_args import take_arg  # noqa: E402
from ultramem import safetensors as safetensors_io  # noqa: E402



DUMP_LAYER = take_arg("--dump-layer", "ULTRAMEM_DUMP_LAYER")
ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
TRAINING_MD = os.path.join(ROOT, "docs", "training.md")
SAFETENSORS_CPP = os.path.join(ROOT, "src", "ultramem", "io", "safetensors.cpp")
DOC_PATH = '"runs/x/checkpoint.safetensors"'  # the path the documented snippet reads


def documented_reader_source():
    """The ```python block of docs/training.md that defines read_checkpoint, as written there."""
    with open(TRAINING_MD, encoding="utf-8") as f:
        text = f.read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def read_checkpoint(" in b]
    if len(blocks) != 1:
        raise AssertionError("%s: expected one python block defining read_checkpoint, found %d"
                             % (TRAINING_MD, len(blocks)))
    if blocks[0].count(DOC_PATH) != 1:
        raise AssertionError("%s: the reader snippet no longer reads %s" % (TRAINING_MD, DOC_PATH))
    return blocks[0]


def run_documented_reader(path):
    """Executes the documented snippet as written, reading `path`. Returns its namespace (DT,
    read_checkpoint, tensors, meta, weights, values)."""
    src = documented_reader_source().replace(DOC_PATH, repr(path))
    ns = {"__name__": "training_md_snippet"}
    exec(compile(src, TRAINING_MD + " (python block)", "exec"), ns)
    return ns


def run_documented_reader_namespace_only():
    """The documented snippet's definitions (DT, read_checkpoint) without its example call."""
    src = documented_reader_source()
    src = src[:src.index("tensors, meta = read_checkpoint(" + DOC_PATH)]
    ns = {"__name__": "training_md_snippet"}
    exec(compile(src, TRAINING_MD + " (python block)", "exec"), ns)
    return ns


def raw_file(path, header, data=b"", hlen=None, pad=True):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if hlen is None else hlen))
        f.write(h)
        f.write(data)


class SafetensorsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not DUMP_LAYER:
            raise RuntimeError("pass --dump-layer PATH or set ULTRAMEM_DUMP_LAYER")

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="ultramem_st_")
        self.dir = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def cpp(self, *args):
        return subprocess.run([DUMP_LAYER] + list(args), capture_output=True, text=True, timeout=60)

    def cpp_load_many(self, paths):
        """Runs `dump_layer --load` once on all paths. Returns (exit code, {path: result}) where result is
        ({name: (dtype, shape, sum)} in file order, meta) or the error message string."""
        res = self.cpp("--load", *paths)
        results, cur = {}, None
        for line in res.stdout.splitlines():
            kind, rest = line.split(" ", 1)
            if kind == "file":
                cur = rest
                results[cur] = ({}, {})
            elif kind == "error":
                results[cur] = rest
            elif kind == "tensor":
                name, dtype, shape, total = rest.split(" ")
                shape = [int(x) for x in shape.strip("[]").split(",") if x]
                results[cur][0][name] = (dtype, shape, float(total))
            else:
                k, v = rest.split(" ", 1)
                results[cur][1][k] = v
        self.assertEqual(list(results), list(paths), res.stderr)
        return res.returncode, results

    def cpp_load(self, path):
        rc, results = self.cpp_load_many([path])
        self.assertEqual(rc, 0, results[path])
        return results[path]

    def test_cpp_writes_python_reads(self):
        path = os.path.join(self.dir, "dtypes.safetensors")
        res = self.cpp("--write-dtypes", path)
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertEqual(os.listdir(self.dir), ["dtypes.safetensors"], "temporary file left behind")
        with open(path, "rb") as f:
            blob = f.read()
        (hlen,) = struct.unpack("<Q", blob[:8])
        self.assertEqual(hlen % 8, 0, "header must be padded to a multiple of 8")
        t, meta = safetensors_io.load(path)
        self.assertEqual(meta, {"purpose": "dtype round trip", "answer": "42"})
        base = (torch.arange(6, dtype=torch.float64) % 7 - 3).view(2, 3)
        expect = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
                  "i64": torch.int64, "i32": torch.int32, "i16": torch.int16, "i8": torch.int8}
        self.assertEqual(list(t)[:8], list(expect), "tensors come back in the order they were saved")
        for name, dt in expect.items():
            self.assertEqual(t[name].dtype, dt, name)
            self.assertTrue(torch.equal(t[name], base.to(dt)), name)
        self.assertTrue(torch.equal(t["u8"], (base + 3).to(torch.uint8)))
        self.assertTrue(torch.equal(t["bool"], torch.tensor([[False, True, False], [True, False, True]])))
        self.assertEqual(t["scalar"].shape, torch.Size([]))
        self.assertEqual(float(t["scalar"]), 2.5)
        self.assertEqual(tuple(t["empty"].shape), (0, 4))
        self.assertTrue(torch.equal(t["transposed"], torch.arange(6, dtype=torch.float32).view(2, 3).t()))
        # and the C++ reader reads back what the C++ writer wrote
        ct, cmeta = self.cpp_load(path)
        self.assertEqual(list(ct), list(t))
        self.assertEqual(cmeta, meta)
        # the documented checkpoint reader (docs/training.md) reads every dtype of the C++ writer
        # (this file has no checksum, so it skips that check)
        ns = run_documented_reader(path)
        self.assertEqual(ns["meta"], meta)
        self.assertEqual(list(ns["tensors"]), list(t))
        for name, want in t.items():
            got = ns["tensors"][name]
            self.assertEqual(got.dtype, want.dtype, name)
            self.assertTrue(torch.equal(got, want), name)

    def test_python_writes_cpp_reads(self):
        path = os.path.join(self.dir, "py.safetensors")
        g = torch.Generator().manual_seed(0)
        tensors = [
            ("weight", torch.randn(3, 5, generator=g, dtype=torch.float64)),
            ("a.b.c", torch.randn(7, generator=g)),
            ("idx", torch.randint(-100, 100, (4, 2, 3), generator=g)),
            ("half", torch.randn(5, generator=g).half()),
            ("mask", torch.tensor([True, False, True])),
            ("nothing", torch.zeros(2, 0, dtype=torch.int32)),
        ]
        safetensors_io.save(path, tensors, {"step": "17", "note": "hello world"})
        ct, meta = self.cpp_load(path)
        self.assertEqual(meta, {"step": "17", "note": "hello world"})
        self.assertEqual(list(ct), [n for n, _ in tensors])
        names = {"Double": torch.float64, "Float": torch.float32, "Long": torch.int64, "Half": torch.float16,
                 "Bool": torch.bool, "Int": torch.int32}
        for name, t in tensors:
            dtype, shape, total = ct[name]
            self.assertEqual(names[dtype], t.dtype, name)
            self.assertEqual(shape, list(t.shape), name)
            self.assertAlmostEqual(total, float(t.double().sum()), places=9, msg=name)

    def test_rewrite_in_place(self):
        path = os.path.join(self.dir, "x.safetensors")
        safetensors_io.save(path, [("a", torch.ones(3))])
        res = self.cpp("--write-dtypes", path)  # atomically replaces the file
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertEqual(os.listdir(self.dir), ["x.safetensors"])
        t, _ = safetensors_io.load(path)
        self.assertIn("f64", t)
        self.assertNotIn("a", t)

    def test_write_into_missing_directory_fails(self):
        path = os.path.join(self.dir, "no", "such", "dir.safetensors")
        res = self.cpp("--write-dtypes", path)
        self.assertNotEqual(res.returncode, 0)
        self.assertIn(path, res.stderr)

    def bad_file(self, name, words, header=None, data=b"", hlen=None, blob=None, pad=True):
        path = os.path.join(self.dir, name + ".safetensors")
        if blob is not None:
            with open(path, "wb") as f:
                f.write(blob)
        else:
            raw_file(path, header, data, hlen, pad)
        self.bad.append((name, path, words))

    def test_corrupt_files(self):
        ok = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]}}
        data = bytes(24)
        self.bad = []
        # sanity: the unmodified file is accepted by both readers
        good = os.path.join(self.dir, "good.safetensors")
        raw_file(good, ok, data)
        self.assertEqual(list(safetensors_io.load(good)[0]), ["a", "b"])

        def with_entry(name, **kw):
            h = json.loads(json.dumps(ok))
            h[name].update(kw)
            return h

        self.bad_file("empty", ["too short"], blob=b"")
        self.bad_file("short", ["too short"], blob=b"\x10\x00\x00")
        self.bad_file("hlen_huge", ["header length", "larger than"], ok, data, hlen=1 << 40)
        self.bad_file("hlen_past_end", ["larger than"], ok, b"", hlen=4096)
        self.bad_file("bad_json", ["invalid JSON"], b'{"a": {"dtype": "F32", ', data)
        self.bad_file("not_object", ["not an object"], b"[1, 2, 3]", b"")
        self.bad_file("unknown_dtype", ["\"a\"", "unknown", "F8"], with_entry("a", dtype="F8"), data)
        self.bad_file("out_of_range", ["\"b\"", "out of range"],
                      with_entry("b", data_offsets=[16, 24]), bytes(20))
        self.bad_file("truncated", ["out of range"], ok, data[:-3])
        self.bad_file("inconsistent", ["\"a\"", "needs 24"], with_entry("a", shape=[2, 3]), data)
        self.bad_file("end_before_begin", ["end < begin"], with_entry("b", data_offsets=[24, 16]), data)
        self.bad_file("overlap", ["overlap"],
                      with_entry("b", data_offsets=[8, 16], shape=[1]), data[:16])
        self.bad_file("gap", ["gap"],
                      with_entry("b", data_offsets=[24, 32]), bytes(32))
        self.bad_file("trailing", ["trailing"], ok, data + bytes(8))
        self.bad_file("negative_shape", ["non-negative"], with_entry("a", shape=[-2, -2]), data)
        self.bad_file("float_offsets", ["data_offsets"], with_entry("a", data_offsets=[0.0, 16]), data)
        self.bad_file("no_shape", ["shape"],
                      {"a": {"dtype": "F32", "data_offsets": [0, 16]}, "b": ok["b"]}, data)
        dup = (b'{"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},'
               b' "a": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]}}')
        self.bad_file("duplicate", ["duplicate tensor name", "\"a\""], dup, data)
        bad_meta = dict(ok, __metadata__={"step": 3})
        self.bad_file("bad_meta", ["__metadata__"], bad_meta, data)

        rc, results = self.cpp_load_many([good] + [path for _, path, _ in self.bad])
        self.assertEqual(rc, 1)
        self.assertIsInstance(results[good], tuple, "the good file must load")
        self.assertEqual(list(results[good][0]), ["a", "b"])
        for name, path, words in self.bad:
            msg = results[path]
            self.assertIsInstance(msg, str, "%s: C++ reader accepted a bad file: %s" % (name, msg))
            self.assertIn(path, msg, name)
            for w in words:
                self.assertIn(w, msg, name)
            with self.assertRaises(safetensors_io.SafetensorsError, msg=name):
                safetensors_io.load(path)


class CheckpointReaderTest(unittest.TestCase):
    """The Python checkpoint reader of docs/training.md (run as written there) and
    safetensors_io.read_checkpoint on checkpoints with every dtype, quantised value tables included.
    Needs no binary."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="ultramem_ckpt_")
        self.dir = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    @staticmethod
    def checksum(tensors, meta):
        """The documented checksum, written independently: one CRC-32 of the whole byte stream."""
        stream = b""
        for name, t in tensors:
            shape = ",".join(str(d) for d in t.shape)
            stream += b"".join(x.encode() + b"\0" for x in (name, safetensors_io._NAMES[t.dtype], shape))
            stream += t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        for k in sorted(meta):
            if k != "checksum":
                stream += k.encode() + b"\0" + meta[k].encode() + b"\0"
        return "crc32:%08x" % zlib.crc32(stream)

    def quantised_checkpoint(self, name="int8.safetensors"):
        """A weights-only checkpoint laid out as infer::save_weights writes one: an I8 value table with
        its F32 per-row scale, a BF16 one, and a tensor of every other dtype. Returns (path, tensors, meta)."""
        g = torch.Generator().manual_seed(3)
        v0 = torch.randn(16, 8, generator=g)
        scale = v0.abs().amax(1) / 127
        q = torch.clamp(torch.round(v0 / scale[:, None]), -127, 127).to(torch.int8)
        q[0, :3] = torch.tensor([-127, 127, 0], dtype=torch.int8)  # the extremes, sign included
        tensors = [
            ("model.embedding", torch.randn(64, 8, generator=g)),
            ("model.memories.0.values", q),
            ("model.memories.0.values_scale", scale),
            ("model.memories.0.perm", torch.randperm(64, generator=g)),
            ("model.memories.0.u", torch.randn(2, 2, generator=g, dtype=torch.float64)),
            ("model.memories.1.values", torch.randn(16, 8, generator=g).to(torch.bfloat16)),
            ("model.half", torch.randn(3, generator=g).half()),
            ("model.i32", torch.tensor([[-(2 ** 31), 2 ** 31 - 1]], dtype=torch.int32)),
            ("model.i16", torch.tensor([-(2 ** 15), 7, 2 ** 15 - 1], dtype=torch.int16)),
            ("model.mask", torch.tensor([True, False, True])),
            ("model.scalar", torch.tensor(2.5)),
            ("model.empty", torch.zeros(0, 4)),
            ("rng.cpu", torch.arange(250, 256, dtype=torch.uint8)),
        ]
        meta = {"format": "ultramem-checkpoint", "format_version": "1", "value_format": "int8",
                "model_config": json.dumps({"name": "q"})}
        meta["checksum"] = self.checksum(tensors, meta)
        path = os.path.join(self.dir, name)
        safetensors_io.save(path, tensors, meta)
        return path, tensors, meta

    def test_dtype_table_is_the_cpp_writers(self):
        with open(SAFETENSORS_CPP, encoding="utf-8") as f:
            cpp = dict(re.findall(r'\{"(\w+)",\s*at::k(\w+),\s*\d+\}', f.read()))
        at_to_torch = {"Double": torch.float64, "Float": torch.float32, "Half": torch.float16,
                       "BFloat16": torch.bfloat16, "Long": torch.int64, "Int": torch.int32, "Short": torch.int16,
                       "Char": torch.int8, "Byte": torch.uint8, "Bool": torch.bool}
        self.assertIn("I8", cpp, "kDtypes not found in " + SAFETENSORS_CPP)
        self.assertIn("BF16", cpp)
        want = {name: at_to_torch[t] for name, t in cpp.items()}
        doc_dt = run_documented_reader_namespace_only()["DT"]
        self.assertEqual(doc_dt, want, "docs/training.md DT must map every dtype of io::save_safetensors")
        self.assertEqual(dict(safetensors_io.DTYPES), want)

    def test_safetensors_io_checksum_is_the_documented_one(self):
        path, tensors, meta = self.quantised_checkpoint()
        self.assertEqual(safetensors_io.checkpoint_checksum(tensors, meta), meta["checksum"])
        other = os.path.join(self.dir, "other.safetensors")
        self.assertEqual(safetensors_io.save_checkpoint_file(other, tensors, meta), meta["checksum"])
        self.assertEqual(safetensors_io.read_checkpoint_file(other)[1], meta)

    def test_documented_reader_reads_int8_and_bf16_tables(self):
        path, tensors, meta = self.quantised_checkpoint()
        ns = run_documented_reader(path)
        self.assertEqual(ns["meta"], meta)
        self.assertEqual(list(ns["tensors"]), [n for n, _ in tensors], "file order")
        for name, want in tensors:
            got = ns["tensors"][name]
            self.assertEqual(got.dtype, want.dtype, name)
            self.assertEqual(tuple(got.shape), tuple(want.shape), name)
            self.assertTrue(torch.equal(got, want), name)
        w = ns["weights"]
        self.assertEqual(w["memories.0.values"].dtype, torch.int8)
        self.assertEqual(w["memories.1.values"].dtype, torch.bfloat16)
        self.assertNotIn("cpu", w)  # rng.cpu is not a weight
        # the float32 tables: int8 dequantised per row, bf16 widened exactly
        vals = ns["values"]
        self.assertEqual(sorted(vals), ["memories.0.values", "memories.1.values"])
        t = dict(tensors)
        deq = t["model.memories.0.values"].float() * t["model.memories.0.values_scale"][:, None]
        self.assertEqual(vals["memories.0.values"].dtype, torch.float32)
        self.assertTrue(torch.equal(vals["memories.0.values"], deq))
        self.assertEqual(float(vals["memories.0.values"][0, 0]), float(-127 * t["model.memories.0.values_scale"][0]))
        self.assertTrue(torch.equal(vals["memories.1.values"], t["model.memories.1.values"].float()))
        # and safetensors_io reads the same
        st, smeta = safetensors_io.read_checkpoint_file(path)
        self.assertEqual(smeta, meta)
        self.assertEqual(list(st), list(ns["tensors"]))
        for name in st:
            self.assertTrue(torch.equal(st[name], ns["tensors"][name]), name)

    def test_a_flipped_byte_fails_the_checksum(self):
        path, tensors, meta = self.quantised_checkpoint()
        with open(path, "rb") as f:
            blob = bytearray(f.read())
        (hlen,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + hlen])
        b, _ = header["model.memories.0.values"]["data_offsets"]
        blob[8 + hlen + b + 5] ^= 0x01  # one bit of the int8 table
        bad = os.path.join(self.dir, "bad.safetensors")
        with open(bad, "wb") as f:
            f.write(blob)
        with self.assertRaisesRegex(ValueError, "checksum mismatch"):
            run_documented_reader(bad)
        with self.assertRaisesRegex(safetensors_io.SafetensorsError, "checksum mismatch"):
            safetensors_io.read_checkpoint_file(bad)


if __name__ == "__main__":
    unittest.main(verbosity=1)
