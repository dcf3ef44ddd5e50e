// rANS entropy coder for the DiffEIC runtime (no Python dependency).
//
// Two stream formats share the same tables:
//   * Format::Compat - byte-identical to compressai's RansEncoder /
//     BufferedRansEncoder / RansDecoder (one 64-bit state, 32-bit words,
//     16-bit CDFs, 4-bit bypass escapes).  See shared/specs/rans-compressai-format.md.
//   * Format::Native - this project's own versioned format: 16 interleaved
//     64-bit states, branchless renormalisation, escape payloads in a separate
//     raw bit section (Exp-Golomb).  See docs/rans-native-format.md.
//
// Every error (bad tables, bad indexes, corrupt / truncated streams, symbols
// that cannot be coded) throws rans::Error; nothing is undefined behaviour.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace rans {

/// The only exception type thrown by this library (mapped to ValueError in Python).
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

enum class Format { Compat = 0, Native = 1 };
enum class Half { Anchor = 0, NonAnchor = 1 };

constexpr int kPrecision = 16;
constexpr uint32_t kProbScale = 1u << kPrecision;  // 65536
constexpr uint64_t kRansL = 1ull << 31;            // lower bound of the state interval
constexpr int kNativeLanes = 16;                   // interleaved states in the native format
constexpr uint8_t kNativeMagic = 0xD7;
constexpr uint8_t kNativeVersion = 2;
constexpr int kBucketBits = 10;                    // decoder slot->symbol bucket table
constexpr int kBucketShift = kPrecision - kBucketBits;

/// Precomputed encoder data for one (row, symbol): exact reciprocal division
/// (ryg_rans Rans64EncSymbol scheme).  cmpl == 65536 marks a zero-frequency symbol.
struct EncSym {
  uint64_t rcp;
  uint32_t bias;
  uint16_t cmpl;   // 65536 - freq (freq 1..65536)
  uint8_t shift;
  uint8_t zero;    // 1: zero-frequency symbol, cannot be coded
  uint64_t x_max() const { return static_cast<uint64_t>(kProbScale - cmpl) << 47; }
};
static_assert(sizeof(EncSym) == 16, "EncSym must stay 16 bytes");

/// Per-row data the coders touch for every element (one load instead of four).
struct RowInfo {
  const uint32_t* cdf;     // cdf_length entries
  const uint16_t* bucket;  // 1 << kBucketBits entries: symbol at each bucket start
  const EncSym* enc;       // one per symbol
  int32_t offset;
  int32_t esc;             // escape symbol = cdf_length - 2
};

/// A validated set of quantized CDF rows (GaussianConditional or EntropyBottleneck),
/// optionally with the float32 scale table used to compute indexes.
class Tables {
 public:
  /// cdf: rows x width int32 (row-major), lengths/offsets: rows int32.
  /// scale_table (may be null): n_scale float32 values, must equal rows.
  Tables(const int32_t* cdf, size_t rows, size_t width, const int32_t* lengths,
         const int32_t* offsets, const float* scale_table, size_t n_scale);
  Tables(const Tables&) = delete;  // info_ points into the vectors
  Tables& operator=(const Tables&) = delete;

  size_t rows() const { return rows_; }
  size_t width() const { return width_; }
  bool has_scale_table() const { return !scale_table_.empty(); }
  const std::vector<float>& scale_table() const { return scale_table_; }

