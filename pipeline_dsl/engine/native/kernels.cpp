// agp native kernels: the whole decode step of a Llama decoder in one call, for small batches.
//
// Built by `make native` (or on first use, see __init__.py) with -march=native, for AVX-512 or
// AVX2 + FMA (each kernel written once on the 16-lane layer below), into a shared library with
// a C ABI, loaded with ctypes. It links the same libgomp as torch (one OpenMP pool): a step is ONE
// parallel region with barriers between its phases, instead of ~250 torch ops that each wake
// the pool. Weights are read in place from the model's tensors:
//
//   kind 0  f32 dense   w [N, K] float
//   kind 1  bf16 dense  w [N, K] bf16
//   kind 2  q4          w [N, K/2] nibbles (GGUF order: byte j = element j | element j+16 << 4),
//                       sz [N, K/32, 2] bf16 (scale s, zero z): w = (q - 8) * s + z   (torch's int4 form)
//   kind 3  q8          w [N, K] int8, s [N, K/32] float: w = q * s                    (GGUF Q8_0)
//   kind 4  q4 x16      kind 2's weights repacked for int8 dot products (layout at q4x_rows)
//   kind 5  q8 x16      kind 3's weights repacked for int8 dot products (layout at q8x_rows)
//   kind 6, 7           kinds 4 and 5 with each input in two int8 parts (quantize_rows)
//
// Numerics follow the eager path: activations are float inside; with `bf16` set every tensor
// that the eager path would store in bf16 (linear outputs, norms, RoPE, residual adds, attention
// output) is rounded to bf16 at the same point, so greedy tokens agree with it. Kinds 4 and 5
// are the exception, by design: they quantise their input to int8 per block of 32 (one float
// scale a block, as llama.cpp's Q8 activations) and multiply in int8 (AVX512-VNNI; AVX2's
// pmaddubsw or AVX-VNNI: i32x16 below), which reads the weights at memory speed where kinds 2
// and 3 are bound by converting every weight to float.
// The weights are the same; the dot products differ from kinds 2 and 3 by the activations'
// rounding: |error| <= half a step of 1/127 of each block's largest input in one part (kinds 4,
// 5: llama.cpp's numerics), 1/254 of that in two (kinds 6, 7: finer than bf16, twice the
// multiplies, still bound by memory at a few rows).
#include <immintrin.h>
#include <linux/futex.h>
#include <omp.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

extern "C" {

struct Lin {
    int32_t kind, N, K, round;   // round: the output is rounded to bf16 (the eager layer returns bf16)
    const void* w;
    const void* s;               // q4: bf16 [N, K/32, 2]; q8: float [N, K/32]
};

struct Layer {
    const float* attn_norm;      // [H]
    const float* ffn_norm;       // [H]
    Lin qkv, o, gate_up, down;
    const float* q_norm;         // [hd]: RMSNorm over each head of q before RoPE (Qwen3); null: none
    const float* k_norm;         // [hd]: the same over each head of k
};

struct Model {
    int32_t n_layers, hidden, inter, n_heads, n_kv, head_dim, vocab, block_size;
    float eps;
    int32_t bf16;                // round like the eager bf16 path
    int32_t embed_bf16;          // embed table dtype (1 bf16, 0 float)
    int32_t kv_bf16;             // KV pool dtype
    const void* embed;           // [V, H]
    const float* norm;           // [H]
    const float* cos;            // [P, hd] float (the eager tables' values; sin's first half negated)
    const float* sin;
    const Layer* layers;
    Lin lm_head;
    void* k_pool;                // [layers, slots + 1, kv, hd]
    void* v_pool;
    int64_t layer_stride;        // elements per layer of a pool
};

struct Step {
    int32_t B, nblk, n_out;
    int32_t spin_us;             // the step's barriers: spin this long, then sleep (Barrier); < 0: libgomp's
    const int64_t* tokens;       // [B]
    const int64_t* pos;          // [B] position of the token
    const int64_t* slots;        // [B] where its K/V is written
    const int64_t* tables;       // [B, nblk] block ids
    const int64_t* out_rows;     // [n_out] rows whose logits are wanted
    double* prof;                // null, or [nthreads, PHASES] seconds added per phase (see Phase)
};

// Where a thread's time in agp_decode_step goes, when Step.prof asks (bench/roofline.py).
enum Phase { P_GLUE, P_QKV, P_ATTENTION, P_O, P_GATE_UP, P_DOWN, P_HEAD, P_BARRIER, PHASES };

int agp_native_version() { return 9; }
int agp_phases() { return PHASES; }

// The instruction sets this library was compiled for (-march=native on the machine that built it),
// one bit each, in native.ISA_BITS's order: a loader refuses a library whose bits this CPU lacks
// before calling any kernel (a library built elsewhere would stop the process at its first
// instruction the CPU does not have). Plain code: safe to call on any x86-64.
int agp_isa() {
    return 0
#if defined(__AVX2__)
           | 1 << 0
#endif
#if defined(__FMA__)
           | 1 << 1
#endif
#if defined(__F16C__)
           | 1 << 2
#endif
#if defined(__AVX512F__)
           | 1 << 3
#endif
#if defined(__AVX512BW__)
           | 1 << 4
#endif
#if defined(__AVX512VL__)
           | 1 << 5
#endif
#if defined(__AVX512DQ__)
           | 1 << 6
#endif
#if defined(__AVX512VNNI__)
           | 1 << 7
#endif
#if defined(__AVX512BF16__)
           | 1 << 8
#endif
#if defined(__AVXVNNI__)
           | 1 << 9
#endif
        ;
}

}  // extern "C"

namespace {

// ---- 16 lanes at a time: one AVX-512 register, or two AVX2 ones --------------------------
//
// The kernels below are written once on this layer and compiled for the ISA that -march=native
// gives: `f32x16` is 16 floats, `i32x16` 64 bytes (16 int32 or 64 int8), `mask16` the first n of 16
// lanes. With AVX-512 each operation is the one intrinsic the kernels called before the layer
// existed (the same instructions); with AVX2 + FMA it is two 256-bit ones, or a few where AVX2
// has no instruction for it (masked tails, reductions, scalef, the int8 dot products).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define AGP_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define AGP_AVX512 0
#else
#error "agp's native kernels need AVX-512 (F, BW, VL, DQ) or AVX2 with FMA"
#endif

#define AGP_INLINE inline __attribute__((always_inline))

// A q4 block's dot products, 8 int32 lanes (rows) of sum_j u[j] . s[j] over its eight pairs of
// 32 bytes: u[j] 4 unsigned bytes a lane (nibbles: lanes' inputs 4j..4j+3, or 16 + those for
// j >= 4), s[j] the 4 signed input bytes they multiply, broadcast. With VNNI, vpdpbusd in two
// chains. Without: pmaddubsw sums each pair of products into an int16 (saturating, exact while a
// pair stays within 32767), and the eight results are summed in int16 before one pmaddwd widens
// them, instead of pmaddwd and an int32 add for each. Exact: with u <= 15 and |s| <= 128 (the
// inputs are within 127), a pmaddubsw lane is at most 2 * 15 * 128 = 3840 in magnitude and eight
// of them at most 8 * 3840 = 30720 <= 32767, so no int16 add wraps and the int32 sums are the
// same integers as one pmaddwd per pmaddubsw gave (tests/test_native_int8.py, at those extremes).
AGP_INLINE __m256i dot_u4_block_256(const __m256i* u, const __m256i* s) {
#if defined(__AVXVNNI__)
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
        a0 = _mm256_dpbusd_avx_epi32(a0, u[j], s[j]);
        a1 = _mm256_dpbusd_avx_epi32(a1, u[j + 4], s[j + 4]);
    }
    return _mm256_add_epi32(a0, a1);
#else
    __m256i p[8];
    for (int j = 0; j < 8; ++j) p[j] = _mm256_maddubs_epi16(u[j], s[j]);
    const __m256i lo = _mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3]));
    const __m256i hi = _mm256_add_epi16(_mm256_add_epi16(p[4], p[5]), _mm256_add_epi16(p[6], p[7]));
    return _mm256_madd_epi16(_mm256_add_epi16(lo, hi), _mm256_set1_epi16(1));
#endif
}

// The same for Q8's weights stored unsigned (w = q + 128). With VNNI: acc + sum w s, and the
// caller takes Q8_DOT_BIAS (128) times sum s back; without: a pair of 255 * 127 would saturate
// pmaddubsw, so it multiplies |q| by s with q's sign (at most 128 * 127 a product, 32512 a
// pair) into acc + sum q s, and Q8_DOT_BIAS is 0.
AGP_INLINE __m256i dot_q8_256(__m256i acc, __m256i w, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, w, s);
#else
    const __m256i q = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));
    const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(s, q));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}

#if defined(__AVXVNNI__) || defined(__AVX512VNNI__)
constexpr float Q8_DOT_BIAS = 128.0f;   // vi_dot_q8 below is vpdpbusd
#else
constexpr float Q8_DOT_BIAS = 0.0f;
#endif

#if AGP_AVX512

using f32x16 = __m512;
using i32x16 = __m512i;
using mask16 = __mmask16;

