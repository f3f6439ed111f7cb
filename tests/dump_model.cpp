// Builds the whole language model from a JSON config, runs one training forward/backward on random
// tokens and dumps everything to a safetensors file, for the independent pure-PyTorch reference
// (tests/python/test_model_parity.py).
//
// usage: dump_model OUT.safetensors --config CONFIG.json [--dtype double|float] [--seed S]
//
// Saved tensors: every parameter and buffer under its module name ("embedding",
// "blocks.1.moe.router", "memories.0.perm", ...), "tokens" and "targets" [B, T] int64, "logits"
// [B, T, V], "loss" = mean cross-entropy + the sum of the aux losses, each aux loss as "aux.<name>",
// and "grad.<param>" for every parameter (sparse gradients densified). Metadata: "config" (the model
// config as JSON, model_config_to_json), "dtype", "seed".
#include <torch/torch.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "ultramem/io/safetensors.h"
#include "ultramem/nn/model_config.h"
#include "ultramem/nn/transformer.h"

namespace {

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "dump_model: " << why << "\n"
            << "usage: dump_model OUT.safetensors --config CONFIG.json [--dtype double|float] [--seed S]\n";
  std::exit(2);
}

int run(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]).rfind("--", 0) == 0) usage("missing OUT.safetensors");
  const std::string out_path = argv[1];
  std::string config_path, dtype_name = "double", seed_text = "1234";
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a != "--config" && a != "--dtype" && a != "--seed") usage("unknown argument \"" + a + "\"");
    if (i + 1 >= argc) usage(a + " needs a value");
    (a == "--config" ? config_path : a == "--dtype" ? dtype_name : seed_text) = argv[++i];
  }
  if (config_path.empty()) usage("--config CONFIG.json is required");
  if (dtype_name != "double" && dtype_name != "float") usage("--dtype must be double or float, got \"" + dtype_name + "\"");
  uint64_t seed = 0;
  try {
    size_t pos = 0;
    seed = std::stoull(seed_text, &pos);
    if (pos != seed_text.size()) throw std::invalid_argument("trailing characters");
  } catch (const std::exception&) {
    usage("--seed must be a non-negative integer, got \"" + seed_text + "\"");
  }

  const auto cfg = ultramem::nn::load_model_config(config_path);
  if (cfg.dropout != 0.0)
    throw std::invalid_argument(config_path + ": dropout must be 0 for a deterministic parity dump");
  ultramem::nn::Transformer model(cfg);
  model->to(dtype_name == "double" ? torch::kDouble : torch::kFloat);
  model->train();  // the training path (BatchNorm query norms use batch statistics)

  std::vector<std::pair<std::string, torch::Tensor>> saved;
  for (const auto& p : model->named_parameters()) saved.emplace_back(p.key(), p.value().detach().clone());
  for (const auto& b : model->named_buffers()) saved.emplace_back(b.key(), b.value().detach().clone());

  const int64_t B = 2, T = std::min<int64_t>(cfg.max_seq_len, 12);
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const auto tokens = at::randint(cfg.vocab_size, {B, T}, gen, torch::kLong);   // [B, T]
  const auto targets = at::randint(cfg.vocab_size, {B, T}, gen, torch::kLong);  // [B, T]

  const auto logits = model->forward(tokens);  // [B, T, V]
  auto loss = torch::nn::functional::cross_entropy(logits.reshape({B * T, cfg.vocab_size}), targets.reshape({-1}));
  const auto aux = model->aux_losses();
  for (const auto& [name, value] : aux) loss = loss + value;
  loss.backward();

  saved.emplace_back("tokens", tokens);
  saved.emplace_back("targets", targets);
  saved.emplace_back("logits", logits.detach());
  saved.emplace_back("loss", loss.detach());
  for (const auto& [name, value] : aux) saved.emplace_back("aux." + name, value.detach());
  for (const auto& p : model->named_parameters()) {
    const auto& g = p.value().grad();
    if (!g.defined()) throw std::runtime_error("parameter " + p.key() + " got no gradient");
    saved.emplace_back("grad." + p.key(), g.is_sparse() ? g.to_dense() : g.detach().clone());
  }
  ultramem::io::save_safetensors(out_path, saved,
                                 {{"config", ultramem::nn::model_config_to_json(cfg).dump()},
                                  {"dtype", dtype_name},
                                  {"seed", std::to_string(seed)}});
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "dump_model: " << e.what() << "\n";
    return 1;
  }
}
