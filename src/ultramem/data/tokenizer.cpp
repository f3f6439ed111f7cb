#include "ultramem/data/tokenizer.h"

#include <sys/stat.h>

#include <chrono>
#include <queue>
#include <stdexcept>
#include <unordered_map>

#include "ultramem/io/atomic_file.h"
#include "ultramem/data/hash.h"
#include "ultramem/data/spm_model.h"
#include "ultramem/data/spm_trainer.h"

namespace ultramem::data {
namespace {

constexpr size_t kEncodeChunk = 4096;                // bytes per encoded piece of a long line
constexpr std::string_view kSpace = "\xe2\x96\x81";  // U+2581, sentencepiece's space marker
constexpr std::string_view kReplacement = "\xef\xbf\xbd";  // U+FFFD
constexpr std::string_view kUnkSurface = " \xe2\x81\x87 ";  // " ⁇ ", how sentencepiece decodes <unk>

// Length of the well-formed UTF-8 sequence starting at s[i], or 0 if it is ill-formed.
size_t utf8_len(std::string_view s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return 1;
  size_t len;
  unsigned char lo = 0x80, hi = 0xbf;
  if (c >= 0xc2 && c <= 0xdf) len = 2;
  else if (c >= 0xe0 && c <= 0xef) {
    len = 3;
    if (c == 0xe0) lo = 0xa0;
    else if (c == 0xed) hi = 0x9f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    len = 4;
    if (c == 0xf0) lo = 0x90;
    else if (c == 0xf4) hi = 0x8f;
  } else {
    return 0;
  }
  if (i + len > s.size()) return 0;
  const auto c1 = static_cast<unsigned char>(s[i + 1]);
  if (c1 < lo || c1 > hi) return 0;
  for (size_t j = 2; j < len; ++j)
    if ((static_cast<unsigned char>(s[i + j]) & 0xc0) != 0x80) return 0;
  return len;
}

// Start of the UTF-8 character containing byte i (moves left over continuation bytes).
size_t char_boundary(std::string_view s, size_t i) {
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xc0) == 0x80) --i;
  return i;
}

// Calls fn on consecutive pieces of `line` of at most `limit` bytes, cut just before a space when there
// is one in range (the space stays with the next word, as in running text), else at a character boundary.
template <typename Fn>
void for_each_cut(std::string_view line, size_t limit, Fn&& fn) {
  size_t p = 0;
  while (line.size() - p > limit) {
    size_t cut = line.rfind(' ', p + limit);
    if (cut == std::string_view::npos || cut <= p) cut = char_boundary(line, p + limit);
    if (cut <= p) cut = p + limit;  // only for ill-formed UTF-8
    fn(line.substr(p, cut - p));
    p = cut;
  }
  if (p < line.size()) fn(line.substr(p));
}

std::string byte_piece_name(int b) {
  static const char* hex = "0123456789ABCDEF";
  return std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">";
}

}  // namespace

struct Tokenizer::Impl {
  std::string path;
  SpmModel model;
  std::unordered_map<std::string_view, int32_t> merge_pieces;  // NORMAL pieces; views into model.pieces
  int32_t byte_ids[256];
  int32_t unk = -1, bos = -1, eos = -1;

  void encode_piece(std::string_view text, std::vector<int32_t>* out) const;
};

void TokenizerTrainOptions::validate() const {
  if (vocab_size < 260 || vocab_size > (int64_t(1) << 30))
    throw std::invalid_argument("vocab_size: must be in [260, 2^30] (256 byte pieces + unk/bos/eos + merges), got " +
                                std::to_string(vocab_size));
  if (max_sentence_bytes < 16 || max_sentence_bytes > 4000)
    throw std::invalid_argument("max_sentence_bytes: must be in [16, 4000], got " + std::to_string(max_sentence_bytes));
  if (input_sentence_size < 0)
    throw std::invalid_argument("input_sentence_size: must be >= 0 (0 = all), got " + std::to_string(input_sentence_size));
}

