/* A stand-in libcuda.so.1 for measuring and testing kvikio's compat mode (host memory only) on a machine without a
 * GPU driver. Every call reports CUDA_ERROR_NOT_INITIALIZED, which kvikio reads as "this pointer is host memory",
 * except the driver-version and error-string queries. Never use it where a real driver exists: see kvikio_cpu.py. */
#include <stddef.h>
#define NOT_INIT 3
static int not_init(void) { return NOT_INIT; }
int cuDriverGetVersion(int *v) { if (v) *v = 13000; return 0; }
int cuInit(unsigned flags) { (void)flags; return NOT_INIT; }
int cuGetErrorName(int e, const char **s) { (void)e; if (s) *s = "CUDA_ERROR_NOT_INITIALIZED"; return 0; }
int cuGetErrorString(int e, const char **s) { (void)e; if (s) *s = "no CUDA driver (fake libcuda)"; return 0; }
int cuDeviceGetCount(int *n) { if (n) *n = 0; return NOT_INIT; }
#define STUB(name) int name() __attribute__((alias("not_init")));
STUB(cuMemHostAlloc) STUB(cuMemFreeHost) STUB(cuMemHostRegister) STUB(cuMemHostRegister_v2)
STUB(cuMemHostUnregister) STUB(cuMemcpyHtoDAsync) STUB(cuMemcpyHtoDAsync_v2) STUB(cuMemcpyDtoHAsync)
STUB(cuMemcpyDtoHAsync_v2) STUB(cuMemcpyAsync) STUB(cuPointerGetAttribute) STUB(cuPointerGetAttributes)
STUB(cuCtxCreate) STUB(cuCtxCreate_v2) STUB(cuCtxCreate_v3) STUB(cuCtxCreate_v4) STUB(cuCtxDestroy)
STUB(cuCtxDestroy_v2) STUB(cuCtxPushCurrent) STUB(cuCtxPushCurrent_v2) STUB(cuCtxPopCurrent)
STUB(cuCtxPopCurrent_v2) STUB(cuCtxGetCurrent) STUB(cuCtxGetDevice) STUB(cuMemGetAddressRange)
STUB(cuMemGetAddressRange_v2) STUB(cuDeviceGet) STUB(cuDeviceGetAttribute) STUB(cuDevicePrimaryCtxRetain)
STUB(cuDevicePrimaryCtxRelease) STUB(cuDevicePrimaryCtxRelease_v2) STUB(cuStreamSynchronize)
STUB(cuStreamCreate) STUB(cuStreamDestroy) STUB(cuStreamDestroy_v2) STUB(cuEventSynchronize)
STUB(cuEventCreate) STUB(cuEventDestroy) STUB(cuEventDestroy_v2) STUB(cuEventRecord) STUB(cuEventQuery)
STUB(cuLaunchHostFunc) STUB(cuMemcpyBatchAsync) STUB(cuMemcpyBatchAsync_v2)
