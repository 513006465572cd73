# Reads the build description that setup.py uses too (buildtools/plan.py): sources, include
# directories, defines, compile flags, CUDA toolkit and archs, cuBLASLt and NCCL.
#
# In:  Python3_EXECUTABLE (a Python that imports torch), TANDEM_FORCE_CPU.
# Out: the TANDEM_* variables that buildtools/plan.py writes (see write_cmake there).

set(_plan_file "${CMAKE_BINARY_DIR}/tandem_plan.cmake")
if(TANDEM_FORCE_CPU)
  set(_plan_env TANDEM_FORCE_CPU=1)
else()
  set(_plan_env TANDEM_FORCE_CPU=0)
endif()
execute_process(
  COMMAND "${CMAKE_COMMAND}" -E env ${_plan_env}
          "${Python3_EXECUTABLE}" "${PROJECT_SOURCE_DIR}/buildtools/plan.py" --cmake "${_plan_file}"
  RESULT_VARIABLE _plan_rc
  ERROR_VARIABLE _plan_err)
if(NOT _plan_rc EQUAL 0)
  message(FATAL_ERROR "tandem: buildtools/plan.py failed with ${Python3_EXECUTABLE} "
                      "(a Python with torch is needed: pass -DPython3_EXECUTABLE=...):\n${_plan_err}")
endif()
include("${_plan_file}")
message(STATUS "tandem: ${TANDEM_PLAN_REASON}")

# Sources are found by rule (csrc/**/*.cpp, *.cu): configure again when a file is added to
# or removed from a source directory, and when the rules change.
set_property(DIRECTORY "${PROJECT_SOURCE_DIR}" APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS
             ${TANDEM_SOURCE_DIRS} "${PROJECT_SOURCE_DIR}/buildtools/plan.py"
             "${PROJECT_SOURCE_DIR}/buildtools/locate.py")
