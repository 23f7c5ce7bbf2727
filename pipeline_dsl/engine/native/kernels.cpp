// agp native kernels: the whole decode step of a Llama decoder in one call, for small batches.
//
// Built by `make native` (or on first use, see __init__.py) into a shared library with a C ABI,
// loaded with ctypes. It links the same libgomp as torch (one OpenMP pool): a step is ONE
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
// scale a block, as llama.cpp's Q8 activations) and multiply with AVX512-VNNI, which reads the
// weights at memory speed where kinds 2 and 3 are bound by converting every weight to float.
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

int agp_native_version() { return 7; }
int agp_phases() { return PHASES; }

}  // extern "C"

namespace {

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

inline __m512 rb16(__m512 x);

inline void round_vec(float* x, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, rb16(_mm512_loadu_ps(x + i)));
    for (; i < n; ++i) x[i] = rb(x[i]);
}

// 16 floats rounded to bf16 (nearest even), kept as floats
inline __m512 rb16(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
}

// exp for 16 lanes: 2^n * 2^f, |f| <= 1/2, degree-7 polynomial (error ~1 ulp of float)
inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// x[i] = exp(x[i] - mx) for n values; returns their sum
inline float exp_sub_sum(float* x, int n, float mx) {
    __m512 acc = _mm512_setzero_ps();
    const __m512 m = _mm512_set1_ps(mx);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), m));
        _mm512_storeu_ps(x + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (i < n) {
        const __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), m));
        _mm512_mask_storeu_ps(x + i, k, e);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, e));
    }
    return _mm512_reduce_add_ps(acc);
}

// out[i] = silu(g[i]) * u[i] (each step rounded to bf16 when bf16), n % 16 == 0
inline void silu_mul(const float* g, const float* u, float* out, int n, bool bf16) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int i = 0; i < n; i += 16) {
        const __m512 gv = _mm512_loadu_ps(g + i);
        __m512 sl = _mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        if (bf16) sl = rb16(sl);
        __m512 r = _mm512_mul_ps(sl, _mm512_loadu_ps(u + i));
        if (bf16) r = rb16(r);
        _mm512_storeu_ps(out + i, r);
    }
}

inline __m512 load_bf16x16(const uint16_t* p) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

// ---- linear layers: rows [n0, n1) of y[t, n] = sum_k x[t, k] w[n, k], T <= 8 -----------------

template <int T>
void q4_rows(const Lin& L, const float* x, float* y, int n0, int n1) {
    // each block dequantised once, w = (q - 8) * s + z, then one FMA per 16 weights per row
    const int K = L.K, nb = K / 32, N = L.N;
    const uint8_t* W = (const uint8_t*)L.w;
    const uint16_t* SZ = (const uint16_t*)L.s;
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m512i eight = _mm512_set1_epi32(8);
    for (int n = n0; n < n1; ++n) {
        const uint8_t* w = W + (int64_t)n * (K / 2);
        const uint16_t* sz = SZ + (int64_t)n * nb * 2;
        __m512 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
        for (int b = 0; b < nb; ++b) {
            const __m128i bytes = _mm_loadu_si128((const __m128i*)(w + 16 * b));
            const __m512 sv = _mm512_set1_ps(bf16_to_f32(sz[2 * b])), zv = _mm512_set1_ps(bf16_to_f32(sz[2 * b + 1]));
            const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(
                _mm512_cvtepu8_epi32(_mm_and_si128(bytes, m4)), eight)), sv, zv);
            const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(
                _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), m4)), eight)), sv, zv);
            for (int t = 0; t < T; ++t) {
                const float* xt = x + (int64_t)t * K + 32 * b;
                acc[t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xt + 16), _mm512_fmadd_ps(lo, _mm512_loadu_ps(xt), acc[t]));
            }
        }
        for (int t = 0; t < T; ++t) y[(int64_t)t * N + n] = _mm512_reduce_add_ps(acc[t]);
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
        __m512 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
        for (int b = 0; b < nb; ++b) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(w + 32 * b));
            const __m512 sv = _mm512_set1_ps(s[b]);
            const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v))), sv);
            const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1))), sv);
            for (int t = 0; t < T; ++t) {
                const float* xt = x + (int64_t)t * K + 32 * b;
                acc[t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xt + 16), _mm512_fmadd_ps(lo, _mm512_loadu_ps(xt), acc[t]));
            }
        }
        for (int t = 0; t < T; ++t) y[(int64_t)t * N + n] = _mm512_reduce_add_ps(acc[t]);
    }
}

