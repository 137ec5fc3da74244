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
// time in registers (step_8bit_vectors) and (de)quantization uses permutes; portable loops
// do the rest. Each element's param, grad and momentum are read once and written once.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Param, grad and dense momentum storage dtypes.
enum DType : int64_t { F32 = 0, BF16 = 1, F16 = 2 };
// Momentum formats (lion8bit.momentum): "8bit", "bf16", "fp32".
enum Format : int64_t { Q8 = 0, MOMENTUM_BF16 = 1, MOMENTUM_F32 = 2 };
// Fields of one tensor's descriptor row (int64), written by cpu_lion.py.
enum Field : int64_t {
  PARAM_PTR, GRAD_PTR, MOMENTUM_PTR, ABSMAX_PTR, NUMEL,
  PARAM_DTYPE, GRAD_DTYPE, FORMAT, PARAM_KEY, MOMENTUM_KEY, FIELDS
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

struct Tables {
  const float* codebook;  // [256] code values
  const float* levels;    // [176] search levels
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

// Round fp32 values to storage; `key` >= 0 rounds bf16 / fp16 stochastically with the random
// bits of lion8bit.quant.random_bits(key, ...) for flat indices start ...
inline void store(const float* __restrict in, void* base, int64_t dtype, int64_t start, int64_t n,
                  int64_t key) {
  if (dtype == F32) {
    std::memcpy(static_cast<float*>(base) + start, in, n * sizeof(float));
    return;
  }
  uint16_t* __restrict out = static_cast<uint16_t*>(base) + start;
  // Stages are aligned runs of a power-of-two size, so they never straddle a 2**32 boundary.
  uint32_t element_key = mix32(static_cast<uint32_t>(key) ^ static_cast<uint32_t>(start >> 32));
  uint32_t low = static_cast<uint32_t>(start);
  if (dtype == BF16) {
    if (key < 0) {
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_nearest(in[i]);
    } else {
      for (int64_t i = 0; i < n; ++i)
        out[i] = bf16_stochastic(in[i], mix32((low + static_cast<uint32_t>(i)) ^ element_key));
    }
  } else {
    if (key < 0) {
      for (int64_t i = 0; i < n; ++i) out[i] = fp16_nearest(in[i]);
    } else {
      for (int64_t i = 0; i < n; ++i)
        out[i] = fp16_stochastic(in[i], mix32((low + static_cast<uint32_t>(i)) ^ element_key));
    }
  }
}

#if defined(__AVX512F__)
// The codebook and the requantizer's search levels in registers, and 16 lanes at a time of
// the two table operations. No gathers: they are microcoded on CPUs with the Gather Data
// Sampling mitigation, and measured no faster here (0.16 vs 0.22 ns per element).
struct Registers {
  __m512 codebook[16];  // 8 pairs: two-source permutes pick within 32 values
  __m512 level0, level1, level2, level3, level4, level5a, level5b, level6a, level6b, level6c,
      level6d, top;

