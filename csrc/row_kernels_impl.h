// Row kernels of the fused log-prob / entropy op: the body of row_kernels_baseline.cpp and row_kernels_avx2.cpp.
// No include guard and no #include: each instruction-set translation unit includes the standard headers first,
// sets its target, defines AEM_ISA_NAMESPACE / AEM_ISA_NAME / AEM_ISA_HAS_FMA / AEM_ISA_VECTOR_BYTES and then
// includes this body, so every function below is compiled for that target and has internal linkage (nothing
// can leak across targets) except <isa>::kernel_table().
//
// Math (AEM_SPEC eq. 1-2, section 6), z = x / tau for one row x of V logits:
//   forward, ONE read of the row: blocks of kBlock elements are loaded into L1 (converted to fp32 for
//     bf16/fp16); per block the block max raises the running max m (raw logits units), and with
//     s = (x - m) / tau <= 0 (x - m exact near the max, then one scaling: s is accurate to an ulp of s, where
//     eager fp32 rounds x / tau and m / tau) it accumulates d = sum exp(s) and t = sum exp(s) * s.
//     When m grows to m', with shift = (m - m') / tau:  d' = e^shift d,  t' = e^shift (t + shift d).
//     The per-row epilogue is in double (a few flops per row): log d, h = log d - t / d (both terms >= 0: no
//     cancellation) and l_y = (x_y - m) / tau - log d with x_y - m exact and the exact double tau, i.e. the
//     correctly rounded fp32 log-prob up to the rounding of d. exp(s) = 0 entries (-inf logits) add 0 to t,
//     never 0 * -inf. The state saved for the backward is (m, log d), not lse = m / tau + log d: one fp32
//     lse would put its rounding (an ulp of |lse|, 5e-4 at 1e4) into every p of the backward.
//   backward, one read and one write: log p = (x - m) / tau - log d (exact at the max), p = exp(log p) and
//     per-row scalars a = dL/dl, b = dL/dh:  g = [a (onehot(y) - p) - b p (log p + h)] / tau, staged through
//     an L1 block so that the output may be the input's own storage (in place). Written so that floating-point
//     contraction (GCC contracts a * b + c into an FMA by default, which the AVX2 unit has) can only make it
//     more accurate. A form x * (1/tau) - lse would not be: contracted to fma(x, 1/tau, -lse), it gives at the
//     max the rounding error of x / tau itself (~1e-3 at |x| ~ 1e4) instead of exactly 0 (a 2e-2 gradient error).
// Determinism: a row is reduced by one thread, in kLanes fixed partial sums combined in a fixed tree, so the
// results do not depend on the thread count or on which thread handles the row.
// Vectorisation: the per-block loops are plain element-wise loops writing local L1 buffers (no aliasing for
// the compiler to fear) and fixed-width lane sums, which GCC and Clang vectorise at -O3 (check with
// AEM_KERNELS_VEC_REPORT=1, which adds -fopt-info-vec-optimized to the build); exp is a branch-free polynomial
// (no libm call) so that it vectorises too; the max reduction is written with vector extensions (block_max).

#ifndef AEM_ISA_NAMESPACE
#error "define AEM_ISA_NAMESPACE, AEM_ISA_NAME, AEM_ISA_HAS_FMA and AEM_ISA_VECTOR_BYTES first"
#endif

