// Zero-copy conversion between concord::Array and at::Tensor.
#pragma once

#include <concord/array.h>

#include <ATen/core/Tensor.h>

namespace concord {

// The Array keeps the tensor's storage alive; contiguous tensors are not copied.
Array to_array(const at::Tensor& t);
// The tensor aliases the Array's memory (and keeps it alive).
at::Tensor to_tensor(const Array& a);
// Image (planar) to a [C, H, W] float tensor; 3D images give [C, D, H, W].
struct Image;
at::Tensor image_to_tensor(const Image& image);
// The shape image_to_tensor gives `image`; throws Error when the image does not hold that many
// values.
std::vector<int64_t> image_tensor_shape(const Image& image);

}  // namespace concord
