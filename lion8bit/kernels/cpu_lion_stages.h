// Stage loops of the fused CPU step (lion8bit/kernels/cpu_lion.cpp): (de)quantization of whole
// blocks, 16 lanes at a time where the compiler targets AVX-512, and the update itself.
#pragma once

#include "cpu_lion_elements.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

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

}  // namespace
