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

// exp_u20 is ATen's AVX2 polynomial: no Sleef call, and within about 20 ulp (1e-6 relative, the
// fp32 tolerance is 1e-5; -inf gives 0). It maps NaN to a finite number, so callers keep NaN away
// from it. fp64 keeps the accurate exp.
inline Vectorized<float> fast_exp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> fast_exp(const Vectorized<double>& x) { return x.exp(); }

}  // namespace maskkern
