// Building a Transformer from a checkpoint (its stored config) with the checkpoint's weights.
#pragma once
#include <string>

#include "ultramem/nn/transformer.h"

namespace ultramem::cli {

nn::Transformer load_transformer(const std::string& checkpoint_path);

}  // namespace ultramem::cli
