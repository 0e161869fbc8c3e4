// The Hopper (sm_90a) instructions of csrc/cuda/sm90/, emulated from the PTX ISA, and the checks that
// go with them. Included at the end of emu_runtime.h; the kernels reach it through the one-line
// replacements gen_kernels.py puts in place of the wrappers in csrc/cuda/sm90/{ptx,wgmma}.cuh.
//
// What is modelled (the readings where the ISA left room are listed in notes/hopper.md, "Readings"):
//   mbarrier.init / arrive / arrive.expect_tx / try_wait.parity: expected count, pending arrivals,
//     tx-count (may go negative transiently, |tx| < 2^20), phases; try_wait.parity(P) succeeds while the
//     current phase's parity differs from P (so P = 1 succeeds at once after init).
//   cp.async.bulk.tensor.4d (tile mode) through tensor maps made by this file's cuTensorMapEncodeTiled
//     (handed out by cudaGetDriverEntryPointByVersion): box, element-size rows, elements outside the
//     tensor zero-filled on loads and skipped on stores, swizzle 32B / 64B / 128B as an XOR of address
//     bits [4, 4 + b) with bits [7, 7 + b) of the absolute shared-memory address (b = 1, 2, 3). A load
//     subtracts the whole box's bytes from the barrier's tx-count at issue; its data lands in shared
//     memory when the barrier phase completes. A store reads its shared-memory source when the issuing
//     thread's cp.async.bulk.wait_group.read retires its group.
//   wgmma.mma_async m64nNk16 (f16 / bf16 in, f32 accumulate): A from registers or a descriptor, B from a
//     descriptor, K-major or MN-major (transposed) in every swizzle mode and the interleaved (no
//     swizzle) layout; the 128 threads of the warpgroup meet, the product is computed in double and
//     rounded once, and each thread's accumulators hold a NaN pattern until its wgmma.wait_group
//     retires the group. Chained wgmmas on one accumulator array take the pending result.
//   wgmma.fence / commit_group / wait_group, fence.proxy.async, fence.mbarrier_init, bar.sync /
//   bar.arrive with a thread count, setmaxnreg.inc / dec (per warpgroup, pool of 64 K registers),
//   st.shared.b32 / .f32, ld.shared.f32 / .v2.f32 (ordinary accesses, tracked per word).
// Hazards (each an emulator error): happens-before is tracked with per-thread knowledge vectors (a vector
// clock with extra slots for each mbarrier's completed phases, each warpgroup's completed wgmmas and each
// thread's retired bulk stores), merged at every synchronisation (mbarrier arrive -> successful wait,
// bar.arrive/bar.sync -> bar.sync, __syncthreads). Per 4-byte word of shared memory the last write (TMA
// load: barrier and phase; ordinary store: thread and clock) and the reads not yet known done (async:
// warpgroup or bulk-store slot and stamp; ordinary ld.shared: thread and clock) are kept:
//   - a read (wgmma operand, TMA store source) of a TMA destination whose barrier phase the reader has not
//     observed complete ("read before the mbarrier phase completed");
//   - a TMA load into words whose earlier readers the issuing thread does not know to be done ("stage
//     reused before the consumers released it"), or an ordinary store there; readers are wgmmas, bulk
//     stores and ordinary loads (write-after-read: no barrier / mbarrier from the load to the store);
//   - an ordinary load of a word whose last ordinary store or TMA load this thread does not know to be
//     done (read-after-write);
//   - an async read of words written by ordinary stores without fence.proxy.async in the writer after the
//     store and a synchronisation from the writer's fence to every reading thread ("read while still
//     being written");
//   - wgmma accumulators written while the wgmma is in flight, a wgmma issued without wgmma.fence after
//     its registers were handed back by wait_group, wgmmas / bulk stores never waited for;
//   - mbarrier misuse (uninitialised, init not visible, more arrivals than the count in one phase, tx-count
//     out of range), named-barrier misuse (id 0, thread counts that differ or are not warp multiples,
//     arrivals left over at exit), setmaxnreg values out of range or different within a warpgroup.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cuda.h"

