// Stage loops of the fused CPU step (lion8bit/kernels/cpu_lion.cpp): (de)quantization of whole
// blocks, 16 lanes at a time where the compiler targets AVX-512, and the update itself.
#pragma once

#include "cpu_lion_codec.h"
#include "cpu_lion_elements.h"

namespace {

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
