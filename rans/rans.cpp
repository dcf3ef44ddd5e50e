// rANS entropy coder: compressai-compatible and native formats.  See rans.hpp.
#include "rans.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#if defined(__GNUC__) && defined(__x86_64__)
#if !defined(__clang__)
// GCC 12 reports false positives inside its own AVX-512 headers (_mm512_undefined_*)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

namespace rans {

namespace {

constexpr uint64_t kStateMax = 1ull << 63;   // states live in [2^31, 2^63)
constexpr uint64_t kBypassMax = 1ull << 59;  // renorm bound of a 4-bit bypass chunk
constexpr size_t kWordPad = 16;              // zero words appended for branchless refills
constexpr int kMaxEscapeChunks = 9;          // raw < 2^33 for any int32 value / offset
constexpr int kMaxGolombZeros = 40;          // native escapes: raw + 1 < 2^34

inline uint64_t mulhi64(uint64_t a, uint64_t b) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
}

inline uint64_t load_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
inline uint32_t load_le32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}
inline void store_le64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline void store_le32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

/// round half to even in float32 without depending on the FP environment
/// beyond the default round-to-nearest mode (what torch.round does).
inline float round_half_even(float d) {
  const float a = std::fabs(d);
  const float r = (a + 8388608.0f) - 8388608.0f;  // exact RNE for a < 2^23
  return a < 8388608.0f ? std::copysign(r, d) : d;
}

inline bool fits_int32(float r) {  // false for NaN / inf / out of range
  return r >= -2147483648.0f && r < 2147483648.0f;
}

EncSym make_enc_sym(uint32_t start, uint32_t freq) {
  EncSym e{};
  if (freq == 0) {
    e.zero = 1;  // never coded; x_max() = 0 is harmless
    return e;
  }
  e.cmpl = static_cast<uint16_t>(kProbScale - freq);  // 0 for freq 65536
  if (freq == 1) {
    e.rcp = ~0ull;
    e.shift = 0;
    e.bias = start + kProbScale - 1;
  } else {
    uint32_t shift = 0;
    while (freq > (1u << shift)) ++shift;
    const unsigned __int128 num = (static_cast<unsigned __int128>(1) << (shift + 63)) + freq - 1;
    e.rcp = static_cast<uint64_t>(num / freq);
    e.shift = static_cast<uint8_t>(shift - 1);
    e.bias = start;
  }
  return e;
}

[[noreturn]] void throw_index(size_t i, int32_t idx, size_t rows) {
  throw Error("index out of range at element " + std::to_string(i) + ": " + std::to_string(idx) +
              " (tables have " + std::to_string(rows) + " rows)");
}
[[noreturn]] void throw_zero_freq(size_t i, int64_t value, int32_t idx) {
  throw Error("symbol cannot be coded at element " + std::to_string(i) + ": value " +
              std::to_string(value) + " has zero frequency in CDF row " + std::to_string(idx));
}

/// Escape raw value (compressai convention, generalised to 64 bits).
inline uint64_t escape_raw(int64_t v, int64_t e) {
  return v < 0 ? static_cast<uint64_t>(-2 * v - 1) : static_cast<uint64_t>(2 * (v - e));
}

// ---------------------------------------------------------------- bit I/O
struct BitWriter {
  std::vector<uint8_t> bytes;
  uint64_t buf = 0;
  int cnt = 0;
  void put(uint64_t v, int n) {  // n <= 32
    buf |= v << cnt;
    cnt += n;
    while (cnt >= 8) {
      bytes.push_back(static_cast<uint8_t>(buf));
      buf >>= 8;
      cnt -= 8;
    }
  }
  void put_golomb(uint64_t raw) {  // Exp-Golomb of raw+1, LSB-first
    const uint64_t u = raw + 1;
    const int k = 63 - __builtin_clzll(u);
    int z = k;
    while (z > 0) {
      const int c = std::min(z, 32);
      put(0, c);
      z -= c;
    }
    put(1, 1);
    int rem = k;
    uint64_t bits = u & ((k == 64) ? ~0ull : ((1ull << k) - 1));
    while (rem > 0) {
      const int c = std::min(rem, 32);
      put(bits & ((1ull << c) - 1), c);
      bits >>= c;
      rem -= c;
    }
  }
  void flush() {
    if (cnt > 0) bytes.push_back(static_cast<uint8_t>(buf));
    buf = 0;
    cnt = 0;
  }
};

}  // namespace

// =============================================================== buffer pool
namespace {
template <class T>
struct Pool {
  std::mutex m;
  std::vector<std::vector<T>> free;
};
template <class T>
Pool<T>& pool() {
  static Pool<T>* p = new Pool<T>();  // leaked on purpose: no destruction-order issues
  return *p;
}
constexpr size_t kPoolMaxBuffers = 12;
constexpr size_t kPoolMaxBytes = size_t(64) << 20;
}  // namespace

template <class T>
Buf<T>::Buf() = default;

template <class T>
Buf<T>::~Buf() {
  if (v_.empty() || v_.size() * sizeof(T) > kPoolMaxBytes) return;
  Pool<T>& p = pool<T>();
  std::lock_guard<std::mutex> lock(p.m);
  if (p.free.size() < kPoolMaxBuffers) {
    p.free.push_back(std::move(v_));
  } else {  // replace the smallest pooled buffer if this one is larger
    auto it = std::min_element(p.free.begin(), p.free.end(),
                               [](const std::vector<T>& a, const std::vector<T>& b) { return a.size() < b.size(); });
    if (it->size() < v_.size()) *it = std::move(v_);
  }
}

template <class T>
void Buf<T>::grow(size_t need, size_t used) {
  // grow generously (amortised copies) and prefer recycled storage
  const size_t want = std::max({need, 2 * used, v_.size() + v_.size() / 2});
  std::vector<T> nv;
  {
    Pool<T>& p = pool<T>();
    std::lock_guard<std::mutex> lock(p.m);
    size_t best = p.free.size();
    // the largest pooled buffer: growing buffers (one YEncoder half after the other) then
    // rarely grow again, which would copy everything written so far
    auto better = [&](size_t k) {
      if (p.free[k].size() < need) return false;
      return best == p.free.size() || p.free[k].size() > p.free[best].size();
    };
    for (size_t k = 0; k < p.free.size(); ++k)
      if (better(k)) best = k;
    if (best != p.free.size()) {
      nv = std::move(p.free[best]);
      p.free.erase(p.free.begin() + static_cast<std::ptrdiff_t>(best));
    }
  }
  if (nv.empty()) nv.resize(want);
  used = std::min(used, v_.size());
  if (used) std::memcpy(nv.data(), v_.data(), used * sizeof(T));
  std::swap(v_, nv);
  if (!nv.empty() && nv.size() * sizeof(T) <= kPoolMaxBytes) {  // recycle the old one
    Pool<T>& p = pool<T>();
    std::lock_guard<std::mutex> lock(p.m);
    if (p.free.size() < kPoolMaxBuffers) p.free.push_back(std::move(nv));
  }
}

template class Buf<int32_t>;
template class Buf<uint32_t>;

// ================================================================== Tables
Tables::Tables(const int32_t* cdf, size_t rows, size_t width, const int32_t* lengths,
               const int32_t* offsets, const float* scale_table, size_t n_scale)
    : rows_(rows), width_(width) {
  if (rows == 0) throw Error("tables: quantized_cdf has no rows");
  if (rows > (1u << 24)) throw Error("tables: too many CDF rows");
  if (width < 2) throw Error("tables: quantized_cdf rows must have at least 2 entries");
  length_.assign(lengths, lengths + rows);
  offset_.assign(offsets, offsets + rows);
  row_start_.resize(rows);
  size_t total = 0;
  for (size_t r = 0; r < rows; ++r) {
    const int32_t n = lengths[r];
    if (n < 2 || static_cast<size_t>(n) > width)
      throw Error("tables: cdf_length[" + std::to_string(r) + "] = " + std::to_string(n) +
                  " is outside [2, " + std::to_string(width) + "] (row width)");
    if (n > static_cast<int32_t>(kProbScale) + 1)
      throw Error("tables: cdf_length[" + std::to_string(r) + "] = " + std::to_string(n) +
                  " exceeds 65537");
    row_start_[r] = static_cast<uint32_t>(total);
    total += static_cast<size_t>(n);
  }
  cdf_.resize(total + 1);  // +1 guard
  enc_.resize(total);
  bucket_.resize(rows << kBucketBits);
  bucket32_.resize(rows << kBucketBits);
  for (size_t r = 0; r < rows; ++r) {
    const int32_t* row = cdf + r * width;
    const size_t n = static_cast<size_t>(lengths[r]);
    const std::string where = "tables: CDF row " + std::to_string(r);
    if (row[0] != 0) throw Error(where + " does not start at 0 (" + std::to_string(row[0]) + ")");
    for (size_t i = 1; i < n; ++i) {
      if (row[i] < row[i - 1])
        throw Error(where + " is not monotone at entry " + std::to_string(i));
      if (row[i] > static_cast<int32_t>(kProbScale))
        throw Error(where + " exceeds 65536 at entry " + std::to_string(i));
    }
    if (row[n - 1] != static_cast<int32_t>(kProbScale))
      throw Error(where + " does not end at 65536 (cdf[" + std::to_string(n - 1) +
                  "] = " + std::to_string(row[n - 1]) + ")");
    uint32_t* dst = &cdf_[row_start_[r]];
    EncSym* es = &enc_[row_start_[r]];
    for (size_t i = 0; i < n; ++i) dst[i] = static_cast<uint32_t>(row[i]);
    for (size_t s = 0; s + 1 < n; ++s) es[s] = make_enc_sym(dst[s], dst[s + 1] - dst[s]);
    es[n - 1] = make_enc_sym(0, 0);
    uint16_t* bk = &bucket_[r << kBucketBits];
    size_t s = 0;
    for (uint32_t k = 0; k < (1u << kBucketBits); ++k) {
      const uint32_t slot = k << kBucketShift;
      while (dst[s + 1] <= slot) ++s;  // terminates: dst[n-1] == 65536 > slot
      bk[k] = static_cast<uint16_t>(s);
      bucket32_[(r << kBucketBits) + k] =
          static_cast<uint32_t>(s) | (std::min<uint32_t>(dst[s + 1] - slot, 0xFFFFu) << 16);
    }
  }
  info_.resize(rows);
  for (size_t r = 0; r < rows; ++r) {
    const int64_t top = static_cast<int64_t>(offsets[r]) + lengths[r] - 3;
    if (top > std::numeric_limits<int32_t>::max())
      throw Error("tables: offset[" + std::to_string(r) + "] + cdf_length - 3 exceeds the int32 range");
    info_[r] = RowInfo{&cdf_[row_start_[r]], &bucket_[r << kBucketBits], &enc_[row_start_[r]],
                       offsets[r], lengths[r] - 2};
  }
  if (scale_table != nullptr) {
    if (n_scale != rows)
      throw Error("tables: scale_table has " + std::to_string(n_scale) + " entries but there are " +
                  std::to_string(rows) + " CDF rows");
    for (size_t k = 0; k < n_scale; ++k) {
      const float v = scale_table[k];
      if (!std::isfinite(v) || !(v > 0.0f))
        throw Error("tables: scale_table[" + std::to_string(k) + "] is not a finite positive value");
      if (k > 0 && !(v > scale_table[k - 1]))
        throw Error("tables: scale_table is not strictly ascending at entry " + std::to_string(k));
    }
    scale_table_.assign(scale_table, scale_table + n_scale);
    thr_size_ = 1;
    while (thr_size_ < rows) thr_size_ <<= 1;
    thresholds_.assign(thr_size_, std::numeric_limits<float>::infinity());
    for (size_t k = 0; k + 1 < rows; ++k) thresholds_[k] = scale_table[k];
    build_index_lut();
  }
}