namespace emu {

constexpr int kMaxBars = 64;      // mbarriers per block
constexpr int kMaxWg = 8;         // warpgroups per block (1024 threads)
constexpr uint32_t kPoison = 0x7fbad0adu;  // accumulator contents while a wgmma is in flight (a NaN)
constexpr int kRegPool = 65536;

// ------------------------------------------------------------------------------------------------
// State

using Know = std::vector<int64_t>;

inline void merge(Know& into, const Know& from) {
  for (size_t i = 0; i < into.size() && i < from.size(); ++i) into[i] = std::max(into[i], from[i]);
}

struct MBar {
  uint32_t addr = 0;
  int expected = 0, pending = 0;
  int64_t tx = 0, completed = 0;  // completed = phases completed = index of the current phase
  Know acc, last;                  // knowledge released into the current phase / at the last completion
  int init_tid = -1;
  int64_t init_stamp = 0;
  struct Land {
    uint32_t addr;
    std::vector<uint8_t> bytes;
  };
  std::vector<Land> landing;  // TMA data waiting for the phase to complete
};

struct Named {
  int count = 0, arrived = 0;
  int64_t gen = 0;
  Know acc, done;
};

// One warpgroup-wide operation being formed (wgmma or setmaxnreg): every thread posts its part.
struct WgOp {
  int kind = 0;  // 1 wgmma, 2 setmaxnreg
  int arrived = 0;
  bool done = false;
  // wgmma
  int n = 0;
  bool bf16 = false, a_regs = false;
  int ta = 0, tb = 0, scale_d = 1;
  uint64_t da = 0, db = 0;
  int64_t seq = 0;
  std::vector<uint32_t> a;      // [128][4] A fragments (a_regs)
  std::vector<float> c, out;    // [128][n / 2]
  std::vector<int> posted;      // thread posted (1) per position
  std::vector<uint64_t> da_of, db_of;
  // setmaxnreg
  int regs = 0, inc = 0;
};

struct WgState {
  int regs = 0;
  int live = 128;
  int64_t seq = 0;  // wgmmas executed
  std::shared_ptr<WgOp> forming;
};

struct Sh90 {  // per 4-byte word of dynamic shared memory
  uint8_t wkind = 0;  // 0 none, 1 ordinary store, 2 TMA load
  int32_t wslot = -1;  // store: thread; TMA: barrier index
  int64_t wstamp = 0;  // store: writer's clock; TMA: phase the copy completes on
  struct Read {
    int32_t slot;
    int64_t stamp;
  };
  std::vector<Read> reads;  // reads not yet known done: (knowledge slot, stamp); slot < n: ld.shared
};

struct S90Block {
  int n = 0;                       // threads
  int bar0 = 0, wg0 = 0, st0 = 0, K = 0;  // knowledge slots: threads, barriers, warpgroups, bulk stores
  std::vector<MBar> bars;
  Named named[16];
  std::vector<WgState> wgs;
  Know sync_acc, sync_done;        // __syncthreads
  std::vector<Sh90> sh;
  int regs_at_launch = 0;
};

struct TensorOpRecord;

struct S90Thread {
  Know know;
  int64_t clock = 1;
  std::vector<int64_t> fences;     // stamps of fence.proxy.async (and fence.mbarrier_init)
  int64_t mbinit_fence = -1;
  // wgmma
  bool wg_fenced = false;
  struct InFlight {
    std::shared_ptr<WgOp> op;
    float* acc;
    bool superseded;
  };
  std::vector<InFlight> wg_open;
  std::deque<std::vector<InFlight>> wg_groups;
  // bulk tensor stores
  struct Store {
    std::vector<uint8_t> tmap;
    int c[5];
    uint32_t src;
  };
  std::vector<Store> st_open;
  std::deque<std::vector<Store>> st_groups;
  int64_t st_committed = 0, st_retired = 0;
};

inline void s90_block_delete(S90Block* b) { delete b; }
inline void s90_thread_delete(S90Thread* t) { delete t; }

inline bool tracking() { return g_cfg.track_s90 && g_block && g_block->s90; }
inline S90Block& SB() { return *g_block->s90; }
inline S90Thread& ST() { return *t_self->s90; }

// A release by this thread: the knowledge it hands on, then its clock moves past it.
inline void release_into(Know& acc) {
  S90Thread& me = ST();
  me.know[t_self->tid] = me.clock;
  merge(acc, me.know);
  ++me.clock;
  me.know[t_self->tid] = me.clock;
}
inline void acquire_from(const Know& k) {
  S90Thread& me = ST();
  merge(me.know, k);
  me.know[t_self->tid] = me.clock;
}

// ------------------------------------------------------------------------------------------------
// Block lifetime and the hooks of emu_runtime.h

inline void s90_block_begin(Block& B) {
  if (!g_cfg.track_s90) return;
  auto* s = new S90Block;
  B.s90 = s;
  s->n = B.nthreads;
  s->bar0 = s->n;
  s->wg0 = s->bar0 + kMaxBars;
  s->st0 = s->wg0 + kMaxWg;
  s->K = s->st0 + s->n;
  s->sync_acc.assign(s->K, 0);
  s->sync_done.assign(s->K, 0);
  for (auto& nb : s->named) {
    nb.acc.assign(s->K, 0);
    nb.done.assign(s->K, 0);
  }
  // Registers per thread at launch: the 64 K pool over the block (one block per SM, as the Hopper kernels
  // are built with __launch_bounds__(threads, 1)), in steps of 8, at most 255.
  s->regs_at_launch = std::min(248, (kRegPool / B.nthreads) / 8 * 8);
  s->wgs.resize((B.nthreads + 127) / 128);
  for (auto& w : s->wgs) w.regs = s->regs_at_launch;
  s->sh.assign(B.dyn_bytes / 4, Sh90{});
  for (ThreadState* t : B.threads) {
    t->s90 = new S90Thread;
    t->s90->know.assign(s->K, 0);
    t->s90->know[t->tid] = t->s90->clock;
  }
}

inline void s90_block_end(Block& B) {
  if (!B.s90) return;
  for (int id = 0; id < 16; ++id)
    if (B.s90->named[id].arrived > 0)
      error("named barrier %d has %d arrivals of %d outstanding when the block exits", id, B.s90->named[id].arrived,
            B.s90->named[id].count);
  for (auto& w : B.s90->wgs)
    if (w.forming) error("a warpgroup collective (wgmma / setmaxnreg) never completed: not every thread reached it");
}

inline std::string s90_state(Block& B) {
  std::string s;
  if (!B.s90) return s;
  for (size_t w = 0; w < B.s90->wgs.size(); ++w)
    if (B.s90->wgs[w].forming)
      s += "\n    warpgroup " + std::to_string(w) + ": " + std::to_string(B.s90->wgs[w].forming->arrived) +
           " of 128 threads in a " + (B.s90->wgs[w].forming->kind == 1 ? "wgmma" : "setmaxnreg");
  for (int id = 1; id < 16; ++id)
    if (B.s90->named[id].arrived)
      s += "\n    named barrier " + std::to_string(id) + ": " + std::to_string(B.s90->named[id].arrived) + " of " +
           std::to_string(B.s90->named[id].count);
  for (size_t i = 0; i < B.s90->bars.size(); ++i) {
    const MBar& b = B.s90->bars[i];
    s += "\n    mbarrier " + std::to_string(i) + " at " + std::to_string(b.addr) + ": phase " +
         std::to_string(b.completed) + ", " + std::to_string(b.pending) + " of " + std::to_string(b.expected) +
         " arrivals pending, tx " + std::to_string(b.tx);
  }
  return s;
}

inline void s90_on_syncthreads_arrive(ThreadState&) {
  if (tracking()) release_into(SB().sync_acc);
}
inline void s90_on_syncthreads_complete(Block& B) {
  if (!B.s90) return;
  B.s90->sync_done = B.s90->sync_acc;
  std::fill(B.s90->sync_acc.begin(), B.s90->sync_acc.end(), 0);
}
inline void s90_on_syncthreads_done(ThreadState&) {
  if (tracking()) acquire_from(SB().sync_done);
}

inline void s90_on_thread_exit(ThreadState& me) {
  if (!tracking()) return;
  S90Thread& s = *me.s90;
  if (!s.wg_open.empty() || !s.wg_groups.empty())
    error("thread exits with wgmma operations never waited for (wgmma.wait_group)");
  if (!s.st_open.empty() || !s.st_groups.empty())
    error("thread exits with bulk tensor stores whose shared-memory source was never waited for "
          "(cp.async.bulk.wait_group.read)");
  if (static_cast<size_t>(me.tid / 128) < SB().wgs.size()) --SB().wgs[me.tid / 128].live;
}

// ------------------------------------------------------------------------------------------------
// Shared-memory words: checks of writes and async reads

inline bool in_smem(uint32_t addr, uint32_t bytes) { return addr + uint64_t(bytes) <= g_block->dyn_bytes; }

// Knowledge of a group of threads about one slot: the least any of them knows (all must know it).
struct GroupKnow {
  const std::vector<int>* tids;
  mutable std::vector<std::pair<int, int64_t>> cache;
  int64_t operator()(int slot) const {
    for (auto& p : cache)
      if (p.first == slot) return p.second;
    int64_t v = INT64_MAX;
    for (int t : *tids) v = std::min(v, g_block->threads[t]->s90->know[slot]);
    cache.push_back({slot, v});
    return v;
  }
};

// An ordinary write by the current thread, or a TMA write issued by it (tma_bar >= 0: barrier index,
// phase = the barrier's current phase). Checks that every earlier reader and writer is known done.
inline void word_write(uint32_t word, int tma_bar, const char* what) {
  S90Block& s = SB();
  S90Thread& me = ST();
  Sh90& w = s.sh[word];
  for (const auto& r : w.reads)
    if (me.know[r.slot] < r.stamp) {
      if (r.slot < s.n) {  // an ordinary load by thread r.slot
        error("%s into smem byte %u while thread %d may still read it: no barrier/mbarrier from its load to this "
              "store", what, word * 4, r.slot);
        break;
      }
      const bool wg = r.slot >= s.wg0 && r.slot < s.st0;
      error("%s into smem byte %u while %s may still read it (%s)", what, word * 4,
            wg ? "a wgmma of warpgroup" : "a bulk tensor store",
            wg ? "the stage was reused before its consumers released it: no mbarrier/barrier from the wgmma's "
                 "wait_group to this thread"
               : "no cp.async.bulk.wait_group.read before the overwrite");
      break;
    }
  if (w.wkind == 2 && me.know[s.bar0 + w.wslot] < w.wstamp + 1)
    error("%s into smem byte %u races with a TMA load into it whose barrier phase this thread has not seen "
          "complete", what, word * 4);
  if (w.wkind == 1 && w.wslot != t_self->tid && me.know[w.wslot] < w.wstamp)
    error("%s into smem byte %u races with thread %d's store into it (no synchronisation between them)", what,
          word * 4, w.wslot);
  w.reads.clear();
  if (tma_bar >= 0) {
    w.wkind = 2;
    w.wslot = tma_bar;
    w.wstamp = s.bars[tma_bar].completed;
  } else {
    w.wkind = 1;
    w.wslot = t_self->tid;
    w.wstamp = me.clock;
  }
}

// An ordinary load (ld.shared) of a word by the current thread: the word's last write must be known to
// this thread (read-after-write); the read stays recorded, as (thread, clock), until a write that knows it
// is done (word_write reports one that does not: write-after-read).
inline void word_read(uint32_t word, const char* what) {
  S90Block& s = SB();
  S90Thread& me = ST();
  Sh90& w = s.sh[word];
  const int tid = t_self->tid;
  if (w.wkind == 3) {
    error("%s of smem byte %u reads the mbarrier at smem %u", what, word * 4, word * 4 & ~7u);
  } else if (w.wkind == 2 && me.know[s.bar0 + w.wslot] < w.wstamp + 1) {
    error("%s of smem byte %u, a TMA destination whose mbarrier phase (barrier %d, phase %lld) this thread has "
          "not observed complete (missing or wrong-parity mbarrier wait)", what, word * 4, w.wslot,
          (long long)w.wstamp);
  } else if (w.wkind == 1 && w.wslot != tid && me.know[w.wslot] < w.wstamp) {
    error("%s of smem byte %u written by thread %d: no barrier/mbarrier from its store to this load", what,
          word * 4, w.wslot);
  }
  for (auto& r : w.reads)
    if (r.slot == tid) {
      r.stamp = me.clock;  // clocks only grow: the latest read covers the earlier ones
      return;
    }
  w.reads.push_back({tid, me.clock});
}

// An async-proxy read of a word by a group of threads (knowledge `k`), recorded as outstanding until
// knowledge slot `slot` reaches `stamp`. Returns false after reporting a hazard.
inline bool word_async_read(uint32_t word, const GroupKnow& k, int slot, int64_t stamp, const char* what) {
  S90Block& s = SB();
  Sh90& w = s.sh[word];
  bool ok = true;
  if (w.wkind == 2 && k(s.bar0 + w.wslot) < w.wstamp + 1) {
    error("%s reads smem byte %u, a TMA destination whose mbarrier phase (barrier %d, phase %lld) the reading "
          "threads have not all observed complete (missing or wrong-parity mbarrier wait)",
          what, word * 4, w.wslot, (long long)w.wstamp);
    ok = false;
  } else if (w.wkind == 1) {
    const S90Thread& wr = *g_block->threads[w.wslot]->s90;
    auto it = std::lower_bound(wr.fences.begin(), wr.fences.end(), w.wstamp);
    if (it == wr.fences.end() || *it > k(w.wslot)) {
      error("%s reads smem byte %u written by thread %d's ordinary store without %s", what, word * 4, w.wslot,
            it == wr.fences.end() ? "a fence.proxy.async after the store in the writer"
                                  : "a synchronisation from the writer's fence.proxy.async to the reading threads");
      ok = false;
    }
  }
  for (auto& r : w.reads)
    if (r.slot == slot) {
      r.stamp = std::max(r.stamp, stamp);
      return ok;
    }
  w.reads.push_back({slot, stamp});
  return ok;
}

// ------------------------------------------------------------------------------------------------
// mbarrier

inline int bar_index(uint32_t addr, const char* what, bool for_init = false) {
  S90Block& s = SB();
  if (addr % 8 != 0 || !in_smem(addr, 8)) {
    error("%s: mbarrier address %u misaligned or outside the dynamic shared memory", what, addr);
    return -1;
  }
  for (size_t i = 0; i < s.bars.size(); ++i)
    if (s.bars[i].addr == addr) {
      if (!for_init && s.bars[i].init_tid >= 0 && ST().know[s.bars[i].init_tid] < s.bars[i].init_stamp) {
        error("%s: mbarrier at %u used before its mbarrier.init is visible to this thread (no barrier after the "
              "init)", what, addr);
      }
      return static_cast<int>(i);
    }
  if (!for_init) {
    error("%s: no mbarrier was initialised at smem %u", what, addr);
    return -1;
  }
  if (s.bars.size() >= kMaxBars) fatal("more mbarriers than the emulator tracks");
  s.bars.push_back(MBar{});
  s.bars.back().addr = addr;
  return static_cast<int>(s.bars.size() - 1);
}

inline void complete_phase(MBar& b, int idx) {
  S90Block& s = SB();
  for (auto& l : b.landing) std::memcpy(g_smem + l.addr, l.bytes.data(), l.bytes.size());
  b.landing.clear();
  ++b.completed;
  b.last = b.acc;
  b.last[s.bar0 + idx] = b.completed;
  std::fill(b.acc.begin(), b.acc.end(), 0);
  b.pending = b.expected;
  b.tx = 0;
}

inline void check_tx(const MBar& b) {
  if (b.tx >= (1 << 20) || b.tx <= -(1 << 20)) error("mbarrier tx-count %lld out of range (+-2^20 - 1)", (long long)b.tx);
}

inline void mbar_init(uint32_t addr, uint32_t count) {
  if (!tracking()) fatal("mbarrier.init outside a Hopper-tracked launch");
  std::unique_lock<std::mutex> lk(g_block->m);
  const int i = bar_index(addr, "mbarrier.init", true);
  if (i < 0) return;
  if (count == 0 || count >= (1u << 20)) error("mbarrier.init count %u out of range [1, 2^20)", count);
  MBar& b = SB().bars[i];
  if (b.init_tid >= 0 && (b.pending != b.expected || b.tx != 0))
    error("mbarrier.init of the barrier at %u while a phase is in progress", addr);
  // The 8 bytes are the barrier's: no TMA or store may target them (word_write checks that).
  b.expected = b.pending = static_cast<int>(count);
  b.tx = 0;
  b.completed = 0;
  b.acc.assign(SB().K, 0);
  b.last.assign(SB().K, 0);
  b.landing.clear();
  b.init_tid = t_self->tid;
  b.init_stamp = ST().clock;
  for (uint32_t w = addr / 4; w < addr / 4 + 2; ++w) {
    SB().sh[w].wkind = 3;  // an mbarrier
  }
}

inline void fence_mbar_init() {
  if (!tracking()) return;
  std::unique_lock<std::mutex> lk(g_block->m);
  S90Thread& me = ST();
  me.mbinit_fence = me.clock;
  me.fences.push_back(me.clock);
  ++me.clock;
  me.know[t_self->tid] = me.clock;
}

inline void arrive_locked(int i, uint32_t tx_add) {
  MBar& b = SB().bars[i];
  b.tx += tx_add;
  check_tx(b);
  release_into(b.acc);
  if (--b.pending < 0) error("mbarrier at %u: more arrivals than its count (%d) in one phase", b.addr, b.expected);
  if (b.pending <= 0 && b.tx == 0) complete_phase(b, i);
  state_changed(*g_block);
}

inline void mbar_arrive(uint32_t addr) {
  std::unique_lock<std::mutex> lk(g_block->m);
  const int i = bar_index(addr, "mbarrier.arrive");
  if (i >= 0) arrive_locked(i, 0);
}

inline void mbar_arrive_expect_tx(uint32_t addr, uint32_t bytes) {
  std::unique_lock<std::mutex> lk(g_block->m);
  const int i = bar_index(addr, "mbarrier.arrive.expect_tx");
  if (i >= 0) arrive_locked(i, bytes);
}

inline void mbar_wait(uint32_t addr, uint32_t parity) {
  std::unique_lock<std::mutex> lk(g_block->m);
  const int i = bar_index(addr, "mbarrier.try_wait.parity");
  if (i < 0) return;
  if (parity > 1) error("mbarrier.try_wait.parity with parity %u", parity);
  S90Block& s = SB();
  block_until(lk, [&s, i, parity] { return static_cast<uint32_t>(s.bars[i].completed & 1) != (parity & 1); },
              "mbarrier.try_wait.parity");
  if (s.bars[i].completed > 0) acquire_from(s.bars[i].last);
}

// ------------------------------------------------------------------------------------------------
// Tensor maps (host) and bulk tensor copies

struct TmapData {
  uint32_t magic;
  int esize, rank, swizzle;  // swizzle: 0 none, 1 32B, 2 64B, 3 128B (CUtensorMapSwizzle)
  const char* base;
  uint64_t dim[5], stride[5];  // stride in bytes, stride[0] = esize
  uint32_t box[5];
};
static_assert(sizeof(TmapData) <= sizeof(CUtensorMap), "tensor map payload");
constexpr uint32_t kTmapMagic = 0x7e45a90u;

inline CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType dt, cuuint32_t rank, void* gaddr,
                             const cuuint64_t* gdim, const cuuint64_t* gstrides, const cuuint32_t* box,
                             const cuuint32_t* estrides, CUtensorMapInterleave il, CUtensorMapSwizzle sw,
                             CUtensorMapL2promotion, CUtensorMapFloatOOBfill oob) {
  auto bad = [](const char* why) {
    error("cuTensorMapEncodeTiled: %s", why);
    return CUDA_ERROR_INVALID_VALUE;
  };
  if (reinterpret_cast<uintptr_t>(map) % 64) return bad("tensorMap not 64-byte aligned");
  int esize = 0;
  switch (dt) {
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_UINT16: esize = 2; break;
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32: esize = 4; break;
    default: return bad("data type not modelled by the emulator");
  }
  if (rank < 1 || rank > 5) return bad("rank out of [1, 5]");
  if (reinterpret_cast<uintptr_t>(gaddr) % 16) return bad("globalAddress not 16-byte aligned");
  if (il != CU_TENSOR_MAP_INTERLEAVE_NONE) return bad("interleave not modelled");
  if (oob != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) return bad("NaN out-of-bounds fill not modelled");
  TmapData t{};
  t.magic = kTmapMagic;
  t.esize = esize;
  t.rank = static_cast<int>(rank);
  t.base = static_cast<const char*>(gaddr);
  t.swizzle = sw == CU_TENSOR_MAP_SWIZZLE_NONE ? 0 : sw == CU_TENSOR_MAP_SWIZZLE_32B ? 1
              : sw == CU_TENSOR_MAP_SWIZZLE_64B ? 2 : sw == CU_TENSOR_MAP_SWIZZLE_128B ? 3 : -1;
  if (t.swizzle < 0) return bad("swizzle mode not modelled");
  for (uint32_t i = 0; i < rank; ++i) {
    if (gdim[i] == 0 || gdim[i] > (1ull << 32)) return bad("globalDim out of [1, 2^32]");
    if (box[i] == 0 || box[i] > 256) return bad("boxDim out of [1, 256]");
    if (estrides[i] != 1) return bad("elementStrides other than 1 not modelled");
    t.dim[i] = gdim[i];
    t.box[i] = box[i];
    if (i == 0) {
      t.stride[0] = static_cast<uint64_t>(esize);
    } else {
      const uint64_t s = gstrides[i - 1];
      // The driver asks for multiples of 16 below 2^40; a zero stride is rejected here (the kernels copy
      // such tensors first) since whether the hardware accepts it is not documented.
      if (s == 0 || s % 16 || s >= (1ull << 40)) return bad("globalStrides must be non-zero multiples of 16 below 2^40");
      t.stride[i] = s;
    }
  }
  if ((box[0] * esize) % 16) return bad("boxDim[0] * element size not a multiple of 16 bytes");
  if (t.swizzle > 0 && box[0] * esize > (16u << t.swizzle)) return bad("inner box dimension larger than the swizzle span");
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &t, sizeof t);
  return CUDA_SUCCESS;
}

