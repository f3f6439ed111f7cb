// Reading a text corpus into documents.
//
// A corpus is either
//  - a directory: every regular file whose name ends in ".txt", found recursively, is one document,
//    named by its path relative to the directory ('/'-separated); documents are sorted by name
//    (bytewise), so the order does not depend on the file system; or
//  - a single text file: split into documents at separator lines, i.e. lines that hold exactly one
//    form-feed character ("\f", optionally followed by "\r"). The separator lines are dropped; a file
//    without separators is one document. Documents are named "<file name>#<k>", k = 0, 1, ... counting
//    the segments between separators.
// Every file must be valid UTF-8 (std::runtime_error naming the file and the byte offset otherwise).
// Empty files and empty segments are skipped with a warning on the log stream.
#pragma once
#include <cstddef>
#include <cstdint>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

namespace ultramem::data {

struct Document {
  std::string name;  // relative path, or "<file name>#<k>" for a single-file corpus
  std::string text;  // UTF-8, as stored (no normalisation)
};

// One input file as read (including empty ones), for the input fingerprint.
struct CorpusFile {
  std::string rel_path;       // relative to the corpus directory; the file name for a single file
  uint64_t size = 0;          // bytes
  uint64_t content_hash = 0;  // FNV-1a 64 of the bytes
};

struct Corpus {
  std::string path;                 // the directory or file that was read
  std::vector<Document> documents;  // sorted by name, all non-empty
  std::vector<CorpusFile> files;    // sorted by rel_path

  // FNV-1a 64 over (rel_path, '\0', size, content_hash) of every input file, in order: changes when a
  // file is added, removed, renamed or edited.
  uint64_t fingerprint() const;
  uint64_t total_bytes() const;  // sum of the documents' UTF-8 bytes
};

// Reads a corpus directory or file (see above). Throws std::runtime_error for a missing path, unreadable
// or invalid UTF-8 files, and a corpus without any non-empty document. Writes a line per skipped file
// and a summary ("read N files ...") to `log` when given.
Corpus read_corpus(const std::string& path, std::ostream* log = nullptr);

// Byte offset of the first byte that is not part of a well-formed UTF-8 sequence (overlong forms,
// surrogates and code points above U+10FFFF are ill-formed), or std::string_view::npos when `text` is
// valid UTF-8.
size_t find_invalid_utf8(std::string_view text);

}  // namespace ultramem::data
