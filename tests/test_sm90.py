"""The Hopper (sm_90a, wgmma/TMA) family: what this build and the Python layer say about it everywhere, and
on a compute-capability-9.0 GPU its kernels against the float64 reference and against the mma.sync path
(the whole CUDA suite, tests/test_cuda.py, runs on whichever family the device selects)."""
from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest
import torch

import fused_attn
from conftest import HAS_CUDA, check_all, make_qkv
from fused_attn import _ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
INFO = fused_attn.build_info()


def _module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_head_dim_lists_agree():
    """csrc/cuda/sm90/tiles.h, generate.py, setup.py and the emulator's run_all.py list the same head dims."""
    tiles = (ROOT / "csrc/cuda/sm90/tiles.h").read_text()
    header = tuple(int(x) for x in re.search(r"kSm90HeadDims\[\] = \{([^}]*)\}", tiles).group(1).split(","))
    assert _module(ROOT / "csrc/cuda/generate.py").SM90_HEAD_DIMS == header
    assert _module(ROOT / "tests/emu/run_all.py").SM90_HEAD_DIMS == header
    setup_src = (ROOT / "setup.py").read_text()
    assert re.search(r"SM90_HEAD_DIMS = \(([^)]*)\)", setup_src).group(1).replace(" ", "") == ",".join(map(str, header))
    assert sorted(_ops._TILES["sm90"]) == list(header)
    for hd in header:  # every generated file exists
        for p in ("fwd", "bwd"):
            for dt in ("fp16", "bf16"):
                assert (ROOT / f"csrc/cuda/generated/sm90_{p}_{dt}_hd{hd}.cu").exists()


def test_tiles_and_lists():
    """Block masks list tiles at the Hopper kernels' shapes too; its backward tiles equal the mma.sync ones."""
    shapes = _ops.cuda_tile_shapes()
    for hd, t in _ops._TILES["sm90"].items():
        assert (t[0], t[1]) in shapes and (t[2], t[3]) in shapes
        assert t[0] == 128 and t[1] % 64 == 0 and t[2] == 64
        assert (t[2], t[3]) == tuple(_ops._TILES["tc"][hd][2:])


@pytest.mark.skipif("cuda" not in INFO["backends"], reason="a CPU-only build has no CUDA kernels to describe")
def test_build_info_names_the_paths():
    assert set(INFO["cuda_sm90_head_dims"]) == {"float16", "bfloat16"}
    assert "cuda_paths" in INFO
    for dev, path in INFO["cuda_paths"].items():
        assert dev.startswith("cuda:") and (path.startswith("sm90") or path.startswith("mma.sync"))
    if INFO["cuda_sm90_head_dims"]["bfloat16"]:
        assert "sm_90a" in INFO["cuda_archs"]


def _on_sm90() -> bool:
    return HAS_CUDA and fused_attn.build_info()["cuda_paths"].get("cuda:0", "").startswith("sm90")


sm90 = pytest.mark.skipif(not _on_sm90(), reason="needs a compute-capability-9.0 GPU and a build with sm_90a kernels")


@sm90
def test_force_sm80_switches_the_path(monkeypatch):
    monkeypatch.setenv("FUSED_ATTN_FORCE_SM80", "1")
    assert fused_attn.build_info()["cuda_paths"]["cuda:0"].startswith("mma.sync")
    monkeypatch.delenv("FUSED_ATTN_FORCE_SM80")
    assert fused_attn.build_info()["cuda_paths"]["cuda:0"].startswith("sm90")


@sm90
@pytest.mark.parametrize("force", ["", "1"], ids=["sm90", "sm80"])
@pytest.mark.parametrize("pattern", ["dense", "causal", "window", "sparse"])
def test_both_paths_against_reference(pattern, force, monkeypatch):
    monkeypatch.setenv("FUSED_ATTN_FORCE_SM80", force)
    q, k, v = make_qkv(2, 8, 2, 777, 1025, 128, dtype=torch.bfloat16, device="cuda", seed=11)
    kw = {"dense": {}, "causal": dict(causal=True), "window": dict(window=(300, 20))}.get(pattern)
    if kw is None:
        lay = torch.rand(8, -(-777 // 64), -(-1025 // 64), generator=torch.Generator().manual_seed(2)) < 0.3
        kw = dict(block_mask=fused_attn.block_mask(lay.cuda(), 64), causal=True)
    check_all(q, k, v, **kw)


@sm90
def test_expanded_kv_is_copied_for_tma():
    q, k, v = make_qkv(1, 4, 1, 200, 300, 64, dtype=torch.float16, device="cuda", seed=4)
    k, v = k.expand(1, 4, 300, 64), v.expand(1, 4, 300, 64)  # zero head stride: not describable by a tensor map
    check_all(q, k, v, causal=True)


@sm90
@pytest.mark.parametrize("force", ["", "1"], ids=["sm90", "sm80"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_varlen_both_paths_against_reference(d, force, monkeypatch):
    """Packed batches run the Hopper kernels too (per-sequence TMA offsets, guarded epilogue stores); the
    mma.sync kernels on the same batch for comparison."""
    from test_cuda import VARLEN_MIXED, check_varlen_cuda, packed_cuda

    monkeypatch.setenv("FUSED_ATTN_FORCE_SM80", force)
    q, k, v, cu_q, cu_k = packed_cuda(*VARLEN_MIXED, 8, 2, d, torch.bfloat16, seed=d)
    check_varlen_cuda(q, k, v, cu_q, cu_k, causal=True, window=(300, -1))

