// Proves that the sanitizers of this build are live, with the options the tests run under:
// each mode commits the one error its sanitizer must report (ctest expects the report).
//   race      two threads write one int without synchronisation (ThreadSanitizer)
//   overflow  a heap buffer overflow (AddressSanitizer)
//   leak      memory that nothing frees (LeakSanitizer, part of AddressSanitizer)
//   ub        a signed integer overflow (UndefinedBehaviorSanitizer)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

namespace {

int shared_counter = 0;
void* volatile sink = nullptr;  // volatile: the compiler keeps every store

int race() {
  std::thread a([] { shared_counter += 1; });
  std::thread b([] { shared_counter += 2; });
  a.join();
  b.join();
  return shared_counter > 0 ? 0 : 1;
}

int overflow(int n) {
  int* p = new int[4];
  volatile int count = n + 1;  // 5 ints into 4 (volatile: not known at compile time)
  std::memset(p, 0, count * sizeof(int));
  const int v = p[0];
  delete[] p;
  return v;
}

int leak() {
  sink = std::malloc(64);
  sink = nullptr;  // the only pointer is gone
  return 0;
}

int ub(int x) {
  volatile int y = x;
  const int z = y + 1;  // x == INT_MAX: signed overflow
  return z < 0 ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "";
  if (std::strcmp(mode, "race") == 0) return race();
  if (std::strcmp(mode, "overflow") == 0) return overflow(argc + 2);  // 4, not known at compile time
  if (std::strcmp(mode, "leak") == 0) return leak();
  if (std::strcmp(mode, "ub") == 0) return ub(std::atoi("2147483647"));
  std::fprintf(stderr, "usage: sanitizer_canary race|overflow|leak|ub\n");
  return 2;
}
