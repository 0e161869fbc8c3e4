# The two commands of the README:
#   make bench   set up .venv, build fused_attn, run the benchmark on whatever device is present
#   make test    set up the same way, run the test suite (pytest) and the C++ tests (ctest)
# Set-up is idempotent: the venv is made once, the extension is rebuilt only when its sources change.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.fused-attn-built
SOURCES := $(shell find csrc fused_attn -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.py' \)) setup.py pyproject.toml
CMAKE_BUILD := build_cmake

.PHONY: setup bench test pytest ctest clean

setup: $(BUILT)

$(DEPS): requirements.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -r requirements.txt
	touch $@

# --no-build-isolation: build against the torch in .venv instead of fetching a second one.
# The build's own time is printed (the README quotes it).
$(BUILT): $(DEPS) $(SOURCES)
	@t0=$$(date +%s); $(VPY) -m pip install --no-build-isolation --no-deps -e . && \
	  echo "build: fused_attn compiled and installed in $$(( $$(date +%s) - t0 )) s"
	touch $@

bench: setup
	$(VPY) bench/bench.py $(BENCH_ARGS)

test: pytest ctest

# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero code.
pytest: setup
	$(VPY) -m pytest tests $(PYTEST_ARGS)

ctest: setup
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(VPY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	  -DPython3_EXECUTABLE=$(abspath $(VPY))
	cmake --build $(CMAKE_BUILD) -j 2
	cd $(CMAKE_BUILD) && ctest --output-on-failure

clean:
	rm -rf build $(CMAKE_BUILD) fused_attn/*.so $(BUILT)
