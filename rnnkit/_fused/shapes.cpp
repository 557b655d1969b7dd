// Which products' shapes oneDNN gets whole (blas.h: kExactShapes, for_shape_blocks).
//
// oneDNN compiles and keeps a kernel per shape; a side that is T*B changes at nearly every step of a run on
// bucketed data, so only kExactShapes shapes at a time are taken whole, the rest cut into a handful of
// block shapes. The first ones met are taken as they come (a run with fixed sizes meets a few per layer).
// Once that many are held, a new shape is cut, and it takes the place of the longest-unused shape held only
// when it is in steady use (met kHotUses times, each within kHotWindow products of the one before: a model
// of fixed sizes meets each of its shapes at least once a training step) and the shape it replaces has not
// been met for kStaleAfter products; and at most kMaxTakenIn times in a process. Without that, a long-lived
// process (a notebook, a sweep of models, `make bench`) cut every product of its later runs for good: `make
// bench` used up the 64 on its first 24 grid points, and the 24 after ran on cut products (up to 15% slower
// at small sizes, RNN B=32 T=100 H=64). Shapes that come and go with the batches (random T*B) should not get
// in: oneDNN keeps the kernel of every shape taken whole (~0.5 MB), and forgetting the shape here frees
// nothing. No rule on uses alone tells them apart from a model's own shapes: many (B, T) pairs share a T*B,
// both directions and stacked layers ask for the same T*B in one step, and a deep model asks for hundreds
// of products a step (T < 8: each step's recurrent product too). Reviews measured 3 uses within 1024 taking
// in 169 random shapes in 3600 steps of one LSTM layer (+397 MB), and 4 within 128 taking them in at every
// step of a 2-layer bidirectional GRU on bucketed lengths (+640 MB in 800 steps) while never taking in a
// 6-layer model's shapes at T = 7. Hence the cap: whatever the workload, at most kMaxTakenIn kernels more than
// the first kExactShapes (a 2-layer bidirectional GRU, H = 128, trained on bucketed lengths, levels off ~190 MB
// above the same run with every product cut, ~270 MB with a cap of 192), and a window wide enough for a deep
// model. `make bench` takes in 84.
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
constexpr int64_t kHotWindow = 512;
constexpr int64_t kStaleAfter = 1024;
constexpr int64_t kMaxTakenIn = 96;               // the default of g_max_taken_in
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
int64_t g_taken_in = 0;                            // shapes taken in after the first kExactShapes
int64_t g_max_taken_in = kMaxTakenIn;

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
  if (w.uses >= kHotUses && g_taken_in < g_max_taken_in && take_in(key)) {
    ++g_taken_in;
    g_watched.erase(key);
    return true;
  }
  if (g_watched.size() > kPendingMax) drop_stale_watches();
  return false;
}

int64_t set_exact_shapes(int64_t shapes, int64_t taken_in) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int64_t old = g_budget;
  g_budget = std::max<int64_t>(shapes, 0);
  g_max_taken_in = taken_in < 0 ? kMaxTakenIn : taken_in;
  g_held.clear();
  g_watched.clear();
  g_taken_in = 0;
  return old;
}

int64_t exact_shapes_held() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return static_cast<int64_t>(g_held.size());
}

}  // namespace rnnkit
