// nn::load_model_config (io::read_json_file + nn::model_config_from_json + validation) on one file; a
// config it accepts goes through model_config_to_json and back to the same JSON. Refusals:
// std::runtime_error (unreadable file, not JSON) and std::invalid_argument (a bad key or value, named).
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "fuzz_common.h"
#include "ultramem/nn/model_config.h"

using namespace ultramem;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_input("model.json", data, size);
  fuzz::refused_or_ok<std::runtime_error, std::invalid_argument>("model_config", [&] {
    const nn::ModelConfig c = nn::load_model_config(path);
    const nlohmann::json j = nn::model_config_to_json(c);
    if (nn::model_config_to_json(nn::model_config_from_json(j)) != j)
      fuzz::finding("model_config", "to_json(from_json(to_json(c))) differs from to_json(c)");
  });
  return 0;
}