AGP_INLINE f32x16 vf_zero() { return _mm512_setzero_ps(); }
AGP_INLINE f32x16 vf_set(float x) { return _mm512_set1_ps(x); }
AGP_INLINE f32x16 vf_load(const float* p) { return _mm512_loadu_ps(p); }
AGP_INLINE f32x16 vf_load_aligned(const float* p) { return _mm512_load_ps(p); }
AGP_INLINE void vf_store(float* p, f32x16 v) { _mm512_storeu_ps(p, v); }
AGP_INLINE mask16 vmask_first(int n) { return (mask16)((1u << n) - 1); }             // 0 <= n <= 16
AGP_INLINE mask16 vmask_all() { return (mask16)0xFFFF; }
AGP_INLINE f32x16 vf_load_masked(mask16 k, const float* p) { return _mm512_maskz_loadu_ps(k, p); }
AGP_INLINE void vf_store_masked(float* p, mask16 k, f32x16 v) { _mm512_mask_storeu_ps(p, k, v); }
AGP_INLINE f32x16 vf_keep(mask16 k, f32x16 v) { return _mm512_maskz_mov_ps(k, v); }
AGP_INLINE f32x16 vf_add(f32x16 a, f32x16 b) { return _mm512_add_ps(a, b); }
AGP_INLINE f32x16 vf_sub(f32x16 a, f32x16 b) { return _mm512_sub_ps(a, b); }
AGP_INLINE f32x16 vf_mul(f32x16 a, f32x16 b) { return _mm512_mul_ps(a, b); }
AGP_INLINE f32x16 vf_div(f32x16 a, f32x16 b) { return _mm512_div_ps(a, b); }
AGP_INLINE f32x16 vf_max(f32x16 a, f32x16 b) { return _mm512_max_ps(a, b); }
AGP_INLINE f32x16 vf_min(f32x16 a, f32x16 b) { return _mm512_min_ps(a, b); }
AGP_INLINE f32x16 vf_and(f32x16 a, f32x16 b) { return _mm512_and_ps(a, b); }
AGP_INLINE f32x16 vf_fmadd(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fmadd_ps(a, b, c); }   // a b + c
AGP_INLINE f32x16 vf_fmsub(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fmsub_ps(a, b, c); }   // a b - c
AGP_INLINE float vf_reduce_add(f32x16 v) { return _mm512_reduce_add_ps(v); }
AGP_INLINE float vf_reduce_max(f32x16 v) { return _mm512_reduce_max_ps(v); }
AGP_INLINE f32x16 vf_round(f32x16 v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
AGP_INLINE f32x16 vf_scalef(f32x16 p, f32x16 n) { return _mm512_scalef_ps(p, n); }          // p 2^n, n whole
AGP_INLINE f32x16 vf_from_i32(i32x16 v) { return _mm512_cvtepi32_ps(v); }
AGP_INLINE f32x16 vf_cast(i32x16 v) { return _mm512_castsi512_ps(v); }
AGP_INLINE f32x16 vf_load_bf16(const uint16_t* p) {                                 // 16 bf16 as floats
    i32x16 v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

AGP_INLINE i32x16 vi_zero() { return _mm512_setzero_si512(); }
AGP_INLINE i32x16 vi_set32(int x) { return _mm512_set1_epi32(x); }
AGP_INLINE i32x16 vi_set8(char x) { return _mm512_set1_epi8(x); }
AGP_INLINE i32x16 vi_load(const void* p) { return _mm512_load_si512(p); }          // 64-byte aligned
AGP_INLINE i32x16 vi_cast(f32x16 v) { return _mm512_castps_si512(v); }
AGP_INLINE i32x16 vi_from_f32(f32x16 v) { return _mm512_cvtps_epi32(v); }               // nearest even
AGP_INLINE i32x16 vi_from_u8(__m128i b) { return _mm512_cvtepu8_epi32(b); }
AGP_INLINE i32x16 vi_from_i8(__m128i b) { return _mm512_cvtepi8_epi32(b); }
AGP_INLINE i32x16 vi_and(i32x16 a, i32x16 b) { return _mm512_and_si512(a, b); }
AGP_INLINE i32x16 vi_add32(i32x16 a, i32x16 b) { return _mm512_add_epi32(a, b); }
AGP_INLINE i32x16 vi_sub32(i32x16 a, i32x16 b) { return _mm512_sub_epi32(a, b); }
AGP_INLINE i32x16 vi_add64(i32x16 a, i32x16 b) { return _mm512_add_epi64(a, b); }
AGP_INLINE i32x16 vi_srli16(i32x16 a, int n) { return _mm512_srli_epi16(a, n); }
AGP_INLINE i32x16 vi_srli32(i32x16 a, int n) { return _mm512_srli_epi32(a, n); }
AGP_INLINE int vi_reduce_add32(i32x16 v) { return _mm512_reduce_add_epi32(v); }
AGP_INLINE int64_t vi_reduce_add64(i32x16 v) { return _mm512_reduce_add_epi64(v); }
AGP_INLINE void vi_store_i8(int8_t* p, i32x16 v) {                                  // 16 int32 -> int8
    _mm_storeu_si128((__m128i*)p, _mm512_cvtepi32_epi8(v));
}

// The 16 rows' dot products of a q4 block (dot_u4_block_256): lo[j] and hi[j] the rows' nibbles of
// inputs 4j..4j+3 and 16 + those, x the block's 32 int8 inputs as 8 words.
#if defined(__AVX512VNNI__)
AGP_INLINE i32x16 vi_dot_u4_block(const i32x16* lo, const i32x16* hi, const int32_t* x) {
    i32x16 a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    for (int j = 0; j < 4; ++j) {
        a0 = _mm512_dpbusd_epi32(a0, lo[j], _mm512_set1_epi32(x[j]));
        a1 = _mm512_dpbusd_epi32(a1, hi[j], _mm512_set1_epi32(x[j + 4]));
    }
    return _mm512_add_epi32(a0, a1);
}
AGP_INLINE i32x16 vi_dot_q8(i32x16 acc, i32x16 w, i32x16 s) { return _mm512_dpbusd_epi32(acc, w, s); }
#else   // AVX-512 without VNNI (Skylake): q4 in int16 as dot_u4_block_256 (the same bound), Q8 the AVX2 form on each half
AGP_INLINE i32x16 vi_dot_u4_block(const i32x16* lo, const i32x16* hi, const int32_t* x) {
    __m512i p[8];
    for (int j = 0; j < 4; ++j) {
        p[j] = _mm512_maddubs_epi16(lo[j], _mm512_set1_epi32(x[j]));
        p[j + 4] = _mm512_maddubs_epi16(hi[j], _mm512_set1_epi32(x[j + 4]));
    }
    const __m512i a = _mm512_add_epi16(_mm512_add_epi16(p[0], p[1]), _mm512_add_epi16(p[2], p[3]));
    const __m512i b = _mm512_add_epi16(_mm512_add_epi16(p[4], p[5]), _mm512_add_epi16(p[6], p[7]));
    return _mm512_madd_epi16(_mm512_add_epi16(a, b), _mm512_set1_epi16(1));
}
AGP_INLINE i32x16 vi_dot_q8(i32x16 acc, i32x16 w, i32x16 s) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(dot_q8_256(_mm512_castsi512_si256(acc), _mm512_castsi512_si256(w),
                                                                _mm512_castsi512_si256(s))),
                              dot_q8_256(_mm512_extracti64x4_epi64(acc, 1), _mm512_extracti64x4_epi64(w, 1),
                                         _mm512_extracti64x4_epi64(s, 1)), 1);
}
#endif

#else  // AVX2 + FMA: lanes 0-7 in .a, 8-15 in .b

struct f32x16 { __m256 a, b; };
struct i32x16 { __m256i a, b; };
struct mask16 { __m256i a, b; };

AGP_INLINE f32x16 vf_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
AGP_INLINE f32x16 vf_set(float x) { const __m256 v = _mm256_set1_ps(x); return {v, v}; }
AGP_INLINE f32x16 vf_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
AGP_INLINE f32x16 vf_load_aligned(const float* p) { return {_mm256_load_ps(p), _mm256_load_ps(p + 8)}; }
AGP_INLINE void vf_store(float* p, f32x16 v) { _mm256_storeu_ps(p, v.a); _mm256_storeu_ps(p + 8, v.b); }
AGP_INLINE mask16 vmask_all() { return {_mm256_set1_epi32(-1), _mm256_set1_epi32(-1)}; }
AGP_INLINE mask16 vmask_first(int n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), nv = _mm256_set1_epi32(n);
    return {_mm256_cmpgt_epi32(nv, lane), _mm256_cmpgt_epi32(nv, _mm256_add_epi32(lane, _mm256_set1_epi32(8)))};
}
AGP_INLINE f32x16 vf_load_masked(mask16 k, const float* p) {                        // lanes off: 0, not read
    return {_mm256_maskload_ps(p, k.a), _mm256_maskload_ps(p + 8, k.b)};
}
AGP_INLINE void vf_store_masked(float* p, mask16 k, f32x16 v) {
    _mm256_maskstore_ps(p, k.a, v.a);
    _mm256_maskstore_ps(p + 8, k.b, v.b);
}
AGP_INLINE f32x16 vf_keep(mask16 k, f32x16 v) {
    return {_mm256_and_ps(v.a, _mm256_castsi256_ps(k.a)), _mm256_and_ps(v.b, _mm256_castsi256_ps(k.b))};
}
#define AGP_VF2(name, op) \
    AGP_INLINE f32x16 name(f32x16 x, f32x16 y) { return {op(x.a, y.a), op(x.b, y.b)}; }
