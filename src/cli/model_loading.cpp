#include "model_loading.h"

#include <iostream>

namespace ultramem::cli {

infer::LoadedModel load_for_inference(const std::string& checkpoint_path, bool mmap) {
  infer::LoadOptions o;
  o.mmap = mmap;
  o.warn = [](const std::string& s) { std::cerr << "note: " << s << std::endl; };
  return infer::load_model(checkpoint_path, o);
}

nn::Transformer load_transformer(const std::string& checkpoint_path) {
  return load_for_inference(checkpoint_path, /*mmap=*/false).model;
}

}  // namespace ultramem::cli
