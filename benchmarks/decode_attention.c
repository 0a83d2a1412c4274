/* One decode step's attention for one layer, written to stream the KV buffer once at memory speed: the ceiling a
 * native decode-attention op for ONNX Runtime's CPU provider could reach (benchmarks/decode_attention_kernels.py
 * compiles and times it beside ONNX Runtime's kernels; it is not part of any runtime).
 *
 * q [heads, d] (already scaled), k and v [kv_heads, capacity, d], bias [capacity] added to every head's scores
 * (0 at valid columns, -inf at padding); columns [0, length) are read. scores: [heads, capacity] scratch.
 * out [heads, d]. Query head h reads KV head h / (heads / kv_heads). Threads split the heads (OpenMP). */
#include <math.h>
#include <stddef.h>

void decode_attention(const float *q, const float *k, const float *v, const float *bias, int heads, int kv_heads,
                      int capacity, int length, int d, float *scores, float *out) {
    const int group = heads / kv_heads;
#pragma omp parallel for schedule(static)
    for (int h = 0; h < heads; h++) {
        const float *qh = q + (size_t)h * d;
        const float *kh = k + (size_t)(h / group) * capacity * d;
        const float *vh = v + (size_t)(h / group) * capacity * d;
        float *s = scores + (size_t)h * capacity, *o = out + (size_t)h * d;
        float top = -INFINITY, sum = 0.0f;
        int j = 0;
        for (; j + 4 <= length; j += 4) { /* pass 1: K read once, four independent dot products in flight */
            const float *k0 = kh + (size_t)j * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
            float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
            for (int i = 0; i < d; i++) {
                d0 += qh[i] * k0[i];
                d1 += qh[i] * k1[i];
                d2 += qh[i] * k2[i];
                d3 += qh[i] * k3[i];
            }
            s[j] = d0 + bias[j], s[j + 1] = d1 + bias[j + 1], s[j + 2] = d2 + bias[j + 2], s[j + 3] = d3 + bias[j + 3];
        }
        for (; j < length; j++) {
            const float *kj = kh + (size_t)j * d;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int i = 0; i < d; i++) dot += qh[i] * kj[i];
            s[j] = dot + bias[j];
        }
        for (j = 0; j < length; j++) top = s[j] > top ? s[j] : top;
        for (j = 0; j < length; j++) {
            s[j] = expf(s[j] - top);
            sum += s[j];
        }
        for (int i = 0; i < d; i++) o[i] = 0.0f;
        for (j = 0; j < length; j++) { /* pass 2: V read once */
            const float *vj = vh + (size_t)j * d;
            const float p = s[j];
#pragma omp simd
            for (int i = 0; i < d; i++) o[i] += p * vj[i];
        }
        for (int i = 0; i < d; i++) o[i] /= sum;
    }
}
