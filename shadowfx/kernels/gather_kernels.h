// The gather kernels that the PyTorch extension (shadowfx_torch.cc) and the onnxruntime library (shadowfx_ort.cc)
// share: products of the kept rows of a weight ([T, k] from x [T, E]) and of its kept input features ([T, E] from
// h [T, k]), straight from the full weight, with float accumulation. The index equal to the unit count is the
// empty slot. One token reads its slots in order; several read the selection by unit (SlotsByUnit), and in float32
// by register tiles.
//
// Each kernel runs on `threads`, an object of the including library: threads.range(begin, end, grain, fn) calls
// fn(first, last) over parts of [begin, end) of at least `grain` on its threads and returns when all are done, and
// threads.count() says how many threads that is.

#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace shadowfx_kernels {

// Weights the kernels read on every step sit best on transparent huge pages: read through 4 KiB pages, a stream of
// many megabytes takes a fifth to a third longer (TLB misses), and faulting it in 4 KiB at a time costs more than
// writing it. The system grants huge pages to memory advised so before it is first written.
constexpr size_t kHugePage = size_t{2} << 20;

// Advises the whole 2 MiB pages inside [data, data + bytes) (memory another allocator gave; advice the system may
// refuse).
inline void advise_huge_pages(void* data, size_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(data), huge = kHugePage;
  const uintptr_t begin = (first + huge - 1) / huge * huge, end = (first + bytes) / huge * huge;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

// 2 MiB-aligned memory for `bytes`, rounded up to whole huge pages (*block: the size allocated) and advised to use
// them; std::free releases it. nullptr where the allocation fails.
inline void* allocate_huge_pages(size_t bytes, size_t* block) {
  *block = (std::max<size_t>(bytes, 1) + kHugePage - 1) / kHugePage * kHugePage;
  void* data = std::aligned_alloc(kHugePage, *block);
  if (data != nullptr) advise_huge_pages(data, *block);
  return data;
}

// dot products and axpys over one contiguous run, vectorised by the compiler (OpenMP's simd, -fopenmp or
// -fopenmp-simd: the reduction may be reordered without -ffast-math's other licences)
template <typename W>
float dot(const W* weight, const float* x, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<float>(weight[i]) * x[i];
  return sum;
}

template <typename W>
void axpy(float scale, const W* weight, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] += scale * static_cast<float>(weight[i]);
}

template <typename W>
void axpy4(const float* scale, const W* w0, const W* w1, const W* w2, const W* w3, float* out, int64_t n) {
  const float s0 = scale[0], s1 = scale[1], s2 = scale[2], s3 = scale[3];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    out[i] += s0 * static_cast<float>(w0[i]) + s1 * static_cast<float>(w1[i]) + s2 * static_cast<float>(w2[i]) +
              s3 * static_cast<float>(w3[i]);
}

