// The fused CPU Lion step (lion8bit/reference.py, DESIGN.md §2), one pass over memory.
//
// Built once per machine by lion8bit/kernels/cpu_build.py and called through ctypes by
// lion8bit/kernels/cpu_lion.py. It must be bit-identical to reference.py, so:
// - compiled with -ffp-contract=off and without -ffast-math: the spec rounds both products of
//   beta1*m + (1-beta1)*g before the sum, and an FMA would change the last bit;
// - every fp32 operation of the reference is done here in the same order, on fp32 values, and
//   the requantizer returns exactly quant.nearest_codes.
//
// Work is split into chunks of whole absmax blocks, taken from a shared counter by up to
// `num_threads` std::threads. Within a chunk, STAGE elements at a time go through simple loops
// the compiler vectorizes (load and convert, the update, store and round), staged in fp32
// buffers in L1 where a dtype or the 8-bit format needs converting, in place for fp32 tensors.
// Where the compiler targets AVX-512, the 8-bit step of fp32 / bf16 tensors runs 16 lanes at a
// time in registers (step_8bit_vectors), codes are decoded by permutes and encoded by
// arithmetic on the codebook's decades (a binary search near thresholds); portable loops
// do the rest. Each element's param, grad and momentum are read once and written once.
//
// The pieces: cpu_lion_elements.h (descriptors, conversions, rounding, the scalar requantizer),
// cpu_lion_codec.h (the AVX-512 8-bit codec), cpu_lion_stages.h (stage loops and the update),
// cpu_lion_vectors.h (the AVX-512 8-bit step), cpu_lion_nibbles.h (the 4-bit format: its stages
// and its AVX-512 step); this file splits the work across threads and holds the two entry points.

#include <atomic>
#include <thread>
#include <vector>

#include "cpu_lion_elements.h"
#include "cpu_lion_stages.h"
#include "cpu_lion_nibbles.h"
#include "cpu_lion_vectors.h"

namespace {

// load_momentum (cpu_lion_stages.h) for every format, "4bit" included.
inline void load_any_momentum(float* out, const int64_t* d, const Options& o, int64_t start, int64_t n,
                              const Tables& t) {
  if (d[FORMAT] != Q4) return load_momentum(out, d, o, start, n, t);
  decode_4bit(out, reinterpret_cast<const uint8_t*>(d[MOMENTUM_PTR]),
              reinterpret_cast<const uint16_t*>(d[ABSMAX_PTR]), start, n);
}

// Items of whole blocks (whole stages) covering every tensor.
std::vector<Item> items_of(const int64_t* tensors, int64_t count, int64_t chunk) {
  std::vector<Item> items;
  for (int64_t k = 0; k < count; ++k) {
    int64_t numel = tensors[k * FIELDS + NUMEL];
    for (int64_t start = 0; start < numel; start += chunk)
      items.push_back({k, start, std::min(numel, start + chunk)});
  }
  return items;
}

// Runs work(item, buffers) for every item on up to num_threads threads (this one included),
// one thread per CHUNK elements at most: starting a thread costs ~50 us, the work of 15K elements.
template <typename Work>
void run_parallel(const std::vector<Item>& items, int64_t num_threads, int64_t stage, Work work) {
  int64_t elements = 0;
  for (const Item& item : items) elements += item.end - item.start;
  num_threads = std::min(num_threads, std::max<int64_t>(1, elements / CHUNK));
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    std::vector<float> buffers(4 * stage);
    for (int64_t i = next.fetch_add(1); i < static_cast<int64_t>(items.size()); i = next.fetch_add(1))
      work(items[i], buffers.data());
  };
  int64_t spawned = std::max<int64_t>(0, std::min<int64_t>(num_threads, items.size()) - 1);
  std::vector<std::thread> threads;
  threads.reserve(spawned);
  for (int64_t k = 0; k < spawned; ++k) threads.emplace_back(worker);
  worker();
  for (auto& thread : threads) thread.join();
}