  explicit Registers(const Tables& t) {
    for (int k = 0; k < 16; ++k) codebook[k] = _mm512_loadu_ps(t.codebook + 16 * k);
    const float* levels = t.levels;
    level0 = _mm512_set1_ps(levels[LEVEL_OFFSET[0]]);
    level1 = _mm512_loadu_ps(levels + LEVEL_OFFSET[1]);
    level2 = _mm512_loadu_ps(levels + LEVEL_OFFSET[2]);
    level3 = _mm512_loadu_ps(levels + LEVEL_OFFSET[3]);
    level4 = _mm512_loadu_ps(levels + LEVEL_OFFSET[4]);
    level5a = _mm512_loadu_ps(levels + LEVEL_OFFSET[5]);
    level5b = _mm512_loadu_ps(levels + LEVEL_OFFSET[5] + 16);
    level6a = _mm512_loadu_ps(levels + LEVEL_OFFSET[6]);
    level6b = _mm512_loadu_ps(levels + LEVEL_OFFSET[6] + 16);
    level6c = _mm512_loadu_ps(levels + LEVEL_OFFSET[6] + 32);
    level6d = _mm512_loadu_ps(levels + LEVEL_OFFSET[6] + 48);
    top = _mm512_set1_ps(levels[TOP]);
  }
};

// Code values of 16 codes: index bits 5-7 choose the register pair.
inline __m512 code_values(const uint8_t* codes, const Registers& r) {
  __m512i index = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  __mmask16 b5 = _mm512_test_epi32_mask(index, _mm512_set1_epi32(32)),
            b6 = _mm512_test_epi32_mask(index, _mm512_set1_epi32(64)),
            b7 = _mm512_test_epi32_mask(index, _mm512_set1_epi32(128));
  const __m512* t = r.codebook;
  __m512 v0 = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(t[0], index, t[1]), _mm512_permutex2var_ps(t[2], index, t[3]));
  __m512 v1 = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(t[4], index, t[5]), _mm512_permutex2var_ps(t[6], index, t[7]));
  __m512 v2 = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(t[8], index, t[9]), _mm512_permutex2var_ps(t[10], index, t[11]));
  __m512 v3 = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(t[12], index, t[13]), _mm512_permutex2var_ps(t[14], index, t[15]));
  return _mm512_mask_blend_ps(b7, _mm512_mask_blend_ps(b6, v0, v1), _mm512_mask_blend_ps(b6, v2, v3));
}

// One search level: n = 2n + (|x| > threshold).
inline __m512i descend(__m512i n, __m512 magnitude, __m512 threshold) {
  __m512i twice = _mm512_add_epi32(n, n);
  return _mm512_mask_add_epi32(twice, _mm512_cmp_ps_mask(magnitude, threshold, _CMP_GT_OQ), twice,
                               _mm512_set1_epi32(1));
}

// nearest_code of 16 values: levels 0-4 by one-register permutes, level 5 by a two-source
// permute, level 6 by two and a blend (0.5 ns per element measured, against 0.9 for an
// exponent-keyed table with gathers and neighbour checks).
inline __m128i nearest_codes16(__m512 value, const Registers& r) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512i bits = _mm512_castps_si512(value);
  __m512i magnitude_bits = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
  __m512 magnitude = _mm512_castsi512_ps(magnitude_bits);
  __m512i n = _mm512_setzero_si512();
  n = descend(n, magnitude, r.level0);
  n = descend(n, magnitude, _mm512_permutexvar_ps(n, r.level1));
  n = descend(n, magnitude, _mm512_permutexvar_ps(n, r.level2));
  n = descend(n, magnitude, _mm512_permutexvar_ps(n, r.level3));
  n = descend(n, magnitude, _mm512_permutexvar_ps(n, r.level4));
  n = descend(n, magnitude, _mm512_permutex2var_ps(r.level5a, n, r.level5b));
  n = descend(n, magnitude, _mm512_mask_blend_ps(_mm512_test_epi32_mask(n, _mm512_set1_epi32(32)),
                                                 _mm512_permutex2var_ps(r.level6a, n, r.level6b),
                                                 _mm512_permutex2var_ps(r.level6c, n, r.level6d)));
  n = _mm512_mask_add_epi32(n, _mm512_cmp_ps_mask(magnitude, r.top, _CMP_GT_OQ), n, one);
  // code_of, lane-wise, in integer arithmetic (no compares: they all queue for port 5 with the
  // permutes). n = max(n, 1) for x != 0 (the sign rule), 0 for x = 0; 127 +- n by the sign, at
  // least 0; all ones (255 once packed) for NaN.
  __m512i negative = _mm512_srai_epi32(bits, 31);
  n = _mm512_max_epi32(n, _mm512_min_epu32(magnitude_bits, one));
  __m512i code = _mm512_add_epi32(_mm512_sub_epi32(_mm512_xor_si512(n, negative), negative),
                                  _mm512_set1_epi32(127));
  code = _mm512_max_epi32(code, _mm512_setzero_si512());
  code = _mm512_or_si512(code, _mm512_srai_epi32(_mm512_sub_epi32(_mm512_set1_epi32(0x7F800000), magnitude_bits), 31));
  return _mm512_cvtepi32_epi8(code);
}
#endif