inline const TmapData* tmap_of(const void* p, const char* what) {
  const auto* t = static_cast<const TmapData*>(p);
  if (!p || reinterpret_cast<uintptr_t>(p) % 64 || t->magic != kTmapMagic) {
    error("%s: operand is not a tensor map made by cuTensorMapEncodeTiled (or not 64-byte aligned)", what);
    return nullptr;
  }
  return t;
}

// Swizzle of a shared-memory byte address: XOR of bits [4, 4 + b) with bits [7, 7 + b), b = 1, 2, 3 for
// the 32B, 64B, 128B modes (0: none).
inline uint32_t swz(uint32_t a, int mode) {
  static const uint32_t mask[4] = {0, 0x10, 0x30, 0x70};
  return a ^ ((a >> 3) & mask[mode]);
}

// Visits every element of a box: f(smem byte address (swizzled), global element pointer or null when the
// element lies outside the tensor).
template <typename F>
inline void for_box(const TmapData& t, uint32_t smem, const int* c, F f) {
  const uint32_t rowbytes = t.box[0] * t.esize;
  uint32_t b[5] = {1, 1, 1, 1, 1};
  for (int i = 0; i < t.rank; ++i) b[i] = t.box[i];
  uint64_t row = 0;
  for (uint32_t i4 = 0; i4 < b[4]; ++i4)
    for (uint32_t i3 = 0; i3 < b[3]; ++i3)
      for (uint32_t i2 = 0; i2 < b[2]; ++i2)
        for (uint32_t i1 = 0; i1 < b[1]; ++i1, ++row)
          for (uint32_t i0 = 0; i0 < b[0]; ++i0) {
            const int64_t g[5] = {c[0] + int64_t(i0), c[1] + int64_t(i1), c[2] + int64_t(i2), c[3] + int64_t(i3),
                                  c[4] + int64_t(i4)};
            bool inside = true;
            int64_t off = 0;
            for (int d = 0; d < t.rank; ++d) {
              if (g[d] < 0 || g[d] >= static_cast<int64_t>(t.dim[d])) inside = false;
              off += g[d] * static_cast<int64_t>(t.stride[d]);
            }
            const uint32_t a = swz(smem + static_cast<uint32_t>(row * rowbytes + i0 * t.esize), t.swizzle);
            f(a, inside ? t.base + off : nullptr);
          }
}

