// Decode cases of the host emulator (included by emu_main.cpp): flash_kvcache's CUDA kernels, the tensor-core
// split kernel tc_decode_run (fp16 / bf16 binaries) or the fp32 / fp64 generic_decode (generic binaries), each
// followed by the combine kernel when the key range is split, against a float64 reference. The cache is
// contiguous (B, Hk, S_max, D) or a paged pool (num_pages, page_size, Hk, D) with a shuffled page table
// (unused entries -1), rows padded with NaN so that a read past D or into another row shows.
#pragma once

struct DecodeCase {
  std::string name;
  int B, Hq, Hk, Sq;
  int d_generic;  // head dim in the generic binaries; the tensor-core binaries use HD (HD - 24 with small_d)
  bool small_d;
  int page;  // 0: contiguous cache
  std::vector<int> lens;  // keys in the cache per sequence
  int s_max;              // capacity (contiguous) / pages per sequence * page
  int64_t left, right;
  double softcap;
  bool alibi;
  int splits;
  bool nan_inputs = false;  // one NaN in a query row and one in a cached key: their rows come out NaN
};

std::vector<DecodeCase> decode_cases() {
  std::vector<DecodeCase> c;
  // GQA group of 4, one query row each: the 16-row tile (WM = 1), one split, lengths inside a tile.
  c.push_back({"decode_contig", 2, 8, 2, 1, 64, false, 0, {200, 77}, 256, -1, -1, 0.0, false, 1});
  // Pages of 16 (a 64-key tile spans 4 pages), 3 splits, softcap.
  c.push_back({"decode_paged16_split3_softcap", 2, 8, 2, 1, 40, false, 16, {300, 45}, 320, -1, -1, 2.5, false, 3});
  // Pages of 64, Sq = 5 causal (20 rows: the 64-row tile up to HD = 128), ALiBi, 2 splits.
  c.push_back({"decode_paged64_sq5_causal_alibi", 2, 8, 2, 5, 96, false, 64, {190, 5}, 192, -1, 0, 0.0, true, 2});
  // MQA, 32 query heads on one kv head, a window, 4 splits.
  c.push_back({"decode_mqa_window_split4", 1, 32, 1, 1, 59, false, 0, {150}, 160, 40, 0, 0.0, false, 4});
  // An empty cache, a cache of 1, Sq = 2 causal (row 0 of the 1-key sequence sees nothing), 5 splits (more
  // than the tiles: empty splits), pages of 16.
  c.push_back({"decode_empty_short_split5", 3, 4, 2, 2, 160, false, 16, {0, 1, 70}, 80, -1, 0, 0.0, false, 5});
  // d < HD (zero-filled columns), Sq = 3 on a group of 2, softcap and ALiBi, 2 splits.
  c.push_back({"decode_small_d_split2", 1, 2, 1, 3, 256, true, 0, {130}, 130, -1, -1, 4.0, true, 2});
  // NaN in a query row (sequence 0, head 1, row 0) and in a cached key (sequence 1, kv head 0, key 40), Sq = 2
  // causal, pages of 16, 3 splits: the rows that see a NaN come out NaN (out and lse) through the split kernel's
  // warp merge and the combine kernel; the others as usual.
  DecodeCase n{"decode_nan_split3", 2, 8, 2, 2, 64, false, 16, {150, 90}, 160, -1, 0, 0.0, false, 3};
  n.nan_inputs = true;
  c.push_back(n);
  return c;
}