// The slots of a selection [T, k] grouped by unit (a counting sort): the slots of unit u are slot[start[u]] ..
// slot[start[u + 1] - 1], in token order; the empty slot N and anything above it are left out. With several tokens
// (a batch's decode step, each row keeping its own units) the kernels walk the units instead of the slots, so that
// a weight row two tokens keep is read from memory once, not once per token.
struct SlotsByUnit {
  std::vector<int64_t> start, slot;
  std::vector<int32_t> token_of;  // the token of each entry of `slot` (a slot is token * kept + position)
  SlotsByUnit(const int64_t* units_of, int64_t tokens, int64_t kept, int64_t units)
      : start(units + 1, 0), slot(tokens * kept), token_of(tokens * kept) {
    const int64_t slots = tokens * kept;
    for (int64_t i = 0; i < slots; ++i)
      if (units_of[i] >= 0 && units_of[i] < units) ++start[units_of[i] + 1];
    for (int64_t u = 0; u < units; ++u) start[u + 1] += start[u];
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t t = 0, i = 0; t < tokens; ++t)
      for (int64_t k = 0; k < kept; ++k, ++i)
        if (units_of[i] >= 0 && units_of[i] < units) {
          const int64_t at = next[units_of[i]]++;
          slot[at] = i;
          token_of[at] = static_cast<int32_t>(t);
        }
  }

  // Runs of consecutive units that the same tokens keep (the neurons of a block a predictor keeps whole), at most
  // `most` units a run: [first, end) pairs in unit order, leaving out the units no token keeps.
  std::vector<std::pair<int64_t, int64_t>> groups(int64_t most) const {
    std::vector<std::pair<int64_t, int64_t>> runs;
    for (int64_t unit = 0; unit + 1 < static_cast<int64_t>(start.size()); ++unit) {
      if (start[unit + 1] == start[unit]) continue;
      if (!runs.empty() && runs.back().second == unit && unit - runs.back().first < most &&
          same_tokens(runs.back().first, unit))
        runs.back().second = unit + 1;
      else
        runs.emplace_back(unit, unit + 1);
    }
    return runs;
  }

  // the token of the j-th slot of unit `unit`
  int64_t token(int64_t unit, int64_t j) const { return token_of[start[unit] + j]; }

 private:
  bool same_tokens(int64_t a, int64_t b) const {
    const int64_t count = start[a + 1] - start[a];
    return start[b + 1] - start[b] == count &&
           std::equal(token_of.begin() + start[a], token_of.begin() + start[a + 1], token_of.begin() + start[b]);
  }
};

// A selection sorted by unit once for every projection that reads it, with the runs its row and column tiles take.
struct UnitOrder {
  SlotsByUnit by_unit;
  std::vector<std::pair<int64_t, int64_t>> row_groups, col_groups;  // runs of at most 4 and 16 units
  UnitOrder(const int64_t* units_of, int64_t tokens, int64_t kept, int64_t units)
      : by_unit(units_of, tokens, kept, units), row_groups(by_unit.groups(4)), col_groups(by_unit.groups(16)) {}
};

// Register tiles for several tokens (a prefill's per-token selections, a batch's decode step) and float32 weights:
// R weight rows by TN tokens, so that every load feeds several multiply-adds, where one dot product at a time loads
// two values for each. 16 floats a vector; the compiler splits it where the CPU's vectors are narrower.
using Vec16 = float __attribute__((vector_size(64)));

inline Vec16 load16(const float* from) {
  Vec16 v;
  std::memcpy(&v, from, sizeof v);
  return v;
}

inline void store16(float* to, const Vec16& v) { std::memcpy(to, &v, sizeof v); }

// A value loaded once for several multiply-adds stays in a register: left alone, the compiler folds the load into
// each of them, and the loads, not the multiply-adds, then bound the tile.
inline void in_register(Vec16& v) {
#if defined(__GNUC__) && defined(__AVX512F__)  // a 64-byte vector fits one register
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// the sum of a vector's lanes, by halves
inline float lane_sum(const Vec16& v) {
  using Vec8 = float __attribute__((vector_size(32)));
  using Vec4 = float __attribute__((vector_size(16)));
  Vec8 low, high;
  std::memcpy(&low, &v, sizeof low);
  std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof low, sizeof high);
  const Vec8 eight = low + high;
  Vec4 first, second;
  std::memcpy(&first, &eight, sizeof first);
  std::memcpy(&second, reinterpret_cast<const char*>(&eight) + sizeof first, sizeof second);
  const Vec4 four = first + second;
  return (four[0] + four[2]) + (four[1] + four[3]);
}

// out[t][r] = w[r] . x[t] over n values
template <int R, int TN>
void dot_tile(const float* const* w, const float* const* x, int64_t n, float (*out)[4]) {
  Vec16 acc[TN][R] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    Vec16 weights[R];
    for (int r = 0; r < R; ++r) {
      weights[r] = load16(w[r] + i);
      in_register(weights[r]);
    }
    for (int t = 0; t < TN; ++t) {
      Vec16 input = load16(x[t] + i);
      in_register(input);
      for (int r = 0; r < R; ++r) acc[t][r] += input * weights[r];
    }
  }
  for (int t = 0; t < TN; ++t)
    for (int r = 0; r < R; ++r) {
      float sum = lane_sum(acc[t][r]);
      for (int64_t j = i; j < n; ++j) sum += w[r][j] * x[t][j];
      out[t][r] = sum;
    }
}

