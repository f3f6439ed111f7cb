// Subword tokenizer: a sentencepiece BPE model, trained by the sentencepiece trainer and applied with
// sentencepiece's BPE encoding algorithm (see spm_model.h for why that runs here rather than in
// libsentencepiece).
//
// Training settings (fixed, so that training is deterministic and any text round-trips):
//   model_type=bpe, character_coverage=1.0, byte_fallback=true (characters outside the vocabulary
//   become <0xNN> byte pieces, so nothing maps to <unk>), normalization_rule_name=identity,
//   remove_extra_whitespaces=false, add_dummy_prefix=false (no normalisation: decode(encode(s)) == s),
//   split_by_whitespace=true (pieces never span a space), split_digits=false, unk/bos/eos/pad ids =
//   0/1/2/none, num_threads=2, random_seed derived from TokenizerTrainOptions::seed.
// Training sentences: each document's lines (newline removed, a trailing '\r' too, empty lines dropped);
// lines longer than max_sentence_bytes are cut just before a space (or, without one, at a UTF-8
// character boundary), because sentencepiece skips sentences longer than its max_sentence_length.
//
// Encoding (identical to sentencepiece's for these models): spaces become U+2581; the text is split into
// UTF-8 characters; repeatedly, the adjacent pair whose concatenation is a vocabulary piece with the
// highest score (leftmost on ties) is merged; symbols not in the vocabulary become their bytes' <0xNN>
// pieces. Ill-formed UTF-8 in the input is replaced by U+FFFD first, as sentencepiece does.
// Decoding: U+2581 -> space, byte pieces -> bytes (ill-formed sequences -> U+FFFD), BOS/EOS -> nothing,
// <unk> -> " \u2047 " (sentencepiece's surface; encode never produces <unk>).
// Round trip exception: U+2581 in the input decodes as a space.
#pragma once
#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

namespace ultramem::data {

struct TokenizerTrainOptions {
  int64_t vocab_size = 8192;         // >= 260 (256 byte pieces + unk/bos/eos + at least one more)
  uint64_t seed = 0;                 // seeds the trainer's random generator (used when sampling sentences)
  int64_t max_sentence_bytes = 2048; // training sentences are cut to at most this many bytes
  int64_t input_sentence_size = 0;   // train on a random sample of this many sentences; 0 = all
  void validate() const;             // std::invalid_argument naming the field
};

class Tokenizer {
 public:
  // Trains on `documents` (the train split only: validation text must not shape the vocabulary) and
  // writes the model to `model_path` atomically. std::invalid_argument for bad options or no text;
  // std::runtime_error when the trainer is missing or fails (its output quoted) or the file cannot be
  // written. Progress lines go to `log` when given.
  static Tokenizer train(const std::vector<std::string_view>& documents, const std::string& model_path,
                         const TokenizerTrainOptions& options = {}, std::ostream* log = nullptr);

  // Loads a model written by train(). std::runtime_error naming the file when it is missing, is not a
  // sentencepiece model, or is one this class cannot apply exactly (not BPE with byte fallback, identity
  // normalisation, no dummy prefix, no extra-whitespace removal).
  static Tokenizer load(const std::string& model_path);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Token ids of `text` (no BOS/EOS added). Thread-safe. Texts are encoded line by line, and lines of
  // more than 4096 bytes in pieces cut just before a space; since no piece contains a newline or a space
  // after its first character, the ids are those of encoding the whole text at once (only runs of more
  // than 4096 bytes without any space are cut at a character boundary).
  std::vector<int32_t> encode(std::string_view text) const;
  // Text of `ids` (see above). std::invalid_argument for ids outside [0, vocab_size).
  std::string decode(const std::vector<int32_t>& ids) const;
  std::string piece(int32_t id) const;  // the piece string of one id (for debugging)

  int64_t vocab_size() const;
  int32_t bos_id() const;
  int32_t eos_id() const;
  int32_t unk_id() const;
  const std::string& path() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<const Impl> impl);
  std::unique_ptr<const Impl> impl_;
};

}  // namespace ultramem::data
