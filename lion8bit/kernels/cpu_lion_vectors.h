// The AVX-512 8-bit step of the fused CPU kernel (lion8bit/kernels/cpu_lion.cpp): 16 lanes at a
// time in registers, for fp32 and bf16 params and grads.
#pragma once

#include "cpu_lion_stages.h"

#if defined(__AVX512F__)
namespace {

// 16 fp32 values of an fp32 or bf16 tensor from element i.
inline __m512 load16(const void* base, int64_t dtype, int64_t i) {
  if (dtype == F32) return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
  // fp16: vcvtph2ps is exact (subnormals included); it quiets a signaling NaN, which the
  // update's first multiply would do anyway, so the stored results equal fp16_to_float's.
  if (dtype == F16) return _mm512_cvtph_ps(half);
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

// bf16_nearest, or bf16_stochastic with these random bits, of 16 values by integer rounding: the
// bf16 patterns in the low 16 bits of each lane.
inline __m512i bf16_rounded16(__m512 x, bool stochastic, __m512i random) {
  const __m512i bits = _mm512_castps_si512(x), one = _mm512_set1_epi32(1);
  __m512i half = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(bits, 16), one))), 16);
  half = _mm512_mask_mov_epi32(half, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
  if (stochastic) {
    const __m512i exponent = _mm512_set1_epi32(0x7F800000);
    __mmask16 finite = _mm512_cmpneq_epi32_mask(_mm512_and_si512(bits, exponent), exponent);
    half = _mm512_mask_mov_epi32(half, finite, _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_srli_epi32(random, 16)), 16));
  }
  return half;
}

// Store 16 values to an fp32 or bf16 tensor at element i: bf16_nearest, or bf16_stochastic with
// these random bits.
inline void store16(void* base, int64_t dtype, int64_t i, __m512 x, bool stochastic, __m512i random) {
  if (dtype == F32) return _mm512_storeu_ps(static_cast<float*>(base) + i, x);
  if (dtype == F16) {  // nearest even, NaN quiet with its top payload bits: fp16_nearest
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i),
                        _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return;
  }
#if defined(__AVX512BF16__)
  // vcvtneps2bf16 rounds to nearest even as bf16_nearest does, in one instruction where the
  // integer rounding takes eight (1.27 -> 1.23 ns per element for the whole step measured), but it flushes
  // subnormal inputs to zero and writes NaN as 0x7FC0-like quiet NaNs: vectors with either
  // (classes QNaN 0x01, denormal 0x20, SNaN 0x80) take the integer rounding.
  if (!stochastic && _mm512_fpclass_ps_mask(x, 0xA1) == 0) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
    return;
  }
#endif
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i),
                      _mm512_cvtepi32_epi16(bf16_rounded16(x, stochastic, random)));
}

// 32 bf16 values from element i as fp32, split by parity: lane j of `even` is element i + 2j,
// of `odd` i + 2j + 1. A 32-bit lane of the load holds both (the even one in its low half), so
// each vector is one instruction, where the contiguous layout of load16 takes a widening and a
// shift per 16 values.
inline void load32_by_parity(const void* base, int64_t i, __m512& even, __m512& odd) {
  const __m512i pairs = _mm512_loadu_si512(static_cast<const uint16_t*>(base) + i);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}

// Store 32 values split by parity (as load32_by_parity reads them) to a bf16 tensor at element
// i, rounded as store16 rounds: the pairs' bf16 patterns side by side in each 32-bit lane.
inline void store32_by_parity(void* base, int64_t i, __m512 even, __m512 odd, bool stochastic, __m512i random_even,
                              __m512i random_odd) {
  uint16_t* out = static_cast<uint16_t*>(base) + i;
#if defined(__AVX512BF16__)
  if (!stochastic && (_mm512_fpclass_ps_mask(even, 0xA1) | _mm512_fpclass_ps_mask(odd, 0xA1)) == 0) {
    // Words 0-15 the even values, 16-31 the odd ones; the permute interleaves them.
    const __m512i interleave = _mm512_setr_epi32(0x00100000, 0x00110001, 0x00120002, 0x00130003, 0x00140004, 0x00150005,
                                                 0x00160006, 0x00170007, 0x00180008, 0x00190009, 0x001A000A, 0x001B000B,
                                                 0x001C000C, 0x001D000D, 0x001E000E, 0x001F000F);
    _mm512_storeu_si512(out, _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even))));
    return;
  }
#endif
  _mm512_storeu_si512(out, _mm512_or_si512(bf16_rounded16(even, stochastic, random_even),
                                           _mm512_slli_epi32(bf16_rounded16(odd, stochastic, random_odd), 16)));
}

