// The AVX-512 8-bit codec of the fused CPU step (lion8bit/kernels/cpu_lion.cpp): code values of
// 16 codes, and the nearest codes of 16 values, in registers.
#pragma once

#include "cpu_lion_elements.h"

#include <cmath>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// The requantizer's arithmetic path. The codebook is piecewise linear per decade (DESIGN.md §3):
// decade d = 0..6 holds 2**d codes, and its interior thresholds (midpoints of neighbouring
// codes) lie, up to fp32 rounding, on t = x * slope_d + offset_d = 2**d + 1, ..., 2**(d+1) - 1
// (n = #{thresholds < |x|} just above each). Regions: 0 below threshold T[1] (n = 1 by the sign
// rule; zero is handled apart), d = 1..6 between T[2**d - 1] and T[2**(d+1) - 1], 7 above T[127]
// (n = 128). A region is found exactly from the fp32 exponent (each octave holds at most one
// region boundary, a 32-entry table) and one comparison with that boundary; then n =
// min(floor(t), last n of the region). Where t is within EPSILON of an integer the floor might
// be off by one: such vectors (and NaN, and infinities) take the binary search instead (2**-12:
// ~0.5% of vectors of uniform values). Exactness holds when every interior threshold's t is
// within EPSILON of its integer and each region's lower boundary maps to at least its first n
// (t is monotonic in |x|); the constructor checks both on the thresholds it is given, and without
// them the search does everything (seen exact on all 2**32 fp32 patterns against nearest_code).
// Built once per kernel call, with the codebook's byte planes (code_values64). The requantizer's cost went from 0.7 to 0.4 ns per element
// (measured by stubbing it out: 64M bf16 elements, one thread, L1-resident blocks).
struct CodecTables {
  static constexpr float EPSILON = 0x1p-12f;
  // Octaves 2**-31 .. 2**0 by the exponent's low 5 bits: the region at the octave's bottom, and
  // the region boundary inside it (+inf if none).
  alignas(64) int32_t regions[32];
  alignas(64) float boundaries[32];
  alignas(64) float slopes[16] = {}, offsets[16] = {};  // per region: t = |x| * slope + offset
  alignas(64) int32_t lasts[16] = {};                   // per region: the largest n
  bool exact = true;
  alignas(64) uint8_t planes[4][256];  // byte k of each code value

  CodecTables(const float* codebook, const float* levels) {
    for (int code = 0; code < 256; ++code)
      for (int k = 0; k < 4; ++k) planes[k][code] = static_cast<uint8_t>(float_bits(codebook[code]) >> (8 * k));
    float thresholds[128];  // the 128 positive thresholds, rounded down, from the search levels
    for (int k = 0; k < LEVELS; ++k)
      for (int n = 0; n < (1 << k); ++n)
        thresholds[(n << (LEVELS - k)) + (1 << (LEVELS - 1 - k)) - 1] = levels[LEVEL_OFFSET[k] + n];
    thresholds[127] = levels[TOP];
    // Region r > 0 starts above T[2**r - 1].
    auto boundary = [&](int r) { return thresholds[(1 << r) - 1]; };
    for (int o = 0; o < 32; ++o) {
      float low = std::ldexp(1.0f, o - 31), high = 2 * low;
      int below = 0, inside = 0;
      boundaries[o] = std::numeric_limits<float>::infinity();
      for (int r = 1; r <= 7; ++r) {
        below += boundary(r) < low;
        if (boundary(r) >= low && boundary(r) < high) boundaries[o] = boundary(r), ++inside;
      }
      regions[o] = below;
      exact &= inside <= 1;
    }
    exact &= boundary(1) >= std::ldexp(1.0f, -31);  // |x| under 2**-31 is clamped into region 0
    for (int r = 0; r < 8; ++r) {
      lasts[r] = r == 0 ? 1 : r == 7 ? 128 : (2 << r) - 1;
      if (r == 0 || r == 7) {  // constant n, half-way between integers
        offsets[r] = lasts[r] + 0.5f;
        continue;
      }
      double units = std::ldexp(1.0, r);  // codes in decade r: 2**r over [0.1, 1] * 10**(r-6)
      slopes[r] = static_cast<float>(std::pow(10.0, 6 - r) * units / 0.9);
      offsets[r] = static_cast<float>(units - 0.1 * units / 0.9);
      auto t = [&](float x) { return std::fma(x, slopes[r], offsets[r]); };
      exact &= t(boundary(r)) >= units - EPSILON;
      for (int j = 1; j < (1 << r); ++j)
        exact &= std::fabs(t(thresholds[(1 << r) - 1 + j]) - static_cast<float>(units + j)) < EPSILON;
    }
  }
};

