// Hopper (sm_90a) instructions of the wgmma/TMA kernels, one small inline-PTX wrapper each, so that the
// host emulator (tests/emu) can replace exactly these functions by one-line calls into its runtime and
// run the kernels as written. The warpgroup MMA itself is in wgmma.cuh (generated, one asm per shape).
// The kernels touch shared memory only through these wrappers (the ordinary float loads and stores near
// the end are plain C++ on the GPU, wrapped so that the emulator can track them).
//
// Conventions (PTX ISA 8.x, "Parallel Synchronization and Communication Instructions: mbarrier",
// "Data Movement: cp.async.bulk.tensor", "Warpgroup MMA"):
// - Shared-memory operands are 32-bit shared-window addresses (smem_u32 of a generic pointer).
// - An mbarrier is a 64-bit object in shared memory. init(count) starts phase 0 with `count` pending
//   arrivals and a transaction count (tx-count) of 0. A phase completes when its pending arrivals and its
//   tx-count are both 0; then the next phase starts with `count` pending arrivals again.
//   arrive.expect_tx(bytes) adds `bytes` to the tx-count and arrives; a bulk tensor copy that names the
//   barrier subtracts the bytes it writes when they have landed (complete_tx).
// - wait(parity) returns once the phase whose parity is `parity` has completed, i.e. while the current
//   phase's parity differs from `parity`. At init the current phase is 0, so wait(1) returns at once
//   ("the preceding phase"): a producer waits on an empty slot with parity 1 the first time round.
// - A thread reading data written by a bulk copy must have observed the completion of the barrier
//   phase the copy completed on (its own wait, or through another barrier from a thread that waited).
// - Ordinary shared-memory stores (st.shared here) that the async proxy (TMA store, wgmma operand fetch)
//   reads next need fence.proxy.async in each writing thread, then a barrier, before the async operation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fused_attn {
namespace sm90 {

// 32-bit shared-window address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ------------------------------------------------------------------------------------------------
// mbarrier

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes this thread's mbarrier inits visible to the other threads and to the async proxy (bulk copies
// complete_tx on them); a __syncthreads follows before any other thread uses the barriers.
__device__ __forceinline__ void fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Blocks until the phase of parity `parity` has completed (see the header comment).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred P1;\n"
      "LAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE;\n"
      "bra LAB_WAIT;\n"
      "DONE:\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// ------------------------------------------------------------------------------------------------
// Bulk tensor copies (TMA). tmap is the generic address of a CUtensorMap (a __grid_constant__ kernel
// parameter); coordinates are element indices, innermost dimension first, and may lie outside the
// tensor: elements outside are zero-filled on loads and not written on stores.

__device__ __forceinline__ void prefetch_tmap(const void* tmap) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tmap)) : "memory");
}
// Global -> shared, completing on barrier `bar` with the box's byte count.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* tmap, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, "
      "%6}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// Shared -> global, in this thread's current bulk async-group.
__device__ __forceinline__ void tma_store_4d(const void* tmap, uint32_t src, int c0, int c1, int c2, int c3) {
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
                   reinterpret_cast<uint64_t>(tmap)),
               "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's bulk groups still read their shared-memory source.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}

// ------------------------------------------------------------------------------------------------
// Fences, named barriers, registers

// Orders this thread's earlier ordinary shared-memory accesses before later async-proxy accesses.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Named barrier `id` (1..15; 0 is __syncthreads) over `nthreads` threads (a multiple of 32): sync waits,
// arrive counts itself in without waiting.
__device__ __forceinline__ void named_sync(int id, int nthreads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(nthreads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int nthreads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(nthreads) : "memory");
}

// Register reallocation between warpgroups; every thread of the warpgroup executes the same one.
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}

// ------------------------------------------------------------------------------------------------
// Warpgroup MMA bookkeeping (the MMAs: wgmma.cuh)

// Before the first wgmma of a batch, whenever registers it reads (accumulators, A fragments) were
// accessed by other instructions since the last wgmma.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
// Closes the current group of this warpgroup's wgmma operations.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N groups are pending; the accumulators and A fragments of the others may then be
// accessed.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Compiler-only fence on an accumulator register: keeps the compiler from moving its accesses across
// the surrounding wgmma issue / wait (the hardware reads and writes it asynchronously in between).
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void reg_fence(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// A copy of x that the compiler cannot see through: values derived from it are recomputed where they
// are used instead of being hoisted out of the loop and kept live (wgmma descriptors: dozens of 64-bit
// loop invariants would otherwise take registers the accumulators need, and spill).
__device__ __forceinline__ uint32_t opaque_u32(uint32_t x) {
  uint32_t r;
  asm volatile("mov.b32 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}

// ------------------------------------------------------------------------------------------------
// Ordinary shared-memory store of one 32-bit word (tracked by the emulator, which checks the proxy
// fence between these and the async reads that follow, and the ordinary reads before them).
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

// Ordinary shared-memory float accesses at a shared-window address: plain C++ loads and stores through
// the generic pointer of the address, so the compiler emits st.shared.f32 and ld.shared.v2.f32 and
// schedules them like any other shared-memory access (an asm with a "memory" clobber would also pin every
// other memory access around them). They exist so that the emulator can replace
// them and track them per word: a store into a word another thread may still be reading (no barrier or
// mbarrier from its load to the store) and a load of a word written without synchronisation are reported.
__device__ __forceinline__ void st_shared_f32(uint32_t addr, float v) {
  *static_cast<float*>(__cvta_shared_to_generic(addr)) = v;
}
// Two consecutive floats; addr 8-byte aligned.
__device__ __forceinline__ float2 ld_shared_f32x2(uint32_t addr) {
  return *static_cast<const float2*>(__cvta_shared_to_generic(addr));
}

// ------------------------------------------------------------------------------------------------
// wgmma shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"): bits 0-13 start address,
// 16-29 leading dimension byte offset (LBO), 32-45 stride dimension byte offset (SBO), each encoded as
// (x & 0x3FFFF) >> 4; bits 49-51 base offset (0: every tile here starts 1024-byte aligned, where the
// 128-byte swizzle pattern repeats); bits 62-63 swizzle mode (1 = 128B).
__device__ __forceinline__ uint64_t desc_encode(uint32_t x) { return static_cast<uint64_t>((x & 0x3FFFF) >> 4); }
__device__ __forceinline__ uint64_t make_desc_sw128(uint32_t start, uint32_t lbo, uint32_t sbo) {
  return desc_encode(start) | (desc_encode(lbo) << 16) | (desc_encode(sbo) << 32) | (uint64_t(1) << 62);
}

}  // namespace sm90
}  // namespace fused_attn
