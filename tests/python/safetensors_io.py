"""Tiny pure-Python safetensors reader and writer (no `safetensors` package), for the tests.

Format: 8-byte little-endian header length L, L bytes of JSON header
{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the data
buffer; offsets are relative to the buffer and the tensors tile it exactly.

read_checkpoint / save_checkpoint add the checksum of ultramem checkpoints (docs/training.md, whose
Python reader is the same code in a few lines).
"""
import json
import struct
import zlib
from collections import OrderedDict

import torch

# Every dtype ultramem::io::save_safetensors writes (src/ultramem/io/safetensors.cpp, kDtypes).
DTYPES = OrderedDict([
    ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
    ("I64", torch.int64), ("I32", torch.int32), ("I16", torch.int16), ("I8", torch.int8),
    ("U8", torch.uint8), ("BOOL", torch.bool),
])
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    pass


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


def read_header(path):
    """Returns (header dict, data bytes) after validating the framing."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise SafetensorsError("%s: file too short" % path)
    (hlen,) = struct.unpack("<Q", blob[:8])
    if hlen > len(blob) - 8:
        raise SafetensorsError("%s: header length %d larger than the file" % (path, hlen))
    try:
        header = json.loads(blob[8:8 + hlen].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError("%s: invalid JSON header: %s" % (path, e))
    if not isinstance(header, dict):
        raise SafetensorsError("%s: header is not an object" % path)
    return header, blob[8 + hlen:]


def load(path):
    """Returns (OrderedDict name -> tensor in data order, metadata dict)."""
    header, data = read_header(path)
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SafetensorsError("%s: __metadata__ must map strings to strings" % path)
    entries = []
    for name, e in header.items():
        if not isinstance(e, dict) or e.get("dtype") not in DTYPES:
            raise SafetensorsError("%s: tensor %r: bad entry or unknown dtype" % (path, name))
        shape = e.get("shape")
        offs = e.get("data_offsets")
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
    if pos != len(data):
        raise SafetensorsError("%s: tensors cover %d of %d data bytes" % (path, pos, len(data)))
    out = OrderedDict()
    for b, e, name, dtype, shape in entries:
        raw = bytearray(data[b:e])
        if e > b:
            t = torch.frombuffer(raw, dtype=dtype).clone()
        else:
            t = torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape)
    return out, dict(meta)


def save(path, tensors, metadata=None):
    """tensors: iterable of (name, tensor) or a dict. Writes in the given order."""
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    header = OrderedDict()
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, pos = [], 0
    for name, t in items:
        t = t.detach().contiguous().cpu()
        raw = _raw(t)
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for c in chunks:
            f.write(c)


def checkpoint_checksum(tensors, metadata):
    """The checksum of an ultramem checkpoint (docs/training.md): zlib CRC-32 over, for every tensor in
    file order, its name, dtype name and shape ("2,3", "" for a scalar), each followed by a NUL byte,
    then its raw bytes; then every metadata entry except "checksum", in key order, as key NUL value NUL.
    tensors: iterable of (name, tensor) or a dict, in file order. Returns "crc32:<8 hex digits>"."""
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    crc = 0
    for name, t in items:
        t = t.detach().contiguous().cpu()
        for s in (name, _NAMES[t.dtype], ",".join(str(d) for d in t.shape)):
            crc = zlib.crc32(s.encode("utf-8") + b"\0", crc)
        crc = zlib.crc32(_raw(t), crc)
    for k in sorted(metadata):
        if k != "checksum":
            crc = zlib.crc32(k.encode("utf-8") + b"\0" + metadata[k].encode("utf-8") + b"\0", crc)
    return "crc32:%08x" % crc


def read_checkpoint(path):
    """load() plus the checkpoint checksum check when the file has one (weights-only and quantised
    checkpoints included: value tables in F32, BF16 or I8 with an F32 values_scale).
    Returns (OrderedDict name -> tensor in file order, metadata dict)."""
    tensors, meta = load(path)
    if "checksum" in meta:
        actual = checkpoint_checksum(tensors, meta)
        if meta["checksum"] != actual:
            raise SafetensorsError("%s: checksum mismatch (stored %s, computed %s): the file is corrupt"
                                   % (path, meta["checksum"], actual))
    return tensors, meta


def save_checkpoint(path, tensors, metadata):
    """save() with metadata["checksum"] set to checkpoint_checksum of what is written."""
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    meta = {str(k): str(v) for k, v in metadata.items() if k != "checksum"}
    meta["checksum"] = checkpoint_checksum(items, meta)
    save(path, items, meta)
    return meta["checksum"]