template <int R>
void dot_tile_of(int tokens, const float* const* w, const float* const* x, int64_t n, float (*out)[4]) {
  switch (tokens) {
    case 4: return dot_tile<R, 4>(w, x, n, out);
    case 3: return dot_tile<R, 3>(w, x, n, out);
    case 2: return dot_tile<R, 2>(w, x, n, out);
    default: return dot_tile<R, 1>(w, x, n, out);
  }
}

// rows_kernel's several tokens with a float32 weight: each group of 4 units that the same tokens keep as 4 x 4
// tiles, other units one at a time by 4 tokens.
template <typename Threads>
void rows_by_unit(const Threads& threads, const float* x, const float* weight, const float* bias,
                  const UnitOrder& order, float* out, int64_t width) {
  const SlotsByUnit& by_unit = order.by_unit;
  const auto& groups = order.row_groups;
  threads.range(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t begin, int64_t end) {
    const float* w[4];
    const float* inputs[4];
    float tile[4][4];
    for (int64_t g = begin; g < end; ++g) {
      const auto [first, last] = groups[g];
      const int64_t count = by_unit.start[first + 1] - by_unit.start[first];
      const int64_t rows_at_once = last - first == 4 ? 4 : 1;
      for (int64_t unit = first; unit < last; unit += rows_at_once) {
        for (int r = 0; r < rows_at_once; ++r) w[r] = weight + (unit + r) * width;
        for (int64_t j = 0; j < count; j += 4) {
          const int tokens = static_cast<int>(std::min<int64_t>(4, count - j));
          for (int t = 0; t < tokens; ++t) inputs[t] = x + by_unit.token(first, j + t) * width;
          if (rows_at_once == 4)
            dot_tile_of<4>(tokens, w, inputs, width, tile);
          else
            dot_tile_of<1>(tokens, w, inputs, width, tile);
          for (int r = 0; r < rows_at_once; ++r) {
            const float b = bias ? bias[unit + r] : 0.0f;
            for (int t = 0; t < tokens; ++t) out[by_unit.slot[by_unit.start[unit + r] + j + t]] = tile[t][r] + b;
          }
        }
      }
    }
  });
}

// A group's inputs of cols_by_unit, laid out for its tiles: for the group's j-th token, its input to each of the
// group's units, in unit order.
struct GroupInputs {
  std::vector<int64_t> offset;  // where each group's [count, units] block starts in `scale`
  std::vector<float> scale;
  GroupInputs(const float* h, const SlotsByUnit& by_unit, const std::vector<std::pair<int64_t, int64_t>>& groups)
      : offset(groups.size() + 1, 0) {
    for (size_t g = 0; g < groups.size(); ++g) {
      const auto [first, last] = groups[g];
      offset[g + 1] = offset[g] + (by_unit.start[first + 1] - by_unit.start[first]) * (last - first);
    }
    scale.resize(static_cast<size_t>(offset.back()));
    for (size_t g = 0; g < groups.size(); ++g) {
      const auto [first, last] = groups[g];
      const int64_t count = by_unit.start[first + 1] - by_unit.start[first], width = last - first;
      for (int64_t unit = first; unit < last; ++unit)
        for (int64_t j = 0; j < count; ++j)
          scale[offset[g] + j * width + (unit - first)] = h[by_unit.slot[by_unit.start[unit] + j]];
    }
  }
};

