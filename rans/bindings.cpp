// nanobind bindings of the rANS core: module runtime._rans.
// Thin layer: contiguous numpy arrays in, numpy arrays / bytes out, GIL released
// around the work.  rans::Error surfaces as runtime._rans.RansError (a ValueError).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/tuple.h>

#include <memory>
#include <vector>

#include "rans.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

template <class T, int N>
using In = nb::ndarray<const T, nb::ndim<N>, nb::c_contig, nb::device::cpu>;
template <class T>
using Out = nb::ndarray<nb::numpy, T>;

template <class T>
Out<T> to_numpy(std::vector<T>* v, std::initializer_list<size_t> shape) {
  nb::capsule owner(v, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return Out<T>(v->data(), shape, owner);
}

template <class T>
Out<T> to_numpy(T* data, std::initializer_list<size_t> shape) {
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  return Out<T>(data, shape, owner);
}

rans::Format to_format(int f) {
  if (f == 0) return rans::Format::Compat;
  if (f == 1) return rans::Format::Native;
  throw rans::Error("unknown format id " + std::to_string(f));
}
rans::Half to_half(int h) {
  if (h == 0) return rans::Half::Anchor;
  if (h == 1) return rans::Half::NonAnchor;
  throw rans::Error("unknown half id " + std::to_string(h));
}

nb::bytes to_bytes(const std::vector<uint8_t>& v) {
  return nb::bytes(reinterpret_cast<const char*>(v.data()), v.size());
}

void check_same_shape3(const In<float, 3>& a, const In<float, 3>& b, const char* what) {
  for (int d = 0; d < 3; ++d)
    if (a.shape(d) != b.shape(d)) throw rans::Error(std::string(what) + " shape mismatch");
}

}  // namespace

