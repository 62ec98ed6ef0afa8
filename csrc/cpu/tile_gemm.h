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

// The block for `rows` (<= MR) rows and `vecs` (<= NV) vectors.
template <typename T, int MR = kTileRows, int NV = kTileVecs>
void gemm_tail(int rows, int vecs, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B,
               int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  if constexpr (MR > 1) {
    if (rows < MR) {
      gemm_tail<T, MR - 1, NV>(rows, vecs, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
      return;
    }
  }
  if constexpr (NV > 1) {
    if (vecs < NV) {
      gemm_tail<T, MR, NV - 1>(rows, vecs, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
      return;
    }
  }
  gemm_block<T, MR, NV>(K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
}

// Rows [0, rows) (<= kTileRows), vectors [first, last) of C (+)= A · B.
template <typename T>
void gemm_row_block(int rows, int64_t first, int64_t last, int64_t K, const T* A, int64_t a_rs,
                    int64_t a_ks, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t lanes = at::vec::Vectorized<T>::size();
  constexpr int64_t strip = kTileVecs * lanes;
  int64_t n = first;
  for (; n + strip <= last; n += strip) {
    gemm_tail<T>(rows, kTileVecs, K, A, a_rs, a_ks, B + n, ldb, C + n, ldc, accumulate);
  }
  if (n < last) {
    gemm_tail<T>(rows, static_cast<int>((last - n) / lanes), K, A, a_rs, a_ks, B + n, ldb, C + n,
                 ldc, accumulate);
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
void tile_gemm(int64_t M, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B,
               int64_t ldb, T* C, int64_t ldc, bool accumulate, const Extent_of& extent_of) {
  constexpr int64_t lanes = at::vec::Vectorized<T>::size();
  for (int64_t m = 0; m < M; m += kTileRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kTileRows, M - m));
    const Extent e = extent_of(m, rows);
    TORCH_INTERNAL_ASSERT(e.col_begin % lanes == 0 && e.col_end % lanes == 0);
    const int64_t k0 = std::clamp<int64_t>(e.k_begin, 0, K);
    const int64_t depth = std::clamp<int64_t>(e.k_end, k0, K) - k0;
    if (depth == 0 && accumulate) {
      continue;
    }
    gemm_row_block<T>(rows, e.col_begin, e.col_end, depth, A + m * a_rs + k0 * a_ks, a_rs, a_ks,
                      B + k0 * ldb, ldb, C + m * ldc, ldc, accumulate);
  }
}

}  // namespace maskkern
