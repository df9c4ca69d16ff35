// The emulator's stand-in for CUDA's header: see ../cuda_emu.h.
#pragma once
#include "../cuda_emu.h"
