// The emulated GPU: runs CUDA kernels written for sm80/sm90 on host threads, one std::thread per CUDA
// thread, one thread block at a time, and checks what a host can check. Included by shim/cuda_runtime.h;
// the kernels reach it through the device built-ins declared here and the one-line replacements that
// gen_kernels.py puts in place of their inline PTX.
//
// Semantics follow the PTX ISA:
//   ldmatrix.sync.aligned.m8n8.x4[.trans].b16   lane 8i + r gives the address of row r of matrix i;
//                                                register i of lane (g, t) = matrix i, row g, cols 2t, 2t+1
//                                                (.trans: rows 2t, 2t+1 at column g).
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}   fragments as in tc_common.cuh's header comment;
//                                                products and sums in double, rounded once to fp32.
//   cp.async (16 or 4 bytes, src-size 0 = zero fill), commit_group, wait_group N: the copy lands when the
//                                                issuing thread's wait retires its group (or at issue,
//                                                Config::eager_copy).
//   shfl.sync.bfly, bar.sync, bar.warp.sync, red/atom.add.f32 (and the sm90 .v2.f32 form).
//   ex2.approx.ftz.f32: exp2f with subnormal inputs and results flushed to zero.
//   rcp.approx.ftz.f32: 1/x at the ISA's error bound (1 ulp; of the two floats around 1/x, the farther),
//                                                subnormal inputs and results flushed to sign-preserving zero.
//
// Checks (each failure is counted and the first few printed with kernel, block and thread):
//   - shared memory starts every block as 0xff bytes (NaN in fp16, bf16, fp32, fp64), so a read of
//     a byte nobody wrote shows up as NaN in the results;
//   - ldmatrix / cp.async addresses: alignment, inside the launch's dynamic shared memory;
//   - cp.async / atomic global addresses: inside a registered buffer, aligned;
//   - cp.async hazards, tracked per 4-byte word and barrier interval: a read (ldmatrix) of a word whose
//     copy is still in flight or was waited for by another warp in the same interval (no __syncthreads
//     between), a copy into a word another warp read in the same interval, two threads' copies racing;
//   - copies still in flight when a thread exits;
//   - warp collectives (shuffles, ldmatrix, mma, __syncwarp) with a mask other than all lanes, with
//     exited lanes, or with lanes in different collectives; barriers that never complete (deadlock).
//   - launch: block size, dynamic shared memory against cudaFuncSetAttribute and the sm limit.
// Warp scheduling: by default the warps of a block run one at a time between two barriers, in an order
// that changes at every barrier (Config::order), so a missing __syncthreads between a write by one
// warp and a read by another shows up as stale or NaN data whichever way round the race goes.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {

// ------------------------------------------------------------------------------------------------
// Configuration, errors

enum class Order { serial_fwd, serial_rev, serial_random, free };

struct Config {
  int sm = 80;                   // 80: sm80 limits and the two-atomic dQ path; 90: the .v2 atomic path
  Order order = Order::serial_random;
  bool eager_copy = false;       // cp.async lands at issue instead of at the wait
  unsigned seed = 1;
  int verbose = 0;
  size_t max_smem = 166912;      // dynamic shared memory a launch may use (sm90 binaries: 232448)
  bool track_s90 = false;        // knowledge tracking of the Hopper primitives (emu_sm90.h)
};
inline Config g_cfg;

inline std::atomic<long> g_errors{0};
inline std::mutex g_print_mu;
inline std::string g_kernel = "(host)";
constexpr long kMaxPrinted = 12;

inline void error(const char* fmt, ...) {
  const long n = g_errors.fetch_add(1);
  if (n >= kMaxPrinted) return;
  std::lock_guard<std::mutex> lk(g_print_mu);
  std::fprintf(stderr, "  EMU ERROR [%s block (%u,%u,%u) thread %u]: ", g_kernel.c_str(), blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x);
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fputc('\n', stderr);
  if (n + 1 == kMaxPrinted) std::fprintf(stderr, "  (further errors counted, not printed)\n");
}

[[noreturn]] inline void fatal(const char* what) {
  std::fprintf(stderr, "  EMU FATAL [%s block (%u,%u,%u) thread %u]: %s\n", g_kernel.c_str(), blockIdx.x,
               blockIdx.y, blockIdx.z, threadIdx.x, what);
  std::fflush(stderr);
  std::_Exit(3);
}

// ------------------------------------------------------------------------------------------------
// Global memory the kernels may touch through cp.async and atomics.

