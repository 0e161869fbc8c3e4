// Probes of the readings of the PTX ISA that the Hopper kernels (csrc/cuda/sm90/) and the emulator share
// (notes/hopper.md, "Readings"), one small kernel each, through the kernels' own wrappers and layout
// helpers. Run first on a GPU: a failing probe names the reading that is wrong, before any attention
// kernel is looked at. The same source runs under the emulator (where every probe passes by construction
// of its model; on the GPU they check that model).
//   GPU:      nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -I csrc tests/emu/sm90_probe.cu -o probe
//             && ./probe
//   emulator: python3 tests/emu/run_all.py --probe
// Prints one line per probe and ends with "N passed, N failed".
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/sm90/common.cuh"
#include "cuda/sm90/wgmma.cuh"

using namespace fused_attn;
using namespace fused_attn::sm90;

namespace {

using T64 = Sw128Tile<64>;

// Host bf16 <-> float (round to nearest even), independent of the CUDA headers' host support.
uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float bf2f(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Probe {
  CUtensorMap ta, tb, tc;
  const void* in_a;
  float* out_f;
  uint16_t* out_h;
  int mode;
};

// ------------------------------------------------------------------------------------------------
// Kernels (one warpgroup; thread 0 drives the copies).

// Mode 0: TMA box {64, 64} of tensor a into a 1024-aligned tile; the raw bytes go to out_h.
// Mode 1: same for a box reaching past a 40 x 40 tensor (zero fill; expect_tx counts the whole box).
__global__ void __launch_bounds__(128, 1) tma_kernel(const __grid_constant__ Probe pr) {
  extern __shared__ __align__(1024) char smem[];
  const uint32_t base = (smem_u32(smem) + 1023u) & ~1023u;
  char* const g = smem + (base - smem_u32(smem));
  const uint32_t bar = base + 8192;
  if (threadIdx.x == 0) {
    mbar_init(bar, 1);
    fence_mbar_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbar_arrive_expect_tx(bar, 8192);
    tma_load_4d(base, &pr.ta, bar, 0, pr.mode == 1 ? -8 : 0, 0, 0);
  }
  mbar_wait(bar, 0);
  for (int i = threadIdx.x; i < 4096; i += 128) pr.out_h[i] = reinterpret_cast<const uint16_t*>(g)[i];
}

// Mode 0: D = A B^T, A (64 x 64) and B (64 x 64) K-major by TMA, four k-steps of wgmma_ss (start + 32 B).
// Mode 1: D = A^T B^T with A stored K-rows x M-columns (M-major, imm-trans-a), as the dQ product does.
// Mode 2: O = P V, P (64 x 64) from registers (the m64k16 A fragments, read from in_a), V (64 x 128, two
//         column blocks) N-major (imm-trans-b).
__global__ void __launch_bounds__(128, 1) mma_kernel(const __grid_constant__ Probe pr) {
  extern __shared__ __align__(1024) char smem[];
  const uint32_t base = (smem_u32(smem) + 1023u) & ~1023u;
  const uint32_t sa = base, sb = base + 8192, bar = base + 8192 + 16384;
  const int tid = threadIdx.x, w = tid / 32, g = (tid % 32) / 4, t = tid % 4;
  if (tid == 0) {
    mbar_init(bar, 1);
    fence_mbar_init();
  }
  __syncthreads();
  if (tid == 0) {
    mbar_arrive_expect_tx(bar, pr.mode == 2 ? 16384 : 16384);
    if (pr.mode == 2) {
      tma_load_4d(sb, &pr.tb, bar, 0, 0, 0, 0);
      tma_load_4d(sb + T64::kBlockBytes, &pr.tb, bar, 64, 0, 0, 0);
    } else {
      tma_load_4d(sa, &pr.ta, bar, 0, 0, 0, 0);
      tma_load_4d(sb, &pr.tb, bar, 0, 0, 0, 0);
    }
  }
  mbar_wait(bar, 0);
  if (pr.mode == 2) {
    float o[64];
    uint32_t a[4][4];
    const uint32_t* in = static_cast<const uint32_t*>(pr.in_a);
    for (int kk = 0; kk < 4; ++kk)
      for (int r = 0; r < 4; ++r) a[kk][r] = in[(kk * 128 + tid) * 4 + r];
    fence_regs(a);
    fence_regs(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs<128, __nv_bfloat16, 1>(o, a[kk], T64::mnmajor(T64::mnmajor_base(sb), 16 * kk), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(o);
    for (int i = 0; i < 64; ++i) {
      const int j = i / 4, ii = (i / 2) % 2, e = i % 2;
      pr.out_f[(16 * w + g + 8 * ii) * 128 + 8 * j + 2 * t + e] = o[i];
    }
  } else {
    float d[32];
    fence_regs(d);
    wgmma_fence();
    if (pr.mode == 0) {
#pragma unroll
      for (int ks = 0; ks < 4; ++ks)
        wgmma_ss<64, __nv_bfloat16, 0, 0>(d, T64::kmajor(T64::kmajor_base(sa), 0, ks),
                                          T64::kmajor(T64::kmajor_base(sb), 0, ks), ks > 0);
    } else {
#pragma unroll
      for (int ks = 0; ks < 4; ++ks)
        wgmma_ss<64, __nv_bfloat16, 1, 0>(d, T64::mnmajor(T64::mnmajor_base(sa), 16 * ks),
                                          T64::kmajor(T64::kmajor_base(sb), 0, ks), ks > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(d);
    for (int i = 0; i < 32; ++i) {
      const int j = i / 4, ii = (i / 2) % 2, e = i % 2;
      pr.out_f[(16 * w + g + 8 * ii) * 64 + 8 * j + 2 * t + e] = d[i];
    }
  }
}

// A tile written by ordinary stores in the SW128 layout (value r * 64 + c as raw bits), then stored by TMA
// into a 40 x 40 tensor with padded rows: the box is clipped to the tensor.
__global__ void __launch_bounds__(128, 1) store_kernel(const __grid_constant__ Probe pr) {
  extern __shared__ __align__(1024) char smem[];
  const uint32_t base = (smem_u32(smem) + 1023u) & ~1023u;
  for (int i = threadIdx.x; i < 64 * 32; i += 128) {
    const int r = i / 32, c = (i % 32) * 2;
    st_shared_u32(base + T64::offset(r, c), static_cast<uint32_t>(r * 64 + c) | (static_cast<uint32_t>(r * 64 + c + 1) << 16));
  }
  fence_proxy_async();
  __syncthreads();
  if (threadIdx.x == 0) {
    tma_store_4d(&pr.tc, base, 0, 0, 0, 0);
    bulk_commit();
    bulk_wait_read<0>();
  }
}

// ------------------------------------------------------------------------------------------------
// Host

int g_pass = 0, g_fail = 0;
void report(const char* name, bool ok, const std::string& detail) {
  std::printf("%s %-34s %s\n", ok ? "PASS" : "FAIL", name, detail.c_str());
  (ok ? g_pass : g_fail)++;
}

bool cuda_ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::printf("FAIL %s: %s\n", what, cudaGetErrorString(e));
  ++g_fail;
  return false;
}

template <typename K>
bool run(K kernel, const Probe& pr, int smem, const char* what) {
  if (!cuda_ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), what)) return false;
  kernel<<<1, 128, smem>>>(pr);
  return cuda_ok(cudaGetLastError(), what) && cuda_ok(cudaDeviceSynchronize(), what);
}

// A rows x cols bf16 tensor (row stride ld elements) as a tensor map with box {64, 64}.
void tmap2d(CUtensorMap* m, const void* p, int rows, int cols, int ld) {
  make_tmap(m, p, true, cols, rows, 1, 1, Strides{0, 0, ld}, 64, "probe");
}

void probe_tma() {
  const int ld = 72;
  std::vector<uint16_t> x(64 * ld, 0xffff);
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < 64; ++c) x[r * ld + c] = static_cast<uint16_t>(r * 64 + c);
  uint16_t *dx, *dout;
  cudaMalloc(&dx, x.size() * 2);
  cudaMalloc(&dout, 8192);
  cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice);
  for (int mode = 0; mode < 2; ++mode) {
    Probe pr{};
    // Mode 1: the tensor is 40 x 40 and the box starts at row -8: rows < 0 or >= 40, columns >= 40 are zero.
    tmap2d(&pr.ta, dx, mode ? 40 : 64, mode ? 40 : 64, ld);
    pr.out_h = dout;
    pr.mode = mode;
    const char* name = mode ? "tma load: out-of-bounds zero fill" : "tma load: 128B swizzle placement";
    if (!run(tma_kernel, pr, 8192 + 64 + 1024, name)) continue;
    std::vector<uint16_t> got(4096);
    cudaMemcpy(got.data(), dout, 8192, cudaMemcpyDeviceToHost);
    int bad = 0, bad_plain = 0;
    std::string first;
    for (int r = 0; r < 64; ++r)
      for (int c = 0; c < 64; ++c) {
        const int gr = mode ? r - 8 : r;
        const uint16_t want = (gr < 0 || gr >= (mode ? 40 : 64) || c >= (mode ? 40 : 64)) ? 0 : gr * 64 + c;
        const int at = r * 64 + (((c / 8) ^ (r % 8)) * 8) + c % 8;  // the swizzled position
        if (got[at] != want && bad++ == 0)
          first = "row " + std::to_string(r) + " col " + std::to_string(c) + ": got " + std::to_string(got[at]) +
                  " want " + std::to_string(want);
        if (got[r * 64 + c] != want) ++bad_plain;
      }
    report(name, bad == 0,
           bad ? std::to_string(bad) + " elements misplaced (first: " + first + "); unswizzled layout would have " +
                     std::to_string(bad_plain) + " wrong"
               : "");
  }
  cudaFree(dx);
  cudaFree(dout);
}

void probe_mma() {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int ld = 136;  // padded rows (elements); 272 bytes, a multiple of 16
  std::vector<uint16_t> a(64 * ld), b(64 * ld);
  for (auto& x : a) x = f2bf(nd(rng));
  for (auto& x : b) x = f2bf(nd(rng));
  uint16_t *da, *db;
  float* dout;
  uint32_t* dfr;
  cudaMalloc(&da, a.size() * 2);
  cudaMalloc(&db, b.size() * 2);
  cudaMalloc(&dout, 64 * 128 * 4);
  cudaMalloc(&dfr, 4 * 128 * 4 * 4);
  cudaMemcpy(da, a.data(), a.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(db, b.data(), b.size() * 2, cudaMemcpyHostToDevice);
  auto A = [&](int r, int c) { return static_cast<double>(bf2f(a[r * ld + c])); };
  auto B = [&](int r, int c) { return static_cast<double>(bf2f(b[r * ld + c])); };

  const char* names[3] = {"wgmma ss: K-major A and B (SW128)", "wgmma ss: M-major A (imm-trans-a)",
                          "wgmma rs: N-major B (imm-trans-b)"};
  for (int mode = 0; mode < 3; ++mode) {
    Probe pr{};
    pr.mode = mode;
    pr.out_f = dout;
    int N = 64;
    if (mode < 2) {
      tmap2d(&pr.ta, da, 64, 64, ld);
      tmap2d(&pr.tb, db, 64, 64, ld);
    } else {
      // V: 64 rows (K) x 128 columns (N); P: the A fragments of a 64 x 64 matrix (rows of a, columns 0..63).
      N = 128;
      tmap2d(&pr.tb, db, 64, 128, ld);
      std::vector<uint32_t> fr(4 * 128 * 4);
      for (int kk = 0; kk < 4; ++kk)
        for (int tid = 0; tid < 128; ++tid) {
          const int w = tid / 32, g = (tid % 32) / 4, t = tid % 4;
          for (int reg = 0; reg < 4; ++reg) {
            const int i = reg % 2, cc = reg / 2;  // a[2 cc + i]: row 16 w + g + 8 i, columns 8 cc + 2 t (+1)
            const int row = 16 * w + g + 8 * i, col = 16 * kk + 8 * cc + 2 * t;
            fr[(kk * 128 + tid) * 4 + reg] = a[row * ld + col] | (static_cast<uint32_t>(a[row * ld + col + 1]) << 16);
          }
        }
      cudaMemcpy(dfr, fr.data(), fr.size() * 4, cudaMemcpyHostToDevice);
      pr.in_a = dfr;
    }
    if (!run(mma_kernel, pr, 8192 + 16384 + 64 + 1024, names[mode])) continue;
    std::vector<float> got(64 * N);
    cudaMemcpy(got.data(), dout, got.size() * 4, cudaMemcpyDeviceToHost);
    double err = 0, ref_max = 0;
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < N; ++n) {
        double ref = 0;
        for (int k = 0; k < 64; ++k)
          ref += mode == 0 ? A(m, k) * B(n, k) : mode == 1 ? A(k, m) * B(n, k) : A(m, k) * B(k, n);
        err = std::max(err, std::fabs(got[m * N + n] - ref));
        ref_max = std::max(ref_max, std::fabs(ref));
      }
    char buf[120];
    std::snprintf(buf, sizeof buf, "max error %.2e of max %.2e", err, ref_max);
    report(names[mode], err <= 1e-3 * ref_max, buf);
  }
  cudaFree(da);
  cudaFree(db);
  cudaFree(dout);
  cudaFree(dfr);
}

void probe_store() {
  const int ld = 48;
  std::vector<uint16_t> y(48 * ld, 0xabcd);
  uint16_t* dy;
  cudaMalloc(&dy, y.size() * 2);
  cudaMemcpy(dy, y.data(), y.size() * 2, cudaMemcpyHostToDevice);
  Probe pr{};
  make_tmap(&pr.tc, dy, true, 40, 40, 1, 1, Strides{0, 0, ld}, 64, "probe");
  const char* name = "tma store: swizzle and clipping";
  if (!run(store_kernel, pr, 8192 + 1024, name)) return;
  cudaMemcpy(y.data(), dy, y.size() * 2, cudaMemcpyDeviceToHost);
  int bad = 0;
  for (int r = 0; r < 48; ++r)
    for (int c = 0; c < ld; ++c) {
      const uint16_t want = (r < 40 && c < 40) ? r * 64 + c : 0xabcd;
      bad += y[r * ld + c] != want;
    }
  report(name, bad == 0, bad ? std::to_string(bad) + " elements wrong (inside: values; outside: untouched)" : "");
  cudaFree(dy);
}

}  // namespace

int main() {
  probe_tma();
  probe_mma();
  probe_store();
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
