// Native CPU kernels of the `shadowfx` ONNX domain for onnxruntime; the node types, their inputs and attributes are
// defined in shadowfx/onnx_ops.py, and every exported file also carries a function body for each of them.
//
// shadowfx.ort_kernels.kernel_library() compiles this file against the onnxruntime C/C++ API headers; a session loads
// it with SessionOptions.register_custom_ops_library, which calls RegisterCustomOps below. The API table comes from
// the OrtApiBase given there (ORT_API_MANUAL_INIT), so the library links nothing of onnxruntime and loads in any
// onnxruntime whose C API is at least ORT_API_VERSION of the headers.
//
// Implemented: GatheredMLP in float32, every activation and selection mode of its bodies, and TokenSparseAttention
// (a per-token attention node, with every option of its body) in float32 (see FloatOp for the other element types),
// by the gather kernels the PyTorch ops use (gather_kernels.h) on the session's intra-op threads;
// KeptRows and KeptCols (a prompt's one-time gather of its kept weights) in every element type, as row copies on the
// same threads. The node types not implemented here keep their function bodies: registering the domain does not hide
// them, and a body's nodes of the domain run the kernels where there are some.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "gather_kernels.h"

namespace {

constexpr const char* kDomain = "shadowfx";

[[noreturn]] void Fail(const std::string& message, const char* op = "GatheredMLP") {
  throw Ort::Exception(std::string("shadowfx ") + op + ": " + message, ORT_INVALID_ARGUMENT);
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// An exception thrown inside a kernel must not cross the C boundary into onnxruntime: it becomes an OrtStatus.
template <typename Body>
OrtStatusPtr AsStatus(Body&& body) {
  try {
    body();
    return nullptr;
  } catch (const Ort::Exception& error) {
    return Ort::GetApi().CreateStatus(error.GetOrtErrorCode(), error.what());
  } catch (const std::exception& error) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, error.what());
  }
}

// What every kernel class shares: onnxruntime calls ComputeV2, which runs the class's Compute(context) with its
// exceptions turned into a status.
template <typename Kernel>
struct StatusKernel {
  OrtStatusPtr ComputeV2(OrtKernelContext* raw_context) {
    return AsStatus([&] { static_cast<Kernel*>(this)->Compute(Ort::KernelContext(raw_context)); });
  }
  // FloatOp's defaults: one output; every input of the registration's element type but the int64 indices
  static constexpr size_t kOutputs = 1;
  static ONNXTensorElementDataType InputType(size_t index, ONNXTensorElementDataType type) {
    return index == Kernel::kIndices ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : type;
  }
};

// Runs body(first, end) over [0, total) in chunks of `chunk` on the session's intra-op threads.
template <typename Body>
void InChunks(const Ort::KernelContext& context, int64_t total, int64_t chunk, const Body& body) {
  struct Work {
    const Body* body;
    int64_t total, chunk;
  } work{&body, total, chunk};
  const int64_t chunks = (total + chunk - 1) / chunk;
  if (chunks == 0) return;
  context.ParallelFor(
      [](void* data, size_t index) {
        const Work& w = *static_cast<const Work*>(data);
        const int64_t first = static_cast<int64_t>(index) * w.chunk;
        (*w.body)(first, std::min(first + w.chunk, w.total));
      },
      static_cast<size_t>(chunks), 0, &work);
}

// The shared gather kernels' threads (gather_kernels.h): the session's intra-op threads, a range split into as
// many parts as the machine has threads (onnxruntime does not tell a kernel how many the session has; a part
// more than it runs waits for a free one).
struct OrtThreads {
  const Ort::KernelContext& context;
  int64_t threads = std::max<int64_t>(1, std::thread::hardware_concurrency());

  template <typename Body>
  void range(int64_t begin, int64_t end, int64_t grain, const Body& body) const {
    const int64_t total = end - begin;
    if (total <= 0) return;
    const int64_t parts = std::max<int64_t>(1, std::min(threads, total / std::max<int64_t>(grain, 1)));
    if (parts == 1) return body(begin, end);
    InChunks(context, total, (total + parts - 1) / parts,
             [&](int64_t first, int64_t last) { body(begin + first, begin + last); });
  }
  int64_t count() const { return threads; }
};

// ---- GatheredMLP ---------------------------------------------------------------------------------------------------

enum class Selection { kRows, kTokens, kPregathered };
enum class Activation { kRelu, kGelu, kGeluTanh, kSilu, kQuickGelu, kRelu2 };

Selection ParseSelection(const std::string& name) {
  if (name == "rows") return Selection::kRows;
  if (name == "tokens") return Selection::kTokens;
  if (name == "pregathered") return Selection::kPregathered;
  Fail("unknown selection '" + name + "' (rows, tokens or pregathered)");
}

Activation ParseActivation(const std::string& name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  if (name == "quick_gelu") return Activation::kQuickGelu;
  if (name == "relu2") return Activation::kRelu2;
  Fail("unknown activation '" + name + "' (relu, gelu, gelu_tanh, silu, quick_gelu or relu2)");
}

float Sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

