// Decode attention straight from packed KV codes on CPU (kvcache_plugins.attention.cpu_kernel builds this file).
//
// For every (batch row, KV head) pair, one task (at::parallel_for) attends the R * n query rows of that head (GQA:
// R query heads per KV head, n new tokens) to the quantized past and then to the full-precision tokens, in tiles of
// TILE tokens with an online softmax in fp32:
//
//   tile:   kf[t, :] = codes[t, :] * scale + zero                 (unpacked into an L1-resident fp32 tile)
//           s[r, t]  = scaling * <q_r, kf[t, :]>  (+ soft-cap)  + mask[r, t]
//           m' = max(m, max_t s),  a = exp(m - m'),  e = exp(s - m')
//           l  = a l + sum_t e,    acc = a acc + sum_t e[r, t] v[t, :]
//   output: acc / l
//
// Every loop runs over a contiguous fp32 or byte array with a compile-time lane count, written so that the compiler
// vectorises it with the ISA the file is built for (-march=native, or -mavx2 -mfma when forced): no intrinsics.
// The packing is planar (kvcache_plugins/quant/packing.py): plane p of a segment is columns [p m, (p+1) m).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int TILE = 64;  // tokens per tile: kf and vf tiles are TILE * D fp32 each
constexpr int W = 16;     // partial sums per dot product (a multiple of every vector width)

// exp(x) for an array, branch-free (vectorises): Cephes' polynomial on [-ln2/2, ln2/2] and 2^n from the exponent
// bits; relative error about 2e-7. Inputs below -87 give exactly 0 (masked scores get no weight).
inline void exp_inplace(float* x, int n) {
  for (int i = 0; i < n; ++i) {
    const float xi = x[i];
    float v = xi < -87.0f ? -87.0f : (xi > 88.0f ? 88.0f : xi);
    float k = std::floor(v * 1.44269504088896341f + 0.5f);
    float r = v - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    const float two_k = __builtin_bit_cast(float, bits);
    x[i] = xi < -87.0f ? 0.0f : p * two_k;
  }
}

template <int DD>
inline float dot(const float* __restrict__ a, const float* __restrict__ b, int D_) {
  const int D = DD ? DD : D_;
  float part[W] = {0.0f};
  int d = 0;
  for (; d + W <= D; d += W)
    for (int l = 0; l < W; ++l) part[l] += a[d + l] * b[d + l];
  for (int w = W / 2; w > 0; w /= 2)  // a tree: each step is one vector add of half the width
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  float s = part[0];
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

template <typename ST>
inline float to_f(ST v) {
  return static_cast<float>(v);
}

// One stored tensor (keys or values of one (row, head)) and how it is packed.
struct Packed {
  const uint8_t* codes;  // [T, bytes per token]
  int64_t code_stride;   // bytes between tokens
  const void* scale;     // token axis [T, D / g]; channel axis [T / g, D]
  const void* zero;
  int64_t meta_stride;   // elements between meta rows
  int bits, group, axis, D;
};

// code of plane p at byte-unit j of a segment starting at `seg` (m units per plane)
template <int BITS>
inline int code_at(const uint8_t* __restrict__ seg, int m, int p, int j) {
  if constexpr (BITS == 8) {
    return seg[j];
  } else if constexpr (BITS == 3) {
    int u = seg[j] | (seg[m + j] << 8) | (seg[2 * m + j] << 16);
    return (u >> (3 * p)) & 7;
  } else {
    return (seg[j] >> (BITS * p)) & ((1 << BITS) - 1);
  }
}

// Dequantize tokens [t0, t0 + nt) into out[nt][D] (fp32). MM: units per plane when known at compile time (0: not).
template <int BITS, int AXIS, typename ST, int MM>
void dequant(const Packed& x, int64_t t0, int nt, float* __restrict__ out, float* __restrict__ sf,
             float* __restrict__ zf) {
  constexpr int K = BITS == 8 ? 1 : (BITS == 3 ? 8 : 8 / BITS);  // codes per unit
  constexpr int UB = BITS == 3 ? 3 : 1;                            // bytes per unit
  const int D = x.D, g = x.group;
  const ST* scale = static_cast<const ST*>(x.scale);
  const ST* zero = static_cast<const ST*>(x.zero);
  if (AXIS == 0) {  // per token: segments of g columns, one scale and zero each
    const int m = MM ? MM : g / K, segs = D / g;
    for (int t = 0; t < nt; ++t) {
      const uint8_t* __restrict__ row = x.codes + (t0 + t) * x.code_stride;
      const ST* sr = scale + (t0 + t) * x.meta_stride;
      const ST* zr = zero + (t0 + t) * x.meta_stride;
      float* o = out + t * D;
      for (int s = 0; s < segs; ++s) {
        const float sc = to_f(sr[s]), zc = to_f(zr[s]);
        const uint8_t* __restrict__ seg = row + s * m * UB;
        float* __restrict__ os = o + s * g;
        if constexpr (BITS == 3) {  // few units per plane: build each 24-bit unit once, then its eight codes
          for (int j = 0; j < m; ++j) {
            const uint32_t u = seg[j] | (seg[m + j] << 8) | (seg[2 * m + j] << 16);
            for (int p = 0; p < K; ++p) os[p * m + j] = static_cast<float>((u >> (3 * p)) & 7u) * sc + zc;
          }
        } else {
          for (int p = 0; p < K; ++p)
            for (int j = 0; j < m; ++j) os[p * m + j] = static_cast<float>(code_at<BITS>(seg, m, p, j)) * sc + zc;
        }
      }
    }
  } else {  // per channel: one segment of D columns; scale and zero per column, per group of g tokens
    const int m = D / K;
    int64_t loaded = -1;
    for (int t = 0; t < nt; ++t) {
      const int64_t G = (t0 + t) / g;
      if (G != loaded) {
        const ST* sr = scale + G * x.meta_stride;
        const ST* zr = zero + G * x.meta_stride;
        for (int d = 0; d < D; ++d) {
          sf[d] = to_f(sr[d]);
          zf[d] = to_f(zr[d]);
        }
        loaded = G;
      }
      const uint8_t* row = x.codes + (t0 + t) * x.code_stride;
      float* o = out + t * D;
      for (int p = 0; p < K; ++p)
        for (int j = 0; j < m; ++j) {
          const int d = p * m + j;
          o[d] = static_cast<float>(code_at<BITS>(row, m, p, j)) * sf[d] + zf[d];
        }
    }
  }
}

using DequantFn = void (*)(const Packed&, int64_t, int, float*, float*, float*);

template <int BITS, int AXIS, int MM>
DequantFn pick_meta(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return &dequant<BITS, AXIS, float, MM>;
    case at::kHalf: return &dequant<BITS, AXIS, at::Half, MM>;
    case at::kBFloat16: return &dequant<BITS, AXIS, at::BFloat16, MM>;
    default: TORCH_CHECK(false, "scales must be float32, float16 or bfloat16, got ", st);
  }
}

