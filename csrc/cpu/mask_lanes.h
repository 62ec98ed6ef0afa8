// Bool masks as vector lane masks.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace maskkern {

// All-ones lanes where the bools at p are true, one bool per lane of Vectorized<acc_t>. ATen's
// VecMask::from(const bool*) writes the lanes one by one to memory and loads them back as a vector
// (a store-forwarding stall each time).
template <typename acc_t>
at::vec::Vectorized<acc_t> keep_lanes(const bool* p) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_castsi512_ps(_mm512_movm_epi32(_mm_test_epi8_mask(bytes, bytes)));
  } else {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm512_castsi512_pd(
        _mm512_movm_epi64(static_cast<__mmask8>(_mm_test_epi8_mask(bytes, bytes))));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i zero = _mm256_setzero_si256();
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(bytes), zero));
  } else {
    int32_t four;
    std::memcpy(&four, p, sizeof(four));
    const __m256i wide = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(four));
    return _mm256_castsi256_pd(_mm256_cmpgt_epi64(wide, zero));
  }
#else
  return at::vec::VecMask<acc_t, 1>::from(p);
#endif
}

}  // namespace maskkern