// The same formulas as the bodies' ONNX ops (Relu, Gelu with approximate none/tanh, x * Sigmoid(a * x)).
float Activate(Activation activation, float v) {
  switch (activation) {
    case Activation::kRelu:
      return v > 0.0f ? v : 0.0f;
    case Activation::kGelu:
      return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case Activation::kGeluTanh:
      return 0.5f * v * (1.0f + std::tanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case Activation::kSilu:
      return v * Sigmoid(v);
    case Activation::kQuickGelu:
      return v * Sigmoid(1.702f * v);
    case Activation::kRelu2:
      return v > 0.0f ? v * v : 0.0f;
  }
  return v;
}

// Input positions of the node (onnx_ops.NODE_TYPES["GatheredMLP"]).
enum MlpInput : size_t { kX, kUpWeight, kUpBias, kGateWeight, kGateBias, kDownWeight, kDownBias, kNeuronIdx, kCount };

// One float tensor input, or not present (an optional input the node does not give: data null, shape empty).
struct Input {
  bool present = false;
  const float* data = nullptr;
  std::vector<int64_t> shape;
};

Input ReadInput(const Ort::KernelContext& context, size_t index) {
  Input input;
  if (index >= context.GetInputCount()) return input;
  Ort::ConstValue value = context.GetInput(index);
  if (value == nullptr) return input;
  input.present = true;
  input.shape = value.GetTensorTypeAndShapeInfo().GetShape();
  input.data = value.GetTensorData<float>();
  return input;
}

// Each of count indices in [0, size] (size: the empty slot).
void CheckIndexRange(const int64_t* indices, int64_t count, int64_t size, const char* op) {
  for (int64_t i = 0; i < count; ++i)
    if (indices[i] < 0 || indices[i] > size)
      Fail("index " + std::to_string(indices[i]) + " is outside [0, " + std::to_string(size) + "] (" +
               std::to_string(size) + " is the empty slot)", op);
}

void ExpectShape(const Input& input, const char* name, const std::vector<int64_t>& shape,
                 const char* op = "GatheredMLP") {
  if (input.present && input.shape != shape)
    Fail(std::string(name) + " has shape " + ShapeText(input.shape) + ", expected " + ShapeText(shape), op);
}

// A constant weight [E, F] (an initializer) as [F, E], the input-major layout the shared kernels read fastest (a
// kept input's weights one contiguous run, register tiles over several tokens), on huge pages since every step reads
// it; copied once, when the session makes the kernel, and the weight's size again in memory. Null where the input is
// not a constant 2-D tensor.
using InputMajor = std::unique_ptr<float[], decltype(&std::free)>;

InputMajor InputMajorCopy(const OrtKernelInfo* info, size_t index) {
  Ort::ConstKernelInfo kernel_info(info);
  InputMajor copy{nullptr, &std::free};
  int constant = 0;
  if (kernel_info.GetInputCount() <= index) return copy;
  Ort::ConstValue weight = kernel_info.GetTensorConstantInput(index, &constant);
  if (!constant || weight == nullptr) return copy;
  const std::vector<int64_t> shape = weight.GetTensorTypeAndShapeInfo().GetShape();
  if (shape.size() != 2) return copy;  // Compute reports the shape
  const float* data = weight.GetTensorData<float>();
  size_t block = 0;
  copy.reset(static_cast<float*>(
      shadowfx_kernels::allocate_huge_pages(static_cast<size_t>(shape[0] * shape[1]) * sizeof(float), &block)));
  if (!copy) throw std::bad_alloc();
  for (int64_t e = 0; e < shape[0]; ++e)
    for (int64_t n = 0; n < shape[1]; ++n) copy[n * shape[0] + e] = data[e * shape[1] + n];
  return copy;
}

// y [T, E] += bias [E]
void AddBias(float* y, const float* bias, int64_t tokens, int64_t embed) {
  for (int64_t t = 0; t < tokens; ++t) shadowfx_kernels::axpy(1.0f, bias, y + t * embed, embed);
}

// whether a token's selection [k] (of many: tokens x kept) names a unit twice
bool RepeatsAUnit(const int64_t* selection, int64_t tokens, int64_t kept, int64_t units) {
  std::vector<int64_t> seen(static_cast<size_t>(units), -1);  // the last token that kept each unit
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < kept; ++j) {
      const int64_t unit = selection[t * kept + j];
      if (unit == units) continue;
      if (seen[unit] == t) return true;
      seen[unit] = t;
    }
  return false;
}

// y = down(h) with h = act(up(x)) or act(gate(x)) * up(x), on the units each token keeps:
//   rows         neuron_idx [B, k] (unit == F is an empty slot: skipped), full weights up/gate [F, E], down [E, F]
//   tokens       neuron_idx [B, S, k] (the same, per token; a unit given twice counts once), full weights
//   pregathered  no neuron_idx; the weights are each batch row's kept units: up/gate [B, F, E], down [B, E, F]
// Biases: up/gate [F] ([B, F] pregathered), down [E].
// The products are the shared gather kernels' (those of the PyTorch ops), on the session's threads: the kept rows of
// up and gate, the kept inputs of down (a constant down weight from its input-major copy, InputMajorCopy).
class MlpKernel : public StatusKernel<MlpKernel> {
 public:
  static constexpr const char* kName = "GatheredMLP";
  static constexpr size_t kInputs = kCount, kIndices = kNeuronIdx;
  static bool Optional(size_t index) { return index != kX && index != kUpWeight && index != kDownWeight; }

