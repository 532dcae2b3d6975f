// Shared declarations of the pysteer._C extension.
//
// The extension takes raw device pointers (as Python ints), sizes, strides and the CUDA stream
// handle from Python, so it needs no torch headers and builds against any torch wheel.
#pragma once

#include <cstdint>
#include <pybind11/pybind11.h>

namespace pysteer {

// Each op family registers its functions into the module.
void register_affine(pybind11::module_& m);

}  // namespace pysteer

// Optional families: defined (strong) in their own .cu file when present.
void pysteer_register_sae(pybind11::module_& m) __attribute__((weak));
void pysteer_register_affine_linear(pybind11::module_& m) __attribute__((weak));
void pysteer_register_lowrank(pybind11::module_& m) __attribute__((weak));
