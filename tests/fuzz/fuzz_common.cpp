#include "fuzz_common.h"

#include <cxxabi.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <stdexcept>

namespace ultramem::fuzz {
namespace fs = std::filesystem;

namespace {
struct Scratch {
  std::string dir;
  Scratch() {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/ultramem-fuzz-XXXXXX";
    if (!::mkdtemp(pattern.data())) {
      std::perror("mkdtemp");
      std::abort();
    }
    dir = pattern;
  }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};
}  // namespace

const std::string& scratch_dir() {
  static Scratch s;
  return s.dir;
}

std::string write_input(const std::string& name, const uint8_t* data, size_t size) {
  const std::string path = scratch_dir() + "/" + name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  out.close();
  if (!out) finding("harness", "cannot write " + path);
  return path;
}

void copy_fixture(const std::string& fixture_dir, const std::string& name, const std::string& dir) {
  std::error_code ec;
  fs::copy_file(fs::path(fixture_dir) / name, fs::path(dir) / name, fs::copy_options::overwrite_existing, ec);
  if (ec) finding("harness", "cannot copy fixture " + fixture_dir + "/" + name + ": " + ec.message());
}

const std::string& fixtures_in_scratch(const std::string& fixture_dir) {
  static const std::string dir = [&] {
    for (const auto& e : fs::directory_iterator(fixture_dir))
      copy_fixture(fixture_dir, e.path().filename().string(), scratch_dir());
    return scratch_dir();
  }();
  return dir;
}

void finding(const char* target, const std::string& what) {
  std::fprintf(stderr, "fuzz finding in %s: %s\n", target, what.c_str());
  std::fflush(stderr);
  std::abort();
}

namespace detail {
std::string type_name(const std::type_info& t) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> name(abi::__cxa_demangle(t.name(), nullptr, nullptr, &status), std::free);
  return status == 0 && name ? std::string(name.get()) : std::string(t.name());
}
}  // namespace detail

}  // namespace ultramem::fuzz
