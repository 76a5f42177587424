# Where the onnxruntime C/C++ headers come from (the onnxruntime wheel ships none). Sets
# ONNXQ_ORT_INCLUDE_DIR to a directory holding onnxruntime_c_api.h, onnxruntime_cxx_api.h and
# onnxruntime_lite_custom_op.h:
#   - given:   -DONNXQ_ORT_INCLUDE_DIR=/path (pip: -Ccmake.define.ONNXQ_ORT_INCLUDE_DIR=/path),
#              or the environment variable ONNXQ_ORT_INCLUDE_DIR;
#   - fetched: otherwise cmake/fetch_ort_headers.sh downloads Debian's libonnxruntime-dev once
#              into the build tree (kept there, so later builds in the same tree reuse it).
# The library asks onnxruntime for the headers' API version at load time, so the headers must
# not be newer than the oldest onnxruntime it should load in (1.21's headers load in >= 1.21).

set(ONNXQ_ORT_INCLUDE_DIR "$ENV{ONNXQ_ORT_INCLUDE_DIR}" CACHE PATH
    "Directory with onnxruntime's C/C++ headers (empty: fetch Debian's libonnxruntime-dev)")
set(_ort_headers onnxruntime_c_api.h onnxruntime_cxx_api.h onnxruntime_lite_custom_op.h)
list(JOIN _ort_headers ", " _ort_header_names)
set(_ort_fix "Either install onnxruntime's headers (an onnxruntime release archive's include/ \
directory, or Debian/Ubuntu's libonnxruntime-dev: /usr/include/onnxruntime) and pass their \
directory: `pip install . -Ccmake.define.ONNXQ_ORT_INCLUDE_DIR=/path/to/include` or \
`ONNXQ_ORT_INCLUDE_DIR=/path/to/include pip install .`; or make Debian's archive reachable \
through apt and build again.")

if(ONNXQ_ORT_INCLUDE_DIR)
  set(_ort_include "${ONNXQ_ORT_INCLUDE_DIR}")
  message(STATUS "onnxq: using onnxruntime headers from ${_ort_include} (ONNXQ_ORT_INCLUDE_DIR)")
else()
  set(_ort_fetched "${CMAKE_BINARY_DIR}/ort-headers")
  set(_ort_include "${_ort_fetched}/root/usr/include/onnxruntime")
  if(EXISTS "${_ort_include}/onnxruntime_lite_custom_op.h")
    message(STATUS "onnxq: using onnxruntime headers fetched earlier into ${_ort_include}")
  else()
    execute_process(COMMAND bash "${CMAKE_CURRENT_LIST_DIR}/fetch_ort_headers.sh" "${_ort_fetched}"
                    RESULT_VARIABLE _ort_failed)
    if(_ort_failed)
      message(FATAL_ERROR "onnxq: could not fetch onnxruntime's C/C++ headers (Debian trixie's \
libonnxruntime-dev through this machine's apt sources; the messages above say why). ${_ort_fix}")
    endif()
  endif()
endif()

foreach(_header IN LISTS _ort_headers)
  if(NOT EXISTS "${_ort_include}/${_header}")
    message(FATAL_ERROR "onnxq: ${_header} is not in ${_ort_include}; onnxq needs \
${_ort_header_names} from onnxruntime >= 1.16. ${_ort_fix}")
  endif()
endforeach()
set(ONNXQ_ORT_INCLUDE_DIR "${_ort_include}")
