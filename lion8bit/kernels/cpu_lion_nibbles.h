// The "4bit" momentum format in the fused CPU step (lion8bit/kernels/cpu_lion.cpp): 16 uniform
// levels, two codes per byte, blocks of 32 with a bf16 absmax rounded up, stochastic rounding on
// the level grid (lion8bit/quant.py, "4-bit blockwise format"). Scalar loops for any CPU (the
// stages and the cautious pre-pass), and where the compiler targets AVX-512 a fused 16-lane step
// (two vectors per block) that keeps the new momentum in registers until its block's absmax is
// known.
#pragma once

#include "cpu_lion_stages.h"
#include "cpu_lion_vectors.h"

namespace {

// quant.BLOCK_SIZE_4BIT: fixed by the format, whatever the group's block_size.
constexpr int64_t BLOCK_4BIT = 32;

// quant.levels_4bit(): (2c - 15) / 15 rounded once to fp32 (float64 -> fp32 in Python, written
// here as the resulting fp32 values, so no C++ libm is involved). Every code occurs in the
// conformance suite's random momenta, so a wrong constant fails tests/test_backends.py.
constexpr float LEVELS_4BIT[16] = {
    -1.0f, -0x1.bbbbbcp-1f, -0x1.777778p-1f, -0x1.333334p-1f, -0x1.dddddep-2f, -0x1.555556p-2f,
    -0x1.99999ap-3f, -0x1.111112p-4f, 0x1.111112p-4f, 0x1.99999ap-3f, 0x1.555556p-2f,
    0x1.dddddep-2f, 0x1.333334p-1f, 0x1.777778p-1f, 0x1.bbbbbcp-1f, 1.0f};
// quant.GRID_HALF_4BIT, SMALL_ABSMAX_4BIT, SMALL_SCALE_4BIT; the last code.
constexpr float GRID_HALF_4BIT = 7.5f, SMALL_ABSMAX_4BIT = 0x1p-64f, SMALL_SCALE_4BIT = 0x1p64f;
constexpr int LAST_CODE_4BIT = 15;

inline float bf16_value(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// quant.round_up_to_bf16 of a block's max |m| (its fp32 bits): the smallest bf16 >= it, in the
// same mod-2**32 integer arithmetic; then torch's conversion of that exact-in-bf16 pattern,
// which writes every NaN as 0xFFFF (see bf16_nearest).
inline uint16_t absmax_4bit(uint32_t peak_bits) {
  uint32_t up = (peak_bits & 0xFFFFu) ? (peak_bits | 0xFFFFu) + 1u : peak_bits;
  return (up & 0x7FFFFFFFu) > 0x7F800000u ? 0xFFFF : static_cast<uint16_t>(up >> 16);
}

// quant.grid_4bit's per-block scalars from the stored bf16 absmax a (as the reference reads it
// back, absmax.float()): t = (m * scale) * grid_scale + 7.5, with scale = 2**64 for a < 2**-64
// (zero and negative zero too), and grid_scale = 7.5 / (a * scale), 0 unless a > 0 (so NaN and
// 0 give 0).
inline void grid_normalizer_4bit(uint16_t stored, float& scale, float& grid_scale) {
  float a = bf16_value(stored);
  scale = a < SMALL_ABSMAX_4BIT ? SMALL_SCALE_4BIT : 1.0f;
  grid_scale = a > 0 ? GRID_HALF_4BIT / (a * scale) : 0.0f;
}

// quant.codes_4bit of one grid place t with uniform u: t clamped to [0, 15] (NaN to 0), then
// f = floor(t), and f + 1 iff u < t - f.
inline uint8_t code_4bit(float t, float u) {
  t = t > 0 ? t : 0.0f;
  t = t < LAST_CODE_4BIT ? t : static_cast<float>(LAST_CODE_4BIT);
  const float f = std::floor(t);
  return static_cast<uint8_t>(static_cast<int>(f) + (u < t - f));
}

// quant.uniform_from_bits: (bits >> 8) * 2**-24, exact in fp32.
inline float uniform_4bit(uint32_t bits) { return static_cast<float>(bits >> 8) * 0x1p-24f; }

// Code of element i (flat, of this tensor) from the packed bytes.
inline int nibble(const uint8_t* codes, int64_t i) { return (codes[i >> 1] >> ((i & 1) * 4)) & 0xF; }

#if defined(__AVX512F__)
// Level values of 16 elements whose packed bytes start at `bytes` (8 bytes, an even element
// first). No mask: the permute reads only an index's low 4 bits, which are then the lane's code.
inline __m512 levels16(const uint8_t* bytes, __m512 levels) {
#if defined(__AVX512VBMI__)
  // The 8 bytes in every 64-bit lane; vpmultishiftqb then writes bits 4j .. 4j + 7 (code j in
  // the low nibble) to lane j's low byte: one instruction for the byte shuffle, the widening and
  // the shift below.
  const __m512i nibble_offsets = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60);
  int64_t packed;
  std::memcpy(&packed, bytes, 8);
  return _mm512_permutexvar_ps(_mm512_multishift_epi64_epi8(nibble_offsets, _mm512_set1_epi64(packed)), levels);
#else
  // Byte j to lanes 2j and 2j+1, the high nibble shifted down in odd lanes.
  const __m128i pairs = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  __m128i spread = _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)), pairs);
  __m512i shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(spread), shifts), levels);