struct Region {
  const char* lo;
  const char* hi;
  std::string name;
  bool writable;
};
inline std::vector<Region> g_regions;
inline void clear_regions() { g_regions.clear(); }
inline void add_region(const std::string& name, const void* p, size_t bytes, bool writable) {
  g_regions.push_back({static_cast<const char*>(p), static_cast<const char*>(p) + bytes, name, writable});
}
inline const Region* find_region(const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  for (const Region& r : g_regions)
    if (c >= r.lo && c + n <= r.hi) return &r;
  return nullptr;
}

// ------------------------------------------------------------------------------------------------
// Shared memory: one arena, refilled with 0xff for every block. Dynamic shared memory starts at 0;
// static __shared__ arrays (generic.cu) are laid out after it, in declaration order, the same for
// every thread (each thread replays the declarations).

constexpr size_t kArena = 256 * 1024;
alignas(128) inline char g_smem[kArena];
constexpr int64_t kInFlight = INT64_MAX;

struct Shadow {       // per 4-byte word of shared memory
  int writer = -1;    // thread of the last cp.async into the word
  int64_t issued = 0, done = 0;  // barrier intervals of its issue and of the wait that retired it
  int64_t read_at = -1;          // last interval in which ldmatrix read the word ...
  uint32_t readers = 0;          // ... and the warps that did
};

struct CpOp {
  uint32_t dst;
  const void* src;
  int bytes;
  bool fill;  // false: zero-fill (src-size 0)
};

struct WarpSlot {
  uint32_t w[6];
  int tag;
};

struct Warp {
  std::mutex m;                   // guards live, arrived, alive
  int live = 32, arrived = 0;
  std::atomic<int64_t> gen{0};    // completed warp barriers; waiters spin on it
  uint32_t alive = 0xffffffffu;
  WarpSlot slot[32];
};

struct ThreadState;
struct S90Block;   // Hopper state of a block (emu_sm90.h): mbarriers, named barriers, warpgroups
struct S90Thread;  // Hopper state of a thread: knowledge vector, wgmma and bulk-copy groups
inline void s90_block_delete(S90Block*);
inline void s90_thread_delete(S90Thread*);

struct Block {
  int nthreads = 0, nwarps = 0;
  size_t dyn_bytes = 0;
  // Every blocking wait (barriers, mbarriers, warpgroup rendezvous) and the warp scheduling, under m.
  // In the serial orders one warp runs at a time: it keeps the turn until each of its live lanes is
  // blocked in a wait (or gone), then schedule() hands the turn to the next warp of the order with a
  // lane whose wait condition holds. A thread waiting for the turn sleeps on its warp's condition
  // variable, so handing the turn to one warp wakes 32 threads, not the whole block. In the free order
  // every thread runs at once and waiters sleep on any_cv, which every state change notifies.
  std::mutex m;
  std::vector<std::unique_ptr<std::condition_variable>> wcv;
  std::condition_variable any_cv;
  int live = 0, arrived = 0;   // __syncthreads: live threads, threads waiting in it
  int64_t gen = 0;             // __syncthreads completed
  std::vector<int> live_in_warp, active, order;  // active: live lanes not blocked in a wait
  int pos = -1, cur = -1;      // position in order of the warp whose turn it is; that warp
  std::mt19937 rng;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<ThreadState*> threads;
  std::mutex shadow_mu;
  std::vector<Shadow> shadow;
  S90Block* s90 = nullptr;
  ~Block() { s90_block_delete(s90); }
};
inline Block* g_block = nullptr;

struct ThreadState {
  int tid = 0, warp = 0, lane = 0;
  int64_t epoch = 0;  // barriers passed
  std::vector<CpOp> open;
  std::deque<std::vector<CpOp>> groups;
  size_t static_off = 0;
  // Scheduling (under Block::m).
  bool blocked = false, exited = false;
  std::function<bool()> cond;  // what a blocked thread waits for
  const char* what = "";
  S90Thread* s90 = nullptr;
  ~ThreadState() { s90_thread_delete(s90); }
};
inline thread_local ThreadState* t_self = nullptr;

inline bool serial() { return g_cfg.order != Order::free; }

inline const std::chrono::seconds kHangAfter{std::getenv("EMU_HANG_SECONDS") ? std::atoi(std::getenv("EMU_HANG_SECONDS")) : 180};

template <typename Pred>
inline void wait_or_die(std::condition_variable& cv, std::unique_lock<std::mutex>& lk, Pred pred, const char* what) {
  while (!pred())
    if (cv.wait_for(lk, kHangAfter) == std::cv_status::timeout && !pred()) fatal(what);
}