void Tables::build_index_lut() {
  lut_n_ = 0;
  const size_t nt = rows_ - 1;  // thresholds table[0 .. rows-2]
  if (nt == 0) {                // one row: every index is 0
    lut_base_bits_ = 0;
    lut_shift_ = 31;
    lut_n_ = 1;
    lut_thr_.assign(128, std::numeric_limits<int32_t>::max());
    lut_count_.assign(128, 0);
    return;
  }
  std::vector<uint32_t> bits(nt);
  for (size_t k = 0; k < nt; ++k) std::memcpy(&bits[k], &scale_table_[k], 4);
  uint32_t min_gap = 0xFFFFFFFFu;
  for (size_t k = 1; k < nt; ++k) min_gap = std::min(min_gap, bits[k] - bits[k - 1]);
  uint32_t shift = 0;
  while (shift < 31 && (2ull << shift) <= min_gap) ++shift;  // 2^shift <= min_gap
  const uint64_t nb = ((static_cast<uint64_t>(bits[nt - 1]) - bits[0]) >> shift) + 2;
  if (nb > (1u << 16)) return;  // thresholds too dense: binary search
  lut_base_bits_ = bits[0];
  lut_shift_ = shift;
  lut_thr_.assign(std::max<uint64_t>(nb, 128), std::numeric_limits<int32_t>::max());
  lut_count_.assign(std::max<uint64_t>(nb, 128), 0);
  size_t k = 0;
  for (uint64_t b = 0; b < nb; ++b) {
    const uint64_t lo = static_cast<uint64_t>(bits[0]) + (b << shift);
    const uint64_t hi = lo + (1ull << shift);
    while (k < nt && bits[k] < lo) ++k;
    lut_count_[b] = static_cast<int32_t>(k);
    if (k < nt && bits[k] < hi) lut_thr_[b] = static_cast<int32_t>(bits[k]);
    if (k + 1 < nt && bits[k + 1] < hi) return;  // cannot happen (gap >= 2^shift); be safe
  }
  lut_n_ = static_cast<uint32_t>(nb);
  // packed variant: count in the high bits, in-bucket threshold offset in the low `shift` bits
  lut_pack_.clear();
  if (shift >= 1 && shift <= 24 && (static_cast<uint64_t>(nt) << shift) < (1ull << 31)) {
    lut_pack_.assign(lut_thr_.size(), 0);
    const int32_t none = static_cast<int32_t>((1u << shift) - 1);
    for (size_t b = 0; b < lut_thr_.size(); ++b) {
      const int32_t cnt = b < nb ? lut_count_[b] : static_cast<int32_t>(nt);
      int32_t off = none;
      if (b < nb && lut_thr_[b] != std::numeric_limits<int32_t>::max())
        off = static_cast<int32_t>(static_cast<int64_t>(lut_thr_[b]) -
                                   (static_cast<int64_t>(bits[0]) + (static_cast<int64_t>(b) << shift)));
      lut_pack_[b] = static_cast<int32_t>((static_cast<uint32_t>(cnt) << shift) | static_cast<uint32_t>(off));
    }
  }
}

// ================================================================ encoders
namespace {

/// Index source over an int32 array: validates every index.
struct ArrayIdx {
  const int32_t* idx;
  uint32_t rows;
  uint32_t bound() const { return rows; }
  inline int32_t operator()(size_t i) const {
    const int32_t id = idx[i];
    if (__builtin_expect(static_cast<uint32_t>(id) >= rows, 0)) throw_index(i, id, rows);
    return id;
  }
};

struct IndexLut {
  const int32_t* thr;
  const int32_t* cnt;
  int32_t base;
  int32_t shift;
  int32_t last;
};

inline int32_t f2bits(float f) {
  int32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

/// Exact table index of a clamped scale (s >= 0.11, +inf or NaN; NaN gives an in-range
/// index and is reported separately).  Positive floats order like their bit patterns.
inline int32_t lut_index(float s, const IndexLut& L) {
  const int32_t u = f2bits(s);
  const int32_t d = u - L.base;
  int32_t b = d < 0 ? 0 : (d >> L.shift);
  b = b < L.last ? b : L.last;
  return L.cnt[b] + (L.thr[b] < u ? 1 : 0);
}

IndexLut make_lut(const Tables& t) {
  return IndexLut{t.lut_thr_.data(), t.lut_count_.data(), static_cast<int32_t>(t.lut_base_bits_),
                  static_cast<int32_t>(t.lut_shift_), static_cast<int32_t>(t.lut_n_) - 1};
}

inline float clamp_scale(float s) { return s < 0.11f ? 0.11f : s; }

/// Index source over indexes this library computed itself (always in range).
struct TrustedIdx {
  const int32_t* idx;
  static uint32_t bound() { return 0xFFFFFFFFu; }
  inline int32_t operator()(size_t i) const { return idx[i]; }
};

/// Pushes the bypass chunks of one escape (encoder order) - compat format.
inline void compat_escape_chunks(uint64_t& x, uint64_t raw, uint32_t* w, size_t& nw) {
  auto put = [&](uint32_t v) {
    const bool emit = x >= kBypassMax;
    w[nw] = static_cast<uint32_t>(x);
    nw += emit;
    x = emit ? (x >> 32) : x;
    x = (x << 4) | v;
  };
  int m = 0;
  while (m < 16 && (raw >> (4 * m)) != 0) ++m;
  for (int j = m - 1; j >= 0; --j) put(static_cast<uint32_t>(raw >> (4 * j)) & 15u);
  put(static_cast<uint32_t>(m % 15));
  for (int k = 0; k < m / 15; ++k) put(15u);
}

inline void enc_step(uint64_t& x, const EncSym& e, uint32_t* w, size_t& nw) {
  // branchless renormalisation: x_max = ((L >> 16) << 32) * freq
  const bool emit = x >= e.x_max();
  w[nw] = static_cast<uint32_t>(x);
  nw += emit;
  const uint64_t xx = emit ? (x >> 32) : x;
  const uint64_t q = mulhi64(xx, e.rcp) >> e.shift;
  x = xx + e.bias + q * e.cmpl;
}

/// Hot loop of the compat encoder: codes elements i-1, i-2, ... while they have a valid
/// index, no escape and a non-zero frequency; returns how many elements are left (the last
/// of them stopped the loop).  Nothing in it calls out, so x, nw and the pointers stay in
/// registers (with the escape / error paths in the same loop GCC kept nw in memory, which
/// put a store-forwarding round trip on every element).
__attribute__((noinline)) size_t compat_hot(const RowInfo* info, const int32_t* sym,
                                            const int32_t* idx, uint32_t rows, size_t i,
                                            uint64_t& x_io, uint32_t* w, size_t& nw_io) {
  uint64_t x = x_io;
  size_t nw = nw_io;
  while (i > 0) {
    const size_t k = i - 1;
    const int32_t id = idx[k];
    if (__builtin_expect(static_cast<uint32_t>(id) >= rows, 0)) break;
    const RowInfo& ri = info[id];
    const int64_t v = static_cast<int64_t>(sym[k]) - ri.offset;
    if (__builtin_expect(static_cast<uint64_t>(v) >= static_cast<uint64_t>(ri.esc), 0)) break;
    const EncSym* es = ri.enc + v;
    if (__builtin_expect(es->zero, 0)) break;
    enc_step(x, *es, w, nw);
    i = k;
  }
  x_io = x;
  nw_io = nw;
  return i;
}

template <class IdxFn>
std::vector<uint8_t> encode_compat_t(const Tables& t, const int32_t* sym, size_t n,
                                     const IdxFn& idx_of) {
  Buf<uint32_t> buf;
  buf.reserve(n + 64);
  uint32_t* w = buf.data();
  size_t nw = 0;
  uint64_t x = kRansL;
  const RowInfo* info = t.info_.data();
  for (size_t i = n; i > 0;) {
    // common elements in the call-free hot loop; the one that stops it is coded below
    i = compat_hot(info, sym, idx_of.idx, idx_of.bound(), i, x, w, nw);
    if (i == 0) break;
    --i;
    const int32_t id = idx_of(i);
    const RowInfo& ri = info[id];
    const int64_t v = static_cast<int64_t>(sym[i]) - ri.offset;
    const EncSym* es;
    if (__builtin_expect(static_cast<uint64_t>(v) < static_cast<uint64_t>(ri.esc), 1)) {
      es = ri.enc + v;
    } else {
      es = ri.enc + ri.esc;
      if (es->zero) throw_zero_freq(i, sym[i], id);
      // room for this escape (<= 20 words) and one word per remaining element
      if (buf.capacity() < nw + i + 64) {
        buf.reserve(nw + i + 64, nw);
        w = buf.data();
      }
      compat_escape_chunks(x, escape_raw(v, ri.esc), w, nw);
    }
    if (__builtin_expect(es->zero, 0)) throw_zero_freq(i, sym[i], id);
    enc_step(x, *es, w, nw);
  }
  std::vector<uint8_t> bytes(8 + 4 * nw);
  store_le64(bytes.data(), x);
  uint8_t* p = bytes.data() + 8;
  for (size_t k = nw; k-- > 0; p += 4) store_le32(p, w[k]);
  return bytes;
}

/// Hot loop of the native encoder: codes whole groups of kNativeLanes elements (i is a
/// multiple of kNativeLanes) from the end while every element of the group has a valid index,
/// no escape and a non-zero frequency; returns how many elements are left (the group just
/// below that count stopped it, nothing of it was coded).  Same order as the generic path.
__attribute__((noinline)) size_t native_hot(const RowInfo* info, const int32_t* sym,
                                            const int32_t* idx, uint32_t rows, size_t i,
                                            uint64_t* x_io, uint32_t* w, size_t& nw_io) {
  constexpr int NL = kNativeLanes;
  uint64_t x[NL];
  for (int l = 0; l < NL; ++l) x[l] = x_io[l];
  size_t nw = nw_io;
  while (i >= static_cast<size_t>(NL)) {
    const size_t b = i - NL;
    const EncSym* es[NL];
    uint32_t stop = 0;
#pragma GCC unroll 8
    for (int l = 0; l < NL; ++l) {
      const int32_t id = idx[b + l];
      const uint32_t bad_id = static_cast<uint32_t>(id) >= rows;
      const RowInfo& ri = info[bad_id ? 0 : id];
      const int64_t v = static_cast<int64_t>(sym[b + l]) - ri.offset;
      const uint32_t out = static_cast<uint64_t>(v) >= static_cast<uint64_t>(ri.esc);
      es[l] = ri.enc + (out ? 0 : v);
      stop |= bad_id | out | es[l]->zero;
    }
    if (__builtin_expect(stop != 0, 0)) break;
#pragma GCC unroll 8
    for (int l = NL - 1; l >= 0; --l) enc_step(x[l], *es[l], w, nw);
    i = b;
  }
  for (int l = 0; l < NL; ++l) x_io[l] = x[l];
  nw_io = nw;
  return i;
}

#if defined(__GNUC__) && defined(__x86_64__)
#define RANS_HAVE_NATIVE_SIMD 1
/// AVX-512 F/VL/DQ native coders (runtime dispatch; RANS_NO_AVX512=1 disables them).
bool native_simd_enabled() {
  static const bool on = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && std::getenv("RANS_NO_AVX512") == nullptr;
  }();
  return on;
}

bool native_simd_tables_ok(const Tables& t) {  // int32 gather indexes
  return t.rows() <= (1u << 20) && t.cdf_.size() < (1ull << 29);
}

struct EncHalf {
  __m512i x;      // new states
  __m256i lo;     // low 32 bits of the old states (the words of the emitting lanes)
  __mmask8 emit;  // lanes that emit a word
  bool ok;
};

/// Per-row data (row start, escape symbol, offset) for 8 lanes: from registers when there
/// are at most 64 rows (two permutes and a blend each), else by gathers.
struct RowData {
  bool lut;
  const int* rs_p;
  const int* len_p;
  const int* off_p;
  __m512i rs[4], esc[4], off[4];
};

__attribute__((target("avx512f,avx512vl,avx512dq"))) inline void load_rows(const Tables& t, RowData& R) {
  R.rs_p = reinterpret_cast<const int*>(t.row_start_.data());
  R.len_p = t.length_.data();
  R.off_p = t.offset_.data();
  R.lut = t.rows() <= 64;
  if (!R.lut) return;
  const size_t rows = t.rows();
  for (size_t q = 0; q < 4; ++q) {
    const size_t left = rows > 16 * q ? rows - 16 * q : 0;
    const __mmask16 m = static_cast<__mmask16>(left >= 16 ? 0xFFFF : ((1u << left) - 1));
    R.rs[q] = _mm512_maskz_loadu_epi32(m, R.rs_p + 16 * q);
    R.esc[q] = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(m, R.len_p + 16 * q), _mm512_set1_epi32(2));
    R.off[q] = _mm512_maskz_loadu_epi32(m, R.off_p + 16 * q);
  }
}

