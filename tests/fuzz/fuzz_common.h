// What the fuzz harnesses share: the input as a file in a scratch folder, and the line between an
// input the parser refuses as documented and a finding.
//
// A harness calls refused_or_ok<Refusals...>(fn): fn() returning, or throwing one of the Refusals (the
// exception types the parser's header promises for bad input), is fine; any other exception is a finding
// and aborts with its type and message, so that libFuzzer keeps the input as a crash. Crashes, sanitizer
// reports and hangs (libFuzzer's -timeout) are findings by themselves.
#pragma once
#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>
#include <typeinfo>

namespace ultramem::fuzz {

// This process's scratch folder (created on first use under $TMPDIR or /tmp, removed at exit).
const std::string& scratch_dir();

// Writes the bytes to <scratch_dir()>/<name> (replacing it) and returns its path.
std::string write_input(const std::string& name, const uint8_t* data, size_t size);

// Copies the fixture file <fixture_dir>/<name> to <dir>/<name>.
void copy_fixture(const std::string& fixture_dir, const std::string& name, const std::string& dir);
// Copies every file of <fixture_dir> into scratch_dir(), once per process; returns scratch_dir().
const std::string& fixtures_in_scratch(const std::string& fixture_dir);

// Prints "fuzz finding in <target>: <what>" and aborts.
[[noreturn]] void finding(const char* target, const std::string& what);

namespace detail {
template <typename F>
void call_catching(F& fn) {
  fn();
}
template <typename F, typename R, typename... Rest>
void call_catching(F& fn) {
  try {
    call_catching<F, Rest...>(fn);
  } catch (const R&) {
  }
}
std::string type_name(const std::type_info& t);
}  // namespace detail

template <typename... Refusals, typename F>
void refused_or_ok(const char* target, F&& fn) {
  try {
    detail::call_catching<F, Refusals...>(fn);
  } catch (const std::exception& e) {
    finding(target, "undocumented exception " + detail::type_name(typeid(e)) + ": " + e.what());
  } catch (...) {
    finding(target, "an exception not derived from std::exception");
  }
}

}  // namespace ultramem::fuzz
