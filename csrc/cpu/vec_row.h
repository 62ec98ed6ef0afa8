// Vectors of the compute type (fp32 for fp16/bf16/fp32, fp64 for fp64) read from and written to
// rows of any of the four float dtypes: the pieces the CPU row kernels share.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
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

// exp for rows of x - max <= 0, within about 2 ulp of expf, fp32. With AVX-512: exp(x) = 2^k *
// exp(r), k = round(x / ln 2), r = x - k ln 2 in two parts, exp(r) = 1 + r + r^2 p(r) with Cephes'
// expf coefficients, and 2^k applied by vscalefps (which also gives 0 for 2^-150 and inf for
// 2^128): 13 instructions, against 19 for ATen's exp_u20. x is clamped at -104 first (exp(-104)
// is 0 in fp32) so that k * ln 2 stays finite for x = -inf. NaN stays NaN.
// Elsewhere: ATen's exp_u20 (within about 20 ulp), with NaN put back. fp64 keeps the accurate exp.
inline Vectorized<float> fast_exp(const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.0f), v);  // a NaN v is returned as is
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 e = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(e, k);
#else
  return Vectorized<float>::blendv(v.exp_u20(), v, v.isnan());  // exp_u20 maps NaN to a number
#endif
}
inline Vectorized<double> fast_exp(const Vectorized<double>& x) { return x.exp(); }

}  // namespace maskkern