// The constants of the 16-lane update, made once per call of a vector step.
struct Update16 {
  __m512 beta1, one_minus_beta1, beta2, one_minus_beta2, decay, aligned, misaligned, zero;
  __m512i sign_bit, unit;
  Update16(const Options& o, float aligned_step, float misaligned_step)
      : beta1(_mm512_set1_ps(o.beta1)), one_minus_beta1(_mm512_set1_ps(o.one_minus_beta1)),
        beta2(_mm512_set1_ps(o.beta2)), one_minus_beta2(_mm512_set1_ps(o.one_minus_beta2)),
        decay(_mm512_set1_ps(o.decay)), aligned(_mm512_set1_ps(aligned_step)),
        misaligned(_mm512_set1_ps(misaligned_step)), zero(_mm512_setzero_ps()),
        sign_bit(_mm512_set1_epi32(static_cast<int32_t>(0x80000000u))), unit(_mm512_set1_epi32(0x3F800000)) {}
};

// update() of 16 lanes, shared by the 8-bit and the 4-bit vector steps: the grad g (maximize
// applied here), the old momentum m and the param p give the new param (returned, before its
// rounding to the param dtype) and the new momentum (m is replaced), in the reference's order.
// DEFAULT_OPTIONS: no maximize, caution or cautious weight decay (default_options). sign(c) * lr
// is then c's sign bit on lr, or +0: one masked ternary logic instruction for sign(c)'s four and
// the product, exact as the product is for the finite lr options.py accepts.
template <bool DEFAULT_OPTIONS>
inline __m512 update16(__m512 p, __m512& g, __m512& m, const Options& o, bool cautious, const Update16& k) {
  if (DEFAULT_OPTIONS) {
    __m512 c = _mm512_add_ps(_mm512_mul_ps(m, k.beta1), _mm512_mul_ps(g, k.one_minus_beta1));
    __m512 signed_step = _mm512_castsi512_ps(_mm512_maskz_ternarylogic_epi32(  // (c & sign) | step
        _mm512_cmp_ps_mask(c, k.zero, _CMP_NEQ_OQ), _mm512_castps_si512(c), k.sign_bit, _mm512_castps_si512(k.aligned), 0xEA));
    __m512 decayed = _mm512_mul_ps(p, k.decay);
    m = _mm512_add_ps(_mm512_mul_ps(m, k.beta2), _mm512_mul_ps(g, k.one_minus_beta2));
    return _mm512_sub_ps(decayed, signed_step);
  }
  if (o.maximize) g = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), k.sign_bit));
  __m512 c = _mm512_add_ps(_mm512_mul_ps(m, k.beta1), _mm512_mul_ps(g, k.one_minus_beta1));
  __m512 u = _mm512_maskz_mov_ps(  // sign(c): 0 for +-0 and NaN
      _mm512_cmp_ps_mask(c, k.zero, _CMP_NEQ_OQ),
      _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(c), k.sign_bit), k.unit)));
  __m512 step = k.aligned, direction = u;
  if (cautious) {
    __mmask16 agree = _mm512_cmp_ps_mask(_mm512_mul_ps(u, g), k.zero, _CMP_GT_OQ);
    step = _mm512_mask_blend_ps(agree, k.misaligned, k.aligned);
    if (o.masked_dont_move) direction = _mm512_maskz_mov_ps(agree, u);
  }
  __m512 decayed = _mm512_mul_ps(p, k.decay);
  if (o.cautious_weight_decay)
    decayed = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_mul_ps(direction, p), k.zero, _CMP_GE_OQ), p, decayed);
  m = _mm512_add_ps(_mm512_mul_ps(m, k.beta2), _mm512_mul_ps(g, k.one_minus_beta2));
  return _mm512_sub_ps(decayed, _mm512_mul_ps(u, step));
}

// A vector step's param and grad dtypes as constants (ANY_DTYPE: read from the descriptor).
constexpr int64_t ANY_DTYPE = -1;

// Whether a vector step may take update16's DEFAULT_OPTIONS path (and no stochastic rounding of
// params): the options most runs use.
inline bool default_options(const Options& o, bool cautious, int64_t param_key) {
  return !cautious && !o.maximize && !o.cautious_weight_decay && param_key < 0;
}

// Runs Step::run<PARAM, GRAD, DEFAULT_OPTIONS>(args...): dtype constants and the default options
// where those hold, else one variant that reads both dtypes and every option at run time. The
// constants drop the per-vector branches on dtypes and options: 0.87 -> 0.78 ns per element for
// the bf16 8-bit step alone, 0.83 -> 0.70 with update16's default path and the requantizer's
// two fewer instructions (2M elements, one thread, best of 300, builds alternated in one process).
template <typename Step, int64_t PARAM, typename... Args>
void with_grad_dtype(int64_t grad_dtype, Args&&... args) {
  if (grad_dtype == F32) return Step::template run<PARAM, F32, true>(args...);
  if (grad_dtype == BF16) return Step::template run<PARAM, BF16, true>(args...);
  return Step::template run<PARAM, F16, true>(args...);
}
template <typename Step, typename... Args>
void with_constants(const int64_t* d, bool defaults, Args&&... args) {
  if (!defaults) return Step::template run<ANY_DTYPE, ANY_DTYPE, false>(args...);
  if (d[PARAM_DTYPE] == F32) return with_grad_dtype<Step, F32>(d[GRAD_DTYPE], args...);
  if (d[PARAM_DTYPE] == BF16) return with_grad_dtype<Step, BF16>(d[GRAD_DTYPE], args...);
  return with_grad_dtype<Step, F16>(d[GRAD_DTYPE], args...);
}