__attribute__((target("avx512f,avx512vl,avx512dq"))) inline __m256i lut64(const __m512i* T, __m256i id) {
  const __m512i i = _mm512_castsi256_si512(id);
  const __m512i a = _mm512_permutex2var_epi32(T[0], i, T[1]);
  const __m512i b = _mm512_permutex2var_epi32(T[2], i, T[3]);
  return _mm512_castsi512_si256(
      _mm512_mask_blend_epi32(_mm512_test_epi32_mask(i, _mm512_set1_epi32(32)), a, b));
}

__attribute__((target("avx512f,avx512vl,avx512dq"))) inline void row_data(const RowData& R, __m256i ids,
                                                                        __m256i& rs, __m256i& esc,
                                                                        __m256i& off) {
  if (R.lut) {
    rs = lut64(R.rs, ids);
    esc = lut64(R.esc, ids);
    off = lut64(R.off, ids);
  } else {
    rs = _mm256_i32gather_epi32(R.rs_p, ids, 4);
    esc = _mm256_sub_epi32(_mm256_i32gather_epi32(R.len_p, ids, 4), _mm256_set1_epi32(2));
    off = _mm256_i32gather_epi32(R.off_p, ids, 4);
  }
}

/// bit-reversed bytes
constexpr uint8_t rev8(unsigned b) {
  return static_cast<uint8_t>(((b & 1) << 7) | ((b & 2) << 5) | ((b & 4) << 3) | ((b & 8) << 1) |
                              ((b & 16) >> 1) | ((b & 32) >> 3) | ((b & 64) >> 5) | ((b & 128) >> 7));
}
struct Rev8Table {
  uint8_t v[256];
  constexpr Rev8Table() : v() {
    for (unsigned b = 0; b < 256; ++b) v[b] = rev8(b);
  }
  constexpr uint8_t operator[](unsigned b) const { return v[b]; }
};
constexpr Rev8Table kRev8{};

struct EncHalf;
__attribute__((target("avx512f,avx512vl,avx512dq,popcnt"))) inline void native_enc8_code(
    const Tables& t, __m256i gid, bool ok, __m512i x, EncHalf& r);
__attribute__((target("avx512f,avx512vl,avx512dq,popcnt"))) inline void native_enc8_sf(
    __m512i start, __m512i f, bool ok, __m512i x, EncHalf& r);

/// One encoder step of 8 lanes (elements idx[0..7] / sym[0..7]); ok = false when a lane has
/// an index out of range, an escape or a zero-frequency symbol (nothing is committed then).
__attribute__((target("avx512f,avx512vl,avx512dq,popcnt"))) inline EncHalf native_enc8(
    const Tables& t, const RowData& R, const int32_t* idx, const int32_t* sym, __m256i rows_v,
    __m512i x) {
  EncHalf r;
  const __m256i id = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx));
  const __mmask8 bad = _mm256_cmpge_epu32_mask(id, rows_v);
  const __m256i ids = _mm256_maskz_mov_epi32(static_cast<__mmask8>(~bad), id);
  __m256i rs, esc32, off;
  row_data(R, ids, rs, esc32, off);
  const __m512i v = _mm512_sub_epi64(
      _mm512_cvtepi32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sym))),
      _mm512_cvtepi32_epi64(off));
  const __m512i esc = _mm512_cvtepi32_epi64(esc32);
  const __mmask8 inr = _mm512_cmplt_epu64_mask(v, esc);  // 0 <= v < esc
  const __m256i gid = _mm256_add_epi32(rs, _mm256_maskz_mov_epi32(inr, _mm512_cvtepi64_epi32(v)));
  native_enc8_code(t, gid, bad == 0 && inr == 0xFF, x, r);
  return r;
}

/// The state update of native_enc8 for 8 lanes whose symbol positions in cdf_ are known.
__attribute__((target("avx512f,avx512vl,avx512dq,popcnt"))) inline void native_enc8_code(
    const Tables& t, __m256i gid, bool ok, __m512i x, EncHalf& r) {
  const long long* cdf64 = reinterpret_cast<const long long*>(t.cdf_.data());
  // (cdf[s], cdf[s+1]) in one 64-bit gather per lane (cdf_ has a guard entry)
  const __m512i pr = _mm512_i32gather_epi64(gid, cdf64, 4);
  const __m512i start = _mm512_and_si512(pr, _mm512_set1_epi64(0xFFFFFFFFll));
  const __m512i f = _mm512_sub_epi64(_mm512_srli_epi64(pr, 32), start);
  native_enc8_sf(start, f, ok, x, r);
}

/// The state update of 8 lanes from (start, freq); freq 0 clears ok.
__attribute__((target("avx512f,avx512vl,avx512dq,popcnt"))) inline void native_enc8_sf(
    __m512i start, __m512i f, bool ok, __m512i x, EncHalf& r) {
  const __mmask8 zero = _mm512_cmpeq_epi64_mask(f, _mm512_setzero_si512());
  r.ok = ok && zero == 0;
  const __m512i xmax = _mm512_slli_epi64(f, 47);
  const __mmask8 emit = _mm512_cmpge_epu64_mask(x, xmax);
  r.lo = _mm512_cvtepi64_epi32(x);
  r.emit = emit;
  const __m512i xx = _mm512_mask_srli_epi64(x, emit, x, 32);
  // q = floor(xx / f) exactly: xx < f * 2^47, so the double quotient is within 1/32 of the
  // real one and its truncation is q - 1, q or q + 1; one correction step on the remainder.
  const __m512i fs = _mm512_mask_mov_epi64(f, zero, _mm512_set1_epi64(1));  // no 0/0
  __m512i q = _mm512_cvttpd_epu64(_mm512_div_pd(_mm512_cvtepu64_pd(xx), _mm512_cvtepu64_pd(fs)));
  __m512i rem = _mm512_sub_epi64(xx, _mm512_mullo_epi64(q, fs));
  const __mmask8 lo_m = _mm512_cmplt_epi64_mask(rem, _mm512_setzero_si512());
  q = _mm512_mask_sub_epi64(q, lo_m, q, _mm512_set1_epi64(1));
  rem = _mm512_mask_add_epi64(rem, lo_m, rem, fs);
  const __mmask8 hi_m = _mm512_cmpge_epi64_mask(rem, fs);
  q = _mm512_mask_add_epi64(q, hi_m, q, _mm512_set1_epi64(1));
  rem = _mm512_mask_sub_epi64(rem, hi_m, rem, fs);
  r.x = _mm512_add_epi64(_mm512_slli_epi64(q, kPrecision), _mm512_add_epi64(rem, start));
}

/// native_enc8 with precomputed symbol positions (YEncoder: gid < 0 marks an escape).
__attribute__((target("avx512f,avx512vl,avx512dq,popcnt"))) inline EncHalf native_enc8g(
    const Tables& t, const int32_t* gidp, __m512i x) {
  EncHalf r;
  const __m256i g = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gidp));
  const __mmask8 neg = _mm256_cmplt_epi32_mask(g, _mm256_setzero_si256());
  if (neg != 0) {
    r.ok = false;
    return r;
  }
  // 8 scalar loads of (cdf[s], cdf[s+1]) (cheaper than a gather here)
  const uint32_t* cdf = t.cdf_.data();
  uint64_t p[8];
  for (int l = 0; l < 8; ++l) std::memcpy(&p[l], cdf + gidp[l], 8);
  const __m512i pr = _mm512_loadu_si512(p);
  const __m512i start = _mm512_and_si512(pr, _mm512_set1_epi64(0xFFFFFFFFll));
  const __m512i f = _mm512_sub_epi64(_mm512_srli_epi64(pr, 32), start);
  native_enc8_sf(start, f, true, x, r);
  return r;
}

/// AVX-512 native encoder: whole groups of 16 from the end (i is a multiple of 16), lanes
/// 8-15 and 0-7 in two zmm registers; the same words in the same order as native_hot.
/// Returns how many elements are left (the group below stopped it; nothing of it coded).
__attribute__((target("avx512f,avx512vl,avx512dq,popcnt"))) size_t native_enc_avx512(
    const Tables& t, const int32_t* sym, const int32_t* idx, uint32_t rows, const int32_t* gid,
    size_t i, uint64_t* x_io, uint32_t* w, size_t& nw_io) {
  static_assert(kNativeLanes == 16, "two zmm registers of 8 states");
  __m512i xa = _mm512_loadu_si512(x_io), xb = _mm512_loadu_si512(x_io + 8);
  size_t nw = nw_io;
  const __m256i rows_v = _mm256_set1_epi32(static_cast<int>(rows));
  const __m512i rev16 = _mm512_set_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  RowData R;
  load_rows(t, R);
  while (i >= static_cast<size_t>(kNativeLanes)) {
    const size_t b = i - kNativeLanes;
    EncHalf ha, hb;
    if (gid) {
      hb = native_enc8g(t, gid + b + 8, xb);
      ha = native_enc8g(t, gid + b, xa);
    } else {
      hb = native_enc8(t, R, idx + b + 8, sym + b + 8, rows_v, xb);
      ha = native_enc8(t, R, idx + b, sym + b, rows_v, xa);
    }
    if (!(ha.ok && hb.ok)) break;
    // words of the emitting lanes, lane 15 first: reverse lanes 0..15, then compress;
    // w has room for 16 words past the element count left (see the callers)
    const __m512i lo16 = _mm512_inserti64x4(_mm512_castsi256_si512(ha.lo), hb.lo, 1);
    const unsigned m16 = static_cast<unsigned>(ha.emit) | (static_cast<unsigned>(hb.emit) << 8);
    const __mmask16 rev_m = static_cast<__mmask16>((kRev8[m16 & 0xFF] << 8) | kRev8[m16 >> 8]);
    _mm512_storeu_si512(w + nw, _mm512_maskz_compress_epi32(rev_m, _mm512_permutexvar_epi32(rev16, lo16)));
    nw += static_cast<size_t>(__builtin_popcount(m16));
    xa = ha.x;
    xb = hb.x;
    i = b;
  }
  _mm512_storeu_si512(x_io, xa);
  _mm512_storeu_si512(x_io + 8, xb);
  nw_io = nw;
  return i;
}
#endif