namespace aem_kernels {
namespace cpu {
namespace AEM_ISA_NAMESPACE {
namespace {

constexpr int64_t kBlock = 1024;  // elements per L1-resident block (4 KiB of fp32 per buffer)
constexpr int kLanes = 16;        // independent partial sums: two AVX2 vectors, four SSE vectors

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float mul_add(float a, float b, float c) {
#if AEM_ISA_HAS_FMA
  return __builtin_fmaf(a, b, c);  // one rounding; a single vfmadd instruction under the AVX2 target
#else
  return a * b + c;
#endif
}

// e^x for the exponents of these kernels, which are <= 0 up to rounding (log-probabilities, shifts down to a
// running max), so only underflow needs care. Branch-free, so that loops over it vectorise: e^x = 2^n e^r,
// n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split into a 9-bit head, so n * head is exact,
// and a tail), e^r by Cephes' degree-7 minimax polynomial (about 1 ulp). Below ln(FLT_MIN) (including -inf)
// the result is 0 instead of a subnormal. `floored` receives max(x, ln FLT_MIN): where the result is 0 it is
// finite, so callers form exp(x) * x as value * floored without a 0 * -inf. NaN propagates. Valid up to
// x = 88.37 (2^127), far above any exponent here.
inline float exp_f32(float x, float& floored) {
  constexpr float kMin = -87.3365447f;
  constexpr float kLog2e = 1.44269504088896341f, kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds
  constexpr float kLn2Head = 0.693359375f, kLn2Tail = -2.12194440e-4f;
  const bool underflow = x < kMin;
  const float arg = underflow ? kMin : x;
  floored = arg;
  const float n = mul_add(arg, kLog2e, kRound) - kRound;
  float r = mul_add(n, -kLn2Head, arg);
  r = mul_add(n, -kLn2Tail, r);
  float poly = 1.9875691500e-4f;
  poly = mul_add(poly, r, 1.3981999507e-3f);
  poly = mul_add(poly, r, 8.3334519073e-3f);
  poly = mul_add(poly, r, 4.1665795894e-2f);
  poly = mul_add(poly, r, 1.6666665459e-1f);
  poly = mul_add(poly, r, 5.0000001201e-1f);
  const float exp_r = mul_add(poly, r * r, r + 1.0f);
  const float two_n = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return underflow ? 0.0f : exp_r * two_n;
}

// fp64 is the checking path: libm's exp (exactly 0 below -745), floored at -745 for the same 0 * -inf reason.
inline double exp_f64(double x, double& floored) {
  floored = x < -745.0 ? -745.0 : x;
  return std::exp(x);
}

inline float exp_acc(float x, float& floored) { return exp_f32(x, floored); }
inline double exp_acc(double x, double& floored) { return exp_f64(x, floored); }
template <class Acc>
inline Acc exp_acc(Acc x) {
  Acc unused;
  return exp_acc(x, unused);
}

// ---- storage formats: how a logit is loaded into the accumulation type and a gradient stored back -------

struct Float32 {
  using Storage = float;
  using Acc = float;
  static constexpr bool kNative = true;  // rows are read in place, no conversion buffer
  static Acc load(Storage v) { return v; }
  static Storage store(Acc v) { return v; }
};

struct Float64 {
  using Storage = double;
  using Acc = double;
  static constexpr bool kNative = true;
  static Acc load(Storage v) { return v; }
  static Storage store(Acc v) { return v; }
};

struct BFloat16 {
  using Storage = uint16_t;
  using Acc = float;
  static constexpr bool kNative = false;
  static Acc load(Storage v) { return bits_to_float(static_cast<uint32_t>(v) << 16); }
  // Round to nearest even (what torch's .to(torch.bfloat16) does); NaN stays a quiet NaN.
  static Storage store(Acc v) {
    const uint32_t bits = float_to_bits(v);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    return static_cast<Storage>(is_nan ? ((bits >> 16) | 0x40u) : rounded);
  }
};

struct Float16 {
  using Storage = uint16_t;
  using Acc = float;
  static constexpr bool kNative = false;
  // IEEE half -> float without branches. Moving the 5+10 exponent/mantissa bits under the float's and
  // multiplying by 2^-112 re-biases the exponent (15 -> 127) for normals, infinities and NaNs alike;
  // subnormals (exponent 0) are m * 2^-24, built exactly as (0.5 + m * 2^-24) - 0.5.
  static Acc load(Storage v) {
    const uint32_t word = static_cast<uint32_t>(v) << 16;
    const uint32_t sign = word & 0x80000000u;
    const uint32_t unsigned_word = word + word;  // the sign shifted out; exponent at bits 27..31
    const float normal = bits_to_float((unsigned_word >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float subnormal = bits_to_float((unsigned_word >> 17) | (126u << 23)) - 0.5f;
    const uint32_t magnitude = unsigned_word < (1u << 27) ? float_to_bits(subnormal) : float_to_bits(normal);
    return bits_to_float(sign | magnitude);
  }
  // float -> IEEE half, round to nearest even, without branches. Scaling |v| by 2^112 * 2^-110 turns values
  // beyond the half range into +inf (and keeps the rest exact, times 4); adding the power of two `bias`
  // (2^(exponent of v) * 2^13 relative to v, at least the smallest half-normal's) makes the float adder round
  // the mantissa to the half's 10 bits, after which the exponent and mantissa bits are read off directly.
  static Storage store(Acc v) {
    const uint32_t bits = float_to_bits(v);
    const uint32_t sign = bits & 0x80000000u;
    const uint32_t unsigned_bits2 = bits + bits;  // |v|'s bits shifted left by one
    float base = (bits_to_float(bits & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t bias = unsigned_bits2 & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = bits_to_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t rounded = float_to_bits(base);
    const uint32_t magnitude = ((rounded >> 13) & 0x00007C00u) + (rounded & 0x00000FFFu);
    const uint32_t is_nan = unsigned_bits2 > 0xFF000000u;
    return static_cast<Storage>((sign >> 16) | (is_nan ? 0x7E00u : magnitude));
  }
};

// ---- block helpers ------------------------------------------------------------------------------------

// The block as Acc values: the storage itself for fp32/fp64, else converted into `stage`.
template <class Fmt>
inline const typename Fmt::Acc* load_block(const typename Fmt::Storage* src, typename Fmt::Acc* stage,
                                           int64_t n) {
  if constexpr (Fmt::kNative) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) stage[i] = Fmt::load(src[i]);
    return stage;
  }
}

template <class Fmt>
inline void store_block(const typename Fmt::Acc* values, typename Fmt::Storage* dst, int64_t n) {
  if constexpr (Fmt::kNative) {
    std::memcpy(dst, values, static_cast<size_t>(n) * sizeof(typename Fmt::Storage));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = Fmt::store(values[i]);
  }
}

// Combines kLanes partial results in a fixed tree (same order on every target and thread count).
template <class T, class Op>
inline T combine_lanes(T* lanes, Op op) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] = op(lanes[l], lanes[l + width]);
  }
  return lanes[0];
}

// max over v[0..n) (exact in any order, so the lane layout is free); NaN entries are skipped here and
// surface through the exp pass instead. Written with GCC/Clang vector extensions of the target's native
// width: compilers vectorise a floating-point max reduction loop only under -ffinite-math-only, which would
// break the -inf handling.
template <class T>
inline T block_max(const T* v, int64_t n) {
  typedef T Vec __attribute__((vector_size(AEM_ISA_VECTOR_BYTES)));
  constexpr int kWidth = AEM_ISA_VECTOR_BYTES / sizeof(T);
  Vec top0, top1, top2, top3;  // four independent chains hide the compare/blend latency
  for (int l = 0; l < kWidth; ++l) top0[l] = -std::numeric_limits<T>::infinity();
  top1 = top2 = top3 = top0;
  int64_t i = 0;
  for (; i + 4 * kWidth <= n; i += 4 * kWidth) {
    Vec x0, x1, x2, x3;
    std::memcpy(&x0, v + i, sizeof(Vec));  // unaligned loads
    std::memcpy(&x1, v + i + kWidth, sizeof(Vec));
    std::memcpy(&x2, v + i + 2 * kWidth, sizeof(Vec));
    std::memcpy(&x3, v + i + 3 * kWidth, sizeof(Vec));
    top0 = x0 > top0 ? x0 : top0;
    top1 = x1 > top1 ? x1 : top1;
    top2 = x2 > top2 ? x2 : top2;
    top3 = x3 > top3 ? x3 : top3;
  }
  top0 = top1 > top0 ? top1 : top0;
  top2 = top3 > top2 ? top3 : top2;
  top0 = top2 > top0 ? top2 : top0;
  T result = top0[0];
  for (int l = 1; l < kWidth; ++l) result = top0[l] > result ? top0[l] : result;
  for (; i < n; ++i) result = v[i] > result ? v[i] : result;
  return result;
}

template <class T>
inline T block_sum(const T* v, int64_t n) {
  T lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += v[i + l];
  }
  for (int l = 0; i + l < n; ++l) lanes[l] += v[i + l];
  return combine_lanes(lanes, [](T a, T b) { return a + b; });
}

// Asks for the cache lines of the next block (n elements, at most kBlock) while the current one is computed.
template <class T>
inline void prefetch_block(const T* next, int64_t n) {
  constexpr int64_t kPerLine = 64 / sizeof(T);
  const int64_t stop = n < kBlock ? n : kBlock;
  for (int64_t j = 0; j < stop; j += kPerLine) __builtin_prefetch(next + j);
}

// ---- one row ------------------------------------------------------------------------------------------

template <class Fmt>
struct RowForward {
  typename Fmt::Acc max, log_denom, entropy, logprob;
};

// kEntropy = false (the caller does not want h) drops t = sum exp(s) s: its products, its lane sum and its
// rescale. A template parameter, so neither variant's inner loop has a branch and the kEntropy = true code is
// the arithmetic it always was (bit-identical results).
template <class Fmt, bool kEntropy>
RowForward<Fmt> forward_row(const typename Fmt::Storage* row, int64_t vocab, double tau,
                            typename Fmt::Acc inv_tau, int64_t label) {
  using Acc = typename Fmt::Acc;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  alignas(64) Acc stage[kBlock];
  alignas(64) Acc exps[kBlock];                      // exp(s)
  alignas(64) Acc weighted[kEntropy ? kBlock : 1];   // exp(s) * s, 0 where exp(s) == 0
  Acc running_max = kNegInf, denom = 0, weighted_sum = 0;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = vocab - start < kBlock ? vocab - start : kBlock;
    const Acc* x = load_block<Fmt>(row + start, stage, n);
    const Acc block_top = block_max(x, n);
    if (block_top > running_max) {
      if (running_max > kNegInf) {  // rescale what was accumulated against the old max
        const Acc shift = (running_max - block_top) * inv_tau;
        const Acc scale = exp_acc(shift);
        if constexpr (kEntropy) weighted_sum = scale * (weighted_sum + shift * denom);
        denom = scale * denom;
      }
      running_max = block_top;
    }
    if (!(running_max > kNegInf)) continue;  // only -inf so far: nothing to accumulate yet
    // The max pass reads a block in a burst and the exp pass below touches no memory, so without help the
    // next block's DRAM latency is not hidden behind this block's arithmetic (measured: ~12% of the forward).
    if (start + kBlock < vocab) prefetch_block(row + start + kBlock, vocab - start - kBlock);
    for (int64_t i = 0; i < n; ++i) {
      Acc s_floored;
      const Acc e = exp_acc((x[i] - running_max) * inv_tau, s_floored);
      exps[i] = e;
      if constexpr (kEntropy) weighted[i] = e * s_floored;  // 0 (not 0 * -inf) for -inf logits
    }
    denom += block_sum(exps, n);
    if constexpr (kEntropy) weighted_sum += block_sum(weighted, n);
  }
  RowForward<Fmt> out{};  // value-initialised: entropy is 0, not indeterminate, when it is skipped
  if (!(running_max > kNegInf)) {  // every logit is -inf (or NaN): no distribution, as in the reference
    out.max = out.log_denom = out.entropy = out.logprob = std::numeric_limits<Acc>::quiet_NaN();
    return out;
  }
  // The epilogue in double (once per row).
  const double log_denom = std::log(static_cast<double>(denom));
  out.max = running_max;
  out.log_denom = static_cast<Acc>(log_denom);
  if constexpr (kEntropy) {
    out.entropy = static_cast<Acc>(log_denom - static_cast<double>(weighted_sum) / static_cast<double>(denom));
  }
  out.logprob = label >= 0 ? static_cast<Acc>((static_cast<double>(Fmt::load(row[label])) -
                                               static_cast<double>(running_max)) / tau - log_denom)
                           : Acc(0);
  return out;
}

// Gradient of one row into `out` (which may be `row` itself). a: dL/dl_y (0 without labels), b: dL/dh;
// (row_max, log_denom) is the forward's state of this row.
template <class Fmt>
void backward_row(const typename Fmt::Storage* row, typename Fmt::Storage* out, int64_t vocab,
                  typename Fmt::Acc inv_tau, typename Fmt::Acc row_max, typename Fmt::Acc log_denom,
                  typename Fmt::Acc entropy, typename Fmt::Acc a, typename Fmt::Acc b, int64_t label) {
  using Acc = typename Fmt::Acc;
  alignas(64) Acc stage[kBlock];
  alignas(64) Acc grad[kBlock];
  // g_v = p_v (coef_p + coef_logp log p_v) off the label, per-row constants folded out of the loop.
  const Acc coef_p = -(a + b * entropy) * inv_tau;
  const Acc coef_logp = -b * inv_tau;
  // The label's own term (+ a / tau), from its logit read before an in-place write can overwrite it.
  Acc label_grad = 0;
  if (label >= 0) {
    Acc log_p;
    const Acc p = exp_acc((Fmt::load(row[label]) - row_max) * inv_tau - log_denom, log_p);
    label_grad = a * inv_tau + p * (coef_p + coef_logp * log_p);
  }
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = vocab - start < kBlock ? vocab - start : kBlock;
    const Acc* x = load_block<Fmt>(row + start, stage, n);
    for (int64_t i = 0; i < n; ++i) {
      Acc log_p;  // floored: finite where p == 0 (a -inf logit), so the term is 0, never 0 * -inf
      const Acc p = exp_acc((x[i] - row_max) * inv_tau - log_denom, log_p);
      grad[i] = p * (coef_p + coef_logp * log_p);
    }
    if (label >= start && label < start + n) grad[label - start] = label_grad;
    store_block<Fmt>(grad, out + start, n);  // the whole block was read above: safe when out == row
  }
}

