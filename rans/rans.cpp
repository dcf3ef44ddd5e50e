// rANS entropy coder: compressai-compatible and native formats.  See rans.hpp.
#include "rans.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>

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

// ------------------------------------------------------------ encoder steps
struct WordOut {
  Buf<uint32_t> buf;  // emitted in encoder order; reversed at the end
  uint32_t* w = nullptr;
  size_t n = 0;
  void ensure(size_t extra) {
    if (buf.capacity() - n < extra || w == nullptr) {
      buf.reserve(n + extra + 64);
      w = buf.data();
    }
  }
};

inline void enc_put(uint64_t& x, const EncSym& e, WordOut& out) {
  // branchless renormalisation: x_max = ((L >> 16) << 32) * freq
  const bool emit = x >= e.x_max();
  out.w[out.n] = static_cast<uint32_t>(x);
  out.n += emit;
  x = emit ? (x >> 32) : x;
  const uint64_t q = mulhi64(x, e.rcp) >> e.shift;
  x += e.bias + q * e.cmpl;
}

inline void enc_put_bits(uint64_t& x, uint32_t v, WordOut& out) {
  if (x >= kBypassMax) {
    out.w[out.n++] = static_cast<uint32_t>(x);
    x >>= 32;
  }
  x = (x << 4) | v;
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
constexpr size_t kPoolMaxBuffers = 8;
constexpr size_t kPoolMaxBytes = size_t(64) << 20;
}  // namespace

template <class T>
Buf<T>::Buf() {
  Pool<T>& p = pool<T>();
  std::lock_guard<std::mutex> lock(p.m);
  if (!p.free.empty()) {
    v_ = std::move(p.free.back());
    p.free.pop_back();
  }
}

template <class T>
Buf<T>::~Buf() {
  if (v_.empty() || v_.size() * sizeof(T) > kPoolMaxBytes) return;
  Pool<T>& p = pool<T>();
  std::lock_guard<std::mutex> lock(p.m);
  if (p.free.size() < kPoolMaxBuffers) p.free.push_back(std::move(v_));
}

template <class T>
void Buf<T>::grow(size_t need) {
  v_.resize(std::max(need, v_.size() + v_.size() / 2));
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
    }
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
    lut_thr_.assign(1, 0xFFFFFFFFu);
    lut_count_.assign(1, 0);
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
  lut_thr_.assign(nb, 0xFFFFFFFFu);
  lut_count_.assign(nb, 0);
  size_t k = 0;
  for (uint64_t b = 0; b < nb; ++b) {
    const uint64_t lo = static_cast<uint64_t>(bits[0]) + (b << shift);
    const uint64_t hi = lo + (1ull << shift);
    while (k < nt && bits[k] < lo) ++k;
    lut_count_[b] = static_cast<int32_t>(k);
    if (k < nt && bits[k] < hi) lut_thr_[b] = bits[k];
    if (k + 1 < nt && bits[k + 1] < hi) return;  // cannot happen (gap >= 2^shift); be safe
  }
  lut_n_ = static_cast<uint32_t>(nb);
}

