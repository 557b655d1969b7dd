// How far apart two of the process's CPUs are, measured: the round trip of one cache line between two
// threads pinned to them. For the benchmarks' record of the machine (benchmarks/bench_layers.py).
#pragma once

#include <cstdint>

namespace rnnkit {

// One round trip of a cache line between threads pinned to the first two CPUs of the calling thread's
// affinity mask, in ns: the median over 5 rounds (after 2 not counted) of `trips` each; -1 where there are
// not two such CPUs or threads cannot be pinned (not Linux). A round is cut short after 0.2 s. The calling
// thread is pinned while it measures, and gets its own CPU set back. Whatever else runs on those CPUs
// meanwhile slows it too: two processes measuring at once read ~310 ns on the Zen 5 box, where one reads ~80.
double core_round_trip_ns(int64_t trips);

}  // namespace rnnkit