// A new round of the warp order (locked).
inline void new_order(Block& B) {
  for (int w = 0; w < B.nwarps; ++w) B.order[w] = w;
  if (g_cfg.order == Order::serial_rev) std::reverse(B.order.begin(), B.order.end());
  if (g_cfg.order == Order::serial_random) std::shuffle(B.order.begin(), B.order.end(), B.rng);
  B.pos = -1;
}

inline std::string s90_state(Block& B);

// What every warp is doing (locked): for deadlock reports.
inline std::string block_state(Block& B) {
  std::string s = s90_state(B);
  for (int w = 0; w < B.nwarps; ++w) {
    s += "\n    warp " + std::to_string(w) + (w == B.cur ? " (has the turn)" : "") + ": " +
         std::to_string(B.live_in_warp[w]) + " live, " + std::to_string(B.active[w]) + " runnable";
    const char* last = nullptr;
    for (int l = 0; l < 32; ++l) {
      ThreadState* t = B.threads[w * 32 + l];
      if (!t->exited && t->blocked && t->what != last) {
        s += std::string("; lane ") + std::to_string(l) + " waits in " + t->what;
        last = t->what;
      }
    }
  }
  return s;
}

[[noreturn]] inline void deadlock(Block& B) {
  const std::string s = "deadlock: no thread can run" + block_state(B);
  fatal(s.c_str());
}

// Locked, serial orders: the warp whose turn it is has no runnable lane. Hand the turn to the next warp of
// the order (a new round after the last one) with a blocked lane whose condition now holds; those lanes
// become runnable. The conditions of blocked lanes change only when some thread runs, so one full round
// without a runnable warp is a deadlock.
inline void schedule(Block& B) {
  if (B.live == 0) return;
  // A new round reshuffles the order, so count the distinct warps tried, not the tries.
  std::vector<char> tried(B.nwarps, 0);
  int distinct = 0;
  for (int tries = 0; distinct < B.nwarps && tries < 4 * B.nwarps + 4; ++tries) {
    if (++B.pos >= B.nwarps) {
      new_order(B);
      B.pos = 0;
    }
    const int w = B.order[B.pos];
    if (!tried[w]) {
      tried[w] = 1;
      ++distinct;
    }
    if (B.live_in_warp[w] == 0) continue;
    for (int l = 0; l < 32; ++l) {
      ThreadState* t = B.threads[w * 32 + l];
      if (!t->exited && t->blocked && t->cond()) {
        t->blocked = false;
        ++B.active[w];
      }
    }
    if (B.active[w] > 0) {
      B.cur = w;
      B.wcv[w]->notify_all();
      return;
    }
  }
  deadlock(B);
}

// Locked: something a waiter may wait for changed. Free order: wake every waiter to re-check. Serial
// orders: lanes of the warp that has the turn whose wait now holds become runnable at once, so that a
// warp's lanes go on together (a lane that ran ahead into a warp collective would otherwise spin for
// lanes still parked in the scheduler).
inline void state_changed(Block& B) {
  if (!serial()) {
    B.any_cv.notify_all();
    return;
  }
  if (B.cur < 0) return;
  bool woke = false;
  for (int l = 0; l < 32; ++l) {
    ThreadState* t = B.threads[B.cur * 32 + l];
    if (!t->exited && t->blocked && t->cond()) {
      t->blocked = false;
      ++B.active[B.cur];
      woke = true;
    }
  }
  if (woke) B.wcv[B.cur]->notify_all();
}

