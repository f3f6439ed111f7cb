"""ultramem checkpoints (docs/training.md, docs/distributed.md) read and written in Python.

A checkpoint is one safetensors file: "model.<name>" tensors, the optimizer state "optim.<name>.exp_avg",
".exp_avg_sq", "optim.step", the generator state "rng.cpu", and string metadata (format, format_version,
model_config, train_config, trainer_state, value_format, ..., checksum). A run trained on several ranks
keeps each rank's column slice of the memory values in shard files next to the main file, listed in its
"shards" metadata; `read_checkpoint` checks them against it and assembles the whole tensors.
"""
import json
import os
import re
from collections import OrderedDict

import torch

from . import safetensors as st

FORMAT = "ultramem-checkpoint"
SHARD_FORMAT = "ultramem-checkpoint-shard"
VERSION = 1
MODEL, OPTIM, RNG = "model.", "optim.", "rng.cpu"
# Metadata written from the Checkpoint's fields; the rest of `metadata` is written as it is.
_OWN_KEYS = ("format", "format_version", "model_config", "train_config", "trainer_state", "shards", "checksum")


class CheckpointError(ValueError):
    """A missing, corrupt, foreign or inconsistent checkpoint; the message names the file."""


class Checkpoint:
    """What a checkpoint holds.

    model: OrderedDict name -> tensor ("model." stripped, file order); optim: likewise ("optim." stripped);
    rng: uint8 tensor or None; model_config: dict; train_config, trainer_state: dict or None;
    metadata: the other string metadata (value_format, key_format, weight_format, ...); path: where it
    was read from (None for a new one); shard_world: > 0 when it was assembled from that many shards.
    """

    def __init__(self, model, model_config, optim=None, rng=None, train_config=None, trainer_state=None,
                 metadata=None, path=None, shard_world=0):
        self.model = OrderedDict(model)
        self.model_config = model_config
        self.optim = OrderedDict(optim or {})
        self.rng = rng
        self.train_config = train_config
        self.trainer_state = trainer_state
        self.metadata = dict(metadata or {})
        self.path = path
        self.shard_world = shard_world

    @property
    def resumable(self):
        """True when `ultramem train --resume` can continue from it (optimizer and trainer state present)."""
        return bool(self.optim) and self.trainer_state is not None and self.train_config is not None


def _json_meta(path, meta, key, required):
    if key not in meta:
        if required:
            raise CheckpointError("%s: metadata %r is missing: not an ultramem checkpoint" % (path, key))
        return None
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise CheckpointError("%s: metadata %r is not valid JSON: %s" % (path, key, e))


def _read_verified(path, fmt):
    try:
        tensors, meta = st.read_checkpoint_file(path)
    except st.SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    if meta.get("format") != fmt:
        raise CheckpointError("%s: format %r is not %r" % (path, meta.get("format"), fmt))
    if meta.get("format_version") != str(VERSION):
        raise CheckpointError("%s: format_version %r is not supported (this reader knows %d)"
                              % (path, meta.get("format_version"), VERSION))
    if "checksum" not in meta:
        raise CheckpointError("%s: no checksum" % path)
    return tensors, meta


