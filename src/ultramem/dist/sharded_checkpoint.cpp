#include "ultramem/dist/sharded_checkpoint.h"

#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "ultramem/dist/process_group.h"
#include "ultramem/train/optimizer.h"

namespace ultramem::dist {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

const std::string kSuffix = checkpoint::kCheckpointSuffix;

bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

// The file names under which the pieces of parameter `name` are stored.
std::vector<std::string> split_names(const std::string& name, bool with_optimizer) {
  std::vector<std::string> out = {"model." + name};
  if (with_optimizer) {
    out.push_back("optim." + name + ".exp_avg");
    out.push_back("optim." + name + ".exp_avg_sq");
  }
  return out;
}

// Removes this rank's shard files of earlier saves of `stem` (rank 0: also those of other world sizes).
void remove_stale_shards(const fs::path& dir, const std::string& stem, const std::string& keep, int64_t rank,
                         int64_t world) {
  std::error_code ec;
  const std::string mine = ".rank" + std::to_string(rank) + "-of-" + std::to_string(world) + kSuffix;
  const std::string any_world = "-of-" + std::to_string(world) + kSuffix;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string n = entry.path().filename().string();
    if (n == keep || !checkpoint::is_shard_file_of(stem, n)) continue;
    const bool own = ends_with(n, mine);
    const bool other_world = rank == 0 && !ends_with(n, any_world);
    if (own || other_world) fs::remove(entry.path(), ec);
  }
}

}  // namespace

void save_sharded_checkpoint(Group& group, const std::vector<ShardedParameter>& sharded, const std::string& path,
                             const torch::nn::Module& model, const nlohmann::json& model_config,
                             const checkpoint::CheckpointWriteOptions& options) {
  const int64_t rank = group.rank(), world = group.size();
  const fs::path dir = fs::path(path).parent_path();
  const std::string stem = checkpoint::checkpoint_stem(path);
  int64_t step = 0;
  if (options.trainer_state.is_object() && options.trainer_state.contains("step"))
    step = options.trainer_state.at("step").get<int64_t>();

  // 1. A token that makes this save's shard names unique (a re-save at the same step never overwrites a
  // shard the committed manifest refers to).
  torch::Tensor token_t = torch::zeros({1}, torch::kLong);
  if (rank == 0)
    token_t[0] = static_cast<int64_t>(std::chrono::steady_clock::now().time_since_epoch().count() & 0xffffffffLL);
  group.broadcast(token_t, 0, "checkpoint");
  char token[16];
  std::snprintf(token, sizeof token, "%08llx", static_cast<unsigned long long>(token_t.item<int64_t>()));
  const std::string mine = checkpoint::shard_file_name(stem, step, token, rank, world);

  // 2. This rank's shard.
  std::map<std::string, torch::Tensor> optim_state;
  if (options.optim)
    for (auto& [n, t] : *options.optim) optim_state.emplace(n, t);
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  json columns_of = json::object();
  for (const auto& sp : sharded) {
    tensors.emplace_back("model." + sp.name, sp.param.detach());
    if (options.optim) {
      for (const char* moment : {".exp_avg", ".exp_avg_sq"}) {
        auto it = optim_state.find(sp.name + moment);
        if (it == optim_state.end())
          throw std::runtime_error("checkpoint " + path + ": optimizer has no state '" + sp.name + moment + "'");
        tensors.emplace_back("optim." + sp.name + moment, it->second);
      }
    }
  }
  if (options.rng) tensors.emplace_back("rng.cpu", checkpoint::get_rng_state());
  int64_t crc = -1;
  std::string error;
  try {
    const std::string sum = checkpoint::save_checkpoint_shard(
        (dir / mine).string(), tensors, json{{"rank", rank}, {"world", world}, {"step", step}, {"main", stem + kSuffix}});
    crc = static_cast<int64_t>(std::stoul(sum.substr(sum.find(':') + 1), nullptr, 16));
  } catch (const std::exception& e) {
    error = e.what();
  }

  // 3. Checksums (or -1 for a failed write) of every rank.
  const torch::Tensor crcs = group.all_gather(torch::full({1}, crc, torch::kLong), "checkpoint");
  for (int64_t j = 0; j < world; ++j)
    if (crcs[j].item<int64_t>() < 0)
      throw std::runtime_error("checkpoint " + path + ": rank " + std::to_string(j) + " could not write its shard" +
                               (j == rank ? ": " + error : std::string(" (see that rank's error)")) +
                               "; the previous checkpoint is unchanged");

  // 4. Rank 0 commits the main file with the manifest.
  std::string commit_error;
  if (rank == 0) {
    json files = json::array();
    for (int64_t j = 0; j < world; ++j) {
      char sum[24];
      std::snprintf(sum, sizeof sum, "crc32:%08llx", static_cast<unsigned long long>(crcs[j].item<int64_t>()));
      files.push_back({{"file", checkpoint::shard_file_name(stem, step, token, j, world)}, {"checksum", sum}});
    }
    json manifest_tensors = json::object();
    checkpoint::CheckpointWriteOptions o = options;
    for (const auto& sp : sharded) {
      const int64_t rows = sp.param.size(0);
      const int64_t w = sp.full_cols / world;
      json cols = json::array();
      for (int64_t j = 0; j < world; ++j) cols.push_back({j * w, (j + 1) * w});
      for (const auto& n : split_names(sp.name, options.optim.has_value())) {
        manifest_tensors[n] = {{"shape", {rows, sp.full_cols}}, {"columns", cols}};
        o.exclude.insert(n);
      }
    }
    o.shards = {{"world", world}, {"step", step}, {"files", files}, {"tensors", manifest_tensors}};
    try {
      checkpoint::save_checkpoint(path, model, model_config, o);
    } catch (const std::exception& e) {
      commit_error = e.what();
    }
  }
  torch::Tensor ok = torch::full({1}, commit_error.empty() ? int64_t(1) : int64_t(0), torch::kLong);
  group.broadcast(ok, 0, "checkpoint");
  if (ok.item<int64_t>() == 0) {
    std::error_code ec;
    fs::remove(dir / mine, ec);  // never referenced by a committed manifest
    throw std::runtime_error(rank == 0 ? commit_error
                                       : "checkpoint " + path + ": rank 0 could not write the main file (see its error)");
  }

  // 5. Old shards of this stem are no longer referenced.
  remove_stale_shards(dir.empty() ? fs::path(".") : dir, stem, mine, rank, world);
}

checkpoint::Checkpoint read_sharded_checkpoint(const Group& group, const std::vector<ShardedParameter>& sharded,
                                          const std::string& path) {
  checkpoint::CheckpointReadOptions o;
  o.rank = group.rank();
  o.world = group.size();
  o.skip_missing_columns = true;  // a weights-only checkpoint has no optimizer moments
  for (const auto& sp : sharded)
    for (const auto& n : split_names(sp.name, true)) o.columns[n] = {sp.cols.begin, sp.cols.end};
  return checkpoint::read_checkpoint(path, o);
}

}  // namespace ultramem::dist
