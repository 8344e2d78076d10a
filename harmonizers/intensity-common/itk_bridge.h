// concord::Image channels <-> itk::Image, by copy. Geometry: spacing and origin are carried over,
// the direction is left at identity (the intensity filters here work in the image's own frame).
#pragma once

#include <concord/error.h>
#include <concord/image.h>

#include <itkImage.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace concord::intensity {

template <unsigned D>
using FloatImage = itk::Image<float, D>;
template <unsigned D>
using MaskImage = itk::Image<unsigned char, D>;

template <class TImage>
typename TImage::Pointer allocate_like(const Image& im) {
  constexpr unsigned D = TImage::ImageDimension;
  typename TImage::SizeType size;
  typename TImage::SpacingType spacing;
  typename TImage::PointType origin;
  for (unsigned d = 0; d < D; ++d) {
    size[d] = static_cast<itk::SizeValueType>(im.size[d]);
    spacing[d] = im.geometry.spacing[d] > 0 ? im.geometry.spacing[d] : 1.0;
    origin[d] = im.geometry.origin[d];
  }
  auto out = TImage::New();
  out->SetRegions(typename TImage::RegionType(size));
  out->SetSpacing(spacing);
  out->SetOrigin(origin);
  out->Allocate();
  return out;
}

// Copies channel `c` of `im` (x fastest, as ITK stores it) into a new itk::Image.
template <unsigned D>
typename FloatImage<D>::Pointer channel_to_itk(const Image& im, int c) {
  if (static_cast<int>(D) != im.dim) throw Error("channel_to_itk: image dimension mismatch");
  auto out = allocate_like<FloatImage<D>>(im);
  const float* src = im.channel(c);
  std::copy(src, src + im.voxels(), out->GetBufferPointer());
  return out;
}

template <unsigned D>
typename MaskImage<D>::Pointer mask_to_itk(const std::vector<uint8_t>& mask, const Image& im) {
  auto out = allocate_like<MaskImage<D>>(im);
  std::copy(mask.begin(), mask.end(), out->GetBufferPointer());
  return out;
}

// Copies an itk::Image of the same size back into channel `c` of `im`.
template <class TImage>
void itk_to_channel(const TImage* src, Image& im, int c) {
  const auto n = static_cast<int64_t>(src->GetBufferedRegion().GetNumberOfPixels());
  if (n != im.voxels()) throw Error("itk_to_channel: size mismatch");
  const auto* p = src->GetBufferPointer();
  float* dst = im.channel(c);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);
}

}  // namespace concord::intensity
