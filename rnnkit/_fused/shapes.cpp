// Which products' shapes oneDNN gets whole (blas.h: kExactShapes, for_shape_blocks).
//
// oneDNN compiles and keeps a kernel per shape; a side that is T*B changes at nearly every step of a run on
// bucketed data, so only kExactShapes shapes at a time are taken whole, the rest cut into a handful of
// block shapes. The first ones met are taken as they come (a run with fixed sizes meets a few per layer).
// Once that many are held, a new shape is cut, and it takes the place of the longest-unused shape held only
// when it is in steady use (met kHotUses times, each within kHotWindow products of the one before: a model
// of fixed sizes meets each of its shapes once a training step) and the shape it replaces has not been met
// for kStaleAfter products. Without that, a long-lived process (a notebook, a sweep of models, `make bench`)
// cut every product of its later runs for good: `make bench` used up the 64 on its first 24 grid points, and
// the 24 after ran on cut products (up to 15% slower at small sizes, RNN B=32 T=100 H=64). Shapes that come
// and go with the batches (random T*B) must not get in: oneDNN keeps the kernel of every shape taken whole,
// and forgetting the shape here frees nothing. Many (B, T) pairs share a T*B, so a random T*B does recur:
// with 3 uses within 1024 products, a run on random B in [16, 64] and T in [50, 150] (3 such products a step)
// took in 169 shapes over 3600 steps and grew by 400 MB (a review's 4000-step run); with 4 uses within 128,
// a simulation of the policy on 50,000 such steps takes in none.
#include "blas.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>

namespace rnnkit {
namespace {

constexpr int64_t kHotUses = 4;
constexpr int64_t kHotWindow = 128;
constexpr int64_t kStaleAfter = 1024;
constexpr size_t kPendingMax = 4096;               // shapes under watch, stale ones dropped past this

using Key = std::array<int64_t, 4>;

struct Watch {
  int64_t uses = 0, last = 0;                      // uses in a row, each within kHotWindow; the last one's tick
};

std::mutex g_mutex;
std::map<Key, int64_t> g_held;                     // shapes taken whole -> when last met (a tick)
std::map<Key, Watch> g_watched;                    // shapes cut, under watch
int64_t g_budget = kExactShapes;
int64_t g_tick = 0;                                // one per product asked about

void drop_stale_watches() {
  for (auto it = g_watched.begin(); it != g_watched.end();) {
    it = g_tick - it->second.last > kHotWindow ? g_watched.erase(it) : std::next(it);
  }
}

// Takes `key` in, in place of the longest-unused shape held if that one is stale; false if none is.
bool take_in(const Key& key) {
  auto oldest = g_held.begin();
  for (auto it = g_held.begin(); it != g_held.end(); ++it) {
    if (it->second < oldest->second) oldest = it;
  }
  if (oldest == g_held.end() || g_tick - oldest->second <= kStaleAfter) return false;
  g_held.erase(oldest);
  g_held.emplace(key, g_tick);
  return true;
}

}  // namespace

bool exact_shape(int kind, bool ta, bool tb, int64_t m, int64_t n, int64_t k) {
  const Key key{kind * 4 + ta * 2 + tb, m, n, k};
  std::lock_guard<std::mutex> lock(g_mutex);
  const int64_t now = ++g_tick;
  if (auto it = g_held.find(key); it != g_held.end()) {
    it->second = now;
    return true;
  }
  if (static_cast<int64_t>(g_held.size()) < g_budget) {
    g_held.emplace(key, now);
    return true;
  }
  Watch& w = g_watched[key];
  w.uses = w.uses > 0 && now - w.last <= kHotWindow ? w.uses + 1 : 1;
  w.last = now;
  if (w.uses >= kHotUses && take_in(key)) {
    g_watched.erase(key);
    return true;
  }
  if (g_watched.size() > kPendingMax) drop_stale_watches();
  return false;
}

int64_t set_exact_shapes(int64_t shapes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int64_t old = g_budget;
  g_budget = std::max<int64_t>(shapes, 0);
  g_held.clear();
  g_watched.clear();
  return old;
}

int64_t exact_shapes_held() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return static_cast<int64_t>(g_held.size());
}

}  // namespace rnnkit
