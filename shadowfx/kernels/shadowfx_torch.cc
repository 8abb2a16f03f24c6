// The native kernels of the shadowfx:: ops, built on first use by shadowfx/native.py: the gather kernels of
// gather_kernels.h (shared with the onnxruntime library) on ATen's threads, each reading only the kept rows (or kept
// input features) of a weight straight from the full weight, for a decode step's one token per batch row or, by
// register tiles, a prefill's per-token selections; a selection sorted by unit once for a layer's projections
// (SelectionPlan). Besides them: the one-pass check of a selection's values that every op call makes, the ranking
// of scores into a selection (per layer and across layers), and the copies of kept weights.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include "gather_kernels.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using namespace shadowfx_kernels;

// the kernels' threads: ATen's intra-op pool, which torch.set_num_threads sizes
struct AtenThreads {
  template <typename Body>
  void range(int64_t begin, int64_t end, int64_t grain, const Body& body) const {
    at::parallel_for(begin, end, grain, body);
  }
  int64_t count() const { return at::get_num_threads(); }
};

void check_selection(const torch::Tensor& x, const torch::Tensor& index, const char* name) {
  TORCH_CHECK(x.dim() == 2, name, ": the input must be [T, width], got ", x.sizes());
  TORCH_CHECK(index.dim() == 2 && index.size(0) == x.size(0) && index.scalar_type() == torch::kLong, name,
              ": the selection must be int64 [T, k] with T = ", x.size(0), ", got ", index.sizes());
}

// A selection [T, k] of `units` sorted by unit once for every projection that reads it (a layer's up, gate and down;
// a layer's q and o), with the runs its row and column tiles take. It holds the selection it was made from: a
// kernel given a plan checks that it is that selection's.
struct SelectionPlan {
  torch::Tensor selection;
  int64_t units;
  UnitOrder order;
  SelectionPlan(const torch::Tensor& of, int64_t units_)
      : selection(checked(of)), units(units_),
        order(selection.data_ptr<int64_t>(), selection.size(0), selection.size(1), units_) {}

  bool made_from(const torch::Tensor& index, int64_t units_) const {
    return index.data_ptr() == selection.data_ptr() && index.sizes() == selection.sizes() && units_ == units;
  }

 private:
  static torch::Tensor checked(const torch::Tensor& of) {
    TORCH_CHECK(of.dim() == 2 && of.scalar_type() == torch::kLong && of.device().is_cpu(),
                "SelectionPlan: the selection must be an int64 [T, k] CPU tensor, got ", of.sizes());
    return of.contiguous();
  }
};

// the plan a kernel reads: the one given (checked against its selection), or one made for this call
const SelectionPlan& plan_for(const torch::Tensor& index, int64_t units, const SelectionPlan* given,
                              std::optional<SelectionPlan>& made, const char* name) {
  if (given == nullptr) return made.emplace(index, units);
  TORCH_CHECK(given->made_from(index, units), name, ": the plan was made for another selection or unit count");
  return *given;
}

torch::Tensor gather_rows(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                          const torch::Tensor& rows, const SelectionPlan* given) {
  check_selection(x, rows, "gather_rows");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.is_contiguous(),
              "gather_rows: the weight must be a contiguous [N, E] with E = ", x.size(1), ", got ", weight.sizes());
  const auto xs = x.to(torch::kFloat).contiguous();
  const auto index = rows.contiguous();
  auto out = torch::empty(rows.sizes(), x.options().dtype(torch::kFloat));
  const auto b = bias.has_value() ? bias->to(weight.scalar_type()).contiguous() : torch::Tensor();
  std::optional<SelectionPlan> made;
  const SelectionPlan* plan = rows.size(0) > 1 ? &plan_for(index, weight.size(0), given, made, "gather_rows") : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND(torch::kBFloat16, weight.scalar_type(), "gather_rows", [&] {
    const scalar_t* bias_data = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    rows_kernel<scalar_t>(AtenThreads{}, xs.data_ptr<float>(), weight.data_ptr<scalar_t>(), bias_data,
                          index.data_ptr<int64_t>(), plan ? &plan->order : nullptr, out.data_ptr<float>(),
                          rows.size(0), rows.size(1), weight.size(0), weight.size(1));
  });
  return out;
}