// sums[t][begin, end) += sum over the group's units u of scale[t][u] * weight_t[u][begin, end), for TN tokens, 64
// columns at a time in registers
template <int TN>
void axpy_tile(const float* scale, const float* weight_t, int64_t first, int64_t last, float* const* sums,
               int64_t begin, int64_t end, int64_t embed) {
  const int64_t width = last - first;
  int64_t e = begin;
  for (; e + 64 <= end; e += 64) {
    Vec16 acc[TN][4];
    for (int t = 0; t < TN; ++t)
      for (int c = 0; c < 4; ++c) acc[t][c] = load16(sums[t] + e + 16 * c);
    for (int64_t u = 0; u < width; ++u) {
      Vec16 weights[4];
      for (int c = 0; c < 4; ++c) {
        weights[c] = load16(weight_t + (first + u) * embed + e + 16 * c);
        in_register(weights[c]);
      }
      for (int t = 0; t < TN; ++t) {
        const float s = scale[t * width + u];
        for (int c = 0; c < 4; ++c) acc[t][c] += s * weights[c];
      }
    }
    for (int t = 0; t < TN; ++t)
      for (int c = 0; c < 4; ++c) store16(sums[t] + e + 16 * c, acc[t][c]);
  }
  for (int64_t u = 0; u < width && e < end; ++u)
    for (int t = 0; t < TN; ++t) axpy(scale[t * width + u], weight_t + (first + u) * embed + e, sums[t] + e, end - e);
}

// cols_kernel's several tokens with a float32 weight stored as its transpose [N, E]: each thread owns a share of
// output columns (no per-thread sums to add up), and within a block takes groups of up to 16 units that the same
// tokens keep by tiles of 4 tokens, reading and writing the tokens' sums once per group.
template <typename Threads>
void cols_by_unit(const Threads& threads, const float* h, const float* weight_t, const UnitOrder& order, float* out,
                  int64_t tokens, int64_t embed) {
  // the threads split the columns evenly, 64 at a time; each takes its share 256 columns at a time, so that a
  // block's slice of a group's weights stays in the L1 cache
  constexpr int64_t kTile = 64, kColumns = 256;
  const SlotsByUnit& by_unit = order.by_unit;
  const auto& groups = order.col_groups;
  const GroupInputs inputs(h, by_unit, groups);
  std::fill(out, out + tokens * embed, 0.0f);
  threads.range(0, (embed + kTile - 1) / kTile, 1, [&](int64_t begin, int64_t end) {
    float* sums[4];
    const int64_t last = std::min(embed, end * kTile);
    for (int64_t from = begin * kTile; from < last; from += kColumns) {
      const int64_t to = std::min(last, from + kColumns);
      for (size_t g = 0; g < groups.size(); ++g) {
        const auto [first, last] = groups[g];
        const int64_t count = by_unit.start[first + 1] - by_unit.start[first], width = last - first;
        for (int64_t j = 0; j < count; j += 4) {
          const int tile = static_cast<int>(std::min<int64_t>(4, count - j));
          for (int t = 0; t < tile; ++t) sums[t] = out + by_unit.token(first, j + t) * embed;
          const float* scale = inputs.scale.data() + inputs.offset[g] + j * width;
          switch (tile) {
            case 4: axpy_tile<4>(scale, weight_t, first, last, sums, from, to, embed); break;
            case 3: axpy_tile<3>(scale, weight_t, first, last, sums, from, to, embed); break;
            case 2: axpy_tile<2>(scale, weight_t, first, last, sums, from, to, embed); break;
            default: axpy_tile<1>(scale, weight_t, first, last, sums, from, to, embed); break;
          }
        }
      }
    }
  });
}

// out[t, i] = weight[rows[t, i]] . x[t] + bias[rows[t, i]], 0 where rows[t, i] is the empty slot N.
// x [T, E]; weight [N, E] row-contiguous; bias [N] or undefined; rows [T, k]. Returns [T, k] in float32. Several
// tokens read the selection by unit (`order`, given when tokens > 1).
template <typename W, typename Threads>
void rows_kernel(const Threads& threads, const float* x, const W* weight, const W* bias, const int64_t* rows,
                 const UnitOrder* order, float* out, int64_t tokens, int64_t kept, int64_t units, int64_t width) {
  if (tokens == 0) return;  // the paths below read a first token's selection
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  auto one_slot = [&](int64_t item, int64_t row) {
    const float b = bias ? static_cast<float>(bias[row]) : 0.0f;
    out[item] = dot(weight + row * width, x + (item / kept) * width, width) + b;
  };
  if (tokens > 1) {
    std::fill(out, out + tokens * kept, 0.0f);  // the empty slots
    if constexpr (std::is_same_v<W, float>) {
      rows_by_unit(threads, x, weight, bias, *order, out, width);
      return;
    }
    const SlotsByUnit& by_unit = order->by_unit;
    threads.range(0, units, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        for (int64_t j = by_unit.start[row]; j < by_unit.start[row + 1]; ++j) one_slot(by_unit.slot[j], row);
    });
    return;
  }
  threads.range(0, kept, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      if (rows[item] >= units)
        out[item] = 0.0f;
      else
        one_slot(item, rows[item]);
    }
  });
}

