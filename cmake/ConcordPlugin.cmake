# concord_add_plugin(NAME SOURCES ... [LIBS ...])
#   Builds a Concord plugin shared library. Used by built-in plugins and, through the installed
#   CMake package, by out-of-tree plugins alike.
function(concord_add_plugin name)
  cmake_parse_arguments(P "" "" "SOURCES;LIBS" ${ARGN})
  add_library(${name} MODULE ${P_SOURCES})
  set_target_properties(${name} PROPERTIES PREFIX "lib" CXX_VISIBILITY_PRESET hidden
                                           VISIBILITY_INLINES_HIDDEN ON)
  if(TARGET concord)  # in-tree build
    target_link_libraries(${name} PRIVATE concord ${P_LIBS})
    set_target_properties(${name} PROPERTIES
      LIBRARY_OUTPUT_DIRECTORY ${CONCORD_PLUGIN_OUTPUT_DIR} INSTALL_RPATH "$ORIGIN/../..")
    concord_safe_rpath(${name})
    install(TARGETS ${name} LIBRARY DESTINATION ${CONCORD_PLUGIN_SUBDIR})
    set_property(GLOBAL APPEND PROPERTY CONCORD_PLUGIN_TARGETS ${name})
  else()  # out of tree, against an installed Concord
    target_link_libraries(${name} PRIVATE Concord::sdk ${P_LIBS})
    # Loaded into a process that already has libconcord; other libraries by absolute path.
    set_target_properties(${name} PROPERTIES INSTALL_RPATH_USE_LINK_PATH ON)
    concord_safe_rpath(${name})
  endif()
endfunction()

# concord_safe_rpath(TARGET): the target carries its install RPATH (absolute or $ORIGIN-relative
# entries only) in the build tree too, which mirrors the install tree (bin/, lib/,
# lib/concord/plugins/). Otherwise CMake links a build RPATH it rewrites at install and pads it
# with a trailing ':' (an empty entry: ld.so reads it as the current folder, so a libfmt.so.9 in
# the folder where someone runs `concord` would run its constructors). tests/elf checks this.
function(concord_safe_rpath target)
  set_target_properties(${target} PROPERTIES BUILD_WITH_INSTALL_RPATH ON)
endfunction()

# concord_add_test(NAME SOURCES ... [LIBS ...] [PLUGINS target...] [NEEDS_CLI] [TIMEOUT s]):
#   one gtest executable = one ctest entry (each process start costs ~0.5 s with LibTorch, so
#   cases are grouped per executable). PLUGINS: plugin targets the test loads (built first).
function(concord_add_test name)
  cmake_parse_arguments(T "NEEDS_CLI" "TIMEOUT" "SOURCES;LIBS;PLUGINS" ${ARGN})
  add_executable(${name} ${T_SOURCES})
  target_link_libraries(${name} PRIVATE concord concord_testing ${T_LIBS})
  add_test(NAME ${name} COMMAND ${name} --gtest_color=no
           WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 600)
  endif()
  set_tests_properties(${name} PROPERTIES TIMEOUT ${T_TIMEOUT}
    ENVIRONMENT "CONCORD_SHARED_DATA=${CONCORD_SHARED_DATA};CONCORD_SOURCE_DIR=${CMAKE_SOURCE_DIR};CONCORD_BUILD_DIR=${CMAKE_BINARY_DIR};OMP_NUM_THREADS=2;OMP_WAIT_POLICY=passive")
  if(T_PLUGINS)
    add_dependencies(${name} ${T_PLUGINS})
  endif()
  if(T_NEEDS_CLI)
    add_dependencies(${name} concord-cli)
  endif()
endfunction()

# Called once at the end of the top-level CMakeLists: `concord-plugins` builds every plugin.
function(concord_finish_plugins)
  get_property(plugins GLOBAL PROPERTY CONCORD_PLUGIN_TARGETS)
  add_custom_target(concord-plugins ALL DEPENDS ${plugins})
endfunction()
