#include "ultramem/io/safetensors.h"

#include "ultramem/io/atomic_file.h"
#include "ultramem/io/endian.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

namespace ultramem::io {
namespace {

using ordered_json = nlohmann::ordered_json;

constexpr uint64_t kMaxHeader = uint64_t(100) << 20;  // as the reference implementation: 100 MB

struct DtypeInfo {
  const char* name;
  at::ScalarType type;
  int64_t size;
};

const DtypeInfo kDtypes[] = {
    {"F64", at::kDouble, 8},   {"F32", at::kFloat, 4}, {"F16", at::kHalf, 2},
    {"BF16", at::kBFloat16, 2}, {"I64", at::kLong, 8},  {"I32", at::kInt, 4},
    {"I16", at::kShort, 2},    {"I8", at::kChar, 1},   {"U8", at::kByte, 1},
    {"BOOL", at::kBool, 1},
};

const DtypeInfo* by_type(at::ScalarType t) {
  for (const auto& d : kDtypes)
    if (d.type == t) return &d;
  return nullptr;
}

const DtypeInfo* by_name(const std::string& s) {
  for (const auto& d : kDtypes)
    if (s == d.name) return &d;
  return nullptr;
}

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("safetensors: " + path + ": " + what);
}

std::string errno_str() { return std::strerror(errno); }

struct FileCloser {
  void operator()(std::FILE* f) const {
    if (f) std::fclose(f);
  }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

// a * b with an overflow check (both non-negative).
bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return true;
  *out = a * b;
  return false;
}

}  // namespace

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  if (!host_is_little_endian()) fail(path, "writing needs a little-endian host");
  ordered_json header = ordered_json::object();
  if (!metadata.empty()) {
    ordered_json meta = ordered_json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = std::move(meta);
  }
  std::set<std::string> names;
  std::vector<at::Tensor> data;
  data.reserve(tensors.size());
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name.empty()) fail(path, "empty tensor name");
    if (name == "__metadata__") fail(path, "tensor name \"__metadata__\" is reserved");
    if (!names.insert(name).second) fail(path, "duplicate tensor name \"" + name + "\"");
    if (!t.defined()) fail(path, "tensor \"" + name + "\" is undefined");
    if (t.is_sparse() || t.layout() != at::kStrided)
      fail(path, "tensor \"" + name + "\" is not a dense (strided) tensor; convert it with to_dense()");
    const DtypeInfo* d = by_type(t.scalar_type());
    if (!d)
      fail(path, "tensor \"" + name + "\" has unsupported dtype " + std::string(c10::toString(t.scalar_type())));
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    const uint64_t nbytes = static_cast<uint64_t>(c.numel()) * d->size;
    ordered_json e = ordered_json::object();
    e["dtype"] = d->name;
    e["shape"] = c.sizes().vec();
    e["data_offsets"] = {offset, offset + nbytes};
    header[name] = std::move(e);
    offset += nbytes;
    data.push_back(std::move(c));
  }
  // Pad with spaces so that the data buffer starts at a multiple of kSafetensorsAlignment in the file.
  std::string h = header.dump();
  h.append((kSafetensorsAlignment - (8 + h.size()) % kSafetensorsAlignment) % kSafetensorsAlignment, ' ');
  const uint64_t hlen = h.size();
  unsigned char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>(hlen >> (8 * i));

  std::vector<std::string_view> parts = {
      std::string_view(reinterpret_cast<const char*>(len_bytes), 8), std::string_view(h)};
  for (const auto& c : data)
    parts.emplace_back(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
  write_file_atomically(path, parts);
}

