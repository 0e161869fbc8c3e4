"""The built extension itself: it must load the shared C++ runtime (setup.py's check_runtime, which a GPU
machine's build once failed: a private copy of libstdc++ pieces crashed every error message that formats a
number; test_errors.py's direct op calls raise such messages)."""
import sys

import pytest

from fused_attn import _C


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF dependency check")
def test_extension_links_the_shared_cxx_runtime():
    assert b"libstdc++.so.6" in open(_C.__file__, "rb").read()
