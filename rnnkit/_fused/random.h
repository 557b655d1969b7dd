// 0/1 masks for zoneout and recurrent dropout, drawn fast.
//
// torch's CPU bernoulli_ draws each element from its Mersenne twister, about 10-20 ns an element on
// these machines: for the zoneout masks of one training step (T*B*H per state) that alone costs a
// third of the step. Here element i is 1 when SplitMix64(seed, i) < p: the SplitMix64 generator's
// i-th output, a counter-based hash that the compiler vectorises, and that gives the same mask for
// the same seed whatever the number of threads. The Python side draws `seed` from torch's generator,
// so torch.manual_seed still makes the masks reproducible.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace rnnkit {

at::Tensor bernoulli_mask(at::IntArrayRef shape, double p, int64_t seed, at::ScalarType dtype);

}  // namespace rnnkit
