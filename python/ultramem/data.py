"""Prepared data (`ultramem prepare`, docs/data.md) read from Python: token shards and evaluation batches.

A token shard (src/ultramem/data/shard.h) is a 32-byte header ("UMTOKENS", version 1, dtype 1 = uint16 /
2 = uint32, token count, vocab size, CRC-32 of the payload) and the tokens. Evaluation batches are the
C++ `data::eval_batches`: consecutive windows of seq_len + 1 tokens from the start of the split.
"""
import json
import os
import struct
import zlib

import numpy as np
import torch

MAGIC = b"UMTOKENS"


class DataError(ValueError):
    """A missing or corrupt prepared-data file; the message names it."""


def read_shard(path, expected_vocab_size=0):
    """The shard's tokens as an int64 tensor, after every check of the C++ reader (magic, version,
    dtype, size, CRC, token range, vocab size)."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise DataError("shard: %s: %s" % (path, e.strerror or e))
    if len(blob) < 32:
        raise DataError("shard: %s: too short for the header" % path)
    magic, version, dtype, count, vocab, crc = struct.unpack("<8sIIQII", blob[:32])
    if magic != MAGIC:
        raise DataError("shard: %s: wrong magic (not a token shard)" % path)
    if version != 1 or dtype not in (1, 2):
        raise DataError("shard: %s: unsupported version %d or dtype %d" % (path, version, dtype))
    width = 2 if dtype == 1 else 4
    if len(blob) != 32 + count * width:
        raise DataError("shard: %s: %d bytes for %d tokens (truncated or trailing bytes)" % (path, len(blob), count))
    payload = blob[32:]
    if zlib.crc32(payload) != crc:
        raise DataError("shard: %s: CRC mismatch (corrupted)" % path)
    if expected_vocab_size and vocab != expected_vocab_size:
        raise DataError("shard: %s: vocab_size %d, expected %d" % (path, vocab, expected_vocab_size))
    tokens = torch.from_numpy(np.frombuffer(payload, dtype="<u2" if dtype == 1 else "<u4").astype(np.int64))
    if count and int(tokens.max()) >= vocab:
        raise DataError("shard: %s: token id %d >= vocab_size %d" % (path, int(tokens.max()), vocab))
    return tokens


def read_manifest(data_dir):
    """The prepared folder's manifest.json as a dict."""
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        raise DataError("%s: no manifest; run `ultramem prepare` first" % path)
    with open(path) as f:
        return json.load(f)


def validation_tokens(data_dir):
    """The validation split of a prepared folder (int64 tensor) and its manifest."""
    manifest = read_manifest(data_dir)
    split = manifest["splits"]["val"]
    return read_shard(os.path.join(data_dir, split["file"]), manifest["vocab_size"]), manifest


def eval_batches(tokens, batch_size, seq_len, max_batches=0):
    """(inputs, targets) pairs of [batch_size, seq_len] int64, as data::eval_batches cuts them: window w
    starts at token w * seq_len, targets are the inputs shifted by one."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError("eval_batches: batch_size and seq_len must be >= 1, got %d and %d" % (batch_size, seq_len))
    windows = (tokens.numel() - 1) // seq_len if tokens.numel() >= 1 else 0
    n = windows // batch_size
    if n == 0:
        raise DataError("%d tokens are too few for one evaluation batch of %d x (seq_len + 1 = %d) tokens"
                        % (tokens.numel(), batch_size, seq_len + 1))
    if 0 < max_batches < n:
        n = max_batches
    for k in range(n):
        rows = [tokens[(k * batch_size + i) * seq_len:(k * batch_size + i) * seq_len + seq_len + 1]
                for i in range(batch_size)]
        block = torch.stack(rows)
        yield block[:, :-1].contiguous(), block[:, 1:].contiguous()