AGP_VF2(vf_add, _mm256_add_ps)
AGP_VF2(vf_sub, _mm256_sub_ps)
AGP_VF2(vf_mul, _mm256_mul_ps)
AGP_VF2(vf_div, _mm256_div_ps)
AGP_VF2(vf_max, _mm256_max_ps)
AGP_VF2(vf_min, _mm256_min_ps)
AGP_VF2(vf_and, _mm256_and_ps)
#undef AGP_VF2
AGP_INLINE f32x16 vf_fmadd(f32x16 x, f32x16 y, f32x16 z) {
    return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)};
}
AGP_INLINE f32x16 vf_fmsub(f32x16 x, f32x16 y, f32x16 z) {
    return {_mm256_fmsub_ps(x.a, y.a, z.a), _mm256_fmsub_ps(x.b, y.b, z.b)};
}
AGP_INLINE float vf_reduce_add(f32x16 v) {
    const __m256 s = _mm256_add_ps(v.a, v.b);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
AGP_INLINE float vf_reduce_max(f32x16 v) {
    const __m256 s = _mm256_max_ps(v.a, v.b);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
AGP_INLINE f32x16 vf_round(f32x16 v) {
    return {_mm256_round_ps(v.a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
            _mm256_round_ps(v.b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// p 2^n for whole n in [-126, 127] (exp16's range): 2^n built in the exponent field, exact as
// scalef is
AGP_INLINE __m256 pow2_256(__m256 n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
AGP_INLINE f32x16 vf_scalef(f32x16 p, f32x16 n) {
    return {_mm256_mul_ps(p.a, pow2_256(n.a)), _mm256_mul_ps(p.b, pow2_256(n.b))};
}
AGP_INLINE f32x16 vf_from_i32(i32x16 v) { return {_mm256_cvtepi32_ps(v.a), _mm256_cvtepi32_ps(v.b)}; }
AGP_INLINE f32x16 vf_cast(i32x16 v) { return {_mm256_castsi256_ps(v.a), _mm256_castsi256_ps(v.b)}; }
AGP_INLINE f32x16 vf_load_bf16(const uint16_t* p) {
    const __m256i a = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    const __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p + 8)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16))};
}

AGP_INLINE i32x16 vi_zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
AGP_INLINE i32x16 vi_set32(int x) { const __m256i v = _mm256_set1_epi32(x); return {v, v}; }
AGP_INLINE i32x16 vi_set8(char x) { const __m256i v = _mm256_set1_epi8(x); return {v, v}; }
AGP_INLINE i32x16 vi_load(const void* p) {
    return {_mm256_load_si256((const __m256i*)p), _mm256_load_si256((const __m256i*)p + 1)};
}
AGP_INLINE i32x16 vi_cast(f32x16 v) { return {_mm256_castps_si256(v.a), _mm256_castps_si256(v.b)}; }
AGP_INLINE i32x16 vi_from_f32(f32x16 v) { return {_mm256_cvtps_epi32(v.a), _mm256_cvtps_epi32(v.b)}; }
AGP_INLINE i32x16 vi_from_u8(__m128i b) {
    return {_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))};
}
AGP_INLINE i32x16 vi_from_i8(__m128i b) {
    return {_mm256_cvtepi8_epi32(b), _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))};
}
#define AGP_VI2(name, op) \
    AGP_INLINE i32x16 name(i32x16 x, i32x16 y) { return {op(x.a, y.a), op(x.b, y.b)}; }
AGP_VI2(vi_and, _mm256_and_si256)
AGP_VI2(vi_add32, _mm256_add_epi32)
AGP_VI2(vi_sub32, _mm256_sub_epi32)
AGP_VI2(vi_add64, _mm256_add_epi64)
#undef AGP_VI2
AGP_INLINE i32x16 vi_srli16(i32x16 v, int n) { return {_mm256_srli_epi16(v.a, n), _mm256_srli_epi16(v.b, n)}; }
AGP_INLINE i32x16 vi_srli32(i32x16 v, int n) { return {_mm256_srli_epi32(v.a, n), _mm256_srli_epi32(v.b, n)}; }
AGP_INLINE int vi_reduce_add32(i32x16 v) {
    const __m256i s = _mm256_add_epi32(v.a, v.b);
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1)));
}
AGP_INLINE int64_t vi_reduce_add64(i32x16 v) {
    const __m256i s = _mm256_add_epi64(v.a, v.b);
    const __m128i h = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    return _mm_cvtsi128_si64(h) + _mm_extract_epi64(h, 1);
}
AGP_INLINE void vi_store_i8(int8_t* p, i32x16 v) {   // 16 int32 in [-128, 127] -> int8 (as cvtepi32_epi8)
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(v.a, v.b), 0xD8);   // int16, in order
    _mm_storeu_si128((__m128i*)p, _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
}
AGP_INLINE i32x16 vi_dot_u4_block(const i32x16* lo, const i32x16* hi, const int32_t* x) {   // as AVX-512's
    __m256i s[8], ua[8], ub[8];
    for (int j = 0; j < 4; ++j) {
        s[j] = _mm256_set1_epi32(x[j]);
        s[j + 4] = _mm256_set1_epi32(x[j + 4]);
        ua[j] = lo[j].a, ua[j + 4] = hi[j].a;
        ub[j] = lo[j].b, ub[j + 4] = hi[j].b;
    }
    return {dot_u4_block_256(ua, s), dot_u4_block_256(ub, s)};
}
AGP_INLINE i32x16 vi_dot_q8(i32x16 acc, i32x16 w, i32x16 s) {
    return {dot_q8_256(acc.a, w.a, s.a), dot_q8_256(acc.b, w.b, s.b)};
}

#endif

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_bf16(float f) {   // round to nearest even (no NaNs here)
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return uint16_t(u >> 16);
}

inline float rb(float f) { return bf16_to_f32(f32_to_bf16(f)); }

inline f32x16 rb16(f32x16 x);

inline void round_vec(float* x, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) vf_store(x + i, rb16(vf_load(x + i)));
    for (; i < n; ++i) x[i] = rb(x[i]);
}

// 16 floats rounded to bf16 (nearest even), kept as floats
inline f32x16 rb16(f32x16 x) {
    i32x16 u = vi_cast(x);
    const i32x16 lsb = vi_and(vi_srli32(u, 16), vi_set32(1));
    u = vi_add32(u, vi_add32(lsb, vi_set32(0x7FFF)));
    return vf_cast(vi_and(u, vi_set32((int)0xFFFF0000u)));
}

// exp for 16 lanes: 2^n * 2^f, |f| <= 1/2, degree-7 polynomial (error ~1 ulp of float)
inline f32x16 exp16(f32x16 x) {
    x = vf_max(vf_min(x, vf_set(88.0f)), vf_set(-87.0f));
    const f32x16 t = vf_mul(x, vf_set(1.44269504088896341f));
    const f32x16 n = vf_round(t);
    const f32x16 f = vf_sub(t, n);
    f32x16 p = vf_set(1.525273380405984e-05f);
    p = vf_fmadd(p, f, vf_set(1.5403530393381606e-04f));
    p = vf_fmadd(p, f, vf_set(1.3333558146428443e-03f));
    p = vf_fmadd(p, f, vf_set(9.618129107628477e-03f));
    p = vf_fmadd(p, f, vf_set(5.550410866482158e-02f));
    p = vf_fmadd(p, f, vf_set(2.402265069591007e-01f));
    p = vf_fmadd(p, f, vf_set(6.931471805599453e-01f));
    p = vf_fmadd(p, f, vf_set(1.0f));
    return vf_scalef(p, n);
}

// x[i] = exp(x[i] - mx) for n values; returns their sum
inline float exp_sub_sum(float* x, int n, float mx) {
    f32x16 acc = vf_zero();
    const f32x16 m = vf_set(mx);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        f32x16 e = exp16(vf_sub(vf_load(x + i), m));
        vf_store(x + i, e);
        acc = vf_add(acc, e);
    }
    if (i < n) {
        const mask16 k = vmask_first(n - i);
        f32x16 e = exp16(vf_sub(vf_load_masked(k, x + i), m));
        vf_store_masked(x + i, k, e);
        acc = vf_add(acc, vf_keep(k, e));
    }
    return vf_reduce_add(acc);
}

// out[i] = silu(g[i]) * u[i] (each step rounded to bf16 when bf16), n % 16 == 0
inline void silu_mul(const float* g, const float* u, float* out, int n, bool bf16) {
    const f32x16 one = vf_set(1.0f);
    for (int i = 0; i < n; i += 16) {
        const f32x16 gv = vf_load(g + i);
        f32x16 sl = vf_div(gv, vf_add(one, exp16(vf_sub(vf_zero(), gv))));
        if (bf16) sl = rb16(sl);
        f32x16 r = vf_mul(sl, vf_load(u + i));
        if (bf16) r = rb16(r);
        vf_store(out + i, r);
    }
}

// ---- linear layers: rows [n0, n1) of y[t, n] = sum_k x[t, k] w[n, k], T <= 8 -----------------

template <int T>
void q4_rows(const Lin& L, const float* x, float* y, int n0, int n1) {
    // each block dequantised once, w = (q - 8) * s + z, then one FMA per 16 weights per row
    const int K = L.K, nb = K / 32, N = L.N;
    const uint8_t* W = (const uint8_t*)L.w;
    const uint16_t* SZ = (const uint16_t*)L.s;
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const i32x16 eight = vi_set32(8);
    for (int n = n0; n < n1; ++n) {
        const uint8_t* w = W + (int64_t)n * (K / 2);
        const uint16_t* sz = SZ + (int64_t)n * nb * 2;
        f32x16 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = vf_zero();
        for (int b = 0; b < nb; ++b) {
            const __m128i bytes = _mm_loadu_si128((const __m128i*)(w + 16 * b));
            const f32x16 sv = vf_set(bf16_to_f32(sz[2 * b])), zv = vf_set(bf16_to_f32(sz[2 * b + 1]));
            const f32x16 lo = vf_fmadd(vf_from_i32(vi_sub32(
                vi_from_u8(_mm_and_si128(bytes, m4)), eight)), sv, zv);
            const f32x16 hi = vf_fmadd(vf_from_i32(vi_sub32(
                vi_from_u8(_mm_and_si128(_mm_srli_epi16(bytes, 4), m4)), eight)), sv, zv);
            for (int t = 0; t < T; ++t) {
                const float* xt = x + (int64_t)t * K + 32 * b;
                acc[t] = vf_fmadd(hi, vf_load(xt + 16), vf_fmadd(lo, vf_load(xt), acc[t]));
            }
        }
        for (int t = 0; t < T; ++t) y[(int64_t)t * N + n] = vf_reduce_add(acc[t]);
    }
}

