// C (+)= A · B on small tiles held in L1/L2, for the flash-attention kernels: one register-blocked
// micro-kernel serves every product of the forward and the backward.
//
// A (M × K) is read one element at a time through two strides, a_rs between rows and a_ks between
// the K steps, so the same kernel takes A or Aᵀ from a row-major buffer (the backward's Pᵀ·dO and
// dSᵀ·Q read P and dS by columns). B (K × N) is row-major with leading dimension ldb, read as
// vectors; C (M × N) is row-major with leading dimension ldc. N must be a multiple of the vector
// width: callers pad their B and C buffers (the padding of B is zeros, so that of C is too).
//
// The micro-kernel keeps kTileRows × kTileVecs vectors of C in registers and per K step loads
// kTileVecs vectors of B and broadcasts kTileRows elements of A: with 16 vector registers
// (AVX2) 6 × 2 leaves room for the B vectors and one broadcast, the classic Haswell shape.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace maskkern {

constexpr int kTileRows = 6;
constexpr int kTileVecs = 2;

// C[0:MR, 0:NV vectors] (+)= A[0:MR, 0:K] · B[0:K, 0:NV vectors].
template <typename T, int MR, int NV>
void gemm_block(int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb, T* C,
                int64_t ldc, bool accumulate) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t lanes = Vec::size();
  Vec c[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      c[r][v] = accumulate ? Vec::loadu(C + r * ldc + v * lanes) : Vec(T(0));
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* b_row = B + k * ldb;
    const T* a_col = A + k * a_ks;
    Vec b[NV];
    for (int v = 0; v < NV; ++v) {
      b[v] = Vec::loadu(b_row + v * lanes);
    }
    for (int r = 0; r < MR; ++r) {
      const Vec a(a_col[r * a_rs]);
      for (int v = 0; v < NV; ++v) {
        c[r][v] = at::vec::fmadd(a, b[v], c[r][v]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      c[r][v].store(C + r * ldc + v * lanes);
    }
  }
}

// The block for the last rows (rows < MR) of a column strip of NV vectors.
template <typename T, int NV, int MR = kTileRows>
void gemm_rows(int rows, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb,
               T* C, int64_t ldc, bool accumulate) {
  if constexpr (MR > 1) {
    if (rows < MR) {
      gemm_rows<T, NV, MR - 1>(rows, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
      return;
    }
  }
  gemm_block<T, MR, NV>(K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
}

template <typename T, int NV>
void gemm_strip(int64_t M, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B,
                int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < M; m += kTileRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kTileRows, M - m));
    gemm_rows<T, NV>(rows, K, A + m * a_rs, a_rs, a_ks, B, ldb, C + m * ldc, ldc, accumulate);
  }
}

// C[M × N] = A · B, or C += A · B when accumulate; N % Vectorized<T>::size() == 0.
template <typename T>
void tile_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B,
               int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t lanes = at::vec::Vectorized<T>::size();
  TORCH_INTERNAL_ASSERT(N % lanes == 0);
  constexpr int64_t strip = kTileVecs * lanes;
  int64_t n = 0;
  for (; n + strip <= N; n += strip) {
    gemm_strip<T, kTileVecs>(M, K, A, a_rs, a_ks, B + n, ldb, C + n, ldc, accumulate);
  }
  // kTileVecs == 2: at most one vector is left.
  static_assert(kTileVecs == 2);
  if (n < N) {
    gemm_strip<T, 1>(M, K, A, a_rs, a_ks, B + n, ldb, C + n, ldc, accumulate);
  }
}

// The part of a banded product that a block of rows needs: columns [col_begin, col_end) (whole
// vectors) and K steps [k_begin, k_end).
struct Extent {
  int64_t col_begin, col_end, k_begin, k_end;
};

// C (+)= A · B where each block of up to kTileRows rows from m takes only extent(m, rows): under a
// band mask the products of a diagonal tile skip the pairs no row of the block can see. What lies
// outside a block's columns is left as it was; an empty K range stores zeros unless accumulate.
template <typename T, typename Extent_of>
void tile_gemm_banded(int64_t M, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B,
                      int64_t ldb, T* C, int64_t ldc, bool accumulate, const Extent_of& extent_of) {
  constexpr int64_t lanes = at::vec::Vectorized<T>::size();
  constexpr int64_t strip = kTileVecs * lanes;
  static_assert(kTileVecs == 2);
  for (int64_t m = 0; m < M; m += kTileRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kTileRows, M - m));
    const Extent e = extent_of(m, rows);
    TORCH_INTERNAL_ASSERT(e.col_begin % lanes == 0 && e.col_end % lanes == 0);
    const int64_t k0 = std::clamp<int64_t>(e.k_begin, 0, K);
    const int64_t depth = std::clamp<int64_t>(e.k_end, k0, K) - k0;
    if (depth == 0 && accumulate) {
      continue;
    }
    const T* a = A + m * a_rs + k0 * a_ks;
    const T* b = B + k0 * ldb;
    T* c = C + m * ldc;
    int64_t n = e.col_begin;
    for (; n + strip <= e.col_end; n += strip) {
      gemm_rows<T, kTileVecs>(rows, depth, a, a_rs, a_ks, b + n, ldb, c + n, ldc, accumulate);
    }
    if (n < e.col_end) {
      gemm_rows<T, 1>(rows, depth, a, a_rs, a_ks, b + n, ldb, c + n, ldc, accumulate);
    }
  }
}

}  // namespace maskkern
