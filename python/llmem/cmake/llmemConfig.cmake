# find_package(llmem CONFIG) for C and C++ code that uses llmem's C API (docs/capi.md).
#
#   cmake -Dllmem_DIR="$(python -c 'import llmem; print(llmem.get_cmake_dir())')" ...
#   find_package(llmem CONFIG REQUIRED)
#   target_link_libraries(my_ext PRIVATE llmem::capi)
#
# llmem::capi carries the include directory of <llmem/llmem_capi.h> only: the functions are
# reached at run time through the capsule llmem._core._C_API (llmem_capi_import() with Python.h),
# so nothing is linked and a consumer works with any llmem whose C API version is at least its own.

get_filename_component(_llmem_pkg "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)
if(EXISTS "${_llmem_pkg}/include/llmem/llmem_capi.h")
  set(llmem_INCLUDE_DIR "${_llmem_pkg}/include")
elseif(EXISTS "${_llmem_pkg}/../../csrc/include/llmem/llmem_capi.h")
  # an editable install: the package directory is the source tree's python/llmem
  get_filename_component(llmem_INCLUDE_DIR "${_llmem_pkg}/../../csrc/include" ABSOLUTE)
else()
  set(llmem_FOUND FALSE)
  set(llmem_NOT_FOUND_MESSAGE "llmem_capi.h is not installed under ${_llmem_pkg}")
  return()
endif()

file(STRINGS "${llmem_INCLUDE_DIR}/llmem/llmem_capi.h" _llmem_capi_line REGEX "^#define LLMEM_CAPI_VERSION ")
string(REGEX REPLACE "^#define LLMEM_CAPI_VERSION ([0-9]+).*" "\\1" llmem_CAPI_VERSION "${_llmem_capi_line}")

if(NOT TARGET llmem::capi)
  add_library(llmem::capi INTERFACE IMPORTED)
  set_target_properties(llmem::capi PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${llmem_INCLUDE_DIR}")
endif()
set(llmem_INCLUDE_DIRS "${llmem_INCLUDE_DIR}")
unset(_llmem_pkg)
unset(_llmem_capi_line)