  explicit MlpKernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo kernel_info(info);
    activation_ = ParseActivation(kernel_info.GetAttribute<std::string>("activation"));
    selection_ = ParseSelection(kernel_info.GetAttribute<std::string>("selection"));
    if (selection_ != Selection::kPregathered) down_input_major_ = InputMajorCopy(info, kDownWeight);
  }

  void Compute(const Ort::KernelContext& context) {
    const Input x = ReadInput(context, kX), up = ReadInput(context, kUpWeight), up_bias = ReadInput(context, kUpBias),
                gate = ReadInput(context, kGateWeight), gate_bias = ReadInput(context, kGateBias),
                down = ReadInput(context, kDownWeight), down_bias = ReadInput(context, kDownBias);
    const bool per_row = selection_ == Selection::kPregathered;
    if (x.shape.size() != 3) Fail("x must be [B, S, E], got " + ShapeText(x.shape));
    const int64_t batch = x.shape[0], seq = x.shape[1], embed = x.shape[2];
    if (up.shape.size() != (per_row ? 3u : 2u))
      Fail("up_weight must be " + std::string(per_row ? "[B, F, E]" : "[F, E]") + ", got " + ShapeText(up.shape));
    const int64_t units = up.shape[up.shape.size() - 2];
    const std::vector<int64_t> lead = per_row ? std::vector<int64_t>{batch} : std::vector<int64_t>{};
    auto with_lead = [&](std::vector<int64_t> dims) {
      dims.insert(dims.begin(), lead.begin(), lead.end());
      return dims;
    };
    ExpectShape(up, "up_weight", with_lead({units, embed}));
    ExpectShape(up_bias, "up_bias", with_lead({units}));
    ExpectShape(gate, "gate_weight", with_lead({units, embed}));
    ExpectShape(gate_bias, "gate_bias", with_lead({units}));
    ExpectShape(down, "down_weight", with_lead({embed, units}));
    ExpectShape(down_bias, "down_bias", {embed});
    if (gate_bias.present && !gate.present) Fail("gate_bias given without gate_weight");

    const int64_t* neuron_idx = nullptr;
    int64_t kept = units;  // slots per token
    if (!per_row) {
      if (kNeuronIdx >= context.GetInputCount() || context.GetInput(kNeuronIdx) == nullptr)
        Fail("selection '" + std::string(selection_ == Selection::kRows ? "rows" : "tokens") +
             "' needs neuron_idx");
      Ort::ConstValue idx = context.GetInput(kNeuronIdx);
      const std::vector<int64_t> shape = idx.GetTensorTypeAndShapeInfo().GetShape();
      const bool rows = selection_ == Selection::kRows;
      if (shape.size() != (rows ? 2u : 3u) || shape[0] != batch || (!rows && shape[1] != seq))
        Fail("neuron_idx must be " + std::string(rows ? "[B, k]" : "[B, S, k]") + " for x " + ShapeText(x.shape) +
             ", got " + ShapeText(shape));
      neuron_idx = idx.GetTensorData<int64_t>();
      kept = shape.back();
      const int64_t count = rows ? batch * kept : batch * seq * kept;
      for (int64_t i = 0; i < count; ++i)
        if (neuron_idx[i] < 0 || neuron_idx[i] > units)
          Fail("neuron_idx holds " + std::to_string(neuron_idx[i]) + ", outside [0, " + std::to_string(units) +
               "] (" + std::to_string(units) + " is the empty slot)");
    }

    float* y = context.GetOutput(0, x.shape).GetTensorMutableData<float>();
    const Weights weights{up.data, up_bias.data, gate.data, gate_bias.data, down.data, false};  // absent: null
    const OrtThreads threads{context};
    if (selection_ == Selection::kPregathered) {
      // each batch row's own kept weights, every unit of them, for the row's tokens: its down weight [E, F] is read
      // as rows too, one dot product per output
      std::vector<int64_t> every_unit(static_cast<size_t>(seq * units));
      std::vector<int64_t> every_output(static_cast<size_t>(seq * embed));
      for (int64_t i = 0; i < seq * units; ++i) every_unit[i] = i % units;
      for (int64_t i = 0; i < seq * embed; ++i) every_output[i] = i % embed;
      std::optional<shadowfx_kernels::UnitOrder> by_unit, by_output;  // several tokens read them by unit
      if (seq > 1) {
        by_unit.emplace(every_unit.data(), seq, units, units);
        by_output.emplace(every_output.data(), seq, embed, embed);
      }
      std::vector<float> h(static_cast<size_t>(seq * units));
      for (int64_t b = 0; b < batch; ++b) {
        const Weights row{up.data + b * units * embed, up_bias.present ? up_bias.data + b * units : nullptr,
                          gate.present ? gate.data + b * units * embed : nullptr,
                          gate_bias.present ? gate_bias.data + b * units : nullptr, nullptr, false};
        Hidden(threads, x.data + b * seq * embed, every_unit.data(), by_unit ? &*by_unit : nullptr, seq, units, units,
               embed, row, h.data());
        shadowfx_kernels::rows_kernel<float>(threads, h.data(), down.data + b * embed * units, nullptr,
                                             every_output.data(), by_output ? &*by_output : nullptr,
                                             y + b * seq * embed, seq, embed, embed, units);
      }
    } else if (selection_ == Selection::kTokens && RepeatsAUnit(neuron_idx, batch * seq, kept, units)) {
      ByToken(x.data, neuron_idx, batch * seq, kept, units, embed, weights, y);
    } else {
      std::vector<int64_t> per_token;  // rows: each row's selection for each of its tokens
      const int64_t* selection = neuron_idx;
      if (selection_ == Selection::kRows && seq > 1) {
        per_token.resize(static_cast<size_t>(batch * seq * kept));
        for (int64_t t = 0; t < batch * seq; ++t)
          std::copy_n(neuron_idx + (t / seq) * kept, kept, per_token.begin() + t * kept);
        selection = per_token.data();
      }
      Weights full = weights;
      if (down_input_major_) {  // the constant down weight, whose shape Compute has checked above
        full.down = down_input_major_.get();
        full.down_input_major = true;
      }
      ByUnits(threads, x.data, selection, batch * seq, kept, units, embed, full, y);
    }
    if (down_bias.present) AddBias(y, down_bias.data, batch * seq, embed);
  }

 private:
  struct Weights {
    const float *up, *up_bias, *gate, *gate_bias, *down;  // absent ones null
    bool down_input_major;                                 // down [F, E], else [E, F]
  };

  // y [T, E] (without down's bias) of x [T, E] and each token's kept units selection [T, k], by the shared kernels
  void ByUnits(const OrtThreads& threads, const float* x, const int64_t* selection, int64_t tokens, int64_t kept,
               int64_t units, int64_t embed, const Weights& w, float* y) const {
    std::optional<shadowfx_kernels::UnitOrder> order;  // several tokens read the selection by unit, sorted once
    if (tokens > 1) order.emplace(selection, tokens, kept, units);
    const shadowfx_kernels::UnitOrder* by_unit = order ? &*order : nullptr;
    std::vector<float> h(static_cast<size_t>(tokens * kept));
    Hidden(threads, x, selection, by_unit, tokens, kept, units, embed, w, h.data());
    shadowfx_kernels::cols_kernel<float>(threads, h.data(), w.down, selection, by_unit, y, tokens, kept, units, embed,
                                         w.down_input_major);
  }

  // h [T, k] = act(up) or act(gate) * up of the kept units (by_unit: the selection by unit, for several tokens); an
  // empty slot's is 0 (its products are, and every activation keeps 0 at 0)
  void Hidden(const OrtThreads& threads, const float* x, const int64_t* selection,
              const shadowfx_kernels::UnitOrder* by_unit, int64_t tokens, int64_t kept, int64_t units, int64_t embed,
              const Weights& w, float* h) const {
    using namespace shadowfx_kernels;
    const int64_t slots = tokens * kept;
    std::vector<float> gated;
    rows_kernel<float>(threads, x, w.up, w.up_bias, selection, by_unit, h, tokens, kept, units, embed);
    if (w.gate != nullptr) {
      gated.resize(static_cast<size_t>(slots));
      rows_kernel<float>(threads, x, w.gate, w.gate_bias, selection, by_unit, gated.data(), tokens, kept, units,
                         embed);
    }
    threads.range(0, slots, 4096, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i)
        h[i] = w.gate != nullptr ? Activate(activation_, gated[i]) * h[i] : Activate(activation_, h[i]);
    });
  }

  // The same one token and one kept unit at a time, where a token names a unit twice: it counts once
  void ByToken(const float* x, const int64_t* selection, int64_t tokens, int64_t kept, int64_t units, int64_t embed,
               const Weights& w, float* y) const {
    std::vector<char> flags(static_cast<size_t>(units));
    for (int64_t t = 0; t < tokens; ++t) {
      std::fill(flags.begin(), flags.end(), 0);
      for (int64_t j = 0; j < kept; ++j)
        if (selection[t * kept + j] != units) flags[selection[t * kept + j]] = 1;
      const float* x_t = x + t * embed;
      float* y_t = y + t * embed;
      std::fill(y_t, y_t + embed, 0.0f);
      for (int64_t n = 0; n < units; ++n) {
        if (!flags[n]) continue;
        const float u = shadowfx_kernels::dot(w.up + n * embed, x_t, embed) + (w.up_bias ? w.up_bias[n] : 0.0f);
        float h = Activate(activation_, u);
        if (w.gate != nullptr) {
          const float g = shadowfx_kernels::dot(w.gate + n * embed, x_t, embed) + (w.gate_bias ? w.gate_bias[n] : 0.0f);
          h = Activate(activation_, g) * u;
        }
        for (int64_t e = 0; e < embed; ++e) y_t[e] += h * w.down[e * units + n];
      }
    }
  }

  Activation activation_;
  Selection selection_;
  InputMajor down_input_major_{nullptr, &std::free};  // a constant down weight's copy (InputMajorCopy), else null
};

