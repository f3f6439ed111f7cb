#include "ultramem/io/json_file.h"

#include <fstream>
#include <sstream>
#include <stdexcept>

#include "ultramem/io/atomic_file.h"

namespace ultramem::io {

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::parse_error& e) {
    throw std::runtime_error(path + ": invalid JSON: " + e.what());
  }
}

void write_json_file(const std::string& path, const nlohmann::json& j) {
  write_file_atomically(path, {j.dump(2) + "\n"});
}

}  // namespace ultramem::io