inline uint32_t box_bytes(const TmapData& t) {
  uint32_t n = t.esize;
  for (int i = 0; i < t.rank; ++i) n *= t.box[i];
  return n;
}

inline bool check_box_dst(const TmapData& t, uint32_t smem, const char* what) {
  // 128-byte alignment is the ISA's; 1024 for the 128B swizzle is this emulator's stricter reading (the
  // pattern is taken from absolute address bits, which only matches the kernels' layout at that alignment).
  const uint32_t align = t.swizzle == 3 ? 1024 : 128;
  if (smem % align || !in_smem(smem, box_bytes(t))) {
    error("%s: shared-memory box at %u (%u bytes) not %u-byte aligned or outside the dynamic shared memory", what,
          smem, box_bytes(t), align);
    return false;
  }
  return true;
}

inline void tma_load(uint32_t dst, const void* tmap, uint32_t bar, const int* c, int rank) {
  std::unique_lock<std::mutex> lk(g_block->m);
  const TmapData* t = tmap_of(tmap, "cp.async.bulk.tensor (load)");
  if (!t) return;
  if (t->rank != rank) error("cp.async.bulk.tensor.%dd with a rank-%d tensor map", rank, t->rank);
  const int i = bar_index(bar, "cp.async.bulk.tensor (load) mbarrier");
  if (i < 0 || !check_box_dst(*t, dst, "cp.async.bulk.tensor (load)")) return;
  S90Block& s = SB();
  MBar& b = s.bars[i];
  const S90Thread& initr = *g_block->threads[b.init_tid]->s90;
  if (initr.mbinit_fence < b.init_stamp || ST().know[b.init_tid] <= initr.mbinit_fence)
    error("cp.async.bulk.tensor completes on the mbarrier at %u, whose init was not followed by "
          "fence.mbarrier_init (or fence.proxy.async) and a barrier before this copy", bar);
  MBar::Land land{dst, std::vector<uint8_t>(box_bytes(*t), 0)};
  std::vector<uint8_t> seen(box_bytes(*t) / 4, 0);
  bool bad_src = false;
  for_box(*t, dst, c, [&](uint32_t a, const char* g) {
    const uint32_t rel = a - dst;
    if (g) {
      if (!find_region(g, t->esize) && !bad_src) {
        error("cp.async.bulk.tensor (load): global element %p is outside every buffer", static_cast<const void*>(g));
        bad_src = true;
      } else if (!bad_src) {
        std::memcpy(&land.bytes[rel], g, t->esize);
      }
    }
    if (!seen[rel / 4]) {
      seen[rel / 4] = 1;
      if (s.sh[a / 4].wkind == 3) error("cp.async.bulk.tensor (load) writes over the mbarrier at smem %u", a & ~7u);
      word_write(a / 4, i, "cp.async.bulk.tensor (load)");
    }
  });
  b.landing.push_back(std::move(land));
  b.tx -= box_bytes(*t);
  check_tx(b);
  if (b.pending <= 0 && b.tx == 0) complete_phase(b, i);
  state_changed(*g_block);
}