#endif
}

// The 16 packed bytes of a block's 32 codes, one per 32-bit lane (0..15): codes 0-15 in `low`,
// 16-31 in `high`.
#if defined(__AVX512VBMI__)
// Where the codes of the even and odd elements are in low:high as the two-source byte permute
// indexes it (code c at byte 4c of low, or 64 + 4(c - 16) of high): byte j of `even` takes code
// 2j, of `odd` code 2j + 1.
alignas(64) constexpr uint8_t EVEN_CODES[64] = {0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120};
alignas(64) constexpr uint8_t ODD_CODES[64] = {4, 12, 20, 28, 36, 44, 52, 60, 68, 76, 84, 92, 100, 108, 116, 124};

// 4 instructions for 32 codes, where narrowing each vector as below takes 7.
inline __m128i pack32(__m512i low, __m512i high) {
  __m512i even = _mm512_permutex2var_epi8(low, _mm512_load_si512(EVEN_CODES), high);
  __m512i odd = _mm512_permutex2var_epi8(low, _mm512_load_si512(ODD_CODES), high);
  // Codes are < 16, so shifting 16-bit words left by 4 moves no bit into the next byte.
  return _mm512_castsi512_si128(_mm512_or_si512(even, _mm512_slli_epi16(odd, 4)));
}
#else
inline __m128i pack32(__m512i low, __m512i high) {
  // Lanes 2j and 2j+1 share a 64-bit lane, so shifting it right by 28 puts code 2j+1 in bits 4-7
  // of the low byte.
  auto pack16 = [](__m512i codes) { return _mm512_cvtepi64_epi8(_mm512_or_si512(codes, _mm512_srli_epi64(codes, 28))); };
  return _mm_unpacklo_epi64(pack16(low), pack16(high));
}
#endif

// The 16 packed bytes of a block's 32 codes split by parity (load32_by_parity's layout): byte j
// is code 2j | code 2j+1 << 4, one narrowing for the block.
inline __m128i pack32_by_parity(__m512i even, __m512i odd) {
  return _mm512_cvtepi32_epi8(_mm512_or_si512(even, _mm512_slli_epi32(odd, 4)));
}

// Level values of a block's 32 elements split by parity, from its 16 packed bytes: byte j widened
// to lane j holds code 2j in its low nibble and code 2j+1 in the next, and the permute reads
// only an index's low 4 bits.
inline void levels32_by_parity(const uint8_t* bytes, __m512 levels, __m512& even, __m512& odd) {
  const __m512i pairs = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  even = _mm512_permutexvar_ps(pairs, levels);
  odd = _mm512_permutexvar_ps(_mm512_srli_epi32(pairs, 4), levels);
}

// The step's grid in units of 2**-24: codes16 reads t * 2**24 as an integer.
constexpr float GRID_UNIT = 0x1p24f;

