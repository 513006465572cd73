# TANDEM_SANITIZE: "" (none), "address;undefined" (AddressSanitizer + UBSan) or "thread"
# (ThreadSanitizer). The core and the C++ tests are instrumented; torch is not, so the
# sanitizers see tandem's code, and torch's only where it calls into intercepted functions
# (malloc, pthread, memcpy): see tests/cpp/tsan.supp for what that costs under TSan.

set(TANDEM_SANITIZE "" CACHE STRING "sanitizers for the core and the C++ tests: address;undefined, or thread")
set(TANDEM_SANITIZER_FLAGS "")
set(TANDEM_SANITIZER_FLAGS_STRING "")  # the same as one string (for a nested build)
set(TANDEM_SANITIZER_LINK_STRING "")
if(TANDEM_SANITIZE)
  if("thread" IN_LIST TANDEM_SANITIZE AND "address" IN_LIST TANDEM_SANITIZE)
    message(FATAL_ERROR "tandem: TANDEM_SANITIZE: thread and address cannot be combined")
  endif()
  foreach(_s IN LISTS TANDEM_SANITIZE)
    if(NOT _s MATCHES "^(address|undefined|thread)$")
      message(FATAL_ERROR "tandem: TANDEM_SANITIZE: unknown sanitizer \"${_s}\" (address, undefined, thread)")
    endif()
  endforeach()
  if(TANDEM_CUDA)
    message(FATAL_ERROR "tandem: sanitizer builds are of the CPU-only core: configure with -DTANDEM_FORCE_CPU=ON")
  endif()
  list(JOIN TANDEM_SANITIZE "," _list)
  # -O1 after the plan's -O3: readable stacks at a bearable speed
  set(TANDEM_SANITIZER_FLAGS -fsanitize=${_list} -fno-omit-frame-pointer -g -O1)
  if("undefined" IN_LIST TANDEM_SANITIZE)
    list(APPEND TANDEM_SANITIZER_FLAGS -fno-sanitize-recover=undefined)
  endif()
  add_link_options(-fsanitize=${_list})
  list(JOIN TANDEM_SANITIZER_FLAGS " " TANDEM_SANITIZER_FLAGS_STRING)
  set(TANDEM_SANITIZER_LINK_STRING "-fsanitize=${_list}")
  message(STATUS "tandem: sanitizers: ${_list}")
endif()

# The plan's C++ flags for target's C++ sources, then the sanitizer's (which win: -O1).
function(tandem_compile_flags target)
  target_compile_options(${target} PRIVATE
    "$<$<COMPILE_LANGUAGE:CXX>:${TANDEM_CXX_FLAGS};${TANDEM_SANITIZER_FLAGS}>")
endfunction()