Options options_of(const float* scalars, int64_t flags, int64_t block_size) {
  Options o;
  o.beta1 = scalars[BETA1];
  o.one_minus_beta1 = scalars[ONE_MINUS_BETA1];
  o.beta2 = scalars[BETA2];
  o.one_minus_beta2 = scalars[ONE_MINUS_BETA2];
  o.decay = scalars[DECAY];
  o.lr = scalars[LR];
  o.maximize = flags & MAXIMIZE;
  o.masked_dont_move = flags & MASKED_DONT_MOVE;
  o.cautious_weight_decay = flags & CAUTIOUS_WEIGHT_DECAY;
  o.stochastic = flags & STOCHASTIC;
  o.block_size = block_size;
  o.stage = std::max(block_size, STAGE);  // both powers of two: whole blocks per stage
  return o;
}

// The key in `field` of row d: the key itself, or with KEY_STEP >= 0 reference.rounding_keys
// from its base, mix32(base ^ (step mod 2**32)). lion8bit/plans.py steps a keyed group so, with
// no per-tensor Python for its keys: a 4-bit group of 300 tensors of 64 elements took 11.0 us
// per tensor per step on the full path, 2.8 planned (the 8-bit group: 2.4; one thread).
int64_t rounding_key(const int64_t* d, Field field) {
  const int64_t key = d[field];
  if (key < 0 || d[KEY_STEP] < 0) return key;
  return mix32(static_cast<uint32_t>(key) ^ static_cast<uint32_t>(d[KEY_STEP]));
}

}  // namespace