template <int T>
void q8_rows(const Lin& L, const float* x, float* y, int n0, int n1) {
    // each block dequantised once (w = q * s), then one FMA per 16 weights per row
    const int K = L.K, nb = K / 32, N = L.N;
    const int8_t* W = (const int8_t*)L.w;
    const float* S = (const float*)L.s;
    for (int n = n0; n < n1; ++n) {
        const int8_t* w = W + (int64_t)n * K;
        const float* s = S + (int64_t)n * nb;
        f32x16 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = vf_zero();
        for (int b = 0; b < nb; ++b) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(w + 32 * b));
            const f32x16 sv = vf_set(s[b]);
            const f32x16 lo = vf_mul(vf_from_i32(vi_from_i8(_mm256_castsi256_si128(v))), sv);
            const f32x16 hi = vf_mul(vf_from_i32(vi_from_i8(_mm256_extracti128_si256(v, 1))), sv);
            for (int t = 0; t < T; ++t) {
                const float* xt = x + (int64_t)t * K + 32 * b;
                acc[t] = vf_fmadd(hi, vf_load(xt + 16), vf_fmadd(lo, vf_load(xt), acc[t]));
            }
        }
        for (int t = 0; t < T; ++t) y[(int64_t)t * N + n] = vf_reduce_add(acc[t]);
    }
}

template <int T>
void bf16_rows(const Lin& L, const float* x, float* y, int n0, int n1) {
    const int K = L.K, N = L.N;
    const uint16_t* W = (const uint16_t*)L.w;
    for (int n = n0; n < n1; ++n) {
        const uint16_t* w = W + (int64_t)n * K;
        f32x16 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = vf_zero();
        for (int k = 0; k < K; k += 16) {
            f32x16 wv = vf_load_bf16(w + k);
            for (int t = 0; t < T; ++t) acc[t] = vf_fmadd(wv, vf_load(x + (int64_t)t * K + k), acc[t]);
        }
        for (int t = 0; t < T; ++t) y[(int64_t)t * N + n] = vf_reduce_add(acc[t]);
    }
}

template <int T>
void f32_rows(const Lin& L, const float* x, float* y, int n0, int n1) {
    const int K = L.K, N = L.N;
    const float* W = (const float*)L.w;
    for (int n = n0; n < n1; ++n) {
        const float* w = W + (int64_t)n * K;
        f32x16 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = vf_zero();
        for (int k = 0; k < K; k += 16) {
            f32x16 wv = vf_load(w + k);
            for (int t = 0; t < T; ++t) acc[t] = vf_fmadd(wv, vf_load(x + (int64_t)t * K + k), acc[t]);
        }
        for (int t = 0; t < T; ++t) y[(int64_t)t * N + n] = vf_reduce_add(acc[t]);
    }
}


// ---- int8 activations (kinds 4-7) ----------------------------------------------------------
//
// An input row x [K] is quantised per block of 32: hi = round(x / d), d = max|x| / 127, and
// with two parts the rounding left over too, lo = round((x / d - hi) * 254), so that
// x ~ d (hi + lo / 254) to 1/(2 * 127 * 254) of the block's largest value. Each block's
// constants are precomputed for the kernels below (qs = sum of x / d as quantised).
constexpr float LO = 254.0f;

struct XBlk {
    float d;        // scale
    float c8;       // 8 * qs * d    (q4: the -8 of (q - 8) * s)
    float c1;       // qs * d        (q4: the zero z times the block's sum)
    float c128;     // 128 * qs * d  (q8: the +128 that makes the weights unsigned)
};

// x [T, K] -> q [T, parts, K] int8 (hi, then lo when parts == 2), meta [T, K/32]
void quantize_rows(const float* x, int T, int K, int parts, int8_t* q, XBlk* meta) {
    const f32x16 sign = vf_cast(vi_set32(0x7FFFFFFF));
    for (int t = 0; t < T; ++t)
        for (int b = 0; b < K / 32; ++b) {
            const float* xb = x + (int64_t)t * K + 32 * b;
            const f32x16 v0 = vf_load(xb), v1 = vf_load(xb + 16);
            int8_t* qb = q + (int64_t)t * parts * K + 32 * b;
            // an inf or NaN in the block: x * 0 is NaN there (max would drop a NaN, and the int8
            // conversion of inf or NaN differs by ISA: 0 with AVX-512, -128 with AVX2's packs).
            // Zero codes and a NaN scale: the row's outputs are NaN, non-finite as torch's are
            if (vf_reduce_add(vf_add(vf_mul(v0, vf_zero()), vf_mul(v1, vf_zero()))) != 0.f) {
                for (int p = 0; p < parts; ++p) std::memset(qb + (int64_t)p * K, 0, 32);
                const float nan = __builtin_nanf("");
                meta[(int64_t)t * (K / 32) + b] = XBlk{nan, nan, nan, nan};
                continue;
            }
            const float amax = vf_reduce_max(vf_max(vf_and(v0, sign), vf_and(v1, sign)));
            const float d = amax / 127.0f, id = amax > 0.f ? 127.0f / amax : 0.f;
            const f32x16 s0 = vf_mul(v0, vf_set(id)), s1 = vf_mul(v1, vf_set(id));
            const i32x16 q0 = vi_from_f32(s0), q1 = vi_from_f32(s1);   // nearest even
            vi_store_i8(qb, q0);
            vi_store_i8(qb + 16, q1);
            float qs = (float)vi_reduce_add32(vi_add32(q0, q1));
            if (parts == 2) {
                const f32x16 lo = vf_set(LO);
                const i32x16 r0 = vi_from_f32(vf_mul(vf_sub(s0, vf_from_i32(q0)), lo));
                const i32x16 r1 = vi_from_f32(vf_mul(vf_sub(s1, vf_from_i32(q1)), lo));
                vi_store_i8(qb + K, r0);
                vi_store_i8(qb + K + 16, r1);
                qs += (float)vi_reduce_add32(vi_add32(r0, r1)) / LO;
            }
            meta[(int64_t)t * (K / 32) + b] = XBlk{d, 8.f * qs * d, qs * d, 128.f * qs * d};
        }
}

// y[t, 16 g + i] = acc[t][i] for the rows that exist (the last group of N % 16 != 0 is padded)
template <int T>
inline void store_group(float* y, int N, int g, const f32x16* acc) {
    const mask16 k = N - 16 * g >= 16 ? vmask_all() : vmask_first(N - 16 * g);
    for (int t = 0; t < T; ++t) vf_store_masked(y + (int64_t)t * N + 16 * g, k, acc[t]);
}

// Kind 4: 16 output rows interleaved, one 320-byte record per group of 16 rows and block of 32
// inputs, the records of a group in input order (so a thread streams one contiguous range):
//   bytes [64 j, 64 j + 64), j < 4:  byte 4 i + t = q[row i][4 j + t] | q[row i][16 + 4 j + t] << 4
//   bytes [256, 288): the 16 rows' scales s (bf16), [288, 320): their zeros z (bf16)
// so one 64-byte load, masked or shifted, is 16 rows x 4 consecutive inputs of unsigned q, the
// operand vpdpbusd multiplies by 4 broadcast int8 inputs. With the input x = d * qx:
//   sum_k ((q - 8) s + z) x = d s (sum q qx) - 8 d s qs + d z qs
// (with two parts, sum q qx = sum q hi + (sum q lo) / 254).
template <int T, int PARTS>
void q4x_rows(const Lin& L, const int8_t* xq, const XBlk* xm, float* y, int g0, int g1) {
    const int K = L.K, nb = K / 32, N = L.N;
    const i32x16 m4 = vi_set8(0x0F);
    for (int g = g0; g < g1; ++g) {
        const uint8_t* p = (const uint8_t*)L.w + (int64_t)g * nb * 320;
        f32x16 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = vf_zero();
        for (int b = 0; b < nb; ++b, p += 320) {
            _mm_prefetch((const char*)p + 2560, _MM_HINT_T0);
            _mm_prefetch((const char*)p + 2624, _MM_HINT_T0);
            _mm_prefetch((const char*)p + 2688, _MM_HINT_T0);
            _mm_prefetch((const char*)p + 2752, _MM_HINT_T0);
            _mm_prefetch((const char*)p + 2816, _MM_HINT_T0);
            i32x16 lo[4], hi[4];
            for (int j = 0; j < 4; ++j) {
                const i32x16 v = vi_load(p + 64 * j);
                lo[j] = vi_and(v, m4);
                hi[j] = vi_and(vi_srli16(v, 4), m4);
            }
            const f32x16 s = vf_load_bf16((const uint16_t*)(p + 256)), z = vf_load_bf16((const uint16_t*)(p + 288));
            for (int t = 0; t < T; ++t) {
                const int32_t* xw = (const int32_t*)(xq + (int64_t)t * PARTS * K + 32 * b);
                const XBlk& m = xm[(int64_t)t * nb + b];
                f32x16 f = vf_from_i32(vi_dot_u4_block(lo, hi, xw));
                if (PARTS == 2)
                    f = vf_fmadd(vf_from_i32(vi_dot_u4_block(lo, hi, xw + K / 4)), vf_set(1.0f / LO), f);
                acc[t] = vf_fmadd(s, vf_fmsub(f, vf_set(m.d), vf_set(m.c8)), acc[t]);
                acc[t] = vf_fmadd(z, vf_set(m.c1), acc[t]);
            }
        }
        store_group<T>(y, N, g, acc);
    }
}