  // --- internals used by the coders (public for speed / tests) ---
  /// Index of the given clamped scale (s >= 0.11 or +inf, never NaN):
  /// #{k < rows-1 : table[k] < s}.  Positive floats compare like their bit patterns,
  /// so a small bucket table over the bit patterns (at most one threshold per bucket)
  /// gives the exact count with two loads; binary search is the fallback.
  inline int32_t scale_index(float s) const {
    if (lut_n_ != 0) {
      uint32_t u;
      std::memcpy(&u, &s, sizeof u);
      const int64_t d = static_cast<int64_t>(u) - static_cast<int64_t>(lut_base_bits_);
      int64_t b = d < 0 ? 0 : (d >> lut_shift_);
      b = b < static_cast<int64_t>(lut_n_) ? b : static_cast<int64_t>(lut_n_) - 1;
      return lut_count_[b] + static_cast<int32_t>(lut_thr_[b] < static_cast<int32_t>(u));
    }
    const float* t = thresholds_.data();
    uint32_t pos = 0;
    for (uint32_t step = thr_size_ >> 1; step > 0; step >>= 1) {
      pos += (t[pos + step - 1] < s) ? step : 0;
    }
    return static_cast<int32_t>(pos);
  }

  std::vector<uint32_t> cdf_;        // packed rows (row r starts at row_start_[r])
  std::vector<uint32_t> row_start_;  // rows
  std::vector<int32_t> length_;      // cdf length per row
  std::vector<int32_t> offset_;      // offset per row
  std::vector<EncSym> enc_;          // packed like cdf_ (one per symbol, last unused)
  std::vector<uint16_t> bucket_;     // rows x (1<<kBucketBits)
  // SIMD decoder: per bucket (symbol s at the bucket start) | min(cdf[s+1] - bucket start,
  // 0xFFFF) << 16, rows x (1<<kBucketBits)
  std::vector<uint32_t> bucket32_;
  std::vector<RowInfo> info_;
  std::vector<float> scale_table_;
  std::vector<float> thresholds_;    // padded to thr_size_ with +inf
  uint32_t thr_size_ = 1;
  // bit-pattern bucket table for scale_index (lut_n_ == 0: not usable, binary search)
  std::vector<int32_t> lut_thr_;   // threshold bits in the bucket or INT32_MAX
  std::vector<int32_t> lut_count_;
  uint32_t lut_base_bits_ = 0, lut_shift_ = 0, lut_n_ = 0;
  // the same table packed into one int32 per bucket (empty: not packable):
  // (count << shift) | (threshold bits - bucket start, or 2^shift - 1 if none)
  std::vector<int32_t> lut_pack_;

 private:
  void build_index_lut();
  size_t rows_ = 0, width_ = 0;
};

using TablesPtr = std::shared_ptr<const Tables>;

/// Growable scratch buffer whose storage is recycled through a small process-wide
/// pool: large fresh allocations cost one page fault per 4 KiB (milliseconds per
/// image), reused ones do not.  Contents beyond what a user wrote are unspecified.
template <class T>
class Buf {
 public:
  Buf();
  ~Buf();
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  /// Make room for `need` elements, keeping the first `used` ones.
  void reserve(size_t need, size_t used = 0) {
    if (v_.size() < need) grow(need, used);
  }
  T* data() { return v_.data(); }
  const T* data() const { return v_.data(); }
  size_t capacity() const { return v_.size(); }

 private:
  void grow(size_t need, size_t used);
  std::vector<T> v_;
};
extern template class Buf<int32_t>;
extern template class Buf<uint32_t>;

// ---------------------------------------------------------------- low level
/// Encode symbols with per-symbol table indexes into one stream.
std::vector<uint8_t> encode_with_indexes(const Tables& t, Format fmt, const int32_t* symbols,
                                         const int32_t* indexes, size_t n);

/// Incremental decoder over one stream (RansDecoder.set_stream + decode_stream).
class Decoder {
 public:
  Decoder(TablesPtr tables, Format fmt, const uint8_t* data, size_t size);
  /// Decode n values with the given table indexes, continuing the stream.
  void decode(const int32_t* indexes, size_t n, int32_t* out);
  /// Throws unless the stream was consumed exactly and the final state is valid.
  void finish();
  Format format() const { return fmt_; }

  /// Generic decode of n elements: src(i) -> row index (validated), sink(i, value).
  /// Defined in rans.cpp (instantiated there only).
  template <class Src, class Sink>
  void run(size_t n, Src& src, Sink& sink);