// out[t] = sum_i h[t, i] * weight[:, cols[t, i]] + bias, skipping the empty slot N. weight [E, N] is read as its
// transpose [N, E] when stored column-major (the layout the runtime prepares: a kept input is one contiguous run),
// else row by row, gathering each row's kept entries. Several tokens read the selection by unit (`order`, given
// when tokens > 1 and the weight is transposed).
template <typename W, typename Threads>
void cols_kernel(const Threads& threads, const float* h, const W* weight, const int64_t* cols, const UnitOrder* order,
                 float* out, int64_t tokens, int64_t kept, int64_t units, int64_t embed, bool transposed) {
  if (tokens == 0) return;  // the paths below read a first token's selection
  if constexpr (std::is_same_v<W, float>) {
    if (transposed && tokens > 1) {
      cols_by_unit(threads, h, weight, *order, out, tokens, embed);
      return;
    }
  }
  if (transposed) {
    // the kept inputs (several tokens: the units) split into parts, each adding whole contiguous weight rows into
    // its own [T, E] sum, so the weight streams in order; the parts' sums are added at the end. One token takes its
    // kept inputs in their order, several take them by unit: a kept input's weights are then read once for all the
    // tokens that keep it
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(embed, 1));
    const int64_t items = tokens > 1 ? units : kept;
    const int64_t parts = std::max<int64_t>(1, std::min(threads.count(), (items + grain - 1) / grain));
    std::vector<float> sums(static_cast<size_t>(parts * tokens * embed), 0.0f);
    threads.range(0, parts, 1, [&](int64_t first_part, int64_t end_part) {
      for (int64_t part = first_part; part < end_part; ++part) {
        const int64_t begin = items * part / parts, end = items * (part + 1) / parts;
        float* sum = sums.data() + part * tokens * embed;
        if (tokens > 1) {
          const SlotsByUnit& by_unit = order->by_unit;
          for (int64_t unit = begin; unit < end; ++unit)
            for (int64_t j = by_unit.start[unit]; j < by_unit.start[unit + 1]; ++j) {
              const int64_t item = by_unit.slot[j];
              axpy(h[item], weight + unit * embed, sum + (item / kept) * embed, embed);
            }
          continue;
        }
        auto add_one = [&](int64_t item) {
          if (cols[item] < units) axpy(h[item], weight + cols[item] * embed, sum, embed);
        };
        // four kept inputs at a time: their rows stream in while the sum is read and written once
        int64_t item = begin;
        for (; item + 4 <= end; item += 4) {
          const int64_t* four = cols + item;
          if (four[0] < units && four[1] < units && four[2] < units && four[3] < units)
            axpy4(h + item, weight + four[0] * embed, weight + four[1] * embed, weight + four[2] * embed,
                  weight + four[3] * embed, sum, embed);
          else
            for (int64_t one = item; one < item + 4; ++one) add_one(one);
        }
        for (; item < end; ++item) add_one(item);
      }
    });
    std::fill(out, out + tokens * embed, 0.0f);
    for (int64_t part = 0; part < parts; ++part) axpy(1.0f, sums.data() + part * tokens * embed, out, tokens * embed);
    return;
  }
  threads.range(0, tokens * embed, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t token = item / embed;
      const W* row = weight + (item % embed) * units;
      float sum = 0.0f;
      for (int64_t i = 0; i < kept; ++i) {
        const int64_t col = cols[token * kept + i];
        if (col < units) sum += h[token * kept + i] * static_cast<float>(row[col]);
      }
      out[item] = sum;
    }
  });
}

}  // namespace shadowfx_kernels
