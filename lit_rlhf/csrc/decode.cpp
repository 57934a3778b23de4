// The elementwise parts and the attention of one bf16 decoding step (lit_rlhf/kernels.py), each a single pass over
// its tensors. bf16 values are uint16_t; each result is computed in fp32 and rounded to bf16 (nearest, ties to even)
// where PyTorch's bf16 operators round it. Rows are parallel over the caller's OpenMP threads (torch's own pool).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

typedef uint16_t bf16;

static inline float to_float(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline bf16 to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);  // NaN stays NaN
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float round_bf16(float f) { return to_float(to_bf16(f)); }

// exp(x) within 2 ulp in a form the compiler vectorises (libm's expf is a call per element): x = n ln2 + r,
// |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial, 2^n put into the exponent bits.
static inline float vector_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = std::floor(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    return y * scale;
}

// x (rows, d) += residual (rows, d) when residual is given; then out = w * bf16(x * rsqrt(mean(x^2) + eps)):
// transformers' LlamaRMSNorm (normalised in fp32, scaled in bf16), after the residual add.
extern "C" void add_rms_norm(bf16* x, const bf16* residual, const bf16* w, bf16* out, int64_t rows, int64_t d, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        bf16* xr = x + r * d;
        if (residual) {
            const bf16* yr = residual + r * d;
            for (int64_t i = 0; i < d; i++) xr[i] = to_bf16(to_float(xr[i]) + to_float(yr[i]));
        }
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < d; i++) sum += to_float(xr[i]) * to_float(xr[i]);
        float inv = 1.f / std::sqrt(sum / (float)d + eps);
        bf16* o = out + r * d;
        for (int64_t i = 0; i < d; i++) o[i] = to_bf16(to_float(w[i]) * round_bf16(to_float(xr[i]) * inv));
    }
}

// qkv (rows, (H + 2 KV) * D): the rotary embedding of the H query and KV key heads, q * cos + rotate_half(q) * sin
// with each product and the sum rounded to bf16 as transformers' bf16 ops do; queries to q_out (rows, H, D), keys and
// values written to the caches k_cache, v_cache (row r, head h at r * row_stride + h * head_stride, position `at`).
extern "C" void rotary_into_cache(const bf16* qkv, const bf16* cos, const bf16* sin, bf16* q_out, bf16* k_cache, bf16* v_cache,
                                  int64_t rows, int64_t H, int64_t KV, int64_t D, int64_t row_stride, int64_t head_stride, int64_t at,
                                  int threads) {
    const int64_t half = D / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const bf16* c = cos + r * D;
        const bf16* s = sin + r * D;
        for (int64_t h = 0; h < H + 2 * KV; h++) {
            const bf16* x = qkv + (r * (H + 2 * KV) + h) * D;
            bf16* o = h < H ? q_out + (r * H + h) * D
                            : (h < H + KV ? k_cache : v_cache) + r * row_stride + ((h - H) % KV) * head_stride + at * D;
            if (h >= H + KV) {
                std::memcpy(o, x, D * sizeof(bf16));
                continue;
            }
            for (int64_t i = 0; i < D; i++) {
                float rotated = i < half ? -to_float(x[i + half]) : to_float(x[i - half]);
                o[i] = to_bf16(round_bf16(to_float(x[i]) * to_float(c[i])) + round_bf16(rotated * to_float(s[i])));
            }
        }
    }
}

// Attention of one new query per row over its cached keys and values: q (rows, H, D); keys and values of row r, KV
// head h at r * row_stride + h * head_stride, positions 0..T-1 of which mask (rows, mask_stride) keeps the nonzero;
// the H / KV query heads of a KV head read its keys and values once, together. Scores, softmax and the weighted sum
// in fp32, out (rows, H, D) rounded to bf16.
extern "C" void decode_attention(const bf16* q, const bf16* k_cache, const bf16* v_cache, const uint8_t* mask, bf16* out,
                                 int64_t rows, int64_t H, int64_t KV, int64_t D, int64_t T, int64_t row_stride, int64_t head_stride,
                                 int64_t mask_stride, float scale, int threads) {
    const int64_t G = H / KV;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> qf(G * D), kf(D), acc(G * D), scores(G * T);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < rows * KV; task++) {
            const int64_t r = task / KV, h = task % KV;
            const bf16* keys = k_cache + r * row_stride + h * head_stride;
            const bf16* values = v_cache + r * row_stride + h * head_stride;
            const uint8_t* m = mask + r * mask_stride;
            for (int64_t i = 0; i < G * D; i++) qf[i] = to_float(q[(r * H + h * G) * D + i]) * scale;
            std::vector<float> top(G, -INFINITY), total(G, 0.f);
            for (int64_t t = 0; t < T; t++) {
                if (!m[t]) continue;
                for (int64_t i = 0; i < D; i++) kf[i] = to_float(keys[t * D + i]);
                for (int64_t g = 0; g < G; g++) {
                    float dot = 0.f;
                    const float* qg = qf.data() + g * D;
#pragma omp simd reduction(+ : dot)
                    for (int64_t i = 0; i < D; i++) dot += qg[i] * kf[i];
                    scores[g * T + t] = dot;
                    top[g] = dot > top[g] ? dot : top[g];
                }
            }
            for (int64_t g = 0; g < G; g++) {
                float* sg = scores.data() + g * T;
                float sum = 0.f;
#pragma omp simd reduction(+ : sum)
                for (int64_t t = 0; t < T; t++) {
                    float p = m[t] ? vector_exp(sg[t] - top[g]) : 0.f;
                    sg[t] = p;
                    sum += p;
                }
                total[g] = sum;
            }
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t t = 0; t < T; t++) {
                if (!m[t]) continue;
                const bf16* v = values + t * D;
                for (int64_t g = 0; g < G; g++) {
                    const float p = scores[g * T + t];
                    float* a = acc.data() + g * D;
#pragma omp simd
                    for (int64_t i = 0; i < D; i++) a[i] += p * to_float(v[i]);
                }
            }
            for (int64_t g = 0; g < G; g++)
                for (int64_t i = 0; i < D; i++) out[(r * H + h * G + g) * D + i] = to_bf16(acc[g * D + i] / total[g]);
        }
    }
}

// out (rows, F) = bf16(silu(gate)) * up, gate_up (rows, 2F) holding gate then up: transformers' LlamaMLP in bf16.
extern "C" void silu_mul(const bf16* gate_up, bf16* out, int64_t rows, int64_t F, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const bf16* gate = gate_up + r * 2 * F;
        const bf16* up = gate + F;
        bf16* o = out + r * F;
#pragma omp simd
        for (int64_t i = 0; i < F; i++) {
            float g = to_float(gate[i]);
            o[i] = to_bf16(round_bf16(g / (1.f + vector_exp(-g))) * to_float(up[i]));
        }
    }
}