 private:
  friend class YDecoder;
  void fail(const std::string& msg);
  void load_words(const uint8_t* p);
  template <class Src, class Sink>
  void run_compat(size_t n, Src& src, Sink& sink);
  template <class Src, class Sink>
  void run_native(size_t n, Src& src, Sink& sink);
  int32_t compat_escape(const RowInfo& ri, size_t i);
  int32_t native_escape(const RowInfo& ri, size_t i);
  uint64_t read_golomb(size_t i);

  TablesPtr t_;
  Format fmt_;
  bool failed_ = false;
  std::string fail_msg_;
  Buf<uint32_t> words_;          // renormalisation words (+ zero padding)
  size_t nwords_ = 0;            // number of real words
  size_t pos_ = 0;
  uint64_t x_[kNativeLanes] = {};
  uint64_t count_ = 0;           // elements decoded so far (native lane selection)
  // native raw bit section
  std::vector<uint8_t> raw_;
  size_t raw_pos_ = 0;
  uint64_t bitbuf_ = 0;
  int bitcnt_ = 0;
};

/// One-shot decode of a whole stream (checks exact consumption).
void decode_with_indexes(const TablesPtr& t, Format fmt, const uint8_t* data, size_t size,
                         const int32_t* indexes, size_t n, int32_t* out);

// ------------------------------------------------------- Gaussian conditional
/// Number of elements in one checkerboard half of a (C,H,W) map.
size_t half_size(size_t C, size_t H, size_t W);

/// Symbols / indexes (stream order) of one checkerboard half; y_hat (full map,
/// zeros elsewhere) may be null.  Throws on NaN scale or unrepresentable symbol.
void gaussian_symbols(const Tables& t, const float* y, const float* scales, const float* means,
                      size_t C, size_t H, size_t W, Half half, int32_t* symbols,
                      int32_t* indexes, float* y_hat);

/// Indexes only (decoder side).
void gaussian_indexes(const Tables& t, const float* scales, size_t C, size_t H, size_t W,
                      Half half, int32_t* indexes);

/// y_hat = float(symbol) + mean at the half's positions, 0 elsewhere.
void gaussian_dequantize(const int32_t* symbols, const float* means, size_t C, size_t H,
                         size_t W, Half half, float* y_hat);

/// BufferedRansEncoder semantics: all halves go into one stream at finish().
class YEncoder {
 public:
  YEncoder(TablesPtr tables, Format fmt);
  void encode_half(const float* y, const float* scales, const float* means, size_t C, size_t H,
                   size_t W, Half half, float* y_hat);
  std::vector<uint8_t> finish();
  size_t size() const { return n_; }
  const int32_t* symbols() const { return symbols_.data(); }
  const int32_t* indexes() const { return indexes_.data(); }

 private:
  TablesPtr t_;
  Format fmt_;
  Buf<int32_t> symbols_, indexes_;
  Buf<int32_t> gid_;      // cdf_ position of each coded symbol or -1 (AVX-512 float pass)
  bool gid_all_ = true;   // every half so far filled gid_
  size_t n_ = 0;
};

class YDecoder {
 public:
  YDecoder(TablesPtr tables, Format fmt, const uint8_t* data, size_t size);
  void decode_half(const float* scales, const float* means, size_t C, size_t H, size_t W,
                   Half half, float* y_hat);
  void finish() { dec_.finish(); }

 private:
  TablesPtr t_;
  Decoder dec_;
  Buf<int32_t> idx_, sym_;
};

// --------------------------------------------------------- EntropyBottleneck
/// z symbols = round_half_even(z - median_c), z_hat = s + median_c; C,H,W order.
void bottleneck_symbols(const float* z, const float* medians, size_t C, size_t HW,
                        int32_t* symbols, float* z_hat);

}  // namespace rans