// code_4bit on 16 lanes, in integers: `grid` is t * 2**24, computed as the reference computes t
// but with grid_scale * 2**24 and 7.5 * 2**24 (each rounding scales exactly by 2**24: the scale
// 2**64 of small blocks keeps 7.5 * 2**24 / (a * scale) finite and normal, and a product too
// small to be normal is absorbed by + 7.5 either way); `complement` is 2**24 - 1 - u * 2**24
// (complement16). Then:
// - T = int(grid) is exact: t is a multiple of 2**-22 (t >= 3.5 has an ulp of 2**-22 or more;
//   below 3.5, (m * scale) * grid_scale < -4 is a multiple of 2**-21 and adding 7.5 is exact),
//   and NaN converts to INT_MIN;
// - one clamp, at 0: |m| <= a, and a * RN(7.5 / a) is within 7.5 * 2**-24 of 7.5, so
//   (m * scale) * grid_scale is within one ulp of [-7.5, 7.5] and t in [-2**-21, 15] (15 + 2**-21
//   rounds to even: 15); tests/test_quant.py checks every bf16 absmax. The max takes -2**-21
//   and NaN to 0, as the reference's clamp;
// - with f = T >> 24 and r = T's low 24 bits, (t - f) * 2**24: u < t - f iff u * 2**24 < r iff
//   r + complement >= 2**24, so the code is (T + complement) >> 24.
// With the grid's multiply and add, 6 vector instructions for 16 codes.
inline __m512i codes16(__m512 grid, __m512i complement) {
  __m512i t = _mm512_max_epi32(_mm512_cvttps_epi32(grid), _mm512_setzero_si512());
  return _mm512_srli_epi32(_mm512_add_epi32(t, complement), 24);
}

// 2**24 - 1 - u * 2**24 (u * 2**24 = bits >> 8, the integer quant.uniform_from_bits scales) of 16
// elements of a block at flat indices index + elements (index a multiple of 32, each of
// `elements` below 32; one element key: a block never straddles a multiple of 2**32): that is
// (~bits) >> 8. mix32's input (index + e) ^ key is then k ^ e with k = index ^ key, and its first
// step x ^ (x >> 16) is k ^ (k >> 16) ^ e (e < 2**16): a scalar per vector, so three vector
// instructions fewer; its last xor and the complement are one ternary-logic instruction.
inline __m512i complement16(uint32_t index, uint32_t element_key, __m512i elements) {
  const uint32_t k = index ^ element_key;
  __m512i x = _mm512_xor_si512(_mm512_set1_epi32(static_cast<int32_t>(k ^ (k >> 16))), elements);
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7FEB352D));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int32_t>(0x846CA68Bu)));
  // 0xC3: ~(a ^ b), whatever the third operand.
  return _mm512_srli_epi32(_mm512_ternarylogic_epi32(x, _mm512_srli_epi32(x, 16), x, 0xC3), 8);
}

#endif

// A stage of fp32 momentum values from the codes and absmax of elements [start, start + n)
// (start a multiple of 32): level * absmax, one fp32 multiply (quant.dequantize_4bit).
inline void decode_4bit(float* __restrict out, const uint8_t* __restrict codes, const uint16_t* __restrict absmax,
                        int64_t start, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 levels = _mm512_loadu_ps(LEVELS_4BIT);
  for (; i + 16 <= n; i += 16) {
    __m512 scale = _mm512_set1_ps(bf16_value(absmax[(start + i) / BLOCK_4BIT]));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(levels16(codes + (start + i) / 2, levels), scale));
  }
#endif
  for (; i < n; ++i) out[i] = LEVELS_4BIT[nibble(codes, start + i)] * bf16_value(absmax[(start + i) / BLOCK_4BIT]);
}