template <class IdxFn>
std::vector<uint8_t> encode_native_t(const Tables& t, const int32_t* sym, size_t n,
                                     const IdxFn& idx_of, const int32_t* gid) {
  constexpr int NL = kNativeLanes;
  Buf<uint32_t> buf;
  buf.reserve(n + 16);  // + room for the 16-word vector stores of the SIMD encoder
  uint32_t* w = buf.data();
  size_t nw = 0;
  std::vector<uint64_t> esc;  // escape raws in encoder (reverse) order
  uint64_t x[NL];
  for (int l = 0; l < NL; ++l) x[l] = kRansL;
  const RowInfo* info = t.info_.data();

  auto one = [&](uint64_t& xs, size_t i) __attribute__((always_inline)) {
    const int32_t id = idx_of(i);
    const RowInfo& ri = info[id];
    const int64_t v = static_cast<int64_t>(sym[i]) - ri.offset;
    const EncSym* es;
    if (__builtin_expect(static_cast<uint64_t>(v) < static_cast<uint64_t>(ri.esc), 1)) {
      es = ri.enc + v;
    } else {
      es = ri.enc + ri.esc;
      esc.push_back(escape_raw(v, ri.esc));
    }
    if (__builtin_expect(es->zero, 0)) throw_zero_freq(i, sym[i], id);
    enc_step(xs, *es, w, nw);
  };

  size_t i = n;
  while (i % NL) {
    --i;
    one(x[i % NL], i);
  }
  while (i) {
    // whole groups of common elements in the call-free hot loop; a group with an escape,
    // a zero-frequency symbol or a bad index is coded here
#ifdef RANS_HAVE_NATIVE_SIMD
    if (native_simd_enabled() && native_simd_tables_ok(t))
      i = native_enc_avx512(t, sym, idx_of.idx, idx_of.bound(), gid, i, x, w, nw);
    else
#endif
      i = native_hot(info, sym, idx_of.idx, idx_of.bound(), i, x, w, nw);
    if (i == 0) break;
    i -= NL;
#pragma GCC unroll 8
    for (int l = NL - 1; l >= 0; --l) one(x[l], i + static_cast<size_t>(l));
  }

  BitWriter bw;
  for (size_t k = esc.size(); k-- > 0;) bw.put_golomb(esc[k]);
  bw.flush();
  if (bw.bytes.size() > 0xffffffffull) throw Error("native: escape section too large");

  const size_t hdr = 8 + 8 * NL;
  std::vector<uint8_t> bytes(hdr + 4 * nw + bw.bytes.size());
  bytes[0] = kNativeMagic;
  bytes[1] = kNativeVersion;
  bytes[2] = static_cast<uint8_t>(NL);
  bytes[3] = 0;
  store_le32(bytes.data() + 4, static_cast<uint32_t>(bw.bytes.size()));
  for (int l = 0; l < NL; ++l) store_le64(bytes.data() + 8 + 8 * l, x[l]);
  uint8_t* p = bytes.data() + hdr;
  for (size_t k = nw; k-- > 0; p += 4) store_le32(p, w[k]);
  if (!bw.bytes.empty()) std::memcpy(p, bw.bytes.data(), bw.bytes.size());
  return bytes;
}

template <class IdxFn>
std::vector<uint8_t> encode_t(const Tables& t, Format fmt, const int32_t* sym, size_t n,
                              const IdxFn& idx_of, const int32_t* gid = nullptr) {
  if (fmt == Format::Compat) return encode_compat_t(t, sym, n, idx_of);
  return encode_native_t(t, sym, n, idx_of, gid);
}

}  // namespace

std::vector<uint8_t> encode_with_indexes(const Tables& t, Format fmt, const int32_t* symbols,
                                         const int32_t* indexes, size_t n) {
  const ArrayIdx src{indexes, static_cast<uint32_t>(t.rows())};
  return encode_t(t, fmt, symbols, n, src);
}

// ================================================================= Decoder
Decoder::Decoder(TablesPtr tables, Format fmt, const uint8_t* data, size_t size)
    : t_(std::move(tables)), fmt_(fmt) {
  if (!t_) throw Error("decoder: no tables");
  if (fmt == Format::Compat) {
    if (size < 8)
      throw Error("compat stream too short: " + std::to_string(size) +
                  " bytes (at least 8 needed for the state)");
    if (size % 4 != 0)
      throw Error("compat stream length " + std::to_string(size) + " is not a multiple of 4");
    x_[0] = load_le64(data);
    if (x_[0] < kRansL || x_[0] >= kStateMax) throw Error("compat stream: invalid initial state");
    nwords_ = (size - 8) / 4;
    load_words(data + 8);
  } else {
    constexpr int NL = kNativeLanes;
    const size_t hdr = 8 + 8 * NL;
    if (size < 8) throw Error("native stream too short: " + std::to_string(size) + " bytes");
    if (data[0] != kNativeMagic) throw Error("native stream: bad magic byte (not a native rANS stream)");
    if (data[1] != kNativeVersion)
      throw Error("native stream: unsupported version " + std::to_string(data[1]));
    if (data[2] != NL || data[3] != 0) throw Error("native stream: unsupported lane count / flags");
    if (size < hdr) throw Error("native stream too short: " + std::to_string(size) + " bytes");
    const size_t raw_len = load_le32(data + 4);
    if (raw_len > size - hdr) throw Error("native stream: escape section longer than the stream");
    const size_t wbytes = size - hdr - raw_len;
    if (wbytes % 4 != 0) throw Error("native stream: word section is not a multiple of 4 bytes");
    for (int l = 0; l < NL; ++l) {
      x_[l] = load_le64(data + 8 + 8 * l);
      if (x_[l] < kRansL || x_[l] >= kStateMax) throw Error("native stream: invalid initial state");
    }
    nwords_ = wbytes / 4;
    load_words(data + hdr);
    raw_.assign(data + hdr + wbytes, data + size);
  }
}

void Decoder::load_words(const uint8_t* p) {
  words_.reserve(nwords_ + kWordPad);
  uint32_t* w = words_.data();
  for (size_t k = 0; k < nwords_; ++k) w[k] = load_le32(p + 4 * k);
  for (size_t k = 0; k < kWordPad; ++k) w[nwords_ + k] = 0;
}

void Decoder::fail(const std::string& msg) {
  failed_ = true;
  fail_msg_ = msg;
  throw Error(msg);
}

namespace {

inline int32_t finish_escape(uint64_t raw, int64_t e, int32_t offset, size_t i) {
  const int64_t value = static_cast<int64_t>(raw >> 1);
  const int64_t v = (raw & 1) ? -value - 1 : value + e;
  const int64_t out = v + offset;
  if (out < std::numeric_limits<int32_t>::min() || out > std::numeric_limits<int32_t>::max())
    throw Error("corrupt stream: escape value out of int32 range at element " + std::to_string(i));
  return static_cast<int32_t>(out);
}

struct ArraySink {
  int32_t* out;
  inline void operator()(size_t i, int32_t v) const { out[i] = v; }
};

}  // namespace

template <class Src, class Sink>
void Decoder::run(size_t n, Src& src, Sink& sink) {
  if (failed_) throw Error("decoder is in a failed state: " + fail_msg_);
  try {
    if (fmt_ == Format::Compat)
      run_compat(n, src, sink);
    else
      run_native(n, src, sink);
  } catch (const Error& e) {
    failed_ = true;
    if (fail_msg_.empty()) fail_msg_ = e.what();
    throw;
  }
}

void Decoder::decode(const int32_t* indexes, size_t n, int32_t* out) {
  ArrayIdx src{indexes, static_cast<uint32_t>(t_->rows())};
  ArraySink sink{out};
  run(n, src, sink);
}

__attribute__((noinline)) int32_t Decoder::compat_escape(const RowInfo& ri, size_t i) {
  // bypass chunks share the single state x_[0] and the word position pos_
  auto get4 = [&]() -> uint32_t {
    const uint32_t v = static_cast<uint32_t>(x_[0] & 15u);
    x_[0] >>= 4;
    if (x_[0] < kRansL) {
      if (pos_ >= nwords_)
        throw Error("truncated stream: ran out of data at element " + std::to_string(i));
      x_[0] = (x_[0] << 32) | words_.data()[pos_++];
    }
    return v;
  };
  int m = 0;
  uint32_t c;
  do {
    c = get4();
    m += static_cast<int>(c);
    if (m > kMaxEscapeChunks)
      throw Error("corrupt stream: escape payload too long at element " + std::to_string(i));
  } while (c == 15);
  uint64_t raw = 0;
  for (int j = 0; j < m; ++j) raw |= static_cast<uint64_t>(get4()) << (4 * j);
  return finish_escape(raw, ri.esc, ri.offset, i);
}

template <class Src, class Sink>
void Decoder::run_compat(size_t n, Src& src, Sink& sink) {
  uint64_t x = x_[0];
  size_t pos = pos_;
  const uint32_t* words = words_.data();
  const size_t nwords = nwords_;
  const RowInfo* info = t_->info_.data();
  try {
    for (size_t i = 0; i < n; ++i) {
      const int32_t id = src(i);
      const RowInfo& ri = info[id];
      const uint32_t slot = static_cast<uint32_t>(x) & (kProbScale - 1);
      uint32_t s = ri.bucket[slot >> kBucketShift];
      while (ri.cdf[s + 1] <= slot) ++s;
      const uint32_t b = ri.cdf[s];
      const uint32_t f = ri.cdf[s + 1] - b;
      x = f * (x >> kPrecision) + slot - b;
      const bool need = x < kRansL;  // branchless refill (words are zero padded)
      const uint64_t w = words[pos];
      x = need ? ((x << 32) | w) : x;
      pos += need;
      if (__builtin_expect(pos > nwords, 0))
        throw Error("truncated stream: ran out of data at element " + std::to_string(i));
      if (__builtin_expect(static_cast<int32_t>(s) < ri.esc, 1)) {
        sink(i, static_cast<int32_t>(s) + ri.offset);  // fits: checked with the tables
      } else {
        x_[0] = x;
        pos_ = pos;
        sink(i, compat_escape(ri, i));
        x = x_[0];
        pos = pos_;
      }
    }
  } catch (...) {
    x_[0] = x;
    pos_ = std::min(pos, nwords);
    throw;
  }
  x_[0] = x;
  pos_ = pos;
}

__attribute__((noinline)) uint64_t Decoder::read_golomb(size_t i) {
  auto refill_bits = [&]() {
    while (bitcnt_ <= 56 && raw_pos_ < raw_.size()) {
      bitbuf_ |= static_cast<uint64_t>(raw_[raw_pos_++]) << bitcnt_;
      bitcnt_ += 8;
    }
  };
  int zeros = 0;
  for (;;) {
    refill_bits();
    if (bitcnt_ == 0)
      throw Error("truncated stream: escape section exhausted at element " + std::to_string(i));
    const uint64_t mask = bitcnt_ >= 64 ? ~0ull : ((1ull << bitcnt_) - 1);
    const uint64_t b = bitbuf_ & mask;
    if (b == 0) {
      zeros += bitcnt_;
      bitbuf_ = 0;
      bitcnt_ = 0;
      if (zeros > kMaxGolombZeros)
        throw Error("corrupt stream: escape code too long at element " + std::to_string(i));
    } else {
      const int tz = __builtin_ctzll(b);
      zeros += tz;
      bitbuf_ >>= (tz + 1);
      bitcnt_ -= tz + 1;
      break;
    }
  }
  if (zeros > kMaxGolombZeros)
    throw Error("corrupt stream: escape code too long at element " + std::to_string(i));
  refill_bits();
  if (bitcnt_ < zeros)
    throw Error("truncated stream: escape section exhausted at element " + std::to_string(i));
  const uint64_t low = zeros == 0 ? 0 : (bitbuf_ & ((1ull << zeros) - 1));
  bitbuf_ = zeros >= 64 ? 0 : (bitbuf_ >> zeros);
  bitcnt_ -= zeros;
  return ((1ull << zeros) | low) - 1;
}

__attribute__((noinline)) int32_t Decoder::native_escape(const RowInfo& ri, size_t i) {
  return finish_escape(read_golomb(i), ri.esc, ri.offset, i);
}