namespace {

struct Entry {
  std::string name;
  const DtypeInfo* dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;  // data_offsets
};

struct ParsedHeader {
  std::vector<Entry> entries;  // sorted by data offset, validated
  uint64_t file_size = 0;
  uint64_t data_start = 0;     // file offset of the data buffer (8 + header length)
};

// Reads and validates the header of the open file `f` (see load_safetensors for the checks). Returns the
// entries sorted by data offset.
ParsedHeader parse_header(const std::string& path, std::FILE* f, std::map<std::string, std::string>* metadata) {
  ParsedHeader out;
  struct stat st;
  if (::fstat(::fileno(f), &st) != 0) fail(path, "cannot stat: " + errno_str());
  if (!S_ISREG(st.st_mode)) fail(path, "not a regular file");
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8)
    fail(path, "file too short (" + std::to_string(file_size) + " bytes; a safetensors file has at least an 8-byte header length)");
  unsigned char len_bytes[8];
  if (std::fread(len_bytes, 1, 8, f) != 8) fail(path, "cannot read the header length");
  uint64_t hlen = 0;
  for (int i = 0; i < 8; ++i) hlen |= uint64_t(len_bytes[i]) << (8 * i);
  if (hlen > file_size - 8)
    fail(path, "header length " + std::to_string(hlen) + " is larger than the rest of the file (" +
                   std::to_string(file_size - 8) + " bytes): truncated or not a safetensors file");
  if (hlen > kMaxHeader) fail(path, "header length " + std::to_string(hlen) + " exceeds the 100 MB limit");
  if (hlen < 2) fail(path, "header of " + std::to_string(hlen) + " bytes cannot hold a JSON object");
  std::string h(hlen, '\0');
  if (std::fread(h.data(), 1, hlen, f) != hlen) fail(path, "cannot read the header");
  const uint64_t data_size = file_size - 8 - hlen;

  // Parse, rejecting duplicate keys in any object (nlohmann would silently keep one of them).
  std::vector<std::set<std::string>> key_stack;
  std::string dup;
  int dup_depth = 0;
  auto cb = [&](int depth, ordered_json::parse_event_t ev, ordered_json& parsed) {
    using E = ordered_json::parse_event_t;
    if (ev == E::object_start) key_stack.emplace_back();
    else if (ev == E::object_end) {
      if (!key_stack.empty()) key_stack.pop_back();
    } else if (ev == E::key && !key_stack.empty() && dup.empty()) {
      const std::string k = parsed.get<std::string>();
      if (!key_stack.back().insert(k).second) {
        dup = k;
        dup_depth = static_cast<int>(key_stack.size());
      }
    }
    return true;
  };
  ordered_json header;
  try {
    header = ordered_json::parse(h, cb);
  } catch (const nlohmann::json::exception& e) {
    fail(path, std::string("invalid JSON header: ") + e.what());
  }
  if (!dup.empty()) {
    if (dup_depth == 1) fail(path, "duplicate tensor name \"" + dup + "\" in the header");
    fail(path, "duplicate key \"" + dup + "\" in the header");
  }
  if (!header.is_object()) fail(path, "the JSON header is not an object");

