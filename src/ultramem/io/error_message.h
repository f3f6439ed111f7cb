// The message of an exception as a user should read it: libtorch's errors (c10::Error) carry a C++ stack
// trace in what(); this gives their message without it.
#pragma once
#include <c10/util/Exception.h>

#include <exception>
#include <string>

namespace ultramem::io {

inline std::string error_message(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

}  // namespace ultramem::io