namespace {

#ifdef RANS_HAVE_NATIVE_SIMD

/// AVX-512 decoding of whole lane groups of the native format: the 16 64-bit states live in
/// two zmm registers (lanes 0-7 and 8-15), two independent dependency chains.  Decodes
/// groups [i, i+16), [i+16, i+32), ... while i + 16 <= n and returns the first group it did
/// not decode (nothing of that group is consumed): a group with an index out of range, an
/// escape, or a refill past the last word is left to the scalar code, which handles it (and
/// raises its errors) exactly as before.  Same arithmetic and word order as the scalar
/// decoder: lanes refill from the next words in lane order.
struct DecHalf {
  __m512i x;      // new states (before refill)
  __m256i val;    // decoded values
  __mmask8 need;  // lanes that refill
  bool ok;
};

__attribute__((target("avx512f,avx512vl,avx512dq,popcnt"))) inline DecHalf native_dec8(
    const Tables& t, const RowData& R, const int32_t* idx, __m256i rows_v, __m512i x) {
  const int* cdf = reinterpret_cast<const int*>(t.cdf_.data());
  const long long* cdf64 = reinterpret_cast<const long long*>(t.cdf_.data());
  const int* bucket = reinterpret_cast<const int*>(t.bucket32_.data());
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i low16 = _mm256_set1_epi32(0xFFFF);
  DecHalf r;
  const __m256i id = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx));
  const __mmask8 bad = _mm256_cmpge_epu32_mask(id, rows_v);
  r.ok = bad == 0;
  const __m256i ids = _mm256_maskz_mov_epi32(static_cast<__mmask8>(~bad), id);  // safe rows
  const __m256i slot = _mm512_cvtepi64_epi32(_mm512_and_si512(x, _mm512_set1_epi64(0xFFFF)));
  const __m256i bk = _mm256_i32gather_epi32(
      bucket, _mm256_add_epi32(_mm256_slli_epi32(ids, kBucketBits), _mm256_srli_epi32(slot, kBucketShift)), 4);
  __m256i rs, esc, off;
  row_data(R, ids, rs, esc, off);
  __m256i s = _mm256_and_si256(bk, low16);
  // cdf[s+1] <= slot  <=>  (cdf[s+1] - bucket start) <= slot within the bucket
  __mmask8 m = _mm256_cmple_epu32_mask(_mm256_srli_epi32(bk, 16),
                                       _mm256_and_si256(slot, _mm256_set1_epi32((1 << kBucketShift) - 1)));
  while (m != 0) {  // rare: the slot lies past the bucket's first symbol
    s = _mm256_mask_add_epi32(s, m, s, one);
    const __m256i c1 = _mm256_mmask_i32gather_epi32(_mm256_setzero_si256(), m,
                                                    _mm256_add_epi32(_mm256_add_epi32(rs, s), one), cdf, 4);
    m = _mm256_mask_cmple_epu32_mask(m, c1, slot);
  }
  r.ok &= _mm256_cmpge_epi32_mask(s, esc) == 0;
  // (cdf[s], cdf[s+1]) in one 64-bit gather per lane (cdf_ has a guard entry)
  const __m512i pr = _mm512_i32gather_epi64(_mm256_add_epi32(rs, s), cdf64, 4);
  const __m512i c0 = _mm512_and_si512(pr, _mm512_set1_epi64(0xFFFFFFFFll));
  const __m512i f = _mm512_sub_epi64(_mm512_srli_epi64(pr, 32), c0);
  r.x = _mm512_add_epi64(_mm512_mullo_epi64(f, _mm512_srli_epi64(x, kPrecision)),
                         _mm512_sub_epi64(_mm512_cvtepu32_epi64(slot), c0));
  r.need = _mm512_cmplt_epu64_mask(r.x, _mm512_set1_epi64(static_cast<long long>(kRansL)));
  r.val = _mm256_add_epi32(s, off);
  return r;
}

__attribute__((target("avx512f,avx512vl,avx512dq,popcnt"))) size_t native_dec_avx512(
    const Tables& t, const int32_t* idx, uint32_t rows, int32_t* out, size_t i, size_t n,
    uint64_t* x_io, const uint32_t* words, size_t& pos_io, size_t nwords) {
  static_assert(kNativeLanes == 16, "two zmm registers of 8 states");
  __m512i xa = _mm512_loadu_si512(x_io), xb = _mm512_loadu_si512(x_io + 8);
  size_t pos = pos_io;
  const __m256i rows_v = _mm256_set1_epi32(static_cast<int>(rows));
  RowData R;
  load_rows(t, R);
  for (; i + kNativeLanes <= n; i += kNativeLanes) {
    const DecHalf a = native_dec8(t, R, idx + i, rows_v, xa);
    const DecHalf b = native_dec8(t, R, idx + i + 8, rows_v, xb);
    const size_t ta = static_cast<size_t>(__builtin_popcount(a.need));
    const size_t tb = static_cast<size_t>(__builtin_popcount(b.need));
    if (!(a.ok && b.ok) || pos + ta + tb > nwords) break;  // scalar path for this group
    const __m512i wa = _mm512_cvtepu32_epi64(_mm256_maskz_expandloadu_epi32(a.need, words + pos));
    const __m512i wb = _mm512_cvtepu32_epi64(_mm256_maskz_expandloadu_epi32(b.need, words + pos + ta));
    xa = _mm512_mask_or_epi64(a.x, a.need, _mm512_slli_epi64(a.x, 32), wa);
    xb = _mm512_mask_or_epi64(b.x, b.need, _mm512_slli_epi64(b.x, 32), wb);
    pos += ta + tb;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), a.val);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + 8), b.val);
  }
  _mm512_storeu_si512(x_io, xa);
  _mm512_storeu_si512(x_io + 8, xb);
  pos_io = pos;
  return i;
}
#endif

template <class Src, class Sink>
struct NativeSimdArgs {
  static constexpr bool kOk = false;
};
template <>
struct NativeSimdArgs<TrustedIdx, ArraySink> {
  static constexpr bool kOk = true;
};
template <>
struct NativeSimdArgs<ArrayIdx, ArraySink> {
  static constexpr bool kOk = true;
};

}  // namespace

template <class Src, class Sink>
void Decoder::run_native(size_t n, Src& src, Sink& sink) {
  constexpr int NL = kNativeLanes;
  const RowInfo* info = t_->info_.data();
  const uint32_t* words = words_.data();
  const size_t nwords = nwords_;
  size_t pos = pos_;
  uint64_t x[NL];
  for (int l = 0; l < NL; ++l) x[l] = x_[l];

  auto one = [&](uint64_t& xs, size_t i) __attribute__((always_inline)) {
    const int32_t id = src(i);
    const RowInfo& ri = info[id];
    const uint32_t slot = static_cast<uint32_t>(xs) & (kProbScale - 1);
    uint32_t s = ri.bucket[slot >> kBucketShift];
    while (ri.cdf[s + 1] <= slot) ++s;
    const uint32_t b = ri.cdf[s];
    const uint32_t f = ri.cdf[s + 1] - b;
    uint64_t xx = f * (xs >> kPrecision) + slot - b;
    const bool need = xx < kRansL;
    const uint64_t w = words[pos];
    xx = need ? ((xx << 32) | w) : xx;
    pos += need;
    xs = xx;
    if (__builtin_expect(static_cast<int32_t>(s) < ri.esc, 1))
      sink(i, static_cast<int32_t>(s) + ri.offset);
    else
      sink(i, native_escape(ri, i));
  };
  auto check = [&](size_t i) {
    if (__builtin_expect(pos > nwords, 0))
      throw Error("truncated stream: ran out of data near element " + std::to_string(i));
  };

  try {
    size_t i = 0;
    while (i < n && ((count_ + i) % NL) != 0) {
      one(x[(count_ + i) % NL], i);
      check(i);
      ++i;
    }
    while (i + NL <= n) {
#ifdef RANS_HAVE_NATIVE_SIMD
      if constexpr (NativeSimdArgs<Src, Sink>::kOk) {
        if (native_simd_enabled() && native_simd_tables_ok(*t_)) {
          i = native_dec_avx512(*t_, src.idx, src.bound(), sink.out, i, n, x, words, pos, nwords);
          if (i + NL > n) break;
        }
      }
#endif
#pragma GCC unroll 8
      for (int l = 0; l < NL; ++l) one(x[l], i + static_cast<size_t>(l));
      check(i);
      i += NL;
    }
    while (i < n) {
      one(x[(count_ + i) % NL], i);
      check(i);
      ++i;
    }
  } catch (...) {
    for (int l = 0; l < NL; ++l) x_[l] = x[l];
    pos_ = std::min(pos, nwords);
    throw;
  }
  for (int l = 0; l < NL; ++l) x_[l] = x[l];
  pos_ = pos;
  count_ += n;
}

void Decoder::finish() {
  if (failed_) throw Error("decoder is in a failed state: " + fail_msg_);
  if (pos_ != nwords_)
    throw Error("stream not fully consumed: " + std::to_string(nwords_ - pos_) +
                " words left (wrong element count, indexes or corrupt stream)");
  const int lanes = fmt_ == Format::Compat ? 1 : kNativeLanes;
  for (int l = 0; l < lanes; ++l)
    if (x_[l] != kRansL)
      throw Error("corrupt stream: final rANS state is not the initial state "
                  "(wrong indexes, wrong element count or corrupted data)");
  if (fmt_ == Format::Native) {
    if (raw_pos_ != raw_.size() || bitcnt_ >= 8 || bitbuf_ != 0)
      throw Error("corrupt stream: escape section not consumed exactly");
  }
}

void decode_with_indexes(const TablesPtr& t, Format fmt, const uint8_t* data, size_t size,
                         const int32_t* indexes, size_t n, int32_t* out) {
  Decoder d(t, fmt, data, size);
  d.decode(indexes, n, out);
  d.finish();
}

// ================================================== Gaussian conditional
size_t half_size(size_t C, size_t H, size_t W) {
  if (W % 2 != 0) throw Error("checkerboard needs an even width, got W=" + std::to_string(W));
  return C * H * (W / 2);
}

namespace {
inline uint32_t half_parity(Half half, size_t r) {
  // anchors: (even row, odd col), (odd row, even col); non-anchors the rest
  return half == Half::Anchor ? static_cast<uint32_t>((r + 1) & 1) : static_cast<uint32_t>(r & 1);
}

// Row kernels, written so that GCC auto-vectorises them; on x86-64 Linux an AVX2
// clone is selected at load time (function multiversioning), the default clone is
// SSE2.  Results are identical (integer / IEEE float32 ops only, no contraction).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(RANS_NO_MULTIVERSION) && !defined(__SANITIZE_ADDRESS__)
#define RANS_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define RANS_MULTIVERSION
#endif

/// symbols of one squeezed row; returns bit 1 if a value cannot be coded
RANS_MULTIVERSION
int row_quantize(const float* __restrict yr, const float* __restrict mr, size_t Wh,
                 int32_t* __restrict sym) {
  int bad_sym = 0;
  for (size_t j = 0; j < Wh; ++j) {
    const float rr = round_half_even(yr[2 * j] - mr[2 * j]);
    const bool ok = (rr >= -2147483648.0f) & (rr < 2147483648.0f);  // false for NaN
    bad_sym |= ok ? 0 : 2;
    const float safe = ok ? rr : 0.0f;
    sym[j] = static_cast<int32_t>(safe);
  }
  return bad_sym;
}

RANS_MULTIVERSION
int row_indexes(const float* __restrict sr, size_t Wh, IndexLut L, int32_t* __restrict idx) {
  int bad_scale = 0;
  for (size_t j = 0; j < Wh; ++j) {
    float sc = sr[2 * j];
    bad_scale |= (sc != sc) ? 1 : 0;
    idx[j] = lut_index(clamp_scale(sc), L);
  }
  return bad_scale;
}

RANS_MULTIVERSION
void row_dequantize(const int32_t* __restrict sym, const float* __restrict m0, size_t Wh,
                    uint32_t par, float* __restrict out) {
  if (par == 0) {
    for (size_t j = 0; j < Wh; ++j) {
      out[2 * j] = static_cast<float>(sym[j]) + m0[2 * j];
      out[2 * j + 1] = 0.0f;
    }
  } else {
    for (size_t j = 0; j < Wh; ++j) {
      out[2 * j] = 0.0f;
      out[2 * j + 1] = static_cast<float>(sym[j]) + m0[2 * j + 1];
    }
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define RANS_HAVE_AVX2_KERNEL 1
/// AVX2 version of row_indexes with hardware gathers (GCC does not emit them itself).
/// `avail`: floats readable from sr (the squeezed row reads sr[0], sr[2], ...).
__attribute__((target("avx2"))) int row_indexes_avx2(const float* sr, size_t Wh, size_t avail,
                                                     IndexLut L, int32_t* idx) {
  const __m256 lo = _mm256_set1_ps(0.11f);
  const __m256i base = _mm256_set1_epi32(L.base);
  const __m256i last = _mm256_set1_epi32(L.last);
  const __m256i zero = _mm256_setzero_si256();
  const __m128i sh = _mm_cvtsi32_si128(L.shift);
  __m256 nan_acc = _mm256_setzero_ps();
  size_t j = 0;
  for (; 2 * j + 16 <= avail && j + 8 <= Wh; j += 8) {
    const __m256 a = _mm256_loadu_ps(sr + 2 * j);
    const __m256 b = _mm256_loadu_ps(sr + 2 * j + 8);
    __m256 ev = _mm256_shuffle_ps(a, b, 0x88);  // a0 a2 b0 b2 | a4 a6 b4 b6
    ev = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8));
    nan_acc = _mm256_or_ps(nan_acc, _mm256_cmp_ps(ev, ev, _CMP_UNORD_Q));
    const __m256 sc = _mm256_max_ps(ev, lo);  // == (s < 0.11 ? 0.11 : s) for non-NaN s
    const __m256i u = _mm256_castps_si256(sc);
    __m256i bk = _mm256_sra_epi32(_mm256_sub_epi32(u, base), sh);
    bk = _mm256_min_epi32(_mm256_max_epi32(bk, zero), last);
    const __m256i cnt = _mm256_i32gather_epi32(L.cnt, bk, 4);
    const __m256i thr = _mm256_i32gather_epi32(L.thr, bk, 4);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + j),
                        _mm256_sub_epi32(cnt, _mm256_cmpgt_epi32(u, thr)));
  }
  int bad = _mm256_movemask_ps(nan_acc) ? 1 : 0;
  for (; j < Wh; ++j) {
    const float sc = sr[2 * j];
    bad |= (sc != sc) ? 1 : 0;
    idx[j] = lut_index(clamp_scale(sc), L);
  }
  return bad;
}
#endif

