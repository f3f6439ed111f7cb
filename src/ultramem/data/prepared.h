// A prepared data directory (written by prepare(), see prepare.h) and its manifest.
//
// Layout of <dir>:
//   tokenizer.model  sentencepiece model (tokenizer.h)
//   train.bin        token shard of the train split (shard.h); each document's tokens then EOS
//   val.bin          token shard of the validation split, same format
//   manifest.json    written last; describes the above (format below)
//
// manifest.json:
//   {"format": "ultramem-prepared", "format_version": 1,
//    "vocab_size": V, "bos_id": 1, "eos_id": 2,
//    "options": {"input": path, "vocab_size": V, "val_fraction": f, "seed": s},
//    "tokenizer": {"file": "tokenizer.model", "fnv1a64": hex, "settings": {...}},
//    "input": {"fingerprint": hex, "files": n, "documents": n, "bytes": n},
//    "splits": {"train": {"file": "train.bin", "documents": n, "tokens": n, "bytes": n},
//               "val":   {"file": "val.bin",   "documents": n, "tokens": n, "bytes": n}}}
// tokens include one EOS per document; bytes are the documents' UTF-8 bytes (no EOS), the denominator of
// bits per byte: bpb = (sum of token losses in nats) / (ln 2 * bytes).
#pragma once
#include <cstdint>
#include <string>

namespace ultramem::data {

inline constexpr int kPreparedFormatVersion = 1;

struct SplitStats {
  int64_t documents = 0;
  int64_t tokens = 0;  // including one EOS per document
  int64_t bytes = 0;   // UTF-8 bytes of the documents' text
};

struct PreparedData {
  std::string dir;
  std::string tokenizer_path;  // <dir>/tokenizer.model
  std::string train_path;      // <dir>/train.bin
  std::string val_path;        // <dir>/val.bin
  std::string manifest_path;   // <dir>/manifest.json
  int64_t vocab_size = 0;      // of the trained tokenizer
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  SplitStats train, val;

  // As recorded in the manifest: what the data was prepared from.
  std::string input;                 // corpus path
  int64_t requested_vocab_size = 0;  // PrepareOptions::vocab_size
  double val_fraction = 0.0;
  uint64_t seed = 0;
  std::string input_fingerprint;     // hex of Corpus::fingerprint()
  uint64_t input_files = 0;
  std::string tokenizer_settings;    // the manifest's "tokenizer.settings" object, serialised
  std::string tokenizer_hash;        // hex FNV-1a 64 of tokenizer.model

  bool reused = false;  // prepare() found matching outputs and did not rebuild them
};

// Reads and validates <dir>/manifest.json and the files it names: the tokenizer loads and its hash and
// vocabulary match, both shards pass every TokenShard check (CRC, token range, vocab) and hold the
// recorded token counts. Throws std::runtime_error naming the file and the problem; a missing manifest
// says to run `ultramem prepare` first.
PreparedData load_prepared(const std::string& dir);

// Writes data.manifest_path (atomically) from `data`.
void write_manifest(const PreparedData& data);

}  // namespace ultramem::data
