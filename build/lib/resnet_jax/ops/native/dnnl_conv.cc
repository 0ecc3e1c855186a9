// 2-D convolutions (NHWC activations, HWIO kernels) for XLA:CPU through oneDNN, exposed as
// XLA FFI handlers: forward, input gradient and weight gradient. The two operands are both
// float32 or both bfloat16; the result is always float32 (oneDNN accumulates in float32), so
// bfloat16 operands give mixed-precision convolutions on CPUs with bfloat16 dot products.
//
// XLA hands the buffers in row-major order. oneDNN reads and writes the activations in
// place (its NHWC layout is the same memory) and gets the kernel in its own blocked layout
// through a reorder per call (microseconds). Primitives are created once per shape and kept;
// one mutex serialises the calls, each of which uses all of oneDNN's threads. XLA calls the
// handlers from several threads, so the primitives get their scratch memory from here (one
// buffer, grown to the largest need): oneDNN's own global scratchpad is per thread and
// belongs to the thread that created the primitive.
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

#include <oneapi/dnnl/dnnl.hpp>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum class Kind { kForward, kBackwardData, kBackwardWeights };

// Shapes and window of one convolution; x is (n, h, w, c), the kernel (kh, kw, c/g, o).
struct Geometry {
  int64_t n, h, w, c, oh, ow, o, kh, kw, g, sh, sw, pt, pb, pl, pr;
  memory::data_type in = memory::data_type::f32;  // the operands' type (f32 or bf16)

  std::string Key(Kind kind) const {
    std::ostringstream s;
    s << static_cast<int>(kind) << ',' << static_cast<int>(in);
    for (int64_t v : {n, h, w, c, oh, ow, o, kh, kw, g, sh, sw, pt, pb, pl, pr}) s << ',' << v;
    return s.str();
  }
  memory::desc Src(memory::data_type t) const {
    return memory::desc({n, c, h, w}, t, memory::format_tag::nhwc);
  }
  memory::desc Dst(memory::data_type t) const {
    return memory::desc({n, o, oh, ow}, t, memory::format_tag::nhwc);
  }
  // The HWIO kernel as oneDNN sees it: (o, i, kh, kw), or (g, o/g, i, kh, kw) with groups.
  memory::desc UserWeights(memory::data_type t) const {
    const int64_t i = c / g;
    if (g == 1) {
      return memory::desc({o, i, kh, kw}, t, memory::dims{1, o, kw * i * o, i * o});
    }
    return memory::desc({g, o / g, i, kh, kw}, t,
                        memory::dims{o / g, 1, o, kw * i * o, i * o});
  }
  memory::desc AnyWeights(memory::data_type t) const {
    const memory::dims d = g == 1 ? memory::dims{o, c, kh, kw}
                                  : memory::dims{g, o / g, c / g, kh, kw};
    return memory::desc(d, t, memory::format_tag::any);
  }
};