// Kind 5: 16 output rows interleaved, one 576-byte record per group of 16 rows and block of 32:
//   bytes [64 j, 64 j + 64), j < 8:  byte 4 i + t = q[row i][4 j + t] + 128 (unsigned)
//   bytes [512, 576): the 16 rows' scales (float)
// vpdpbusd multiplies unsigned by signed bytes: the weights carry +128, taken back as
//   sum_k q x = d (sum (q + 128) qx) - 128 d qs.
template <int T, int PARTS>
void q8x_rows(const Lin& L, const int8_t* xq, const XBlk* xm, float* y, int g0, int g1) {
    const int K = L.K, nb = K / 32, N = L.N;
    for (int g = g0; g < g1; ++g) {
        const uint8_t* p = (const uint8_t*)L.w + (int64_t)g * nb * 576;
        f32x16 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = vf_zero();
        for (int b = 0; b < nb; ++b, p += 576) {
            for (int c = 0; c < 9; ++c) _mm_prefetch((const char*)p + 4608 + 64 * c, _MM_HINT_T0);
            i32x16 w[8];
            for (int j = 0; j < 8; ++j) w[j] = vi_load(p + 64 * j);
            const f32x16 s = vf_load_aligned((const float*)(p + 512));
            for (int t = 0; t < T; ++t) {
                const int32_t* xw = (const int32_t*)(xq + (int64_t)t * PARTS * K + 32 * b);
                i32x16 a0 = vi_zero(), a1 = vi_zero();
                for (int j = 0; j < 8; j += 2) {
                    a0 = vi_dot_q8(a0, w[j], vi_set32(xw[j]));
                    a1 = vi_dot_q8(a1, w[j + 1], vi_set32(xw[j + 1]));
                }
                const XBlk& m = xm[(int64_t)t * nb + b];
                f32x16 f = vf_from_i32(vi_add32(a0, a1));
                if (PARTS == 2) {
                    const int32_t* xl = xw + K / 4;
                    i32x16 b0 = vi_zero(), b1 = vi_zero();
                    for (int j = 0; j < 8; j += 2) {
                        b0 = vi_dot_q8(b0, w[j], vi_set32(xl[j]));
                        b1 = vi_dot_q8(b1, w[j + 1], vi_set32(xl[j + 1]));
                    }
                    f = vf_fmadd(vf_from_i32(vi_add32(b0, b1)), vf_set(1.0f / LO), f);
                }
                acc[t] = vf_fmadd(s, vf_fmsub(f, vf_set(m.d), vf_set(Q8_DOT_BIAS == 0.0f ? 0.0f : m.c128)), acc[t]);
            }
        }
        store_group<T>(y, N, g, acc);
    }
}

template <int T>
void x16_rows(const Lin& L, const int8_t* xq, const XBlk* xm, float* y, int g0, int g1) {
    switch (L.kind) {
        case 4: q4x_rows<T, 1>(L, xq, xm, y, g0, g1); break;
        case 5: q8x_rows<T, 1>(L, xq, xm, y, g0, g1); break;
        case 6: q4x_rows<T, 2>(L, xq, xm, y, g0, g1); break;
        default: q8x_rows<T, 2>(L, xq, xm, y, g0, g1); break;
    }
}

template <int T>
void rows_t(const Lin& L, const float* x, float* y, int n0, int n1) {
    switch (L.kind) {
        case 0: f32_rows<T>(L, x, y, n0, n1); break;
        case 1: bf16_rows<T>(L, x, y, n0, n1); break;
        case 2: q4_rows<T>(L, x, y, n0, n1); break;
        default: q8_rows<T>(L, x, y, n0, n1); break;
    }
}

// What a linear reads of its input x [T, K] float: kinds 4-7 only its int8 blocks (the
// quantised x and each block's constants).
struct In {
    const float* x;
    const int8_t* xq;   // [T, parts, K] (kinds 4-7)
    const XBlk* xm;     // [T, K/32]
};

inline bool int8_kind(const Lin& L) { return L.kind >= 4 && L.kind <= 7; }
inline int int8_parts(const Lin& L) { return L.kind >= 6 ? 2 : 1; }

// y[T, N] for output rows [n0, n1) (n0 a multiple of 16 for kinds 4, 5; n1 too unless it is N).
void linear_rows(const Lin& L, const In& in, int T, float* y, int n0, int n1) {
    const int K = L.K, N = L.N;
    if (int8_kind(L)) {
        // up to 8 rows a pass over a few groups' records, which stay in cache for the next pass
        const int G0 = n0 / 16, G1 = (n1 + 15) / 16, span = T > 8 ? 4 : G1 - G0;
        for (int ga = G0; ga < G1; ga += span) {
            const int gb = ga + span < G1 ? ga + span : G1;
            for (int t0 = 0; t0 < T; t0 += 8) {
                const int tn = T - t0 < 8 ? T - t0 : 8;
                const int8_t* xq = in.xq + (int64_t)t0 * int8_parts(L) * K;
                const XBlk* xm = in.xm + (int64_t)t0 * (K / 32);
                float* yt = y + (int64_t)t0 * N;
                switch (tn) {
#define ROWS(n) case n: x16_rows<n>(L, xq, xm, yt, ga, gb); break;
                    ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7)
#undef ROWS
                    default: x16_rows<8>(L, xq, xm, yt, ga, gb); break;
                }
            }
        }
    } else {
        for (int t0 = 0; t0 < T; t0 += 16) {     // up to 16 rows a pass over the weights
            const int tn = T - t0 < 16 ? T - t0 : 16;
            const float* xt = in.x + (int64_t)t0 * K;
            float* yt = y + (int64_t)t0 * N;
            switch (tn) {
#define ROWS(n) case n: rows_t<n>(L, xt, yt, n0, n1); break;
                ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
                ROWS(9) ROWS(10) ROWS(11) ROWS(12) ROWS(13) ROWS(14) ROWS(15)
#undef ROWS
                default: rows_t<16>(L, xt, yt, n0, n1); break;
            }
        }
    }
    if (L.round)
        for (int t = 0; t < T; ++t) round_vec(y + (int64_t)t * N + n0, n1 - n0);
}

// A thread's buffers for a linear's input (what `prepare` derives from x), grown on first use.
struct InBuf {
    std::vector<int8_t> xq;
    std::vector<XBlk> xm;

    In prepare(const Lin& L, const float* x, int T) {
        In in{x, nullptr, nullptr};
        if (int8_kind(L)) {
            const size_t nb = (size_t)T * (L.K / 32);
            if (xq.size() < nb * 32 * int8_parts(L)) xq.resize(nb * 32 * int8_parts(L));
            if (xm.size() < nb) xm.resize(nb);
            quantize_rows(x, T, L.K, int8_parts(L), xq.data(), xm.data());
            in.xq = xq.data();
            in.xm = xm.data();
        }
        return in;
    }
};

// The barrier between a decode step's phases (~150 a step). libgomp's spins up to GOMP_SPINCOUNT
// (300,000 pauses: milliseconds) before it sleeps; while another process holds a core, a thread
// that arrived early spins through the time slice that the descheduled thread it waits for needs,
// and a 6 ms step took 0.1-1 s. This one spins at most spin_us microseconds (a quiet step's waits
// are shorter), then sleeps on a futex until the last thread to arrive wakes it. A thread whose
// recent waits mostly outlasted the spin (the others are descheduled, not slower) stops spinning
// and sleeps at once, until its waits are short again.
struct alignas(64) Barrier {
    std::atomic<int> arrived{0};
    std::atomic<int> gen{0};        // the futex word: +1 each time every thread has arrived
    std::atomic<int> sleepers{0};
};

inline double now_us() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

inline long futex(std::atomic<int>* word, int op, int val) {
    return syscall(SYS_futex, reinterpret_cast<int*>(word), op, val, nullptr, nullptr, 0);
}

// the share of this thread's recent barrier waits that outlasted the spin (a moving average of
// the last ~16); above SLEEP_AT the thread sleeps at once. Pool threads live on: it carries over.
thread_local float long_waits = 0.0f;
constexpr float SLEEP_AT = 0.25f;

// All n threads of the team call it; none returns before the last has arrived.
void barrier_wait(Barrier& b, int n, int spin_us) {
    const int g = b.gen.load(std::memory_order_acquire);
    if (b.arrived.fetch_add(1, std::memory_order_acq_rel) == n - 1) {   // the last: release the others
        b.arrived.store(0, std::memory_order_relaxed);
        b.gen.store(g + 1, std::memory_order_seq_cst);
        if (b.sleepers.load(std::memory_order_seq_cst) > 0) futex(&b.gen, FUTEX_WAKE_PRIVATE, INT_MAX);
        return;
    }
    const double t0 = now_us(), until = long_waits < SLEEP_AT ? t0 + spin_us : t0;
    for (int i = 0; b.gen.load(std::memory_order_acquire) == g; ++i) {
        if (i % 64 == 0 && now_us() >= until) {
            // seq_cst with the releaser's store and load: either it sees this sleeper and wakes it,
            // or the futex finds gen changed and returns at once
            b.sleepers.fetch_add(1, std::memory_order_seq_cst);
            while (b.gen.load(std::memory_order_seq_cst) == g) futex(&b.gen, FUTEX_WAIT_PRIVATE, g);
            b.sleepers.fetch_sub(1, std::memory_order_relaxed);
            break;
        }
        _mm_pause();
    }
    long_waits += ((now_us() - t0 > spin_us ? 1.0f : 0.0f) - long_waits) * (1.0f / 16);
}

// A linear's work queue inside one parallel region (one per call; zero before the region).
struct alignas(64) Queue {
    std::atomic<int> taken{0};
};

// Inside a parallel region (all threads call): the rows of one linear, in chunks of whole groups
// of 16 rows taken from q. With two threads one takes chunks from the front and the other from
// the back, each streaming its end of the weights in order, until they meet: a thread that runs
// slower (or is descheduled by another process) leaves its remaining chunks to the other instead
// of making it wait at the next barrier. Without q: an even static split.
void linear_par(const Lin& L, const In& in, int T, float* y, Queue* q = nullptr) {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int groups = (L.N + 15) / 16;
    auto rows = [&](int g0, int g1) {
        const int n0 = g0 * 16, n1 = g1 * 16 < L.N ? g1 * 16 : L.N;
        if (n0 < n1) linear_rows(L, in, T, y, n0, n1);
    };
    if (q == nullptr || nt == 1) {
        rows((int)((int64_t)groups * tid / nt), (int)((int64_t)groups * (tid + 1) / nt));
        return;
    }
    const int per = std::max(2, (groups + 15) / 16), chunks = (groups + per - 1) / per;   // ~16 chunks
    if (nt == 2) {
        for (int mine = 0; q->taken.fetch_add(1, std::memory_order_relaxed) < chunks; ++mine) {
            const int c = tid == 0 ? mine : chunks - 1 - mine;
            rows(c * per, std::min(groups, (c + 1) * per));
        }
    } else {                // more threads: the next chunk in order
        for (int c; (c = q->taken.fetch_add(1, std::memory_order_relaxed)) < chunks;)
            rows(c * per, std::min(groups, (c + 1) * per));
    }
}