// A stage of new momentum (elements [start, start + n), start a multiple of 32) to codes and
// absmax (quant.quantize_4bit), in blocks of 32, u from the bits of `key` (a step always has
// one: the launcher refuses 4-bit momentum without keys) and the whole parameter's indices
// offset + start ... . With an odd count the last byte's high nibble is 0.
inline void encode_4bit(const float* __restrict m, uint8_t* __restrict codes, uint16_t* __restrict absmax,
                        int64_t start, int64_t n, int64_t key, int64_t offset) {
  for (int64_t b = 0; b < n; b += BLOCK_4BIT) {
    const int64_t count = std::min(BLOCK_4BIT, n - b);
    uint32_t peak = 0;  // max |m| on the bit patterns, NaN above inf (as in encode_8bit)
    for (int64_t i = 0; i < count; ++i) peak = std::max(peak, float_bits(m[b + i]) & 0x7FFFFFFFu);
    const uint16_t stored = absmax_4bit(peak);
    absmax[(start + b) / BLOCK_4BIT] = stored;
    float scale, grid_scale;
    grid_normalizer_4bit(stored, scale, grid_scale);
    const int64_t index = offset + start + b;  // 32-aligned: one element key per block
    const uint32_t element_key = mix32(static_cast<uint32_t>(key) ^ static_cast<uint32_t>(index >> 32));
    uint8_t block[BLOCK_4BIT + 1] = {};  // +1: the zero high nibble of an odd count
    for (int64_t i = 0; i < count; ++i) {
      float u = uniform_4bit(mix32((static_cast<uint32_t>(index) + static_cast<uint32_t>(i)) ^ element_key));
      block[i] = code_4bit((m[b + i] * scale) * grid_scale + GRID_HALF_4BIT, u);
    }
    uint8_t* out = codes + (start + b) / 2;
    for (int64_t j = 0; 2 * j < count; ++j) out[j] = static_cast<uint8_t>(block[2 * j] | (block[2 * j + 1] << 4));
  }
}

#if defined(__AVX512F__)
// Blocks whose absmax the 16-bit-param step makes together, one lane each.
constexpr int64_t GROUP_4BIT = 16;

// Lane k: the max of vector k's 16 lanes (unsigned), for 16 vectors: the halves of pairs of
// vectors, then quarters, then pairs of lanes and single lanes side by side, 46 instructions
// where 16 separate reductions take 144; a transpose's order at the end. Checked against
// scalar maxima on 10**5 random sets (a scratch program) and by every 4-bit test.
inline __m512i block_maxima(const __m512i (&peaks)[GROUP_4BIT]) {
  __m512i r[8], s[4], t[2];
  for (int j = 0; j < 8; ++j)  // lanes 0-7: vector 2j; 8-15: vector 2j + 1
    r[j] = _mm512_max_epu32(_mm512_shuffle_i32x4(peaks[2 * j], peaks[2 * j + 1], 0x44),
                            _mm512_shuffle_i32x4(peaks[2 * j], peaks[2 * j + 1], 0xEE));
  for (int j = 0; j < 4; ++j)  // quarter q: vector 4j + q
    s[j] = _mm512_max_epu32(_mm512_shuffle_i32x4(r[2 * j], r[2 * j + 1], 0x88),
                            _mm512_shuffle_i32x4(r[2 * j], r[2 * j + 1], 0xDD));
  for (int j = 0; j < 2; ++j)  // quarter q: lanes 0-1 vector 8j + q, lanes 2-3 vector 8j + 4 + q
    t[j] = _mm512_max_epu32(_mm512_unpacklo_epi64(s[2 * j], s[2 * j + 1]), _mm512_unpackhi_epi64(s[2 * j], s[2 * j + 1]));
  // Quarter q: vectors q, q + 4, q + 8, q + 12 (a float shuffle of bit patterns changes no bit).
  const __m512 low = _mm512_castsi512_ps(t[0]), high = _mm512_castsi512_ps(t[1]);
  __m512i transposed = _mm512_max_epu32(_mm512_castps_si512(_mm512_shuffle_ps(low, high, 0x88)),
                                        _mm512_castps_si512(_mm512_shuffle_ps(low, high, 0xDD)));
  return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), transposed);
}