void run_decode_case(const DecodeCase& c, unsigned seed, Totals& tot) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  const int d = kHD ? (c.small_d ? std::max(8, kHD - 24) : kHD) : c.d_generic;
  const int64_t pad = kTc ? 8 : 3, row = d + pad;
  const int G = c.Hq / c.Hk;

  // Logical cache contents, rounded to Elem.
  std::vector<double> kf(static_cast<size_t>(c.B) * c.Hk * c.s_max * d), vf(kf.size());
  for (auto& x : kf) x = to_d(from_d<Elem>(nd(rng)));
  for (auto& x : vf) x = to_d(from_d<Elem>(nd(rng)));
  const auto li = [&](int64_t b, int64_t h, int64_t j) { return ((b * c.Hk + h) * c.s_max + j) * d; };

  // Storage.
  std::vector<Elem> kbuf, vbuf;
  std::vector<int32_t> table;
  Strides kst;
  int64_t num_pages = 0, per_seq = 0;
  if (c.page == 0) {
    kst = {c.Hk * c.s_max * row, c.s_max * row, row};
    kbuf.assign(static_cast<size_t>(c.B * kst.b + 8), nan_pattern<Elem>());
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t h = 0; h < c.Hk; ++h)
        for (int64_t j = 0; j < c.s_max; ++j)
          for (int x = 0; x < d; ++x) kbuf[kst.at(b, h, j) + x] = from_d<Elem>(kf[li(b, h, j) + x]);
    vbuf = kbuf;
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t h = 0; h < c.Hk; ++h)
        for (int64_t j = 0; j < c.s_max; ++j)
          for (int x = 0; x < d; ++x) vbuf[kst.at(b, h, j) + x] = from_d<Elem>(vf[li(b, h, j) + x]);
  } else {
    per_seq = cdiv(c.s_max, c.page);
    num_pages = c.B * per_seq + 3;
    kst = {c.page * c.Hk * row, row, c.Hk * row};  // (page, head, slot) strides of the NHD pool
    std::vector<int32_t> perm(num_pages);
    for (int64_t i = 0; i < num_pages; ++i) perm[i] = static_cast<int32_t>(i);
    std::shuffle(perm.begin(), perm.end(), rng);
    table.assign(static_cast<size_t>(c.B * per_seq), -1);
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t pg = 0; pg < cdiv(c.lens[b], c.page); ++pg) table[b * per_seq + pg] = perm[b * per_seq + pg];
    kbuf.assign(static_cast<size_t>(num_pages * kst.b + 8), nan_pattern<Elem>());
    vbuf = kbuf;
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t j = 0; j < c.lens[b]; ++j) {
        const int64_t pg = table[b * per_seq + j / c.page];
        for (int64_t h = 0; h < c.Hk; ++h)
          for (int x = 0; x < d; ++x) {
            kbuf[pg * kst.b + h * kst.h + (j % c.page) * kst.s + x] = from_d<Elem>(kf[li(b, h, j) + x]);
            vbuf[pg * kst.b + h * kst.h + (j % c.page) * kst.s + x] = from_d<Elem>(vf[li(b, h, j) + x]);
          }
      }
  }
  Tensor4<Elem> q(c.B, c.Hq, c.Sq, d, pad, false, nan_pattern<Elem>());
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < c.Sq; ++i)
        for (int x = 0; x < d; ++x) q.at(b, h, i, x) = from_d<Elem>(nd(rng));
  if (c.nan_inputs) {
    const Elem nanv = nan_pattern<Elem>();
    q.at(0, std::min(1, c.Hq - 1), 0, std::min(3, d - 1)) = nanv;
    const int64_t b = c.B - 1, j = std::min(40, c.lens[b] - 1), x = std::min(7, d - 1);
    kf[li(b, 0, j) + x] = NAN;
    if (c.page == 0) kbuf[kst.at(b, 0, j) + x] = nanv;
    else kbuf[table[b * per_seq + j / c.page] * kst.b + (j % c.page) * kst.s + x] = nanv;
  }
  std::vector<float> slopes(static_cast<size_t>(c.B) * c.Hq);
  for (auto& s : slopes) s = static_cast<float>(0.05 + 0.5 * std::fabs(nd(rng)));
  std::vector<int32_t> seqlens(c.lens.begin(), c.lens.end());
  const double scale = 1.0 / std::sqrt(static_cast<double>(d)) * 1.3;

  // Reference.
  const size_t nrow = static_cast<size_t>(c.B) * c.Hq * c.Sq;
  std::vector<double> ro(nrow * d, 0.0), rlse(nrow, -INFINITY);
  std::vector<uint8_t> sees(nrow, 0);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < c.Sq; ++i) {
        const int64_t sk = c.lens[b], off = sk - c.Sq, kvh = h / G;
        std::vector<double> s(sk, -INFINITY);
        double mx = -INFINITY;
        bool nan_row = false;
        for (int64_t j = 0; j < sk; ++j) {
          const int64_t dd = j - i - off;
          if ((c.left >= 0 && dd < -c.left) || (c.right >= 0 && dd > c.right)) continue;
          double a = 0;
          for (int x = 0; x < d; ++x) a += to_d(q.at(b, h, i, x)) * kf[li(b, kvh, j) + x];
          a *= scale;
          if (c.softcap > 0) a = c.softcap * std::tanh(a / c.softcap);
          if (c.alibi) a -= slopes[b * c.Hq + h] * std::fabs(static_cast<double>(i + off - j));
          s[j] = a;
          nan_row |= std::isnan(a);
          mx = std::max(mx, a);
        }
        const size_t r = (static_cast<size_t>(b) * c.Hq + h) * c.Sq + i;
        if (nan_row) {
          sees[r] = 1;
          rlse[r] = NAN;
          for (int x = 0; x < d; ++x) ro[r * d + x] = NAN;
          continue;
        }
        if (mx == -INFINITY) continue;
        sees[r] = 1;
        double l = 0;
        for (int64_t j = 0; j < sk; ++j)
          if (s[j] > -INFINITY) l += std::exp(s[j] - mx);
        rlse[r] = mx + std::log(l);
        for (int64_t j = 0; j < sk; ++j)
          if (s[j] > -INFINITY)
            for (int x = 0; x < d; ++x) ro[r * d + x] += std::exp(s[j] - mx) / l * vf[li(b, kvh, j) + x];
      }

  AttnParams p;
  p.q = q.buf.data();
  p.k = kbuf.data();
  p.v = vbuf.data();
  p.batch = c.B;
  p.hq = c.Hq;
  p.hk = c.Hk;
  p.sq = c.Sq;
  p.sk = c.page ? per_seq * c.page : c.s_max;
  p.d = d;
  p.q_st = q.st;
  p.k_st = kst;
  p.v_st = kst;
  p.scale = scale;
  p.window_left = c.left;
  p.window_right = c.right;
  p.seqlens_k = seqlens.data();
  if (c.page) {
    p.block_table = table.data();
    p.block_table_b = per_seq;
    p.page_size = c.page;
    p.num_pages = num_pages;
  }
  p.softcap = c.softcap;
  if (c.alibi) {
    p.alibi = slopes.data();
    p.alibi_b = c.Hq;
  }
  p.num_splits = c.splits;
  Tensor4<Elem> o(c.B, c.Hq, c.Sq, d, pad, false, sentinel<Elem>());
  std::vector<Lse> lse(nrow + 8, sentinel<Lse>());
  std::vector<Lse> o_part(c.splits > 1 ? static_cast<size_t>(c.splits) * nrow * d + 8 : 0, sentinel<Lse>());
  std::vector<Lse> lse_part(c.splits > 1 ? static_cast<size_t>(c.splits) * nrow + 8 : 0, sentinel<Lse>());
  p.o = o.buf.data();
  p.o_st = o.st;
  p.lse = lse.data();
  p.lse_b = static_cast<int64_t>(c.Hq) * c.Sq;
  p.lse_h = c.Sq;
  if (c.splits > 1) {
    p.o_part = o_part.data();
    p.lse_part = lse_part.data();
  }
  emu::clear_regions();
  emu::add_region("q", q.buf.data(), q.buf.size() * sizeof(Elem), false);
  emu::add_region("k_cache", kbuf.data(), kbuf.size() * sizeof(Elem), false);
  emu::add_region("v_cache", vbuf.data(), vbuf.size() * sizeof(Elem), false);
  emu::add_region("o", o.buf.data(), o.buf.size() * sizeof(Elem), true);
  emu::add_region("lse", lse.data(), lse.size() * sizeof(Lse), true);
  if (c.splits > 1) {
    emu::add_region("o_part", o_part.data(), o_part.size() * sizeof(Lse), true);
    emu::add_region("lse_part", lse_part.data(), lse_part.size() * sizeof(Lse), true);
  }
  const long e0 = emu::g_errors.load();
  std::string thrown;
  try {
#ifdef EMU_GENERIC
    generic_decode(p, sizeof(Elem) == 4 ? DType::f32 : DType::f64, nullptr);
#else
    tc_decode_run<Elem, kHD>(p, nullptr);
#endif
  } catch (const std::exception& e) {
    thrown = e.what();
  }

  std::vector<std::pair<const char*, Stats>> parts{{"out", {}}, {"lse", {}}};
  compare(parts[0].second, o, ro, "out", [&](int64_t b, int64_t h, int64_t i) {
    return !sees[(static_cast<size_t>(b) * c.Hq + h) * c.Sq + i];
  });
  Stats& ls = parts[1].second;
  for (size_t r = nrow; r < lse.size(); ++r)
    if (!same_bits(lse[r], sentinel<Lse>())) ls.fail("lse written past its end");
  for (size_t r = 0; r < nrow; ++r) {
    const double g = to_d(lse[r]);
    if (same_bits(lse[r], sentinel<Lse>())) {
      ls.fail("lse[" + std::to_string(r) + "] never written");
    } else if (!sees[r]) {
      if (!(std::isinf(g) && g < 0)) ls.fail("lse of a row that sees nothing = " + std::to_string(g) + ", want -inf");
    } else if (std::isnan(rlse[r])) {
      if (!std::isnan(g)) ls.fail("lse[" + std::to_string(r) + "] = " + std::to_string(g) + ", want NaN (the row sees a NaN)");
    } else if (!std::isfinite(g)) {
      ls.fail("lse non-finite for a row that sees keys");
    } else {
      ls.err = std::max(ls.err, std::fabs(g - rlse[r]));
      ls.ref_max = std::max(ls.ref_max, std::max(1.0, std::fabs(rlse[r])));
    }
  }
  // The workspace: every part written (the combine reads them all), nothing past its end.
  if (c.splits > 1) {
    for (size_t r = 0; r < static_cast<size_t>(c.splits) * nrow; ++r)
      if (same_bits(lse_part[r], sentinel<Lse>())) {
        ls.fail("lse_part[" + std::to_string(r) + "] never written");
        break;
      }
    for (size_t r = static_cast<size_t>(c.splits) * nrow; r < lse_part.size(); ++r)
      if (!same_bits(lse_part[r], sentinel<Lse>())) ls.fail("lse_part written past its end");
    for (size_t r = static_cast<size_t>(c.splits) * nrow * d; r < o_part.size(); ++r)
      if (!same_bits(o_part[r], sentinel<Lse>())) parts[0].second.fail("o_part written past its end");
  }
  Case shown{c.name, c.B, c.Hq, c.Hk, c.Sq, c.s_max, d};
  report(tot, shown, "decode", parts, emu::g_errors.load() - e0, thrown);
}
