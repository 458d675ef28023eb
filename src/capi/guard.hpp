// The one place where C++ exceptions become C status codes.
#pragma once
#include <new>
#include <string>
#include "qforge/error.hpp"
#include "qforge/qforge.h"

namespace qforge::capi {

void set_last_error(std::string message);

// Runs f(); returns QF_OK, or the status matching the exception it threw.
template <class F>
int guard(F&& f) noexcept {
  try {
    f();
    set_last_error({});
    return QF_OK;
  } catch (const InvalidArgument& e) {
    set_last_error(e.what());
    return QF_ERR_INVALID_ARGUMENT;
  } catch (const std::bad_alloc&) {
    set_last_error("out of host memory");
    return QF_ERR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    set_last_error(e.what());
    return QF_ERR_RUNTIME;
  } catch (...) {
    set_last_error("unknown C++ exception");
    return QF_ERR_RUNTIME;
  }
}

}  // namespace qforge::capi
