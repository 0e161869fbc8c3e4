"""The built extension itself: it must load the shared C++ runtime (setup.py's check_runtime, which a GPU
machine's build once failed: a private copy of libstdc++ pieces crashed every error message that formats a
number)."""
import sys

import pytest

import fused_attn
from fused_attn import _C


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF dependency check")
def test_extension_links_the_shared_cxx_runtime():
    assert b"libstdc++.so.6" in open(_C.__file__, "rb").read()


def test_a_cpp_error_with_numbers_reaches_python():
    import torch

    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"window: expected entries >= -1"):
        torch.ops.fused_attn.fwd(q, q, q, 0.5, -4, -1, [], [])
    assert fused_attn.build_info()["backends"]
