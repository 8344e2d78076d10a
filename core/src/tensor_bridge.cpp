#include <concord/checked.h>
#include <concord/error.h>
#include <concord/image.h>
#include <concord/tensor_bridge.h>

#include <torch/types.h>

namespace concord {

namespace {
DType dtype_from(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::F32;
    case at::kDouble:
      return DType::F64;
    case at::kLong:
      return DType::I64;
    case at::kInt:
      return DType::I32;
    case at::kByte:
      return DType::U8;
    default:
      throw Error(std::string("unsupported tensor dtype ") + c10::toString(t));
  }
}
at::ScalarType scalar_from(DType t) {
  switch (t) {
    case DType::F32:
      return at::kFloat;
    case DType::F64:
      return at::kDouble;
    case DType::I64:
      return at::kLong;
    case DType::I32:
      return at::kInt;
    case DType::U8:
      return at::kByte;
  }
  return at::kFloat;
}
}  // namespace

Array to_array(const at::Tensor& t) {
  at::Tensor c = t.detach().contiguous();
  auto holder = std::make_shared<at::Tensor>(c);
  std::vector<int64_t> shape(c.sizes().begin(), c.sizes().end());
  return Array::view(dtype_from(c.scalar_type()), shape, c.data_ptr(),
                     std::shared_ptr<const void>(holder, holder.get()));
}

at::Tensor to_tensor(const Array& a) {
  auto keep = std::make_shared<Array>(a);
  return torch::from_blob(
      const_cast<void*>(a.raw()), a.shape(), [keep](void*) mutable { keep.reset(); },
      torch::TensorOptions().dtype(scalar_from(a.dtype())));
}

std::vector<int64_t> image_tensor_shape(const Image& image) {
  std::vector<int64_t> shape = {image.channels};
  if (image.dim == 3) shape.push_back(image.size[2]);
  shape.push_back(image.size[1]);
  shape.push_back(image.size[0]);
  // Readers of the image take numel(shape) floats: the declared size must match what it holds.
  if (size_t(checked_numel(shape, "image")) != image.data.size())
    throw Error("image of shape " + shape_str(shape) + " holds " +
                std::to_string(image.data.size()) + " values");
  return shape;
}

at::Tensor image_to_tensor(const Image& image) {
  return torch::from_blob(const_cast<float*>(image.data.data()), image_tensor_shape(image),
                          torch::kFloat)
      .clone();
}

}  // namespace concord
