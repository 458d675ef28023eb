// C ABI entries shared by every capability: version, errors, build features.
#include <string>
#include "guard.hpp"
#include "qforge/cuda_runtime.hpp"

namespace qforge::capi {
thread_local std::string last_error;
void set_last_error(std::string message) { last_error = std::move(message); }
}  // namespace qforge::capi

extern "C" {

const char* qf_version(void) { return QFORGE_VERSION; }

const char* qf_last_error(void) { return qforge::capi::last_error.c_str(); }

int qf_built_with_cuda(void) { return qforge::cuda::built_with_cuda() ? 1 : 0; }

int qf_cuda_device_count(void) { return qforge::cuda::device_count(); }

}