torch::Tensor gather_cols(const torch::Tensor& h, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                          const torch::Tensor& cols, const SelectionPlan* given) {
  check_selection(h, cols, "gather_cols");
  TORCH_CHECK(weight.dim() == 2, "gather_cols: the weight must be [E, N], got ", weight.sizes());
  const int64_t embed = weight.size(0), units = weight.size(1);
  const bool transposed = weight.stride(0) == 1 && weight.stride(1) == embed;
  TORCH_CHECK(transposed || weight.is_contiguous(),
              "gather_cols: the weight must be contiguous [E, N] or the transpose of a contiguous [N, E]");
  const auto hs = h.to(torch::kFloat).contiguous();
  const auto index = cols.contiguous();
  auto out = torch::empty({h.size(0), embed}, h.options().dtype(torch::kFloat));
  std::optional<SelectionPlan> made;
  const SelectionPlan* plan = cols.size(0) > 1 && transposed ? &plan_for(index, units, given, made, "gather_cols")
                                                             : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND(torch::kBFloat16, weight.scalar_type(), "gather_cols", [&] {
    cols_kernel<scalar_t>(AtenThreads{}, hs.data_ptr<float>(), weight.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
                          plan ? &plan->order : nullptr, out.data_ptr<float>(), cols.size(0), cols.size(1), units,
                          embed, transposed);
  });
  if (bias.has_value()) out += bias->to(torch::kFloat);
  return out;
}

// The buffers gathered weights are copied into, on huge pages (shadowfx_kernels::allocate_huge_pages); a freed one is
// kept for the next gather, up to `limit` bytes of free buffers, since zeroing fresh pages costs about as much again.
class BufferPool {
 public:
  void* take(size_t bytes, size_t* block) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // the smallest free buffer that holds `bytes` without wasting more than a quarter of it
      auto found = free_.lower_bound(bytes);
      if (found != free_.end() && found->first <= bytes + bytes / 4) {
        *block = found->first;
        void* data = found->second;
        held_ -= found->first;
        free_.erase(found);
        return data;
      }
    }
    void* data = shadowfx_kernels::allocate_huge_pages(bytes, block);
    TORCH_CHECK(data != nullptr, "copy_rows: cannot allocate ", *block, " bytes");
    return data;
  }

  void give(void* data, size_t block) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + block <= limit_) {
        free_.emplace(block, data);
        held_ += block;
        return;
      }
    }
    std::free(data);
  }

  // Keep up to `limit` bytes of free buffers (0: none), freeing what exceeds it now; returns the bytes kept.
  size_t set_limit(size_t limit) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = limit;
    while (held_ > limit_ && !free_.empty()) {
      auto largest = std::prev(free_.end());
      held_ -= largest->first;
      std::free(largest->second);
      free_.erase(largest);
    }
    return held_;
  }

  size_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return held_;
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t held_ = 0, limit_ = 0;
};

BufferPool& pool() {
  static auto* instance = new BufferPool();  // never destroyed: tensors may outlive static destruction
  return *instance;
}

torch::Tensor pooled_empty(c10::IntArrayRef sizes, const torch::TensorOptions& options) {
  size_t bytes = options.dtype().itemsize();
  for (const int64_t size : sizes) bytes *= static_cast<size_t>(size);
  size_t block = 0;
  void* data = pool().take(std::max<size_t>(bytes, 1), &block);
  return torch::from_blob(data, sizes, [block](void* freed) { pool().give(freed, block); }, options);
}

size_t pool_bytes() { return pool().held(); }

size_t set_pool_limit(int64_t limit) {
  TORCH_CHECK(limit >= 0, "set_pool_limit: the limit must be >= 0 bytes, got ", limit);
  return pool().set_limit(static_cast<size_t>(limit));
}