// The 8-bit step on whole blocks [start, end) of fp32, bf16 or fp16 params and grads (fp16 params
// rounded to nearest; stochastic fp16 goes through the stages), 16 lanes at a
// time: update() then encode_8bit(), the same operations in the same order, without staging
// every value in L1 between passes (39 vs 52 ms measured on 64M bf16 elements, 2 threads).
// `buffer` holds one block of the new momentum until its absmax is known.
template <int64_t PARAM, int64_t GRAD, bool DEFAULT_OPTIONS>
void step_8bit_vectors_of(const int64_t* d, const Options& o, const Tables& t, int64_t start, int64_t end,
                          bool cautious, float aligned_step, float misaligned_step, int64_t param_key,
                          float* buffer) {
  const Registers r(t);
  void* param = reinterpret_cast<void*>(d[PARAM_PTR]);
  const void* grad = reinterpret_cast<const void*>(d[GRAD_PTR]);
  uint8_t* codes = reinterpret_cast<uint8_t*>(d[MOMENTUM_PTR]);
  float* absmax = reinterpret_cast<float*>(d[ABSMAX_PTR]);
  const int64_t param_dtype = PARAM == ANY_DTYPE ? d[PARAM_DTYPE] : PARAM;
  const int64_t grad_dtype = GRAD == ANY_DTYPE ? d[GRAD_DTYPE] : GRAD;
  const bool stochastic = !DEFAULT_OPTIONS && param_key >= 0 && param_dtype == BF16;
  const int64_t offset = d[ELEMENT_OFFSET];
  const Update16 k(o, aligned_step, misaligned_step);
  const __m512i magnitude_mask = _mm512_set1_epi32(0x7FFFFFFF),
                lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t b = start; b < end; b += o.block_size) {
    const __m512 scale = _mm512_set1_ps(absmax[b / o.block_size]);
    // Blocks are aligned runs of a power-of-two size in the whole tensor's flat index (the
    // launcher checks that an 8-bit tensor's offset is a multiple of the block size): none
    // straddles a 2**32 boundary.
    const int64_t index = offset + b;
    const __m512i element_key = _mm512_set1_epi32(static_cast<int32_t>(
        mix32(static_cast<uint32_t>(param_key) ^ static_cast<uint32_t>(index >> 32))));
    __m512i peak = _mm512_setzero_si512();
    // One vector of 16 elements from b + v, with its code values.
    auto vector = [&](int64_t v, __m512 code_value) {
      const int64_t i = b + v;
      __m512 g = load16(grad, grad_dtype, i);
      __m512 m = _mm512_mul_ps(code_value, scale);
      __m512 p = update16<DEFAULT_OPTIONS>(load16(param, param_dtype, i), g, m, o, cautious, k);
      __m512i random = _mm512_setzero_si512();
      if (stochastic)
        random = mix32_16(_mm512_xor_si512(
            _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(index + v))), lanes), element_key));
      store16(param, param_dtype, i, p, stochastic, random);
      _mm512_storeu_ps(buffer + v, m);
      peak = _mm512_max_epu32(peak, _mm512_and_si512(_mm512_castps_si512(m), magnitude_mask));
    };
#if defined(__AVX512VBMI__)
    if (o.block_size % 64 == 0) {
      for (int64_t v = 0; v < o.block_size; v += 64) {
        __m512 values[4];
        code_values64(codes + b + v, r, values);
        for (int q = 0; q < 4; ++q) vector(v + 16 * q, values[q]);
      }
    } else
#endif
    {
      for (int64_t v = 0; v < o.block_size; v += 16) vector(v, code_values(codes + b + v, r));
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

struct Step8bitVectors {
  template <int64_t PARAM, int64_t GRAD, bool DEFAULT_OPTIONS, typename... Args>
  static void run(Args&&... args) { step_8bit_vectors_of<PARAM, GRAD, DEFAULT_OPTIONS>(args...); }
};

void step_8bit_vectors(const int64_t* d, const Options& o, const Tables& t, int64_t start,
                       int64_t end, bool cautious, float aligned_step, float misaligned_step,
                       int64_t param_key, float* buffer) {
  with_constants<Step8bitVectors>(d, default_options(o, cautious, param_key), d, o, t, start, end,
                                  cautious, aligned_step, misaligned_step, param_key, buffer);
}

}  // namespace
#endif