template <int T>
void bf16_rows(const Lin& L, const float* x, float* y, int n0, int n1) {
    const int K = L.K, N = L.N;
    const uint16_t* W = (const uint16_t*)L.w;
    for (int n = n0; n < n1; ++n) {
        const uint16_t* w = W + (int64_t)n * K;
        __m512 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) {
            __m512 wv = load_bf16x16(w + k);
            for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (int64_t)t * K + k), acc[t]);
        }
        for (int t = 0; t < T; ++t) y[(int64_t)t * N + n] = _mm512_reduce_add_ps(acc[t]);
    }
}

template <int T>
void f32_rows(const Lin& L, const float* x, float* y, int n0, int n1) {
    const int K = L.K, N = L.N;
    const float* W = (const float*)L.w;
    for (int n = n0; n < n1; ++n) {
        const float* w = W + (int64_t)n * K;
        __m512 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) {
            __m512 wv = _mm512_loadu_ps(w + k);
            for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (int64_t)t * K + k), acc[t]);
        }
        for (int t = 0; t < T; ++t) y[(int64_t)t * N + n] = _mm512_reduce_add_ps(acc[t]);
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
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    for (int t = 0; t < T; ++t)
        for (int b = 0; b < K / 32; ++b) {
            const float* xb = x + (int64_t)t * K + 32 * b;
            const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(v0, sign), _mm512_and_ps(v1, sign)));
            const float d = amax / 127.0f, id = amax > 0.f ? 127.0f / amax : 0.f;
            const __m512 s0 = _mm512_mul_ps(v0, _mm512_set1_ps(id)), s1 = _mm512_mul_ps(v1, _mm512_set1_ps(id));
            const __m512i q0 = _mm512_cvtps_epi32(s0), q1 = _mm512_cvtps_epi32(s1);   // nearest even
            int8_t* qb = q + (int64_t)t * parts * K + 32 * b;
            _mm_storeu_si128((__m128i*)qb, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128((__m128i*)(qb + 16), _mm512_cvtepi32_epi8(q1));
            float qs = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            if (parts == 2) {
                const __m512 lo = _mm512_set1_ps(LO);
                const __m512i r0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(s0, _mm512_cvtepi32_ps(q0)), lo));
                const __m512i r1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(s1, _mm512_cvtepi32_ps(q1)), lo));
                _mm_storeu_si128((__m128i*)(qb + K), _mm512_cvtepi32_epi8(r0));
                _mm_storeu_si128((__m128i*)(qb + K + 16), _mm512_cvtepi32_epi8(r1));
                qs += (float)_mm512_reduce_add_epi32(_mm512_add_epi32(r0, r1)) / LO;
            }
            meta[(int64_t)t * (K / 32) + b] = XBlk{d, 8.f * qs * d, qs * d, 128.f * qs * d};
        }
}