// source[rows] for a contiguous source [N, W] (any dtype) and rows int64 [n] in [0, N]: [n, W], copied row by row
// into a new buffer; a row N (the empty slot) gives zeros.
torch::Tensor copy_rows(const torch::Tensor& source, const torch::Tensor& rows) {
  TORCH_CHECK(source.dim() == 2 && source.is_contiguous(), "copy_rows: the source must be a contiguous [N, W], got ",
              source.sizes());
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == torch::kLong, "copy_rows: rows must be int64 [n], got ",
              rows.sizes());
  const auto index = rows.contiguous();
  const int64_t count = index.size(0), units = source.size(0);
  auto out = pooled_empty({count, source.size(1)}, source.options());
  const size_t row_bytes = static_cast<size_t>(source.size(1)) * source.element_size();
  const auto* from = static_cast<const char*>(source.data_ptr());
  auto* to = static_cast<char*>(out.data_ptr());
  const int64_t* wanted = index.data_ptr<int64_t>();
  std::atomic<int64_t> bad{-1};
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>((size_t{64} << 10) / std::max<size_t>(row_bytes, 1)));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = wanted[i];
      if (row == units) {
        std::memset(to + i * row_bytes, 0, row_bytes);
        continue;
      }
      if (row < 0 || row > units) {
        bad = row;
        continue;
      }
      std::memcpy(to + i * row_bytes, from + row * row_bytes, row_bytes);
    }
  });
  TORCH_CHECK(bad.load() < 0, "copy_rows: row ", bad.load(), " is out of range for ", units,
              " rows and the empty slot");
  return out;
}

// What the sparse ops need to know of a selection [..., k] of `size` units (the index `size` is the empty slot), in
// one pass instead of a dozen small tensor ops per op call: the lowest and highest index, whether some row (or token)
// repeats a unit, whether every row keeps every unit, for a selection of one row, the first unit of the ascending
// run it forms (its weights are then a view) or -1, and how many runs of consecutive units the rows hold (a row
// breaks a run wherever an index is not the one before plus one; 0 for a selection that repeats a unit): few long
// runs are a block-scoring predictor's.
std::tuple<int64_t, int64_t, bool, bool, int64_t, int64_t> inspect_selection(const torch::Tensor& selection,
                                                                             int64_t size) {
  TORCH_CHECK(selection.scalar_type() == torch::kLong && selection.dim() >= 1 && selection.numel() > 0,
              "inspect_selection: the selection must be a non-empty int64 [..., k], got ", selection.sizes());
  const auto index = selection.contiguous();
  const int64_t kept = index.size(-1), rows = index.numel() / kept;
  const int64_t* values = index.data_ptr<int64_t>();
  const auto [low, high] = std::minmax_element(values, values + index.numel());
  if (*low < 0 || *high > size) return {*low, *high, false, false, -1, 0};
  // a unit is seen in the current row when its stamp is that row's number: nothing to clear between rows
  std::vector<int64_t> seen(size + 1, -1);
  bool repeated = false;
  int64_t runs = 0;
  for (int64_t row = 0; row < rows && !repeated; ++row) {
    for (int64_t i = 0; i < kept; ++i) {
      const int64_t unit = values[row * kept + i];
      if (unit < size && seen[unit] == row) {
        repeated = true;
        break;
      }
      seen[unit] = row;
      runs += i == 0 || unit != values[row * kept + i - 1] + 1;
    }
  }
  if (repeated) runs = 0;  // not counted to the end
  const bool every = !repeated && kept == size && *high < size;
  int64_t run_start = -1;
  if (rows == 1 && *high < size && values[0] + kept <= size) {
    run_start = values[0];
    for (int64_t i = 1; i < kept && run_start >= 0; ++i)
      if (values[i] != values[0] + i) run_start = -1;
  }
  return {*low, *high, repeated, every, run_start, runs};
}

// A score as an unsigned key in the ranking's order: NaN above every number, -0 equal to +0.
uint32_t score_key(float score) {
  if (std::isnan(score)) return 0xFFFFFFFFu;
  score += 0.0f;  // -0 and +0 are equal scores
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // ordered as unsigned integers
}

