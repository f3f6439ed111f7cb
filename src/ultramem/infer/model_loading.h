// Loading a language model for inference from a checkpoint of any value format (float32, bf16 or int8
// memory value tables), optionally with the value tables memory-mapped from the file instead of read.
#pragma once
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ultramem/nn/memory_config.h"
#include "ultramem/nn/transformer.h"

namespace ultramem::infer {

struct LoadOptions {
  // Map the checkpoint file (read-only) and serve the UltraMem value tables from the mapping: nothing
  // of them is copied, pages are read from the file on first touch, so a table larger than RAM can be
  // served (from the page cache). The other weights are copied into the model. The checksum is not
  // verified (it would read the whole file); sharded checkpoints cannot be mapped.
  bool mmap = false;
  // Key storage of the UltraMem layers' fused inference path (UltraMemImpl::set_key_format): fp32 as
  // trained, or bf16 / int8 compact keys. Unset: the checkpoint's recorded format (quantize --keys),
  // fp32 when none is recorded.
  std::optional<nn::ValueFormat> key_format;
  // Storage of the dense matrices the decode ops read (nn::TransformerImpl::set_weight_format): bf16 or
  // int8 compact copies, the parameters rounded to match. Unset: the checkpoint's recorded format
  // (quantize --weights), fp32 when none is recorded. fp32 on a checkpoint recorded compact keeps its
  // (already rounded) weights and reads them as float32.
  std::optional<nn::ValueFormat> weight_format;
  // Retrieval filter of the UltraMem layers (UltraMemImpl::set_filter), overriding the trained one:
  // "rank1", "two_sign" with filter_m_neg (0: m_first / 2), or "rank_r" with filter_rank (0: r); and
  // filter_m_first (0: the layer's).
  // Empty: as trained.
  std::string filter;
  int64_t filter_m_neg = 0, filter_m_first = 0, filter_rank = 0;
  // A folder of value-table files (value_table_files.h: <dir>/<layer>.table, `ultramem export-tables`): each
  // UltraMem layer reads its rows from its file behind a row cache, the caches together capped at
  // value_cache_bytes; the checkpoint is then memory-mapped as with `mmap` (its own tables stay unread).
  // Empty: the tables of the checkpoint.
  std::string value_tables;
  int64_t value_cache_bytes = int64_t(4) << 30;
  // Receives notes and warnings (e.g. a tensor that could not be mapped and was copied). Null: silent.
  std::function<void(const std::string&)> warn;
};

struct LoadedModel {
  nn::Transformer model{nullptr};     // in eval mode
  nlohmann::json train_config;        // null when the checkpoint has none
  nn::ValueFormat value_format = nn::ValueFormat::kFloat32;
  nn::ValueFormat key_format = nn::ValueFormat::kFloat32;  // what the model now uses
  nn::ValueFormat weight_format = nn::ValueFormat::kFloat32;  // what the model now uses
  int64_t value_bytes = 0;            // all UltraMem value tables, per-row scales included
  int64_t mapped_tables = 0;          // value tables served from the mapping (mmap)
  int64_t file_tables = 0;            // value tables served from table files (value_tables)
  int64_t mapped_permutations = 0;    // value_tables: stored permutations used from the mapping, not copied
  std::vector<std::string> copied;    // mmap: model tensors copied, not mapped (not 64-byte aligned in the
                                      // file; small odd-sized ones always are, warn() names value tables)
};

// Builds the model from the checkpoint's stored config and loads its weights; the value tables keep
// the checkpoint's format (UltraMemImpl::value_format). Throws std::runtime_error naming the file for
// unreadable, corrupt or mismatching checkpoints.
LoadedModel load_model(const std::string& path, const LoadOptions& options = {});

}  // namespace ultramem::infer
