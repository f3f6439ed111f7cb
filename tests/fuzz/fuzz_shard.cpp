// data::TokenShard on one file, with and without payload verification; every token of an opened shard is
// read through at() and copy_to(). Refusals: std::runtime_error (shard.h).
#include <stdexcept>
#include <vector>

#include "fuzz_common.h"
#include "ultramem/data/shard.h"

using namespace ultramem;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_input("input.bin", data, size);
  for (const bool verify : {true, false}) {
    fuzz::refused_or_ok<std::runtime_error>("shard", [&] {
      data::ShardReadOptions o;
      o.verify_payload = verify;
      const auto shard = data::TokenShard::open(path, o);
      const int64_t n = shard->size();
      std::vector<int64_t> all(static_cast<size_t>(n));
      shard->copy_to(0, n, all.data());
      for (int64_t i = 0; i < n; ++i) {
        if (shard->at(i) != all[static_cast<size_t>(i)]) fuzz::finding("shard", "at() and copy_to() disagree");
        if (verify && (all[static_cast<size_t>(i)] < 0 || all[static_cast<size_t>(i)] >= shard->vocab_size()))
          fuzz::finding("shard", "a verified shard holds a token outside its vocabulary");
      }
    });
  }
  return 0;
}