// A primitive, with the kernel's blocked buffer and the reorders to and from it.
struct Entry {
  dnnl::primitive prim;
  memory::desc scratch;  // the primitive's scratchpad
  memory::desc weights;  // the primitive's layout of the kernel (or of its gradient)
  bool reorder = false;
  std::unique_ptr<memory> blocked;
  dnnl::reorder to_blocked, from_blocked;
  memory::desc reorder_scratch;
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

std::mutex mu;

// Scratch memory for the primitive about to run (guarded by mu).
memory Scratch(const memory::desc& md) {
  static void* buffer = nullptr;
  static size_t capacity = 0;
  const size_t size = md.get_size();
  if (size > capacity) {
    std::free(buffer);
    capacity = (size + 4095) / 4096 * 4096;
    buffer = std::aligned_alloc(4096, capacity);
    if (buffer == nullptr) {
      capacity = 0;
      throw std::bad_alloc();
    }
  }
  return memory(md, Engine(), size ? buffer : nullptr);
}
std::unordered_map<std::string, std::unique_ptr<Entry>>& Cache() {
  static auto* cache = new std::unordered_map<std::string, std::unique_ptr<Entry>>();
  return *cache;
}

Entry& Lookup(const Geometry& g, Kind kind) {
  auto& cache = Cache();
  const std::string key = g.Key(kind);
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  auto& eng = Engine();
  const memory::dims strides{g.sh, g.sw}, pad_l{g.pt, g.pl}, pad_r{g.pb, g.pr};
  const dnnl::primitive_attr attr = UserScratchpad();
  // Operands in g.in (x, the kernel, dy), results in float32 (y, dx, the kernel's gradient).
  const auto in = g.in, f32 = memory::data_type::f32;
  auto fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.Src(in),
      g.AnyWeights(in), memory::desc(), g.Dst(f32), strides, pad_l, pad_r, attr);
  auto e = std::make_unique<Entry>();
  if (kind == Kind::kForward) {
    e->prim = dnnl::convolution_forward(fwd_pd);
    e->weights = fwd_pd.weights_desc();
    e->scratch = fwd_pd.scratchpad_desc();
  } else if (kind == Kind::kBackwardData) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, g.Src(f32), g.AnyWeights(in), g.Dst(in),
        strides, pad_l, pad_r, fwd_pd, attr);
    e->prim = dnnl::convolution_backward_data(pd);
    e->weights = pd.weights_desc();
    e->scratch = pd.scratchpad_desc();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, g.Src(in), g.AnyWeights(f32), memory::desc(),
        g.Dst(in), strides, pad_l, pad_r, fwd_pd, attr);
    e->prim = dnnl::convolution_backward_weights(pd);
    e->weights = pd.diff_weights_desc();
    e->scratch = pd.scratchpad_desc();
  }
  const memory::desc user = g.UserWeights(kind == Kind::kBackwardWeights ? f32 : in);
  e->reorder = e->weights != user;
  if (e->reorder) {
    e->blocked = std::make_unique<memory>(e->weights, eng);
    const bool back = kind == Kind::kBackwardWeights;
    auto pd = back ? dnnl::reorder::primitive_desc(eng, e->weights, eng, user, attr)
                   : dnnl::reorder::primitive_desc(eng, user, eng, e->weights, attr);
    (back ? e->from_blocked : e->to_blocked) = dnnl::reorder(pd);
    e->reorder_scratch = pd.scratchpad_desc();
  }
  Entry& ref = *e;
  cache.emplace(key, std::move(e));
  return ref;
}

ffi::Error Check(bool ok, const char* what) {
  return ok ? ffi::Error::Success() : ffi::Error(ffi::ErrorCode::kInvalidArgument, what);
}

// x: (n, h, w, c), kernel: (kh, kw, c/g, o), y: (n, oh, ow, o).
ffi::Error MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                        ffi::Span<const int64_t> y, ffi::Span<const int64_t> strides,
                        ffi::Span<const int64_t> padding, int64_t groups, Geometry* g) {
  if (x.size() != 4 || k.size() != 4 || y.size() != 4 || strides.size() != 2 ||
      padding.size() != 4 || groups < 1) {
    return Check(false, "dnnl_conv: expected rank-4 NHWC/HWIO operands, 2 strides, 4 pads");
  }
  *g = Geometry{x[0], x[1], x[2], x[3], y[1], y[2], y[3], k[0], k[1], groups,
                strides[0], strides[1], padding[0], padding[1], padding[2], padding[3]};
  return Check(y[0] == x[0] && k[2] * groups == x[3] && k[3] == y[3] && y[3] % groups == 0,
               "dnnl_conv: operand shapes do not agree");
}

ffi::Error OperandType(ffi::DataType a, ffi::DataType b, memory::data_type* t) {
  if (a != b || (a != ffi::DataType::F32 && a != ffi::DataType::BF16)) {
    return Check(false, "dnnl_conv: the operands must be both float32 or both bfloat16");
  }
  *t = a == ffi::DataType::F32 ? memory::data_type::f32 : memory::data_type::bf16;
  return ffi::Error::Success();
}

