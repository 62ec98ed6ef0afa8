// Vectors of the compute type (fp32 for fp16/bf16/fp32, fp64 for fp64) read from and written to
// rows of any of the four float dtypes: the pieces the CPU row kernels share.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <iterator>
#include <tuple>
#include <type_traits>

namespace maskkern {

using at::vec::Vectorized;

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

template <typename scalar_t>
constexpr int64_t kLanes = Vectorized<acc_type<scalar_t>>::size();

// Elements [0, count) of p, count <= kLanes; the lanes beyond count are 0 (callers mask them
// where 0 is not neutral).
template <typename scalar_t>
Vectorized<acc_type<scalar_t>> load(const scalar_t* p, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    return Vectorized<scalar_t>::loadu(p, count);
  } else {
    if (count == kLanes<scalar_t>) {
      Vectorized<float> v;
      at::vec::load_to_float(p, v);
      return v;
    }
    return std::get<0>(at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, count)));
  }
}

template <typename scalar_t>
void store(scalar_t* p, const Vectorized<acc_type<scalar_t>>& v, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    v.store(p, count);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, count);
  }
}

// The reductions of a row's vector partials (at::vec::vec_reduce_all): their sum, and their max,
// which keeps a NaN.
template <typename acc_t>
struct Sum {
  Vectorized<acc_t> operator()(const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) const {
    return a + b;
  }
};

template <typename acc_t>
struct Max {
  Vectorized<acc_t> operator()(const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) const {
    return at::vec::maximum(a, b);
  }
};

// The sum over elements [0, n) of a row of term(j, count), the vector of elements [j, j + count):
// fp32 vector sums over blocks of elements, added up in fp64, because one running fp32 sum drifts
// on long rows by as much as the fp32 tolerance. Four vector sums run side by side so that a cheap
// term (the backward's y * g) does not wait on the previous add.
template <typename acc_t, typename Term>
acc_t row_sum(int64_t n, const Term& term) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t lanes = Vec::size(), block = 64 * lanes, sums = 4;
  double total = 0;
  for (int64_t first = 0; first < n; first += block) {
    const int64_t end = std::min(n, first + block);
    std::array<Vec, sums> partial;
    partial.fill(Vec(0));
    int64_t j = first;
    for (; j + sums * lanes <= end; j += sums * lanes) {
      for (const auto k : c10::irange(sums)) {
        partial[k] = partial[k] + term(j + k * lanes, lanes);
      }
    }
    for (; j < end; j += lanes) {
      partial[0] = partial[0] + term(j, std::min(lanes, end - j));
    }
    const Vec all = (partial[0] + partial[1]) + (partial[2] + partial[3]);
    total += at::vec::vec_reduce_all<acc_t>(Sum<acc_t>(), all);
  }
  return static_cast<acc_t>(total);
}

// exp for rows of x - max <= 0, fp32. With AVX-512: exp(x) = 2^k exp(r), k = round(x / ln 2),
// r = x - k ln 2 in two parts, exp(r) by a degree-6 polynomial in Horner form (coefficients fitted
// to |r| <= ln 2 / 2 for least maximum relative error, 1.9e-9 in exact arithmetic), and 2^k applied
// by vscalefps (which also gives 0 for 2^-150 and inf for 2^128): 12 instructions, against 19 for
// ATen's exp_u20, and an FMA and an add fewer than Cephes' expf form 1 + r + r^2 p(r) (the forward
// is bound by them); within 1.0 ulp of exp on [-87, 0]. x is clamped at -104 first (exp(-104) is
// 0 in fp32) so that k ln 2 stays finite for x = -inf. NaN stays NaN.
// Elsewhere: ATen's exp_u20 (within about 20 ulp), with NaN put back. fp64 keeps the accurate exp.
inline Vectorized<float> fast_exp(const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  constexpr float kPoly[] = {1.383682014e-3f,
                             8.374824189e-3f,
                             4.166822508e-2f,
                             1.666641980e-1f,
                             4.999999106e-1f,
                             1.0f,
                             1.0f};                            // highest degree first
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.0f), v);  // a NaN v is returned as is
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(kPoly[0]);
  for (size_t i = 1; i < std::size(kPoly); ++i) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kPoly[i]));
  }
  return _mm512_scalef_ps(p, k);
#else
  return Vectorized<float>::blendv(v.exp_u20(), v, v.isnan());  // exp_u20 maps NaN to a number
#endif
}
inline Vectorized<double> fast_exp(const Vectorized<double>& x) { return x.exp(); }

}  // namespace maskkern
