// Element-level pieces of the fused CPU step (lion8bit/kernels/cpu_lion.cpp): the descriptor
// layout, the scalar conversions and rounding of lion8bit/quant.py, and the scalar requantizer.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

// Param, grad and dense momentum storage dtypes.
enum DType : int64_t { F32 = 0, BF16 = 1, F16 = 2 };
// Momentum formats (lion8bit.momentum): "8bit", "bf16", "fp32", "4bit" (cpu_lion_nibbles.h).
enum Format : int64_t { Q8 = 0, MOMENTUM_BF16 = 1, MOMENTUM_F32 = 2, Q4 = 3 };
// Fields of one tensor's descriptor row (int64), written by cpu_lion.py. The keys are uint32, or
// -1 for none; with KEY_STEP >= 0 they are reference.rounding_key_bases and the step's keys are
// made from them here (rounding_key, cpu_lion.cpp).
enum Field : int64_t {
  PARAM_PTR, GRAD_PTR, MOMENTUM_PTR, ABSMAX_PTR, NUMEL,
  PARAM_DTYPE, GRAD_DTYPE, FORMAT, PARAM_KEY, MOMENTUM_KEY, ELEMENT_OFFSET, KEY_STEP, FIELDS
};
// Step scalars (fp32, rounded once by the host as torch rounds a Python float operand).
enum Scalar : int64_t { BETA1, ONE_MINUS_BETA1, BETA2, ONE_MINUS_BETA2, DECAY, LR, SCALARS };
// Option flags.
enum Flag : int64_t { MAXIMIZE = 1, MASKED_DONT_MOVE = 2, CAUTIOUS_WEIGHT_DECAY = 4, STOCHASTIC = 8 };

// Elements staged in fp32 between loops: 4 buffers x 4 KiB stay in a 48 KiB L1d.
constexpr int64_t STAGE = 1024;
// quant.SUBNORMAL_ABSMAX (the smallest normal fp32, 2**-126) and quant.SUBNORMAL_SCALE.
constexpr float SUBNORMAL_ABSMAX = std::numeric_limits<float>::min();
constexpr float SUBNORMAL_SCALE = 16777216.0f;
// Elements per unit of work a thread takes (at least one stage): 64K elements are ~0.1 ms of
// work, so the shared counter is touched rarely, and two threads finish within one chunk of each
// other on a large tensor.
constexpr int64_t CHUNK = 1 << 16;

// The requantizer's search tables (built by cpu_lion.py, requantizer_levels): the 128 positive
// decision thresholds of lion8bit.quant, rounded down to fp32, as the 7 levels of a binary
// search. Level k holds the 2**k thresholds a search can compare with at that level, at
// LEVEL_OFFSET[k] (levels 0-4 padded to 16 floats, one AVX-512 register each). The 7 levels
// count the lower 127 thresholds; the top one (0.9965, between 0.993 and 1.0), at TOP, is one
// more comparison.
constexpr int LEVELS = 7;
constexpr int LEVEL_OFFSET[LEVELS] = {0, 16, 32, 48, 64, 80, 112};
constexpr int TOP = 1;

struct CodecTables;  // cpu_lion_codec.h

struct Tables {
  const float* codebook;  // [256] code values
  const float* levels;    // [176] search levels, or NULL where nothing is requantized
  const CodecTables* codec = nullptr;  // byte planes and the requantizer's arithmetic path
};

struct Options {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, decay, lr;
  bool maximize, masked_dont_move, cautious_weight_decay, stochastic;
  int64_t block_size, stage;
};

struct Item {
  int64_t tensor, start, end;
};

inline uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

