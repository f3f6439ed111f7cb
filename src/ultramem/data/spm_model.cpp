#include "ultramem/data/spm_model.h"

#include <cstring>
#include <stdexcept>
#include <string_view>

namespace ultramem::data {
namespace {

// A cursor over protobuf wire-format bytes; every read is bounds-checked.
class Wire {
 public:
  Wire(std::string_view b, const std::string& path) : b_(b), path_(path) {}
  bool done() const { return i_ >= b_.size(); }

  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (i_ >= b_.size()) bad("truncated varint");
      const auto c = static_cast<unsigned char>(b_[i_++]);
      v |= uint64_t(c & 0x7f) << shift;
      if (c < 0x80) return v;
    }
    bad("varint longer than 10 bytes");
  }
  std::string_view bytes() {
    const uint64_t n = varint();
    if (n > b_.size() - i_) bad("length-delimited field runs past the end");
    std::string_view v = b_.substr(i_, n);
    i_ += n;
    return v;
  }
  float fixed32_float() {
    if (b_.size() - i_ < 4) bad("truncated fixed32");
    uint32_t u = 0;
    for (int k = 0; k < 4; ++k) u |= uint32_t(static_cast<unsigned char>(b_[i_ + k])) << (8 * k);
    i_ += 4;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  void skip(int wire_type) {
    switch (wire_type) {
      case 0: varint(); break;
      case 1: advance(8); break;
      case 2: bytes(); break;
      case 5: advance(4); break;
      default: bad("unsupported wire type " + std::to_string(wire_type));
    }
  }
  [[noreturn]] void bad(const std::string& what) const {
    throw std::runtime_error("tokenizer: " + path_ + ": not a valid sentencepiece model (" + what + " at byte " +
                             std::to_string(i_) + ")");
  }

 private:
  void advance(size_t n) {
    if (b_.size() - i_ < n) bad("truncated field");
    i_ += n;
  }
  std::string_view b_;
  const std::string& path_;
  size_t i_ = 0;
};

SpmPiece parse_piece(std::string_view b, const std::string& path) {
  SpmPiece p;
  Wire w(b, path);
  while (!w.done()) {
    const uint64_t key = w.varint();
    const int field = static_cast<int>(key >> 3), type = static_cast<int>(key & 7);
    if (field == 1 && type == 2) p.text = std::string(w.bytes());
    else if (field == 2 && type == 5) p.score = w.fixed32_float();
    else if (field == 3 && type == 0) {
      const uint64_t t = w.varint();
      if (t < 1 || t > 6) w.bad("unknown piece type " + std::to_string(t));
      p.type = static_cast<SpmPiece::Type>(t);
    } else w.skip(type);
  }
  return p;
}

void parse_trainer_spec(std::string_view b, const std::string& path, SpmModel* m) {
  Wire w(b, path);
  while (!w.done()) {
    const uint64_t key = w.varint();
    const int field = static_cast<int>(key >> 3), type = static_cast<int>(key & 7);
    if (field == 3 && type == 0) m->model_type = static_cast<int>(w.varint());
    else if (field == 24 && type == 0) m->treat_whitespace_as_suffix = w.varint() != 0;
    else if (field == 35 && type == 0) m->byte_fallback = w.varint() != 0;
    else w.skip(type);
  }
}

void parse_normalizer_spec(std::string_view b, const std::string& path, SpmModel* m) {
  Wire w(b, path);
  while (!w.done()) {
    const uint64_t key = w.varint();
    const int field = static_cast<int>(key >> 3), type = static_cast<int>(key & 7);
    if (field == 1 && type == 2) m->normalizer_name = std::string(w.bytes());
    else if (field == 2 && type == 2) m->has_precompiled_charmap = !w.bytes().empty();
    else if (field == 3 && type == 0) m->add_dummy_prefix = w.varint() != 0;
    else if (field == 4 && type == 0) m->remove_extra_whitespaces = w.varint() != 0;
    else if (field == 5 && type == 0) m->escape_whitespaces = w.varint() != 0;
    else w.skip(type);
  }
}

}  // namespace

SpmModel parse_spm_model(const std::string& bytes, const std::string& path) {
  SpmModel m;
  Wire w(bytes, path);
  while (!w.done()) {
    const uint64_t key = w.varint();
    const int field = static_cast<int>(key >> 3), type = static_cast<int>(key & 7);
    if (field == 0) w.bad("field number 0");
    if (field == 1 && type == 2) m.pieces.push_back(parse_piece(w.bytes(), path));
    else if (field == 2 && type == 2) parse_trainer_spec(w.bytes(), path, &m);
    else if (field == 3 && type == 2) parse_normalizer_spec(w.bytes(), path, &m);
    else w.skip(type);
  }
  if (m.pieces.empty()) w.bad("no pieces");
  return m;
}

}  // namespace ultramem::data
