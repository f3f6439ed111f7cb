// data::load_prepared on a folder whose manifest.json is the input and whose tokenizer.model, train.bin and
// val.bin are the small prepared data of fixtures/prepared (written by make_seeds), so that a manifest
// that matches them reaches the tokenizer and shard checks. Refusals: std::runtime_error (prepared.h).
#include <stdexcept>

#include "fuzz_common.h"
#include "ultramem/data/prepared.h"

using namespace ultramem;

namespace {
const std::string& folder() {
  static const std::string dir = [] {
    for (const char* f : {"tokenizer.model", "train.bin", "val.bin"})
      fuzz::copy_fixture(ULTRAMEM_FUZZ_FIXTURES "/prepared", f, fuzz::scratch_dir());
    return fuzz::scratch_dir();
  }();
  return dir;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& dir = folder();
  fuzz::write_input("manifest.json", data, size);
  fuzz::refused_or_ok<std::runtime_error>("manifest", [&] { (void)data::load_prepared(dir); });
  return 0;
}