#if defined(__AVX512F__)
// CodecTables' arithmetic path in registers.
struct Arithmetic {
  __m512i region_low, region_high;
  __m512 boundary_low, boundary_high, slope, offset;
  __m512i last;
  bool exact = false;

  explicit Arithmetic(const CodecTables* a) {
    if (!a || !a->exact) return;
    exact = true;
    region_low = _mm512_load_si512(a->regions);
    region_high = _mm512_load_si512(a->regions + 16);
    boundary_low = _mm512_load_ps(a->boundaries);
    boundary_high = _mm512_load_ps(a->boundaries + 16);
    slope = _mm512_load_ps(a->slopes);
    offset = _mm512_load_ps(a->offsets);
    last = _mm512_load_si512(a->lasts);
  }
};

// The codebook and the requantizer's search levels in registers, and 16 lanes at a time of
// the two table operations. No gathers: they are microcoded on CPUs with the Gather Data
// Sampling mitigation, and measured no faster here (0.16 vs 0.22 ns per element).
struct Registers {
  __m512 codebook[16];  // 8 pairs: two-source permutes pick within 32 values
  __m512 level0, level1, level2, level3, level4, level5a, level5b, level6a, level6b, level6c,
      level6d, top;
  Arithmetic arithmetic;
#if defined(__AVX512VBMI__)
  __m512i planes[16];  // byte k of code values 64q .. 64q + 63 in planes[4k + q]
#endif

  explicit Registers(const Tables& t) : arithmetic(t.codec) {
    for (int k = 0; k < 16; ++k) codebook[k] = _mm512_loadu_ps(t.codebook + 16 * k);
#if defined(__AVX512VBMI__)
    if (t.codec)
      for (int k = 0; k < 4; ++k)
        for (int q = 0; q < 4; ++q) planes[4 * k + q] = _mm512_load_si512(t.codec->planes[k] + 64 * q);
#endif
    const float* levels = t.levels;
    if (!levels) return;  // decoding only
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

#if defined(__AVX512VBMI__)
// Where code_values64 puts element 16q + 4L + j's code: at byte 16L + 4q + j, since the byte
// interleaves below gather bytes 16L + 4q .. 16L + 4q + 3 of the four planes into lane L of
// output q.
alignas(64) constexpr uint8_t INTERLEAVED_ORDER[64] = {
    0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4, 5, 6, 7, 20, 21, 22, 23,
    36, 37, 38, 39, 52, 53, 54, 55, 8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59,
    12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};

// Code values of 64 codes into out[0..3] (16 each, in order), one byte plane of the codebook at
// a time: each two-source byte permute looks up 64 codes in 128 entries, so 22 instructions do
// what code_values does in 4 x 19 (0.36 -> 0.09 ns per element alone, and 0.99 -> 0.91 ns per
// element for the whole bf16 step, one thread, measured).
inline void code_values64(const uint8_t* codes, const Registers& r, __m512 out[4]) {
  __m512i index = _mm512_permutexvar_epi8(_mm512_load_si512(INTERLEAVED_ORDER), _mm512_loadu_si512(codes));
  __mmask64 high = _mm512_movepi8_mask(index);  // codes 128-255
  __m512i b[4];
  for (int k = 0; k < 4; ++k) {
    const __m512i* p = r.planes + 4 * k;
    b[k] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(p[0], index, p[1]),
                                  _mm512_permutex2var_epi8(p[2], index, p[3]));
  }
  __m512i low01 = _mm512_unpacklo_epi8(b[0], b[1]), high01 = _mm512_unpackhi_epi8(b[0], b[1]),
          low23 = _mm512_unpacklo_epi8(b[2], b[3]), high23 = _mm512_unpackhi_epi8(b[2], b[3]);
  out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(low01, low23));
  out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(low01, low23));
  out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(high01, high23));
  out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(high01, high23));
}
#endif

