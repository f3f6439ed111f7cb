#include "ultramem/data/corpus.h"

#include <algorithm>
#include <filesystem>
#include <stdexcept>
#include <system_error>

#include "ultramem/io/atomic_file.h"
#include "ultramem/data/hash.h"

namespace ultramem::data {
namespace {

namespace fs = std::filesystem;

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("corpus: " + path + ": " + what);
}

std::string load_checked(const fs::path& file, const std::string& display, CorpusFile* info) {
  std::string text;
  try {
    text = io::read_file(file.string());
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(std::string("corpus: ") + e.what());
  }
  const size_t bad = find_invalid_utf8(text);
  if (bad != std::string_view::npos)
    fail(display, "invalid UTF-8 at byte offset " + std::to_string(bad) + " (byte 0x" +
                      hex64(static_cast<unsigned char>(text[bad])).substr(14) + ")");
  info->size = text.size();
  info->content_hash = fnv1a64(text);
  return text;
}

bool is_separator_line(std::string_view line) { return line == "\f" || line == "\f\r"; }

// Splits a single-file corpus at form-feed lines (see corpus.h).
void split_single_file(const std::string& name, const std::string& text, Corpus* out, std::ostream* log) {
  size_t seg_start = 0, pos = 0, k = 0;
  auto emit = [&](size_t end) {
    if (end > seg_start) {
      out->documents.push_back({name + "#" + std::to_string(k), text.substr(seg_start, end - seg_start)});
    } else if (log) {
      *log << "warning: corpus: " << name << ": document #" << k << " is empty; skipped\n";
    }
    ++k;
  };
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    if (is_separator_line(std::string_view(text).substr(pos, eol - pos))) {
      emit(pos);
      seg_start = std::min(eol + 1, text.size());
    }
    pos = eol + 1;
  }
  emit(text.size());
}

}  // namespace

size_t find_invalid_utf8(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned char lo = 0x80, hi = 0xbf;  // allowed range of the second byte
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;       // no overlongs
      else if (c == 0xed) hi = 0x9f;  // no surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;       // no overlongs
      else if (c == 0xf4) hi = 0x8f;  // <= U+10FFFF
    } else {
      return i;  // continuation byte without a lead, 0xc0/0xc1 overlong leads, 0xf5..0xff
    }
    if (i + 1 >= n || s[i + 1] < lo || s[i + 1] > hi) return i;
    for (size_t j = 2; j < len; ++j)
      if (i + j >= n || (s[i + j] & 0xc0) != 0x80) return i;
    i += len;
  }
  return std::string_view::npos;
}

uint64_t Corpus::fingerprint() const {
  uint64_t h = kFnvOffset;
  for (const auto& f : files) {
    h = fnv1a64(f.rel_path, h);
    h = fnv1a64(std::string_view("\0", 1), h);
    h = fnv1a64_u64(f.size, h);
    h = fnv1a64_u64(f.content_hash, h);
  }
  return h;
}

uint64_t Corpus::total_bytes() const {
  uint64_t n = 0;
  for (const auto& d : documents) n += d.text.size();
  return n;
}

Corpus read_corpus(const std::string& path, std::ostream* log) {
  Corpus out;
  out.path = path;
  std::error_code ec;
  const fs::path root(path);
  const auto st = fs::status(root, ec);
  if (ec || !fs::exists(st)) fail(path, "does not exist");

  if (fs::is_regular_file(st)) {
    CorpusFile info;
    info.rel_path = root.filename().string();
    const std::string text = load_checked(root, path, &info);
    out.files.push_back(info);
    if (text.empty()) {
      if (log) *log << "warning: corpus: " << path << " is empty; skipped\n";
    } else {
      split_single_file(info.rel_path, text, &out, log);
    }
  } else if (fs::is_directory(st)) {
    std::vector<std::pair<std::string, fs::path>> found;  // (relative path, full path)
    fs::recursive_directory_iterator it(root, ec), end;  // symlinked directories are not followed
    if (ec) fail(path, "cannot list directory: " + ec.message());
    for (; it != end; it.increment(ec)) {
      if (ec) fail(path, "cannot list directory: " + ec.message());
      const fs::path& p = it->path();
      if (p.extension() != ".txt" || !it->is_regular_file(ec)) continue;
      found.emplace_back(p.lexically_relative(root).generic_string(), p);
    }
    if (ec) fail(path, "cannot list directory: " + ec.message());
    std::sort(found.begin(), found.end());
    if (log) *log << "reading " << found.size() << " .txt files from " << path << "\n";
    for (const auto& [rel, full] : found) {
      CorpusFile info;
      info.rel_path = rel;
      std::string text = load_checked(full, full.string(), &info);
      out.files.push_back(info);
      if (text.empty()) {
        if (log) *log << "warning: corpus: " << full.string() << " is empty; skipped\n";
        continue;
      }
      out.documents.push_back({rel, std::move(text)});
    }
  } else {
    fail(path, "is neither a regular file nor a directory");
  }

  if (out.documents.empty()) fail(path, "no non-empty documents (a directory needs *.txt files)");
  if (log)
    *log << "corpus " << path << ": " << out.files.size() << " files, " << out.documents.size()
         << " documents, " << out.total_bytes() << " bytes\n";
  return out;
}

}  // namespace ultramem::data