inline void tma_store(const void* tmap, uint32_t src, const int* c, int rank) {
  std::unique_lock<std::mutex> lk(g_block->m);
  const TmapData* t = tmap_of(tmap, "cp.async.bulk.tensor (store)");
  if (!t) return;
  if (t->rank != rank) error("cp.async.bulk.tensor.%dd with a rank-%d tensor map", rank, t->rank);
  if (!check_box_dst(*t, src, "cp.async.bulk.tensor (store)")) return;
  S90Thread& me = ST();
  const std::vector<int> self{t_self->tid};
  GroupKnow k{&self, {}};
  std::vector<uint8_t> seen(box_bytes(*t) / 4, 0);
  for_box(*t, src, c, [&](uint32_t a, const char*) {
    if (!seen[(a - src) / 4]) {
      seen[(a - src) / 4] = 1;
      word_async_read(a / 4, k, SB().st0 + t_self->tid, me.st_committed + 1, "cp.async.bulk.tensor (store)");
    }
  });
  S90Thread::Store st;
  st.tmap.assign(static_cast<const uint8_t*>(tmap), static_cast<const uint8_t*>(tmap) + sizeof(CUtensorMap));
  for (int d = 0; d < 5; ++d) st.c[d] = d < rank ? c[d] : 0;
  st.src = src;
  me.st_open.push_back(std::move(st));
}