// ---- row ranges (what the torch-facing ops call inside at::parallel_for) -------------------------------

// kEntropy = false: args.entropy is not written (it may be null).
template <class Fmt, bool kEntropy>
void forward_rows(const ForwardArgs& args, int64_t row_begin, int64_t row_end) {
  using Acc = typename Fmt::Acc;
  const auto* logits = static_cast<const typename Fmt::Storage*>(args.logits);
  auto* logprobs = static_cast<Acc*>(args.logprobs);
  auto* entropy = static_cast<Acc*>(args.entropy);
  auto* state = static_cast<Acc*>(args.state);  // [rows, 2]: (m, log d)
  const Acc inv_tau = static_cast<Acc>(args.inv_temperature);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t label = args.labels != nullptr ? args.labels[r] : -1;
    if (args.labels != nullptr && label == args.ignore_index) {  // ignored: outputs 0, the row is not read
      logprobs[r] = state[2 * r] = state[2 * r + 1] = Acc(0);
      if constexpr (kEntropy) entropy[r] = Acc(0);
      continue;
    }
    const RowForward<Fmt> res = forward_row<Fmt, kEntropy>(logits + args.layout.offset(r), args.layout.vocab,
                                                           args.temperature, inv_tau, label);
    if constexpr (kEntropy) entropy[r] = res.entropy;
    state[2 * r] = res.max;
    state[2 * r + 1] = res.log_denom;
    if (logprobs != nullptr) logprobs[r] = res.logprob;
  }
}