// One search level: n = 2n + (|x| > threshold).
inline __m512i descend(__m512i n, __m512 magnitude, __m512 threshold) {
  __m512i twice = _mm512_add_epi32(n, n);
  return _mm512_mask_add_epi32(twice, _mm512_cmp_ps_mask(magnitude, threshold, _CMP_GT_OQ), twice,
                               _mm512_set1_epi32(1));
}

// nearest_code of 16 values by the binary search: levels 0-4 by one-register permutes, level 5
// by a two-source permute, level 6 by two and a blend (0.5 ns per element measured, against 0.9
// for an exponent-keyed table with gathers and neighbour checks).
inline __m128i searched_codes16(__m512 value, const Registers& r) {
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

// nearest_code of 16 values: the arithmetic path (struct Arithmetic), else the search.
inline __m128i nearest_codes16(__m512 value, const Registers& r) {
#if !(defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__))
  return searched_codes16(value, r);  // vreduceps, vpmovd2m and byte blends need these
#else
  const Arithmetic& a = r.arithmetic;
  if (!a.exact) return searched_codes16(value, r);
  __m512i bits = _mm512_castps_si512(value);
  __m512i magnitude_bits = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
  __m512 magnitude = _mm512_castsi512_ps(magnitude_bits);
  // The octave of |x|, at least 2**-31: the exponent's low 5 bits index the tables. |x| <= 1 + 2**-23
  // (block values times 1 / absmax) keeps the top octave without a clamp; NaN indexes anything,
  // its t is NaN and takes the search below.
  __m512i octave = _mm512_srli_epi32(_mm512_max_epu32(magnitude_bits, _mm512_set1_epi32(0x30000000)), 23);
  __m512i region = _mm512_permutex2var_epi32(a.region_low, octave, a.region_high);
  __mmask16 above = _mm512_cmp_ps_mask(magnitude, _mm512_permutex2var_ps(a.boundary_low, octave, a.boundary_high), _CMP_GT_OQ);
  region = _mm512_mask_add_epi32(region, above, region, _mm512_set1_epi32(1));
  __m512 t = _mm512_fmadd_ps(magnitude, _mm512_permutexvar_ps(region, a.slope), _mm512_permutexvar_ps(region, a.offset));
  // n = 0 for x = +-0 (code 127), which the tables put in region 0 (n = 1).
  __m512i n = _mm512_maskz_min_epi32(_mm512_test_epi32_mask(magnitude_bits, magnitude_bits), _mm512_cvttps_epi32(t),
                                     _mm512_permutexvar_epi32(region, a.last));
  // Near an integer (or NaN): the floor may be off by one there.
  __m512 distance = _mm512_castsi512_ps(_mm512_and_si512(
      _mm512_castps_si512(_mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT)), _mm512_set1_epi32(0x7FFFFFFF)));
  if (__builtin_expect(_mm512_cmp_ps_mask(distance, _mm512_set1_ps(CodecTables::EPSILON), _CMP_NGE_UQ) != 0, 0))
    return searched_codes16(value, r);
  // 127 + n for x > 0, 127 - n for x < 0 (at least 0: -1.0 is not a code), 127 for +-0.
  __m128i small = _mm512_cvtepi32_epi8(n);
  const __m128i zero_code = _mm_set1_epi8(127);
  return _mm_mask_blend_epi8(_mm512_movepi32_mask(bits), _mm_add_epi8(small, zero_code), _mm_subs_epu8(zero_code, small));
#endif
}

#endif

}  // namespace