template <typename F>
ffi::Error Guarded(F&& f) {
  try {
    std::lock_guard<std::mutex> lock(mu);
    f();
    return ffi::Error::Success();
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + err.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "dnnl_conv: out of memory");
  }
}

dnnl::stream& Stream() {
  static dnnl::stream s(Engine());
  return s;
}

// Runs one primitive. Forward: a = x, b = kernel, out = y. Backward data: a = dy,
// b = kernel, out = dx. Backward weights: a = x, b = dy, out = dkernel.
void Execute(Kind kind, const Geometry& g, void* a, void* b, float* out) {
  Entry& e = Lookup(g, kind);
  auto& eng = Engine();
  auto& s = Stream();
  const bool weights_out = kind == Kind::kBackwardWeights;
  const auto in = g.in, f32 = memory::data_type::f32;
  memory user(g.UserWeights(weights_out ? f32 : in), eng, weights_out ? out : b);
  memory* w = &user;
  if (e.reorder) {
    w = e.blocked.get();
    if (!weights_out) {
      e.to_blocked.execute(s, {{DNNL_ARG_FROM, user}, {DNNL_ARG_TO, *w},
                               {DNNL_ARG_SCRATCHPAD, Scratch(e.reorder_scratch)}});
    }
  }
  std::unordered_map<int, memory> args{{DNNL_ARG_SCRATCHPAD, Scratch(e.scratch)}};
  if (kind == Kind::kForward) {
    args.insert({{DNNL_ARG_SRC, memory(g.Src(in), eng, a)}, {DNNL_ARG_WEIGHTS, *w},
                 {DNNL_ARG_DST, memory(g.Dst(f32), eng, out)}});
  } else if (kind == Kind::kBackwardData) {
    args.insert({{DNNL_ARG_DIFF_DST, memory(g.Dst(in), eng, a)}, {DNNL_ARG_WEIGHTS, *w},
                 {DNNL_ARG_DIFF_SRC, memory(g.Src(f32), eng, out)}});
  } else {
    args.insert({{DNNL_ARG_SRC, memory(g.Src(in), eng, a)},
                 {DNNL_ARG_DIFF_DST, memory(g.Dst(in), eng, b)}, {DNNL_ARG_DIFF_WEIGHTS, *w}});
  }
  e.prim.execute(s, args);
  if (e.reorder && weights_out) {
    e.from_blocked.execute(s, {{DNNL_ARG_FROM, *w}, {DNNL_ARG_TO, user},
                               {DNNL_ARG_SCRATCHPAD, Scratch(e.reorder_scratch)}});
  }
  s.wait();
}

// The three handlers: x is (n, h, w, c), the kernel (kh, kw, c/groups, o), y (n, oh, ow, o).
template <Kind kind>
ffi::Error Handler(ffi::AnyBuffer a, ffi::AnyBuffer b,
                   ffi::ResultBuffer<ffi::F32> out, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding, int64_t groups) {
  const auto x = kind == Kind::kBackwardData ? out->dimensions() : a.dimensions();
  const auto k = kind == Kind::kBackwardWeights ? out->dimensions() : b.dimensions();
  const auto y = kind == Kind::kForward ? out->dimensions()
                 : kind == Kind::kBackwardData ? a.dimensions() : b.dimensions();
  Geometry g;
  if (auto err = MakeGeometry(x, k, y, strides, padding, groups, &g); err.failure()) {
    return err;
  }
  if (auto err = OperandType(a.element_type(), b.element_type(), &g.in); err.failure()) {
    return err;
  }
  return Guarded([&] {
    Execute(kind, g, a.untyped_data(), b.untyped_data(), out->typed_data());
  });
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<ffi::Span<const int64_t>>("strides")
      .Attr<ffi::Span<const int64_t>>("padding")
      .Attr<int64_t>("groups");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DnnlConvForward, Handler<Kind::kForward>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DnnlConvBackwardData, Handler<Kind::kBackwardData>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DnnlConvBackwardWeights, Handler<Kind::kBackwardWeights>,
                              Binding());
