// Reading a sentencepiece model file (a serialised sentencepiece.ModelProto) without libsentencepiece.
//
// Why not libsentencepiece: Debian's libsentencepiece bundles its own protobuf-lite (3.14) whose exported
// symbols resolve, in a process that also loads libtorch, to libtorch's libprotobuf (3.21); sentencepiece
// then aborts with a protobuf version error on its first model. So the data layer reads the few fields it
// needs from the protobuf wire format itself, and trains with the `spm_train` program (spm_trainer.h).
//
// Fields read (proto2 field numbers of sentencepiece_model.proto):
//   ModelProto:     1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
//   SentencePiece:  1 piece (string), 2 score (float), 3 type (1 NORMAL, 2 UNKNOWN, 3 CONTROL,
//                   4 USER_DEFINED, 5 UNUSED, 6 BYTE; default NORMAL)
//   TrainerSpec:    3 model_type (2 = BPE), 24 treat_whitespace_as_suffix, 35 byte_fallback
//   NormalizerSpec: 1 name, 2 precompiled_charmap, 3 add_dummy_prefix (default true),
//                   4 remove_extra_whitespaces (default true), 5 escape_whitespaces (default true)
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ultramem::data {

struct SpmPiece {
  enum Type : int { Normal = 1, Unknown = 2, Control = 3, UserDefined = 4, Unused = 5, Byte = 6 };
  std::string text;  // the piece, with U+2581 standing for a space
  float score = 0.0f;
  Type type = Normal;
};

struct SpmModel {
  std::vector<SpmPiece> pieces;  // index = token id
  int model_type = 1;            // 1 unigram, 2 BPE, 3 word, 4 char
  bool byte_fallback = false;
  bool treat_whitespace_as_suffix = false;
  std::string normalizer_name;   // empty when absent
  bool has_precompiled_charmap = false;
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
};

// Parses `bytes` (the content of `path`, used in messages). std::runtime_error "tokenizer: <path>: ..."
// when the bytes are not a well-formed ModelProto with at least one piece.
SpmModel parse_spm_model(const std::string& bytes, const std::string& path);

}  // namespace ultramem::data