// Dequantize: code value * absmax of its block (one fp32 multiply, quant.dequantize_blockwise).
// Element i's block is i >> shift (blocks of 16 or more never split a 16-lane vector).
inline void dequantize(float* __restrict out, const uint8_t* __restrict codes, int64_t count,
                       const float* __restrict scales, int shift, const Tables& t) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const int64_t vectors = shift < 4 ? 0 : count;  // blocks under 16 elements: the scalar loop
  const Registers r(t);
  for (; i + 16 <= vectors; i += 16)
    _mm512_storeu_ps(out + i, _mm512_mul_ps(code_values(codes + i, r), _mm512_set1_ps(scales[i >> shift])));
#endif
  for (; i < count; ++i) out[i] = t.codebook[codes[i]] * scales[i >> shift];
}

// Codes of x * inverse: nearest code, ties toward zero, the sign rule (quant.nearest_codes).
// Element i's inverse is inverses[i >> shift].
inline void quantize(const float* __restrict x, uint8_t* __restrict out, int64_t count,
                     const float* __restrict inverses, int shift, const Tables& t) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const int64_t vectors = shift < 4 ? 0 : count;  // blocks under 16 elements: the scalar loop
  const Registers r(t);
  for (; i + 16 <= vectors; i += 16) {
    __m512 value = _mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(inverses[i >> shift]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), nearest_codes16(value, r));
  }
#endif
  for (; i < count; ++i) out[i] = nearest_code(x[i] * inverses[i >> shift], t.levels);
}

inline int log2(int64_t power_of_two) { return __builtin_ctzll(static_cast<uint64_t>(power_of_two)); }

// A stage of codes (whole blocks from `start`, a multiple of block_size) to fp32 values.
inline void decode_8bit(float* out, const uint8_t* codes, const float* absmax, int64_t block_size,
                        int64_t start, int64_t n, const Tables& t) {
  dequantize(out, codes + start, n, absmax + start / block_size, log2(block_size), t);
}

// quant.SUBNORMAL_ABSMAX / SUBNORMAL_SCALE: a block whose absmax is subnormal is normalized as
// (x * 2**24) * (1 / (absmax * 2**24)), since 1/absmax would overflow to inf (0 * inf = NaN).
// It scales the block in place (exact: a power of two); returns the scaled absmax. Rare: only
// momentum that decayed below 2**-126.
inline float scale_subnormal_block(float* x, int64_t count, float peak) {
  if (!(peak > 0 && peak < SUBNORMAL_ABSMAX)) return peak;
  for (int64_t i = 0; i < count; ++i) x[i] *= SUBNORMAL_SCALE;
  return peak * SUBNORMAL_SCALE;
}

// A stage of whole blocks: absmax, x * (1/absmax), nearest codes (quant.quantize_blockwise).
// `inverses` has room for one float per block; `in` (a stage buffer) is scaled in place where
// a block's absmax is subnormal.
inline void encode_8bit(float* in, uint8_t* codes, float* absmax, float* inverses,
                        int64_t block_size, int64_t start, int64_t n, const Tables& t) {
  for (int64_t b = 0, block = 0; b < n; b += block_size, ++block) {
    int64_t count = std::min(block_size, n - b);
    float* __restrict x = in + b;
    // max |x| on the bit patterns: for non-negative floats integer order is float order, and a
    // NaN (above +inf) propagates as in torch.amax.
    uint32_t peak_bits = 0;
    for (int64_t i = 0; i < count; ++i) {
      uint32_t bits = float_bits(x[i]) & 0x7FFFFFFFu;
      peak_bits = bits > peak_bits ? bits : peak_bits;
    }
    float peak = bits_float(peak_bits);
    absmax[start / block_size + block] = peak;
    peak = scale_subnormal_block(x, count, peak);
    inverses[block] = peak > 0 ? 1.0f / peak : 0.0f;
  }
  quantize(in, codes + start, n, inverses, log2(block_size), t);
}

