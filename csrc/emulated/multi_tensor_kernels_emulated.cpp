// The CUDA kernels, unchanged, compiled by the host compiler against cuda_emulation.h.
#include "cuda/multi_tensor_kernels.cu"