// ---- TokenSparseAttention ------------------------------------------------------------------------------------------
// A per-token attention node (onnx_ops.NODE_TYPES, selection "tokens") in one kernel, in place of its body's ~100
// nodes a layer: each token's kept KV groups' q rows (the shared rows kernel), K and V of every group for the
// complete cache, the per-head norms and RoPE, the attention of each kept query head over the cache, and the o
// projection of the kept heads' context (the shared cols kernel; a constant o weight from its input-major copy).

enum AttentionInput : size_t {
  kHidden, kQWeight, kQBias, kKWeight, kKBias, kVWeight, kVBias, kOWeight, kOBias, kKvHeadIdx, kCos, kSin,
  kAttentionMask, kPastKey, kPastValue, kQNorm, kKNorm, kAlibiSlopes, kAttentionCount
};

// RMSNorm of one head's D values in place, times scale [D].
void HeadNorm(float* v, const float* scale, int64_t dim, float eps) {
  float sum = 0.0f;
  for (int64_t d = 0; d < dim; ++d) sum += v[d] * v[d];
  const float inverse = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
  for (int64_t d = 0; d < dim; ++d) v[d] = v[d] * inverse * scale[d];
}

// RoPE on the first rot values of one head in place: the two halves paired (rotate_half), or neighbours.
void Rotate(float* v, const float* cos, const float* sin, int64_t rot, bool interleaved) {
  if (interleaved) {
    for (int64_t i = 0; i < rot; i += 2) {
      const float even = v[i], odd = v[i + 1];
      v[i] = even * cos[i] - odd * sin[i];
      v[i + 1] = odd * cos[i + 1] + even * sin[i + 1];
    }
    return;
  }
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float first = v[i], second = v[i + half];
    v[i] = first * cos[i] - second * sin[i];
    v[i + half] = second * cos[i + half] + first * sin[i + half];
  }
}

class TokenAttentionKernel : public StatusKernel<TokenAttentionKernel> {
 public:
  static constexpr const char* kName = "TokenSparseAttention";
  static constexpr size_t kInputs = kAttentionCount, kIndices = kKvHeadIdx, kOutputs = 3;
  static bool Optional(size_t index) {
    return index != kHidden && index != kQWeight && index != kKWeight && index != kVWeight && index != kOWeight &&
           index != kKvHeadIdx;
  }
  // the mask is bool or float; the norms' scales and the slopes are float32 where the model computes them so
  // (checked in Compute)
  static ONNXTensorElementDataType InputType(size_t index, ONNXTensorElementDataType type) {
    if (index == kKvHeadIdx) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    if (index == kAttentionMask || index == kQNorm || index == kKNorm || index == kAlibiSlopes)
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    return type;
  }

  explicit TokenAttentionKernel(const OrtKernelInfo* info)
      : o_input_major_(InputMajorCopy(info, kOWeight)),
        gemm_(DenseGemm(info, 2)),
        gemm_bias_(DenseGemm(info, 3)),
        gemm_plain_(DenseGemm(info, 2, false)) {
    Ort::ConstKernelInfo kernel_info(info);
    heads_ = kernel_info.GetAttribute<int64_t>("num_heads");
    kv_heads_ = kernel_info.GetAttribute<int64_t>("num_kv_heads");
    head_dim_ = kernel_info.GetAttribute<int64_t>("head_dim");
    scaling_ = kernel_info.GetAttribute<float>("scaling");
    norm_eps_ = kernel_info.GetAttribute<float>("norm_eps");
    softcap_ = kernel_info.GetAttribute<float>("softcap");
    interleaved_ = kernel_info.GetAttribute<int64_t>("rotary_interleaved") != 0;
    const std::string mask_kind = kernel_info.GetAttribute<std::string>("mask_kind");
    if (mask_kind != "bool" && mask_kind != "additive") Fail("unknown mask_kind " + mask_kind, kName);
    bool_mask_ = mask_kind == "bool";
    if (heads_ < 1 || kv_heads_ < 1 || head_dim_ < 1 || heads_ % kv_heads_)
      Fail("num_heads, num_kv_heads and head_dim must be >= 1, num_heads a multiple of num_kv_heads", kName);
    if (kernel_info.GetAttribute<std::string>("selection") != "tokens")
      Fail("the kernel computes selection 'tokens' only", kName);
  }