// Locked: wait until cond() holds. Serial orders: the thread gives up its lane's claim on the turn
// (yield = true: even when cond() already holds, so that the order is redrawn, as after __syncthreads).
inline void block_until(std::unique_lock<std::mutex>& lk, const std::function<bool()>& cond, const char* what,
                        bool yield = false) {
  Block& B = *g_block;
  ThreadState& me = *t_self;
  if (!serial()) {
    const auto start = std::chrono::steady_clock::now();
    while (!cond()) {
      B.any_cv.wait_for(lk, std::chrono::milliseconds(20));
      if (std::chrono::steady_clock::now() - start > kHangAfter && !cond()) {
        std::string s = std::string("never completed: ") + what + " (deadlock)";
        fatal(s.c_str());
      }
    }
    return;
  }
  if (!yield && cond()) return;
  me.blocked = true;
  me.cond = cond;
  me.what = what;
  if (--B.active[me.warp] == 0 && B.cur == me.warp) {
    schedule(B);
  } else if (B.cur == me.warp && cond()) {
    // Lanes of this warp still run with the turn (the last lane into a __syncthreads: completing the
    // barrier made its warp-mates runnable before it parked itself here). Go on with them: parked, it
    // would never be woken while they spin in a warp collective that needs it (a deadlock of the mma.sync
    // and fp32/fp64 kernels, whose barriers are followed by ldmatrix and shuffles).
    me.blocked = false;
    ++B.active[me.warp];
    return;
  }
  while (!(!me.blocked && B.cur == me.warp))
    if (B.wcv[me.warp]->wait_for(lk, kHangAfter) == std::cv_status::timeout && !(!me.blocked && B.cur == me.warp)) {
      const std::string s = std::string("no progress for a long time while waiting in ") + what +
                            " (a warp that has the turn never gives it up: a collective some lanes never reach?)" +
                            block_state(B);
      fatal(s.c_str());
    }
}

inline void s90_on_syncthreads_arrive(ThreadState& me);
inline void s90_on_syncthreads_done(ThreadState& me);
inline void s90_on_syncthreads_complete(Block& B);

inline void complete_barrier(Block& B) {
  ++B.gen;
  B.arrived = 0;
  s90_on_syncthreads_complete(B);
  new_order(B);  // every warp restarts in a fresh order after the barrier
  // Serial orders: no early wake-up of the current warp here (state_changed would let its other lanes run
  // on while the last arriver parks itself to yield); the yield in syncthreads() hands the turn out.
  if (!serial()) B.any_cv.notify_all();
}

inline void syncthreads() {
  Block& B = *g_block;
  ThreadState& me = *t_self;
  std::unique_lock<std::mutex> lk(B.m);
  const int64_t gen = B.gen;
  s90_on_syncthreads_arrive(me);
  if (++B.arrived == B.live) complete_barrier(B);
  block_until(lk, [&B, gen] { return B.gen != gen; }, "__syncthreads", true);
  s90_on_syncthreads_done(me);
  ++me.epoch;
}

// Warp barrier: the lanes of one warp are few and (serial order) the only runnable threads, so they
// spin with yield on the generation instead of sleeping.
inline void warp_barrier(Warp& W) {
  int64_t gen;
  {
    std::lock_guard<std::mutex> lk(W.m);
    gen = W.gen.load();
    if (++W.arrived == W.live) {
      W.arrived = 0;
      W.gen.fetch_add(1);
      return;
    }
  }
  const auto start = std::chrono::steady_clock::now();
  for (unsigned spin = 1; W.gen.load() == gen; ++spin) {
    std::this_thread::yield();
    if (spin % 4096 == 0 && std::chrono::steady_clock::now() - start > kHangAfter)
      fatal("warp collective never completed (deadlock: lanes of one warp in different places)");
  }
}

inline void s90_on_thread_exit(ThreadState& me);

inline void thread_exit() {
  Block& B = *g_block;
  ThreadState& me = *t_self;
  if (!me.open.empty() || !me.groups.empty()) {
    size_t n = me.open.size();
    for (auto& g : me.groups) n += g.size();
    error("thread exits with %zu cp.async copies never waited for (%zu of them uncommitted)", n, me.open.size());
  }
  {
    Warp& W = *B.warps[me.warp];
    std::lock_guard<std::mutex> lk(W.m);
    --W.live;
    W.alive &= ~(1u << me.lane);
    if (W.arrived > 0 && W.arrived == W.live) {
      W.arrived = 0;
      W.gen.fetch_add(1);
    }
  }
  std::lock_guard<std::mutex> lk(B.m);
  s90_on_thread_exit(me);
  me.exited = true;
  --B.live;
  --B.live_in_warp[me.warp];
  --B.active[me.warp];
  if (B.arrived > 0 && B.arrived == B.live) complete_barrier(B);
  if (serial() && B.cur == me.warp && B.active[me.warp] == 0)
    schedule(B);
  else
    state_changed(B);
}

// ------------------------------------------------------------------------------------------------
// Warp collectives: every lane posts its operands, all read what they need, then a second barrier
// keeps the slots until everyone has read them.

enum Tag { kShfl = 1, kLdsm, kLdsmT, kMma, kSyncwarp };
inline const char* tag_name(int t) {
  switch (t) {
    case kShfl: return "shfl.sync";
    case kLdsm: return "ldmatrix";
    case kLdsmT: return "ldmatrix.trans";
    case kMma: return "mma.sync";
    default: return "__syncwarp";
  }
}