inline void load_momentum(float* out, const int64_t* d, const Options& o, int64_t start, int64_t n,
                          const Tables& t) {
  const void* momentum = reinterpret_cast<const void*>(d[MOMENTUM_PTR]);
  if (d[FORMAT] == Q8) {
    decode_8bit(out, static_cast<const uint8_t*>(momentum),
                reinterpret_cast<const float*>(d[ABSMAX_PTR]), o.block_size, start, n, t);
  } else {
    load(out, momentum, d[FORMAT] == MOMENTUM_BF16 ? BF16 : F32, start, n);
  }
}

inline void load_grad(float* __restrict out, const int64_t* d, const Options& o, int64_t start,
                      int64_t n) {
  load(out, reinterpret_cast<const void*>(d[GRAD_PTR]), d[GRAD_DTYPE], start, n);
  if (o.maximize)
    for (int64_t i = 0; i < n; ++i) out[i] = -out[i];
}

// torch.sign in fp32: +-1 with the sign of c, and 0 for +-0 and NaN.
inline float sign(float c) {
  float unit = bits_float((float_bits(c) & 0x80000000u) | 0x3F800000u);
  return (c > 0) | (c < 0) ? unit : 0.0f;
}

// The update of reference.lion_update on staged fp32 values, in place on p and m. Specialized
// on caution and cautious weight decay: without them the loop is half as long (0.2 vs 0.35 ns
// per element measured), and the selects they add change nothing (both steps are lr, and the
// decay applies everywhere).
template <bool CAUTIOUS, bool CAUTIOUS_WEIGHT_DECAY>
void update(float* __restrict p, float* __restrict m, const float* __restrict g, int64_t n,
            const Options& o, float aligned_step, float misaligned_step) {
  const float beta1 = o.beta1, one_minus_beta1 = o.one_minus_beta1, beta2 = o.beta2,
              one_minus_beta2 = o.one_minus_beta2, decay = o.decay;
  const bool everyone_moves = !o.masked_dont_move;
  for (int64_t i = 0; i < n; ++i) {
    float c = m[i] * beta1 + g[i] * one_minus_beta1;
    float u = sign(c);
    float step = aligned_step, direction = u;
    if (CAUTIOUS) {
      bool aligned = u * g[i] > 0;
      step = aligned ? aligned_step : misaligned_step;
      direction = (aligned | everyone_moves) ? u : 0.0f;
    }
    float decayed = p[i] * decay;  // decay is exactly 1 without weight decay: p * 1 == p
    if (CAUTIOUS_WEIGHT_DECAY) decayed = direction * p[i] >= 0 ? decayed : p[i];
    p[i] = decayed - u * step;
    m[i] = m[i] * beta2 + g[i] * one_minus_beta2;
  }
}

void update(float* __restrict p, float* __restrict m, const float* __restrict g, int64_t n, const Options& o, bool cautious,
            float aligned_step, float misaligned_step) {
  if (cautious && o.cautious_weight_decay) return update<true, true>(p, m, g, n, o, aligned_step, misaligned_step);
  if (cautious) return update<true, false>(p, m, g, n, o, aligned_step, misaligned_step);
  if (o.cautious_weight_decay) return update<false, true>(p, m, g, n, o, aligned_step, misaligned_step);
  return update<false, false>(p, m, g, n, o, aligned_step, misaligned_step);
}