// absmax_4bit and grid_normalizer_4bit on 16 lanes, the same integer and fp32 operations: the
// stored absmax (low 16 bits of each lane), and scale and grid_scale * 2**24 (codes16's unit;
// 7.5 * 2**24 / (a * scale) is 2**24 * grid_scale exactly, both normal: a * scale >= 2**-69).
inline __m512i normalizers16(__m512i peak_bits, __m512& scale, __m512& grid_scale) {
  const __m512i low_bits = _mm512_set1_epi32(0xFFFF);
  __m512i up = _mm512_mask_add_epi32(peak_bits, _mm512_test_epi32_mask(peak_bits, low_bits),
                                     _mm512_or_si512(peak_bits, low_bits), _mm512_set1_epi32(1));
  __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(up, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
  __m512i stored = _mm512_mask_mov_epi32(_mm512_srli_epi32(up, 16), nan, low_bits);
  __m512 a = _mm512_castsi512_ps(_mm512_slli_epi32(stored, 16));
  scale = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(SMALL_ABSMAX_4BIT), _CMP_LT_OQ), _mm512_set1_ps(1.0f),
                               _mm512_set1_ps(SMALL_SCALE_4BIT));
  grid_scale = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ),
                                   _mm512_set1_ps(GRID_HALF_4BIT * GRID_UNIT), _mm512_mul_ps(a, scale));
  return stored;
}