  void Compute(const Ort::KernelContext& context) const {
    const Input hidden = ReadInput(context, kHidden), q_weight = ReadInput(context, kQWeight),
                q_bias = ReadInput(context, kQBias), k_weight = ReadInput(context, kKWeight),
                k_bias = ReadInput(context, kKBias), v_weight = ReadInput(context, kVWeight),
                v_bias = ReadInput(context, kVBias), o_weight = ReadInput(context, kOWeight),
                o_bias = ReadInput(context, kOBias), cos = ReadInput(context, kCos), sin = ReadInput(context, kSin),
                past_key = ReadInput(context, kPastKey), past_value = ReadInput(context, kPastValue),
                q_norm = ReadFloat32(context, kQNorm), k_norm = ReadFloat32(context, kKNorm),
                slopes = ReadFloat32(context, kAlibiSlopes);
    if (hidden.shape.size() != 3) Fail("hidden must be [B, S, E], got " + ShapeText(hidden.shape), kName);
    const int64_t batch = hidden.shape[0], seq = hidden.shape[1], embed = hidden.shape[2], dim = head_dim_;
    const int64_t group = heads_ / kv_heads_, q_width = heads_ * dim, kv_width = kv_heads_ * dim;
    const int64_t group_rows = group * dim, tokens = batch * seq;
    ExpectShape(q_weight, "q_weight", {q_width, embed}, kName);
    ExpectShape(k_weight, "k_weight", {kv_width, embed}, kName);
    ExpectShape(v_weight, "v_weight", {kv_width, embed}, kName);
    ExpectShape(o_weight, "o_weight", {embed, q_width}, kName);
    ExpectShape(q_bias, "q_bias", {q_width}, kName);
    ExpectShape(k_bias, "k_bias", {kv_width}, kName);
    ExpectShape(v_bias, "v_bias", {kv_width}, kName);
    ExpectShape(o_bias, "o_bias", {embed}, kName);
    ExpectShape(q_norm, "q_norm", {dim}, kName);
    ExpectShape(k_norm, "k_norm", {dim}, kName);
    ExpectShape(slopes, "alibi_slopes", {heads_}, kName);
    const int64_t past = past_key.present ? past_key.shape[2] : 0, total = past + seq;
    ExpectShape(past_key, "past_key", {batch, kv_heads_, past, dim}, kName);
    ExpectShape(past_value, "past_value", {batch, kv_heads_, past, dim}, kName);
    if (past_key.present != past_value.present) Fail("past_key and past_value go together", kName);
    const int64_t rot = cos.present ? cos.shape.back() : 0;
    if (cos.present) {
      if (cos.shape.size() != 3 || (cos.shape[0] != 1 && cos.shape[0] != batch) || cos.shape[1] != seq ||
          rot % 2 || rot > dim || !sin.present || sin.shape != cos.shape)
        Fail("cos and sin must be [B or 1, S, rot] with an even rot <= head_dim, got " + ShapeText(cos.shape), kName);
    }

    Ort::ConstValue index_value = context.GetInput(kKvHeadIdx);
    const std::vector<int64_t> index_shape = index_value.GetTensorTypeAndShapeInfo().GetShape();
    if (index_shape.size() != 3 || index_shape[0] != batch || index_shape[1] != seq)
      Fail("kv_head_idx must be [B, S, k] = [" + std::to_string(batch) + ", " + std::to_string(seq) + ", k], got " +
               ShapeText(index_shape), kName);
    const int64_t kept = index_shape[2];
    const int64_t* groups = index_value.GetTensorData<int64_t>();
    CheckIndexRange(groups, tokens * kept, kv_heads_, kName);
    if (RepeatsAUnit(groups, tokens, kept, kv_heads_))
      Fail("a token's kv_head_idx names one KV group twice; they must be distinct", kName);
    const Mask mask = ReadMask(context, batch, seq, total);

    // each kept group's r * D q rows (and o inputs); an empty slot's all the empty row q_width
    const int64_t q_kept = kept * group_rows;
    std::vector<int64_t> q_rows(static_cast<size_t>(tokens * q_kept));
    for (int64_t slot = 0; slot < tokens * kept; ++slot)
      for (int64_t i = 0; i < group_rows; ++i)
        q_rows[slot * group_rows + i] = groups[slot] == kv_heads_ ? q_width : groups[slot] * group_rows + i;
    std::optional<shadowfx_kernels::UnitOrder> q_order;  // several tokens read the rows by unit
    if (tokens > 1) q_order.emplace(q_rows.data(), tokens, q_kept, q_width);
    const OrtThreads threads{context};
    std::vector<float> q(static_cast<size_t>(tokens * q_kept)), key(static_cast<size_t>(tokens * kv_width)),
        value(static_cast<size_t>(tokens * kv_width));
    shadowfx_kernels::rows_kernel<float>(threads, hidden.data, q_weight.data, q_bias.data, q_rows.data(),
                                         q_order ? &*q_order : nullptr, q.data(), tokens, q_kept, q_width, embed);
    for (auto [weight, bias, out] : {std::tuple{&k_weight, &k_bias, &key}, std::tuple{&v_weight, &v_bias, &value}}) {
      if (tokens > 1) {  // every row for several tokens: onnxruntime's own GEMM, faster there than the tiles
        Multiply(context, bias->present ? gemm_bias_ : gemm_, true, hidden.data, weight->data, bias->data,
                 out->data(), tokens, embed, kv_width);
        continue;
      }
      std::vector<int64_t> every_row(static_cast<size_t>(kv_width));  // a decode step's K/V: every row
      for (int64_t i = 0; i < kv_width; ++i) every_row[i] = i;
      shadowfx_kernels::rows_kernel<float>(threads, hidden.data, weight->data, bias->data, every_row.data(), nullptr,
                                           out->data(), tokens, kv_width, kv_width, embed);
    }
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t row = cos.shape.empty() || cos.shape[0] == 1 ? t % seq : t;  // of cos/sin [B or 1, S, rot]
      for (int64_t g = 0; g < kv_heads_; ++g)
        Transform(key.data() + t * kv_width + g * dim, k_norm, cos, sin, row, rot);
      for (int64_t j = 0; j < kept; ++j)
        if (groups[t * kept + j] < kv_heads_)
          for (int64_t i = 0; i < group; ++i)
            Transform(q.data() + (t * kept + j) * group_rows + i * dim, q_norm, cos, sin, row, rot);
    }

