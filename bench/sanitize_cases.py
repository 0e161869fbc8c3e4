"""Small cases of every CUDA kernel for compute-sanitizer (memcheck, racecheck, synccheck, initcheck):
forward and backward of the tensor-core kernels (both dtypes, a small and a large head dim, ragged lengths,
every pattern, softcap and ALiBi, packed variable-length batches, atomic and deterministic dQ), the fp32/fp64
kernels, the KV-cache decode kernels (contiguous and paged, split and not, appending) and linear attention.
On a Hopper GPU the fp16/bf16 flash cases run twice in the same process: on the wgmma/TMA kernels, then with
FUSED_ATTN_FORCE_SM80=1 on the mma.sync kernels (the variable is read at each call). Exits non-zero if any
result is NaN or a kernel reported an error."""
import os

import torch

import fused_attn

G = torch.Generator(device="cpu")
DEV = os.environ.get("SANITIZE_DEVICE", "cuda")  # "cpu" checks the script itself on a machine without a GPU


def rnd(*shape, dtype):
    return torch.randn(*shape, generator=G).to(DEV, dtype)


def finite(name, *ts):
    if DEV == "cuda":
        torch.cuda.synchronize()
    for t in ts:
        assert not torch.isnan(t).any(), f"NaN: {name}"


def flash_case(dtype, d, sq, sk, hq, hk, deterministic=False, **kw):
    os.environ["FUSED_ATTN_DETERMINISTIC"] = "1" if deterministic else "0"
    q, k, v = (rnd(1, h, s, d, dtype=dtype).requires_grad_(True) for h, s in ((hq, sq), (hk, sk), (hk, sk)))
    out, lse = fused_attn.flash(q, k, v, return_lse=True, **kw)
    out.backward(torch.randn_like(out))
    finite(f"flash {dtype} d={d} {sorted(kw)}", out, q.grad, k.grad, v.grad)


def varlen_case(dtype, d, lens, hq, hk, **kw):
    cu = torch.tensor([0] + lens).cumsum(0).to(DEV, torch.int32)
    n = sum(lens)
    q, k, v = (rnd(n, h, d, dtype=dtype).requires_grad_(True) for h in (hq, hk, hk))
    out = fused_attn.flash_varlen(q, k, v, cu, cu, **kw)
    out.backward(torch.randn_like(out))
    finite(f"varlen {dtype} d={d} {sorted(kw)}", out, q.grad, k.grad, v.grad)


def kvcache_case(dtype, d, page_size, num_splits, sq=1, append=0, **kw):
    b, hq, hk, s_max = 3, 8, 2, 320
    lens = torch.tensor([0, 97, 300 - append], dtype=torch.int32)
    q = rnd(b, hq, sq, d, dtype=dtype)
    if page_size is None:
        kc, vc, bt = rnd(b, hk, s_max, d, dtype=dtype), rnd(b, hk, s_max, d, dtype=dtype), None
    else:
        per = -(-s_max // page_size)
        perm = torch.randperm(b * per + 2, generator=G)[: b * per].view(b, per)
        kc, vc = (rnd(b * per + 2, page_size, hk, d, dtype=dtype) for _ in range(2))
        bt = perm.to(DEV, torch.int32)
    new = {}
    if append:
        new = dict(k_new=rnd(b, hk, append, d, dtype=dtype), v_new=rnd(b, hk, append, d, dtype=dtype))
    out, lse = fused_attn.flash_kvcache(q, kc, vc, lens.to(DEV), block_table=bt, num_splits=num_splits,
                                        return_lse=True, **new, **kw)
    finite(f"kvcache {dtype} d={d} page={page_size} splits={num_splits}", out)


def linear_case(dtype, dk, dv, s, causal):
    q, k = (rnd(2, 2, s, dk, dtype=dtype).requires_grad_(True) for _ in range(2))
    v = rnd(2, 2, s, dv, dtype=dtype).requires_grad_(True)
    st = (rnd(2, 2, dk, dv, dtype=torch.float32 if dtype != torch.float64 else dtype).requires_grad_(True),
          rnd(2, 2, dk, dtype=torch.float32 if dtype != torch.float64 else dtype).requires_grad_(True))
    if causal:  # carries a state in and out
        out, (s1, z1) = fused_attn.linear_attention(q, k, v, causal=True, initial_state=st, return_state=True)
        (out.float().sum() + s1.float().sum() + z1.float().sum()).backward()
        finite(f"linear {dtype} dk={dk} dv={dv} causal", out, s1, q.grad, k.grad, v.grad, st[0].grad)
    else:
        out = fused_attn.linear_attention(q, k, v, causal=False)
        out.backward(torch.randn_like(out))
        finite(f"linear {dtype} dk={dk} dv={dv}", out, q.grad, k.grad, v.grad)


def main():
    G.manual_seed(0)
    lay = lambda sq, sk, b: (torch.rand(2, -(-sq // b), -(-sk // b), generator=G) < 0.5).to(DEV)
    slopes = (torch.rand(2, generator=G) * 0.2).to(DEV)
    for force in ("", "1"):  # Hopper kernels (on cc 9.0), then the mma.sync kernels
        os.environ["FUSED_ATTN_FORCE_SM80"] = force
        for dtype in (torch.bfloat16, torch.float16):
            for d in (64, 256):
                flash_case(dtype, d, 200, 200, 2, 1)
                flash_case(dtype, d, 131, 77, 2, 2, causal=True)
                flash_case(dtype, d, 150, 260, 2, 1, window=(40, 8), deterministic=True)
                flash_case(dtype, d, 200, 200, 2, 2, block_mask=fused_attn.block_mask(lay(200, 200, 64), 64))
        flash_case(torch.bfloat16, 40, 97, 97, 2, 1, causal=True)
        flash_case(torch.bfloat16, 128, 150, 150, 2, 2, block_mask=fused_attn.block_mask(lay(150, 150, 16), 16),
                   deterministic=True)
        flash_case(torch.bfloat16, 128, 190, 190, 2, 2, causal=True, softcap=30.0, alibi_slopes=slopes)
        varlen_case(torch.bfloat16, 128, [70, 1, 200], 2, 1, causal=True, softcap=20.0)
    os.environ["FUSED_ATTN_FORCE_SM80"] = ""
    for dtype in (torch.float32, torch.float64):
        flash_case(dtype, 72, 70, 90, 2, 1, causal=True)
        flash_case(dtype, 72, 64, 64, 2, 2, block_mask=fused_attn.block_mask(lay(64, 64, 16), 16))
        varlen_case(dtype, 72, [33, 5, 90], 2, 2, window=(16, 16))
    for dtype, d in ((torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 72)):
        for page_size in (None, 16):
            for splits in (1, 3):
                kvcache_case(dtype, d, page_size, splits)
        kvcache_case(dtype, d, 16, 0, sq=4, append=4, causal=True, softcap=30.0)
    for dtype, dk, dv in ((torch.bfloat16, 64, 64), (torch.float16, 128, 64), (torch.float32, 48, 80),
                          (torch.float64, 32, 32)):
        for causal in (True, False):
            linear_case(dtype, dk, dv, 150, causal)
    finite("end")
    print("sanitize cases done")


if __name__ == "__main__":
    main()