inline void bulk_commit() {
  if (!tracking()) return;
  S90Thread& me = ST();
  me.st_groups.push_back(std::move(me.st_open));
  me.st_open.clear();
  ++me.st_committed;
}

inline void bulk_wait_read(int n) {
  std::unique_lock<std::mutex> lk(g_block->m);
  S90Thread& me = ST();
  while (static_cast<int>(me.st_groups.size()) > n) {
    for (const auto& st : me.st_groups.front()) {
      const TmapData& t = *reinterpret_cast<const TmapData*>(st.tmap.data());
      for_box(t, st.src, st.c, [&](uint32_t a, const char* g) {
        if (!g) return;
        const Region* r = find_region(g, t.esize);
        if (!r || !r->writable) {
          error("cp.async.bulk.tensor (store): global element %p outside every writable buffer",
                static_cast<const void*>(g));
          return;
        }
        std::memcpy(const_cast<char*>(g), g_smem + a, t.esize);
      });
    }
    me.st_groups.pop_front();
    ++me.st_retired;
    me.know[SB().st0 + t_self->tid] = me.st_retired;
  }
}

// ------------------------------------------------------------------------------------------------
// Fences, named barriers, setmaxnreg, ordinary stores

inline void fence_proxy_async() {
  if (!tracking()) return;
  std::unique_lock<std::mutex> lk(g_block->m);
  S90Thread& me = ST();
  me.fences.push_back(me.clock);
  ++me.clock;
  me.know[t_self->tid] = me.clock;
}

inline void named_bar(int id, int n, bool wait) {
  std::unique_lock<std::mutex> lk(g_block->m);
  const char* what = wait ? "bar.sync" : "bar.arrive";
  if (id <= 0 || id >= 16) {
    error("%s %d: named barriers are 1..15 here (0 is __syncthreads)", what, id);
    return;
  }
  if (n <= 0 || n % 32 || n > g_block->nthreads) {
    error("%s %d, %d: the thread count must be a positive multiple of 32 up to the block size", what, id, n);
    return;
  }
  Named& b = SB().named[id];
  if (b.arrived == 0) b.count = n;
  else if (b.count != n) error("%s %d, %d while the barrier is in use with count %d", what, id, n, b.count);
  const int64_t gen = b.gen;
  release_into(b.acc);
  if (++b.arrived == b.count) {
    b.done = b.acc;
    std::fill(b.acc.begin(), b.acc.end(), 0);
    b.arrived = 0;
    ++b.gen;
    state_changed(*g_block);
  }
  if (!wait) return;
  block_until(lk, [&b, gen] { return b.gen != gen; }, "bar.sync (named barrier)");
  acquire_from(b.done);
}

// An ordinary store of one 32-bit word (`what`: the instruction, for the messages).
inline void st_shared_word(uint32_t addr, uint32_t v, const char* what) {
  std::unique_lock<std::mutex> lk(g_block->m);
  if (addr % 4 || !in_smem(addr, 4)) {
    error("%s at %u: misaligned or outside the dynamic shared memory", what, addr);
    return;
  }
  if (SB().sh[addr / 4].wkind == 3) error("%s writes over the mbarrier at smem %u", what, addr & ~7u);
  word_write(addr / 4, -1, "st.shared");
  std::memcpy(g_smem + addr, &v, 4);
}
inline void st_shared_u32(uint32_t addr, uint32_t v) { st_shared_word(addr, v, "st.shared.b32"); }
inline void st_shared_f32(uint32_t addr, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  st_shared_word(addr, u, "st.shared.f32");
}

// Ordinary loads of `bytes` (4 or 8, aligned) at addr into out; a bad address reads as NaN.
inline void ld_shared(uint32_t addr, void* out, uint32_t bytes, const char* what) {
  std::unique_lock<std::mutex> lk(g_block->m);
  if (addr % bytes || !in_smem(addr, bytes)) {
    error("%s at %u: misaligned or outside the dynamic shared memory", what, addr);
    std::memset(out, 0xff, bytes);
    return;
  }
  for (uint32_t w = addr / 4; w < (addr + bytes) / 4; ++w) word_read(w, what);
  std::memcpy(out, g_smem + addr, bytes);
}
inline float2 ld_shared_f32x2(uint32_t addr) {
  float v[2];
  ld_shared(addr, v, 8, "ld.shared.v2.f32");
  return float2{v[0], v[1]};
}

