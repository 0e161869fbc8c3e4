"""Small cases of every CUDA kernel for compute-sanitizer (memcheck, racecheck, synccheck): forward and
backward of the tensor-core kernels (both dtypes, a small and a large head dim, ragged lengths, every
pattern, atomic and deterministic dQ) and of the fp32/fp64 kernels. On a Hopper GPU the fp16/bf16 cases run
the wgmma/TMA kernels unless FUSED_ATTN_FORCE_SM80=1 (gpu_check.sh runs both). Exits non-zero if any
result is NaN."""
import os

import torch

import fused_attn


def run(dtype, d, sq, sk, hq, hk, deterministic=False, **kw):
    os.environ["FUSED_ATTN_DETERMINISTIC"] = "1" if deterministic else "0"
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, h, s, d, generator=g).to("cuda", dtype).requires_grad_(True)
               for h, s in ((hq, sq), (hk, sk), (hk, sk)))
    out, lse = fused_attn.flash(q, k, v, return_lse=True, **kw)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    for t in (out, q.grad, k.grad, v.grad):
        assert not torch.isnan(t).any(), f"NaN: {dtype} d={d} {kw}"


def main():
    lay = lambda sq, sk, b: (torch.rand(2, -(-sq // b), -(-sk // b), generator=torch.Generator().manual_seed(1)) < 0.5).cuda()
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 256):
            run(dtype, d, 200, 200, 2, 1)
            run(dtype, d, 131, 77, 2, 2, causal=True)
            run(dtype, d, 150, 260, 2, 1, window=(40, 8), deterministic=True)
            run(dtype, d, 200, 200, 2, 2, block_mask=fused_attn.block_mask(lay(200, 200, 64), 64))
    run(torch.bfloat16, 40, 97, 97, 2, 1, causal=True)
    run(torch.bfloat16, 128, 150, 150, 2, 2, block_mask=fused_attn.block_mask(lay(150, 150, 16), 16),
        deterministic=True)
    for dtype in (torch.float32, torch.float64):
        run(dtype, 72, 70, 90, 2, 1, causal=True)
        run(dtype, 72, 64, 64, 2, 2, block_mask=fused_attn.block_mask(lay(64, 64, 16), 16))
    print("sanitize cases done")


if __name__ == "__main__":
    main()