#if defined(__AVX512F__)
// 16 fp32 values of an fp32 or bf16 tensor from element i.
inline __m512 load16(const void* base, int64_t dtype, int64_t i) {
  if (dtype == F32) return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// mix32 on 16 lanes.
inline __m512i mix32_16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7FEB352D));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int32_t>(0x846CA68Bu)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// Store 16 values to an fp32 or bf16 tensor at element i: bf16_nearest, or bf16_stochastic with
// these random bits.
inline void store16(void* base, int64_t dtype, int64_t i, __m512 x, bool stochastic, __m512i random) {
  if (dtype == F32) return _mm512_storeu_ps(static_cast<float*>(base) + i, x);
  const __m512i bits = _mm512_castps_si512(x), one = _mm512_set1_epi32(1);
  __m512i half = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(bits, 16), one))), 16);
  half = _mm512_mask_mov_epi32(half, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
  if (stochastic) {
    const __m512i exponent = _mm512_set1_epi32(0x7F800000);
    __mmask16 finite = _mm512_cmpneq_epi32_mask(_mm512_and_si512(bits, exponent), exponent);
    half = _mm512_mask_mov_epi32(half, finite, _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_srli_epi32(random, 16)), 16));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i), _mm512_cvtepi32_epi16(half));
}

// The 8-bit step on whole blocks [start, end) of fp32 or bf16 params and grads, 16 lanes at a
// time: update() then encode_8bit(), the same operations in the same order, without staging
// every value in L1 between passes (39 vs 52 ms measured on 64M bf16 elements, 2 threads).
// `buffer` holds one block of the new momentum until its absmax is known.
void step_8bit_vectors(const int64_t* d, const Options& o, const Tables& t, int64_t start,
                       int64_t end, bool cautious, float aligned_step, float misaligned_step,
                       int64_t param_key, float* buffer) {
  const Registers r(t);
  void* param = reinterpret_cast<void*>(d[PARAM_PTR]);
  const void* grad = reinterpret_cast<const void*>(d[GRAD_PTR]);
  uint8_t* codes = reinterpret_cast<uint8_t*>(d[MOMENTUM_PTR]);
  float* absmax = reinterpret_cast<float*>(d[ABSMAX_PTR]);
  const int64_t param_dtype = d[PARAM_DTYPE], grad_dtype = d[GRAD_DTYPE];
  const bool stochastic = param_key >= 0 && param_dtype == BF16;
  const __m512 beta1 = _mm512_set1_ps(o.beta1), one_minus_beta1 = _mm512_set1_ps(o.one_minus_beta1),
               beta2 = _mm512_set1_ps(o.beta2), one_minus_beta2 = _mm512_set1_ps(o.one_minus_beta2),
               decay = _mm512_set1_ps(o.decay), aligned = _mm512_set1_ps(aligned_step),
               misaligned = _mm512_set1_ps(misaligned_step), zero = _mm512_setzero_ps();
  const __m512i sign_bit = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u)),
                unit = _mm512_set1_epi32(0x3F800000), magnitude_mask = _mm512_set1_epi32(0x7FFFFFFF),
                lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t b = start; b < end; b += o.block_size) {
    const __m512 scale = _mm512_set1_ps(absmax[b / o.block_size]);
    // Blocks are aligned runs of a power-of-two size: none straddles a 2**32 boundary.
    const __m512i element_key = _mm512_set1_epi32(static_cast<int32_t>(
        mix32(static_cast<uint32_t>(param_key) ^ static_cast<uint32_t>(b >> 32))));
    __m512i peak = _mm512_setzero_si512();
    for (int64_t v = 0; v < o.block_size; v += 16) {
      const int64_t i = b + v;
      __m512 g = load16(grad, grad_dtype, i);
      if (o.maximize) g = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), sign_bit));
      __m512 m = _mm512_mul_ps(code_values(codes + i, r), scale);
      __m512 p = load16(param, param_dtype, i);
      __m512 c = _mm512_add_ps(_mm512_mul_ps(m, beta1), _mm512_mul_ps(g, one_minus_beta1));
      __m512 u = _mm512_maskz_mov_ps(  // sign(c): 0 for +-0 and NaN
          _mm512_cmp_ps_mask(c, zero, _CMP_NEQ_OQ),
          _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(c), sign_bit), unit)));
      __m512 step = aligned, direction = u;
      if (cautious) {
        __mmask16 agree = _mm512_cmp_ps_mask(_mm512_mul_ps(u, g), zero, _CMP_GT_OQ);
        step = _mm512_mask_blend_ps(agree, misaligned, aligned);
        if (o.masked_dont_move) direction = _mm512_maskz_mov_ps(agree, u);
      }
      __m512 decayed = _mm512_mul_ps(p, decay);
      if (o.cautious_weight_decay)
        decayed = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_mul_ps(direction, p), zero, _CMP_GE_OQ), p, decayed);
      p = _mm512_sub_ps(decayed, _mm512_mul_ps(u, step));
      __m512i random = _mm512_setzero_si512();
      if (stochastic)
        random = mix32_16(_mm512_xor_si512(
            _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(i))), lanes), element_key));
      store16(param, param_dtype, i, p, stochastic, random);
      m = _mm512_add_ps(_mm512_mul_ps(m, beta2), _mm512_mul_ps(g, one_minus_beta2));
      _mm512_storeu_ps(buffer + v, m);
      peak = _mm512_max_epu32(peak, _mm512_and_si512(_mm512_castps_si512(m), magnitude_mask));
    }
    float top = bits_float(_mm512_reduce_max_epu32(peak));
    absmax[b / o.block_size] = top;
    top = scale_subnormal_block(buffer, o.block_size, top);
    const __m512 inverse = _mm512_set1_ps(top > 0 ? 1.0f / top : 0.0f);
    for (int64_t v = 0; v < o.block_size; v += 16)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + b + v),
                       nearest_codes16(_mm512_mul_ps(_mm512_loadu_ps(buffer + v), inverse), r));
  }
}
#endif

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

}  // namespace

