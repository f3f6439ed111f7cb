// io::read_json_file, the one reader of every config, run record and report. Refusals:
// std::runtime_error naming the file (json_file.h).
#include <stdexcept>

#include "fuzz_common.h"
#include "ultramem/io/json_file.h"

using namespace ultramem;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_input("input.json", data, size);
  fuzz::refused_or_ok<std::runtime_error>("json_file", [&] { (void)io::read_json_file(path); });
  return 0;
}