    // the present cache [B, Hkv, P + S, D]: the past, then the new keys and values
    const std::vector<int64_t> cache_shape{batch, kv_heads_, total, dim};
    float* present_key = context.GetOutput(1, cache_shape).GetTensorMutableData<float>();
    float* present_value = context.GetOutput(2, cache_shape).GetTensorMutableData<float>();
    for (auto [present, past_values, fresh] : {std::tuple{present_key, &past_key, &key},
                                               std::tuple{present_value, &past_value, &value}})
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t g = 0; g < kv_heads_; ++g) {
          float* at = present + (b * kv_heads_ + g) * total * dim;
          if (past) std::memcpy(at, past_values->data + (b * kv_heads_ + g) * past * dim, past * dim * sizeof(float));
          for (int64_t s = 0; s < seq; ++s)
            std::memcpy(at + (past + s) * dim, fresh->data() + (b * seq + s) * kv_width + g * dim, dim * sizeof(float));
        }

    // each kept query head of each token over the cache; an empty slot's context stays 0 (and is not read by o)
    std::vector<float> context_values(static_cast<size_t>(tokens * q_kept), 0.0f);
    const Heads heads{groups, slopes, mask, kept, seq, total, group, group_rows};
    if (tokens > 1)
      AttendByGroup(context, heads, q.data(), present_key, present_value, batch, context_values.data());
    else
      AttendOne(context, heads, q.data(), present_key, present_value, context_values.data());

    float* y = context.GetOutput(0, {batch, seq, embed}).GetTensorMutableData<float>();
    shadowfx_kernels::cols_kernel<float>(
        threads, context_values.data(), o_input_major_ ? o_input_major_.get() : o_weight.data, q_rows.data(),
        tokens > 1 && o_input_major_ ? &*q_order : nullptr, y, tokens, q_kept, q_width, embed,
        o_input_major_ != nullptr);
    if (o_bias.present) AddBias(y, o_bias.data, tokens, embed);
  }

 private:
  // The attention mask [B or 1, 1, S, P + S]: bool (false: blocked) or float (added to the scores).
  struct Mask {
    const bool* allowed = nullptr;
    const float* added = nullptr;
    int64_t batch_stride = 0, seq, total;
    float Add(int64_t b, int64_t s, int64_t p) const {
      const int64_t at = b * batch_stride + s * total + p;
      if (allowed) return allowed[at] ? 0.0f : -INFINITY;
      return added ? added[at] : (p <= total - seq + s ? 0.0f : -INFINITY);  // none: causal
    }
  };

  Mask ReadMask(const Ort::KernelContext& context, int64_t batch, int64_t seq, int64_t total) const {
    Mask mask;
    mask.seq = seq;
    mask.total = total;
    if (context.GetInputCount() <= kAttentionMask || context.GetInput(kAttentionMask) == nullptr) return mask;
    Ort::ConstValue value = context.GetInput(kAttentionMask);
    const auto info = value.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> shape = info.GetShape();
    if (shape.size() != 4 || (shape[0] != 1 && shape[0] != batch) || shape[1] != 1 || shape[2] != seq ||
        shape[3] != total)
      Fail("attention_mask must be [B or 1, 1, " + std::to_string(seq) + ", " + std::to_string(total) + "], got " +
               ShapeText(shape), kName);
    mask.batch_stride = shape[0] == 1 ? 0 : seq * total;
    const ONNXTensorElementDataType type = info.GetElementType();
    if (bool_mask_ && type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL)
      mask.allowed = value.GetTensorData<bool>();
    else if (!bool_mask_ && type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      mask.added = value.GetTensorData<float>();
    else
      Fail(std::string("attention_mask must be ") + (bool_mask_ ? "bool" : "float32") + " (mask_kind), got type " +
               std::to_string(type), kName);
    return mask;
  }

  static Input ReadFloat32(const Ort::KernelContext& context, size_t index) {
    const Input input = ReadInput(context, index);
    if (input.present &&
        context.GetInput(index).GetTensorTypeAndShapeInfo().GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      Fail("the per-head norms' scales and the ALiBi slopes must be float32", kName);
    return input;
  }

  // What the attention of the kept query heads reads besides q and the cache.
  struct Heads {
    const int64_t* groups;  // [T, kept], kv_heads_ the empty slot
    const Input& slopes;
    const Mask& mask;
    int64_t kept, seq, total, group, group_rows;
  };

  // scores [P + S] of query head `head` at batch row b, position s: q.k dot products (any value where the mask
  // blocks) -> softmax probabilities after the scaling, soft cap, mask and ALiBi; all 0 (zero context, not NaN)
  // where no key is allowed
  void Probabilities(float* scores, const Heads& heads, int64_t b, int64_t s, int64_t head) const {
    const float slope = heads.slopes.present ? heads.slopes.data[head] : 0.0f;
    float most = -INFINITY;
    for (int64_t p = 0; p < heads.total; ++p) {
      const float added = heads.mask.Add(b, s, p);
      float score = scores[p] * scaling_;
      if (softcap_ > 0.0f) score = softcap_ * std::tanh(score / softcap_);
      scores[p] = added == -INFINITY ? -INFINITY : score + added + slope * static_cast<float>(p);
      most = std::max(most, scores[p]);
    }
    if (most == -INFINITY) {
      std::fill(scores, scores + heads.total, 0.0f);
      return;
    }
    float sum = 0.0f;
    for (int64_t p = 0; p < heads.total; ++p) sum += scores[p] = std::exp(scores[p] - most);
    for (int64_t p = 0; p < heads.total; ++p) scores[p] /= sum;
  }

  // A decode step: each kept head's dot products with the keys (the blocked ones skipped) and weighted sum of values.
  void AttendOne(const Ort::KernelContext& context, const Heads& heads, const float* q, const float* keys,
                 const float* values, float* out) const {
    const int64_t dim = head_dim_, items = heads.kept * heads.group, total = heads.total;
    InChunks(context, items, 1, [&](int64_t first, int64_t last) {
      std::vector<float> scores(static_cast<size_t>(total));
      for (int64_t item = first; item < last; ++item) {
        const int64_t slot = item / heads.group, i = item % heads.group, b = slot / heads.kept;
        const int64_t g = heads.groups[slot];
        if (g == kv_heads_) continue;
        const int64_t offset = slot * heads.group_rows + i * dim;
        const float* group_keys = keys + (b * kv_heads_ + g) * total * dim;
        for (int64_t p = 0; p < total; ++p)  // a blocked key's product is not needed
          scores[p] = heads.mask.Add(b, 0, p) == -INFINITY
                          ? 0.0f
                          : shadowfx_kernels::dot(group_keys + p * dim, q + offset, dim);
        Probabilities(scores.data(), heads, b, 0, g * heads.group + i);
        for (int64_t p = 0; p < total; ++p)
          if (scores[p] != 0.0f)
            shadowfx_kernels::axpy(scores[p], values + ((b * kv_heads_ + g) * total + p) * dim, out + offset, dim);
      }
    });
  }

  // Several tokens: per batch row and KV group, the query heads of the tokens that keep the group, gathered, against
  // the group's keys and values by onnxruntime's Gemm (scores, then context), the softmax between them.
  void AttendByGroup(const Ort::KernelContext& context, const Heads& heads, const float* q, const float* keys,
                     const float* values, int64_t batch, float* out) const {
    const int64_t dim = head_dim_, total = heads.total;
    std::vector<int64_t> slots;
    std::vector<float> queries, scores, gathered;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t g = 0; g < kv_heads_; ++g) {
        slots.clear();
        for (int64_t slot = b * heads.seq * heads.kept; slot < (b + 1) * heads.seq * heads.kept; ++slot)
          if (heads.groups[slot] == g) slots.push_back(slot);
        const int64_t rows = static_cast<int64_t>(slots.size()) * heads.group;
        if (rows == 0) continue;
        queries.resize(static_cast<size_t>(rows * dim));
        for (size_t n = 0; n < slots.size(); ++n)
          std::memcpy(queries.data() + n * heads.group_rows, q + slots[n] * heads.group_rows,
                      heads.group_rows * sizeof(float));
        scores.resize(static_cast<size_t>(rows * total));
        gathered.resize(static_cast<size_t>(rows * dim));
        const float* group_keys = keys + (b * kv_heads_ + g) * total * dim;
        const float* group_values = values + (b * kv_heads_ + g) * total * dim;
        Multiply(context, gemm_, true, queries.data(), group_keys, nullptr, scores.data(), rows, dim, total);
        InChunks(context, rows, std::max<int64_t>(1, rows / 8), [&](int64_t first, int64_t last) {
          for (int64_t row = first; row < last; ++row) {
            const int64_t slot = slots[row / heads.group], s = (slot / heads.kept) % heads.seq;
            Probabilities(scores.data() + row * total, heads, b, s, g * heads.group + row % heads.group);
          }
        });
        Multiply(context, gemm_plain_, false, scores.data(), group_values, nullptr, gathered.data(), rows, total, dim);
        for (size_t n = 0; n < slots.size(); ++n)
          std::memcpy(out + slots[n] * heads.group_rows, gathered.data() + n * heads.group_rows,
                      heads.group_rows * sizeof(float));
      }
  }


  // onnxruntime's Gemm (B transposed or not) with `inputs` inputs (a bias or not), invoked from Compute
  static Ort::Op DenseGemm(const OrtKernelInfo* info, size_t inputs, bool b_transposed = true) {
    const char* names[] = {"T"};
    const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
    const int64_t plain = 0, transposed = b_transposed ? 1 : 0;
    const float one = 1.0f;
    // every attribute given: an invoked op gets no schema defaults
    const Ort::OpAttr attributes[] = {Ort::OpAttr("transA", &plain, 1, OrtOpAttrType::ORT_OP_ATTR_INT),
                                      Ort::OpAttr("transB", &transposed, 1, OrtOpAttrType::ORT_OP_ATTR_INT),
                                      Ort::OpAttr("alpha", &one, 1, OrtOpAttrType::ORT_OP_ATTR_FLOAT),
                                      Ort::OpAttr("beta", &one, 1, OrtOpAttrType::ORT_OP_ATTR_FLOAT)};
    return Ort::Op::Create(info, "Gemm", "", 13, names, types, 1, attributes, 4, inputs, 1);
  }

  // out [M, N] = a [M, K] . b (+ bias [N]) by onnxruntime's Gemm `gemm` on the session's threads: b [N, K] for the
  // ops made with B transposed (gemm_, gemm_bias_), [K, N] for gemm_plain_
  static void Multiply(const Ort::KernelContext& context, Ort::Op& gemm, bool b_transposed, const float* a,
                       const float* b, const float* bias, float* out, int64_t m, int64_t k, int64_t n) {
    const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    auto wrap = [&](const float* data, std::vector<int64_t> shape) {
      size_t count = 1;
      for (int64_t d : shape) count *= static_cast<size_t>(d);
      return Ort::Value::CreateTensor<float>(cpu, const_cast<float*>(data), count, shape.data(), shape.size());
    };
    const std::vector<int64_t> b_shape = b_transposed ? std::vector<int64_t>{n, k} : std::vector<int64_t>{k, n};
    Ort::Value values[] = {wrap(a, {m, k}), wrap(b, b_shape), bias ? wrap(bias, {n}) : Ort::Value(nullptr)};
    Ort::Value result = wrap(out, {m, n});
    const OrtValue* inputs[] = {values[0], values[1], values[2]};
    OrtValue* outputs[] = {result};
    gemm.Invoke(context.GetOrtKernelContext(), inputs, bias ? 3 : 2, outputs, 1);
  }

  // one head's norm (when given) and RoPE (when given), at row `row` of cos/sin
  void Transform(float* head, const Input& norm, const Input& cos, const Input& sin, int64_t row, int64_t rot) const {
    if (norm.present) HeadNorm(head, norm.data, head_dim_, norm_eps_);
    if (cos.present) Rotate(head, cos.data + row * rot, sin.data + row * rot, rot, interleaved_);
  }

  int64_t heads_ = 0, kv_heads_ = 0, head_dim_ = 0;
  float scaling_ = 1.0f, norm_eps_ = 0.0f, softcap_ = 0.0f;
  bool interleaved_ = false, bool_mask_ = true;
  InputMajor o_input_major_;
  mutable Ort::Op gemm_, gemm_bias_, gemm_plain_;
};

