// Deterministic epoch permutation shared by the native and NumPy implementations.
//
// Definition (repa_e_fast/data/order.py reproduces it with vectorised NumPy uint64 arithmetic):
//   mix64(z)     = splitmix64 finaliser: z ^= z>>30; z *= 0xBF58476D1CE4E5B9;
//                  z ^= z>>27; z *= 0x94D049BB133111EB; z ^= z>>31   (all mod 2^64)
//   s            = mix64(mix64(seed) ^ epoch)
//   key[i]       = mix64(s + (i + 1) * 0x9E3779B97F4A7C15)
//   permutation  = the indices 0..n-1 sorted by key, ascending.
// mix64 is a bijection and the golden-ratio increment is odd, so all keys of one epoch
// are distinct: the sort has no ties and the result is unique, whatever sort is used.
#pragma once

#include <cstdint>
#include <vector>

namespace repa_records {

uint64_t mix64(uint64_t z);
void epoch_permutation(uint64_t n, uint64_t seed, uint64_t epoch, int64_t* out);

}  // namespace repa_records
