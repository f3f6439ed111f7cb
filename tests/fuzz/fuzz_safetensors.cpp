// io::load_safetensors and io::map_safetensors on one file: both refuse it (std::runtime_error) or both
// read it, with the same names, shapes, dtypes, bytes and metadata; every byte of every tensor is read.
#include <ATen/ATen.h>

#include <cstring>
#include <stdexcept>

#include "fuzz_common.h"
#include "ultramem/io/safetensors.h"

using namespace ultramem;

namespace {
uint64_t touch(const at::Tensor& t) {
  uint64_t sum = 0;
  if (t.numel() == 0) return sum;
  const auto* p = static_cast<const unsigned char*>(t.data_ptr());
  for (size_t i = 0, n = t.nbytes(); i < n; ++i) sum += p[i];
  return sum;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_input("input.safetensors", data, size);
  bool loaded = false, mapped = false;
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::map<std::string, std::string> metadata;
  io::MappedSafetensors m;
  fuzz::refused_or_ok<std::runtime_error>("safetensors", [&] {
    tensors = io::load_safetensors(path, &metadata);
    loaded = true;
  });
  fuzz::refused_or_ok<std::runtime_error>("safetensors", [&] {
    m = io::map_safetensors(path);
    mapped = true;
  });
  if (loaded != mapped)
    fuzz::finding("safetensors", loaded ? "load_safetensors reads a file map_safetensors refuses"
                                        : "map_safetensors reads a file load_safetensors refuses");
  if (!loaded) return 0;
  if (m.metadata != metadata) fuzz::finding("safetensors", "metadata differs between load and map");
  if (m.tensors.size() != tensors.size()) fuzz::finding("safetensors", "tensor count differs between load and map");
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, t] = tensors[i];
    const auto& [mname, mt] = m.tensors[i];
    if (name != mname || t.sizes() != mt.sizes() || t.scalar_type() != mt.scalar_type() || !t.is_contiguous() ||
        !mt.is_contiguous() || t.nbytes() != mt.nbytes())
      fuzz::finding("safetensors", "tensor '" + name + "' differs between load and map");
    if (t.nbytes() > 0 && std::memcmp(t.data_ptr(), mt.data_ptr(), t.nbytes()) != 0)
      fuzz::finding("safetensors", "bytes of tensor '" + name + "' differ between load and map");
    (void)touch(mt);
  }
  return 0;
}