#if defined(RANS_HAVE_AVX2_KERNEL)
#define RANS_HAVE_AVX512_KERNEL 1
/// AVX-512 kernels (16 lanes, masked tails, exact 128-entry bucket lookups by permutes).
/// Used when the CPU has AVX-512F and the index bucket table has at most 128 entries.
struct Lut512 {
  __m512i c[8], t[8];
};

__attribute__((target("avx512f"))) inline __m512i lookup128(const __m512i* T, __m512i bk) {
  const __m512i a = _mm512_permutex2var_epi32(T[0], bk, T[1]);
  const __m512i b = _mm512_permutex2var_epi32(T[2], bk, T[3]);
  const __m512i c = _mm512_permutex2var_epi32(T[4], bk, T[5]);
  const __m512i d = _mm512_permutex2var_epi32(T[6], bk, T[7]);
  const __mmask16 b5 = _mm512_test_epi32_mask(bk, _mm512_set1_epi32(32));
  const __mmask16 b6 = _mm512_test_epi32_mask(bk, _mm512_set1_epi32(64));
  return _mm512_mask_blend_epi32(b6, _mm512_mask_blend_epi32(b5, a, b),
                                 _mm512_mask_blend_epi32(b5, c, d));
}

/// even lanes of the 2*rem-1 floats at p (masked: never reads past them)
__attribute__((target("avx512f"))) inline __m512 load_even(const float* p, size_t rem) {
  const size_t f = 2 * rem - 1;
  const uint32_t m = f >= 32 ? 0xFFFFFFFFu : ((1u << f) - 1);
  const __m512 lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m & 0xFFFF), p);
  const __m512 hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m >> 16), p + 16);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  return _mm512_permutex2var_ps(lo, even, hi);
}

__attribute__((target("avx512f"))) inline __m512i index16(__m512 s, const IndexLut& L,
                                                          const __m512i* C, const __m512i* T) {
  const __m512 sc = _mm512_max_ps(s, _mm512_set1_ps(0.11f));  // NaN flagged by the caller
  const __m512i u = _mm512_castps_si512(sc);
  __m512i bk = _mm512_sra_epi32(_mm512_sub_epi32(u, _mm512_set1_epi32(L.base)),
                                _mm_cvtsi32_si128(L.shift));
  bk = _mm512_min_epi32(_mm512_max_epi32(bk, _mm512_setzero_si512()), _mm512_set1_epi32(L.last));
  const __m512i cnt = lookup128(C, bk);
  const __m512i thr = lookup128(T, bk);
  const __mmask16 gt = _mm512_cmpgt_epi32_mask(u, thr);
  return _mm512_mask_add_epi32(cnt, gt, cnt, _mm512_set1_epi32(1));
}

__attribute__((target("avx512f"))) int row_indexes_avx512(const float* sr, size_t Wh, size_t,
                                                         IndexLut L, int32_t* idx) {
  __m512i C[8], T[8];
  for (int q = 0; q < 8; ++q) {
    C[q] = _mm512_loadu_si512(L.cnt + 16 * q);
    T[q] = _mm512_loadu_si512(L.thr + 16 * q);
  }
  __mmask16 nan = 0;
  for (size_t j = 0; j < Wh; j += 16) {
    const size_t rem = std::min<size_t>(16, Wh - j);
    const __mmask16 km = static_cast<__mmask16>(rem == 16 ? 0xFFFF : ((1u << rem) - 1));
    const __m512 s = load_even(sr + 2 * j, rem);
    nan |= _mm512_mask_cmp_ps_mask(km, s, s, _CMP_UNORD_Q);
    _mm512_mask_storeu_epi32(idx + j, km, index16(s, L, C, T));
  }
  return nan ? 1 : 0;
}

