// Calls fused_attn::fwd and fused_attn::bwd through the libtorch dispatcher, as a C++ program would, and
// compares them with attention written in ATen ops (autograd for the gradients). Prints
// "N passed, N failed" and exits non-zero on any failure.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>

namespace {

int passed = 0, failed = 0;

void expect_close(const char* name, const at::Tensor& a, const at::Tensor& b, double tol) {
  const double err = (a - b).abs().max().item<double>();
  if (err <= tol) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAIL %s: max error %.3e > %.1e\n", name, err, tol);
  }
}

void run_case(const char* name, int64_t sq, int64_t sk, int64_t wl, int64_t wr) {
  torch::manual_seed(0);
  const auto opt = torch::TensorOptions().dtype(torch::kFloat64);
  auto q = torch::randn({2, 4, sq, 24}, opt).requires_grad_(true);
  auto k = torch::randn({2, 2, sk, 24}, opt).requires_grad_(true);
  auto v = torch::randn({2, 2, sk, 24}, opt).requires_grad_(true);
  const double scale = 1.0 / std::sqrt(24.0);

  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("fused_attn::fwd", "")
                        .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, double, int64_t, int64_t,
                                                                  at::TensorList, at::IntArrayRef, double,
                                                                  const std::optional<at::Tensor>&)>();
  static auto bwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("fused_attn::bwd", "")
                        .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double,
                            int64_t, int64_t, at::TensorList, at::IntArrayRef, bool, double,
                            const std::optional<at::Tensor>&)>();
  auto [out, lse] = fwd.call(q.detach(), k.detach(), v.detach(), scale, wl, wr, {}, {}, 0.0, std::nullopt);

  // The reference: explicit scores, the same bottom-right window rule.
  auto kk = k.repeat_interleave(2, 1), vv = v.repeat_interleave(2, 1);
  auto i = torch::arange(sq, opt).view({sq, 1}), j = torch::arange(sk, opt).view({1, sk});
  auto d = j - i - double(sk - sq);
  auto vis = torch::ones({sq, sk}, torch::kBool);
  if (wl >= 0) vis = vis & (d >= -double(wl));
  if (wr >= 0) vis = vis & (d <= double(wr));
  auto s = torch::matmul(q, kk.transpose(-1, -2)) * scale;
  s = s.masked_fill(~vis, -INFINITY);
  auto ref = torch::matmul(torch::softmax(s, -1), vv);
  auto ref_lse = torch::logsumexp(s, -1);
  expect_close(name, out, ref.detach(), 1e-10);
  expect_close(name, lse, ref_lse.detach(), 1e-10);

  auto dout = torch::randn_like(ref);
  ref.backward(dout);
  auto [dq, dk, dv] = bwd.call(dout, q.detach(), k.detach(), v.detach(), out, lse, std::nullopt, scale, wl, wr,
                               {}, {}, false, 0.0, std::nullopt);
  expect_close(name, dq, q.grad(), 1e-10);
  expect_close(name, dk, k.grad(), 1e-10);
  expect_close(name, dv, v.grad(), 1e-10);
}

}  // namespace

int main() {
  run_case("dense", 37, 53, -1, -1);
  run_case("causal", 64, 64, -1, 0);
  run_case("window", 50, 70, 9, 4);  // every row sees a key: the plain softmax above has no empty-row rule
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