void rmsnorm(const float* x, const float* w, int H, float eps, bool bf16, float* out) {
    int i = 0;
    f32x16 acc = vf_zero();
    for (; i + 16 <= H; i += 16) acc = vf_fmadd(vf_load(x + i), vf_load(x + i), acc);
    float ss = vf_reduce_add(acc);
    for (; i < H; ++i) ss += x[i] * x[i];
    const float r = 1.0f / std::sqrt(ss / H + eps);
    const f32x16 rv = vf_set(r);
    for (i = 0; i + 16 <= H; i += 16) {
        f32x16 v = vf_mul(vf_mul(vf_load(x + i), rv), vf_load(w + i));
        vf_store(out + i, bf16 ? rb16(v) : v);
    }
    for (; i < H; ++i) out[i] = bf16 ? rb(x[i] * r * w[i]) : x[i] * r * w[i];
}

inline float kv_at(const void* pool, bool bf, int64_t i) {
    return bf ? bf16_to_f32(((const uint16_t*)pool)[i]) : ((const float*)pool)[i];
}

// one sequence, one KV head: its g query heads over the context [0, L) read from the blocks.
// scratch: 2 * L * hd + g * L floats.
void attend(const Model& m, const float* q /*[g, hd] */, const int64_t* table, int L, int kvh,
            const void* kl, const void* vl, float* scratch, float* out /*[g, hd]*/) {
    const int hd = m.head_dim, g = m.n_heads / m.n_kv, nkv = m.n_kv, bs = m.block_size;
    const bool kbf = m.kv_bf16;
    const float scale = 1.0f / std::sqrt((float)hd);
    float* Kf = scratch;                  // [L, hd] this head's keys, as float
    float* Vf = Kf + (size_t)L * hd;      // [L, hd]
    float* S = Vf + (size_t)L * hd;       // [g, L] scores, then weights
    for (int p = 0; p < L; ++p) {
        const int64_t base = ((table[p / bs] * bs + p % bs) * nkv + kvh) * hd;
        for (int d = 0; d < hd; d += 16) {
            if (kbf) {
                vf_store(Kf + (size_t)p * hd + d, vf_load_bf16((const uint16_t*)kl + base + d));
                vf_store(Vf + (size_t)p * hd + d, vf_load_bf16((const uint16_t*)vl + base + d));
            } else {
                vf_store(Kf + (size_t)p * hd + d, vf_load((const float*)kl + base + d));
                vf_store(Vf + (size_t)p * hd + d, vf_load((const float*)vl + base + d));
            }
        }
    }
    for (int j = 0; j < g; ++j) {
        const float* qj = q + j * hd;
        float* s = S + (size_t)j * L;
        float mx = -INFINITY;
        for (int p = 0; p < L; ++p) {
            const float* k = Kf + (size_t)p * hd;
            f32x16 acc = vf_mul(vf_load(k), vf_load(qj));
            for (int d = 16; d < hd; d += 16) acc = vf_fmadd(vf_load(k + d), vf_load(qj + d), acc);
            s[p] = vf_reduce_add(acc) * scale;
            mx = s[p] > mx ? s[p] : mx;
        }
        const float inv = 1.0f / exp_sub_sum(s, L, mx);
        for (int d = 0; d < hd; d += 16) {
            f32x16 a0 = vf_zero(), a1 = vf_zero();
            int p = 0;
            for (; p + 1 < L; p += 2) {
                a0 = vf_fmadd(vf_load(Vf + (size_t)p * hd + d), vf_set(s[p]), a0);
                a1 = vf_fmadd(vf_load(Vf + (size_t)(p + 1) * hd + d), vf_set(s[p + 1]), a1);
            }
            if (p < L) a0 = vf_fmadd(vf_load(Vf + (size_t)p * hd + d), vf_set(s[p]), a0);
            vf_store(out + j * hd + d, vf_mul(vf_add(a0, a1), vf_set(inv)));
        }
    }
}

// 16 K or V values of the pool at element i, as float
inline f32x16 kv16(const void* pool, bool bf, int64_t i) {
    return bf ? vf_load_bf16((const uint16_t*)pool + i) : vf_load((const float*)pool + i);
}

// A part of one sequence's attention for one KV head and its g query heads: positions [p0, p1)
// of its context of L, where [0, L - 1) is read in place from the pool's blocks and L - 1 (this
// step's token, when p1 == L) from k_cur / v_cur (float, rounded as the pool stores them), so
// no part waits for another's write of the pool. Each K and V row is read once for the g heads.
// Writes, per query head j, the part's softmax state: part[j] = {max, sum of exp, o[hd] (the
// exp-weighted sum of V, not yet divided)}; merge_parts combines the parts of a head.
// hd <= 256, hd % 16 == 0, g * hd / 16 <= 48; scores: g * (p1 - p0) floats. G and NC (g and
// hd / 16, 0: read from m) as constants let the compiler keep q and o in registers.
template <int G, int NC>
void attend_part(const Model& m, const float* q /*[g, hd]*/, const int64_t* table, int L, int p0, int p1, int kvh,
                 const void* kl, const void* vl, const float* k_cur, const float* v_cur, float* scores,
                 float* part /*[g, hd + 2]*/) {
    const int hd = NC ? 16 * NC : m.head_dim, nc = NC ? NC : hd / 16, nkv = m.n_kv, bs = m.block_size;
    const int g = G ? G : m.n_heads / m.n_kv;
    const bool kbf = m.kv_bf16;
    const float scale = 1.0f / std::sqrt((float)hd);
    const int64_t pos_stride = (int64_t)nkv * hd;            // elements from one position to the next
    const int n = p1 - p0, pool_end = p1 < L - 1 ? p1 : L - 1;
    // The pool was evicted by the step's weights since this layer last ran: the loads below miss
    // all the way to memory, a few lines in flight at a time. Ask for the next block's K and V
    // lines one block ahead.
    const int esz = kbf ? 2 : 4, lines = (hd * esz + 63) / 64;
    auto row_at = [&](int p) { return (table[p / bs] * bs + p % bs) * pos_stride + (int64_t)kvh * hd; };
    auto prefetch = [&](int a, int b) {
        for (int p = a; p < b && p < pool_end; ++p) {
            const int64_t base = row_at(p);
            for (int l = 0; l < lines; ++l) {
                _mm_prefetch((const char*)kl + base * esz + 64 * l, _MM_HINT_T0);
                _mm_prefetch((const char*)vl + base * esz + 64 * l, _MM_HINT_T0);
            }
        }
    };
    f32x16 qv[48];
    for (int i = 0; i < g * nc; ++i) qv[i] = vf_load(q + 16 * i);
    float mx[16];
    for (int j = 0; j < g; ++j) mx[j] = -INFINITY;
    auto score = [&](int p, const float* kf, const void* kp, int64_t base) {   // one position, every head
        f32x16 k[16];
        for (int c = 0; c < nc; ++c) k[c] = kf ? vf_load(kf + 16 * c) : kv16(kp, kbf, base + 16 * c);
        for (int j = 0; j < g; ++j) {
            f32x16 acc = vf_mul(k[0], qv[j * nc]);
            for (int c = 1; c < nc; ++c) acc = vf_fmadd(k[c], qv[j * nc + c], acc);
            const float v = vf_reduce_add(acc) * scale;
            scores[(size_t)j * n + p - p0] = v;
            mx[j] = v > mx[j] ? v : mx[j];
        }
    };
    prefetch(p0, p0 + bs);
    for (int a = p0; a < pool_end;) {                        // block by block: one table lookup each
        const int b_end = (a / bs + 1) * bs < pool_end ? (a / bs + 1) * bs : pool_end;
        prefetch(b_end, b_end + bs);
        int64_t base = row_at(a);
        for (int p = a; p < b_end; ++p, base += pos_stride) score(p, nullptr, kl, base);
        a = b_end;
    }
    if (p1 == L) score(L - 1, k_cur, nullptr, 0);
    f32x16 o[48];
    float sum[16];
    for (int j = 0; j < g; ++j) {
        sum[j] = exp_sub_sum(scores + (size_t)j * n, n, mx[j]);
        for (int c = 0; c < nc; ++c) o[j * nc + c] = vf_zero();
    }
    auto accumulate = [&](int p, const float* vf, int64_t base) {
        f32x16 v[16];
        for (int c = 0; c < nc; ++c) v[c] = vf ? vf_load(vf + 16 * c) : kv16(vl, kbf, base + 16 * c);
        for (int j = 0; j < g; ++j) {
            const f32x16 w = vf_set(scores[(size_t)j * n + p - p0]);
            for (int c = 0; c < nc; ++c) o[j * nc + c] = vf_fmadd(v[c], w, o[j * nc + c]);
        }
    };
    for (int a = p0; a < pool_end;) {
        const int b_end = (a / bs + 1) * bs < pool_end ? (a / bs + 1) * bs : pool_end;
        int64_t base = row_at(a);
        for (int p = a; p < b_end; ++p, base += pos_stride) accumulate(p, nullptr, base);
        a = b_end;
    }
    if (p1 == L) accumulate(L - 1, v_cur, 0);
    for (int j = 0; j < g; ++j) {
        float* pj = part + (size_t)j * (hd + 2);
        pj[0] = mx[j];
        pj[1] = sum[j];
        for (int c = 0; c < nc; ++c) vf_store(pj + 2 + 16 * c, o[j * nc + c]);
    }
}

void attend_part_any(const Model& m, const float* q, const int64_t* table, int L, int p0, int p1, int kvh,
                     const void* kl, const void* vl, const float* k_cur, const float* v_cur, float* scores,
                     float* part) {
    const int g = m.n_heads / m.n_kv, nc = m.head_dim / 16;
#define PART(G, NC) \
    if (g == G && nc == NC) return attend_part<G, NC>(m, q, table, L, p0, p1, kvh, kl, vl, k_cur, v_cur, scores, part);
    PART(1, 4) PART(2, 4) PART(3, 4) PART(4, 4) PART(5, 4) PART(6, 4) PART(7, 4) PART(8, 4)
    PART(1, 8) PART(2, 8) PART(3, 8) PART(4, 8) PART(5, 8)
#undef PART
    attend_part<0, 0>(m, q, table, L, p0, p1, kvh, kl, vl, k_cur, v_cur, scores, part);
}

