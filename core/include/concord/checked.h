// Overflow-checked size arithmetic, for every size that comes from bytes (a file, a message, a
// peer) or from a declared shape. Each function throws concord::Error naming `what` (an array, a
// file, a header field) instead of wrapping around, so a hostile shape such as [2^62 + 16] can
// never turn into a small allocation that is then read or written past its end.
#pragma once

#include <concord/array.h>
#include <concord/error.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

namespace concord {

// a * b and a + b computed exactly, returned in the type of `a`. `b` may be another integer type:
// a negative `b` with an unsigned `a`, or any result that does not fit, is an overflow.
template <class T, class U>
T checked_mul(T a, U b, const std::string& what) {
  static_assert(std::is_integral_v<T> && std::is_integral_v<U>, "checked_mul takes integers");
  T r;
  if (__builtin_mul_overflow(a, b, &r))
    throw Error(what + ": size overflows (" + std::to_string(a) + " x " + std::to_string(b) + ")");
  return r;
}
template <class T, class U>
T checked_add(T a, U b, const std::string& what) {
  static_assert(std::is_integral_v<T> && std::is_integral_v<U>, "checked_add takes integers");
  T r;
  if (__builtin_add_overflow(a, b, &r))
    throw Error(what + ": size overflows (" + std::to_string(a) + " + " + std::to_string(b) + ")");
  return r;
}

// "[2, 3, 4]"
inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// The number of elements of `shape`; a negative dimension or a product above INT64_MAX throws.
inline int64_t checked_numel(const std::vector<int64_t>& shape, const std::string& what) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) throw Error(what + ": negative dimension in shape " + shape_str(shape));
    if (__builtin_mul_overflow(n, d, &n))
      throw Error(what + ": shape " + shape_str(shape) + " has too many elements (overflows)");
  }
  return n;
}

// The byte size of an array of `dtype` and `shape`, checked as checked_numel.
inline size_t checked_nbytes(DType dtype, const std::vector<int64_t>& shape,
                             const std::string& what) {
  size_t n;
  if (__builtin_mul_overflow(size_t(checked_numel(shape, what)), dtype_size(dtype), &n))
    throw Error(what + ": shape " + shape_str(shape) + " of " + dtype_name(dtype) +
                " is too large (byte size overflows)");
  return n;
}

// A size ceiling in bytes from environment variable `var`, given in MiB (default `default_mb`
// when unset). A value that is not a positive whole number is an error naming the variable.
inline size_t size_limit_from_env(const char* var, size_t default_mb) {
  const char* v = std::getenv(var);
  if (!v || !*v) return checked_mul(default_mb, size_t(1) << 20, var);
  errno = 0;
  char* end = nullptr;
  unsigned long long mb = std::strtoull(v, &end, 10);
  if (errno || *end || mb == 0 || *v == '-')
    throw Error(std::string(var) + "=" + v + ": expected a positive whole number of MiB");
  return checked_mul(size_t(mb), size_t(1) << 20, std::string(var) + "=" + v);
}

}  // namespace concord
