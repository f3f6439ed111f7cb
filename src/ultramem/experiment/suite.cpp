#include "ultramem/experiment/suite.h"

#include <algorithm>
#include <filesystem>
#include <set>
#include <stdexcept>

#include "ultramem/checkpoint/run_folder.h"
#include "ultramem/io/json_file.h"

namespace ultramem::experiment {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

const std::set<std::string> kAnalyses = {"compare", "ablation", "capacity", "scaling", "retrieval"};
const std::set<std::string> kTasks = {"lm", "facts"};
const std::set<std::string> kSuiteKeys = {"name",  "title", "analysis", "task", "data",       "facts", "seeds",
                                          "base_model", "train", "cumulative", "runs", "quick", "notes"};
const std::set<std::string> kRunKeys = {"name", "label", "model", "train", "seeds", "tags"};
const std::set<std::string> kQuickKeys = {"train", "model", "seeds", "runs", "facts"};

struct Where {
  std::string file;
  [[noreturn]] void fail(const std::string& key, const std::string& msg) const {
    throw std::invalid_argument(file + ": " + key + ": " + msg);
  }
  void only_keys(const json& j, const std::set<std::string>& allowed, const std::string& path) const {
    if (!j.is_object()) fail(path, "expected an object");
    for (auto it = j.begin(); it != j.end(); ++it)
      if (!allowed.count(it.key())) fail(path.empty() ? it.key() : path + "." + it.key(), "unknown key");
  }
  std::vector<uint64_t> seeds(const json& j, const std::string& path) const {
    if (!j.is_array() || j.empty()) fail(path, "expected a non-empty array of seeds");
    std::vector<uint64_t> out;
    for (const auto& s : j) {
      if (!s.is_number_unsigned()) fail(path, "seeds must be non-negative integers");
      out.push_back(s.get<uint64_t>());
    }
    return out;
  }
  std::string str(const json& j, const std::string& key, const std::string& def = "") const {
    if (!j.contains(key)) {
      if (def.empty()) fail(key, "required");
      return def;
    }
    if (!j[key].is_string()) fail(key, "expected a string");
    return j[key].get<std::string>();
  }
};

std::string resolve_path(const std::string& name_or_path) {
  if (fs::exists(name_or_path) && fs::is_regular_file(name_or_path)) return name_or_path;
  const auto p = fs::path("experiments") / (name_or_path + ".json");
  if (fs::exists(p)) return p.string();
  std::string known;
  for (const auto& s : list_suites()) known += (known.empty() ? "" : ", ") + s;
  throw std::invalid_argument("no experiment suite \"" + name_or_path + "\" (looked for " + p.string() +
                              "; known suites: " + (known.empty() ? "none found, run from the repository root" : known) +
                              ")");
}

}  // namespace

std::vector<std::string> list_suites(const std::string& dir) {
  std::vector<std::string> out;
  if (!fs::is_directory(dir)) return out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".json") out.push_back(e.path().stem().string());
  std::sort(out.begin(), out.end());
  return out;
}

ExperimentSuite load_suite(const std::string& name_or_path, bool quick) {
  const std::string path = resolve_path(name_or_path);
  Where w{path};
  const json j = io::read_json_file(path);
  w.only_keys(j, kSuiteKeys, "");

  ExperimentSuite s;
  s.source_path = path;
  s.quick = quick;
  s.name = w.str(j, "name");
  s.title = w.str(j, "title", s.name);
  s.analysis = w.str(j, "analysis");
  if (!kAnalyses.count(s.analysis)) w.fail("analysis", "expected compare, ablation, capacity, scaling or retrieval");
  s.task = w.str(j, "task", "lm");
  if (!kTasks.count(s.task)) w.fail("task", "expected lm or facts");
  if (s.task == "lm") s.data_dir = w.str(j, "data", checkpoint::kDefaultDataDir);
  if (s.task == "facts") {
    if (!j.contains("facts") || !j["facts"].is_object()) w.fail("facts", "required object for task facts");
    s.facts = j["facts"];
  }
  if (!j.contains("base_model") || !j["base_model"].is_object()) w.fail("base_model", "required object");
  if (!j.contains("runs") || !j["runs"].is_array() || j["runs"].empty()) w.fail("runs", "required non-empty array");

  std::vector<uint64_t> seeds = j.contains("seeds") ? w.seeds(j["seeds"], "seeds") : std::vector<uint64_t>{0};
  json train = j.value("train", json::object());
  if (!train.is_object()) w.fail("train", "expected an object");
  const bool cumulative = j.value("cumulative", false);

  json quick_model = json::object();
  std::set<std::string> quick_runs;
  if (quick) {
    if (!j.contains("quick")) w.fail("quick", "this suite has no quick variant");
    const json& q = j["quick"];
    w.only_keys(q, kQuickKeys, "quick");
    if (q.contains("train")) train.update(q["train"]);
    if (q.contains("model")) quick_model = q["model"];
    if (q.contains("seeds")) seeds = w.seeds(q["seeds"], "quick.seeds");
    if (q.contains("facts")) s.facts.update(q["facts"]);
    if (q.contains("runs"))
      for (const auto& r : q["runs"]) quick_runs.insert(r.get<std::string>());
  }

  json model = j["base_model"];
  std::set<std::string> names;
  for (size_t i = 0; i < j["runs"].size(); ++i) {
    const json& rj = j["runs"][i];
    const std::string where = "runs[" + std::to_string(i) + "]";
    w.only_keys(rj, kRunKeys, where);
    ExperimentRun r;
    r.name = w.str(rj, "name");
    if (r.name.find_first_of("/\\ ") != std::string::npos) w.fail(where + ".name", "no slashes or spaces");
    if (!names.insert(r.name).second) w.fail(where + ".name", "duplicate run name \"" + r.name + "\"");
    r.label = rj.value("label", r.name);
    json m = cumulative ? model : j["base_model"];
    if (rj.contains("model")) m.merge_patch(rj["model"]);
    if (cumulative) model = m;
    m.merge_patch(quick_model);
    m["name"] = s.name + "-" + r.name;
    r.model = m;
    r.train = train;
    if (rj.contains("train")) r.train.update(rj["train"]);
    r.tags = rj.value("tags", json::object());
    r.seeds = (rj.contains("seeds") && !quick) ? w.seeds(rj["seeds"], where + ".seeds") : seeds;
    if (quick && !quick_runs.empty() && !quick_runs.count(r.name)) continue;
    s.runs.push_back(std::move(r));
  }
  if (s.runs.empty()) w.fail("quick.runs", "selects no run");
  return s;
}

}  // namespace ultramem::experiment