// The registration of a float32 kernel class (GatheredMLP, TokenSparseAttention) for element type kType:
// the class names the node type (kName), its input count (kInputs), the position of its int64 indices (kIndices)
// and its optional inputs (Optional). onnxruntime checks a node against a schema it builds from all the
// registrations of the name (not against the function's schema), so besides the float32 kernel there are float16 and
// bfloat16 registrations that only keep the element types onnx_ops allows: they are declared for an execution
// provider that no session has, and never run. A float16 node then runs the float32 kernel between the casts that
// onnxruntime's CPU provider inserts for float16 (as it does for the body's ops); a bfloat16 node finds no CPU
// kernel, as its body does not.
constexpr const char* kSchemaOnlyProvider = "ShadowfxSchemaOnly";

template <typename Kernel, ONNXTensorElementDataType kType>
struct FloatOp : Ort::CustomOpBase<FloatOp<Kernel, kType>, Kernel, /*WithStatus=*/true> {
  static constexpr bool kComputes = kType == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return AsStatus([&] {
      if (!kComputes)
        Fail("no kernel for this element type (the registration only declares the schema's types)", Kernel::kName);
      *kernel = new Kernel(info);
    });
  }
  const char* GetName() const { return Kernel::kName; }
  const char* GetExecutionProviderType() const { return kComputes ? nullptr : kSchemaOnlyProvider; }
  size_t GetInputTypeCount() const { return Kernel::kInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const { return Kernel::InputType(index, kType); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return Kernel::Optional(index) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return Kernel::kOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return kType; }
};

template <typename Kernel>
void AddFloatOp(Ort::CustomOpDomain* domain) {
  domain->Add(new FloatOp<Kernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>());
  domain->Add(new FloatOp<Kernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>());
  domain->Add(new FloatOp<Kernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16>());
}

// ---- KeptRows, KeptCols --------------------------------------------------------------------------------------------
// The one-time gather of a prompt's kept weights (onnx_ops.NODE_TYPES): copies of whole elements, the same for every
// element type. An index equal to the gathered axis's size is an empty slot and gives zeros.

size_t ElementBytes(ONNXTensorElementDataType type, const char* op) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
      return 2;
    default:
      Fail("source must be float32, float16 or bfloat16", op);
  }
}

// The kept indices [B, n], each checked to lie in [0, size].
const int64_t* ReadIndices(const Ort::KernelContext& context, int64_t size, const char* op,
                           std::vector<int64_t>& shape) {
  Ort::ConstValue indices = context.GetInput(1);
  shape = indices.GetTensorTypeAndShapeInfo().GetShape();
  if (shape.size() != 2) Fail("the indices must be [B, n], got " + ShapeText(shape), op);
  const int64_t* data = indices.GetTensorData<int64_t>();
  CheckIndexRange(data, shape[0] * shape[1], size, op);
  return data;
}

