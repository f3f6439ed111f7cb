// train::load_train_config (io::read_json_file + train::train_config_from_json + validation) on one file; a
// config it accepts goes through train_config_to_json and back to the same JSON. Refusals:
// std::runtime_error (unreadable file, not JSON) and std::invalid_argument (a bad key or value, named).
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "fuzz_common.h"
#include "ultramem/train/train_config.h"

using namespace ultramem;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_input("train.json", data, size);
  fuzz::refused_or_ok<std::runtime_error, std::invalid_argument>("train_config", [&] {
    const train::TrainConfig c = train::load_train_config(path);
    const nlohmann::json j = train::train_config_to_json(c);
    if (train::train_config_to_json(train::train_config_from_json(j)) != j)
      fuzz::finding("train_config", "to_json(from_json(to_json(c))) differs from to_json(c)");
  });
  return 0;
}