extern "C" {

// One Lion step for `count` tensors, in place. `steps` ([count, 2] fp32: step where aligned,
// where not) comes from the cautious pre-pass, or is NULL without caution (both = lr).
int64_t lion8bit_cpu_step(const int64_t* tensors, int64_t count, const float* steps,
                          const float* scalars, int64_t flags, int64_t block_size,
                          const float* codebook, const float* levels, int64_t num_threads) {
  const Options o = options_of(scalars, flags, block_size);
#if defined(__AVX512F__)
  const CodecTables codec(codebook, levels);  // ~1 us: once per call
  const Tables t{codebook, levels, &codec};
#else
  const Tables t{codebook, levels};
#endif
  const int64_t chunk = std::max(o.stage, CHUNK);
  auto items = items_of(tensors, count, chunk);
  run_parallel(items, num_threads, o.stage, [&](const Item& item, float* buffers) {
    const int64_t* d = tensors + item.tensor * FIELDS;
    float* p = buffers;
    float* m = buffers + o.stage;
    float* g = buffers + 2 * o.stage;
    float* inverses = buffers + 3 * o.stage;
    float aligned_step = steps ? steps[2 * item.tensor] : o.lr;
    float misaligned_step = steps ? steps[2 * item.tensor + 1] : o.lr;
    void* param = reinterpret_cast<void*>(d[PARAM_PTR]);
    void* momentum = reinterpret_cast<void*>(d[MOMENTUM_PTR]);
    int64_t param_key = o.stochastic ? rounding_key(d, PARAM_KEY) : -1;
    int64_t momentum_key = o.stochastic ? rounding_key(d, MOMENTUM_KEY) : -1;
    const bool cautious = steps != nullptr;
    int64_t staged_from = item.start;
#if defined(__AVX512F__)
    if (d[FORMAT] == Q8 && o.block_size >= 16 && !(param_key >= 0 && d[PARAM_DTYPE] == F16)) {
      // Whole blocks here; a tensor's partial last block goes through the stages below.
      staged_from = item.start + (item.end - item.start) / o.block_size * o.block_size;
      step_8bit_vectors(d, o, t, item.start, staged_from, cautious, aligned_step, misaligned_step,
                        param_key, buffers);
    }
    if (d[FORMAT] == Q4 && !(param_key >= 0 && d[PARAM_DTYPE] == F16)) {
      staged_from = item.start + (item.end - item.start) / BLOCK_4BIT * BLOCK_4BIT;
      step_4bit_vectors(d, o, item.start, staged_from, cautious, aligned_step, misaligned_step,
                        param_key, momentum_key);
    }
#endif
    // fp32 params, grads and momentum are updated where they are (saves 0.2 of ~1.5 ns per
    // element in copies); other dtypes and formats go through the stage buffers.
    const bool param_in_place = d[PARAM_DTYPE] == F32, momentum_in_place = d[FORMAT] == MOMENTUM_F32;
    const bool grad_in_place = d[GRAD_DTYPE] == F32 && !o.maximize;
    for (int64_t start = staged_from; start < item.end; start += o.stage) {
      int64_t n = std::min(o.stage, item.end - start);
      float* ps = param_in_place ? static_cast<float*>(param) + start : p;
      float* ms = momentum_in_place ? static_cast<float*>(momentum) + start : m;
      const float* gs = grad_in_place ? reinterpret_cast<const float*>(d[GRAD_PTR]) + start : g;
      if (!grad_in_place) load_grad(g, d, o, start, n);
      if (!momentum_in_place) load_any_momentum(m, d, o, start, n, t);
      if (!param_in_place) load(p, param, d[PARAM_DTYPE], start, n);
      update(ps, ms, gs, n, o, cautious, aligned_step, misaligned_step);
      if (!param_in_place) store(p, param, d[PARAM_DTYPE], start, n, param_key, d[ELEMENT_OFFSET]);
      if (d[FORMAT] == Q8) {
        encode_8bit(m, static_cast<uint8_t*>(momentum), reinterpret_cast<float*>(d[ABSMAX_PTR]),
                    inverses, o.block_size, start, n, t);
      } else if (d[FORMAT] == Q4) {
        encode_4bit(m, static_cast<uint8_t*>(momentum), reinterpret_cast<uint16_t*>(d[ABSMAX_PTR]),
                    start, n, momentum_key, d[ELEMENT_OFFSET]);
      } else if (!momentum_in_place) {
        store(m, momentum, BF16, start, n, momentum_key, d[ELEMENT_OFFSET]);
      }
    }
  });
  return 0;
}

// The cautious pre-pass: per tensor, #{u * g > 0} into counts[count] (reads momentum and grad).
int64_t lion8bit_cpu_aligned_counts(const int64_t* tensors, int64_t count, const float* scalars,
                                    int64_t flags, int64_t block_size, const float* codebook,
                                    int64_t* counts, int64_t num_threads) {
  const Options o = options_of(scalars, flags, block_size);
  const Tables t{codebook, nullptr};
  const int64_t chunk = std::max(o.stage, CHUNK);
  auto items = items_of(tensors, count, chunk);
  const float beta1 = o.beta1, one_minus_beta1 = o.one_minus_beta1;
  std::vector<std::atomic<int64_t>> totals(count);
  for (auto& total : totals) total.store(0);
  run_parallel(items, num_threads, o.stage, [&](const Item& item, float* buffers) {
    const int64_t* d = tensors + item.tensor * FIELDS;
    float* m = buffers + o.stage;
    float* g = buffers + 2 * o.stage;
    int64_t aligned = 0;
    for (int64_t start = item.start; start < item.end; start += o.stage) {
      int64_t n = std::min(o.stage, item.end - start);
      load_grad(g, d, o, start, n);
      load_any_momentum(m, d, o, start, n, t);
      int64_t stage_aligned = 0;
      const float* __restrict gs = g;
      const float* __restrict ms = m;
      for (int64_t i = 0; i < n; ++i) {
        float c = ms[i] * beta1 + gs[i] * one_minus_beta1;
        stage_aligned += sign(c) * gs[i] > 0;
      }
      aligned += stage_aligned;
    }
    totals[item.tensor].fetch_add(aligned);
  });
  for (int64_t k = 0; k < count; ++k) counts[k] = totals[k].load();
  return 0;
}

}  // extern "C"
