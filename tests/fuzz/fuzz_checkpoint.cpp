// checkpoint::read_checkpoint (metadata, configs, checksum, and the shard manifest of a sharded
// checkpoint) and checkpoint::map_checkpoint on one main file. The folder holds the two shard files of
// fixtures/checkpoint (a 2-rank save, written by make_seeds), so a manifest that names them reaches the
// shard reading; the seeds include that save's main file. Refusals: std::runtime_error (checkpoint.h).
#include <ATen/ATen.h>

#include <filesystem>
#include <stdexcept>

#include "fuzz_common.h"
#include "ultramem/checkpoint/checkpoint.h"

using namespace ultramem;

namespace {
const std::string& folder() { return fuzz::fixtures_in_scratch(ULTRAMEM_FUZZ_FIXTURES "/checkpoint"); }
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  folder();
  const std::string path = fuzz::write_input("ckpt.safetensors", data, size);
  fuzz::refused_or_ok<std::runtime_error>("checkpoint", [&] {
    const checkpoint::Checkpoint c = checkpoint::read_checkpoint(path);
    for (const auto& [name, t] : c.model) (void)t.sum();
  });
  fuzz::refused_or_ok<std::runtime_error>("checkpoint", [&] {
    checkpoint::CheckpointReadOptions o;
    o.world = 2;
    o.rank = 1;
    o.skip_missing_columns = true;
    o.columns["model.values"] = {1, 3};
    (void)checkpoint::read_checkpoint(path, o);
  });
  fuzz::refused_or_ok<std::runtime_error>("checkpoint", [&] {
    const checkpoint::Checkpoint c = checkpoint::map_checkpoint(path);
    for (const auto& [name, t] : c.model) (void)t.sum();
  });
  return 0;
}