// ============================================================ compat encode
namespace {

std::vector<uint8_t> encode_compat(const Tables& t, const int32_t* sym, const int32_t* idx,
                                   size_t n) {
  WordOut out;
  out.ensure(n + 64);
  uint64_t x = kRansL;
  const size_t rows = t.rows();
  const EncSym* enc = t.enc_.data();
  for (size_t i = n; i-- > 0;) {
    const int32_t id = idx[i];
    if (static_cast<uint32_t>(id) >= rows) throw_index(i, id, rows);
    const int64_t v = static_cast<int64_t>(sym[i]) - t.offset_[id];
    const int64_t e = t.length_[id] - 2;
    const EncSym* row = enc + t.row_start_[id];
    out.ensure(2 * kMaxEscapeChunks + 4);
    if (v >= 0 && v < e) {
      const EncSym& es = row[v];
      if (es.zero) throw_zero_freq(i, sym[i], id);
      enc_put(x, es, out);
    } else {
      const EncSym& es = row[e];
      if (es.zero) throw_zero_freq(i, sym[i], id);
      const uint64_t raw = escape_raw(v, e);
      int m = 0;
      while (m < 16 && (raw >> (4 * m)) != 0) ++m;
      for (int j = m - 1; j >= 0; --j) enc_put_bits(x, static_cast<uint32_t>(raw >> (4 * j)) & 15u, out);
      enc_put_bits(x, static_cast<uint32_t>(m % 15), out);
      for (int k = 0; k < m / 15; ++k) enc_put_bits(x, 15u, out);
      enc_put(x, es, out);
    }
  }
  std::vector<uint8_t> bytes(8 + 4 * out.n);
  store_le64(bytes.data(), x);
  uint8_t* p = bytes.data() + 8;
  for (size_t k = out.n; k-- > 0; p += 4) store_le32(p, out.w[k]);
  return bytes;
}

// ============================================================ native encode
std::vector<uint8_t> encode_native(const Tables& t, const int32_t* sym, const int32_t* idx,
                                   size_t n) {
  constexpr int NL = kNativeLanes;
  Buf<uint32_t> words;
  words.reserve(n + 8);
  size_t nw = 0;
  std::vector<uint64_t> esc;  // escape raws in encoder (reverse) order
  uint64_t x[NL];
  for (int l = 0; l < NL; ++l) x[l] = kRansL;
  const size_t rows = t.rows();
  const EncSym* enc = t.enc_.data();
  const uint32_t* rs = t.row_start_.data();
  const int32_t* off = t.offset_.data();
  const int32_t* len = t.length_.data();
  uint32_t* wp = words.data();

  auto one = [&](uint64_t& xs, size_t i) __attribute__((always_inline)) {
    const int32_t id = idx[i];
    if (__builtin_expect(static_cast<uint32_t>(id) >= rows, 0)) throw_index(i, id, rows);
    const int64_t v = static_cast<int64_t>(sym[i]) - off[id];
    const int64_t e = len[id] - 2;
    const EncSym* row = enc + rs[id];
    const EncSym* es;
    if (__builtin_expect(static_cast<uint64_t>(v) < static_cast<uint64_t>(e), 1)) {
      es = row + v;
    } else {
      es = row + e;
      esc.push_back(escape_raw(v, e));
    }
    if (__builtin_expect(es->zero, 0)) throw_zero_freq(i, sym[i], id);
    const bool emit = xs >= es->x_max();
    wp[nw] = static_cast<uint32_t>(xs);
    nw += emit;
    uint64_t xx = emit ? (xs >> 32) : xs;
    const uint64_t q = mulhi64(xx, es->rcp) >> es->shift;
    xs = xx + es->bias + q * es->cmpl;
  };

  size_t i = n;
  while (i % NL) {
    --i;
    one(x[i % NL], i);
  }
  while (i) {
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
  for (size_t k = nw; k-- > 0; p += 4) store_le32(p, wp[k]);
  if (!bw.bytes.empty()) std::memcpy(p, bw.bytes.data(), bw.bytes.size());
  return bytes;
}

}  // namespace

std::vector<uint8_t> encode_with_indexes(const Tables& t, Format fmt, const int32_t* symbols,
                                         const int32_t* indexes, size_t n) {
  if (fmt == Format::Compat) return encode_compat(t, symbols, indexes, n);
  return encode_native(t, symbols, indexes, n);
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

void Decoder::decode(const int32_t* indexes, size_t n, int32_t* out) {
  if (failed_) throw Error("decoder is in a failed state: " + fail_msg_);
  try {
    if (fmt_ == Format::Compat)
      decode_compat(indexes, n, out);
    else
      decode_native(indexes, n, out);
  } catch (const Error& e) {
    failed_ = true;
    if (fail_msg_.empty()) fail_msg_ = e.what();
    throw;
  }
}

namespace {

inline int64_t finish_escape(uint64_t raw, int64_t e, int32_t offset, size_t i) {
  const int64_t value = static_cast<int64_t>(raw >> 1);
  const int64_t v = (raw & 1) ? -value - 1 : value + e;
  const int64_t out = v + offset;
  if (out < std::numeric_limits<int32_t>::min() || out > std::numeric_limits<int32_t>::max())
    throw Error("corrupt stream: escape value out of int32 range at element " + std::to_string(i));
  return out;
}

}  // namespace

void Decoder::decode_compat(const int32_t* indexes, size_t n, int32_t* out) {
  const Tables& t = *t_;
  const size_t rows = t.rows();
  uint64_t x = x_[0];
  size_t pos = pos_;
  const uint32_t* words = words_.data();
  const size_t nwords = nwords_;
  auto refill = [&](size_t i) {
    if (x < kRansL) {
      if (pos >= nwords)
        throw Error("truncated stream: ran out of data at element " + std::to_string(i));
      x = (x << 32) | words[pos++];
    }
  };
  auto get4 = [&](size_t i) -> uint32_t {
    const uint32_t v = static_cast<uint32_t>(x & 15u);
    x >>= 4;
    refill(i);
    return v;
  };
  try {
    for (size_t i = 0; i < n; ++i) {
      const int32_t id = indexes[i];
      if (static_cast<uint32_t>(id) >= rows) throw_index(i, id, rows);
      const uint32_t* cdf = t.cdf_.data() + t.row_start_[id];
      const uint32_t slot = static_cast<uint32_t>(x & (kProbScale - 1));
      uint32_t s = t.bucket_[(static_cast<size_t>(id) << kBucketBits) + (slot >> kBucketShift)];
      while (cdf[s + 1] <= slot) ++s;
      const uint32_t b = cdf[s];
      const uint32_t f = cdf[s + 1] - b;
      x = f * (x >> kPrecision) + slot - b;
      {  // branchless refill (words_ is zero padded); bounds checked right after
        const bool need = x < kRansL;
        const uint64_t w = words[pos];
        x = need ? ((x << 32) | w) : x;
        pos += need;
        if (__builtin_expect(pos > nwords, 0))
          throw Error("truncated stream: ran out of data at element " + std::to_string(i));
      }
      const uint32_t e = static_cast<uint32_t>(t.length_[id] - 2);
      if (s < e) {
        const int64_t o = static_cast<int64_t>(s) + t.offset_[id];
        if (o > std::numeric_limits<int32_t>::max())
          throw Error("decoded value out of int32 range at element " + std::to_string(i));
        out[i] = static_cast<int32_t>(o);
      } else {
        int m = 0;
        uint32_t c;
        do {
          c = get4(i);
          m += static_cast<int>(c);
          if (m > kMaxEscapeChunks)
            throw Error("corrupt stream: escape payload too long at element " + std::to_string(i));
        } while (c == 15);
        uint64_t raw = 0;
        for (int j = 0; j < m; ++j) raw |= static_cast<uint64_t>(get4(i)) << (4 * j);
        out[i] = static_cast<int32_t>(finish_escape(raw, e, t.offset_[id], i));
      }
    }
  } catch (...) {
    x_[0] = x;
    pos_ = pos;
    throw;
  }
  x_[0] = x;
  pos_ = pos;
}

void Decoder::decode_native(const int32_t* indexes, size_t n, int32_t* out) {
  constexpr int NL = kNativeLanes;
  const Tables& t = *t_;
  const size_t rows = t.rows();
  const uint32_t* cdf_all = t.cdf_.data();
  const uint32_t* rs = t.row_start_.data();
  const uint16_t* bucket = t.bucket_.data();
  const int32_t* off = t.offset_.data();
  const int32_t* len = t.length_.data();
  const uint32_t* words = words_.data();
  const size_t nwords = nwords_;
  size_t pos = pos_;
  uint64_t x[NL];
  for (int l = 0; l < NL; ++l) x[l] = x_[l];

  auto golomb = [&](size_t i) -> uint64_t {
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
      } else {
        const int tz = __builtin_ctzll(b);
        zeros += tz;
        bitbuf_ >>= (tz + 1);
        bitcnt_ -= tz + 1;
        break;
      }
      if (zeros > kMaxGolombZeros)
        throw Error("corrupt stream: escape code too long at element " + std::to_string(i));
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
  };

  auto one = [&](uint64_t& xs, size_t i) __attribute__((always_inline)) {
    const int32_t id = indexes[i];
    if (__builtin_expect(static_cast<uint32_t>(id) >= rows, 0)) throw_index(i, id, rows);
    const uint32_t* cdf = cdf_all + rs[id];
    const uint32_t slot = static_cast<uint32_t>(xs) & (kProbScale - 1);
    uint32_t s = bucket[(static_cast<size_t>(id) << kBucketBits) + (slot >> kBucketShift)];
    while (cdf[s + 1] <= slot) ++s;
    const uint32_t b = cdf[s];
    const uint32_t f = cdf[s + 1] - b;
    uint64_t xx = f * (xs >> kPrecision) + slot - b;
    const bool need = xx < kRansL;
    const uint64_t w = words[pos];
    xx = need ? ((xx << 32) | w) : xx;
    pos += need;
    xs = xx;
    const int64_t e = len[id] - 2;
    int64_t o;
    if (__builtin_expect(static_cast<int64_t>(s) < e, 1)) {
      o = static_cast<int64_t>(s) + off[id];
      if (__builtin_expect(o > std::numeric_limits<int32_t>::max(), 0))
        throw Error("decoded value out of int32 range at element " + std::to_string(i));
    } else {
      o = finish_escape(golomb(i), e, off[id], i);
    }
    out[i] = static_cast<int32_t>(o);
  };
  auto check = [&](size_t i) {
    if (pos > nwords)
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
}  // namespace

void gaussian_symbols(const Tables& t, const float* y, const float* scales, const float* means,
                      size_t C, size_t H, size_t W, Half half, int32_t* symbols,
                      int32_t* indexes, float* y_hat) {
  if (!t.has_scale_table()) throw Error("these tables have no scale table (not Gaussian tables)");
  half_size(C, H, W);
  const size_t Wh = W / 2;
  bool bad_scale = false, bad_sym = false;
  size_t k = 0;
  for (size_t c = 0; c < C; ++c) {
    for (size_t r = 0; r < H; ++r) {
      const uint32_t par = half_parity(half, r);
      const size_t base = (c * H + r) * W;
      const float* yr = y + base + par;
      const float* mr = means + base + par;
      const float* sr = scales + base + par;
      for (size_t j = 0; j < Wh; ++j, ++k) {
        const float mu = mr[2 * j];
        const float rr = round_half_even(yr[2 * j] - mu);
        const bool ok = fits_int32(rr);
        bad_sym |= !ok;
        symbols[k] = ok ? static_cast<int32_t>(rr) : 0;
        float s = sr[2 * j];
        bad_scale |= (s != s);
        s = s < 0.11f ? 0.11f : s;
        indexes[k] = t.scale_index(s);
      }
      if (y_hat) {
        float* out = y_hat + base;
        const int32_t* sk = symbols + (k - Wh);
        const float* m0 = means + base;
        for (size_t j = 0; j < Wh; ++j) {
          out[2 * j + par] = static_cast<float>(sk[j]) + m0[2 * j + par];
          out[2 * j + 1 - par] = 0.0f;
        }
      }
    }
  }
  if (bad_scale) throw Error("NaN scale in the entropy parameters");
  if (bad_sym)
    throw Error("y - mean is NaN, infinite or outside the int32 range: symbol cannot be coded");
}

void gaussian_indexes(const Tables& t, const float* scales, size_t C, size_t H, size_t W,
                      Half half, int32_t* indexes) {
  if (!t.has_scale_table()) throw Error("these tables have no scale table (not Gaussian tables)");
  half_size(C, H, W);
  const size_t Wh = W / 2;
  bool bad_scale = false;
  size_t k = 0;
  for (size_t c = 0; c < C; ++c) {
    for (size_t r = 0; r < H; ++r) {
      const float* sr = scales + (c * H + r) * W + half_parity(half, r);
      for (size_t j = 0; j < Wh; ++j, ++k) {
        float s = sr[2 * j];
        bad_scale |= (s != s);
        s = s < 0.11f ? 0.11f : s;
        indexes[k] = t.scale_index(s);
      }
    }
  }
  if (bad_scale) throw Error("NaN scale in the entropy parameters");
}

void gaussian_dequantize(const int32_t* symbols, const float* means, size_t C, size_t H,
                         size_t W, Half half, float* y_hat) {
  half_size(C, H, W);
  const size_t Wh = W / 2;
  size_t k = 0;
  for (size_t c = 0; c < C; ++c) {
    for (size_t r = 0; r < H; ++r) {
      const uint32_t par = half_parity(half, r);
      const size_t base = (c * H + r) * W;
      float* out = y_hat + base;
      const float* m0 = means + base;
      for (size_t j = 0; j < Wh; ++j, ++k) {
        out[2 * j + par] = static_cast<float>(symbols[k]) + m0[2 * j + par];
        out[2 * j + 1 - par] = 0.0f;
      }
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
  symbols_.reserve(n_ + n);
  indexes_.reserve(n_ + n);
  gaussian_symbols(*t_, y, scales, means, C, H, W, half, symbols_.data() + n_,
                   indexes_.data() + n_, y_hat);
  n_ += n;  // only after success: a failed half leaves nothing behind
}

std::vector<uint8_t> YEncoder::finish() {
  return encode_with_indexes(*t_, fmt_, symbols_.data(), indexes_.data(), n_);
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
  gaussian_indexes(*t_, scales, C, H, W, half, idx_.data());
  dec_.decode(idx_.data(), n, sym_.data());
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
