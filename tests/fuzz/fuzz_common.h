// Shared by the libFuzzer targets (tests/fuzz/targets): a scratch file per process for readers
// that take a path, and the verdict on exceptions.
#pragma once

#include <concord/array.h>
#include <concord/error.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <new>
#include <string>

namespace concord::fuzz {

// Writes the input to <scratch>/concord-fuzz-PID/input<ext> and returns its path; scratch is
// CONCORD_FUZZ_SCRATCH (scripts/fuzz removes it afterwards), else /dev/shm.
inline std::string write_input(const uint8_t* data, size_t size, const std::string& ext) {
  static const std::string dir = [] {
    const char* scratch = std::getenv("CONCORD_FUZZ_SCRATCH");  // set by scripts/fuzz
    std::filesystem::path base = scratch ? scratch
                                 : std::filesystem::exists("/dev/shm")
                                     ? "/dev/shm"
                                     : std::filesystem::temp_directory_path();
    std::filesystem::path d = base / ("concord-fuzz-" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d.string();
  }();
  std::string file = dir + "/input" + ext;
  std::ofstream(file, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(data), std::streamsize(size));
  return file;
}

// An accepted array must really be as large as its shape says: a shape whose element or byte
// count overflows (the bytes then "fit" in a tiny buffer) is a finding even when no read
// goes out of bounds.
inline void check_shape(const std::string& name, const Array& a) {
  uint64_t n = 1;
  for (int64_t d : a.shape())
    if (d < 0 || __builtin_mul_overflow(n, uint64_t(d), &n)) {
      std::fprintf(stderr, "concord-fuzz: array '%s' accepted with an overflowing shape\n",
                   name.c_str());
      std::abort();
    }
  if (__builtin_mul_overflow(n, uint64_t(dtype_size(a.dtype())), &n)) {
    std::fprintf(stderr, "concord-fuzz: array '%s' accepted with an overflowing byte count\n",
                 name.c_str());
    std::abort();
  }
}

// A reader may refuse any input with concord::Error: that is the contract. Running out of memory
// (an allocation sized from what the file claims) is a finding: abort so libFuzzer saves the
// input. Other exceptions (a library's own, std::out_of_range, ...) escape without naming the
// file; they are findings too with CONCORD_FUZZ_STRICT=1.
// CONCORD_FUZZ_PRINT=1 (replaying one file) prints the verdict: "accepted" or the error's text.
inline void run(const std::function<void()>& f) {
  static const bool print = [] {
    const char* v = std::getenv("CONCORD_FUZZ_PRINT");
    return v && std::string(v) == "1";
  }();
  try {
    f();
    if (print) std::fprintf(stderr, "concord-fuzz: accepted\n");
  } catch (const Error& e) {
    if (print) std::fprintf(stderr, "concord-fuzz: concord::Error: %s\n", e.what());
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "concord-fuzz: std::bad_alloc (allocation sized from the input)\n");
    std::abort();
  } catch (const std::exception& e) {
    if (print) std::fprintf(stderr, "concord-fuzz: other exception: %s\n", e.what());
    static const bool strict = [] {
      const char* v = std::getenv("CONCORD_FUZZ_STRICT");
      return v && std::string(v) == "1";
    }();
    if (strict) {
      std::fprintf(stderr, "concord-fuzz: exception that is not a concord::Error: %s\n", e.what());
      std::abort();
    }
  }
}

}  // namespace concord::fuzz
