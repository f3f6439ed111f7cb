"""Safetensors files in pure Python (no `safetensors` package), as ultramem's C++ writes and reads them.

Format: 8-byte little-endian header length L, L bytes of JSON header
{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the data
buffer; offsets are relative to the buffer and the tensors tile it exactly. The writer pads the header
with spaces so that the buffer starts at a multiple of 64 bytes in the file (src/ultramem/io/safetensors.h),
which lets the C++ side memory-map tables written here.

Checkpoints (docs/training.md) add a checksum: `checkpoint_checksum`, `read_checkpoint_file`,
`save_checkpoint_file`.
"""
import json
import os
import struct
import tempfile
import zlib
from collections import OrderedDict

import torch

# Every dtype ultramem::io::save_safetensors writes (src/ultramem/io/safetensors.cpp).
DTYPES = OrderedDict([
    ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
    ("I64", torch.int64), ("I32", torch.int32), ("I16", torch.int16), ("I8", torch.int8),
    ("U8", torch.uint8), ("BOOL", torch.bool),
])
_NAMES = {v: k for k, v in DTYPES.items()}
ALIGNMENT = 64


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file (or not a valid checkpoint); the message names it."""


def dtype_name(dtype):
    if dtype not in _NAMES:
        raise SafetensorsError("dtype %s cannot be stored (one of %s)" % (dtype, ", ".join(map(str, DTYPES.values()))))
    return _NAMES[dtype]


def _no_duplicates(pairs):
    d = OrderedDict()
    for k, v in pairs:
        if k in d:
            raise SafetensorsError("duplicate key %r in the header" % k)
        d[k] = v
    return d


def _elem_size(dtype):
    return torch.empty((), dtype=dtype).element_size()


def _raw(t):
    """The little-endian bytes of a contiguous CPU tensor."""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _read_header(f, path, size):
    head = f.read(8)
    if len(head) < 8:
        raise SafetensorsError("%s: file too short" % path)
    (hlen,) = struct.unpack("<Q", head)
    if hlen > size - 8:
        raise SafetensorsError("%s: header length %d larger than the file" % (path, hlen))
    try:
        header = json.loads(f.read(hlen).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError("%s: invalid JSON header: %s" % (path, e))
    if not isinstance(header, dict):
        raise SafetensorsError("%s: header is not an object" % path)
    return header, 8 + hlen


def load(path):
    """Returns (OrderedDict name -> tensor in data order, metadata dict). Every check of the C++ reader:
    known dtypes, offsets consistent with the shapes, tensors tiling the buffer without gaps."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as e:
        raise SafetensorsError("%s: cannot open: %s" % (path, e.strerror or e))
    with f:
        header, data_start = _read_header(f, path, size)
        meta = header.pop("__metadata__", {}) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise SafetensorsError("%s: __metadata__ must map strings to strings" % path)
        entries = []
        for name, e in header.items():
            if not isinstance(e, dict) or e.get("dtype") not in DTYPES:
                raise SafetensorsError("%s: tensor %r: bad entry or unknown dtype" % (path, name))
            shape, offs = e.get("shape"), e.get("data_offsets")
            if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                    or not isinstance(offs, list) or len(offs) != 2
                    or not all(isinstance(o, int) and o >= 0 for o in offs)):
                raise SafetensorsError("%s: tensor %r: bad shape or data_offsets" % (path, name))
            dtype = DTYPES[e["dtype"]]
            numel = 1
            for s in shape:
                numel *= s
            if offs[1] - offs[0] != numel * _elem_size(dtype):
                raise SafetensorsError("%s: tensor %r: data_offsets inconsistent with shape" % (path, name))
            entries.append((offs[0], offs[1], name, dtype, shape))
        entries.sort(key=lambda t: (t[0], t[1]))
        pos = 0
        for b, e, name, _, _ in entries:
            if b != pos:
                raise SafetensorsError("%s: tensor %r: data_offsets overlap or leave a gap" % (path, name))
            pos = e
        if pos != size - data_start:
            raise SafetensorsError("%s: tensors cover %d of %d data bytes" % (path, pos, size - data_start))
        out = OrderedDict()
        for b, e, name, dtype, shape in entries:
            if e > b:
                buf = bytearray(e - b)
                f.seek(data_start + b)
                if f.readinto(buf) != e - b:
                    raise SafetensorsError("%s: tensor %r: file truncated" % (path, name))
                t = torch.frombuffer(buf, dtype=dtype)
            else:
                t = torch.empty(0, dtype=dtype)
            out[name] = t.reshape(shape)
    return out, dict(meta)


def save(path, tensors, metadata=None):
    """tensors: iterable of (name, tensor) or a dict, written in the given order; the file is replaced
    atomically (temporary file, fsync, rename), so a crash leaves the previous file."""
    path = os.fspath(path)
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    header = OrderedDict()
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    prepared = []
    for name, t in items:
        t = t.detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        header[name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        prepared.append(t)
        pos += n
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((ALIGNMENT - (8 + len(h)) % ALIGNMENT) % ALIGNMENT)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(h)))
            f.write(h)
            for t in prepared:
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def checkpoint_checksum(tensors, metadata):
    """The checksum of an ultramem checkpoint (docs/training.md): zlib CRC-32 over, for every tensor in
    file order, its name, dtype name and shape ("2,3", "" for a scalar), each followed by a NUL byte,
    then its raw bytes; then every metadata entry except "checksum", in key order, as key NUL value NUL.
    tensors: iterable of (name, tensor) or a dict, in file order. Returns "crc32:<8 hex digits>"."""
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    crc = 0
    for name, t in items:
        t = t.detach().contiguous().cpu()
        for s in (name, dtype_name(t.dtype), ",".join(str(d) for d in t.shape)):
            crc = zlib.crc32(s.encode("utf-8") + b"\0", crc)
        if t.numel():
            crc = zlib.crc32(memoryview(t.reshape(-1).view(torch.uint8).numpy()), crc)
    for k in sorted(metadata):
        if k != "checksum":
            crc = zlib.crc32(k.encode("utf-8") + b"\0" + metadata[k].encode("utf-8") + b"\0", crc)
    return "crc32:%08x" % crc


def read_checkpoint_file(path):
    """load() plus the checkpoint checksum check when the file has one.
    Returns (OrderedDict name -> tensor in file order, metadata dict)."""
    tensors, meta = load(path)
    if "checksum" in meta:
        actual = checkpoint_checksum(tensors, meta)
        if meta["checksum"] != actual:
            raise SafetensorsError("%s: checksum mismatch (stored %s, computed %s): the file is corrupt"
                                   % (path, meta["checksum"], actual))
    return tensors, meta


def aligned_order(items):
    """The C++ checkpoint writer's order: tensors whose size is a nonzero multiple of 64 bytes first (each
    then starts 64-byte aligned, so the C++ side can memory-map it), the others after, each group in the
    given order."""
    def fits(t):
        n = t.numel() * t.element_size()
        return n > 0 and n % ALIGNMENT == 0
    return [it for it in items if fits(it[1])] + [it for it in items if not fits(it[1])]


def save_checkpoint_file(path, tensors, metadata):
    """save() with metadata["checksum"] set to checkpoint_checksum of what is written. Returns the checksum."""
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    meta = {str(k): str(v) for k, v in metadata.items() if k != "checksum"}
    meta["checksum"] = checkpoint_checksum(items, meta)
    save(path, items, meta)
    return meta["checksum"]