NB_MODULE(_rans, m) {
  m.doc() = "C++ rANS entropy coder (compressai-compatible and native formats)";
  nb::exception<rans::Error>(m, "RansError", PyExc_ValueError);

  m.attr("NATIVE_VERSION") = static_cast<int>(rans::kNativeVersion);
  m.attr("NATIVE_LANES") = rans::kNativeLanes;

  nb::class_<rans::Tables>(m, "Tables")
      .def(
          "__init__",
          [](rans::Tables* self, In<int32_t, 2> cdf, In<int32_t, 1> lengths,
             In<int32_t, 1> offsets, std::optional<In<float, 1>> scale_table) {
            const size_t rows = cdf.shape(0), width = cdf.shape(1);
            if (lengths.shape(0) != rows || offsets.shape(0) != rows)
              throw rans::Error("tables: cdf_length and offset must have one entry per CDF row");
            const float* st = scale_table ? scale_table->data() : nullptr;
            const size_t ns = scale_table ? scale_table->shape(0) : 0;
            new (self) rans::Tables(cdf.data(), rows, width, lengths.data(), offsets.data(), st, ns);
          },
          "quantized_cdf"_a, "cdf_length"_a, "offset"_a, "scale_table"_a = nb::none())
      .def_prop_ro("rows", &rans::Tables::rows)
      .def_prop_ro("width", &rans::Tables::width)
      .def_prop_ro("has_scale_table", &rans::Tables::has_scale_table);

  m.def(
      "encode_with_indexes",
      [](const rans::Tables& t, int fmt, In<int32_t, 1> symbols, In<int32_t, 1> indexes) {
        if (symbols.shape(0) != indexes.shape(0))
          throw rans::Error("symbols and indexes must have the same length");
        const rans::Format f = to_format(fmt);
        std::vector<uint8_t> out;
        {
          nb::gil_scoped_release rel;
          out = rans::encode_with_indexes(t, f, symbols.data(), indexes.data(), symbols.shape(0));
        }
        return to_bytes(out);
      },
      "tables"_a, "fmt"_a, "symbols"_a, "indexes"_a);

  m.def(
      "decode_with_indexes",
      [](std::shared_ptr<rans::Tables> t, int fmt, nb::bytes stream, In<int32_t, 1> indexes) {
        const rans::Format f = to_format(fmt);
        const size_t n = indexes.shape(0);
        auto* out = new std::vector<int32_t>(n);
        try {
          nb::gil_scoped_release rel;
          rans::decode_with_indexes(t, f, reinterpret_cast<const uint8_t*>(stream.c_str()),
                                    stream.size(), indexes.data(), n, out->data());
        } catch (...) {
          delete out;
          throw;
        }
        return to_numpy(out, {n});
      },
      "tables"_a, "fmt"_a, "stream"_a, "indexes"_a);

  nb::class_<rans::Decoder>(m, "Decoder")
      .def(
          "__init__",
          [](rans::Decoder* self, std::shared_ptr<rans::Tables> t, int fmt, nb::bytes stream) {
            new (self) rans::Decoder(t, to_format(fmt),
                                     reinterpret_cast<const uint8_t*>(stream.c_str()),
                                     stream.size());
          },
          "tables"_a, "fmt"_a, "stream"_a)
      .def(
          "decode",
          [](rans::Decoder& d, In<int32_t, 1> indexes) {
            const size_t n = indexes.shape(0);
            auto* out = new std::vector<int32_t>(n);
            try {
              nb::gil_scoped_release rel;
              d.decode(indexes.data(), n, out->data());
            } catch (...) {
              delete out;
              throw;
            }
            return to_numpy(out, {n});
          },
          "indexes"_a)
      .def("finish", &rans::Decoder::finish);

  m.def(
      "gaussian_symbols",
      [](const rans::Tables& t, In<float, 3> y, In<float, 3> scales, In<float, 3> means,
         int half) {
        check_same_shape3(y, scales, "y/scales");
        check_same_shape3(y, means, "y/means");
        const size_t C = y.shape(0), H = y.shape(1), W = y.shape(2);
        const size_t n = rans::half_size(C, H, W);
        const rans::Half h = to_half(half);
        auto* sym = new std::vector<int32_t>(n);
        auto* idx = new std::vector<int32_t>(n);
        try {
          nb::gil_scoped_release rel;
          rans::gaussian_symbols(t, y.data(), scales.data(), means.data(), C, H, W, h,
                                 sym->data(), idx->data(), nullptr);
        } catch (...) {
          delete sym;
          delete idx;
          throw;
        }
        return std::make_tuple(to_numpy(sym, {n}), to_numpy(idx, {n}));
      },
      "tables"_a, "y"_a, "scales"_a, "means"_a, "half"_a);

  nb::class_<rans::YEncoder>(m, "YEncoder")
      .def(
          "__init__",
          [](rans::YEncoder* self, std::shared_ptr<rans::Tables> t, int fmt) {
            new (self) rans::YEncoder(t, to_format(fmt));
          },
          "tables"_a, "fmt"_a)
      .def(
          "encode_half",
          [](rans::YEncoder& e, In<float, 3> y, In<float, 3> scales, In<float, 3> means,
             int half) {
            check_same_shape3(y, scales, "y/scales");
            check_same_shape3(y, means, "y/means");
            const size_t C = y.shape(0), H = y.shape(1), W = y.shape(2);
            const rans::Half h = to_half(half);
            rans::half_size(C, H, W);
            float* yhat = new float[C * H * W];
            try {
              nb::gil_scoped_release rel;
              e.encode_half(y.data(), scales.data(), means.data(), C, H, W, h, yhat);
            } catch (...) {
              delete[] yhat;
              throw;
            }
            return to_numpy(yhat, {C, H, W});
          },
          "y"_a, "scales"_a, "means"_a, "half"_a)
      .def("finish",
           [](rans::YEncoder& e) {
             std::vector<uint8_t> out;
             {
               nb::gil_scoped_release rel;
               out = e.finish();
             }
             return to_bytes(out);
           })
      .def_prop_ro("size", [](const rans::YEncoder& e) { return e.size(); })
      .def("symbols",
           [](const rans::YEncoder& e) {
             auto* v = new std::vector<int32_t>(e.symbols(), e.symbols() + e.size());
             return to_numpy(v, {v->size()});
           })
      .def("indexes", [](const rans::YEncoder& e) {
        auto* v = new std::vector<int32_t>(e.indexes(), e.indexes() + e.size());
        return to_numpy(v, {v->size()});
      });

  nb::class_<rans::YDecoder>(m, "YDecoder")
      .def(
          "__init__",
          [](rans::YDecoder* self, std::shared_ptr<rans::Tables> t, int fmt, nb::bytes stream) {
            new (self) rans::YDecoder(t, to_format(fmt),
                                      reinterpret_cast<const uint8_t*>(stream.c_str()),
                                      stream.size());
          },
          "tables"_a, "fmt"_a, "stream"_a)
      .def(
          "decode_half",
          [](rans::YDecoder& d, In<float, 3> scales, In<float, 3> means, int half) {
            check_same_shape3(scales, means, "scales/means");
            const size_t C = scales.shape(0), H = scales.shape(1), W = scales.shape(2);
            const rans::Half h = to_half(half);
            rans::half_size(C, H, W);
            float* yhat = new float[C * H * W];
            try {
              nb::gil_scoped_release rel;
              d.decode_half(scales.data(), means.data(), C, H, W, h, yhat);
            } catch (...) {
              delete[] yhat;
              throw;
            }
            return to_numpy(yhat, {C, H, W});
          },
          "scales"_a, "means"_a, "half"_a)
      .def("finish", &rans::YDecoder::finish);

  m.def(
      "bottleneck_symbols",
      [](In<float, 3> z, In<float, 1> medians) {
        const size_t C = z.shape(0), H = z.shape(1), W = z.shape(2);
        if (medians.shape(0) != C)
          throw rans::Error("z has " + std::to_string(C) + " channels but there are " +
                            std::to_string(medians.shape(0)) + " medians");
        auto* sym = new std::vector<int32_t>(C * H * W);
        auto* zhat = new std::vector<float>(C * H * W);
        try {
          nb::gil_scoped_release rel;
          rans::bottleneck_symbols(z.data(), medians.data(), C, H * W, sym->data(), zhat->data());
        } catch (...) {
          delete sym;
          delete zhat;
          throw;
        }
        return std::make_tuple(to_numpy(sym, {C * H * W}), to_numpy(zhat, {C, H, W}));
      },
      "z"_a, "medians"_a);
}
