// attention on CPU: flash attention (FlashAttention-2) under maskkern's masks.
//
// The scores are never held whole: a task takes a tile of block_q queries and walks the key tiles
// of block_k keys it may see, in per-thread fp32 (fp64) tile buffers. The forward keeps, per
// query, the running max m and sum l of the online softmax and rescales its output accumulator
// when m grows; at the end out = O / l and lse = m + log l (+inf, with out = 0, for a query that
// saw nothing). The backward recomputes P = exp(s - lse) tile by tile.
//
// Tile skipping. Query i of a sequence sees the keys of one band, [key_begin(i), key_end(i)):
// lengths (n_k), causal and the window cut it, and both ends grow with i. So a query tile's key
// tiles are a range computed from its first and last query, and a key tile's query tiles likewise
// (the backward); tiles outside are never read. mask_tiles removes the tiles a bool mask empties,
// in both passes.
// A tile inside the band of each of its rows, with no bool mask or mask_tiles saying "all kept",
// takes no per-element mask work; the others (diagonal, edges, window borders, "some") blend -inf
// in by lane masks. Queries beyond n_q are never computed: their out is zeros, their lse +inf.
//
// The products run on tile_gemm.h's micro-kernel. The forward holds the scores transposed,
// Sᵀ = K·(scale Q)ᵀ (block_k × block_q): its one transpose is of the query tile, once per task;
// the softmax's max and sum run down the columns, with no horizontal reductions; K is read in place
// (fp32 / fp64). The backward, one task per strip of key tiles, transposes (scale K) and V once per
// key tile and keeps S, P, dP and dS in rows:
//   S = Q·(scale K)ᵀ, P = exp(S - lse), dP = dO·Vᵀ, dS = scale P (dP - δ), δ = rowsum(dO ⊙ O),
//   dV += Pᵀ·dO, dK += dSᵀ·Q, dQ += dS·K.
// A key tile's dK and dV are summed in per-thread accumulators over the query heads of its kv head
// and their query tiles, then written once. dQ takes contributions from every key tile: the key
// tiles of a (sequence, kv head) are dealt round-robin to `splits` tasks, each adding into its own
// copy of dQ (dq itself for fp32 / fp64 when there is one copy), and the copies are summed in a
// fixed order at the end. splits is 1 when the (sequence, kv head) pairs already give every thread
// several tasks, so most calls hold no copy. Every sum runs in a fixed order: the results do not
// depend on which thread runs which task (they do on the thread count, through splits).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu/mask_lanes.h"
#include "cpu/output_memory.h"
#include "cpu/parallel.h"
#include "cpu/tile_gemm.h"
#include "cpu/vec_row.h"

namespace maskkern {
namespace {

constexpr int64_t ceil_div(int64_t n, int64_t d) { return (n + d - 1) / d; }
constexpr int64_t round_up(int64_t n, int64_t d) { return ceil_div(n, d) * d; }

// --- geometry --------------------------------------------------------------------------------

// One batch item (padded) or packed sequence.
struct Sequence {
  int64_t b;       // index into the batch dim of every tensor (0 when packed)
  int64_t q0, k0;  // its first query / key row in the L dims
  // Its query and key counts (query_lengths and lengths, or its rows when packed): queries from n_q
  // on are not computed, and every query's band [key_begin(i), key_end(i)) ends by n_k.
  int64_t n_q, n_k;
  // The rows it owns from q0 (k0): its outputs there are written, as zeros where not computed.
  int64_t rows_q, rows_k;
  // The band: key j is seen by query i when j >= i + lo (if has_lo) and j <= i + hi (if has_hi).
  bool has_lo, has_hi;
  int64_t lo, hi;

  int64_t key_begin(int64_t i) const { return has_lo ? std::clamp<int64_t>(i + lo, 0, n_k) : 0; }
  int64_t key_end(int64_t i) const {
    return has_hi ? std::clamp<int64_t>(i + hi + 1, 0, n_k) : n_k;
  }
  int64_t query_begin(int64_t j) const { return has_hi ? std::clamp<int64_t>(j - hi, 0, n_q) : 0; }
  int64_t query_end(int64_t j) const {
    return has_lo ? std::clamp<int64_t>(j - lo + 1, 0, n_q) : n_q;
  }
};

struct Geometry {
  int64_t batch, Lq, Lk;  // the tensors' dims (batch 1, L = the totals when packed)
  int64_t Hq, Hkv, group, D, Dv, BQ, BK;
  int64_t causal, left, right;
  const int64_t* lengths;
  const int64_t* query_lengths;
  const int64_t* cu_q;
  const int64_t* cu_k;
  // batch, or the packed sequences and one more: the rows past the last, which see nothing.
  int64_t sequences;

  bool packed() const { return cu_q != nullptr; }