template <typename Use>
inline void collective(int tag, const WarpSlot& mine, Use use) {
  ThreadState& me = *t_self;
  Warp& W = *g_block->warps[me.warp];
  W.slot[me.lane] = mine;
  W.slot[me.lane].tag = tag;
  warp_barrier(W);
  const bool leader = me.lane == __builtin_ctz(W.alive);
  if (leader) {
    if (W.alive != 0xffffffffu)
      error("%s with exited lanes (alive mask 0x%08x); .sync.aligned needs all 32", tag_name(tag), W.alive);
    for (int l = 0; l < 32; ++l)
      if (((W.alive >> l) & 1) && W.slot[l].tag != tag) {
        error("divergent warp collectives: lane %d in %s, lane %d in %s", me.lane, tag_name(tag), l,
              tag_name(W.slot[l].tag));
        break;
      }
  }
  use(W.slot, leader);
  warp_barrier(W);
}

inline int lane_id() { return t_self->lane; }
inline int sm() { return g_cfg.sm; }

// ------------------------------------------------------------------------------------------------
// Shared-memory helpers

inline char* dynamic_smem() { return g_smem; }

template <typename T>
inline T* static_smem(size_t n) {
  ThreadState& me = *t_self;
  size_t off = (g_block->dyn_bytes + me.static_off + 15) & ~size_t(15);
  me.static_off = off + n * sizeof(T) - g_block->dyn_bytes;
  if (me.static_off > 48 * 1024) error("static shared memory %zu bytes > 48 KB", me.static_off);
  if (off + n * sizeof(T) > kArena) fatal("static shared memory exceeds the emulator's arena");
  return reinterpret_cast<T*>(g_smem + off);
}

inline uint16_t smem_u16(uint32_t off) {
  if (off + 2 > kArena) return 0xffff;
  uint16_t v;
  std::memcpy(&v, g_smem + off, 2);
  return v;
}

// Hazard tracking (see the header comment). Called with words of the dynamic shared memory.
inline void shadow_read(Block& B, uint32_t off, int bytes, int warp, int64_t epoch, int row_lane_tid) {
  std::lock_guard<std::mutex> lk(B.shadow_mu);
  for (uint32_t w = off / 4; w < (off + bytes) / 4 && w < B.shadow.size(); ++w) {
    Shadow& s = B.shadow[w];
    if (s.writer >= 0) {
      if (s.done == kInFlight)
        error("smem byte %u read by warp %d while the cp.async of thread %d (issued in barrier interval %lld) is "
              "still in flight (no wait_group retired it)",
              w * 4, warp, s.writer, (long long)s.issued);
      else if (s.done >= epoch && s.writer / 32 != warp && s.writer != row_lane_tid)
        error("smem byte %u read by warp %d in the barrier interval where thread %d waited for its cp.async into "
              "it: no __syncthreads between the wait and the read",
              w * 4, warp, s.writer);
    }
    if (s.read_at != epoch) {
      s.read_at = epoch;
      s.readers = 0;
    }
    s.readers |= 1u << warp;
  }
}

inline void shadow_issue(Block& B, uint32_t off, int bytes, const ThreadState& me) {
  std::lock_guard<std::mutex> lk(B.shadow_mu);
  for (uint32_t w = off / 4; w < (off + bytes) / 4 && w < B.shadow.size(); ++w) {
    Shadow& s = B.shadow[w];
    if (s.read_at == me.epoch && (s.readers & ~(1u << me.warp)))
      error("cp.async into smem byte %u, which warp mask 0x%x read in the same barrier interval (%lld): the copy "
            "may land before the read (missing __syncthreads)",
            w * 4, s.readers & ~(1u << me.warp), (long long)me.epoch);
    if (s.writer >= 0 && s.writer != me.tid && (s.done == kInFlight || s.done >= me.epoch))
      error("cp.async into smem byte %u races with thread %d's copy into it", w * 4, s.writer);
    s.writer = me.tid;
    s.issued = me.epoch;
    s.done = kInFlight;
  }
}

inline void shadow_done(Block& B, uint32_t off, int bytes, int64_t epoch) {
  std::lock_guard<std::mutex> lk(B.shadow_mu);
  for (uint32_t w = off / 4; w < (off + bytes) / 4 && w < B.shadow.size(); ++w) B.shadow[w].done = epoch;
}

// ------------------------------------------------------------------------------------------------
// cp.async