template <int BITS>
DequantFn pick_axis(int axis, int group, at::ScalarType st) {
  if (axis != 0) return pick_meta<BITS, 1, 0>(st);
  constexpr int K = BITS == 8 ? 1 : (BITS == 3 ? 8 : 8 / BITS);
  switch (group / K) {  // units per plane of the common group sizes (32, 64, 128) at compile time
    case 32 / K: return pick_meta<BITS, 0, 32 / K>(st);
    case 64 / K: return pick_meta<BITS, 0, 64 / K>(st);
    case 128 / K: return pick_meta<BITS, 0, 128 / K>(st);
    default: return pick_meta<BITS, 0, 0>(st);
  }
}

DequantFn pick(int bits, int axis, int group, at::ScalarType st) {
  switch (bits) {
    case 8: return pick_axis<8>(axis, group, st);
    case 4: return pick_axis<4>(axis, group, st);
    case 3: return pick_axis<3>(axis, group, st);
    case 2: return pick_axis<2>(axis, group, st);
    default: TORCH_CHECK(false, "bits must be 2, 3, 4 or 8, got ", bits);
  }
}

// Online-softmax state of the query rows of one (batch row, KV head).
struct Rows {
  int n_rows, D;
  std::vector<float> q, m, l, acc, s;  // q [rows, D]; m, l [rows]; acc [rows, D]; s [rows, TILE]
  Rows(int rows, int D) : n_rows(rows), D(D), q(rows * D), m(rows, -std::numeric_limits<float>::infinity()),
                          l(rows, 0.0f), acc(rows * D, 0.0f), s(rows * TILE) {}
};

struct Step {
  float scaling, softcap;
  int n;                                      // queries per query head
  const float* mask;                          // [B, 1, n, L] with strides below
  int64_t mask_b, mask_q;
  float* probs;                               // raw scores, then probabilities [B, Hq, n, L] (or null)
  int64_t L, Hq;
  int64_t prow(int64_t b, int64_t hq, int64_t i) const { return ((b * Hq + hq) * n + i) * L; }
};

