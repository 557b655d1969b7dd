// See cores.h. A 2-vCPU virtual machine does not see where the host runs its two vCPUs: on this box the
// round trip measured ~80 ns at times and ~390-430 ns at others, in spells of seconds to minutes, and in those
// spells whatever moves data between the two threads (the kernel's lanes, BLAS's threads, a buffer one
// thread wrote and the other reads) runs slower (docs/benchmarks.md: the box's slow mode).
#include "cores.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

namespace rnnkit {
namespace {

// Rounds measured, after rounds that are not: the first trips of a thread just woken ran 3x slower (280
// against 80 ns on the Zen 5 box, three calls in a row).
constexpr int kWarmUp = 2, kRounds = 5;

#if defined(__linux__)
bool pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof set, &set) == 0;
}

// The first two CPUs the calling thread may run on (its affinity mask, which threads it starts inherit), or
// {-1, -1}.
std::pair<int, int> two_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) return {-1, -1};
  int found[2] = {-1, -1}, n = 0;
  for (int c = 0; c < CPU_SETSIZE && n < 2; ++c) {
    if (CPU_ISSET(c, &set)) found[n++] = c;
  }
  return n == 2 ? std::pair<int, int>{found[0], found[1]} : std::pair<int, int>{-1, -1};
}
#endif

}  // namespace

double core_round_trip_ns(int64_t trips) {
#if defined(__linux__)
  const auto [a, b] = two_cpus();
  if (a < 0 || trips < 1) return -1.0;
  cpu_set_t saved;
  CPU_ZERO(&saved);
  if (pthread_getaffinity_np(pthread_self(), sizeof saved, &saved) != 0) return -1.0;
  alignas(64) std::atomic<int64_t> line{0};        // odd: the other thread's turn; even: ours
  std::atomic<bool> stop{false}, ready{false};
  std::vector<double> rounds;
  rounds.reserve(kRounds);                           // nothing below throws while `other` runs
  std::thread other([&] {
    if (!pin(b)) {
      stop = true;
      ready = true;
      return;
    }
    ready = true;
    while (!stop.load(std::memory_order_relaxed)) {
      const int64_t v = line.load(std::memory_order_acquire);
      if (v & 1) line.store(v + 1, std::memory_order_release);
    }
  });
  if (pin(a)) {
    while (!ready.load()) std::this_thread::yield();
    using clock = std::chrono::steady_clock;
    for (int r = 0; r < kWarmUp + kRounds && !stop.load(); ++r) {
      const auto t0 = clock::now();
      int64_t done = 0;
      for (; done < trips; ++done) {
        const int64_t v = line.load(std::memory_order_relaxed);
        line.store(v + 1, std::memory_order_release);
        while (line.load(std::memory_order_acquire) == v + 1) {
        }
        if ((done & 1023) == 1023 && clock::now() - t0 > std::chrono::milliseconds(200)) break;
      }
      const double ns = std::chrono::duration<double, std::nano>(clock::now() - t0).count();
      if (r >= kWarmUp) rounds.push_back(ns / double(done + 1 > trips ? trips : done + 1));
    }
  }
  stop = true;
  other.join();
  const bool restored = pthread_setaffinity_np(pthread_self(), sizeof saved, &saved) == 0;
  TORCH_CHECK(restored, "rnnkit core_round_trip_ns: could not give the calling thread its CPUs back");
  if (rounds.empty()) return -1.0;
  std::sort(rounds.begin(), rounds.end());
  return rounds[rounds.size() / 2];
#else
  (void)trips;
  return -1.0;
#endif
}

}  // namespace rnnkit