inline void land(const CpOp& op) {
  if (op.fill)
    std::memcpy(g_smem + op.dst, op.src, op.bytes);
  else
    std::memset(g_smem + op.dst, 0, op.bytes);
}

inline void cp_async(uint32_t dst, const void* src, int bytes, bool pred) {
  Block& B = *g_block;
  ThreadState& me = *t_self;
  if (dst % bytes != 0 || dst + bytes > B.dyn_bytes) {
    error("cp.async (%d B) to smem offset %u: misaligned or outside the %zu bytes of dynamic smem", bytes, dst,
          B.dyn_bytes);
    return;
  }
  CpOp op{dst, src, bytes, pred};
  if (pred) {
    if (reinterpret_cast<uintptr_t>(src) % bytes != 0) error("cp.async (%d B): global source %p misaligned", bytes, src);
    if (!find_region(src, bytes)) {
      error("cp.async (%d B): global source %p is outside every buffer", bytes, src);
      op.fill = false;
    }
  }
  shadow_issue(B, dst, bytes, me);
  if (g_cfg.eager_copy) land(op);
  me.open.push_back(op);
}

inline void cp_async_commit() {
  ThreadState& me = *t_self;
  me.groups.push_back(std::move(me.open));
  me.open.clear();
}

inline void cp_async_wait(int n) {
  ThreadState& me = *t_self;
  while (static_cast<int>(me.groups.size()) > n) {
    for (const CpOp& op : me.groups.front()) {
      if (!g_cfg.eager_copy) land(op);
      shadow_done(*g_block, op.dst, op.bytes, me.epoch);
    }
    me.groups.pop_front();
  }
}

// ------------------------------------------------------------------------------------------------
// ldmatrix, mma

inline void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4], bool trans) {
  ThreadState& me = *t_self;
  Block& B = *g_block;
  WarpSlot mine{};
  mine.w[0] = addr;
  collective(trans ? kLdsmT : kLdsm, mine, [&](const WarpSlot* s, bool leader) {
    if (leader)
      for (int l = 0; l < 32; ++l) {
        const uint32_t a = s[l].w[0];
        if (a % 16 != 0 || a + 16 > B.dyn_bytes)
          error("ldmatrix row address %u of lane %d: misaligned or outside the %zu bytes of dynamic smem", a, l,
                B.dyn_bytes);
        else
          shadow_read(B, a, 16, me.warp, me.epoch, me.warp * 32 + l);
      }
    const int g = me.lane >> 2, t = me.lane & 3;
    for (int i = 0; i < 4; ++i) {
      uint16_t lo, hi;
      if (!trans) {
        const uint32_t row = s[8 * i + g].w[0];
        lo = smem_u16(row + 4 * t);
        hi = smem_u16(row + 4 * t + 2);
      } else {
        lo = smem_u16(s[8 * i + 2 * t].w[0] + 2 * g);
        hi = smem_u16(s[8 * i + 2 * t + 1].w[0] + 2 * g);
      }
      r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  });
}

inline float half_bits(uint32_t reg, int hi, bool bf16) {
  const uint16_t h = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu);
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

inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  ThreadState& me = *t_self;
  WarpSlot mine{};
  for (int i = 0; i < 4; ++i) mine.w[i] = a[i];
  mine.w[4] = b0;
  mine.w[5] = b1;
  collective(kMma, mine, [&](const WarpSlot* s, bool) {
    const int g = me.lane >> 2, t = me.lane & 3;
    // A(r, k): lane 4 (r % 8) + (k % 8) / 2, register (r / 8) + 2 (k / 8), half k % 2.
    // B(k, n): lane 4 n + (k % 8) / 2, register 4 + k / 8, half k % 2.
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
      double acc = c[e];
      for (int k = 0; k < 16; ++k) {
        const float av = half_bits(s[4 * (row & 7) + ((k & 7) >> 1)].w[(row >> 3) + 2 * (k >> 3)], k & 1, bf16);
        const float bv = half_bits(s[4 * col + ((k & 7) >> 1)].w[4 + (k >> 3)], k & 1, bf16);
        acc += double(av) * double(bv);
      }
      c[e] = static_cast<float>(acc);
    }
  });
}

inline float ex2_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

