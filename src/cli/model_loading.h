// Building a Transformer from a checkpoint (its stored config) with the checkpoint's weights, for the
// subcommands. Any value format loads (float32, bf16, int8 memory value tables).
#pragma once
#include <string>

#include "ultramem/infer/model_loading.h"
#include "ultramem/nn/transformer.h"

namespace ultramem::cli {

nn::Transformer load_transformer(const std::string& checkpoint_path);

// The same with the loader's details; mmap: serve the value tables from a mapping of the file
// (infer::LoadOptions::mmap). Notes and warnings go to stderr.
infer::LoadedModel load_for_inference(const std::string& checkpoint_path, bool mmap);

}  // namespace ultramem::cli