  Sequence sequence(int64_t s) const {
    Sequence sq{};
    if (packed()) {
      sq.b = 0;
      sq.q0 = cu_q[s];
      sq.k0 = cu_k[s];
      const bool tail = s == sequences - 1;
      sq.rows_q = (tail ? Lq : cu_q[s + 1]) - sq.q0;
      sq.rows_k = (tail ? Lk : cu_k[s + 1]) - sq.k0;
      sq.n_q = tail ? 0 : sq.rows_q;
      sq.n_k = tail ? 0 : sq.rows_k;
    } else {
      sq.b = s;
      sq.rows_q = Lq;
      sq.rows_k = Lk;
      sq.n_q = query_lengths ? std::clamp<int64_t>(query_lengths[s], 0, Lq) : Lq;
      sq.n_k = lengths ? std::clamp<int64_t>(lengths[s], 0, Lk) : Lk;
    }
    const int64_t o = causal == 2 ? (packed() ? sq.n_k - sq.n_q : Lk - Lq) : 0;
    sq.has_lo = left >= 0;
    sq.lo = o - left;
    sq.has_hi = causal != 0 || right >= 0;
    sq.hi = o + (causal != 0 ? 0 : right);
    return sq;
  }
};

Geometry make_geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& lengths, const at::Tensor& query_lengths,
                       const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t causal,
                       int64_t window_left, int64_t window_right, int64_t block_q,
                       int64_t block_k) {
  Geometry g{};
  g.batch = q.size(0);
  g.Hq = q.size(1);
  g.Lq = q.size(2);
  g.D = q.size(3);
  g.Hkv = k.size(1);
  g.Lk = k.size(2);
  g.Dv = v.size(3);
  g.group = g.Hkv > 0 ? g.Hq / g.Hkv : 1;
  g.BQ = block_q;
  g.BK = block_k;
  g.causal = causal;
  // A window wider than Lq + Lk bounds nothing; clamped, i + lo and i + hi cannot overflow.
  g.left = window_left < 0 ? -1 : std::min(window_left, g.Lq + g.Lk);
  g.right = window_right < 0 ? -1 : std::min(window_right, g.Lq + g.Lk);
  g.lengths = lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
  g.query_lengths = query_lengths.defined() ? query_lengths.const_data_ptr<int64_t>() : nullptr;
  g.cu_q = cu_q.defined() ? cu_q.const_data_ptr<int64_t>() : nullptr;
  g.cu_k = cu_k.defined() ? cu_k.const_data_ptr<int64_t>() : nullptr;
  g.sequences = g.packed() ? cu_q.numel() : g.batch;
  return g;
}

// The sequences in the order their tasks are handed out: the costliest first, so that the tasks
// left for the end, when threads run out of work, are short ones.
std::vector<int64_t> by_cost(const Geometry& g) {
  std::vector<int64_t> order(g.sequences), cost(g.sequences);
  std::iota(order.begin(), order.end(), 0);
  for (const auto s : c10::irange(g.sequences)) {
    const Sequence sq = g.sequence(s);
    cost[s] = sq.n_q * sq.n_k;
  }
  std::stable_sort(order.begin(), order.end(),
                   [&cost](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

// --- operands --------------------------------------------------------------------------------

// Rows of a 4-D (batch, head, row, :) tensor with unit last stride.
template <typename T>
struct Rows {
  T* data;
  int64_t sb, sh, si;

  T* row(int64_t b, int64_t h, int64_t i) const { return data + b * sb + h * sh + i * si; }
};

template <typename T>
Rows<const T> rows_of(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
Rows<T> writable_rows_of(at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// The gradient of x in x's own layout when that is dense with unit last stride (else contiguous):
// autograd then accumulates it into .grad, or hands it back through the view that made x (the
// (batch, L, H, D) projections' transpose), without a copy.
at::Tensor empty_grad_like(const at::Tensor& x) {
  if (!x.is_non_overlapping_and_dense() || x.stride(3) != 1) {
    return empty_for_writing(x.sizes(), x.options());
  }
  std::array<int64_t, 3> order{0, 1, 2};  // the leading dims, outermost in memory first
  std::stable_sort(order.begin(), order.end(),
                   [&x](int64_t a, int64_t b) { return x.stride(a) > x.stride(b); });
  std::array<int64_t, 4> back{};
  for (const auto d : c10::irange(3)) {
    back[order[d]] = d;
  }
  back[3] = 3;
  return empty_for_writing({x.size(order[0]), x.size(order[1]), x.size(order[2]), x.size(3)},
                           x.options())
      .permute(back);
}

struct MaskTiles {
  const int8_t* data;
  int64_t sb, sh, sq, sk;

  int8_t at(int64_t b, int64_t h, int64_t qt, int64_t kt) const {
    return data[b * sb + h * sh + qt * sq + kt * sk];
  }
};

// The mask, read element by element through its strides (any may be 0): bool or additive.
template <typename scalar_t>
struct Mask {
  const bool* keep = nullptr;
  const scalar_t* add = nullptr;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
  MaskTiles tiles{};

  // The tile's state: 0 = nothing kept, 1 = per-element work, 2 = nothing masked.
  int8_t state(int64_t b, int64_t h, int64_t qt, int64_t kt) const {
    if (keep == nullptr) {
      return 2;
    }
    return tiles.data != nullptr ? tiles.at(b, h, qt, kt) : 1;
  }
  int64_t offset(int64_t b, int64_t h, int64_t i) const { return b * sb + h * sh + i * si; }
};

template <typename scalar_t>
Mask<scalar_t> mask_of(const c10::optional<at::Tensor>& mask,
                       const c10::optional<at::Tensor>& mask_tiles) {
  Mask<scalar_t> m;
  if (!mask.has_value()) {
    return m;
  }
  if (mask->scalar_type() == at::kBool) {
    m.keep = mask->const_data_ptr<bool>();
    if (mask_tiles.has_value()) {
      m.tiles = {mask_tiles->const_data_ptr<int8_t>(), mask_tiles->stride(0), mask_tiles->stride(1),
                 mask_tiles->stride(2), mask_tiles->stride(3)};
    }
  } else {
    m.add = mask->const_data_ptr<scalar_t>();
  }
  m.sb = mask->stride(0);
  m.sh = mask->stride(1);
  m.si = mask->stride(2);
  m.sj = mask->stride(3);
  return m;
}

// The leading dimension of a tile buffer with rows n wide: whole vectors, and not a multiple of
// 128 bytes. tile_gemm walks its B operand down the columns; with a stride of 256 bytes (64 fp32)
// that walk uses a quarter of the L1 sets and the panel evicts itself. This is also why B
// operands are always copied here rather than read in place from a contiguous tensor.
template <typename acc_t>
int64_t tile_ld(int64_t n) {
  constexpr int64_t lanes = Vectorized<acc_t>::size();
  const int64_t ld = round_up(n, lanes);
  return ld * static_cast<int64_t>(sizeof(acc_t)) % 128 == 0 ? ld + lanes : ld;
}

// dst[r * ld + c] = src[r * stride + c] in the compute type for r < rows, c < cols, and zeros up to
// the next whole vector.
template <typename scalar_t>
void pack_rows(acc_type<scalar_t>* dst, int64_t ld, const scalar_t* src, int64_t stride,
               int64_t rows, int64_t cols) {
  constexpr int64_t lanes = kLanes<scalar_t>;
  for (const auto r : c10::irange(rows)) {
    for (int64_t c = 0; c < cols; c += lanes) {
      load(src + r * stride + c, std::min(lanes, cols - c)).store(dst + r * ld + c);
    }
  }
}

// dst[c * ld + r] = scale * src[r * stride + c] for r < rows, c < cols; zeros for r in [rows, ld).
template <typename scalar_t>
void pack_transposed(acc_type<scalar_t>* dst, int64_t ld, const scalar_t* src, int64_t stride,
                     int64_t rows, int64_t cols, acc_type<scalar_t> scale) {
  using acc_t = acc_type<scalar_t>;
  for (const auto r : c10::irange(rows)) {
    const scalar_t* row = src + r * stride;
    for (const auto c : c10::irange(cols)) {
      dst[c * ld + r] = scale * static_cast<acc_t>(row[c]);
    }
  }
  for (const auto c : c10::irange(cols)) {
    std::fill(dst + c * ld + rows, dst + (c + 1) * ld, acc_t(0));
  }
}

// dst[0, n) = src[0, n) * scale in dst's dtype.
template <typename scalar_t>
void store_row(scalar_t* dst, const acc_type<scalar_t>* src, int64_t n, acc_type<scalar_t> scale) {
  using Vec = Vectorized<acc_type<scalar_t>>;
  constexpr int64_t lanes = kLanes<scalar_t>;
  for (int64_t c = 0; c < n; c += lanes) {
    store(dst + c, Vec::loadu(src + c) * Vec(scale), std::min(lanes, n - c));
  }
}

// Zeros for rows that nothing computes (padded queries and keys): streamed, as nothing reads them
// back soon and a normal store would first read each line in.
template <typename scalar_t>
void zero_row(scalar_t* dst, int64_t n) {
  stream_copy(dst, nullptr, static_cast<size_t>(n) * sizeof(scalar_t));
}

// Lanes [first, first + lanes) of an index range, as the compute type: compared with the bounds of
// a band to blend -inf in. Bounds are clamped to [-1, limit + 1] first so that they stay exact.
template <typename acc_t>
Vectorized<acc_t> in_band(int64_t first, int64_t begin, int64_t end, int64_t limit) {
  using Vec = Vectorized<acc_t>;
  const Vec index = Vec::arange(static_cast<acc_t>(first), acc_t(1));
  const auto bound = [limit](int64_t x) {
    return static_cast<acc_t>(std::clamp<int64_t>(x, -1, limit + 1));
  };
  return (index >= Vec(bound(begin))) & (index < Vec(bound(end)));
}

template <typename acc_t>
constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

// The whole vectors holding lanes [begin, end) ∩ [0, limit): where a band's products and masks run.
template <typename acc_t>
std::pair<int64_t, int64_t> lane_span(int64_t begin, int64_t end, int64_t limit) {
  constexpr int64_t lanes = Vectorized<acc_t>::size();
  const int64_t b = std::clamp<int64_t>(begin, 0, limit), e = std::clamp<int64_t>(end, 0, limit);
  if (b >= e) {
    return {0, 0};
  }
  return {b / lanes * lanes, round_up(e, lanes)};
}

// --- forward ---------------------------------------------------------------------------------

template <typename scalar_t>
struct ForwardArgs {
  Rows<const scalar_t> q, k, v;
  Mask<scalar_t> mask;
  acc_type<scalar_t> scale;
  Rows<scalar_t> out;
  acc_type<scalar_t>* lse;
};

// Per-thread tile buffers of the forward.
template <typename acc_t>
struct ForwardTiles {
  int64_t ld_q;  // of Sᵀ, (scale Q)ᵀ and the mask tiles: query rows are their lanes
  int64_t ld_k;  // of K converted from fp16 / bf16
  int64_t ld_v;  // of V and O
  std::vector<acc_t> qt, k, v, st, o, m, l, alpha, bias;
  std::unique_ptr<bool[]> keep;  // a bool mask tile, transposed like Sᵀ

  ForwardTiles(const Geometry& g, bool bool_mask, bool add_mask)
      : ld_q(tile_ld<acc_t>(g.BQ)), ld_k(tile_ld<acc_t>(g.D)), ld_v(tile_ld<acc_t>(g.Dv)) {
    qt.resize(g.D * ld_q);
    k.resize(g.BK * ld_k);
    v.resize(g.BK * ld_v);
    st.resize(g.BK * ld_q);
    o.resize(g.BQ * ld_v);
    m.resize(ld_q);
    l.resize(ld_q);
    alpha.resize(ld_q);
    if (add_mask) {
      bias.assign(g.BK * ld_q, acc_t(0));
    }
    if (bool_mask) {
      // The lanes beyond a tile's rows are read (and their results dropped): they start true.
      keep.reset(new bool[g.BK * ld_q]);
      std::fill_n(keep.get(), g.BK * ld_q, true);
    }
  }
};

// One key tile of a query tile: Sᵀ = K·(scale Q)ᵀ, masked, folded into the online softmax, and
// O += P·V.
template <typename scalar_t>
void forward_key_tile(const Geometry& g, const ForwardArgs<scalar_t>& a, const Sequence& sq,
                      int64_t h, int64_t i0, int64_t rows, int64_t t0, int8_t state,
                      ForwardTiles<acc_type<scalar_t>>& t) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t lanes = Vec::size();
  const int64_t hk = h / g.group, BQp = t.ld_q, Dvw = round_up(g.Dv, lanes);
  const int64_t nk = std::min(g.BK, sq.n_k - t0), vecs = ceil_div(rows, lanes);
  // K is tile_gemm's A operand, read an element at a time: in place when it is the compute type.
  const scalar_t* k_rows = a.k.row(sq.b, hk, sq.k0 + t0);
  const acc_t* k = nullptr;
  int64_t ld_k = a.k.si;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    k = k_rows;
  } else {
    pack_rows(t.k.data(), t.ld_k, k_rows, a.k.si, nk, g.D);
    k = t.k.data();
    ld_k = t.ld_k;
  }
  pack_rows(t.v.data(), t.ld_v, a.v.row(sq.b, hk, sq.k0 + t0), a.v.si, nk, g.Dv);
  acc_t* st = t.st.data();
  // A block of keys computes only the query lanes it may see; the rest of its rows is not read.
  tile_gemm<acc_t>(nk, g.D, k, ld_k, 1, t.qt.data(), BQp, st, BQp, false, [&](int64_t j, int n) {
    const auto [begin, end] =
        lane_span<acc_t>(sq.query_begin(t0 + j) - i0, sq.query_end(t0 + j + n - 1) - i0, rows);
    return Extent{begin, end, 0, g.D};
  });

  // Masks: queries are the lanes of a row of Sᵀ; a key's band is the query range that sees it.
  const Vec minus_inf(-kInf<acc_t>);
  if (a.mask.add != nullptr) {
    for (const auto r : c10::irange(rows)) {
      const scalar_t* src = a.mask.add + a.mask.offset(sq.b, h, i0 + r) + t0 * a.mask.sj;
      for (const auto j : c10::irange(nk)) {
        t.bias[j * BQp + r] = static_cast<acc_t>(src[j * a.mask.sj]);
      }
    }
    for (const auto j : c10::irange(nk)) {
      for (int64_t c = 0; c < vecs * lanes; c += lanes) {
        (Vec::loadu(st + j * BQp + c) + Vec::loadu(t.bias.data() + j * BQp + c))
            .store(st + j * BQp + c);
      }
    }
  }
  if (state == 1) {
    for (const auto r : c10::irange(rows)) {
      const bool* src = a.mask.keep + a.mask.offset(sq.b, h, i0 + r) + t0 * a.mask.sj;
      for (const auto j : c10::irange(nk)) {
        t.keep[j * BQp + r] = src[j * a.mask.sj];
      }
    }
    for (const auto j : c10::irange(nk)) {
      for (int64_t c = 0; c < vecs * lanes; c += lanes) {
        const Vec kept = keep_lanes<acc_t>(t.keep.get() + j * BQp + c);
        Vec::blendv(minus_inf, Vec::loadu(st + j * BQp + c), kept).store(st + j * BQp + c);
      }
    }
  }
  const bool whole_band = sq.key_begin(i0 + rows - 1) <= t0 && sq.key_end(i0) >= t0 + nk;
  if (!whole_band) {
    for (const auto j : c10::irange(nk)) {
      const int64_t begin = sq.query_begin(t0 + j) - i0, end = sq.query_end(t0 + j) - i0;
      if (begin <= 0 && end >= rows) {
        continue;
      }
      const auto [first, last] = lane_span<acc_t>(begin, end, rows);
      for (int64_t c = first; c < last; c += lanes) {
        const Vec seen = in_band<acc_t>(c, begin, end, vecs * lanes);
        Vec::blendv(minus_inf, Vec::loadu(st + j * BQp + c), seen).store(st + j * BQp + c);
      }
    }
  }

  // Online softmax, down the columns of Sᵀ: P = exp(s - m_new) in place, l and m updated. A
  // column vector reads only the keys its queries may see, [j0, j1); P is 0 on the others.
  for (int64_t c = 0; c < vecs * lanes; c += lanes) {
    const int64_t j0 = std::clamp<int64_t>(sq.key_begin(i0 + c) - t0, 0, nk);
    const int64_t j1 =
        std::clamp<int64_t>(sq.key_end(i0 + std::min(c + lanes, rows) - 1) - t0, j0, nk);
    for (int64_t j = 0; j < j0; ++j) {
      Vec(0).store(st + j * BQp + c);
    }
    for (int64_t j = j1; j < nk; ++j) {
      Vec(0).store(st + j * BQp + c);
    }
    const Vec m_old = Vec::loadu(t.m.data() + c);
    Vec max0 = m_old, max1 = m_old;
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) {
      max0 = at::vec::maximum(max0, Vec::loadu(st + j * BQp + c));
      max1 = at::vec::maximum(max1, Vec::loadu(st + (j + 1) * BQp + c));
    }
    if (j < j1) {
      max0 = at::vec::maximum(max0, Vec::loadu(st + j * BQp + c));
    }
    const Vec m_new = at::vec::maximum(max0, max1);
    // A query that has seen only -inf so far keeps m = -inf; exp then runs against 0.
    const Vec base = Vec::blendv(m_new, Vec(0), m_new == minus_inf);
    const Vec alpha = fast_exp(m_old - base);
    Vec sum0(0), sum1(0);
    for (j = j0; j + 2 <= j1; j += 2) {
      const Vec p0 = fast_exp(Vec::loadu(st + j * BQp + c) - base);
      const Vec p1 = fast_exp(Vec::loadu(st + (j + 1) * BQp + c) - base);
      p0.store(st + j * BQp + c);
      p1.store(st + (j + 1) * BQp + c);
      sum0 = sum0 + p0;
      sum1 = sum1 + p1;
    }
    if (j < j1) {
      const Vec p0 = fast_exp(Vec::loadu(st + j * BQp + c) - base);
      p0.store(st + j * BQp + c);
      sum0 = sum0 + p0;
    }
    at::vec::fmadd(Vec::loadu(t.l.data() + c), alpha, sum0 + sum1).store(t.l.data() + c);
    m_new.store(t.m.data() + c);
    alpha.store(t.alpha.data() + c);
  }
  for (const auto r : c10::irange(rows)) {
    const acc_t alpha = t.alpha[r];
    if (alpha != acc_t(1)) {
      acc_t* o = t.o.data() + r * t.ld_v;
      for (int64_t c = 0; c < Dvw; c += lanes) {
        (Vec::loadu(o + c) * Vec(alpha)).store(o + c);
      }
    }
  }
  tile_gemm<acc_t>(
      rows, nk, st, 1, BQp, t.v.data(), t.ld_v, t.o.data(), t.ld_v, true, [&](int64_t r, int n) {
        return Extent{0, Dvw, sq.key_begin(i0 + r) - t0, sq.key_end(i0 + r + n - 1) - t0};
      });
}

// The task: query tile qt of head h of sequence s, every row of it the sequence owns.
template <typename scalar_t>
void forward_query_tile(const Geometry& g, const ForwardArgs<scalar_t>& a, int64_t s, int64_t h,
                        int64_t qt, ForwardTiles<acc_type<scalar_t>>& t) {
  using acc_t = acc_type<scalar_t>;
  const Sequence sq = g.sequence(s);
  const int64_t i0 = qt * g.BQ;
  const int64_t owned = std::min(g.BQ, sq.rows_q - i0);
  const int64_t rows = std::clamp<int64_t>(sq.n_q - i0, 0, g.BQ);
  const int64_t key_begin = rows > 0 ? sq.key_begin(i0) : 0;
  const int64_t key_end = rows > 0 ? sq.key_end(i0 + rows - 1) : 0;
  std::fill(t.m.begin(), t.m.end(), -kInf<acc_t>);
  std::fill(t.l.begin(), t.l.end(), acc_t(0));
  if (key_begin < key_end) {
    std::fill(t.o.begin(), t.o.begin() + rows * t.ld_v, acc_t(0));
    pack_transposed(t.qt.data(), t.ld_q, a.q.row(sq.b, h, sq.q0 + i0), a.q.si, rows, g.D, a.scale);
    for (int64_t kt = key_begin / g.BK; kt * g.BK < key_end; ++kt) {
      const int8_t state = a.mask.state(sq.b, h, qt, kt);
      if (state != 0) {
        forward_key_tile(g, a, sq, h, i0, rows, kt * g.BK, state, t);
      }
    }
  }
  for (const auto r : c10::irange(owned)) {
    const int64_t i = sq.q0 + i0 + r;
    scalar_t* out = a.out.row(sq.b, h, i);
    acc_t& lse = a.lse[(sq.b * g.Hq + h) * g.Lq + i];
    const acc_t l = t.l[r];
    if (r < rows && l != acc_t(0)) {
      store_row(out, t.o.data() + r * t.ld_v, g.Dv, acc_t(1) / l);
      lse = t.m[r] + std::log(l);
    } else {
      zero_row(out, g.Dv);
      lse = kInf<acc_t>;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& mask_tiles,
    const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& query_lengths,
    const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t causal, int64_t window_left,
    int64_t window_right, double scale, int64_t block_q, int64_t block_k) {
  checks::attention_fwd(q, k, v, mask, mask_tiles, lengths, query_lengths, cu_seqlens_q,
                        cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_left, window_right,
                        block_q, block_k);
  const at::Tensor lens = lengths.has_value() ? lengths->contiguous() : at::Tensor();
  const at::Tensor qlens = query_lengths.has_value() ? query_lengths->contiguous() : at::Tensor();
  const at::Tensor cu_q = cu_seqlens_q.has_value() ? cu_seqlens_q->contiguous() : at::Tensor();
  const at::Tensor cu_k = cu_seqlens_k.has_value() ? cu_seqlens_k->contiguous() : at::Tensor();
  const Geometry g = make_geometry(q, k, v, lens, qlens, cu_q, cu_k, causal, window_left,
                                   window_right, block_q, block_k);
  const at::ScalarType acc_dtype = checks::compute_type(q.scalar_type());
  at::Tensor out = empty_for_writing({g.batch, g.Lq, g.Hq, g.Dv}, q.options()).transpose(1, 2);
  at::Tensor lse = empty_for_writing({g.batch, g.Hq, g.Lq}, q.options().dtype(acc_dtype));
  if (out.numel() == 0 && lse.numel() == 0) {
    return {out, lse};
  }
  // Tasks: the query tiles of every (sequence, head), the costliest sequences first; those of one
  // head in a row (they share its K and V in the caches), the last (the most keys under causal)
  // first.
  const std::vector<int64_t> order = by_cost(g);
  std::vector<int64_t> first_task(g.sequences + 1, 0);
  for (const auto n : c10::irange(g.sequences)) {
    const Sequence sq = g.sequence(order[n]);
    first_task[n + 1] = first_task[n] + ceil_div(sq.rows_q, g.BQ) * g.Hq;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd", [&] {
    using acc_t = acc_type<scalar_t>;
    const ForwardArgs<scalar_t> a{rows_of<scalar_t>(q),      rows_of<scalar_t>(k),
                                  rows_of<scalar_t>(v),      mask_of<scalar_t>(mask, mask_tiles),
                                  static_cast<acc_t>(scale), writable_rows_of<scalar_t>(out),
                                  lse.data_ptr<acc_t>()};
    parallel_tasks(first_task.back(), [&](const auto& claim) {
      ForwardTiles<acc_t> tiles(g, a.mask.keep != nullptr, a.mask.add != nullptr);
      for (int64_t task = 0; claim(task);) {
        const int64_t n =
            std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
        const int64_t s = order[n], rest = task - first_task[n];
        const int64_t query_tiles = (first_task[n + 1] - first_task[n]) / g.Hq;
        forward_query_tile(g, a, s, rest / query_tiles, query_tiles - 1 - rest % query_tiles,
                           tiles);
      }
    });
  });
  return {out, lse};
}

// --- backward --------------------------------------------------------------------------------

template <typename scalar_t>
struct BackwardArgs {
  Rows<const scalar_t> q, k, v, dout;
  Mask<scalar_t> mask;
  acc_type<scalar_t> scale;
  const acc_type<scalar_t>* lse;
  const acc_type<scalar_t>* delta;
  // dQ accumulators: `splits` copies, dq_copy apart, of rows dq_ld wide; the first possibly dq.
  Rows<acc_type<scalar_t>> dq;
  int64_t dq_ld, dq_copy;
  Rows<scalar_t> dk, dv;
  int64_t splits;

  acc_type<scalar_t>* dq_row(int64_t split, int64_t b, int64_t h, int64_t i) const {
    return dq.row(b, h, i) + split * dq_copy;
  }
};

template <typename acc_t>
struct BackwardTiles {
  int64_t ld_k;  // of (scale K)ᵀ, Vᵀ, P and dS: keys are their lanes
  int64_t ld_d;  // of K, Q and dK
  int64_t ld_v;  // of dO and dV
  std::vector<acc_t> kt, vt, k, q, dout, p, ds, dk, dv;

  explicit BackwardTiles(const Geometry& g)
      : ld_k(tile_ld<acc_t>(g.BK)), ld_d(tile_ld<acc_t>(g.D)), ld_v(tile_ld<acc_t>(g.Dv)) {
    kt.resize(g.D * ld_k);
    vt.resize(g.Dv * ld_k);
    k.resize(g.BK * ld_d);
    q.resize(g.BQ * ld_d);
    dout.resize(g.BQ * ld_v);
    p.resize(g.BQ * ld_k);
    ds.resize(g.BQ * ld_k);
    dk.resize(g.BK * ld_d);
    dv.resize(g.BK * ld_v);
  }
};

// Elements [j, j + lanes) of a mask row (j + lanes may pass its end, count = the elements left):
// the keep lanes of a bool mask, the values of an additive one (0 beyond count).
template <typename acc_t>
Vectorized<acc_t> keep_at(const bool* row, int64_t stride, int64_t j, int64_t count) {
  constexpr int64_t lanes = Vectorized<acc_t>::size();
  if (stride == 1 && count >= lanes) {
    return keep_lanes<acc_t>(row + j);
  }
  bool gathered[lanes] = {};
  for (int64_t c = 0; c < std::min(count, lanes); ++c) {
    gathered[c] = row[(j + c) * stride];
  }
  return keep_lanes<acc_t>(gathered);
}

template <typename scalar_t>
Vectorized<acc_type<scalar_t>> add_at(const scalar_t* row, int64_t stride, int64_t j,
                                      int64_t count) {
  constexpr int64_t lanes = kLanes<scalar_t>;
  const int64_t n = std::clamp<int64_t>(count, 0, lanes);
  if (n == 0) {
    return Vectorized<acc_type<scalar_t>>(0);
  }
  if (stride == 1) {
    return load(row + j, n);
  }
  scalar_t gathered[lanes] = {};
  for (const auto c : c10::irange(n)) {
    gathered[c] = row[(j + c) * stride];
  }
  return load(gathered, lanes);
}

// One query tile against the task's key tile: P and dS in rows, then dV, dK (the tile's
// accumulators) and dQ (the split's copy) take their products.
template <typename scalar_t>
void backward_query_tile(const Geometry& g, const BackwardArgs<scalar_t>& a, const Sequence& sq,
                         int64_t h, int64_t qt, int64_t t0, int64_t nk, int64_t split,
                         BackwardTiles<acc_type<scalar_t>>& t) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t lanes = Vec::size();
  const int64_t i0 = qt * g.BQ, rows = std::min(g.BQ, sq.n_q - i0);
  const int64_t BKp = t.ld_k, nkp = round_up(nk, lanes);
  const int8_t state = a.mask.state(sq.b, h, qt, t0 / g.BK);
  if (state == 0) {
    return;
  }
  acc_t* q = t.q.data();
  acc_t* dout = t.dout.data();
  pack_rows(q, t.ld_d, a.q.row(sq.b, h, sq.q0 + i0), a.q.si, rows, g.D);
  pack_rows(dout, t.ld_v, a.dout.row(sq.b, h, sq.q0 + i0), a.dout.si, rows, g.Dv);
  acc_t* p = t.p.data();
  acc_t* ds = t.ds.data();
  // A block of queries computes S and dP only on the keys it may see, and dQ takes only those.
  const auto keys_seen = [&](int64_t r, int n) {
    return std::pair<int64_t, int64_t>{sq.key_begin(i0 + r) - t0, sq.key_end(i0 + r + n - 1) - t0};
  };
  const auto key_lanes = [&](int64_t r, int n, int64_t depth) {
    const auto [begin, end] = keys_seen(r, n);
    const auto [first, last] = lane_span<acc_t>(begin, end, nk);
    return Extent{first, last, 0, depth};
  };
  tile_gemm<acc_t>(rows, g.D, q, t.ld_d, 1, t.kt.data(), BKp, p, BKp, false,
                   [&](int64_t r, int n) { return key_lanes(r, n, g.D); });
  tile_gemm<acc_t>(rows, g.Dv, dout, t.ld_v, 1, t.vt.data(), BKp, ds, BKp, false,
                   [&](int64_t r, int n) { return key_lanes(r, n, g.Dv); });

  const Vec minus_inf(-kInf<acc_t>);
  const int64_t row0 = (sq.b * g.Hq + h) * g.Lq + sq.q0 + i0;
  for (const auto r : c10::irange(rows)) {
    const acc_t lse = a.lse[row0 + r], delta = a.delta[row0 + r];
    acc_t* p_row = p + r * BKp;
    acc_t* ds_row = ds + r * BKp;
    const int64_t begin = sq.key_begin(i0 + r) - t0, end = sq.key_end(i0 + r) - t0;
    const bool banded = begin > 0 || end < nkp;
    const int64_t mask_row = a.mask.offset(sq.b, h, i0 + r) + t0 * a.mask.sj;
    // Outside the row's vectors S was not computed: P and dS are 0 there for the products below.
    const auto [first, last] = lane_span<acc_t>(begin, end, nk);
    for (int64_t c = 0; c < nkp; c += lanes) {
      if (c < first || c >= last) {
        Vec(0).store(p_row + c);
        Vec(0).store(ds_row + c);
      }
    }
    for (int64_t c = first; c < last; c += lanes) {
      Vec s = Vec::loadu(p_row + c);
      if (a.mask.add != nullptr) {
        s = s + add_at(a.mask.add + mask_row, a.mask.sj, c, nk - c);
      }
      if (state == 1) {
        s = Vec::blendv(minus_inf, s, keep_at<acc_t>(a.mask.keep + mask_row, a.mask.sj, c, nk - c));
      }
      if (banded) {
        s = Vec::blendv(minus_inf, s, in_band<acc_t>(c, begin, end, nkp));
      }
      const Vec prob = fast_exp(s - Vec(lse));
      prob.store(p_row + c);
      (Vec(a.scale) * prob * (Vec::loadu(ds_row + c) - Vec(delta))).store(ds_row + c);
    }
  }
  const int64_t Dw = round_up(g.D, lanes), Dvw = round_up(g.Dv, lanes);
  // A block of keys takes only the queries that may see it.
  const auto queries_seen = [&](int64_t j, int n, int64_t width) {
    return Extent{0, width, sq.query_begin(t0 + j) - i0, sq.query_end(t0 + j + n - 1) - i0};
  };
  tile_gemm<acc_t>(nk, rows, p, 1, BKp, dout, t.ld_v, t.dv.data(), t.ld_v, true,
                   [&](int64_t j, int n) { return queries_seen(j, n, Dvw); });
  tile_gemm<acc_t>(nk, rows, ds, 1, BKp, q, t.ld_d, t.dk.data(), t.ld_d, true,
                   [&](int64_t j, int n) { return queries_seen(j, n, Dw); });
  tile_gemm<acc_t>(rows, nk, ds, BKp, 1, t.k.data(), t.ld_d, a.dq_row(split, sq.b, h, sq.q0 + i0),
                   a.dq.si, true, [&](int64_t r, int n) {
                     const auto [begin, end] = keys_seen(r, n);
                     return Extent{0, Dw, begin, end};
                   });
}

// Whether any query tile of kv head hk's query heads over queries [query_begin, query_end) keeps
// something of the key tile at t0 (a tile state other than 0). A key tile that a bool mask empties
// for all of them is not read, not even packed: its dK and dV rows are zeros.
template <typename scalar_t>
bool key_tile_kept(const Geometry& g, const Mask<scalar_t>& mask, const Sequence& sq, int64_t hk,
                   int64_t t0, int64_t query_begin, int64_t query_end) {
  for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
    for (int64_t qt = query_begin / g.BQ; qt * g.BQ < query_end; ++qt) {
      if (mask.state(sq.b, h, qt, t0 / g.BK) != 0) {
        return true;
      }
    }
  }
  return false;
}

// The task: every split-th key tile of kv head hk of sequence s, against all the query tiles of
// its query heads that see it. Zeroes first the rows of its copy of dQ that it adds into.
template <typename scalar_t>
void backward_task(const Geometry& g, const BackwardArgs<scalar_t>& a, int64_t s, int64_t hk,
                   int64_t split, BackwardTiles<acc_type<scalar_t>>& t) {
  using acc_t = acc_type<scalar_t>;
  const Sequence sq = g.sequence(s);
  for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
    // The rows the tiles add into stay in the caches; those past n_q are only ever zeros.
    for (const auto i : c10::irange(sq.rows_q)) {
      acc_t* row = a.dq_row(split, sq.b, h, sq.q0 + i);
      if (i < sq.n_q) {
        std::fill_n(row, a.dq_ld, acc_t(0));
      } else {
        zero_row(row, a.dq_ld);
      }
    }
  }
  const int64_t key_rows = sq.rows_k;
  for (int64_t t0 = split * g.BK; t0 < key_rows; t0 += a.splits * g.BK) {
    const int64_t owned = std::min(g.BK, key_rows - t0);
    const int64_t nk = std::clamp<int64_t>(sq.n_k - t0, 0, g.BK);
    const int64_t query_begin = nk > 0 ? sq.query_begin(t0) : 0;
    const int64_t query_end = nk > 0 ? sq.query_end(t0 + nk - 1) : 0;
    int64_t written = 0;  // rows of the tile whose dK and dV are computed
    if (query_begin < query_end && key_tile_kept(g, a.mask, sq, hk, t0, query_begin, query_end)) {
      const scalar_t* k_rows = a.k.row(sq.b, hk, sq.k0 + t0);
      pack_transposed(t.kt.data(), t.ld_k, k_rows, a.k.si, nk, g.D, a.scale);
      pack_transposed(t.vt.data(), t.ld_k, a.v.row(sq.b, hk, sq.k0 + t0), a.v.si, nk, g.Dv,
                      acc_t(1));
      pack_rows(t.k.data(), t.ld_d, k_rows, a.k.si, nk, g.D);
      std::fill(t.dk.begin(), t.dk.begin() + nk * t.ld_d, acc_t(0));
      std::fill(t.dv.begin(), t.dv.begin() + nk * t.ld_v, acc_t(0));
      for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
        for (int64_t qt = query_begin / g.BQ; qt * g.BQ < query_end; ++qt) {
          backward_query_tile(g, a, sq, h, qt, t0, nk, split, t);
        }
      }
      for (const auto j : c10::irange(nk)) {
        const int64_t row = sq.k0 + t0 + j;
        store_row(a.dk.row(sq.b, hk, row), t.dk.data() + j * t.ld_d, g.D, acc_t(1));
        store_row(a.dv.row(sq.b, hk, row), t.dv.data() + j * t.ld_v, g.Dv, acc_t(1));
      }
      written = nk;
    }
    for (int64_t j = written; j < owned; ++j) {
      zero_row(a.dk.row(sq.b, hk, sq.k0 + t0 + j), g.D);
      zero_row(a.dv.row(sq.b, hk, sq.k0 + t0 + j), g.Dv);
    }
  }
}

