// Epoch permutation; the definition is in shuffle.h.
#include "shuffle.h"

#include <algorithm>
#include <utility>

namespace repa_records {

uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void epoch_permutation(uint64_t n, uint64_t seed, uint64_t epoch, int64_t* out) {
  const uint64_t s = mix64(mix64(seed) ^ epoch);
  std::vector<std::pair<uint64_t, int64_t>> keyed(n);
  for (uint64_t i = 0; i < n; ++i)
    keyed[i] = {mix64(s + (i + 1) * 0x9E3779B97F4A7C15ull), static_cast<int64_t>(i)};
  // Keys are distinct (see shuffle.h), so comparing keys alone gives a total order.
  std::sort(keyed.begin(), keyed.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  for (uint64_t i = 0; i < n; ++i) out[i] = keyed[i].second;
}

}  // namespace repa_records