// out[hd] = the attention of one query head from its nparts part states (attend_part).
void merge_parts(const float* parts, int nparts, int stride, int hd, float* out) {
    float mx = -INFINITY;
    for (int i = 0; i < nparts; ++i) mx = parts[(size_t)i * stride] > mx ? parts[(size_t)i * stride] : mx;
    float total = 0.f;
    for (int d = 0; d < hd; ++d) out[d] = 0.f;
    for (int i = 0; i < nparts; ++i) {
        const float* pi = parts + (size_t)i * stride;
        const float w = std::exp(pi[0] - mx);
        total += w * pi[1];
        for (int d = 0; d < hd; ++d) out[d] += w * pi[2 + d];
    }
    for (int d = 0; d < hd; ++d) out[d] /= total;
}

}  // namespace

extern "C" {

// Reads n bytes (n % 64 == 0, p 64-byte aligned) as the linears read their weights: each thread
// one contiguous share, 64-byte loads; returns a checksum so the reads cannot be dropped. The
// roofline's memory ceiling for this access pattern (bench/roofline.py).
int64_t agp_read_bytes(const void* p, int64_t n, int nthreads) {
    int64_t total = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t lines = n / 64, l0 = lines * tid / nt, l1 = lines * (tid + 1) / nt;
        const char* q = (const char*)p;
        i32x16 a0 = vi_zero(), a1 = vi_zero();
        int64_t l = l0;
        for (; l + 2 <= l1; l += 2) {
            _mm_prefetch(q + 64 * l + 2560, _MM_HINT_T0);
            _mm_prefetch(q + 64 * l + 2624, _MM_HINT_T0);
            a0 = vi_add64(a0, vi_load(q + 64 * l));
            a1 = vi_add64(a1, vi_load(q + 64 * l + 64));
        }
        if (l < l1) a0 = vi_add64(a0, vi_load(q + 64 * l));
        total += vi_reduce_add64(vi_add64(a0, a1));
    }
    return total;
}

// y[T, N] (float) = x[T, K] (float) w^T for one Lin, on nthreads.
void agp_linear(const Lin* L, const float* x, int T, float* y, int nthreads) {
    InBuf buf;
    const In in = buf.prepare(*L, x, T);
    Queue q;
#pragma omp parallel num_threads(nthreads)
    linear_par(*L, in, T, y, &q);
}

// Paged decode attention, reading K/V blocks in place: q [B, nh, hd] (row stride q_stride elements,
// bf16 or float), tables [B, nblk], lens [B] -> out [B, nh * hd] (same dtype as q).
void agp_paged_attention(const Model* mp, int layer, int B, const void* q, int64_t q_stride, int q_bf16,
                         const int64_t* tables, int nblk, const int64_t* lens, void* out, int nthreads) {
    const Model& m = *mp;
    const int hd = m.head_dim, g = m.n_heads / m.n_kv, nkv = m.n_kv;
    int Lmax = 0;
    for (int b = 0; b < B; ++b) Lmax = lens[b] > Lmax ? (int)lens[b] : Lmax;
    const void* kl = (const char*)m.k_pool + layer * m.layer_stride * (m.kv_bf16 ? 2 : 4);
    const void* vl = (const char*)m.v_pool + layer * m.layer_stride * (m.kv_bf16 ? 2 : 4);
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> scores((size_t)(2 * hd + g) * Lmax), qf((size_t)g * hd), of((size_t)g * hd);
#pragma omp for schedule(dynamic, 1)
        for (int w = 0; w < B * nkv; ++w) {
            const int b = w / nkv, h = w % nkv;
            for (int j = 0; j < g * hd; ++j) {
                const int64_t i = b * q_stride + (int64_t)h * g * hd + j;
                qf[j] = q_bf16 ? bf16_to_f32(((const uint16_t*)q)[i]) : ((const float*)q)[i];
            }
            attend(m, qf.data(), tables + (int64_t)b * nblk, (int)lens[b], h, kl, vl, scores.data(), of.data());
            for (int j = 0; j < g * hd; ++j) {
                const int64_t i = (int64_t)b * m.n_heads * hd + (int64_t)h * g * hd + j;
                if (q_bf16) ((uint16_t*)out)[i] = f32_to_bf16(of[j]);
                else ((float*)out)[i] = of[j];
            }
        }
    }
}

// ---- glue between the eager path's GEMMs (large batches: oneDNN does the GEMMs) -----------

inline float ld(const void* p, bool bf, int64_t i) {
    return bf ? bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}
inline void st(void* p, bool bf, int64_t i, float v) {
    if (bf) ((uint16_t*)p)[i] = f32_to_bf16(v);
    else ((float*)p)[i] = v;
}

// x [T, H] += r (when r is given, rounded like the eager add); h = rms(x) * w. bf: tensors are bf16.
void agp_add_rmsnorm(const void* r, void* x, const float* w, void* h, int T, int H, float eps, int bf,
                     int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (T >= 4)
    for (int t = 0; t < T; ++t) {
        float xs[4096];
        for (int i = 0; i < H; ++i) {
            float v = ld(x, bf, (int64_t)t * H + i);
            if (r) {
                v += ld(r, bf, (int64_t)t * H + i);
                if (bf) v = rb(v);
                st(x, bf, (int64_t)t * H + i, v);
            }
            xs[i] = v;
        }
        float o[4096];
        rmsnorm(xs, w, H, eps, bf, o);
        for (int i = 0; i < H; ++i) st(h, bf, (int64_t)t * H + i, o[i]);
    }
}

// gu [T, 2I] -> out [T, I] = silu(gate) * up
void agp_silu_mul(const void* gu, void* out, int T, int I, int bf, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (T >= 4)
    for (int t = 0; t < T; ++t) {
        std::vector<float> g(I), u(I), o(I);
        for (int i = 0; i < I; ++i) g[i] = ld(gu, bf, (int64_t)t * 2 * I + i), u[i] = ld(gu, bf, (int64_t)t * 2 * I + I + i);
        silu_mul(g.data(), u.data(), o.data(), I, bf);
        for (int i = 0; i < I; ++i) st(out, bf, (int64_t)t * I + i, o[i]);
    }
}

// The attention block of an all-decode step: qkv [B, (nh+2kv)*hd] (a linear's output) -> RoPE on
// q and k, k and v into the pool at slots, attention over the paged contexts -> att [B, nh*hd].
void agp_decode_attention_block(const Model* mp, int layer, int B, const void* qkv, int bf, const int64_t* pos,
                                const int64_t* slots, const int64_t* tables, int nblk, void* att, int nthreads) {
    const Model& m = *mp;
    const Layer& ly = m.layers[layer];
    const int hd = m.head_dim, nh = m.n_heads, nkv = m.n_kv, g = nh / nkv, QKV = (nh + 2 * nkv) * hd;
    int Lmax = 0;
    for (int b = 0; b < B; ++b) Lmax = pos[b] + 1 > Lmax ? (int)pos[b] + 1 : Lmax;
    const size_t esz = m.kv_bf16 ? 2 : 4;
    char* kl = (char*)m.k_pool + layer * m.layer_stride * esz;
    char* vl = (char*)m.v_pool + layer * m.layer_stride * esz;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> scratch((size_t)(2 * hd + g) * Lmax), row((size_t)(g + 2) * hd), o((size_t)g * hd);
#pragma omp for schedule(dynamic, 1)
        for (int w = 0; w < B * nkv; ++w) {
            const int b = w / nkv, kh = w % nkv;
            const float* c = m.cos + pos[b] * hd;
            const float* sn = m.sin + pos[b] * hd;
            for (int j = 0; j < g + 2; ++j) {   // its g query heads, its key head (rotated), its value head
                const int head = j < g ? kh * g + j : (j == g ? nh + kh : nh + nkv + kh);
                const int64_t base = (int64_t)b * QKV + (int64_t)head * hd;
                float* v = &row[(size_t)j * hd];
                for (int d = 0; d < hd; ++d) v[d] = ld(qkv, bf, base + d);
                if (j <= g) {
                    float r[256];
                    const float* nw = j < g ? ly.q_norm : ly.k_norm;
                    if (nw)                          // Qwen3: the head normed (in place) before its rotation
                        rmsnorm(v, nw, hd, m.eps, bf, v);
                    for (int d = 0; d < hd; ++d) {
                        const float sw = v[d < hd / 2 ? d + hd / 2 : d - hd / 2];
                        r[d] = bf ? rb(rb(v[d] * c[d]) + rb(sw * sn[d])) : v[d] * c[d] + sw * sn[d];
                    }
                    std::memcpy(v, r, hd * sizeof(float));
                }
            }
            const int64_t dst = (slots[b] * nkv + kh) * hd;
            for (int d = 0; d < hd; ++d) {
                st(kl, m.kv_bf16, dst + d, row[(size_t)g * hd + d]);
                st(vl, m.kv_bf16, dst + d, row[(size_t)(g + 1) * hd + d]);
            }
            attend(m, row.data(), tables + (int64_t)b * nblk, (int)pos[b] + 1, kh, kl, vl, scratch.data(), o.data());
            for (int j = 0; j < g * hd; ++j) st(att, bf, (int64_t)b * nh * hd + (int64_t)kh * g * hd + j, o[j]);
        }
    }
}

// Items a decode step's attention is cut into at most (below): two for each of 16 threads.
constexpr int PART_ITEMS = 32;

