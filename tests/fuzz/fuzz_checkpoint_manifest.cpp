// The shard manifest of a sharded checkpoint (metadata "shards", docs/distributed.md), as
// checkpoint::read_checkpoint reads it: the input is the manifest's JSON. The checkpoint's checksum covers
// its metadata, so a mutated file never gets past it (fuzz_checkpoint); here the harness writes each manifest
// into a valid main file with checkpoint::save_checkpoint, next to the two shard files of
// fixtures/checkpoint (the 2-rank save of make_seeds, whose manifest is the seed), and reads it whole, cut to
// columns, and as rank 1 of 2. Inputs that are not JSON are skipped. Refusals: std::runtime_error.
#include <torch/nn/module.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "fuzz_common.h"
#include "ultramem/checkpoint/checkpoint.h"

using namespace ultramem;

namespace {
// The module of make_seeds' sharded save: "values" [4, 6] lives in the shard files, the rest in the main file.
struct Small : torch::nn::Module {
  Small() {
    register_parameter("values", torch::zeros({4, 6}));
    register_parameter("bias", torch::zeros({3}));
    register_buffer("steps", torch::arange(5, torch::kInt64));
  }
};

const std::string& folder() { return fuzz::fixtures_in_scratch(ULTRAMEM_FUZZ_FIXTURES "/checkpoint"); }
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const nlohmann::json manifest = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (manifest.is_discarded() || manifest.is_null()) return 0;
  static Small model;
  const std::string path = folder() + "/ckpt.safetensors";
  checkpoint::CheckpointWriteOptions w;
  w.rng = false;
  w.exclude = {"model.values"};
  w.shards = manifest;
  checkpoint::save_checkpoint(path, model, nlohmann::json::object(), w);
  fuzz::refused_or_ok<std::runtime_error>("checkpoint_manifest", [&] {
    const checkpoint::Checkpoint c = checkpoint::read_checkpoint(path);
    for (const auto& [name, t] : c.model) (void)t.sum();
  });
  fuzz::refused_or_ok<std::runtime_error>("checkpoint_manifest", [&] {
    checkpoint::CheckpointReadOptions o;
    o.world = 2;
    o.rank = 1;
    o.skip_missing_columns = true;
    o.columns["model.values"] = {2, 5};
    o.columns["model.absent"] = {0, 1};
    const checkpoint::Checkpoint c = checkpoint::read_checkpoint(path, o);
    for (const auto& [name, t] : c.model) (void)t.sum();
  });
  return 0;
}
