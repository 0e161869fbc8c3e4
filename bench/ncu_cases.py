"""Shapes for Nsight Compute (bench/gpu_check.sh stage `ncu`): one case per run, called a few times so that
ncu can skip the warm-up launches. bf16, B1 H16 D128 (the README's GPU shape at S = 4k unless given).
  python bench/ncu_cases.py CASE [--seqlen S] [--head-dim D] [--calls N]
CASE: fwd | fwd_causal | fwd_sparse | bwd | bwd_causal (forward+backward), on whichever family flash() picks
(FUSED_ATTN_FORCE_SM80=1 for the mma.sync kernels on Hopper)."""
import argparse

import torch

import fused_attn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=["fwd", "fwd_causal", "fwd_sparse", "bwd", "bwd_causal"])
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--calls", type=int, default=6)
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 16, a.seqlen, a.head_dim)
    grad = a.case.startswith("bwd")
    q, k, v = (torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)
               for _ in range(3))
    kw = {}
    if "causal" in a.case:
        kw["causal"] = True
    if a.case == "fwd_sparse":
        nb = -(-a.seqlen // 128)
        lay = torch.rand(16, nb, nb, generator=g, device="cuda") < 0.1
        lay |= torch.eye(nb, dtype=torch.bool, device="cuda")
        kw["block_mask"] = fused_attn.block_mask(lay, 128)
    dout = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)
    for _ in range(a.calls):
        out = fused_attn.flash(q, k, v, **kw)
        if grad:
            out.backward(dout)
    torch.cuda.synchronize()
    print("ncu case done:", a.case, fused_attn.build_info()["cuda_paths"])


if __name__ == "__main__":
    main()
