#include "ultramem/io/json_file.h"

#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "ultramem/io/atomic_file.h"

namespace ultramem::io {

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_json_text(ss.str(), path);
}

nlohmann::json parse_json_text(const std::string& text, const std::string& name) {
  using json = nlohmann::json;
  // One frame per open object: its keys so far and the key being read. A key seen twice in one object is
  // an error (the JSON standard leaves it open; nlohmann keeps the last one, silently).
  struct Frame {
    std::set<std::string> keys;
    std::string current;
  };
  std::vector<Frame> objects;
  auto where = [&] {
    std::string p;
    for (const auto& f : objects) p += (p.empty() ? "" : ".") + f.current;
    return p;
  };
  const json::parser_callback_t check = [&](int, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        objects.push_back({});
        break;
      case json::parse_event_t::object_end:
        objects.pop_back();
        break;
      case json::parse_event_t::key: {
        Frame& f = objects.back();
        f.current = parsed.get<std::string>();
        if (!f.keys.insert(f.current).second)
          throw std::runtime_error(name + ": duplicate key \"" + where() + "\" (each key may appear once)");
        break;
      }
      default:  // arrays and values
        break;
    }
    return true;
  };
  try {
    return json::parse(text, check);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e400
    throw std::runtime_error(name + ": invalid JSON: " + e.what());
  }
}

void write_json_file(const std::string& path, const nlohmann::json& j) {
  write_file_atomically(path, {j.dump(2) + "\n"});
}

}  // namespace ultramem::io