// y[t, 16 g + i] = acc[t][i] for the rows that exist (the last group of N % 16 != 0 is padded)
template <int T>
inline void store_group(float* y, int N, int g, const __m512* acc) {
    const __mmask16 k = N - 16 * g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - 16 * g)) - 1);
    for (int t = 0; t < T; ++t) _mm512_mask_storeu_ps(y + (int64_t)t * N + 16 * g, k, acc[t]);
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
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int g = g0; g < g1; ++g) {
        const uint8_t* p = (const uint8_t*)L.w + (int64_t)g * nb * 320;
        __m512 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
        for (int b = 0; b < nb; ++b, p += 320) {
            _mm_prefetch((const char*)p + 2560, _MM_HINT_T0);
            _mm_prefetch((const char*)p + 2624, _MM_HINT_T0);
            _mm_prefetch((const char*)p + 2688, _MM_HINT_T0);
            _mm_prefetch((const char*)p + 2752, _MM_HINT_T0);
            _mm_prefetch((const char*)p + 2816, _MM_HINT_T0);
            __m512i lo[4], hi[4];
            for (int j = 0; j < 4; ++j) {
                const __m512i v = _mm512_load_si512((const void*)(p + 64 * j));
                lo[j] = _mm512_and_si512(v, m4);
                hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            }
            const __m512 s = load_bf16x16((const uint16_t*)(p + 256)), z = load_bf16x16((const uint16_t*)(p + 288));
            for (int t = 0; t < T; ++t) {
                const int32_t* xw = (const int32_t*)(xq + (int64_t)t * PARTS * K + 32 * b);
                __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
                for (int j = 0; j < 4; ++j) {
                    a0 = _mm512_dpbusd_epi32(a0, lo[j], _mm512_set1_epi32(xw[j]));
                    a1 = _mm512_dpbusd_epi32(a1, hi[j], _mm512_set1_epi32(xw[j + 4]));
                }
                const XBlk& m = xm[(int64_t)t * nb + b];
                __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1));
                if (PARTS == 2) {
                    const int32_t* xl = xw + K / 4;
                    __m512i b0 = _mm512_setzero_si512(), b1 = _mm512_setzero_si512();
                    for (int j = 0; j < 4; ++j) {
                        b0 = _mm512_dpbusd_epi32(b0, lo[j], _mm512_set1_epi32(xl[j]));
                        b1 = _mm512_dpbusd_epi32(b1, hi[j], _mm512_set1_epi32(xl[j + 4]));
                    }
                    f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(b0, b1)), _mm512_set1_ps(1.0f / LO), f);
                }
                acc[t] = _mm512_fmadd_ps(s, _mm512_fmsub_ps(f, _mm512_set1_ps(m.d), _mm512_set1_ps(m.c8)), acc[t]);
                acc[t] = _mm512_fmadd_ps(z, _mm512_set1_ps(m.c1), acc[t]);
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
        __m512 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
        for (int b = 0; b < nb; ++b, p += 576) {
            for (int c = 0; c < 9; ++c) _mm_prefetch((const char*)p + 4608 + 64 * c, _MM_HINT_T0);
            __m512i w[8];
            for (int j = 0; j < 8; ++j) w[j] = _mm512_load_si512((const void*)(p + 64 * j));
            const __m512 s = _mm512_load_ps((const float*)(p + 512));
            for (int t = 0; t < T; ++t) {
                const int32_t* xw = (const int32_t*)(xq + (int64_t)t * PARTS * K + 32 * b);
                __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
                for (int j = 0; j < 8; j += 2) {
                    a0 = _mm512_dpbusd_epi32(a0, w[j], _mm512_set1_epi32(xw[j]));
                    a1 = _mm512_dpbusd_epi32(a1, w[j + 1], _mm512_set1_epi32(xw[j + 1]));
                }
                const XBlk& m = xm[(int64_t)t * nb + b];
                __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1));
                if (PARTS == 2) {
                    const int32_t* xl = xw + K / 4;
                    __m512i b0 = _mm512_setzero_si512(), b1 = _mm512_setzero_si512();
                    for (int j = 0; j < 8; j += 2) {
                        b0 = _mm512_dpbusd_epi32(b0, w[j], _mm512_set1_epi32(xl[j]));
                        b1 = _mm512_dpbusd_epi32(b1, w[j + 1], _mm512_set1_epi32(xl[j + 1]));
                    }
                    f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(b0, b1)), _mm512_set1_ps(1.0f / LO), f);
                }
                acc[t] = _mm512_fmadd_ps(s, _mm512_fmsub_ps(f, _mm512_set1_ps(m.d), _mm512_set1_ps(m.c128)), acc[t]);
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
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= H; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i), acc);
    float ss = _mm512_reduce_add_ps(acc);
    for (; i < H; ++i) ss += x[i] * x[i];
    const float r = 1.0f / std::sqrt(ss / H + eps);
    const __m512 rv = _mm512_set1_ps(r);
    for (i = 0; i + 16 <= H; i += 16) {
        __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), rv), _mm512_loadu_ps(w + i));
        _mm512_storeu_ps(out + i, bf16 ? rb16(v) : v);
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
                _mm512_storeu_ps(Kf + (size_t)p * hd + d, load_bf16x16((const uint16_t*)kl + base + d));
                _mm512_storeu_ps(Vf + (size_t)p * hd + d, load_bf16x16((const uint16_t*)vl + base + d));
            } else {
                _mm512_storeu_ps(Kf + (size_t)p * hd + d, _mm512_loadu_ps((const float*)kl + base + d));
                _mm512_storeu_ps(Vf + (size_t)p * hd + d, _mm512_loadu_ps((const float*)vl + base + d));
            }
        }
    }
    for (int j = 0; j < g; ++j) {
        const float* qj = q + j * hd;
        float* s = S + (size_t)j * L;
        float mx = -INFINITY;
        for (int p = 0; p < L; ++p) {
            const float* k = Kf + (size_t)p * hd;
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(k), _mm512_loadu_ps(qj));
            for (int d = 16; d < hd; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(k + d), _mm512_loadu_ps(qj + d), acc);
            s[p] = _mm512_reduce_add_ps(acc) * scale;
            mx = s[p] > mx ? s[p] : mx;
        }
        const float inv = 1.0f / exp_sub_sum(s, L, mx);
        for (int d = 0; d < hd; d += 16) {
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            int p = 0;
            for (; p + 1 < L; p += 2) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(Vf + (size_t)p * hd + d), _mm512_set1_ps(s[p]), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(Vf + (size_t)(p + 1) * hd + d), _mm512_set1_ps(s[p + 1]), a1);
            }
            if (p < L) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(Vf + (size_t)p * hd + d), _mm512_set1_ps(s[p]), a0);
            _mm512_storeu_ps(out + j * hd + d, _mm512_mul_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(inv)));
        }
    }
}