// δ_i = Σ dO_i · O_i over the computed rows (the others are never read).
template <typename scalar_t>
void row_deltas(const Geometry& g, const Rows<const scalar_t>& dout,
                const Rows<const scalar_t>& out, acc_type<scalar_t>* delta) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t lanes = Vec::size();
  // Ranges of (sequence, head) pairs, a pair costing the average rows of a sequence times Dv.
  const int64_t pair_elems = g.batch * g.Lq * g.Dv / std::max<int64_t>(g.sequences, 1);
  parallel_row_ranges(g.sequences * g.Hq, pair_elems, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const Sequence sq = g.sequence(task / g.Hq);
      const int64_t h = task % g.Hq;
      for (const auto i : c10::irange(sq.n_q)) {
        const scalar_t* x = dout.row(sq.b, h, sq.q0 + i);
        const scalar_t* y = out.row(sq.b, h, sq.q0 + i);
        Vec sum(0);
        for (int64_t c = 0; c < g.Dv; c += lanes) {
          const int64_t n = std::min(lanes, g.Dv - c);
          sum = at::vec::fmadd(load(x + c, n), load(y + c, n), sum);
        }
        delta[(sq.b * g.Hq + h) * g.Lq + sq.q0 + i] =
            at::vec::vec_reduce_all<acc_t>(Sum<acc_t>(), sum);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse_in, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& mask_tiles, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& query_lengths, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    int64_t causal, int64_t window_left, int64_t window_right, double scale, int64_t block_q,
    int64_t block_k) {
  checks::attention_bwd(grad_out, q, k, v, out, lse_in, mask, mask_tiles, lengths, query_lengths,
                        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_left,
                        window_right, block_q, block_k);
  const at::Tensor lens = lengths.has_value() ? lengths->contiguous() : at::Tensor();
  const at::Tensor qlens = query_lengths.has_value() ? query_lengths->contiguous() : at::Tensor();
  const at::Tensor cu_q = cu_seqlens_q.has_value() ? cu_seqlens_q->contiguous() : at::Tensor();
  const at::Tensor cu_k = cu_seqlens_k.has_value() ? cu_seqlens_k->contiguous() : at::Tensor();
  const Geometry g = make_geometry(q, k, v, lens, qlens, cu_q, cu_k, causal, window_left,
                                   window_right, block_q, block_k);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor dq = empty_grad_like(q), dk = empty_grad_like(k), dv = empty_grad_like(v);
  if (dq.numel() == 0 && dk.numel() == 0 && dv.numel() == 0) {
    return {dq, dk, dv};
  }
  // Enough tasks for every thread to get several: split the key tiles when the (sequence, kv head)
  // pairs are too few.
  const int64_t pairs = g.sequences * g.Hkv, threads = at::get_num_threads();
  int64_t max_key_tiles = 0;
  for (const auto s : c10::irange(g.sequences)) {
    max_key_tiles = std::max(max_key_tiles, ceil_div(g.sequence(s).rows_k, g.BK));
  }
  const int64_t splits =
      std::clamp<int64_t>(ceil_div(kSplitTasksPerThread * threads, std::max<int64_t>(pairs, 1)), 1,
                          std::max<int64_t>(max_key_tiles, 1));
  const std::vector<int64_t> order = by_cost(g);
  const at::ScalarType acc_dtype = checks::compute_type(q.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr int64_t lanes = kLanes<scalar_t>;
    at::Tensor delta = at::empty({g.batch, g.Hq, g.Lq}, q.options().dtype(acc_dtype));
    row_deltas(g, rows_of<scalar_t>(grad_out), rows_of<scalar_t>(out), delta.data_ptr<acc_t>());
    // dQ is added into in place when one copy suffices and dq's rows are whole vectors.
    const bool in_place = std::is_same_v<scalar_t, acc_t> && splits == 1 && g.D % lanes == 0;
    const int64_t dq_ld = round_up(g.D, lanes), dq_copy = g.batch * g.Lq * g.Hq * dq_ld;
    at::Tensor dq_copies;
    Rows<acc_t> dq_acc{};
    if (in_place) {
      dq_acc = writable_rows_of<acc_t>(dq);  // in place only when scalar_t is acc_t
    } else {                                 // (batch, Lq, Hq, dq_ld) copies
      dq_copies = empty_for_writing({splits * dq_copy}, q.options().dtype(acc_dtype));
      dq_acc = {dq_copies.data_ptr<acc_t>(), g.Lq * g.Hq * dq_ld, dq_ld, g.Hq * dq_ld};
    }
    const BackwardArgs<scalar_t> a{rows_of<scalar_t>(q),
                                   rows_of<scalar_t>(k),
                                   rows_of<scalar_t>(v),
                                   rows_of<scalar_t>(grad_out),
                                   mask_of<scalar_t>(mask, mask_tiles),
                                   static_cast<acc_t>(scale),
                                   lse.const_data_ptr<acc_t>(),
                                   delta.const_data_ptr<acc_t>(),
                                   dq_acc,
                                   dq_ld,
                                   dq_copy,
                                   writable_rows_of<scalar_t>(dk),
                                   writable_rows_of<scalar_t>(dv),
                                   splits};
    const int64_t per_sequence = g.Hkv * splits;
    parallel_tasks(g.sequences * per_sequence, [&](const auto& claim) {
      BackwardTiles<acc_t> tiles(g);
      for (int64_t task = 0; claim(task);) {
        const int64_t rest = task % per_sequence;
        backward_task(g, a, order[task / per_sequence], rest / splits, rest % splits, tiles);
      }
    });
    if (!in_place) {
      // dq = the sum of the copies, in split order; rows (b, h, i) in (b, i, h) order.
      const Rows<scalar_t> dq_out = writable_rows_of<scalar_t>(dq);
      parallel_row_ranges(g.batch * g.Lq * g.Hq, splits * dq_ld, [&](int64_t first, int64_t last) {
        std::vector<acc_t> sum(dq_ld);
        for (int64_t row = first; row < last; ++row) {
          const int64_t b = row / (g.Lq * g.Hq), i = row / g.Hq % g.Lq, h = row % g.Hq;
          std::copy_n(a.dq_row(0, b, h, i), dq_ld, sum.begin());
          for (int64_t split = 1; split < splits; ++split) {
            const acc_t* copy = a.dq_row(split, b, h, i);
            for (const auto c : c10::irange(dq_ld)) {
              sum[c] += copy[c];
            }
          }
          store_row(dq_out.row(b, h, i), sum.data(), g.D, acc_t(1));
        }
      });
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskkern, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace maskkern