// One all-decode step of B sequences (one token each): logits [n_out, V] float.
//
// One parallel region, five barriers a layer (after qkv, attention, o, gate_up, down): every
// thread keeps its own copy of the residual stream and of the small per-row vectors (norms,
// block sums, silu*mul), computing them redundantly instead of waiting for one thread to.
void agp_decode_step(const Model* mp, const Step* sp, float* logits, int nthreads) {
    const Model& m = *mp;
    const Step& s = *sp;
    const int B = s.B, H = m.hidden, I = m.inter, hd = m.head_dim, nh = m.n_heads, nkv = m.n_kv;
    const int g = nh / nkv, QKV = (nh + 2 * nkv) * hd;
    const bool bf = m.bf16;
    int Lmax = 0;
    for (int b = 0; b < B; ++b) Lmax = s.pos[b] + 1 > Lmax ? (int)s.pos[b] + 1 : Lmax;
    // shared: the outputs of the parallel phases
    // attention in parts of a sequence's context, so that even one sequence's few KV heads give
    // every thread work: nparts parts of at least two whole blocks, each (sequence, KV head, part)
    // one item, up to PART_ITEMS items. The split follows the batch and its contexts, never
    // nthreads: the parts' softmax states are merged in another order than one pass sums, so a
    // split by the threads at hand made a row's logits change when the contention guard ran a
    // step on one thread (engine/compute.py), and a lone greedy request's text with the load.
    int nparts = 1;
    while (B * nkv * nparts < PART_ITEMS && Lmax >= 2 * (nparts + 1) * m.block_size) ++nparts;
    const int pstride = hd + 2;
    std::vector<float> tmp((size_t)B * H), qkv((size_t)B * QKV), gu((size_t)B * 2 * I),
        parts((size_t)B * nkv * nparts * g * pstride);
    std::vector<Queue> queues((size_t)4 * m.n_layers + 1);   // one per linear of the step
    Barrier bar;
    const size_t esz = m.kv_bf16 ? 2 : 4;
#pragma omp parallel num_threads(nthreads)
    {
        // private: the residual stream and what each phase's input needs
        std::vector<float> x((size_t)B * H), h((size_t)B * H), act((size_t)B * I), att((size_t)B * nh * hd),
            scratch((size_t)g * Lmax);
        InBuf in;
        double* prof = s.prof ? s.prof + (size_t)omp_get_thread_num() * PHASES : nullptr;
        double t_mark = prof ? omp_get_wtime() : 0.0;
        auto mark = [&](Phase ph) {     // the time since the last mark goes to ph
            if (!prof) return;
            const double now = omp_get_wtime();
            prof[ph] += now - t_mark;
            t_mark = now;
        };
        const int team = omp_get_num_threads();
        auto barrier = [&]() {
            mark(P_GLUE);
            if (s.spin_us < 0) {
#pragma omp barrier
            } else {
                barrier_wait(bar, team, s.spin_us);
            }
            mark(P_BARRIER);
        };
        for (int b = 0; b < B; ++b)   // the embedding rows
            for (int i = 0; i < H; ++i) {
                const int64_t k = s.tokens[b] * H + i;
                x[(size_t)b * H + i] = m.embed_bf16 ? bf16_to_f32(((const uint16_t*)m.embed)[k]) : ((const float*)m.embed)[k];
            }
        auto residual = [&]() {        // x += tmp (the o or down output); B * H is a multiple of 16
            for (size_t i = 0; i < x.size(); i += 16) {
                const f32x16 v = vf_add(vf_load(&x[i]), vf_load(&tmp[i]));
                vf_store(&x[i], bf ? rb16(v) : v);
            }
        };
        auto norm_rows = [&](const float* w, int rows, const int64_t* which) {
            for (int r = 0; r < rows; ++r)
                rmsnorm(&x[(size_t)(which ? which[r] : r) * H], w, H, m.eps, bf, &h[(size_t)r * H]);
        };
        for (int li = 0; li < m.n_layers; ++li) {
            const Layer& ly = m.layers[li];
            char* kl = (char*)m.k_pool + li * m.layer_stride * esz;
            char* vl = (char*)m.v_pool + li * m.layer_stride * esz;
            if (li > 0) residual();
            norm_rows(ly.attn_norm, B, nullptr);
            const In in_qkv = in.prepare(ly.qkv, h.data(), B);
            mark(P_GLUE);
            linear_par(ly.qkv, in_qkv, B, qkv.data(), &queues[4 * li]);
            mark(P_QKV);
            barrier();
#pragma omp for schedule(dynamic, 1) nowait
            for (int w = 0; w < B * nkv * nparts; ++w) {   // a part of one sequence's KV head
                const int b = w / (nkv * nparts), kh = w / nparts % nkv, part = w % nparts;
                const float* row = &qkv[(size_t)b * QKV];
                const float* c = m.cos + s.pos[b] * hd;
                const float* sn = m.sin + s.pos[b] * hd;
                const int L = (int)s.pos[b] + 1, nblk = (L + m.block_size - 1) / m.block_size;
                const int p0 = std::min(L, nblk * part / nparts * m.block_size);
                const int p1 = part == nparts - 1 ? L : std::min(L, nblk * (part + 1) / nparts * m.block_size);
                float qr[16 * 256], kr[256], vr[256], normed[256];
                auto rope = [&](const float* v, float* r, const float* nw) {
                    if (nw) {                                // Qwen3: the head normed before its rotation
                        rmsnorm(v, nw, hd, m.eps, bf, normed);
                        v = normed;
                    }
                    for (int d = 0; d < hd; ++d) {
                        const float sw = v[d < hd / 2 ? d + hd / 2 : d - hd / 2];
                        r[d] = bf ? rb(rb(v[d] * c[d]) + rb(sw * sn[d])) : v[d] * c[d] + sw * sn[d];
                    }
                };
                for (int j = 0; j < g; ++j) rope(row + (size_t)(kh * g + j) * hd, qr + (size_t)j * hd, ly.q_norm);
                rope(row + (size_t)(nh + kh) * hd, kr, ly.k_norm);     // every part: its own copy
                std::memcpy(vr, row + (size_t)(nh + nkv + kh) * hd, hd * sizeof(float));
                if (m.kv_bf16) {                             // as the pool keeps them
                    round_vec(kr, hd);
                    round_vec(vr, hd);
                }
                if (part == 0) {                             // one part writes this token's K/V
                    const int64_t dst = (s.slots[b] * nkv + kh) * hd;
                    for (int d = 0; d < hd; ++d) {
                        if (m.kv_bf16) {
                            ((uint16_t*)kl)[dst + d] = f32_to_bf16(kr[d]);
                            ((uint16_t*)vl)[dst + d] = f32_to_bf16(vr[d]);
                        } else {
                            ((float*)kl)[dst + d] = kr[d];
                            ((float*)vl)[dst + d] = vr[d];
                        }
                    }
                }
                attend_part_any(m, qr, s.tables + (int64_t)b * s.nblk, L, p0, p1, kh, kl, vl, kr, vr, scratch.data(),
                            &parts[(size_t)w * g * pstride]);
            }
            mark(P_ATTENTION);
            barrier();
            for (int b = 0; b < B; ++b)                      // every thread: the whole attention output
                for (int head = 0; head < nh; ++head) {
                    const int kh = head / g, j = head % g;
                    float* o = &att[((size_t)b * nh + head) * hd];
                    merge_parts(&parts[(((size_t)b * nkv + kh) * nparts * g + j) * pstride], nparts, g * pstride, hd, o);
                    if (bf) round_vec(o, hd);
                }
            const In in_o = in.prepare(ly.o, att.data(), B);
            mark(P_GLUE);
            linear_par(ly.o, in_o, B, tmp.data(), &queues[4 * li + 1]);
            mark(P_O);
            barrier();
            residual();
            norm_rows(ly.ffn_norm, B, nullptr);
            const In in_gu = in.prepare(ly.gate_up, h.data(), B);
            mark(P_GLUE);
            linear_par(ly.gate_up, in_gu, B, gu.data(), &queues[4 * li + 2]);
            mark(P_GATE_UP);
            barrier();
            for (int b = 0; b < B; ++b)
                silu_mul(&gu[(size_t)b * 2 * I], &gu[(size_t)b * 2 * I + I], &act[(size_t)b * I], I, bf);
            const In in_down = in.prepare(ly.down, act.data(), B);
            mark(P_GLUE);
            linear_par(ly.down, in_down, B, tmp.data(), &queues[4 * li + 3]);
            mark(P_DOWN);
            barrier();
        }
        residual();
        norm_rows(m.norm, s.n_out, s.out_rows);
        const In in_head = in.prepare(m.lm_head, h.data(), s.n_out);
        mark(P_GLUE);
        linear_par(m.lm_head, in_head, s.n_out, logits, &queues[4 * m.n_layers]);
        mark(P_HEAD);
    }
}

// The step's barrier on its own (tests/test_native_barrier.py): `rounds` barriers on nthreads
// threads; before each, thread (round % team) sleeps hold_us, as a thread another process holds
// off its core; after each, every thread checks that every other one reached this round. Returns
// the reads that saw an earlier round (0 when the barrier holds); *cpu_s: the most CPU seconds one
// thread used (waiting threads that sleep use next to none; spinning ones, the holds' time).
int agp_barrier_check(int nthreads, int rounds, int spin_us, int hold_us, double* cpu_s) {
    Barrier bar;
    std::vector<std::atomic<int>> seen(nthreads > 0 ? nthreads : 1);
    for (auto& x : seen) x.store(-1);
    int bad = 0;
    double most = 0.0;
#pragma omp parallel num_threads(nthreads) reduction(+ : bad) reduction(max : most)
    {
        const int team = omp_get_num_threads(), tid = omp_get_thread_num();
        timespec a, z;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
        for (int r = 0; r < rounds; ++r) {
            if (tid == r % team && hold_us > 0) usleep(hold_us);
            seen[tid].store(r, std::memory_order_relaxed);
            if (spin_us < 0) {
#pragma omp barrier
            } else {
                barrier_wait(bar, team, spin_us);
            }
            for (int j = 0; j < team; ++j) bad += seen[j].load(std::memory_order_relaxed) < r;
        }
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &z);
        most = std::max(most, (z.tv_sec - a.tv_sec) + (z.tv_nsec - a.tv_nsec) * 1e-9);
    }
    if (cpu_s) *cpu_s = most;
    return bad;
}

}  // extern "C"
