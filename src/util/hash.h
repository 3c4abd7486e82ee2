// splitmix64 (Steele, Lea, Flood 2014): the mixing function behind every seeded choice in pipenag
// (weight initialisation, the document split, the shuffled batch order). Its output is part of
// the file formats and of reproducibility: changing it changes every prepared corpus and run.
#pragma once
#include <cstdint>

namespace pipenag {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace pipenag
