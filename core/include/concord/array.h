// Array: a typed, shaped block of numbers, the unit that crosses the Channel.
//
// Torch-free on purpose: harmonizers, aggregators and the wire format use it without pulling in
// LibTorch headers. tensor_bridge.h converts to and from at::Tensor without copying.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace concord {

enum class DType : uint8_t { F32 = 0, F64 = 1, I64 = 2, I32 = 3, U8 = 4 };
size_t dtype_size(DType t);
const char* dtype_name(DType t);

template <class T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() {
  return DType::F32;
}
template <>
constexpr DType dtype_of<double>() {
  return DType::F64;
}
template <>
constexpr DType dtype_of<int64_t>() {
  return DType::I64;
}
template <>
constexpr DType dtype_of<int32_t>() {
  return DType::I32;
}
template <>
constexpr DType dtype_of<uint8_t>() {
  return DType::U8;
}

// Calls f(T{}) with T the C++ type of `t` (the inverse of dtype_of).
template <class F>
void visit_dtype(DType t, F&& f) {
  switch (t) {
    case DType::F32:
      return f(float{});
    case DType::F64:
      return f(double{});
    case DType::I64:
      return f(int64_t{});
    case DType::I32:
      return f(int32_t{});
    case DType::U8:
      return f(uint8_t{});
  }
}

// Every constructor checks its shape (no negative dimension, element and byte counts that fit
// without overflow; concord/checked.h) and throws Error otherwise, so numel() and nbytes() of an
// existing Array are always exact.
class Array {
 public:
  Array() = default;
  // Allocates zero-filled, 64-byte aligned storage.
  Array(DType dtype, std::vector<int64_t> shape);
  // A view of memory owned by `owner` (kept alive as long as the Array): no copy. The caller
  // guarantees `data` holds nbytes() bytes.
  static Array view(DType dtype, std::vector<int64_t> shape, void* data,
                    std::shared_ptr<const void> owner);
  // Allocates without zero-filling (for buffers about to be overwritten).
  static Array uninitialized(DType dtype, std::vector<int64_t> shape);
  template <class T>
  static Array from(const std::vector<T>& values, std::vector<int64_t> shape = {});

  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t numel() const { return numel_; }
  size_t nbytes() const { return static_cast<size_t>(numel_) * dtype_size(dtype_); }
  bool empty() const { return data_ == nullptr; }
  void* raw() { return data_; }
  const void* raw() const { return data_; }
  template <class T>
  T* data();
  template <class T>
  const T* data() const;
  template <class T>
  std::vector<T> to_vector() const {
    const T* p = data<T>();
    return std::vector<T>(p, p + numel());
  }
  Array clone() const;  // deep copy into fresh storage
  // The same numbers as float32 (copy; dtype F32 is returned as a clone).
  Array to_f32() const;

 private:
  DType dtype_ = DType::F32;
  std::vector<int64_t> shape_;
  int64_t numel_ = 1;  // of shape_, checked when the Array is made
  std::shared_ptr<const void> owner_;
  void* data_ = nullptr;
  void check(DType wanted) const;
  void set_shape(DType dtype, std::vector<int64_t> shape);
};

// Throws Error unless `a` holds exactly `count` elements (Array::from with a mismatched shape).
void check_element_count(const Array& a, size_t count);

// Named arrays in a stable (sorted) order: model state, statistics, message payloads.
using NamedArrays = std::map<std::string, Array>;

template <class T>
T* Array::data() {
  check(dtype_of<T>());
  return static_cast<T*>(data_);
}
template <class T>
const T* Array::data() const {
  check(dtype_of<T>());
  return static_cast<const T*>(data_);
}
template <class T>
Array Array::from(const std::vector<T>& values, std::vector<int64_t> shape) {
  if (shape.empty()) shape = {static_cast<int64_t>(values.size())};
  Array a = uninitialized(dtype_of<T>(), std::move(shape));
  check_element_count(a, values.size());
  std::copy(values.begin(), values.end(), a.data<T>());
  return a;
}

}  // namespace concord