// 16 K or V values of the pool at element i, as float
inline __m512 kv16(const void* pool, bool bf, int64_t i) {
    return bf ? load_bf16x16((const uint16_t*)pool + i) : _mm512_loadu_ps((const float*)pool + i);
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
    __m512 qv[48];
    for (int i = 0; i < g * nc; ++i) qv[i] = _mm512_loadu_ps(q + 16 * i);
    float mx[16];
    for (int j = 0; j < g; ++j) mx[j] = -INFINITY;
    auto score = [&](int p, const float* kf, const void* kp, int64_t base) {   // one position, every head
        __m512 k[16];
        for (int c = 0; c < nc; ++c) k[c] = kf ? _mm512_loadu_ps(kf + 16 * c) : kv16(kp, kbf, base + 16 * c);
        for (int j = 0; j < g; ++j) {
            __m512 acc = _mm512_mul_ps(k[0], qv[j * nc]);
            for (int c = 1; c < nc; ++c) acc = _mm512_fmadd_ps(k[c], qv[j * nc + c], acc);
            const float v = _mm512_reduce_add_ps(acc) * scale;
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
    __m512 o[48];
    float sum[16];
    for (int j = 0; j < g; ++j) {
        sum[j] = exp_sub_sum(scores + (size_t)j * n, n, mx[j]);
        for (int c = 0; c < nc; ++c) o[j * nc + c] = _mm512_setzero_ps();
    }
    auto accumulate = [&](int p, const float* vf, int64_t base) {
        __m512 v[16];
        for (int c = 0; c < nc; ++c) v[c] = vf ? _mm512_loadu_ps(vf + 16 * c) : kv16(vl, kbf, base + 16 * c);
        for (int j = 0; j < g; ++j) {
            const __m512 w = _mm512_set1_ps(scores[(size_t)j * n + p - p0]);
            for (int c = 0; c < nc; ++c) o[j * nc + c] = _mm512_fmadd_ps(v[c], w, o[j * nc + c]);
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
        for (int c = 0; c < nc; ++c) _mm512_storeu_ps(pj + 2 + 16 * c, o[j * nc + c]);
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
        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
        int64_t l = l0;
        for (; l + 2 <= l1; l += 2) {
            _mm_prefetch(q + 64 * l + 2560, _MM_HINT_T0);
            _mm_prefetch(q + 64 * l + 2624, _MM_HINT_T0);
            a0 = _mm512_add_epi64(a0, _mm512_load_si512((const void*)(q + 64 * l)));
            a1 = _mm512_add_epi64(a1, _mm512_load_si512((const void*)(q + 64 * l + 64)));
        }
        if (l < l1) a0 = _mm512_add_epi64(a0, _mm512_load_si512((const void*)(q + 64 * l)));
        total += _mm512_reduce_add_epi64(_mm512_add_epi64(a0, a1));
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
                const __m512 v = _mm512_add_ps(_mm512_loadu_ps(&x[i]), _mm512_loadu_ps(&tmp[i]));
                _mm512_storeu_ps(&x[i], bf ? rb16(v) : v);
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