/// encoder row: symbols, indexes and y_hat (both parities) of one squeezed row
__attribute__((target("avx512f"))) int row_encode_avx512(const float* yr, const float* mr,
                                                        const float* sr, size_t Wh, IndexLut L,
                                                        int32_t* sym, int32_t* idx,
                                                        float* out_row, uint32_t par) {
  __m512i C[8], T[8];
  for (int q = 0; q < 8; ++q) {
    C[q] = _mm512_loadu_si512(L.cnt + 16 * q);
    T[q] = _mm512_loadu_si512(L.thr + 16 * q);
  }
  const __m512i ilo = par ? _mm512_set_epi32(7, 16, 6, 16, 5, 16, 4, 16, 3, 16, 2, 16, 1, 16, 0, 16)
                          : _mm512_set_epi32(16, 7, 16, 6, 16, 5, 16, 4, 16, 3, 16, 2, 16, 1, 16, 0);
  const __m512i ihi = par ? _mm512_set_epi32(15, 16, 14, 16, 13, 16, 12, 16, 11, 16, 10, 16, 9, 16, 8, 16)
                          : _mm512_set_epi32(16, 15, 16, 14, 16, 13, 16, 12, 16, 11, 16, 10, 16, 9, 16, 8);
  const __m512 zero = _mm512_setzero_ps();
  __mmask16 nan = 0, bad = 0;
  for (size_t j = 0; j < Wh; j += 16) {
    const size_t rem = std::min<size_t>(16, Wh - j);
    const __mmask16 km = static_cast<__mmask16>(rem == 16 ? 0xFFFF : ((1u << rem) - 1));
    const __m512 y = load_even(yr + 2 * j, rem);
    const __m512 m = load_even(mr + 2 * j, rem);
    const __m512 s = load_even(sr + 2 * j, rem);
    const __m512 r = _mm512_roundscale_ps(_mm512_sub_ps(y, m), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 ok = _mm512_cmp_ps_mask(r, _mm512_set1_ps(-2147483648.0f), _CMP_GE_OQ) &
                         _mm512_cmp_ps_mask(r, _mm512_set1_ps(2147483648.0f), _CMP_LT_OQ);
    bad |= static_cast<__mmask16>(km & ~ok);
    const __m512i si = _mm512_cvttps_epi32(_mm512_maskz_mov_ps(ok, r));
    _mm512_mask_storeu_epi32(sym + j, km, si);
    const __m512 yh = _mm512_add_ps(_mm512_cvtepi32_ps(si), m);
    const size_t f = 2 * rem;
    const uint32_t om = f >= 32 ? 0xFFFFFFFFu : ((1u << f) - 1);
    _mm512_mask_storeu_ps(out_row + 2 * j, static_cast<__mmask16>(om & 0xFFFF),
                          _mm512_permutex2var_ps(yh, ilo, zero));
    _mm512_mask_storeu_ps(out_row + 2 * j + 16, static_cast<__mmask16>(om >> 16),
                          _mm512_permutex2var_ps(yh, ihi, zero));
    nan |= _mm512_mask_cmp_ps_mask(km, s, s, _CMP_UNORD_Q);
    _mm512_mask_storeu_epi32(idx + j, km, index16(s, L, C, T));
  }
  return (nan ? 1 : 0) | (bad ? 2 : 0);
}
/// Packed bucket table (Tables::lut_pack_, <= 128 entries): one permute lookup per 16 scales.
struct Pack512 {
  __m512i p[8];
  __m512i base, last, lowm;
  __m128i sh;
};

__attribute__((target("avx512f"))) inline void load_pack512(const Tables& t, Pack512& P) {
  for (int q = 0; q < 8; ++q) P.p[q] = _mm512_loadu_si512(t.lut_pack_.data() + 16 * q);
  P.base = _mm512_set1_epi32(static_cast<int32_t>(t.lut_base_bits_));
  P.last = _mm512_set1_epi32(static_cast<int32_t>(t.lut_n_) - 1);
  P.lowm = _mm512_set1_epi32(static_cast<int32_t>((1u << t.lut_shift_) - 1));
  P.sh = _mm_cvtsi32_si128(static_cast<int>(t.lut_shift_));
}

__attribute__((target("avx512f"))) inline __m512i index16p(__m512 s, const Pack512& P) {
  const __m512 sc = _mm512_max_ps(s, _mm512_set1_ps(0.11f));  // NaN flagged by the caller
  const __m512i d = _mm512_sub_epi32(_mm512_castps_si512(sc), P.base);
  __m512i bk = _mm512_sra_epi32(d, P.sh);
  bk = _mm512_min_epi32(_mm512_max_epi32(bk, _mm512_setzero_si512()), P.last);
  const __m512i pk = lookup128(P.p, bk);
  // offset inside the bucket: < 0 below the table, capped at 2^shift-1 above it
  const __m512i off = _mm512_min_epi32(_mm512_sub_epi32(d, _mm512_sll_epi32(bk, P.sh)), P.lowm);
  const __mmask16 gt = _mm512_cmpgt_epi32_mask(off, _mm512_and_si512(pk, P.lowm));
  const __m512i cnt = _mm512_srl_epi32(pk, P.sh);
  return _mm512_mask_add_epi32(cnt, gt, cnt, _mm512_set1_epi32(1));
}

/// Per-element position in Tables::cdf_ of the coded symbol (row start + symbol - offset),
/// or -1 when the value needs an escape; computed in the float pass so that the coders
/// skip the row lookups.  Needs <= 64 rows (tables in registers).
struct Gid512 {
  __m512i rs[4], lo[4], hi[4];  // row start, offset, offset + escape symbol - 1
};

__attribute__((target("avx512f"))) inline void load_gid512(const Tables& t, Gid512& G) {
  const size_t rows = t.rows();
  for (size_t q = 0; q < 4; ++q) {
    const size_t left = rows > 16 * q ? rows - 16 * q : 0;
    const __mmask16 m = static_cast<__mmask16>(left >= 16 ? 0xFFFF : ((1u << left) - 1));
    G.rs[q] = _mm512_maskz_loadu_epi32(m, t.row_start_.data() + 16 * q);
    G.lo[q] = _mm512_maskz_loadu_epi32(m, t.offset_.data() + 16 * q);
    // offset + (length - 2) - 1 fits int32 (checked when the tables were built)
    G.hi[q] = _mm512_add_epi32(G.lo[q], _mm512_sub_epi32(_mm512_maskz_loadu_epi32(m, t.length_.data() + 16 * q),
                                                         _mm512_set1_epi32(3)));
  }
}

/// 64-entry table lookup (4 registers); up: lanes whose index has bit 5 set
__attribute__((target("avx512f"))) inline __m512i lut64m(const __m512i* T, __m512i ix, __mmask16 up) {
  return _mm512_mask_blend_epi32(up, _mm512_permutex2var_epi32(T[0], ix, T[1]),
                                 _mm512_permutex2var_epi32(T[2], ix, T[3]));
}

__attribute__((target("avx512f"))) inline __m512i gid16(const Gid512& G, __m512i ix, __m512i sym) {
  const __mmask16 up = _mm512_test_epi32_mask(ix, _mm512_set1_epi32(32));  // rows 32..63
  const __m512i lo = lut64m(G.lo, ix, up), hi = lut64m(G.hi, ix, up);
  const __mmask16 in = _mm512_cmpge_epi32_mask(sym, lo) & _mm512_cmple_epi32_mask(sym, hi);
  const __m512i g = _mm512_add_epi32(lut64m(G.rs, ix, up), _mm512_sub_epi32(sym, lo));
  return _mm512_mask_mov_epi32(_mm512_set1_epi32(-1), in, g);
}

/// Row-pair layout for W/2 = 16K + 8 (e.g. W = 48) and even H: the squeezed elements of rows
/// r and r+1 (parities p and 1-p) are cut into full 16-lane vectors, each read from 32
/// consecutive floats of the full map: K vectors inside row r, one across the row boundary
/// (8 + 8 elements), K inside row r+1.  No masked tails (a plain row loop needs two vectors
/// per row, the second half empty).
struct PairPat {
  __m512i sel[2][3], lo[2][3], hi[2][3];  // [parity of row r][vector kind]
};

__attribute__((target("avx512f"))) inline void make_pair_pat(PairPat& P) {
  for (int p = 0; p < 2; ++p) {
    for (int kind = 0; kind < 3; ++kind) {
      alignas(64) int32_t sel[16], lo[16], hi[16];
      const int pa = kind == 2 ? 1 - p : p;  // parity of the first 16 floats
      const int pb = kind == 0 ? p : 1 - p;  // parity of the last 16 floats
      for (int j = 0; j < 16; ++j) {
        sel[j] = 2 * j + (j < 8 ? pa : pb);
        lo[j] = (j % 2 == pa) ? j / 2 : 16;      // 16: the zero vector
        hi[j] = (j % 2 == pb) ? 8 + j / 2 : 16;
      }
      P.sel[p][kind] = _mm512_load_si512(sel);
      P.lo[p][kind] = _mm512_load_si512(lo);
      P.hi[p][kind] = _mm512_load_si512(hi);
    }
  }
}

inline bool use_pairs(size_t H, size_t W) { return H % 2 == 0 && (W / 2) % 16 == 8; }

/// Offset (floats from the pair start) and kind of vector v of a row pair.
inline size_t pair_vec(size_t v, size_t K, size_t W, int& kind) {
  if (v < K) {
    kind = 0;
    return 32 * v;
  }
  if (v == K) {
    kind = 1;
    return 32 * K;
  }
  kind = 2;
  return W + 16 + 32 * (v - K - 1);
}

/// Whole-half encoder kernel (symbols, indexes, y_hat) with the packed index table.
__attribute__((target("avx512f"))) int half_encode_avx512(const Tables& t, const float* y,
                                                         const float* means, const float* scales,
                                                         size_t C, size_t H, size_t W, Half half,
                                                         int32_t* sym, int32_t* idx, float* y_hat,
                                                         int32_t* gid) {
  Pack512 P;
  load_pack512(t, P);
  Gid512 G;
  if (gid) load_gid512(t, G);
  const __m512i zi = _mm512_set1_epi32(16);
  const __m512i i0 = _mm512_set_epi32(16, 7, 16, 6, 16, 5, 16, 4, 16, 3, 16, 2, 16, 1, 16, 0);
  const __m512i i1 = _mm512_set_epi32(16, 15, 16, 14, 16, 13, 16, 12, 16, 11, 16, 10, 16, 9, 16, 8);
  const __m512 zero = _mm512_setzero_ps();
  const size_t Wh = W / 2;
  __mmask16 nan = 0, bad = 0;
  size_t k = 0;
  if (use_pairs(H, W)) {
    PairPat PP;
    make_pair_pat(PP);
    const size_t K = (Wh - 8) / 16, nv = Wh / 8;
    for (size_t c = 0; c < C; ++c) {
      for (size_t r = 0; r < H; r += 2) {
        const uint32_t par = half_parity(half, r);
        const size_t base = (c * H + r) * W;
        for (size_t v = 0; v < nv; ++v, k += 16) {
          int kind;
          const size_t o = base + pair_vec(v, K, W, kind);
          const __m512i sel = PP.sel[par][kind];
          const __m512 yv = _mm512_permutex2var_ps(_mm512_loadu_ps(y + o), sel, _mm512_loadu_ps(y + o + 16));
          const __m512 m = _mm512_permutex2var_ps(_mm512_loadu_ps(means + o), sel, _mm512_loadu_ps(means + o + 16));
          const __m512 sc = _mm512_permutex2var_ps(_mm512_loadu_ps(scales + o), sel, _mm512_loadu_ps(scales + o + 16));
          const __m512 rr = _mm512_roundscale_ps(_mm512_sub_ps(yv, m),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          const __mmask16 ok = _mm512_cmp_ps_mask(rr, _mm512_set1_ps(-2147483648.0f), _CMP_GE_OQ) &
                               _mm512_cmp_ps_mask(rr, _mm512_set1_ps(2147483648.0f), _CMP_LT_OQ);
          bad |= static_cast<__mmask16>(~ok);
          const __m512i si = _mm512_cvttps_epi32(_mm512_maskz_mov_ps(ok, rr));
          _mm512_storeu_si512(sym + k, si);
          const __m512 yh = _mm512_add_ps(_mm512_cvtepi32_ps(si), m);
          _mm512_storeu_ps(y_hat + o, _mm512_permutex2var_ps(yh, PP.lo[par][kind], zero));
          _mm512_storeu_ps(y_hat + o + 16, _mm512_permutex2var_ps(yh, PP.hi[par][kind], zero));
          nan |= _mm512_cmp_ps_mask(sc, sc, _CMP_UNORD_Q);
          const __m512i ix = index16p(sc, P);
          _mm512_storeu_si512(idx + k, ix);
          if (gid) _mm512_storeu_si512(gid + k, gid16(G, ix, si));
        }
      }
    }
    return (nan ? 1 : 0) | (bad ? 2 : 0);
  }
  for (size_t c = 0; c < C; ++c) {
    for (size_t r = 0; r < H; ++r, k += Wh) {
      const uint32_t par = half_parity(half, r);
      const size_t base = (c * H + r) * W;
      const float* yr = y + base + par;
      const float* mr = means + base + par;
      const float* sr = scales + base + par;
      float* out_row = y_hat + base;
      // odd parity: the value goes to the odd slot of each pair (rotate the index pattern)
      const __m512i ilo = par ? _mm512_alignr_epi32(i0, zi, 15) : i0;
      const __m512i ihi = par ? _mm512_alignr_epi32(i1, zi, 15) : i1;
      for (size_t j = 0; j < Wh; j += 16) {
        const size_t rem = std::min<size_t>(16, Wh - j);
        const __mmask16 km = static_cast<__mmask16>(rem == 16 ? 0xFFFF : ((1u << rem) - 1));
        const __m512 yv = load_even(yr + 2 * j, rem);
        const __m512 m = load_even(mr + 2 * j, rem);
        const __m512 s = load_even(sr + 2 * j, rem);
        const __m512 rr = _mm512_roundscale_ps(_mm512_sub_ps(yv, m),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __mmask16 ok = _mm512_cmp_ps_mask(rr, _mm512_set1_ps(-2147483648.0f), _CMP_GE_OQ) &
                             _mm512_cmp_ps_mask(rr, _mm512_set1_ps(2147483648.0f), _CMP_LT_OQ);
        bad |= static_cast<__mmask16>(km & ~ok);
        const __m512i si = _mm512_cvttps_epi32(_mm512_maskz_mov_ps(ok, rr));
        _mm512_mask_storeu_epi32(sym + k + j, km, si);
        const __m512 yh = _mm512_add_ps(_mm512_cvtepi32_ps(si), m);
        const size_t f = 2 * rem;
        const uint32_t om = f >= 32 ? 0xFFFFFFFFu : ((1u << f) - 1);
        _mm512_mask_storeu_ps(out_row + 2 * j, static_cast<__mmask16>(om & 0xFFFF),
                              _mm512_permutex2var_ps(yh, ilo, zero));
        _mm512_mask_storeu_ps(out_row + 2 * j + 16, static_cast<__mmask16>(om >> 16),
                              _mm512_permutex2var_ps(yh, ihi, zero));
            nan |= _mm512_mask_cmp_ps_mask(km, s, s, _CMP_UNORD_Q);
        const __m512i ix = index16p(s, P);
        _mm512_mask_storeu_epi32(idx + k + j, km, ix);
        if (gid) _mm512_mask_storeu_epi32(gid + k + j, km, gid16(G, ix, si));
      }
    }
  }
  return (nan ? 1 : 0) | (bad ? 2 : 0);
}

/// Whole-half indexes (decoder side) with the packed index table.
__attribute__((target("avx512f"))) int half_indexes_avx512(const Tables& t, const float* scales,
                                                          size_t C, size_t H, size_t W, Half half,
                                                          int32_t* idx) {
  Pack512 P;
  load_pack512(t, P);
  const size_t Wh = W / 2;
  __mmask16 nan = 0;
  size_t k = 0;
  if (use_pairs(H, W)) {
    PairPat PP;
    make_pair_pat(PP);
    const size_t K = (Wh - 8) / 16, nv = Wh / 8;
    for (size_t c = 0; c < C; ++c) {
      for (size_t r = 0; r < H; r += 2) {
        const uint32_t par = half_parity(half, r);
        const size_t base = (c * H + r) * W;
        for (size_t v = 0; v < nv; ++v, k += 16) {
          int kind;
          const size_t o = base + pair_vec(v, K, W, kind);
          const __m512 sc = _mm512_permutex2var_ps(_mm512_loadu_ps(scales + o), PP.sel[par][kind],
                                                   _mm512_loadu_ps(scales + o + 16));
          nan |= _mm512_cmp_ps_mask(sc, sc, _CMP_UNORD_Q);
          _mm512_storeu_si512(idx + k, index16p(sc, P));
        }
      }
    }
    return nan ? 1 : 0;
  }
  for (size_t c = 0; c < C; ++c) {
    for (size_t r = 0; r < H; ++r, k += Wh) {
      const float* sr = scales + (c * H + r) * W + half_parity(half, r);
      for (size_t j = 0; j < Wh; j += 16) {
        const size_t rem = std::min<size_t>(16, Wh - j);
        const __mmask16 km = static_cast<__mmask16>(rem == 16 ? 0xFFFF : ((1u << rem) - 1));
        const __m512 s = load_even(sr + 2 * j, rem);
        nan |= _mm512_mask_cmp_ps_mask(km, s, s, _CMP_UNORD_Q);
        _mm512_mask_storeu_epi32(idx + k + j, km, index16p(s, P));
      }
    }
  }
  return nan ? 1 : 0;
}

/// Whole-half y_hat = float(symbol) + mean at the half's positions, 0 elsewhere.
__attribute__((target("avx512f"))) void half_dequantize_avx512(const int32_t* sym,
                                                              const float* means, size_t C,
                                                              size_t H, size_t W, Half half,
                                                              float* y_hat) {
  const __m512i zi = _mm512_set1_epi32(16);
  const __m512i i0 = _mm512_set_epi32(16, 7, 16, 6, 16, 5, 16, 4, 16, 3, 16, 2, 16, 1, 16, 0);
  const __m512i i1 = _mm512_set_epi32(16, 15, 16, 14, 16, 13, 16, 12, 16, 11, 16, 10, 16, 9, 16, 8);
  const __m512 zero = _mm512_setzero_ps();
  const size_t Wh = W / 2;
  size_t k = 0;
  if (use_pairs(H, W)) {
    PairPat PP;
    make_pair_pat(PP);
    const size_t K = (Wh - 8) / 16, nv = Wh / 8;
    for (size_t c = 0; c < C; ++c) {
      for (size_t r = 0; r < H; r += 2) {
        const uint32_t par = half_parity(half, r);
        const size_t base = (c * H + r) * W;
        for (size_t v = 0; v < nv; ++v, k += 16) {
          int kind;
          const size_t o = base + pair_vec(v, K, W, kind);
          const __m512 m = _mm512_permutex2var_ps(_mm512_loadu_ps(means + o), PP.sel[par][kind],
                                                  _mm512_loadu_ps(means + o + 16));
          const __m512 yh = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(sym + k)), m);
          _mm512_storeu_ps(y_hat + o, _mm512_permutex2var_ps(yh, PP.lo[par][kind], zero));
          _mm512_storeu_ps(y_hat + o + 16, _mm512_permutex2var_ps(yh, PP.hi[par][kind], zero));
        }
      }
    }
    return;
  }
  for (size_t c = 0; c < C; ++c) {
    for (size_t r = 0; r < H; ++r, k += Wh) {
      const uint32_t par = half_parity(half, r);
      const size_t base = (c * H + r) * W;
      const float* mr = means + base + par;
      float* out_row = y_hat + base;
      const __m512i ilo = par ? _mm512_alignr_epi32(i0, zi, 15) : i0;
      const __m512i ihi = par ? _mm512_alignr_epi32(i1, zi, 15) : i1;
      for (size_t j = 0; j < Wh; j += 16) {
        const size_t rem = std::min<size_t>(16, Wh - j);
        const __mmask16 km = static_cast<__mmask16>(rem == 16 ? 0xFFFF : ((1u << rem) - 1));
        const __m512 m = load_even(mr + 2 * j, rem);
        const __m512i si = _mm512_maskz_loadu_epi32(km, sym + k + j);
        const __m512 yh = _mm512_add_ps(_mm512_cvtepi32_ps(si), m);
        const size_t f = 2 * rem;
        const uint32_t om = f >= 32 ? 0xFFFFFFFFu : ((1u << f) - 1);
        _mm512_mask_storeu_ps(out_row + 2 * j, static_cast<__mmask16>(om & 0xFFFF),
                              _mm512_permutex2var_ps(yh, ilo, zero));
        _mm512_mask_storeu_ps(out_row + 2 * j + 16, static_cast<__mmask16>(om >> 16),
                              _mm512_permutex2var_ps(yh, ihi, zero));
      }
    }
  }
}
#endif

using RowIndexFn = int (*)(const float*, size_t, size_t, IndexLut, int32_t*);

int row_indexes_generic(const float* sr, size_t Wh, size_t, IndexLut L, int32_t* idx) {
  return row_indexes(sr, Wh, L, idx);
}

bool cpu_has(const char* what) {
#if defined(RANS_HAVE_AVX2_KERNEL)
  __builtin_cpu_init();
  if (std::strcmp(what, "avx512f") == 0) return __builtin_cpu_supports("avx512f");
  if (std::strcmp(what, "avx2") == 0) return __builtin_cpu_supports("avx2");
#endif
  (void)what;
  return false;
}

RowIndexFn pick_row_indexes() {
#ifdef RANS_HAVE_AVX2_KERNEL
  if (cpu_has("avx2")) return row_indexes_avx2;
#endif
  return row_indexes_generic;
}

const RowIndexFn g_row_indexes = pick_row_indexes();
const bool g_avx512 = cpu_has("avx512f") && std::getenv("RANS_NO_AVX512") == nullptr;

/// indexes of one squeezed row; avail = readable floats from sr
int row_indexes_any(const Tables& t, const float* sr, size_t Wh, size_t avail, int32_t* idx) {
#ifdef RANS_HAVE_AVX512_KERNEL
  if (g_avx512 && t.lut_n_ != 0 && t.lut_n_ <= 128)
    return row_indexes_avx512(sr, Wh, avail, make_lut(t), idx);
#endif
  if (t.lut_n_ != 0) return g_row_indexes(sr, Wh, avail, make_lut(t), idx);
  int bad = 0;
  for (size_t j = 0; j < Wh; ++j) {
    const float sc = sr[2 * j];
    bad |= (sc != sc) ? 1 : 0;
    idx[j] = t.scale_index(clamp_scale(sc));
  }
  return bad;
}

#ifdef RANS_HAVE_AVX512_KERNEL
bool use_pack512(const Tables& t) {
  return g_avx512 && !t.lut_pack_.empty() && t.lut_n_ != 0 && t.lut_n_ <= 128 &&
         t.lut_pack_.size() >= 128;
}
#endif

bool native_simd_on(const Tables& t) {
#ifdef RANS_HAVE_NATIVE_SIMD
  return native_simd_enabled() && native_simd_tables_ok(t);
#else
  (void)t;
  return false;
#endif
}

void check_gaussian(const Tables& t) {
  if (!t.has_scale_table()) throw Error("these tables have no scale table (not Gaussian tables)");
}

void throw_flags(int flags) {
  if (flags & 1) throw Error("NaN scale in the entropy parameters");
  if (flags & 2)
    throw Error("y - mean is NaN, infinite or outside the int32 range: symbol cannot be coded");
}


}  // namespace

