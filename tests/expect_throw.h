// Test helper shared by the test executables: expect an exception of type E whose message mentions
// `needle` (the field or value an error must name).
#pragma once
#include <gtest/gtest.h>

#include <string>

template <typename E, typename F>
void expect_throw_with(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an exception mentioning \"" << needle << "\"";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}
