// pysteer._C: CUDA kernels bound with pybind11 (see pysteer.h).
#include "pysteer.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "pysteer CUDA kernels (raw-pointer interface; see pysteer/ops/cuda_*.py)";
  pysteer::register_affine(m);
  if (pysteer_register_sae) pysteer_register_sae(m);
  if (pysteer_register_affine_linear) pysteer_register_affine_linear(m);
  if (pysteer_register_lowrank) pysteer_register_lowrank(m);
}
