// JSON files: the one reader and writer every config, run record and report goes through.
#pragma once
#include <string>

#include <nlohmann/json.hpp>

namespace ultramem::io {

// Parses the file at `path`. std::runtime_error naming the file when it cannot be opened or is not
// valid JSON (with the parser's position).
nlohmann::json read_json_file(const std::string& path);

// Writes `j` (indented, trailing newline) atomically (io::write_file_atomically).
void write_json_file(const std::string& path, const nlohmann::json& j);

}  // namespace ultramem::io