def _assemble_shards(path, tensors, manifest):
    """Adds the manifest's split tensors, whole, to `tensors` (OrderedDict of file names)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        world, files, split = manifest["world"], manifest["files"], manifest["tensors"]
    except (KeyError, TypeError):
        raise CheckpointError("%s: metadata 'shards': expected an object with 'world', 'files' and 'tensors'" % path)
    if not isinstance(files, list) or len(files) != world:
        raise CheckpointError("%s: metadata 'shards': %r files for world %r" % (path, len(files), world))
    parts = []
    for rank, entry in enumerate(files):
        fp = os.path.join(folder, entry["file"])
        if not os.path.isfile(fp):
            raise CheckpointError("%s: shard file %s is missing (a sharded checkpoint needs every rank's file; copy "
                                  "them from the machines that wrote them)" % (path, fp))
        t, meta = _read_verified(fp, SHARD_FORMAT)
        if meta["checksum"] != entry["checksum"]:
            raise CheckpointError("%s: checksum %s differs from %s recorded by %s: a shard of another save"
                                  % (fp, meta["checksum"], entry["checksum"], path))
        info = _json_meta(fp, meta, "shard", True)
        if info.get("rank") != rank or info.get("world") != world:
            raise CheckpointError("%s: holds rank %r of %r, the manifest wants rank %d of %d"
                                  % (fp, info.get("rank"), info.get("world"), rank, world))
        parts.append(t)
    for name, e in split.items():
        cols = e["columns"]
        pieces = []
        for rank, (b, end) in enumerate(cols):
            if name not in parts[rank]:
                raise CheckpointError("%s: shard of rank %d lacks %r" % (path, rank, name))
            piece = parts[rank][name]
            if piece.dim() < 2 or piece.shape[1] != end - b:
                raise CheckpointError("%s: shard of rank %d: %r has shape %s, the manifest says columns [%d, %d)"
                                      % (path, rank, name, list(piece.shape), b, end))
            pieces.append(piece)
        whole = torch.cat(pieces, 1)
        if list(whole.shape) != e["shape"]:
            raise CheckpointError("%s: %r assembles to %s, the manifest says %s" % (path, name, list(whole.shape),
                                                                                   e["shape"]))
        tensors[name] = whole
    return world


def read_checkpoint(path):
    """Reads and verifies a checkpoint (format, version, checksum; for a sharded one every shard against
    the manifest) and returns a Checkpoint with every tensor whole. CheckpointError names the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError("%s: no such checkpoint file" % path)
    tensors, meta = _read_verified(path, FORMAT)
    model_config = _json_meta(path, meta, "model_config", True)
    shards = _json_meta(path, meta, "shards", False)
    world = _assemble_shards(path, tensors, shards) if shards is not None else 0
    model, optim, rng = OrderedDict(), OrderedDict(), None
    for name, t in tensors.items():
        if name.startswith(MODEL):
            model[name[len(MODEL):]] = t
        elif name.startswith(OPTIM):
            optim[name[len(OPTIM):]] = t
        elif name == RNG:
            rng = t
        else:
            raise CheckpointError("%s: unexpected tensor %r" % (path, name))
    extra = {k: v for k, v in meta.items() if k not in _OWN_KEYS}
    return Checkpoint(model, model_config, optim, rng, _json_meta(path, meta, "train_config", False),
                      _json_meta(path, meta, "trainer_state", False), extra, path, world)


def _dump(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def save_checkpoint(path, ckpt):
    """Writes `ckpt` as one file at `path` (a sharded checkpoint is consolidated), atomically, in the layout
    the C++ writer uses (64-byte aligned tensors first), and removes the shard files of an earlier sharded
    save at the same path, which no longer referenced. Returns the checksum."""
    path = os.fspath(path)
    items = [(MODEL + k, t) for k, t in ckpt.model.items()] + [(OPTIM + k, t) for k, t in ckpt.optim.items()]
    if ckpt.rng is not None:
        items.append((RNG, ckpt.rng))
    meta = {k: v for k, v in ckpt.metadata.items() if k not in _OWN_KEYS}
    meta.update(format=FORMAT, format_version=str(VERSION), model_config=_dump(ckpt.model_config))
    if ckpt.train_config is not None:
        meta["train_config"] = _dump(ckpt.train_config)
    if ckpt.trainer_state is not None:
        meta["trainer_state"] = _dump(ckpt.trainer_state)
    checksum = st.save_checkpoint_file(path, st.aligned_order(items), meta)
    remove_shard_files(path)
    return checksum


def remove_shard_files(path):
    """Deletes "<stem>.step<S>.<token>.rank<r>-of-<W>.safetensors" next to `path` (checkpoint::remove_shard_files)."""
    folder = os.path.dirname(os.path.abspath(path))
    stem = os.path.basename(path)
    if stem.endswith(".safetensors"):
        stem = stem[:-len(".safetensors")]
    pattern = re.compile(re.escape(stem) + r"\.step\d+\.[0-9A-Za-z]+\.rank\d+-of-\d+\.safetensors$")
    for name in os.listdir(folder):
        if pattern.match(name):
            os.unlink(os.path.join(folder, name))