// The 4-bit step on whole blocks [start, end) of fp32, bf16 or fp16 params and grads (fp16 params
// rounded to nearest; stochastic fp16 goes through the stages): decode, update() and
// encode_4bit's operations in the same order, 16 lanes at a time. With fp32 params each block's
// 32 new momentum values wait in two registers until its absmax is known; with 16-bit params
// a group of 16 blocks waits in an L1 buffer, and their absmax are made together (below).
// Dtypes and options as constants where they allow (with_constants, cpu_lion_vectors.h).
template <int64_t PARAM, int64_t GRAD, bool DEFAULT_OPTIONS>
void step_4bit_vectors_of(const int64_t* d, const Options& o, int64_t start, int64_t end, bool cautious,
                          float aligned_step, float misaligned_step, int64_t param_key, int64_t momentum_key) {
  void* param = reinterpret_cast<void*>(d[PARAM_PTR]);
  const void* grad = reinterpret_cast<const void*>(d[GRAD_PTR]);
  uint8_t* codes = reinterpret_cast<uint8_t*>(d[MOMENTUM_PTR]);
  uint16_t* absmax = reinterpret_cast<uint16_t*>(d[ABSMAX_PTR]);
  const int64_t param_dtype = PARAM == ANY_DTYPE ? d[PARAM_DTYPE] : PARAM;
  const int64_t grad_dtype = GRAD == ANY_DTYPE ? d[GRAD_DTYPE] : GRAD, offset = d[ELEMENT_OFFSET];
  const bool stochastic_param = !DEFAULT_OPTIONS && param_key >= 0 && param_dtype == BF16;
  const Update16 k(o, aligned_step, misaligned_step);
  const __m512 levels = _mm512_loadu_ps(LEVELS_4BIT), grid_offset = _mm512_set1_ps(GRID_HALF_4BIT * GRID_UNIT);
  const __m512i magnitude_mask = _mm512_set1_epi32(0x7FFFFFFF),
                lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // bf16 params and grads: a block's two vectors hold its even and odd elements (load32_by_parity,
  // cpu_lion_vectors.h), which load, decode, pack and store in fewer instructions than its first
  // and last 16: 9-11% off the step (4M elements on one thread, 16M on two; paired builds,
  // medians of 61-101 rounds). Each element keeps its values and keys, so the results hold.
  const bool by_parity = param_dtype == BF16 && grad_dtype == BF16;
  // The block's elements in each vector, from the block's first.
  const __m512i elements[2] = {by_parity ? _mm512_add_epi32(lanes, lanes) : lanes,
                               by_parity ? _mm512_add_epi32(_mm512_add_epi32(lanes, lanes), _mm512_set1_epi32(1))
                                         : _mm512_add_epi32(lanes, _mm512_set1_epi32(16))};
  // Element keys of the indices' upper 32 bits, made again only where they change (a block, 32
  // aligned in the whole parameter, never straddles a multiple of 2**32).
  int64_t param_high = -1, momentum_high = -1;
  __m512i param_element_key = lanes;
  uint32_t momentum_element_key = 0;
  auto momentum_key_of = [&](int64_t index) {
    if ((index >> 32) != momentum_high) {
      momentum_high = index >> 32;
      momentum_element_key = mix32(static_cast<uint32_t>(momentum_key) ^ static_cast<uint32_t>(momentum_high));
    }
    return momentum_element_key;
  };
  // Block b's update: its params stored, its new momentum in m_new; returns the lanes' max |m|
  // bits. level * absmax of the 16 levels once per block: the products the reference makes per
  // element, which the decoding permute then picks (one multiply per 32 elements, not 2).
  auto update_block = [&](int64_t b, __m512 (&m_new)[2]) {
    const __m512 block_levels = _mm512_mul_ps(levels, _mm512_set1_ps(bf16_value(absmax[b / BLOCK_4BIT])));
    const int64_t index = offset + b;
    if (stochastic_param && (index >> 32) != param_high) {
      param_high = index >> 32;
      param_element_key = _mm512_set1_epi32(static_cast<int32_t>(mix32(static_cast<uint32_t>(param_key) ^ static_cast<uint32_t>(param_high))));
    }
    __m512 p[2], g[2];
    __m512i random[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    if (by_parity) {
      load32_by_parity(param, b, p[0], p[1]);
      load32_by_parity(grad, b, g[0], g[1]);
      levels32_by_parity(codes + b / 2, block_levels, m_new[0], m_new[1]);
    }
    for (int v = 0; v < 2; ++v) {
      if (!by_parity) {
        p[v] = load16(param, param_dtype, b + 16 * v);
        g[v] = load16(grad, grad_dtype, b + 16 * v);
        m_new[v] = levels16(codes + (b + 16 * v) / 2, block_levels);
      }
      p[v] = update16<DEFAULT_OPTIONS>(p[v], g[v], m_new[v], o, cautious, k);
      if (stochastic_param)
        random[v] = mix32_16(_mm512_xor_si512(
            _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(index))), elements[v]), param_element_key));
      if (!by_parity) store16(param, param_dtype, b + 16 * v, p[v], stochastic_param, random[v]);
    }
    if (by_parity) store32_by_parity(param, b, p[0], p[1], stochastic_param, random[0], random[1]);
    return _mm512_max_epu32(_mm512_and_si512(_mm512_castps_si512(m_new[0]), magnitude_mask),
                            _mm512_and_si512(_mm512_castps_si512(m_new[1]), magnitude_mask));
  };
  // Block b's codes from its new momentum m and its grid_scale * 2**24 (m * scale with
  // `scaled`; a scale of 1, every block but those of absmax below 2**-64, skips its multiply,
  // m * 1 being m, for a NaN too up to its payload, which the code does not see).
  auto encode_block = [&](int64_t b, const __m512* m, bool scaled, __m512 scale, __m512 grid_scale) {
    const int64_t index = offset + b;
    const uint32_t element_key = momentum_key_of(index);
    __m512i block[2];
    for (int v = 0; v < 2; ++v) {
      __m512 grid = _mm512_add_ps(_mm512_mul_ps(scaled ? _mm512_mul_ps(m[v], scale) : m[v], grid_scale), grid_offset);
      block[v] = codes16(grid, complement16(static_cast<uint32_t>(index), element_key, elements[v]));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + b / 2),
                     by_parity ? pack32_by_parity(block[0], block[1]) : pack32(block[0], block[1]));
  };
  if (param_dtype == F32) {
    // A block whose new momentum waits to be encoded. Software pipelining: the previous block's
    // codes are made while this block's absmax is still being reduced and inverted. Each
    // block's codes wait for that chain (reduction, rounding, division): the step with it
    // replaced by constants was 18% faster before this overlap, and the overlap gained 9% (1M
    // elements, one thread, best of 150).
    struct Held {
      __m512 m[2];
      float scale, grid_scale;
      int64_t b;
    } held;
    auto encode_held = [&] {  // grid_scale * 2**24: exact, and normal (normalizers16)
      encode_block(held.b, held.m, held.scale != 1.0f, _mm512_set1_ps(held.scale), _mm512_set1_ps(held.grid_scale * GRID_UNIT));
    };
    for (int64_t b = start; b < end; b += BLOCK_4BIT) {
      __m512 m_new[2];
      __m512i peak = update_block(b, m_new);
      // The block's absmax and normalizer in scalar registers: fewer vector instructions than
      // rounding up and inverting in every lane: with the skipped scale, 7-10% off the step (1M
      // elements, one thread, paired builds).
      const uint16_t stored = absmax_4bit(_mm512_reduce_max_epu32(peak));
      absmax[b / BLOCK_4BIT] = stored;
      float scale, grid_scale;
      grid_normalizer_4bit(stored, scale, grid_scale);
      if (b > start) encode_held();
      held = Held{{m_new[0], m_new[1]}, scale, grid_scale, b};
    }
    if (end > start) encode_held();
    return;
  }
  // 16-bit params: a group's updates, then one reduction and normalizer for its 16 blocks, then
  // the previous group's codes (pipelined as above, from the other buffer). 5-7% off the bf16
  // and fp16 steps against the fp32 path's scheme (1M and 4M elements on one thread, 16M on
  // two; medians of 41-401 paired rounds, builds alternated). With fp32 params, whose traffic
  // bounds the step, the buffer's stores did not pay: 0.93-1.23x, no clear gain.
  alignas(64) float buffers[2][GROUP_4BIT * BLOCK_4BIT];
  alignas(64) float scales[2][GROUP_4BIT], grid_scales[2][GROUP_4BIT];
  struct Pending {
    int64_t g = -1, blocks = 0;
    bool scaled = false;
  } pending[2];
  auto encode_group = [&](int slot) {
    const Pending& group = pending[slot];
    for (int64_t q = 0; q < group.blocks; ++q) {
      const float* m = buffers[slot] + q * BLOCK_4BIT;
      const __m512 values[2] = {_mm512_load_ps(m), _mm512_load_ps(m + 16)};
      encode_block(group.g + q * BLOCK_4BIT, values, group.scaled, _mm512_set1_ps(scales[slot][q]),
                   _mm512_set1_ps(grid_scales[slot][q]));
    }
  };
  int slot = 0;
  for (int64_t g = start; g < end; g += GROUP_4BIT * BLOCK_4BIT, slot ^= 1) {
    const int64_t blocks = std::min<int64_t>(GROUP_4BIT, (end - g) / BLOCK_4BIT);
    __m512i peaks[GROUP_4BIT];
    for (int64_t q = 0; q < GROUP_4BIT; ++q) {
      if (q >= blocks) {
        peaks[q] = _mm512_setzero_si512();
        continue;
      }
      __m512 m_new[2];
      peaks[q] = update_block(g + q * BLOCK_4BIT, m_new);
      _mm512_store_ps(buffers[slot] + q * BLOCK_4BIT, m_new[0]);
      _mm512_store_ps(buffers[slot] + q * BLOCK_4BIT + 16, m_new[1]);
    }
    __m512 scale, grid_scale;
    const __mmask16 present = static_cast<__mmask16>((1u << blocks) - 1);
    _mm512_mask_cvtepi32_storeu_epi16(absmax + g / BLOCK_4BIT, present, normalizers16(block_maxima(peaks), scale, grid_scale));
    _mm512_store_ps(scales[slot], scale);
    _mm512_store_ps(grid_scales[slot], grid_scale);
    pending[slot] = Pending{g, blocks, _mm512_mask_cmpneq_ps_mask(present, scale, _mm512_set1_ps(1.0f)) != 0};
    if (pending[slot ^ 1].g >= 0) encode_group(slot ^ 1);
    pending[slot ^ 1].g = -1;
  }
  if (pending[slot ^ 1].g >= 0) encode_group(slot ^ 1);
}

struct Step4bitVectors {
  template <int64_t PARAM, int64_t GRAD, bool DEFAULT_OPTIONS, typename... Args>
  static void run(Args&&... args) { step_4bit_vectors_of<PARAM, GRAD, DEFAULT_OPTIONS>(args...); }
};

void step_4bit_vectors(const int64_t* d, const Options& o, int64_t start, int64_t end, bool cautious,
                       float aligned_step, float misaligned_step, int64_t param_key, int64_t momentum_key) {
  with_constants<Step4bitVectors>(d, default_options(o, cautious, param_key), d, o, start, end,
                                  cautious, aligned_step, misaligned_step, param_key, momentum_key);
}
#endif

}  // namespace