// A warpgroup-wide operation: the calling thread posts its part with post(op, position) (locked); the
// last of the 128 runs exec(op) (locked) and wakes the others. Returns the op.
template <typename Post, typename Exec>
inline std::shared_ptr<WgOp> wg_collective(std::unique_lock<std::mutex>& lk, int kind, const char* what, Post post,
                                           Exec exec) {
  S90Block& s = SB();
  const int wg = t_self->tid / 128;
  if (static_cast<size_t>(wg) >= s.wgs.size() || (wg + 1) * 128 > g_block->nthreads) {
    error("%s in a warpgroup that is not complete (block of %d threads)", what, g_block->nthreads);
    return nullptr;
  }
  WgState& w = s.wgs[wg];
  if (w.live != 128) error("%s with exited threads in the warpgroup (.sync.aligned needs all 128)", what);
  if (!w.forming) {
    w.forming = std::make_shared<WgOp>();
    w.forming->kind = kind;
  }
  std::shared_ptr<WgOp> op = w.forming;
  if (op->kind != kind) error("divergent warpgroup collectives: %s while others are in another one", what);
  post(*op, t_self->tid % 128);
  if (++op->arrived == 128) {
    w.forming = nullptr;
    exec(*op, w);
    op->done = true;
    state_changed(*g_block);
  } else {
    block_until(lk, [op] { return op->done; }, what);
  }
  return op;
}

inline void setmaxnreg(int regs, bool inc) {
  std::unique_lock<std::mutex> lk(g_block->m);
  if (regs < 24 || regs > 256 || regs % 8)
    error("setmaxnreg.%s %d: the count must be a multiple of 8 in [24, 256]", inc ? "inc" : "dec", regs);
  wg_collective(
      lk, 2, "setmaxnreg",
      [&](WgOp& op, int pos) {
        if (pos == 0 || op.regs == 0) {
          op.regs = regs;
          op.inc = inc;
        } else if (op.regs != regs || op.inc != inc) {
          error("setmaxnreg: threads of one warpgroup ask for different counts");
        }
      },
      [&](WgOp& op, WgState& w) {
        if (op.inc ? op.regs < w.regs : op.regs > w.regs)
          error("setmaxnreg.%s %d with %d registers per thread held", op.inc ? "inc" : "dec", op.regs, w.regs);
        S90Block& s = SB();
        if (op.inc) {
          // An increase waits until the block's pool has room: the registers it got at launch, which
          // decreases by other warpgroups free (not the whole 64 K file of the SM).
          auto room = [&s, &w, &op] {
            int total = 0;
            for (const auto& x : s.wgs) total += 128 * (&x == &w ? op.regs : x.regs);
            return total <= s.regs_at_launch * g_block->nthreads;
          };
          block_until(lk, room, "setmaxnreg.inc (waiting for registers)");
        }
        w.regs = op.regs;
      });
}

// ------------------------------------------------------------------------------------------------
// wgmma

inline float half_to_float(uint16_t h, bool bf16) {
  if (bf16) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return static_cast<float>(x);
}

// Byte address of element (mn, k) (k < 16) of a 2-byte operand described by `desc`, K-major (trans = 0)
// or MN-major (trans = 1). Canonical layouts in 16-byte units (T = 8 elements), W = swizzle width in units:
//   K-major,  swizzled:   ((8, m), (T, 2)) : ((W, SBO), (1, T))     -- LBO unused
//   K-major,  interleave: ((8, m), (T, 2)) : ((1, SBO), (1, LBO))
//   MN-major, swizzled:   ((T, W, m), (8, k)) : ((1, T, LBO), (W, SBO))
//   MN-major, interleave: ((T, 1, m), (8, k)) : ((1, T, SBO), (1, LBO))
// then the swizzle of the absolute address (swz).
inline uint32_t desc_addr(uint64_t desc, int mn, int k, int trans) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const int layout = static_cast<int>(desc >> 62);  // 0 interleave, 1 128B, 2 64B, 3 32B
  const int mode = layout == 0 ? 0 : layout == 1 ? 3 : layout == 2 ? 2 : 1;  // swz() mode
  const uint32_t wbytes = 16u << mode;  // swizzle width in bytes (16 for interleave)
  uint32_t a;
  if (!trans) {
    if (mode)
      a = start + (mn % 8) * wbytes + (mn / 8) * sbo + k * 2;
    else
      a = start + (mn % 8) * 16 + (mn / 8) * sbo + (k % 8) * 2 + (k / 8) * lbo;
  } else {
    if (mode) {
      const int per = static_cast<int>(wbytes / 2);  // elements of MN in one swizzle row
      a = start + (mn % per) * 2 + (mn / per) * lbo + (k % 8) * wbytes + (k / 8) * sbo;
    } else {
      a = start + (mn % 8) * 2 + (mn / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo;
    }
  }
  return swz(a, mode);
}

inline void wgmma_fence() {
  if (!tracking()) return;
  ST().wg_fenced = true;
}

inline bool poisoned(const float* d, int n) {
  for (int i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &d[i], 4);
    if (u != kPoison) return false;
  }
  return true;
}

