// safetensors reading and writing (https://github.com/huggingface/safetensors format), used for layer
// dumps and checkpoints.
//
// Layout: 8-byte little-endian header length L, then L bytes of JSON header
//   {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}
// padded with spaces (the writer pads so that the byte buffer starts at a multiple of 64 bytes in the
// file; readers accept any padding), then the byte buffer. data_offsets are relative to the start of
// the byte buffer; the tensors tile it exactly (no gaps, no overlaps). Supported dtypes: F64 F32 F16 BF16
// I64 I32 I16 I8 U8 BOOL. Multi-byte values are little-endian (the host must be little-endian).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace ultramem::io {

// The writer starts the data buffer at a multiple of this many bytes in the file, so a tensor whose
// data offset is a multiple of it is aligned in a memory mapping of the file (a cache line). Tensors
// tile the buffer without gaps (the format forbids them), so callers that want every large tensor
// aligned put the tensors whose byte size is a multiple of 64 first (as checkpoints do).
inline constexpr uint64_t kSafetensorsAlignment = 64;

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

// A safetensors file mapped into memory instead of read.
struct MappedSafetensors {
  std::vector<std::pair<std::string, at::Tensor>> tensors;  // in data-offset order
  std::map<std::string, std::string> metadata;
  std::vector<std::string> copied;  // tensors not 64-byte aligned in the file: copied into memory instead
  uint64_t mapped_bytes = 0;        // size of the mapping (the whole file)
};

// Maps the file read-only (mmap PROT_READ, MAP_SHARED) after the same validation as load_safetensors.
// Tensors that start at a multiple of kSafetensorsAlignment in the file are views of the mapping: their
// pages are read from the file (or the page cache) on first touch, nothing is copied, and they must
// never be written (the memory is read-only). Every view keeps the mapping alive; it is unmapped when
// the last one is destroyed. Other tensors (unaligned, or empty) are copied into ordinary memory and
// listed in `copied` (empty ones are not listed).
MappedSafetensors map_safetensors(const std::string& path);

// madvise(MADV_RANDOM) over the whole pages of a mapped tensor: no read-ahead around a page fault, which
// suits tables read at random rows (a first touch then reads one page, not a read-ahead window).
void advise_random_access(const at::Tensor& mapped);

}  // namespace ultramem::io