void gaussian_symbols(const Tables& t, const float* y, const float* scales, const float* means,
                      size_t C, size_t H, size_t W, Half half, int32_t* symbols,
                      int32_t* indexes, float* y_hat) {
  check_gaussian(t);
  half_size(C, H, W);
  const size_t Wh = W / 2;
  int flags = 0;
  size_t k = 0;
  for (size_t c = 0; c < C; ++c) {
    for (size_t r = 0; r < H; ++r, k += Wh) {
      const uint32_t par = half_parity(half, r);
      const size_t base = (c * H + r) * W;
      flags |= row_quantize(y + base + par, means + base + par, Wh, symbols + k);
      flags |= row_indexes_any(t, scales + base + par, Wh, W - par, indexes + k);
      if (y_hat) row_dequantize(symbols + k, means + base, Wh, par, y_hat + base);
    }
  }
  throw_flags(flags);
}

void gaussian_indexes(const Tables& t, const float* scales, size_t C, size_t H, size_t W,
                      Half half, int32_t* indexes) {
  check_gaussian(t);
  half_size(C, H, W);
#ifdef RANS_HAVE_AVX512_KERNEL
  if (use_pack512(t)) {
    throw_flags(half_indexes_avx512(t, scales, C, H, W, half, indexes));
    return;
  }
#endif
  const size_t Wh = W / 2;
  int flags = 0;
  size_t k = 0;
  for (size_t c = 0; c < C; ++c)
    for (size_t r = 0; r < H; ++r, k += Wh)
      flags |= row_indexes_any(t, scales + (c * H + r) * W + half_parity(half, r), Wh,
                               W - half_parity(half, r), indexes + k);
  throw_flags(flags);
}

void gaussian_dequantize(const int32_t* symbols, const float* means, size_t C, size_t H,
                         size_t W, Half half, float* y_hat) {
  half_size(C, H, W);
#ifdef RANS_HAVE_AVX512_KERNEL
  if (g_avx512) {
    half_dequantize_avx512(symbols, means, C, H, W, half, y_hat);
    return;
  }
#endif
  const size_t Wh = W / 2;
  size_t k = 0;
  for (size_t c = 0; c < C; ++c) {
    for (size_t r = 0; r < H; ++r, k += Wh) {
      const size_t base = (c * H + r) * W;
      row_dequantize(symbols + k, means + base, Wh, half_parity(half, r), y_hat + base);
    }
  }
}

YEncoder::YEncoder(TablesPtr tables, Format fmt) : t_(std::move(tables)), fmt_(fmt) {
  if (!t_) throw Error("encoder: no tables");
  if (!t_->has_scale_table()) throw Error("YEncoder needs Gaussian tables with a scale table");
}

void YEncoder::encode_half(const float* y, const float* scales, const float* means, size_t C,
                           size_t H, size_t W, Half half, float* y_hat) {
  const size_t n = half_size(C, H, W);
  symbols_.reserve(n_ + n, n_);
  indexes_.reserve(n_ + n, n_);
  const size_t Wh = W / 2;
  int32_t* sym = symbols_.data() + n_;
  int32_t* idx = indexes_.data() + n_;
  int flags = 0;
  size_t k = 0;
#ifdef RANS_HAVE_AVX512_KERNEL
  if (use_pack512(*t_)) {
    int32_t* gid = nullptr;
    // only the vector native encoder gains from it (the compat chain is latency bound)
    if (fmt_ == Format::Native && t_->rows() <= 64 && gid_all_ && native_simd_on(*t_)) {
      gid_.reserve(n_ + n, n_);
      gid = gid_.data() + n_;
    }
    throw_flags(half_encode_avx512(*t_, y, means, scales, C, H, W, half, sym, idx, y_hat, gid));
    gid_all_ = gid != nullptr;
    n_ += n;
    return;
  }
  gid_all_ = false;
  const bool v512 = g_avx512 && t_->lut_n_ != 0 && t_->lut_n_ <= 128;
  const IndexLut L = make_lut(*t_);
#endif
  for (size_t c = 0; c < C; ++c) {
    for (size_t r = 0; r < H; ++r, k += Wh) {
      const uint32_t par = half_parity(half, r);
      const size_t base = (c * H + r) * W;
#ifdef RANS_HAVE_AVX512_KERNEL
      if (v512) {
        flags |= row_encode_avx512(y + base + par, means + base + par, scales + base + par, Wh, L,
                                   sym + k, idx + k, y_hat + base, par);
        continue;
      }
#endif
      flags |= row_quantize(y + base + par, means + base + par, Wh, sym + k);
      flags |= row_indexes_any(*t_, scales + base + par, Wh, W - par, idx + k);
      row_dequantize(sym + k, means + base, Wh, par, y_hat + base);
    }
  }
  throw_flags(flags);
  n_ += n;  // only after success: a failed half leaves nothing behind
}

std::vector<uint8_t> YEncoder::finish() {
  const TrustedIdx src{indexes_.data()};
  return encode_t(*t_, fmt_, symbols_.data(), n_, src, (gid_all_ && n_ > 0) ? gid_.data() : nullptr);
}

YDecoder::YDecoder(TablesPtr tables, Format fmt, const uint8_t* data, size_t size)
    : t_(tables), dec_(std::move(tables), fmt, data, size) {
  if (!t_->has_scale_table()) throw Error("YDecoder needs Gaussian tables with a scale table");
}

void YDecoder::decode_half(const float* scales, const float* means, size_t C, size_t H, size_t W,
                           Half half, float* y_hat) {
  const size_t n = half_size(C, H, W);
  idx_.reserve(n);
  sym_.reserve(n);
  // NaN scales are rejected before anything is decoded (the decoder stays usable)
  gaussian_indexes(*t_, scales, C, H, W, half, idx_.data());
  TrustedIdx src{idx_.data()};
  ArraySink sink{sym_.data()};
  dec_.run(n, src, sink);
  gaussian_dequantize(sym_.data(), means, C, H, W, half, y_hat);
}

// ====================================================== EntropyBottleneck
void bottleneck_symbols(const float* z, const float* medians, size_t C, size_t HW,
                        int32_t* symbols, float* z_hat) {
  bool bad = false;
  for (size_t c = 0; c < C; ++c) {
    const float med = medians[c];
    for (size_t k = c * HW; k < (c + 1) * HW; ++k) {
      const float rr = round_half_even(z[k] - med);
      const bool ok = fits_int32(rr);
      bad |= !ok;
      symbols[k] = ok ? static_cast<int32_t>(rr) : 0;
      if (z_hat) z_hat[k] = static_cast<float>(symbols[k]) + med;
    }
  }
  if (bad) throw Error("z - median is NaN, infinite or outside the int32 range: cannot be coded");
}

}  // namespace rans
