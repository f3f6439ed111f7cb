// safetensors reading and writing (https://github.com/huggingface/safetensors format), used for layer
// dumps and checkpoints.
//
// Layout: 8-byte little-endian header length L, then L bytes of JSON header
//   {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}
// padded with spaces to a multiple of 8, then the byte buffer. data_offsets are relative to the start of
// the byte buffer; the tensors tile it exactly (no gaps, no overlaps). Supported dtypes: F64 F32 F16 BF16
// I64 I32 I16 I8 U8 BOOL. Multi-byte values are little-endian (the host must be little-endian).
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace ultramem::io {

// Writes `tensors` (CPU or not, any layout that .contiguous() handles; sparse tensors are rejected) in
// the given order. Atomic: writes `path + ".tmp.<pid>"`, flushes and fsyncs it, renames it over `path`,
// then fsyncs the directory. Throws std::runtime_error (naming the file) on any failure, including
// duplicate or empty names, the reserved name "__metadata__" and unsupported dtypes.
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Reads every tensor (CPU, contiguous), in the order of their data offsets (for files written by
// save_safetensors, the order they were saved in). Fills *metadata with "__metadata__" when given.
// Validates the file and throws std::runtime_error naming the file and the problem: too short or
// truncated, header length beyond the file, invalid JSON, a malformed entry, unknown dtype, data_offsets
// out of range or inconsistent with shape x dtype size, overlapping offsets or gaps, duplicate names.
std::vector<std::pair<std::string, at::Tensor>> load_safetensors(
    const std::string& path, std::map<std::string, std::string>* metadata = nullptr);

}  // namespace ultramem::io