constexpr int64_t kChunkBytes = 1 << 18;  // per task: large enough that scheduling costs little

// source [N, ...] at rows [B, n] -> [B, n, ...].
struct KeptRowsKernel : StatusKernel<KeptRowsKernel> {
  explicit KeptRowsKernel(const OrtKernelInfo*) {}

  static void Compute(const Ort::KernelContext& context) {
    Ort::ConstValue source = context.GetInput(0);
    const auto info = source.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> shape = info.GetShape();
    if (shape.empty()) Fail("source must have at least one axis", "KeptRows");
    const size_t element = ElementBytes(info.GetElementType(), "KeptRows");
    std::vector<int64_t> rows_shape;
    const int64_t* rows = ReadIndices(context, shape[0], "KeptRows", rows_shape);
    int64_t width = 1;
    for (size_t i = 1; i < shape.size(); ++i) width *= shape[i];
    const size_t row_bytes = static_cast<size_t>(width) * element;
    std::vector<int64_t> out_shape = rows_shape;
    out_shape.insert(out_shape.end(), shape.begin() + 1, shape.end());
    char* out = static_cast<char*>(context.GetOutput(0, out_shape).GetTensorMutableRawData());
    shadowfx_kernels::advise_huge_pages(out, static_cast<size_t>(rows_shape[0] * rows_shape[1]) * row_bytes);
    const char* from = static_cast<const char*>(source.GetTensorRawData());
    const int64_t size = shape[0];
    const int64_t chunk = std::max<int64_t>(1, kChunkBytes / static_cast<int64_t>(std::max<size_t>(row_bytes, 1)));
    InChunks(context, rows_shape[0] * rows_shape[1], chunk, [&](int64_t first, int64_t end) {
      for (int64_t i = first; i < end; ++i) {
        char* to = out + static_cast<size_t>(i) * row_bytes;
        if (rows[i] == size)
          std::memset(to, 0, row_bytes);
        else
          std::memcpy(to, from + static_cast<size_t>(rows[i]) * row_bytes, row_bytes);
      }
    });
  }
};

// The columns cols [B, n] of source [M, N] -> [B, M, n]. Consecutive kept columns (a neuron block) are one copy.
struct KeptColsKernel : StatusKernel<KeptColsKernel> {
  explicit KeptColsKernel(const OrtKernelInfo*) {}

  struct Run {
    int64_t slot, column, length;  // column == -1: empty slots, zeros
  };

  static void Compute(const Ort::KernelContext& context) {
    Ort::ConstValue source = context.GetInput(0);
    const auto info = source.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> shape = info.GetShape();
    if (shape.size() != 2) Fail("source must be [M, N], got " + ShapeText(shape), "KeptCols");
    const size_t element = ElementBytes(info.GetElementType(), "KeptCols");
    const int64_t out_rows = shape[0], size = shape[1];
    std::vector<int64_t> cols_shape;
    const int64_t* cols = ReadIndices(context, size, "KeptCols", cols_shape);
    const int64_t batch = cols_shape[0], kept = cols_shape[1];
    std::vector<std::vector<Run>> runs(static_cast<size_t>(batch));
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t* row = cols + b * kept;
      for (int64_t j = 0; j < kept; ++j) {
        const int64_t column = row[j] == size ? -1 : row[j];
        std::vector<Run>& mine = runs[static_cast<size_t>(b)];
        if (!mine.empty()) {
          Run& last = mine.back();
          const bool follows = column == -1 ? last.column == -1 : last.column != -1 && last.column + last.length == column;
          if (follows) {
            ++last.length;
            continue;
          }
        }
        mine.push_back({j, column, 1});
      }
    }
    char* out = static_cast<char*>(context.GetOutput(0, {batch, out_rows, kept}).GetTensorMutableRawData());
    shadowfx_kernels::advise_huge_pages(out, static_cast<size_t>(batch * out_rows * kept) * element);
    const char* from = static_cast<const char*>(source.GetTensorRawData());
    const int64_t chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, kept * static_cast<int64_t>(element)));
    InChunks(context, batch * out_rows, chunk, [&](int64_t first, int64_t end) {
      for (int64_t i = first; i < end; ++i) {  // i: output row (b, m)
        const int64_t b = i / out_rows, m = i % out_rows;
        char* to = out + static_cast<size_t>(i * kept) * element;
        const char* source_row = from + static_cast<size_t>(m * size) * element;
        for (const Run& run : runs[static_cast<size_t>(b)]) {
          char* slots = to + static_cast<size_t>(run.slot) * element;
          const size_t bytes = static_cast<size_t>(run.length) * element;
          if (run.column == -1)
            std::memset(slots, 0, bytes);
          else
            std::memcpy(slots, source_row + static_cast<size_t>(run.column) * element, bytes);
        }
      }
    });
  }
};

// One registration per element type: the copies are the same for all of them.
template <typename Kernel, ONNXTensorElementDataType kType>
struct KeptOp : Ort::CustomOpBase<KeptOp<Kernel, kType>, Kernel, /*WithStatus=*/true> {
  explicit KeptOp(const char* name) : name_(name) {}
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return AsStatus([&] { *kernel = new Kernel(info); });
  }
  const char* GetName() const { return name_; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : kType;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return kType; }

 private:
  const char* name_;
};

template <typename Kernel>
void AddKept(Ort::CustomOpDomain* domain, const char* name) {
  domain->Add(new KeptOp<Kernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>(name));
  domain->Add(new KeptOp<Kernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>(name));
  domain->Add(new KeptOp<Kernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16>(name));
}

}  // namespace

// Called by onnxruntime once per SessionOptions.register_custom_ops_library: adds the shadowfx domain to the options.
extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // an onnxruntime older than the headers: report it through the oldest API table
    const std::string message = std::string("the shadowfx kernel library needs onnxruntime C API version ") +
                                std::to_string(ORT_API_VERSION) + ", this onnxruntime is " +
                                api_base->GetVersionString() + "; build the library against its headers";
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  return AsStatus([&] {
    // The domain and its ops must outlive every session that uses them; made once, never freed.
    static Ort::CustomOpDomain* const domain = [] {
      auto* made = new Ort::CustomOpDomain(kDomain);
      AddFloatOp<MlpKernel>(made);
      AddFloatOp<TokenAttentionKernel>(made);
      AddKept<KeptRowsKernel>(made, "KeptRows");
      AddKept<KeptColsKernel>(made, "KeptCols");
      return made;
    }();
    Ort::UnownedSessionOptions(options).Add(*domain);
  });
}
