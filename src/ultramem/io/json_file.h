// JSON files: the one reader and writer every config, run record and report goes through.
#pragma once
#include <string>

#include <nlohmann/json.hpp>

namespace ultramem::io {

// Parses the file at `path`. std::runtime_error naming the file when it cannot be opened or is not
// valid JSON (with the parser's position), or when an object repeats a key (naming the key's path).
nlohmann::json read_json_file(const std::string& path);
// The same checks on `text`; `name` (a file name, "request body") starts the error messages.
nlohmann::json parse_json_text(const std::string& text, const std::string& name);

// Writes `j` (indented, trailing newline) atomically (io::write_file_atomically).
void write_json_file(const std::string& path, const nlohmann::json& j);

}  // namespace ultramem::io