template <class Fmt>
void backward_rows(const BackwardArgs& args, int64_t row_begin, int64_t row_end) {
  using Acc = typename Fmt::Acc;
  using Storage = typename Fmt::Storage;
  const auto* logits = static_cast<const Storage*>(args.logits);
  auto* grad_out = static_cast<Storage*>(args.grad_out);
  const auto* state = static_cast<const Acc*>(args.state);  // [rows, 2]: (m, log d)
  const auto* entropy = static_cast<const Acc*>(args.entropy);
  const auto* grad_logprobs = static_cast<const Acc*>(args.grad_logprobs);
  const auto* grad_entropy = static_cast<const Acc*>(args.grad_entropy);
  const Acc inv_tau = static_cast<Acc>(args.inv_temperature);
  const int64_t vocab = args.layout.vocab;
  for (int64_t r = row_begin; r < row_end; ++r) {
    Storage* out = grad_out + args.grad_layout.offset(r);
    const int64_t label = args.labels != nullptr ? args.labels[r] : -1;
    if (args.labels != nullptr && label == args.ignore_index) {  // ignored: zero gradient, row not read
      std::memset(out, 0, static_cast<size_t>(vocab) * sizeof(Storage));  // all-zero bits are +0 in every format
      continue;
    }
    const Acc a = (grad_logprobs != nullptr && label >= 0) ? grad_logprobs[r] : Acc(0);
    const Acc b = grad_entropy != nullptr ? grad_entropy[r] : Acc(0);
    // Without grad_entropy the entropy is not read: b * h with b = 0 would still turn a NaN (or an unwritten
    // value) there into a NaN gradient. For finite h this is the same number (0 * h = +0).
    const Acc h = grad_entropy != nullptr ? entropy[r] : Acc(0);
    backward_row<Fmt>(logits + args.layout.offset(r), out, vocab, inv_tau, state[2 * r], state[2 * r + 1], h, a,
                      b, label);
  }
}

}  // namespace

const RowKernelTable& kernel_table() {
  // Constant-initialised (no code runs to build it), indexed by LogitDtype.
  static constexpr RowKernelTable kTable = {
      AEM_ISA_NAME,
      {forward_rows<Float32, true>, forward_rows<BFloat16, true>, forward_rows<Float16, true>,
       forward_rows<Float64, true>},
      {forward_rows<Float32, false>, forward_rows<BFloat16, false>, forward_rows<Float16, false>,
       forward_rows<Float64, false>},
      {backward_rows<Float32>, backward_rows<BFloat16>, backward_rows<Float16>, backward_rows<Float64>},
  };
  return kTable;
}

}  // namespace AEM_ISA_NAMESPACE
}  // namespace cpu
}  // namespace aem_kernels