  std::vector<Entry>& entries = out.entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const ordered_json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail(path, "\"__metadata__\" must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          fail(path, "\"__metadata__\" value of \"" + m.key() + "\" is not a string");
        if (metadata) (*metadata)[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string who = "tensor \"" + name + "\": ";
    if (!v.is_object()) fail(path, who + "entry is not an object");
    if (!v.contains("dtype") || !v["dtype"].is_string()) fail(path, who + "missing or non-string \"dtype\"");
    const std::string dt = v["dtype"].get<std::string>();
    const DtypeInfo* d = by_name(dt);
    if (!d) fail(path, who + "unknown or unsupported dtype \"" + dt + "\"");
    if (!v.contains("shape") || !v["shape"].is_array()) fail(path, who + "missing or non-array \"shape\"");
    Entry e{name, d, {}, 0, 0};
    uint64_t numel = 1;
    for (const auto& s : v["shape"]) {
      if (!s.is_number_unsigned()) fail(path, who + "shape entries must be non-negative integers, got " + s.dump());
      const uint64_t sz = s.get<uint64_t>();
      if (sz > uint64_t(std::numeric_limits<int64_t>::max()) || mul_overflows(numel, sz, &numel))
        fail(path, who + "shape " + v["shape"].dump() + " overflows");
      e.shape.push_back(static_cast<int64_t>(sz));
    }
    uint64_t nbytes;
    if (mul_overflows(numel, uint64_t(d->size), &nbytes)) fail(path, who + "shape " + v["shape"].dump() + " overflows");
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2 ||
        !v["data_offsets"][0].is_number_unsigned() || !v["data_offsets"][1].is_number_unsigned())
      fail(path, who + "\"data_offsets\" must be [begin, end] with non-negative integers");
    e.begin = v["data_offsets"][0].get<uint64_t>();
    e.end = v["data_offsets"][1].get<uint64_t>();
    const std::string offs = "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "]";
    if (e.end < e.begin) fail(path, who + offs + " has end < begin");
    if (e.end - e.begin != nbytes)
      fail(path, who + offs + " spans " + std::to_string(e.end - e.begin) + " bytes but shape " + v["shape"].dump() +
                     " of " + dt + " needs " + std::to_string(nbytes));
    if (e.end > data_size)
      fail(path, who + offs + " out of range: the data buffer has " + std::to_string(data_size) +
                     " bytes (truncated file?)");
    entries.push_back(std::move(e));
  }
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin < b.begin || (a.begin == b.begin && a.end < b.end);
  });
  uint64_t pos = 0;
  for (const auto& e : entries) {
    if (e.begin < pos)
      fail(path, "tensor \"" + e.name + "\": data_offsets [" + std::to_string(e.begin) + ", " +
                     std::to_string(e.end) + "] overlap the previous tensor (which ends at " + std::to_string(pos) + ")");
    if (e.begin > pos)
      fail(path, "tensor \"" + e.name + "\": data_offsets [" + std::to_string(e.begin) + ", " +
                     std::to_string(e.end) + "] leave a gap after byte " + std::to_string(pos));
    pos = e.end;
  }
  if (pos != data_size)
    fail(path, "the tensors cover " + std::to_string(pos) + " bytes of the " + std::to_string(data_size) +
                   "-byte data buffer (trailing bytes)");

  out.file_size = file_size;
  out.data_start = 8 + hlen;
  return out;
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> load_safetensors(const std::string& path,
                                                                 std::map<std::string, std::string>* metadata) {
  if (!host_is_little_endian()) fail(path, "reading needs a little-endian host");
  File f(std::fopen(path.c_str(), "rb"));
  if (!f) fail(path, "cannot open: " + errno_str());
  const ParsedHeader ph = parse_header(path, f.get(), metadata);
  const auto& entries = ph.entries;
  std::vector<std::pair<std::string, at::Tensor>> out;
  out.reserve(entries.size());
  for (const auto& e : entries) {
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.dtype->type));
    const uint64_t n = e.end - e.begin;
    if (n > 0) {
      const uint64_t at_byte = ph.data_start + e.begin;
      if (::fseeko(f.get(), static_cast<off_t>(at_byte), SEEK_SET) != 0)
        fail(path, "seek failed: " + errno_str());
      if (std::fread(t.data_ptr(), 1, n, f.get()) != n)
        fail(path, "tensor \"" + e.name + "\": short read (file truncated while reading?)");
    }
    out.emplace_back(e.name, std::move(t));
  }
  return out;
}

namespace {

// A read-only mapping of a whole file, unmapped when the last tensor viewing it is gone.
struct Mapping {
  void* addr = nullptr;
  size_t bytes = 0;
  ~Mapping() {
    if (addr != nullptr) ::munmap(addr, bytes);
  }
};

}  // namespace

MappedSafetensors map_safetensors(const std::string& path) {
  if (!host_is_little_endian()) fail(path, "reading needs a little-endian host");
  File f(std::fopen(path.c_str(), "rb"));
  if (!f) fail(path, "cannot open: " + errno_str());
  MappedSafetensors m;
  const ParsedHeader ph = parse_header(path, f.get(), &m.metadata);
  auto mapping = std::make_shared<Mapping>();
  mapping->bytes = ph.file_size;
  void* addr = ::mmap(nullptr, ph.file_size, PROT_READ, MAP_SHARED, ::fileno(f.get()), 0);
  if (addr == MAP_FAILED) fail(path, "mmap failed: " + errno_str());
  mapping->addr = addr;
  m.mapped_bytes = ph.file_size;
  const auto* base = static_cast<const unsigned char*>(addr);
  for (const auto& e : ph.entries) {
    const uint64_t at_byte = ph.data_start + e.begin, n = e.end - e.begin;
    const auto opts = at::TensorOptions().dtype(e.dtype->type);
    at::Tensor t;
    if (n > 0 && at_byte % kSafetensorsAlignment == 0) {
      // The deleter holds the mapping: it stays mapped while any view of it lives.
      t = at::from_blob(const_cast<unsigned char*>(base + at_byte), e.shape, [mapping](void*) {}, opts);
    } else {
      t = at::empty(e.shape, opts);
      if (n > 0) {
        std::memcpy(t.data_ptr(), base + at_byte, n);
        m.copied.push_back(e.name);
      }
    }
    m.tensors.emplace_back(e.name, std::move(t));
  }
  return m;
}

void advise_random_access(const at::Tensor& t) {
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + uintptr_t(t.numel()) * t.element_size();
  const uintptr_t first = (begin + page - 1) / page * page, last = end / page * page;  // whole pages inside
  if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_RANDOM);
}

}  // namespace ultramem::io