// Attend the rows to nt tokens whose keys kf and values vf ([nt, D] fp32) sit at mask columns [col, col + nt).
// DD: head_dim when known at compile time (0: not).
template <int DD>
void attend_tile(Rows& R, const Step& st, const float* kf, const float* vf, int nt, int64_t col, int64_t b,
                 int64_t hq0) {
  const int D = DD ? DD : R.D;
  for (int r = 0; r < R.n_rows; ++r) {
    const float* q = R.q.data() + r * D;
    float* s = R.s.data() + r * TILE;
    for (int t = 0; t < nt; ++t) s[t] = dot<DD>(q, kf + t * D, D) * st.scaling;
    if (st.softcap > 0.0f)
      for (int t = 0; t < nt; ++t) s[t] = std::tanh(s[t] / st.softcap) * st.softcap;
    const int i = r % st.n;
    const float* mrow = st.mask + b * st.mask_b + i * st.mask_q + col;
    for (int t = 0; t < nt; ++t) s[t] += mrow[t];
    if (st.probs) std::memcpy(st.probs + st.prow(b, hq0 + r / st.n, i) + col, s, nt * sizeof(float));
    float top = -std::numeric_limits<float>::infinity();
    for (int t = 0; t < nt; ++t) top = std::max(top, s[t]);
    const float m_new = std::max(R.m[r], top);
    const float alpha = R.m[r] == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(R.m[r] - m_new);
    for (int t = 0; t < nt; ++t) s[t] -= m_new;
    exp_inplace(s, nt);
    float sum = 0.0f;
    for (int t = 0; t < nt; ++t) sum += s[t];
    R.l[r] = R.l[r] * alpha + sum;
    R.m[r] = m_new;
    float* __restrict__ acc = R.acc.data() + r * D;
    if (alpha != 1.0f)
      for (int d = 0; d < D; ++d) acc[d] *= alpha;
    for (int t = 0; t < nt; ++t) {
      const float p = s[t];
      const float* __restrict__ v = vf + t * D;
      for (int d = 0; d < D; ++d) acc[d] += p * v[d];
    }
  }
}

}  // namespace

