// The CPU kernels for any x86-64 / other CPU: the baseline instruction set.
#define ZSNR_CPU_ISA base
#include "kernels_impl.h"
