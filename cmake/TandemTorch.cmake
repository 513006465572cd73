# find_package(Torch) for the torch that buildtools/plan.py imported
# (torch.utils.cmake_prefix_path), with the hints its config needs.
#
# A CUDA build of torch looks for the CUDA toolkit in its CMake config even for CPU code:
# the toolkit that the plan found is handed over (CUDA_TOOLKIT_ROOT_DIR), as are the arch
# list (TORCH_CUDA_ARCH_LIST) and the NVRTC of the nvidia wheels, which the toolkit of a
# runtime-only installation lacks.
#
# Out: TANDEM_TORCH_TARGETS (and TANDEM_TORCH_INCLUDES), what the core links: torch's CPU libraries for the CPU-only
# core, all of torch (CUDA included) for the CUDA core.

list(PREPEND CMAKE_PREFIX_PATH "${TANDEM_TORCH_CMAKE_PREFIX}")
if(TANDEM_CUDA_HOME AND NOT CUDA_TOOLKIT_ROOT_DIR)
  set(CUDA_TOOLKIT_ROOT_DIR "${TANDEM_CUDA_HOME}")
endif()
if(TANDEM_CUDA AND NOT TORCH_CUDA_ARCH_LIST)
  set(TORCH_CUDA_ARCH_LIST "${TANDEM_CUDA_ARCHS}")
endif()
foreach(_dir IN LISTS TANDEM_LINK_DIRS)
  file(GLOB _nvrtc "${_dir}/libnvrtc.so.*[0-9]")
  list(FILTER _nvrtc EXCLUDE REGEX "builtins")
  if(_nvrtc AND NOT CUDA_nvrtc_LIBRARY)
    list(GET _nvrtc 0 _nvrtc)
    set(CUDA_nvrtc_LIBRARY "${_nvrtc}" CACHE FILEPATH "NVRTC (from the nvidia wheels)")
  endif()
endforeach()

find_package(Torch REQUIRED CONFIG)
if(NOT TARGET torch_cpu_library)
  message(FATAL_ERROR "tandem: torch's CMake config did not define torch_cpu_library")
endif()

if(TANDEM_CUDA)
  set(TANDEM_TORCH_TARGETS torch)
else()
  # torch_cpu_library lacks the C++ API's include directory (torch/autograd.h), which the
  # umbrella target carries: borrowed as an expression, so that the installed package
  # evaluates it against the consumer's torch.
  set(TANDEM_TORCH_TARGETS torch_cpu_library c10)
  set(TANDEM_TORCH_INCLUDES "$<TARGET_PROPERTY:torch,INTERFACE_INCLUDE_DIRECTORIES>")
endif()