inline float bits_float(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

// lowbias32, exactly lion8bit.quant.mix32 in uint32 arithmetic.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// torch's fp32 -> bf16: round to nearest even; NaN -> 0xFFFF, as ATen's vectorized conversion
// writes it (torch 2.13, AVX2 and AVX-512; its scalar c10 path writes 0x7FC0).
inline uint16_t bf16_nearest(float x) {
  uint32_t b = float_bits(x);
  uint16_t rounded = static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
  return x != x ? 0xFFFF : rounded;
}

// lion8bit.quant.round_to_bf16 with bits: add the top 16 random bits below the kept bits.
inline uint16_t bf16_stochastic(float x, uint32_t random) {
  uint32_t b = float_bits(x);
  bool finite = (b & 0x7F800000u) != 0x7F800000u;
  return finite ? static_cast<uint16_t>((b + (random >> 16)) >> 16) : bf16_nearest(x);
}

// fp16 <-> fp32 with integer and exact fp32 operations (GCC 12 does not vectorize _Float16
// conversions): bit-identical to torch's (round to nearest even), NaN payloads included.
inline float fp16_to_float(uint16_t h) {
  uint32_t magnitude = static_cast<uint32_t>(h & 0x7FFFu) << 13;  // exponent bias 15 -> 127 - 112
  // x 2**112 rebiases normal halves and makes subnormal ones (fp32 denormals here) normal: exact.
  uint32_t finite = float_bits(bits_float(magnitude) * 0x1p112f);
  uint32_t bits = magnitude >= (0x7C00u << 13) ? (magnitude | 0x7F800000u) : finite;
  return bits_float(bits | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

inline uint16_t fp16_nearest(float x) {
  uint32_t b = float_bits(x);
  uint32_t magnitude = b & 0x7FFFFFFFu;
  uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  // Normal halves (|x| >= 2**-14): rebias the exponent, round the 13 dropped bits to nearest
  // even; a carry moves into the exponent, and at 65520 and above reaches infinity (0x7C00).
  uint32_t normal = (magnitude - (112u << 23) + 0xFFFu + ((magnitude >> 13) & 1u)) >> 13;
  normal = normal > 0x7C00u ? 0x7C00u : normal;
  // Subnormal halves: |x| + 0.5 rounds |x| to a multiple of 2**-24 (the ulp of 0.5, and the
  // subnormal half step) in fp32's own round-to-nearest-even; its low bits count the steps.
  uint32_t subnormal = float_bits(bits_float(magnitude) + 0.5f) - float_bits(0.5f);
  uint32_t rounded = magnitude < (113u << 23) ? subnormal : normal;
  // NaN: quiet, with the top 10 payload bits, as vcvtps2ph (torch's conversion) keeps them.
  rounded = magnitude > 0x7F800000u ? 0x7E00u | ((magnitude >> 13) & 0x3FFu) : rounded;
  return static_cast<uint16_t>(rounded) | sign;
}

// lion8bit.quant.round_to_fp16 with bits: pick the neighbour away from zero with probability
// (|x| - |low|) / (|high| - |low|), every operation in fp32 as there.
inline uint16_t fp16_stochastic(float x, uint32_t random) {
  uint16_t nearest = fp16_nearest(x);
  float nearest_magnitude = fp16_to_float(nearest & 0x7FFFu);
  float magnitude = bits_float(float_bits(x) & 0x7FFFFFFFu);
  // fp16 is sign-magnitude: +-1 on the pattern steps the magnitude by one ulp.
  uint16_t other = static_cast<uint16_t>(magnitude > nearest_magnitude ? nearest + 1 : nearest - 1);
  float other_magnitude = fp16_to_float(other & 0x7FFFu);
  float low = other_magnitude < nearest_magnitude ? other_magnitude : nearest_magnitude;
  float high = other_magnitude < nearest_magnitude ? nearest_magnitude : other_magnitude;
  float fraction = (magnitude - low) / (high - low);
  float uniform = static_cast<float>(random >> 8) * 0x1p-24f;
  float chosen = uniform < fraction ? high : low;
  uint16_t stochastic = fp16_nearest(chosen) | (nearest & 0x8000u);  // chosen is an fp16 value
  bool keep = (nearest_magnitude == magnitude) | ((nearest & 0x7C00u) == 0x7C00u);
  return keep ? nearest : stochastic;
}

// lion8bit.quant.nearest_codes, from n = #{positive thresholds t : t < |x|} (0..128; exact,
// since for fp32 a and float64 t, t < a iff rounddown_fp32(t) < a): the codebook is symmetric
// below 1.0, so the nearest code is 127 + n for x > 0 and 127 - n for x < 0, where the strict <
// keeps a tie on the code nearer zero on both sides. The sign rule makes n at least 1, and -1.0
// is not a code, so n is at most 127 for x < 0. NaN sorts last in searchsorted: code 255.
inline uint8_t code_of(int32_t n, uint32_t x_bits) {
  uint32_t magnitude_bits = x_bits & 0x7FFFFFFFu;
  n = n < 1 ? 1 : n;
  int32_t negative = 127 - (n > 127 ? 127 : n);
  int32_t code = (x_bits >> 31) ? negative : 127 + n;
  code = magnitude_bits == 0 ? 127 : code;
  return static_cast<uint8_t>(magnitude_bits > 0x7F800000u ? 255 : code);
}

// n of |x| by the binary search of the levels: at level k, n's top k bits are known.
inline uint8_t nearest_code(float x, const float* __restrict levels) {
  uint32_t x_bits = float_bits(x);
  float magnitude = bits_float(x_bits & 0x7FFFFFFFu);
  int32_t n = 0;
  for (int k = 0; k < LEVELS; ++k) n = 2 * n + (magnitude > levels[LEVEL_OFFSET[k] + n]);
  return code_of(n + (magnitude > levels[TOP]), x_bits);
}

// fp32 values of elements [start, start + n) of a param / grad / dense momentum.
inline void load(float* __restrict out, const void* base, int64_t dtype, int64_t start, int64_t n) {
  if (dtype == F32) {
    std::memcpy(out, static_cast<const float*>(base) + start, n * sizeof(float));
  } else if (dtype == BF16) {
    const uint16_t* __restrict in = static_cast<const uint16_t*>(base) + start;
    for (int64_t i = 0; i < n; ++i) out[i] = bits_float(static_cast<uint32_t>(in[i]) << 16);
  } else {
    const uint16_t* __restrict in = static_cast<const uint16_t*>(base) + start;
    for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_float(in[i]);
  }
}

// Round fp32 values to storage at elements start .. start+n-1; `key` >= 0 rounds bf16 / fp16
// stochastically with the random bits of lion8bit.quant.random_bits(key, ...) for the flat
// indices offset+start ... of the whole tensor (`offset`: where this tensor starts in it).
template <typename Round>
inline void round_run(const float* __restrict in, uint16_t* __restrict out, int64_t n, int64_t index,
                      int64_t key, Round round) {
  uint32_t element_key = mix32(static_cast<uint32_t>(key) ^ static_cast<uint32_t>(index >> 32));
  uint32_t low = static_cast<uint32_t>(index);
  for (int64_t i = 0; i < n; ++i) out[i] = round(in[i], mix32((low + static_cast<uint32_t>(i)) ^ element_key));
}

template <typename Round>
inline void round_stochastic(const float* in, uint16_t* out, int64_t n, int64_t index, int64_t key, Round round) {
  // The element key changes where the flat index crosses a multiple of 2**32: at most once here.
  const int64_t boundary = ((index >> 32) + 1) << 32;
  const int64_t first = std::min(n, boundary - index);
  round_run(in, out, first, index, key, round);
  if (first < n) round_run(in + first, out + first, n - first, index + first, key, round);
}

inline void store(const float* __restrict in, void* base, int64_t dtype, int64_t start, int64_t n,
                  int64_t key, int64_t offset) {
  if (dtype == F32) {
    std::memcpy(static_cast<float*>(base) + start, in, n * sizeof(float));
    return;
  }
  uint16_t* __restrict out = static_cast<uint16_t*>(base) + start;
  if (dtype == BF16) {
    if (key < 0) {
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_nearest(in[i]);
    } else {
      round_stochastic(in, out, n, offset + start, key, bf16_stochastic);
    }
  } else {
    if (key < 0) {
      for (int64_t i = 0; i < n; ++i) out[i] = fp16_nearest(in[i]);
    } else {
      round_stochastic(in, out, n, offset + start, key, fp16_stochastic);
    }
  }
}

}  // namespace