// flags[i] = 1 for each of the k largest of keys[0, n), else 0; of the keys equal to the k-th largest, the first.
// The k-th largest is found digit by digit from the top (a radix select: 11, 11 and 10 bits), counting the
// candidates' next digit each time, where a selection by comparisons (nth_element) costs several times more; the
// flags are set without branches, which a random half kept would mispredict.
void top_flags(const uint32_t* keys, int64_t n, int64_t k, std::vector<uint32_t>& work, uint8_t* flags) {
  if (k <= 0) {
    std::fill(flags, flags + n, 0);
    return;
  }
  uint32_t threshold = 0;
  int64_t rank = k;  // the k-th largest's rank among the candidates left, those whose top digits are threshold's
  work.assign(keys, keys + n);
  int64_t count = n;
  for (const int shift : {21, 10, 0}) {
    const uint32_t digits = shift == 0 ? 1024 : 2048;
    std::array<int32_t, 2048> counts{};
    for (int64_t i = 0; i < count; ++i) ++counts[(work[i] >> shift) & (digits - 1)];
    uint32_t digit = digits - 1;
    for (; counts[digit] < rank; --digit) rank -= counts[digit];
    threshold |= digit << shift;
    if (shift == 0) break;
    // the candidates whose digits so far are the threshold's, moved to the front, for the next digit
    const uint32_t top = threshold >> shift;
    int64_t left = 0;
    for (int64_t i = 0; i < count; ++i)
      if (work[i] >> shift == top) work[left++] = work[i];
    count = left;
  }
  // rank is now how many of the keys equal to the threshold are kept: the first ones (ties are few; the first loop
  // is vectorised)
  for (int64_t i = 0; i < n; ++i) flags[i] = keys[i] > threshold;
  for (int64_t i = 0; i < n && rank > 0; ++i)
    if (keys[i] == threshold) {
      flags[i] = 1;
      --rank;
    }
}

// the positions of the set flags[0, n), ascending, into out (room for n); returns how many
int64_t set_positions(const uint8_t* flags, int64_t n, int64_t* out) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[count] = i;
    count += flags[i];
  }
  return count;
}

// The k largest scores of each row of scores [R, N] (float32): their indices, ascending, [R, k]. Ties go to the
// lower index, and NaN ranks above every number, as in a stable descending sort (shadowfx::topk_indices's PyTorch
// path). Each row is one selection of its k-th largest key (top_flags) and one pass in index order over the kept
// flags: a full sort of every row costs more than a small model's layer.
torch::Tensor topk_indices(const torch::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == torch::kFloat,
              "topk_indices: the scores must be float32 [R, N], got ", scores.scalar_type(), " ", scores.sizes());
  const int64_t rows = scores.size(0), units = scores.size(1);
  TORCH_CHECK(k >= 0 && k <= units, "topk_indices: k must be in [0, ", units, "], got ", k);
  const auto contiguous = scores.contiguous();
  auto out = torch::empty({rows, k}, scores.options().dtype(torch::kLong));
  const float* all_scores = contiguous.data_ptr<float>();
  int64_t* all_kept = out.data_ptr<int64_t>();
  if (k == 0) return out;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / units), [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> keys(units), work(units);
    std::vector<uint8_t> flags(units);
    std::vector<int64_t> positions(units);
    for (int64_t row = begin; row < end; ++row) {
      const float* score = all_scores + row * units;
      for (int64_t i = 0; i < units; ++i) keys[i] = score_key(score[i]);
      top_flags(keys.data(), units, k, work, flags.data());
      set_positions(flags.data(), units, positions.data());
      std::copy_n(positions.begin(), k, all_kept + row * k);
    }
  });
  return out;
}