// rcp.approx.ftz.f32 (PTX ISA: "maximum ulp error is 1 across the full range of inputs"; .ftz flushes
// subnormal inputs and results to sign-preserving zero; 1/+-0 = +-inf, 1/+-inf = +-0, NaN stays NaN). The
// hardware's exact rounding is not specified, so the model sits at the bound: when 1/x is not a float, it
// returns the one of its two neighbouring floats that is farther from it (error between 0.5 and 1 ulp),
// rather than the nearest, so code that only works with a correctly rounded reciprocal fails here.
inline float rcp_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = std::copysign(0.f, x);
  if (x == 0.f) return std::copysign(INFINITY, x);
  if (std::isinf(x)) return std::copysign(0.f, x);
  if (std::isnan(x)) return x;
  const double r = 1.0 / static_cast<double>(x);  // exact to 2^-53 relative: decides the rounding below
  const float f = static_cast<float>(r);
  float y = f;
  if (static_cast<double>(f) != r) {
    const float other = static_cast<double>(f) < r ? std::nextafter(f, INFINITY) : std::nextafter(f, -INFINITY);
    y = std::fabs(static_cast<double>(other) - r) > std::fabs(static_cast<double>(f) - r) ? other : f;
  }
  return std::fpclassify(y) == FP_SUBNORMAL ? std::copysign(0.f, y) : y;
}

// ------------------------------------------------------------------------------------------------
// Launch

inline std::vector<std::pair<const void*, int>> g_smem_attr;
inline cudaError_t g_last_error = cudaSuccess;

template <typename F>
inline const void* fn_key(F* f) {
  return reinterpret_cast<const void*>(f);
}

// Dynamic shared memory a launch may use: sm80's opt-in limit (163 KB) for the mma.sync binaries (one
// binary serves sm80 and sm90 there, whichever atomic path Config::sm selects); sm90's (227 KB) for the
// Hopper binaries (Config::max_smem).
inline size_t smem_limit() { return g_cfg.max_smem; }

inline void s90_block_begin(Block& B);
inline void s90_block_end(Block& B);

template <typename Body>
inline void launch(const void* key, const char* name, Body body, dim3 grid, dim3 block, size_t dyn = 0,
                   cudaStream_t = nullptr) {
  g_kernel = name;
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  int attr = 48 * 1024;
  for (auto& kv : g_smem_attr)
    if (kv.first == key) attr = kv.second;
  if (block.y != 1 || block.z != 1 || nthreads % 32 != 0 || nthreads > 1024 || nthreads == 0) {
    error("block (%u,%u,%u): the emulator takes 1-D blocks of whole warps", block.x, block.y, block.z);
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    error("grid (%u,%u,%u) invalid", grid.x, grid.y, grid.z);
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (dyn > static_cast<size_t>(attr) || dyn > smem_limit()) {
    error("%zu bytes of dynamic smem: attribute allows %d, the target allows %zu", dyn, attr, smem_limit());
    g_last_error = cudaErrorInvalidValue;
    return;
  }
  if (g_cfg.verbose)
    std::fprintf(stderr, "  launch %s grid (%u,%u,%u) x %d threads, %zu B smem\n", name, grid.x, grid.y, grid.z,
                 nthreads, dyn);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block B;
        B.nthreads = nthreads;
        B.nwarps = nthreads / 32;
        B.dyn_bytes = dyn;
        B.live = nthreads;
        B.live_in_warp.assign(B.nwarps, 32);
        B.active.assign(B.nwarps, 0);
        B.order.resize(B.nwarps);
        B.rng.seed(g_cfg.seed * 7919u + bx * 131u + by * 17u + bz);
        new_order(B);
        for (int w = 0; w < B.nwarps; ++w) {
          B.warps.push_back(std::make_unique<Warp>());
          B.wcv.push_back(std::make_unique<std::condition_variable>());
        }
        std::vector<std::unique_ptr<ThreadState>> states;
        for (int tid = 0; tid < nthreads; ++tid) {
          states.push_back(std::make_unique<ThreadState>());
          ThreadState& t = *states.back();
          t.tid = tid;
          t.warp = tid >> 5;
          t.lane = tid & 31;
          // Every thread starts as if blocked in a wait that holds: the scheduler hands out the first turn.
          t.blocked = serial();
          t.cond = [] { return true; };
          t.what = "block start";
          B.threads.push_back(&t);
        }
        if (!serial()) B.active.assign(B.nwarps, 32);
        B.shadow.assign(dyn / 4, Shadow{});
        std::memset(g_smem, 0xff, kArena);
        g_block = &B;
        s90_block_begin(B);
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        {
          std::lock_guard<std::mutex> lk(B.m);
          if (serial()) schedule(B);
        }
        for (int tid = 0; tid < nthreads; ++tid)
          threads.emplace_back([&, tid] {
            ThreadState& me = *B.threads[tid];
            t_self = &me;
            threadIdx = uint3{static_cast<unsigned>(tid), 0, 0};
            blockIdx = uint3{bx, by, bz};
            blockDim = block;
            gridDim = grid;
            if (serial()) {
              std::unique_lock<std::mutex> lk(B.m);
              wait_or_die(*B.wcv[me.warp], lk, [&] { return !me.blocked && B.cur == me.warp; }, "block start");
            }
            body();
            thread_exit();
          });
        for (auto& th : threads) th.join();
        s90_block_end(B);
        g_block = nullptr;
        B.threads.clear();
      }
  g_kernel = "(host)";
}

}  // namespace emu

