// Plain C++ tests of the rANS core (no Python), meant to run under ASan + UBSan:
//   rans/run_asan_tests.sh
// Round trips of random data in both formats (escapes up to the int32 extremes),
// truncated / corrupted / random streams (must throw rans::Error or decode, never
// crash), escape layout of the compat format, table validation, Y coder halves.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "rans.hpp"

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond)                                                              \
  do {                                                                           \
    ++g_checks;                                                                  \
    if (!(cond)) {                                                               \
      ++g_failures;                                                              \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                            \
  } while (0)

template <class F>
bool throws(F&& f) {
  try {
    f();
  } catch (const rans::Error&) {
    return true;
  }
  return false;
}

struct RandTables {
  std::vector<int32_t> cdf, len, off;
  size_t rows = 0, width = 0;
};

RandTables make_tables(std::mt19937_64& rng, size_t rows, int max_sym) {
  RandTables t;
  t.rows = rows;
  t.width = static_cast<size_t>(max_sym) + 3;
  t.cdf.assign(rows * t.width, 0);
  for (size_t r = 0; r < rows; ++r) {
    const int k = 1 + static_cast<int>(rng() % static_cast<uint64_t>(max_sym));  // symbols incl. escape
    std::vector<double> w(k);
    double sum = 0;
    for (auto& v : w) {
      const double u = std::uniform_real_distribution<double>(0, 1)(rng);
      v = u * u * u + 1e-3;
      sum += v;
    }
    std::vector<int64_t> f(k);
    int64_t tot = 0;
    for (int i = 0; i < k; ++i) {
      f[i] = std::max<int64_t>(1, static_cast<int64_t>(w[i] / sum * (65536 - k)));
      tot += f[i];
    }
    f[k - 1] += 65536 - tot;
    int32_t acc = 0;
    for (int i = 0; i < k; ++i) {
      acc += static_cast<int32_t>(f[i]);
      t.cdf[r * t.width + 1 + i] = acc;
    }
    t.len.push_back(k + 1);
    t.off.push_back(static_cast<int32_t>(rng() % 40) - 30);
  }
  return t;
}

rans::TablesPtr build(const RandTables& rt, const float* scale = nullptr) {
  return std::make_shared<rans::Tables>(rt.cdf.data(), rt.rows, rt.width, rt.len.data(),
                                        rt.off.data(), scale, scale ? rt.rows : 0);
}

void test_reciprocal_division() {
  std::mt19937_64 rng(1);
  for (uint32_t f = 1; f <= 65536; ++f) {
    // the encoder's reciprocal division must equal x / f for every state it can see
    for (int k = 0; k < 8; ++k) {
      const uint64_t x = (rng() >> 17) % ((static_cast<uint64_t>(f) << 47) - (1ull << 31)) + (1ull << 31);
      uint32_t shift = 0;
      while (f > (1u << shift)) ++shift;
      uint64_t q;
      if (f == 1) {
        q = x;
      } else {
        const unsigned __int128 num = (static_cast<unsigned __int128>(1) << (shift + 63)) + f - 1;
        const uint64_t rcp = static_cast<uint64_t>(num / f);
        q = static_cast<uint64_t>((static_cast<unsigned __int128>(x) * rcp) >> 64) >> (shift - 1);
      }
      if (q != x / f) {
        CHECK(q == x / f);
        return;
      }
    }
  }
  CHECK(true);
}

std::vector<int32_t> random_symbols(std::mt19937_64& rng, const RandTables& rt,
                                    const std::vector<int32_t>& idx) {
  std::vector<int32_t> s(idx.size());
  const int32_t extremes[] = {INT32_MIN, INT32_MAX, (1 << 27), -(1 << 27) - 7, (1 << 28) + 3, 0};
  for (size_t i = 0; i < idx.size(); ++i) {
    const uint64_t kind = rng() % 100;
    if (kind < 8)
      s[i] = static_cast<int32_t>(static_cast<uint32_t>(rng()));
    else if (kind < 12)
      s[i] = extremes[rng() % 6];
    else
      s[i] = static_cast<int32_t>(rng() % 50) - 4 + rt.off[idx[i]];
  }
  return s;
}

void test_round_trips() {
  std::mt19937_64 rng(2);
  for (int iter = 0; iter < 300; ++iter) {
    const size_t rows = 1 + rng() % 8;
    const RandTables rt = make_tables(rng, rows, 1 + static_cast<int>(rng() % 60));
    const auto t = build(rt);
    const size_t n = (iter % 10 == 0) ? 0 : rng() % 3000;
    std::vector<int32_t> idx(n);
    for (auto& v : idx) v = static_cast<int32_t>(rng() % rows);
    const auto sym = random_symbols(rng, rt, idx);
    for (rans::Format fmt : {rans::Format::Compat, rans::Format::Native}) {
      const auto s = rans::encode_with_indexes(*t, fmt, sym.data(), idx.data(), n);
      std::vector<int32_t> out(n, 12345);
      bool ok = !throws([&] { rans::decode_with_indexes(t, fmt, s.data(), s.size(), idx.data(), n, out.data()); });
      CHECK(ok);
      CHECK(out == sym);
      // piecewise decoding
      rans::Decoder d(t, fmt, s.data(), s.size());
      size_t pos = 0;
      std::vector<int32_t> out2(n);
      while (pos < n) {
        const size_t k = std::min(n - pos, static_cast<size_t>(rng() % 40));
        d.decode(idx.data() + pos, k, out2.data() + pos);
        pos += k;
      }
      CHECK(!throws([&] { d.finish(); }));
      CHECK(out2 == sym);
      if (fmt == rans::Format::Compat) CHECK(s.size() % 4 == 0 && s.size() >= 8);
    }
  }
}

void test_corruption() {
  std::mt19937_64 rng(3);
  int raised = 0, total = 0;
  for (int iter = 0; iter < 200; ++iter) {
    const RandTables rt = make_tables(rng, 4, 40);
    const auto t = build(rt);
    const size_t n = 1 + rng() % 800;
    std::vector<int32_t> idx(n);
    for (auto& v : idx) v = static_cast<int32_t>(rng() % 4);
    const auto sym = random_symbols(rng, rt, idx);
    for (rans::Format fmt : {rans::Format::Compat, rans::Format::Native}) {
      const auto s = rans::encode_with_indexes(*t, fmt, sym.data(), idx.data(), n);
      std::vector<int32_t> out(n);
      for (int k = 0; k < 6; ++k) {
        std::vector<uint8_t> bad = s;
        switch (k) {
          case 0: bad.resize(rng() % s.size()); break;                       // truncated
          case 1: bad[rng() % bad.size()] ^= static_cast<uint8_t>(1u << (rng() % 8)); break;
          case 2: for (auto& b : bad) b = static_cast<uint8_t>(rng()); break;  // garbage
          case 3: bad.insert(bad.end(), 4, 0); break;                           // trailing data
          case 4: bad.clear(); break;                                           // empty
          default: for (int j = 0; j < 5; ++j) bad[rng() % bad.size()] = static_cast<uint8_t>(rng());
        }
        ++total;
        try {
          rans::decode_with_indexes(t, fmt, bad.data(), bad.size(), idx.data(), n, out.data());
        } catch (const rans::Error&) {
          ++raised;
        }
        // wrong counts
        if (n > 1)
          CHECK(throws([&] { rans::decode_with_indexes(t, fmt, s.data(), s.size(), idx.data(), n - 1, out.data()); }));
      }
      // bad index
      std::vector<int32_t> bidx = idx;
      bidx[rng() % n] = (rng() & 1) ? -1 : 4;
      CHECK(throws([&] { rans::decode_with_indexes(t, fmt, s.data(), s.size(), bidx.data(), n, out.data()); }));
      CHECK(throws([&] { rans::encode_with_indexes(*t, fmt, sym.data(), bidx.data(), n); }));
    }
  }
  CHECK(raised > total * 8 / 10);
  std::printf("corruption: %d/%d corrupted streams rejected\n", raised, total);
}

void test_escape_layout() {
  // Compat format: one row [0, 32768, 65536] (symbol 0 in range, symbol 1 = escape).
  RandTables rt;
  rt.rows = 1;
  rt.width = 3;
  rt.cdf = {0, 32768, 65536};
  rt.len = {3};
  rt.off = {0};
  const auto t = build(rt);
  // raw for v = 1 (>= e=1): 2*(1-1) = 0 -> m = 0: only the prefix chunk 0
  // raw for v = -1: 1 -> m = 1; 2^27-ish values have m = 7; INT32_MIN: raw 2^32-1 -> m = 8,
  // INT32_MAX: raw 2^32-4 -> m = 8 (compressai itself would hang here)
  const int32_t vals[] = {0, 1, -1, 7, (1 << 27) - 1, -(1 << 27), INT32_MAX, INT32_MIN};
  for (int32_t v : vals) {
    for (rans::Format fmt : {rans::Format::Compat, rans::Format::Native}) {
      const int32_t idx = 0;
      const auto s = rans::encode_with_indexes(*t, fmt, &v, &idx, 1);
      int32_t out = 0;
      CHECK(!throws([&] { rans::decode_with_indexes(t, fmt, s.data(), s.size(), &idx, 1, &out); }));
      CHECK(out == v);
    }
  }
  // compat: v = 1 codes symbol 1 then a 0 chunk: 1 + 4 bits => state only, 8 bytes
  {
    const int32_t v = 1, idx = 0;
    const auto s = rans::encode_with_indexes(*t, rans::Format::Compat, &v, &idx, 1);
    CHECK(s.size() == 8);
    // decoder view: x = 2^31 after symbol+chunk: x0 = ((2^31 << 4) | 0) -> *2 (freq 32768) + 32768
    const uint64_t expect = (((1ull << 31) << 4) | 0ull) / 32768 * 65536 + (((1ull << 31) << 4) % 32768) + 32768;
    uint64_t got = 0;
    for (int i = 7; i >= 0; --i) got = (got << 8) | s[i];
    CHECK(got == expect);
  }
  // corrupt stream claiming a 16-chunk escape must be rejected, not loop
  {
    std::vector<uint8_t> s(8 + 4 * 8, 0xff);
    // initial state with escape symbol selected and many 15 chunks
    uint64_t x = (0x7fffffffffffffffull & ~0xffffull) | 0xffff;
    for (int i = 0; i < 8; ++i) s[i] = static_cast<uint8_t>(x >> (8 * i));
    const int32_t idx[4] = {0, 0, 0, 0};
    int32_t out[4];
    CHECK(throws([&] { rans::decode_with_indexes(t, rans::Format::Compat, s.data(), s.size(), idx, 4, out); }));
  }
}

void test_zero_freq_and_tables() {
  // zero-frequency symbol cannot be coded
  RandTables rt;
  rt.rows = 1;
  rt.width = 4;
  rt.cdf = {0, 100, 100, 65536};
  rt.len = {4};
  rt.off = {0};
  const auto t = build(rt);
  const int32_t idx = 0, sym = 1;
  CHECK(throws([&] { rans::encode_with_indexes(*t, rans::Format::Compat, &sym, &idx, 1); }));
  CHECK(throws([&] { rans::encode_with_indexes(*t, rans::Format::Native, &sym, &idx, 1); }));
  // invalid tables
  auto bad = [&](std::vector<int32_t> cdf, std::vector<int32_t> len, size_t width) {
    std::vector<int32_t> off(len.size(), 0);
    return throws([&] { rans::Tables tt(cdf.data(), len.size(), width, len.data(), off.data(), nullptr, 0); });
  };
  CHECK(bad({0, 10, 5, 65536}, {4}, 4));        // not monotone
  CHECK(bad({0, 10, 20, 65535}, {4}, 4));       // does not end at 65536
  CHECK(bad({1, 10, 20, 65536}, {4}, 4));       // does not start at 0
  CHECK(bad({0, 10, 20, 65536}, {5}, 4));       // length > width
  CHECK(bad({0, 10, 20, 65536}, {1}, 4));       // length < 2
  CHECK(bad({0, 10, 70000, 65536}, {4}, 4));    // > 65536
  CHECK(!bad({0, 10, 20, 65536}, {4}, 4));
  std::vector<int32_t> cdf = {0, 10, 65536, 0, 10, 65536}, len = {3, 3}, off = {0, 0};
  const float asc[2] = {0.11f, 1.0f}, desc[2] = {1.0f, 0.5f}, nan_[2] = {0.11f, NAN};
  CHECK(!throws([&] { rans::Tables tt(cdf.data(), 2, 3, len.data(), off.data(), asc, 2); }));
  CHECK(throws([&] { rans::Tables tt(cdf.data(), 2, 3, len.data(), off.data(), desc, 2); }));
  CHECK(throws([&] { rans::Tables tt(cdf.data(), 2, 3, len.data(), off.data(), nan_, 2); }));
  CHECK(throws([&] { rans::Tables tt(cdf.data(), 2, 3, len.data(), off.data(), asc, 1); }));
}

void test_y_coder_shape(size_t C, size_t H, size_t W) {
  std::mt19937_64 rng(4 + W);
  const size_t rows = 16;
  RandTables rt = make_tables(rng, rows, 30);
  std::vector<float> scale(rows);
  for (size_t k = 0; k < rows; ++k) scale[k] = 0.11f * std::pow(1.5f, static_cast<float>(k));
  const auto t = build(rt, scale.data());
  const size_t N = C * H * W;
  std::normal_distribution<float> nd(0, 5);
  for (rans::Format fmt : {rans::Format::Compat, rans::Format::Native}) {
    rans::YEncoder enc(t, fmt);
    std::vector<std::vector<float>> sc, mu, yhat;
    for (int h = 0; h < 6; ++h) {
      std::vector<float> y(N), s(N), m(N), out(N, -1.f);
      for (size_t i = 0; i < N; ++i) {
        m[i] = nd(rng);
        s[i] = std::fabs(nd(rng)) * 10;
        y[i] = m[i] + nd(rng) * ((i % 17 == 0) ? 1e5f : 1.f);
      }
      const rans::Half half = (h % 2) ? rans::Half::NonAnchor : rans::Half::Anchor;
      enc.encode_half(y.data(), s.data(), m.data(), C, H, W, half, out.data());
      sc.push_back(s);
      mu.push_back(m);
      yhat.push_back(out);
    }
    const auto stream = enc.finish();
    rans::YDecoder dec(t, fmt, stream.data(), stream.size());
    for (int h = 0; h < 6; ++h) {
      std::vector<float> out(N, -2.f);
      const rans::Half half = (h % 2) ? rans::Half::NonAnchor : rans::Half::Anchor;
      dec.decode_half(sc[h].data(), mu[h].data(), C, H, W, half, out.data());
      CHECK(std::memcmp(out.data(), yhat[h].data(), N * sizeof(float)) == 0);
    }
    CHECK(!throws([&] { dec.finish(); }));
    // NaN scale and odd width
    std::vector<float> y(N, 0.f), s(N, 1.f), m(N, 0.f), out(N);
    s[1] = NAN;  // row 0, col 1: an anchor position
    CHECK(throws([&] { enc.encode_half(y.data(), s.data(), m.data(), C, H, W, rans::Half::Anchor, out.data()); }));
    s[1] = 1.f;
    y[1] = 1e10f;
    CHECK(throws([&] { enc.encode_half(y.data(), s.data(), m.data(), C, H, W, rans::Half::Anchor, out.data()); }));
    CHECK(throws([&] { enc.encode_half(y.data(), s.data(), m.data(), C, H, W - 1, rans::Half::Anchor, out.data()); }));
  }
}

// 5 rows x 8 columns: row-by-row kernels; W = 48 / 16 with even H: the row-pair kernels
void test_y_coder() {
  test_y_coder_shape(3, 5, 8);
  test_y_coder_shape(2, 4, 48);
  test_y_coder_shape(1, 2, 16);
}

}  // namespace

int main() {
  test_reciprocal_division();
  test_round_trips();
  test_corruption();
  test_escape_layout();
  test_zero_freq_and_tables();
  test_y_coder();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
