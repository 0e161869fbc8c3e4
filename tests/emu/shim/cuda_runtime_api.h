// Host stand-in for <cuda_runtime_api.h> (tests/emu): see cuda_runtime.h.
#pragma once
#include "cuda_runtime.h"