namespace {

Packed packed(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int bits, int group, int axis,
              int D, int64_t b, int64_t h) {
  return Packed{codes.data_ptr<uint8_t>() + b * codes.stride(0) + h * codes.stride(1), codes.stride(2),
                static_cast<const char*>(scale.data_ptr()) + (b * scale.stride(0) + h * scale.stride(1)) * scale.element_size(),
                static_cast<const char*>(zero.data_ptr()) + (b * zero.stride(0) + h * zero.stride(1)) * zero.element_size(),
                scale.stride(2), bits, group, axis, D};
}

// q [B, Hq, n, D]; quantized past codes [B, H, Tp, P] with scale/zero; full-precision fp_keys/fp_values [B, H, F, D];
// additive fp32 mask [B, 1, n, Tp + F]. Tokens [valid, Tp) of the past are skipped (masked by the caller anyway).
// Returns (out [B, n, Hq, D] in q's dtype, probabilities [B, Hq, n, Tp + F] fp32, or an empty tensor).
std::tuple<at::Tensor, at::Tensor> decode_attend(
    const at::Tensor& q_in, const at::Tensor& k_codes_in, const at::Tensor& k_scale_in, const at::Tensor& k_zero_in,
    const at::Tensor& v_codes_in, const at::Tensor& v_scale_in, const at::Tensor& v_zero_in,
    const at::Tensor& fp_keys_in, const at::Tensor& fp_values_in, const at::Tensor& mask_in, int64_t k_bits,
    int64_t k_group, int64_t k_axis, int64_t v_bits, int64_t v_group, int64_t v_axis, int64_t valid, double scaling,
    double softcap, bool weights) {
  TORCH_CHECK(q_in.dim() == 4 && k_codes_in.dim() == 4 && fp_keys_in.dim() == 4 && mask_in.dim() == 4,
              "decode_attend: expected 4-d tensors");
  TORCH_CHECK(k_codes_in.scalar_type() == at::kByte && v_codes_in.scalar_type() == at::kByte, "codes must be uint8");
  TORCH_CHECK(mask_in.scalar_type() == at::kFloat, "the mask must be float32");
  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  const at::Tensor kc = k_codes_in.contiguous(), ks = k_scale_in.contiguous(), kz = k_zero_in.contiguous();
  const at::Tensor vc = v_codes_in.contiguous(), vs = v_scale_in.contiguous(), vz = v_zero_in.contiguous();
  const at::Tensor fk = fp_keys_in.to(at::kFloat).contiguous(), fv = fp_values_in.to(at::kFloat).contiguous();
  at::Tensor mask = mask_in.stride(3) == 1 ? mask_in : mask_in.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), D = q.size(3);
  const int64_t H = kc.size(1), Tp = kc.size(2), F = fk.size(2), L = Tp + F;
  TORCH_CHECK(Hq % H == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(mask.size(3) == L && mask.size(2) == n, "the mask must be [B, 1, n, Tp + F]");
  TORCH_CHECK(vc.size(2) == Tp && valid >= 0 && valid <= Tp, "bad token counts");
  const int64_t Rq = Hq / H, rows = Rq * n;
  const DequantFn kdq = pick(k_bits, k_axis, k_group, ks.scalar_type());
  const DequantFn vdq = pick(v_bits, v_axis, v_group, vs.scalar_type());
  at::Tensor out = at::empty({B, n, Hq, D}, q.options());
  at::Tensor probs = weights ? at::empty({B, Hq, n, L}, q.options()) : at::Tensor();
  Step st{static_cast<float>(scaling), static_cast<float>(softcap), static_cast<int>(n), mask.data_ptr<float>(),
          mask.size(0) == 1 ? 0 : mask.stride(0), mask.stride(2), weights ? probs.data_ptr<float>() : nullptr, L, Hq};
  using TileFn = void (*)(Rows&, const Step&, const float*, const float*, int, int64_t, int64_t, int64_t);
  const TileFn attend_tile_d = D == 64 ? &attend_tile<64> : (D == 128 ? &attend_tile<128> : &attend_tile<0>);
  const float* qp = q.data_ptr<float>();
  const float* fkp = fk.data_ptr<float>();
  const float* fvp = fv.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kf(TILE * D), vf(TILE * D), sf(4 * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, hq0 = h * Rq;
      Rows R(static_cast<int>(rows), static_cast<int>(D));
      for (int64_t r = 0; r < rows; ++r)  // row r = query head hq0 + r / n, query r % n
        std::memcpy(R.q.data() + r * D, qp + ((b * Hq + hq0 + r / n) * n + r % n) * D, D * sizeof(float));
      const Packed K = packed(kc, ks, kz, k_bits, k_group, k_axis, D, b, h);
      const Packed V = packed(vc, vs, vz, v_bits, v_group, v_axis, D, b, h);
      for (int64_t t0 = 0; t0 < valid; t0 += TILE) {
        const int nt = static_cast<int>(std::min<int64_t>(TILE, valid - t0));
        kdq(K, t0, nt, kf.data(), sf.data(), sf.data() + D);
        vdq(V, t0, nt, vf.data(), sf.data() + 2 * D, sf.data() + 3 * D);
        attend_tile_d(R, st, kf.data(), vf.data(), nt, t0, b, hq0);
      }
      const float* fkr = fkp + (b * H + h) * F * D;
      const float* fvr = fvp + (b * H + h) * F * D;
      for (int64_t f0 = 0; f0 < F; f0 += TILE) {
        const int nt = static_cast<int>(std::min<int64_t>(TILE, F - f0));
        attend_tile_d(R, st, fkr + f0 * D, fvr + f0 * D, nt, Tp + f0, b, hq0);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t hq = hq0 + r / n, i = r % n;
        const float inv = 1.0f / R.l[r];
        float* o = op + ((b * n + i) * Hq + hq) * D;
        const float* acc = R.acc.data() + r * D;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
        if (weights) {
          float* p = st.probs + st.prow(b, hq, i);
          std::fill(p + valid, p + Tp, 0.0f);
          for (const auto& span : {std::pair<int64_t, int64_t>{0, valid}, {Tp, L}})  // raw scores -> probabilities
            for (int64_t c = span.first; c < span.second; c += TILE) {
              const int nc = static_cast<int>(std::min<int64_t>(TILE, span.second - c));
              for (int t = 0; t < nc; ++t) p[c + t] -= R.m[r];
              exp_inplace(p + c, nc);
              for (int t = 0; t < nc; ++t) p[c + t] *= inv;
            }
        }
      }
    }
  });
  return {q_in.scalar_type() == at::kFloat ? out : out.to(q_in.scalar_type()), probs};
}

}  // namespace

#ifndef KVP_NAMESPACE
#define KVP_NAMESPACE kvcache_plugins_native
#endif
#define KVP_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands KVP_NAMESPACE first: one op namespace per build

KVP_LIBRARY(KVP_NAMESPACE, m) {
  m.def("decode_attend(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor v_codes, Tensor v_scale, "
        "Tensor v_zero, Tensor fp_keys, Tensor fp_values, Tensor mask, int k_bits, int k_group, int k_axis, "
        "int v_bits, int v_group, int v_axis, int valid, float scaling, float softcap, bool weights) "
        "-> (Tensor, Tensor)");
  m.impl("decode_attend", c10::DispatchKey::CPU, &decode_attend);
}