// Each row's `budget` units of scores [R, L, N] (float32) ranked across the layers, after reserving its top
// `minimum` units of every layer (shadowfx::global_topk_indices; ties and NaN as in topk_indices, the reserved
// units ranked as +inf, as the PyTorch path does): per layer [R, w] of each row's kept units ascending, w the most
// any row keeps there, the rows that keep fewer padded with the empty slot N.
std::vector<torch::Tensor> global_topk_indices(const torch::Tensor& scores, int64_t budget, int64_t minimum) {
  TORCH_CHECK(scores.dim() == 3 && scores.scalar_type() == torch::kFloat,
              "global_topk_indices: the scores must be float32 [R, L, N], got ", scores.scalar_type(), " ",
              scores.sizes());
  const int64_t rows = scores.size(0), layers = scores.size(1), units = scores.size(2), size = layers * units;
  TORCH_CHECK(minimum >= 0 && minimum <= units && budget >= minimum * layers && budget <= size,
              "global_topk_indices: minimum must be in [0, ", units, "] and budget in [minimum * ", layers, ", ", size,
              "], got ", minimum, " and ", budget);
  const auto contiguous = scores.contiguous();
  const float* all_scores = contiguous.data_ptr<float>();
  std::vector<uint8_t> kept(static_cast<size_t>(rows * size));
  std::vector<int64_t> counts(static_cast<size_t>(rows * layers), 0);
  const uint32_t reserved_key = score_key(std::numeric_limits<float>::infinity());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(size, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> keys(size), work(size);
    std::vector<uint8_t> reserved(units);
    for (int64_t row = begin; row < end; ++row) {
      const float* score = all_scores + row * size;
      for (int64_t i = 0; i < size; ++i) keys[i] = score_key(score[i]);
      for (int64_t layer = 0; layer < layers; ++layer) {
        uint32_t* layer_keys = keys.data() + layer * units;
        top_flags(layer_keys, units, minimum, work, reserved.data());
        for (int64_t i = 0; i < units; ++i) layer_keys[i] = reserved[i] ? reserved_key : layer_keys[i];
      }
      uint8_t* row_kept = kept.data() + row * size;
      top_flags(keys.data(), size, budget, work, row_kept);
      for (int64_t layer = 0; layer < layers; ++layer)
        counts[row * layers + layer] = std::accumulate(row_kept + layer * units, row_kept + (layer + 1) * units,
                                                       int64_t{0});
    }
  });
  std::vector<torch::Tensor> out;
  for (int64_t layer = 0; layer < layers; ++layer) {
    int64_t width = 0;
    for (int64_t row = 0; row < rows; ++row) width = std::max(width, counts[row * layers + layer]);
    out.push_back(torch::empty({rows, width}, scores.options().dtype(torch::kLong)));
  }
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> positions(units);
    for (int64_t row = begin; row < end; ++row)
      for (int64_t layer = 0; layer < layers; ++layer) {
        const int64_t width = out[layer].size(1);
        int64_t* indices = out[layer].data_ptr<int64_t>() + row * width;
        const int64_t n = set_positions(kept.data() + row * size + layer * units, units, positions.data());
        std::copy_n(positions.begin(), n, indices);
        std::fill(indices + n, indices + width, units);
      }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  pybind11::class_<SelectionPlan>(module, "SelectionPlan")
      .def(pybind11::init<const torch::Tensor&, int64_t>(), pybind11::arg("selection"), pybind11::arg("units"))
      .def_readonly("selection", &SelectionPlan::selection);
  module.def("gather_rows", &gather_rows, "x [T, E] times the rows rows[t] of weight [N, E], plus bias: [T, k]",
             pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("rows"),
             pybind11::arg("plan") = nullptr);
  module.def("copy_rows", &copy_rows, "source[rows] of a contiguous [N, W], zeros for row N: a new [n, W]");
  module.def("set_pool_limit", &set_pool_limit, "keep up to this many bytes of freed copy buffers; returns those kept");
  module.def("pool_bytes", &pool_bytes, "bytes of freed copy buffers kept for reuse");
  module.def("topk_indices", &topk_indices, "indices of the k largest of each row of float32 [R, N], ascending");
  module.def("global_topk_indices", &global_topk_indices,
             "each row's budget units of float32 [R, L, N] across layers after its top minimum of each: per layer "
             "[R, w] of the kept units ascending, padded with N");
  module.def("inspect_selection", &inspect_selection,
             "(lowest, highest, a row repeats a unit, every row keeps every unit, first unit of a one-row run or -1, "
             "runs of consecutive units)");
  module.def("gather_cols", &gather_cols, "h [T, k] times the columns cols[t] of weight [E, N], plus bias: [T, E]",
             pybind11::arg("h"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("cols"),
             pybind11::arg("plan") = nullptr);
}
