#include <concord/array.h>
#include <concord/checked.h>
#include <concord/error.h>

#include <cstdlib>
#include <cstring>

namespace concord {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32:
      return 4;
    case DType::F64:
      return 8;
    case DType::I64:
      return 8;
    case DType::I32:
      return 4;
    case DType::U8:
      return 1;
  }
  throw Error("unknown dtype");
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "float32";
    case DType::F64:
      return "float64";
    case DType::I64:
      return "int64";
    case DType::I32:
      return "int32";
    case DType::U8:
      return "uint8";
  }
  return "?";
}

// Large blocks come from the message buffer pool (message.cpp): model-sized arrays are made
// every round and reusing mapped pages avoids page-faulting each one in.
uint8_t* pooled_alloc(size_t bytes);
void pooled_free(uint8_t* p, size_t bytes);

namespace {
std::shared_ptr<void> allocate(size_t bytes) {
  // 64-byte alignment: SIMD-friendly and safe for every dtype; never a null pointer.
  size_t rounded = bytes == 0 ? 64 : (checked_add(bytes, 63, "array") / 64) * 64;
  void* p = pooled_alloc(rounded);
  if (!p) throw Error("out of memory allocating " + std::to_string(bytes) + " bytes");
  return std::shared_ptr<void>(
      p, [rounded](void* q) { pooled_free(static_cast<uint8_t*>(q), rounded); });
}
}  // namespace

void Array::set_shape(DType dtype, std::vector<int64_t> shape) {
  checked_nbytes(dtype, shape, "array");  // also refuses a dtype outside the enum
  dtype_ = dtype;
  numel_ = checked_numel(shape, "array");
  shape_ = std::move(shape);
}

void check_element_count(const Array& a, size_t count) {
  if (size_t(a.numel()) != count)
    throw Error("array of shape " + shape_str(a.shape()) + " holds " + std::to_string(a.numel()) +
                " elements, given " + std::to_string(count) + " values");
}

Array Array::uninitialized(DType dtype, std::vector<int64_t> shape) {
  Array a;
  a.set_shape(dtype, std::move(shape));
  auto mem = allocate(a.nbytes());
  a.data_ = mem.get();
  a.owner_ = std::move(mem);
  return a;
}

Array::Array(DType dtype, std::vector<int64_t> shape) {
  *this = uninitialized(dtype, std::move(shape));
  std::memset(data_, 0, nbytes());
}

Array Array::view(DType dtype, std::vector<int64_t> shape, void* data,
                  std::shared_ptr<const void> owner) {
  Array a;
  a.set_shape(dtype, std::move(shape));
  a.data_ = data;
  a.owner_ = std::move(owner);
  return a;
}

Array Array::clone() const {
  Array a = uninitialized(dtype_, shape_);
  if (nbytes()) std::memcpy(a.data_, data_, nbytes());
  return a;
}

Array Array::to_f32() const {
  if (dtype_ == DType::F32) return clone();
  Array a = uninitialized(DType::F32, shape_);
  float* out = a.data<float>();
  const int64_t n = numel();
  visit_dtype(dtype_, [&](auto tag) {
    const auto* in = static_cast<const decltype(tag)*>(data_);
    for (int64_t i = 0; i < n; ++i) out[i] = float(in[i]);
  });
  return a;
}

void Array::check(DType wanted) const {
  if (wanted != dtype_)
    throw Error(std::string("array holds ") + dtype_name(dtype_) + ", accessed as " +
                dtype_name(wanted));
}

}  // namespace concord
