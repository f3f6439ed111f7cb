// Data preparation: corpus -> split -> tokenizer -> token shards + manifest (the `ultramem prepare` step).
//
// prepare() reads the corpus (corpus.h), splits its documents (split.h), trains the tokenizer on the
// train split only (tokenizer.h), encodes both splits into token shards (shard.h, each document followed
// by EOS) and writes the manifest last (prepared.h). If the output directory already holds a valid
// preparation made from the same input files (same fingerprint) with the same options and tokenizer
// settings, it is reused as is and nothing is rewritten.
#pragma once
#include <cstdint>
#include <ostream>
#include <string>

#include "ultramem/data/prepared.h"

namespace ultramem::data {

inline constexpr const char* kDefaultCorpusDir = "data/corpus/sotu";  // fetched by scripts/fetch_corpus.sh
inline constexpr const char* kDefaultPreparedRoot = "data/prepared";

struct PrepareOptions {
  std::string input;           // corpus directory or file; empty = kDefaultCorpusDir
  std::string out_dir;         // empty = data/prepared/<input name>-v<vocab_size>, e.g. data/prepared/sotu-v8192
  int64_t vocab_size = 8192;   // tokenizer vocabulary, in [260, 2^30]
  double val_fraction = 0.05;  // expected fraction of documents in the validation split, in (0, 1)
  uint64_t seed = 0;           // split and tokenizer seed
  bool force = false;          // rebuild even when the outputs could be reused
  void validate() const;       // std::invalid_argument naming the field
};

std::string resolved_input(const PrepareOptions& options);    // input or the default corpus directory
std::string resolved_out_dir(const PrepareOptions& options);  // out_dir or the default derived from it

// Runs the preparation (see above), logging progress to `log`, and returns the validated result
// (PreparedData::reused tells whether existing outputs were kept). Throws std::invalid_argument for bad
// options and std::runtime_error for bad or missing input (the default corpus missing says to run
// scripts/fetch_corpus.sh) or output that cannot be written.
PreparedData prepare(const PrepareOptions& options, std::ostream& log);

}  // namespace ultramem::data