inline void wgmma(float* d, int n, uint64_t da, const uint32_t* a, uint64_t db, int scale_d, int ta, int tb,
                  bool bf16) {
  std::unique_lock<std::mutex> lk(g_block->m);
  S90Thread& me = ST();
  const char* what = "wgmma.mma_async";
  if (n % 8 || n < 8 || n > 256) error("%s: N = %d", what, n);
  if (!me.wg_fenced)
    error("%s without a wgmma.fence since its registers were last handed back by wgmma.wait_group (or ever)", what);
  // The accumulator input: the pending result of this thread's latest in-flight wgmma on the same array,
  // else the registers.
  S90Thread::InFlight* chained = nullptr;
  for (auto* list : {&me.wg_open})
    for (auto& f : *list)
      if (f.acc == d && !f.superseded) chained = &f;
  for (auto& g : me.wg_groups)
    for (auto& f : g)
      if (f.acc == d && !f.superseded) chained = &f;
  std::vector<float> cin(d, d + n / 2);
  if (chained) {
    const int pos = t_self->tid % 128;
    std::copy(chained->op->out.begin() + pos * (n / 2), chained->op->out.begin() + (pos + 1) * (n / 2), cin.begin());
    chained->superseded = true;
  } else if (poisoned(d, n / 2)) {
    error("%s: accumulators still hold an in-flight result (no wgmma.wait_group)", what);
  }
  auto op = wg_collective(
      lk, 1, what,
      [&](WgOp& o, int pos) {
        if (o.posted.empty()) {
          o.n = n;
          o.bf16 = bf16;
          o.a_regs = a != nullptr;
          o.ta = ta;
          o.tb = tb;
          o.scale_d = scale_d;
          o.da = da;
          o.db = db;
          o.posted.assign(128, 0);
          o.a.assign(128 * 4, 0);
          o.c.assign(128 * (n / 2), 0.f);
        } else if (o.n != n || o.bf16 != bf16 || o.a_regs != (a != nullptr) || o.ta != ta || o.tb != tb ||
                   o.da != da || o.db != db || (o.scale_d != 0) != (scale_d != 0)) {
          error("%s: threads of one warpgroup disagree on the shape, descriptors or operands", what);
        }
        o.posted[pos] = 1;
        if (a)
          for (int r = 0; r < 4; ++r) o.a[pos * 4 + r] = a[r];
        std::copy(cin.begin(), cin.end(), o.c.begin() + pos * (n / 2));
      },
      [&](WgOp& o, WgState& w) {
        S90Block& s = SB();
        o.seq = ++w.seq;
        const int wg = t_self->tid / 128;
        std::vector<int> tids;
        for (int t = 0; t < 128; ++t) tids.push_back(wg * 128 + t);
        GroupKnow k{&tids, {}};
        const int slot = s.wg0 + wg;
        // Operands.
        double A[64][16], Bm[16][256];
        std::vector<uint8_t> seen(s.sh.size(), 0);
        auto fetch = [&](uint64_t desc, int mn, int kk, int trans, const char* which) -> double {
          const uint32_t ad = desc_addr(desc, mn, kk, trans);
          if (!in_smem(ad, 2)) {
            error("%s: operand %s element (%d, %d) at smem %u outside the dynamic shared memory", what, which, mn, kk, ad);
            return NAN;
          }
          if (!seen[ad / 4]) {
            seen[ad / 4] = 1;
            word_async_read(ad / 4, k, slot, o.seq, what);
          }
          uint16_t h;
          std::memcpy(&h, g_smem + ad, 2);
          return half_to_float(h, o.bf16);
        };
        if (((o.da >> 49) & 7) || ((o.db >> 49) & 7))
          error("%s: descriptor base offset (bits 49-51) != 0 is not modelled", what);
        for (int m = 0; m < 64; ++m)
          for (int kk = 0; kk < 16; ++kk) {
            if (o.a_regs) {
              // a[2c + i] holds A[16w + g + 8i][8c + 2t + e] in half e.
              const int w = m / 16, g = m % 8, i = (m % 16) / 8, c = kk / 8, t = (kk % 8) / 2, e = kk % 2;
              const uint32_t reg = o.a[(w * 32 + g * 4 + t) * 4 + 2 * c + i];
              A[m][kk] = half_to_float(static_cast<uint16_t>(e ? reg >> 16 : reg & 0xffff), o.bf16);
            } else {
              A[m][kk] = fetch(o.da, m, kk, o.ta, "A");
            }
          }
        for (int kk = 0; kk < 16; ++kk)
          for (int nn = 0; nn < o.n; ++nn) Bm[kk][nn] = fetch(o.db, nn, kk, o.tb, "B");
        o.out.assign(128 * (o.n / 2), 0.f);
        for (int pos = 0; pos < 128; ++pos) {
          const int w = pos / 32, g = (pos % 32) / 4, t = pos % 4;
          for (int j = 0; j < o.n / 8; ++j)
            for (int i = 0; i < 2; ++i)
              for (int e = 0; e < 2; ++e) {
                const int m = 16 * w + g + 8 * i, nn = 8 * j + 2 * t + e, r = 4 * j + 2 * i + e;
                double acc = o.scale_d ? double(o.c[pos * (o.n / 2) + r]) : 0.0;
                for (int kk = 0; kk < 16; ++kk) acc += A[m][kk] * Bm[kk][nn];
                o.out[pos * (o.n / 2) + r] = static_cast<float>(acc);
              }
        }
      });
  if (!op) return;
  for (int i = 0; i < n / 2; ++i) std::memcpy(&d[i], &kPoison, 4);
  me.wg_open.push_back({op, d, false});
}

inline void wgmma_commit() {
  if (!tracking()) return;
  S90Thread& me = ST();
  me.wg_groups.push_back(std::move(me.wg_open));
  me.wg_open.clear();
}

inline void wgmma_wait(int n) {
  if (!tracking()) return;
  std::unique_lock<std::mutex> lk(g_block->m);
  S90Thread& me = ST();
  const int pos = t_self->tid % 128;
  while (static_cast<int>(me.wg_groups.size()) > n) {
    for (auto& f : me.wg_groups.front()) {
      if (!f.superseded) {
        const int half = f.op->n / 2;
        if (!poisoned(f.acc, half))
          error("wgmma accumulators written while the wgmma was in flight (access before wgmma.wait_group)");
        std::copy(f.op->out.begin() + pos * half, f.op->out.begin() + (pos + 1) * half, f.acc);
        me.wg_fenced = false;
      }
      me.know[SB().wg0 + t_self->tid / 128] = std::max(me.know[SB().wg0 + t_self->tid / 128], f.op->seq);
    }
    me.wg_groups.pop_front();
  }
}

#ifdef EMU_SM90_PROGRAM
// A stand-alone Hopper program (the probe): sm90 limits and tracking from the start.
inline const bool kSm90Program = [] {
  g_cfg.sm = 90;
  g_cfg.max_smem = 232448;
  g_cfg.track_s90 = true;
  return true;
}();
#endif

}  // namespace emu

// The driver entry point of the launchers: the emulator's own cuTensorMapEncodeTiled.
enum cudaDriverEntryPointQueryResult {
  cudaDriverEntryPointSuccess = 0,
  cudaDriverEntryPointSymbolNotFound = 1,
  cudaDriverEntryPointVersionNotSufficent = 2
};
constexpr unsigned long long cudaEnableDefault = 0;
inline cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int, unsigned long long,
                                                    cudaDriverEntryPointQueryResult* status = nullptr) {
  if (std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0) {
    *fn = reinterpret_cast<void*>(&emu::encode_tiled);
    if (status) *status = cudaDriverEntryPointSuccess;
    return cudaSuccess;
  }
  *fn = nullptr;
  if (status) *status = cudaDriverEntryPointSymbolNotFound;
  return cudaErrorInvalidValue;
}