// ------------------------------------------------------------------------------------------------
// Device built-ins

inline void __syncthreads() { emu::syncthreads(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::error("__syncwarp(0x%08x): only the full mask is emulated", mask);
  emu::collective(emu::kSyncwarp, emu::WarpSlot{}, [](const emu::WarpSlot*, bool) {});
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of 4- or 8-byte values");
  if (mask != 0xffffffffu) emu::error("__shfl_xor_sync mask 0x%08x: only the full mask is emulated", mask);
  emu::WarpSlot mine{};
  std::memcpy(mine.w, &v, sizeof(T));
  T r;
  emu::collective(emu::kShfl, mine, [&](const emu::WarpSlot* s, bool) {
    std::memcpy(&r, s[(emu::t_self->lane ^ lane_mask) & 31].w, sizeof(T));
  });
  return r;
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of 4- or 8-byte values");
  if (mask != 0xffffffffu) emu::error("__shfl_sync mask 0x%08x: only the full mask is emulated", mask);
  emu::WarpSlot mine{};
  std::memcpy(mine.w, &v, sizeof(T));
  T r;
  emu::collective(emu::kShfl, mine, [&](const emu::WarpSlot* s, bool) { std::memcpy(&r, s[src_lane & 31].w, sizeof(T)); });
  return r;
}

inline size_t __cvta_generic_to_shared(const void* p) {
  const char* c = static_cast<const char*>(p);
  if (c < emu::g_smem || c >= emu::g_smem + emu::kArena) emu::error("__cvta_generic_to_shared of a non-shared pointer");
  return static_cast<size_t>(c - emu::g_smem);
}

inline float atomicAdd(float* p, float v) {
  const emu::Region* r = emu::find_region(p, 4);
  if (!r || !r->writable || reinterpret_cast<uintptr_t>(p) % 4) {
    emu::error("atomicAdd(float*) at %p: outside every writable buffer or misaligned", static_cast<void*>(p));
    return 0.f;
  }
  return std::atomic_ref<float>(*p).fetch_add(v);
}

inline float2 atomicAdd(float2* p, float2 v) {  // sm90 red.global.add.v2.f32
  if (emu::g_cfg.sm < 90) emu::error("atomicAdd(float2*) needs sm90");
  const emu::Region* r = emu::find_region(p, 8);
  if (!r || !r->writable || reinterpret_cast<uintptr_t>(p) % 8) {
    emu::error("atomicAdd(float2*) at %p: outside every writable buffer or not 8-byte aligned", static_cast<void*>(p));
    return float2{0.f, 0.f};
  }
  float* f = reinterpret_cast<float*>(p);
  const float a = std::atomic_ref<float>(f[0]).fetch_add(v.x);
  const float b = std::atomic_ref<float>(f[1]).fetch_add(v.y);
  return float2{a, b};
}

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value > static_cast<int>(emu::smem_limit())) return cudaErrorInvalidValue;
  const void* key = emu::fn_key(f);
  for (auto& kv : emu::g_smem_attr)
    if (kv.first == key) {
      kv.second = value;
      return cudaSuccess;
    }
  emu::g_smem_attr.push_back({key, value});
  return cudaSuccess;
}

// Device memory for stand-alone programs (the probe): host memory registered as a writable buffer.
enum cudaMemcpyKind { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
template <typename T>
inline cudaError_t cudaMalloc(T** p, size_t bytes) {
  void* m = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  emu::add_region("cudaMalloc", m, bytes, true);
  *p = static_cast<T*>(m);
  return cudaSuccess;
}
inline cudaError_t cudaFree(void* p) {
  auto& r = emu::g_regions;
  r.erase(std::remove_if(r.begin(), r.end(), [p](const emu::Region& x) { return x.lo == p; }), r.end());
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInvalidValue ? "invalid argument" : "invalid configuration";
}

#include "emu_sm90.h"
