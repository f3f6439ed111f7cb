// Atomic file replacement (temporary file, fsync, rename, fsync of the directory) and whole-file reads.
#pragma once
#include <string>
#include <string_view>
#include <vector>

namespace ultramem::io {

// Writes the concatenation of `parts` to `path` atomically: writes `path + ".tmp.<pid>"`, flushes and
// fsyncs it, renames it over `path`, then fsyncs the directory (best effort). A reader sees either the
// old file or the complete new one. Throws std::runtime_error naming the file on any failure. First
// removes the `path + ".tmp.<pid>"` files of processes that no longer exist (killed during a write).
void write_file_atomically(const std::string& path, const std::vector<std::string_view>& parts);

// `path + ".tmp.<pid>"` with this process's pid: where a writer builds `path` before renaming it.
std::string temporary_path(const std::string& path);
// The `path + ".tmp.<pid>"` entries (files or folders) next to `path` whose process no longer exists:
// what writers killed mid-write left behind. A live or unknown process's entry is not listed.
std::vector<std::string> stale_temporaries(const std::string& path);

// The whole content of `path` (binary). Throws std::runtime_error naming the file when it cannot be read.
std::string read_file(const std::string& path);

}  // namespace ultramem::io