Tokenizer::Tokenizer(std::unique_ptr<const Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::train(const std::vector<std::string_view>& documents, const std::string& model_path,
                           const TokenizerTrainOptions& options, std::ostream* log) {
  options.validate();
  std::vector<std::string> sentences;
  size_t bytes = 0;
  for (std::string_view doc : documents) {
    size_t pos = 0;
    while (pos < doc.size()) {
      size_t eol = doc.find('\n', pos);
      if (eol == std::string_view::npos) eol = doc.size();
      std::string_view line = doc.substr(pos, eol - pos);
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      for_each_cut(line, static_cast<size_t>(options.max_sentence_bytes), [&](std::string_view s) {
        sentences.emplace_back(s);
        bytes += s.size();
      });
      pos = eol + 1;
    }
  }
  if (sentences.empty()) throw std::invalid_argument("tokenizer: no training text (all documents are empty)");
  if (log)
    *log << "training tokenizer (sentencepiece BPE, vocab " << options.vocab_size << ") on " << documents.size()
         << " documents: " << sentences.size() << " sentences, " << bytes << " bytes...\n"
         << std::flush;

  const std::vector<std::string> flags = {
      "--model_type=bpe",
      "--vocab_size=" + std::to_string(options.vocab_size),
      "--character_coverage=1.0",
      "--byte_fallback=true",
      "--normalization_rule_name=identity",
      "--remove_extra_whitespaces=false",
      "--add_dummy_prefix=false",
      "--split_by_whitespace=true",
      "--split_digits=false",
      "--unk_id=0",
      "--bos_id=1",
      "--eos_id=2",
      "--pad_id=-1",
      "--num_threads=2",
      "--max_sentence_length=4192",
      "--input_sentence_size=" + std::to_string(options.input_sentence_size),
      "--shuffle_input_sentence=true",
      // 4294967295 is reserved for "seed from std::random_device".
      "--random_seed=" + std::to_string(splitmix64(options.seed) % 0xffffffffu),
  };
  const auto t0 = std::chrono::steady_clock::now();
  const std::string proto = run_spm_train(sentences, flags);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  io::write_file_atomically(model_path, {proto});
  Tokenizer tok = load(model_path);
  if (log) *log << "trained tokenizer in " << secs << " s: " << tok.vocab_size() << " pieces -> " << model_path << "\n";
  return tok;
}

Tokenizer Tokenizer::load(const std::string& model_path) {
  struct stat st;
  if (::stat(model_path.c_str(), &st) != 0) throw std::runtime_error("tokenizer: " + model_path + ": file not found");
  if (!S_ISREG(st.st_mode)) throw std::runtime_error("tokenizer: " + model_path + ": not a regular file");
  auto impl = std::make_unique<Impl>();
  impl->path = model_path;
  impl->model = parse_spm_model(io::read_file(model_path), model_path);
  const SpmModel& m = impl->model;
  auto unsupported = [&](const std::string& what) {
    throw std::runtime_error("tokenizer: " + model_path + ": unsupported sentencepiece model (" + what +
                             "); train it with ultramem (Tokenizer::train / `ultramem prepare`)");
  };
  if (m.model_type != 2) unsupported("model type " + std::to_string(m.model_type) + ", expected BPE");
  if (!m.byte_fallback) unsupported("byte_fallback is off");
  if (m.treat_whitespace_as_suffix) unsupported("treat_whitespace_as_suffix is on");
  if (m.has_precompiled_charmap || !(m.normalizer_name.empty() || m.normalizer_name == "identity"))
    unsupported("normalization \"" + m.normalizer_name + "\", expected identity");
  if (m.add_dummy_prefix) unsupported("add_dummy_prefix is on");
  if (m.remove_extra_whitespaces) unsupported("remove_extra_whitespaces is on");
  if (!m.escape_whitespaces) unsupported("escape_whitespaces is off");

  std::fill(std::begin(impl->byte_ids), std::end(impl->byte_ids), -1);
  std::unordered_map<std::string, int32_t> byte_names;
  for (int b = 0; b < 256; ++b) byte_names.emplace(byte_piece_name(b), b);
  for (size_t i = 0; i < m.pieces.size(); ++i) {
    const SpmPiece& p = m.pieces[i];
    const auto id = static_cast<int32_t>(i);
    switch (p.type) {
      case SpmPiece::Normal:
        if (p.text.empty()) unsupported("empty piece " + std::to_string(i));
        if (!impl->merge_pieces.emplace(std::string_view(p.text), id).second)
          unsupported("duplicate piece \"" + p.text + "\"");
        break;
      case SpmPiece::Unknown: impl->unk = id; break;
      case SpmPiece::Control:
        if (p.text == "<s>") impl->bos = id;
        else if (p.text == "</s>") impl->eos = id;
        break;
      case SpmPiece::Byte: {
        const auto it = byte_names.find(p.text);
        if (it == byte_names.end()) unsupported("malformed byte piece \"" + p.text + "\"");
        impl->byte_ids[it->second] = id;
        break;
      }
      case SpmPiece::UserDefined: unsupported("user-defined piece \"" + p.text + "\""); break;
      case SpmPiece::Unused: unsupported("unused piece \"" + p.text + "\""); break;
    }
  }
  if (impl->unk < 0) unsupported("no <unk> piece");
  if (impl->bos < 0 || impl->eos < 0) unsupported("no <s> or </s> piece");
  for (int b = 0; b < 256; ++b)
    if (impl->byte_ids[b] < 0) unsupported("byte piece " + byte_piece_name(b) + " missing");
  return Tokenizer(std::move(impl));
}

// sentencepiece's BPE encoding of one piece of text (see tokenizer.h).
void Tokenizer::Impl::encode_piece(std::string_view raw, std::vector<int32_t>* out) const {
  // Normalise: ' ' -> U+2581, ill-formed UTF-8 -> U+FFFD; record character boundaries.
  std::string text;
  text.reserve(raw.size() + raw.size() / 4 + 8);
  struct Symbol {
    uint32_t begin, len;
    int32_t prev, next;
  };
  std::vector<Symbol> sym;
  sym.reserve(raw.size());
  for (size_t i = 0; i < raw.size();) {
    const auto begin = static_cast<uint32_t>(text.size());
    size_t n = utf8_len(raw, i);
    if (raw[i] == ' ') text += kSpace;
    else if (n == 0) text += kReplacement;
    else text.append(raw.data() + i, n);
    i += n == 0 ? 1 : n;
    const auto k = static_cast<int32_t>(sym.size());
    sym.push_back({begin, static_cast<uint32_t>(text.size()) - begin, k - 1, k + 1});
  }
  if (sym.empty()) return;
  sym.back().next = -1;

  struct Pair {
    float score;
    int32_t left, right;
    uint32_t len;  // byte length of the merged piece when the pair was made
  };
  auto worse = [](const Pair& a, const Pair& b) {  // max-heap on score, then on the leftmost position
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  std::priority_queue<Pair, std::vector<Pair>, decltype(worse)> agenda(worse);
  auto try_pair = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    const uint32_t len = sym[l].len + sym[r].len;
    const auto it = merge_pieces.find(std::string_view(text.data() + sym[l].begin, len));
    if (it == merge_pieces.end()) return;
    agenda.push({model.pieces[it->second].score, l, r, len});
  };
  for (size_t i = 1; i < sym.size(); ++i) try_pair(static_cast<int32_t>(i - 1), static_cast<int32_t>(i));
  while (!agenda.empty()) {
    const Pair top = agenda.top();
    agenda.pop();
    Symbol& l = sym[top.left];
    Symbol& r = sym[top.right];
    if (l.len == 0 || r.len == 0 || l.len + r.len != top.len || l.next != top.right) continue;  // stale
    l.len += r.len;
    l.next = r.next;
    if (r.next >= 0) sym[r.next].prev = top.left;
    r.len = 0;
    try_pair(l.prev, top.left);
    try_pair(top.left, l.next);
  }
  for (int32_t i = 0; i >= 0; i = sym[i].next) {
    const std::string_view s(text.data() + sym[i].begin, sym[i].len);
    const auto it = merge_pieces.find(s);
    if (it != merge_pieces.end()) {
      out->push_back(it->second);
    } else {
      for (unsigned char c : s) out->push_back(byte_ids[c]);  // byte fallback
    }
  }
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 8);
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    eol = eol == std::string_view::npos ? text.size() : eol + 1;  // the '\n' stays with its line
    for_each_cut(text.substr(pos, eol - pos), kEncodeChunk, [&](std::string_view piece) { impl_->encode_piece(piece, &out); });
    pos = eol;
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  const auto& pieces = impl_->model.pieces;
  const auto n = static_cast<int32_t>(pieces.size());
  std::string out, bytes;
  auto flush_bytes = [&] {  // pending byte pieces -> UTF-8, ill-formed bytes -> U+FFFD each
    for (size_t i = 0; i < bytes.size();) {
      const size_t len = utf8_len(bytes, i);
      if (len == 0) {
        out += kReplacement;
        ++i;
      } else {
        out.append(bytes, i, len);
        i += len;
      }
    }
    bytes.clear();
  };
  for (size_t k = 0; k < ids.size(); ++k) {
    const int32_t id = ids[k];
    if (id < 0 || id >= n)
      throw std::invalid_argument("tokenizer: decode: id " + std::to_string(id) + " at position " + std::to_string(k) +
                                  " is outside [0, " + std::to_string(n) + ")");
    const SpmPiece& p = pieces[id];
    if (p.type == SpmPiece::Byte) {
      bytes += static_cast<char>(std::stoi(p.text.substr(3, 2), nullptr, 16));
      continue;
    }
    flush_bytes();
    if (p.type == SpmPiece::Control) continue;
    if (p.type == SpmPiece::Unknown) {
      out += kUnkSurface;
      continue;
    }
    for (size_t i = 0; i < p.text.size();) {
      if (p.text.compare(i, kSpace.size(), kSpace) == 0) {
        out += ' ';
        i += kSpace.size();
      } else {
        out += p.text[i++];
      }
    }
  }
  flush_bytes();
  return out;
}

std::string Tokenizer::piece(int32_t id) const {
  if (id < 0 || id >= vocab_size()) throw std::invalid_argument("tokenizer: piece: id " + std::to_string(id) + " out of range");
  return impl_->model.pieces[id].text;
}

int64_t Tokenizer::vocab_size() const { return static_cast<int64_t>(impl_->model.pieces.size()); }
int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }
int32_t Tokenizer::unk_id() const { return impl_->unk; }
const std::string& Tokenizer::path() const { return impl_->path; }

}  // namespace ultramem::data
