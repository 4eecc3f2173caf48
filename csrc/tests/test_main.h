// A minimal test harness for the torch-free C++ parts (no test framework to install).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace hjcg_test {

inline std::vector<std::pair<std::string, std::function<void()>>>& registry() {
  static std::vector<std::pair<std::string, std::function<void()>>> tests;
  return tests;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().emplace_back(name, std::move(fn)); }
};

inline int& failures() {
  static int count = 0;
  return count;
}

inline int run_all() {
  int failed_tests = 0;
  for (auto& [name, fn] : registry()) {
    const int before = failures();
    fn();
    const bool ok = failures() == before;
    failed_tests += ok ? 0 : 1;
    std::printf("[%s] %s\n", ok ? "PASS" : "FAIL", name.c_str());
  }
  std::printf("%zu passed, %d failed\n", registry().size() - failed_tests, failed_tests);
  return failed_tests == 0 ? 0 : 1;
}

}  // namespace hjcg_test

#define TEST(name)                                                   \
  static void name();                                                \
  static hjcg_test::Register register_##name(#name, name);           \
  static void name()

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::printf("  %s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);          \
      ++hjcg_test::failures();                                                        \
    }                                                                                 \
  } while (0)

#define TEST_MAIN() \
  int main() { return hjcg_test::run_all(); }