extern "C" {

// One Lion step for `count` tensors, in place. `steps` ([count, 2] fp32: step where aligned,
// where not) comes from the cautious pre-pass, or is NULL without caution (both = lr).
int64_t lion8bit_cpu_step(const int64_t* tensors, int64_t count, const float* steps,
                          const float* scalars, int64_t flags, int64_t block_size,
                          const float* codebook, const float* levels, int64_t num_threads) {
  const Options o = options_of(scalars, flags, block_size);
  const Tables t{codebook, levels};
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
    int64_t param_key = o.stochastic ? d[PARAM_KEY] : -1;
    int64_t momentum_key = o.stochastic ? d[MOMENTUM_KEY] : -1;
    const bool cautious = steps != nullptr;
    int64_t staged_from = item.start;
#if defined(__AVX512F__)
    if (d[FORMAT] == Q8 && o.block_size >= 16 && d[PARAM_DTYPE] != F16 && d[GRAD_DTYPE] != F16) {
      // Whole blocks here; a tensor's partial last block goes through the stages below.
      staged_from = item.start + (item.end - item.start) / o.block_size * o.block_size;
      step_8bit_vectors(d, o, t, item.start, staged_from, cautious, aligned_step, misaligned_step,
                        param_key, buffers);
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
      if (!momentum_in_place) load_momentum(m, d, o, start, n, t);
      if (!param_in_place) load(p, param, d[PARAM_DTYPE], start, n);
      update(ps, ms, gs, n, o, cautious, aligned_step, misaligned_step);
      if (!param_in_place) store(p, param, d[PARAM_DTYPE], start, n, param_key);
      if (d[FORMAT] == Q8) {
        encode_8bit(m, static_cast<uint8_t*>(momentum), reinterpret_cast<float*>(d[ABSMAX_PTR]),
                    inverses, o.block_size, start, n, t);
      } else if (!momentum_in_place) {
        store(m, momentum, BF16, start, n, momentum_key);
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
      load_momentum(m, d, o, start, n, t);
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
