// Image reading and writing: OpenCV for PNG/JPEG/BMP/TIFF, ITK for NIfTI/NRRD/MetaImage and
// DICOM series. ITK formats go through itk::ImageIOBase directly so that any dimension (2 or 3),
// component type and channel count is read without templating on them.
#include <concord/durable_output.h>
#include <concord/error.h>
#include <concord/image_io.h>
#include <concord/message.h>

#include "image_headers.h"

#include <itkGDCMImageIO.h>
#include <itkGDCMImageIOFactory.h>
#include <itkImage.h>
#include <itkImageIOFactory.h>
#include <itkImageSeriesReader.h>
#include <itkImageSeriesWriter.h>
#include <itkMetaDataObject.h>
#include <itkMetaImageIO.h>
#include <itkMetaImageIOFactory.h>
#include <itkNiftiImageIO.h>
#include <itkNiftiImageIOFactory.h>
#include <itkNrrdImageIO.h>
#include <itkNrrdImageIOFactory.h>
#include <spdlog/spdlog.h>
#include <zlib.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <sstream>

namespace concord {
namespace fs = std::filesystem;

namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

enum class Format { OpenCV, ITK, Dicom, Unknown };

// The file's extension, with the double extension .nii.gz kept whole.
std::string extension_of(const std::string& path) {
  std::string name = lower(fs::path(path).filename().string());
  if (ends_with(name, ".nii.gz")) return ".nii.gz";
  return lower(fs::path(path).extension().string());
}

Format format_of(const std::string& path) {
  std::string ext = extension_of(path);
  if (ext == ".png" || ext == ".jpg" || ext == ".jpeg" || ext == ".bmp" || ext == ".tif" ||
      ext == ".tiff")
    return Format::OpenCV;
  if (ext == ".nii" || ext == ".nii.gz" || ext == ".nrrd" || ext == ".nhdr" || ext == ".mha" ||
      ext == ".mhd")
    return Format::ITK;
  if (ext == ".dcm") return Format::Dicom;
  return Format::Unknown;
}

// ITK only knows the IO classes whose factories are registered; the CLI and plugins do not
// include ITK_USE_FILE, so register the ones Concord uses, once per process.
void register_itk_io() {
  static std::once_flag once;
  std::call_once(once, [] {
    itk::NiftiImageIOFactory::RegisterOneFactory();
    itk::NrrdImageIOFactory::RegisterOneFactory();
    itk::MetaImageIOFactory::RegisterOneFactory();
    itk::GDCMImageIOFactory::RegisterOneFactory();
    // ITK 5.2 creates some IO globals (itk::Singleton, e.g. MetaImageIO's) on first use without
    // a lock; worker threads reading their first images at once raced there (a rare crash).
    // Create one of each here, under the once-flag.
    itk::NiftiImageIO::New();
    itk::NrrdImageIO::New();
    itk::MetaImageIO::New();
    itk::GDCMImageIO::New();
    // ITK prints qform/sform and similar warnings on its own output window; Concord reports
    // problems through exceptions instead.
    itk::Object::GlobalWarningDisplayOff();
  });
}

// ---------------------------------------------------------------------------------------------
// Declared sizes

// Set by a reader whose library already replaced non-finite voxels by 0 (NIfTI); finish_image
// takes it out again and applies the caller's policy to that count.
const char* const kZeroedByReader = "concord.non_finite_zeroed_by_reader";

size_t max_bytes_of(const ReadOptions& opt) {
  return opt.max_bytes ? opt.max_bytes : default_max_image_bytes();
}

std::string dims_str(const std::array<uint64_t, 3>& size, int dim) {
  std::string s = std::to_string(size[0]) + "x" + std::to_string(size[1]);
  if (dim == 3) s += "x" + std::to_string(size[2]);
  return s;
}

// Refuses an image whose header declares an empty dimension or more voxels (as float32) than
// `max_bytes`, before anything is allocated for it. Returns the decoded size in bytes.
uint64_t check_declared(const std::string& path, const std::array<uint64_t, 3>& size, int dim,
                        uint64_t channels, size_t max_bytes) {
  for (int i = 0; i < 3; ++i)
    if (size[size_t(i)] == 0 || size[size_t(i)] > uint64_t(std::numeric_limits<int32_t>::max()))
      throw Error(path + ": header declares an unusable size " + dims_str(size, dim));
  if (channels == 0 || channels > 64)
    throw Error(path + ": header declares " + std::to_string(channels) +
                " channels (1 to 64 read)");
  const std::string what = path + ": declared size " + dims_str(size, dim);
  uint64_t bytes = checked_mul(size[0], size[1], what);
  bytes = checked_mul(bytes, size[2], what);
  bytes = checked_mul(bytes, channels, what);
  bytes = checked_mul(bytes, sizeof(float), what);
  if (bytes > max_bytes)
    throw Error(path + ": header declares " + dims_str(size, dim) + " voxels x " +
                std::to_string(channels) + " channel(s) (" + std::to_string(bytes >> 20) +
                " MiB as float32), more than the limit of " + std::to_string(max_bytes >> 20) +
                " MiB (CONCORD_MAX_IMAGE_MB)");
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// Pixel types

PixelType pixel_type_of(itk::IOComponentEnum c) {
  using C = itk::IOComponentEnum;
  switch (c) {
    case C::UCHAR:
      return PixelType::U8;
    case C::CHAR:
      return PixelType::I8;
    case C::USHORT:
      return PixelType::U16;
    case C::SHORT:
      return PixelType::I16;
    case C::UINT:
      return PixelType::U32;
    case C::INT:
      return PixelType::I32;
    case C::FLOAT:
      return PixelType::F32;
    default:
      return PixelType::F64;  // double and 64-bit integers
  }
}

itk::IOComponentEnum itk_component_of(PixelType t) {
  using C = itk::IOComponentEnum;
  switch (t) {
    case PixelType::U8:
      return C::UCHAR;
    case PixelType::I8:
      return C::CHAR;
    case PixelType::U16:
      return C::USHORT;
    case PixelType::I16:
      return C::SHORT;
    case PixelType::U32:
      return C::UINT;
    case PixelType::I32:
      return C::INT;
    case PixelType::F32:
      return C::FLOAT;
    case PixelType::F64:
      return C::DOUBLE;
  }
  return C::FLOAT;
}

size_t pixel_size(PixelType t) {
  switch (t) {
    case PixelType::U8:
    case PixelType::I8:
      return 1;
    case PixelType::U16:
    case PixelType::I16:
      return 2;
    case PixelType::U32:
    case PixelType::I32:
    case PixelType::F32:
      return 4;
    case PixelType::F64:
      return 8;
  }
  return 4;
}

// Float -> T with rounding and clamping for integer types (NaN becomes 0).
template <class T>
T cast_value(float v) {
  if constexpr (std::is_integral_v<T> && sizeof(T) <= 2) {
    // 8/16-bit: clamp in float (both ends exact), then round to nearest even; lrint becomes one
    // vectorizable instruction (this file is built with -fno-math-errno).
    constexpr float lo = float(std::numeric_limits<T>::lowest()),
                    hi = float(std::numeric_limits<T>::max());
    const float c = v == v ? std::min(std::max(v, lo), hi) : 0.0f;
    return static_cast<T>(std::lrint(c));
  } else if constexpr (std::is_integral_v<T>) {
    if (std::isnan(v)) return 0;
    double r = std::nearbyint(double(v));
    r = std::clamp(r, double(std::numeric_limits<T>::lowest()),
                   double(std::numeric_limits<T>::max()));
    return static_cast<T>(r);
  } else {
    return static_cast<T>(v);
  }
}

// Interleaved buffer of T (ncomp components per voxel) -> planar floats.
template <class T>
void interleaved_to_planar(const void* src, int ncomp, int64_t nvox, float* dst) {
  const T* p = static_cast<const T*>(src);
  for (int c = 0; c < ncomp; ++c) {
    float* out = dst + c * nvox;
    for (int64_t i = 0; i < nvox; ++i) out[i] = static_cast<float>(p[i * ncomp + c]);
  }
}

template <class T>
void planar_to_interleaved(const float* src, int ncomp, int64_t nvox, void* dst) {
  T* p = static_cast<T*>(dst);
  for (int c = 0; c < ncomp; ++c) {
    const float* in = src + c * nvox;
    for (int64_t i = 0; i < nvox; ++i) p[i * ncomp + c] = cast_value<T>(in[i]);
  }
}

// Calls f(T{}) with T the C++ type of `t`.
template <class F>
void dispatch(PixelType t, F&& f) {
  switch (t) {
    case PixelType::U8:
      f(uint8_t{});
      break;
    case PixelType::I8:
      f(int8_t{});
      break;
    case PixelType::U16:
      f(uint16_t{});
      break;
    case PixelType::I16:
      f(int16_t{});
      break;
    case PixelType::U32:
      f(uint32_t{});
      break;
    case PixelType::I32:
      f(int32_t{});
      break;
    case PixelType::F32:
      f(float{});
      break;
    case PixelType::F64:
      f(double{});
      break;
  }
}

void to_planar(itk::IOComponentEnum c, const void* src, int ncomp, int64_t nvox, float* dst,
               const std::string& path) {
  using C = itk::IOComponentEnum;
  switch (c) {
    case C::UCHAR:
      interleaved_to_planar<uint8_t>(src, ncomp, nvox, dst);
      break;
    case C::CHAR:
      interleaved_to_planar<int8_t>(src, ncomp, nvox, dst);
      break;
    case C::USHORT:
      interleaved_to_planar<uint16_t>(src, ncomp, nvox, dst);
      break;
    case C::SHORT:
      interleaved_to_planar<int16_t>(src, ncomp, nvox, dst);
      break;
    case C::UINT:
      interleaved_to_planar<uint32_t>(src, ncomp, nvox, dst);
      break;
    case C::INT:
      interleaved_to_planar<int32_t>(src, ncomp, nvox, dst);
      break;
    case C::ULONG:
      interleaved_to_planar<unsigned long>(src, ncomp, nvox, dst);
      break;
    case C::LONG:
      interleaved_to_planar<long>(src, ncomp, nvox, dst);
      break;
    case C::ULONGLONG:
      interleaved_to_planar<unsigned long long>(src, ncomp, nvox, dst);
      break;
    case C::LONGLONG:
      interleaved_to_planar<long long>(src, ncomp, nvox, dst);
      break;
    case C::FLOAT:
      interleaved_to_planar<float>(src, ncomp, nvox, dst);
      break;
    case C::DOUBLE:
      interleaved_to_planar<double>(src, ncomp, nvox, dst);
      break;
    default:
      throw Error(path + ": unsupported pixel component type " +
                  itk::ImageIOBase::GetComponentTypeAsString(c));
  }
}

// ---------------------------------------------------------------------------------------------
// OpenCV formats

Image read_opencv(const std::string& path, size_t max_bytes) {
  // OpenCV has no header-only API: the dimensions come from our own look at the header, so an
  // image that decodes to more than the ceiling is refused before the decoder allocates it.
  const detail::RasterHeader h = detail::read_raster_header(path);
  check_declared(path, {h.width, h.height, 1}, 2, h.channels, max_bytes);
  cv::Mat m;
  try {
    m = cv::imread(path, cv::IMREAD_UNCHANGED);
  } catch (const cv::Exception& e) {
    throw Error(path + ": cannot decode image: " + e.what());
  }
  if (m.empty()) throw Error(path + ": cannot decode image (corrupt or unsupported file)");
  if (m.dims != 2) throw Error(path + ": unsupported image layout");
  if (uint64_t(m.cols) != h.width || uint64_t(m.rows) != h.height)
    throw Error(path + ": decoded " + std::to_string(m.cols) + "x" + std::to_string(m.rows) +
                " but the " + h.format + " header declares " + std::to_string(h.width) + "x" +
                std::to_string(h.height));
  const int ch = m.channels();
  Image im(2, ch, {m.cols, m.rows, 1});
  switch (m.depth()) {
    case CV_8U:
      im.pixel_type = PixelType::U8;
      break;
    case CV_8S:
      im.pixel_type = PixelType::I8;
      break;
    case CV_16U:
      im.pixel_type = PixelType::U16;
      break;
    case CV_16S:
      im.pixel_type = PixelType::I16;
      break;
    case CV_32S:
      im.pixel_type = PixelType::I32;
      break;
    case CV_32F:
      im.pixel_type = PixelType::F32;
      break;
    case CV_64F:
      im.pixel_type = PixelType::F64;
      break;
    default:
      throw Error(path + ": unsupported pixel depth");
  }
  // Each plane converts straight into the image's buffer: no full-size float temporaries.
  std::vector<cv::Mat> planes;
  if (ch == 1)
    planes.push_back(m);
  else
    cv::split(m, planes);
  if (ch == 3 || ch == 4) std::swap(planes[0], planes[2]);  // BGR(A) -> RGB(A)
  for (int c = 0; c < ch; ++c) {
    cv::Mat dst(m.rows, m.cols, CV_32F, im.channel(c));
    planes[size_t(c)].convertTo(dst, CV_32F);
  }
  return im;
}

// The pixel type a format can store, closest to `wanted`.
PixelType opencv_storable(const std::string& ext, PixelType wanted) {
  if (ext == ".jpg" || ext == ".jpeg" || ext == ".bmp") return PixelType::U8;
  if (ext == ".png") {
    if (wanted == PixelType::U8 || wanted == PixelType::I8) return PixelType::U8;
    return PixelType::U16;
  }
  // TIFF: 8/16-bit unsigned or float.
  if (wanted == PixelType::U8 || wanted == PixelType::U16 || wanted == PixelType::F32)
    return wanted;
  if (wanted == PixelType::I8) return PixelType::U8;
  return PixelType::F32;
}

void write_opencv(const Image& im, const std::string& path, const WriteOptions& opt) {
  std::string ext = extension_of(path);
  if (im.dim != 2 && im.size[2] != 1)
    throw Error(path + ": cannot write a 3D image (" + std::to_string(im.size[2]) + " slices) as " +
                ext);
  if (im.channels != 1 && im.channels != 3 && im.channels != 4)
    throw Error(path + ": cannot write " + std::to_string(im.channels) + " channels as " + ext);
  PixelType t = opencv_storable(ext, opt.keep_pixel_type ? im.pixel_type : PixelType::F32);
  int depth = t == PixelType::U8 ? CV_8U : t == PixelType::U16 ? CV_16U : CV_32F;
  const int w = int(im.size[0]), h = int(im.size[1]);
  std::vector<cv::Mat> planes;
  for (int c = 0; c < im.channels; ++c) {
    cv::Mat p(h, w, CV_MAKETYPE(depth, 1));
    const float* src = im.channel(c);
    dispatch(t, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (std::is_same_v<T, uint8_t> || std::is_same_v<T, uint16_t> ||
                    std::is_same_v<T, float>) {
        T* dst = p.ptr<T>();
        for (int64_t i = 0; i < int64_t(w) * h; ++i) dst[i] = cast_value<T>(src[i]);
      }
    });
    planes.push_back(p);
  }
  cv::Mat m;
  cv::merge(planes, m);
  if (im.channels == 3) cv::cvtColor(m, m, cv::COLOR_RGB2BGR);
  if (im.channels == 4) cv::cvtColor(m, m, cv::COLOR_RGBA2BGRA);
  std::vector<uchar> bytes;
  bool ok = false;
  try {
    ok = cv::imencode(ext, m, bytes);
  } catch (const cv::Exception& e) {
    throw Error(path + ": cannot encode image: " + e.what());
  }
  if (!ok) throw Error(path + ": cannot encode image as " + ext);
  auto scratch = std::make_shared<ScratchFolder>(path);
  scratch->write(scratch->target().filename().string(), bytes.data(), bytes.size());
  publish_output(scratch, opt.publisher);
}

// ---------------------------------------------------------------------------------------------
// ITK file formats (NIfTI, NRRD, MetaImage, single DICOM files)

void geometry_from_io(const itk::ImageIOBase& io, unsigned ndim, Geometry& g) {
  for (unsigned i = 0; i < 3; ++i) {
    g.spacing[i] = i < ndim ? io.GetSpacing(i) : 1.0;
    g.origin[i] = i < ndim ? io.GetOrigin(i) : 0.0;
  }
  g.direction = {1, 0, 0, 0, 1, 0, 0, 0, 1};
  for (unsigned c = 0; c < std::min(ndim, 3u); ++c) {
    std::vector<double> axis = io.GetDirection(c);  // column c of the direction matrix
    for (unsigned r = 0; r < std::min<size_t>(axis.size(), 3); ++r)
      g.direction[r * 3 + c] = axis[r];
  }
}

// ITK's NIfTI and MetaImage readers print a warning on a short read and return a partly filled
// buffer; a truncated file must be an error instead, so compare what the file holds with what
// its header promises.
uint32_t bswap32(uint32_t v) {
  return __builtin_bswap32(v);
}

size_t nifti_data_offset(const char* hdr, size_t n, const std::string& path) {
  uint32_t size;
  std::memcpy(&size, hdr, 4);
  const bool swap = size == bswap32(348) || size == bswap32(540);
  if (swap) size = bswap32(size);
  if (size == 348 && n >= 112) {  // NIfTI-1: float vox_offset at byte 108
    uint32_t raw;
    std::memcpy(&raw, hdr + 108, 4);
    if (swap) raw = bswap32(raw);
    float off;
    std::memcpy(&off, &raw, 4);
    if (!(off >= 0 && off < 1e12f))
      throw Error(path + ": NIfTI vox_offset " + std::to_string(off) + " is unusable");
    return size_t(std::max(352.f, off));
  }
  if (size == 540 && n >= 176) {  // NIfTI-2: int64 vox_offset at byte 168
    uint64_t off;
    std::memcpy(&off, hdr + 168, 8);
    if (swap) off = __builtin_bswap64(off);
    if (off > (uint64_t(1) << 40))
      throw Error(path + ": NIfTI vox_offset " + std::to_string(off) + " is unusable");
    return size_t(std::max<uint64_t>(544, off));
  }
  throw Error(path + ": not a NIfTI header");
}

// Compares the decompressed length of the stream at `offset` with `need`, counting (in a small
// buffer) at most one byte past it: a short stream is a truncated file, a longer one holds more
// than its header declares (a decompression bomb, or a header that lies). The gzip trailer's
// length field is not trusted: it is only a claim.
void check_inflated(const std::string& path, const std::string& data_file, uint64_t offset,
                    uint64_t need, detail::NonFiniteCounter* counter = nullptr) {
  const detail::InflatedSize got = detail::inflated_size(data_file, offset, need, counter);
  const std::string in = data_file == path ? "" : " in " + data_file;
  if (got.over_cap)
    throw Error(path + ": compressed data" + in + " holds more than the " + std::to_string(need) +
                " bytes its header declares (refused: corrupt file or decompression bomb)");
  if (got.bytes < need)
    throw Error(path + ": file is truncated (" + std::to_string(got.bytes) + " uncompressed bytes" +
                in + ", the header describes " + std::to_string(need) + ")");
}

// The first bytes of a NIfTI file (inflated for .nii.gz); `got` of them are valid.
size_t read_nifti_header(const std::string& path, char (&hdr)[544]) {
  std::memset(hdr, 0, sizeof hdr);
  if (extension_of(path) != ".nii.gz") {
    std::ifstream in(path, std::ios::binary);
    in.read(hdr, sizeof hdr);
    return size_t(in.gcount());
  }
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) throw Error(path + ": cannot open");
  const int n = gzread(f, hdr, sizeof hdr);
  gzclose(f);
  if (n < 348) throw Error(path + ": truncated or corrupt compressed header");
  return size_t(n);
}

// Geometry fields must be finite and sane before ITK sees them: a NaN in the sform or qform
// makes VNL abort() the whole process, a huge value makes its SVD run for minutes.
void check_nifti_header(const std::string& path) {
  char hdr[544];
  const size_t got = read_nifti_header(path, hdr);
  uint32_t size;
  std::memcpy(&size, hdr, 4);
  const bool swap = size == bswap32(348) || size == bswap32(540);
  if (swap) size = bswap32(size);
  auto finite_range = [&](size_t begin, size_t end, size_t width, const char* what) {
    if (end > got) throw Error(path + ": truncated NIfTI header");
    for (size_t o = begin; o < end; o += width) {
      double v;
      if (width == 4) {
        uint32_t b;
        std::memcpy(&b, hdr + o, 4);
        if (swap) b = bswap32(b);
        float f;
        std::memcpy(&f, &b, 4);
        v = f;
      } else {
        uint64_t b;
        std::memcpy(&b, hdr + o, 8);
        if (swap) b = __builtin_bswap64(b);
        std::memcpy(&v, &b, 8);
      }
      // 1e9 mm is far beyond any scanner; larger values make ITK's SVD of the sform spin.
      if (!std::isfinite(v) || std::abs(v) > 1e9)
        throw Error(path + ": NIfTI header has an unusable " + what + " " + std::to_string(v) +
                    " (byte " + std::to_string(o) + ")");
    }
  };
  if (size == 348) {
    finite_range(76, 108, 4, "pixdim");
    finite_range(256, 328, 4, "qform/sform value");
  } else if (size == 540) {
    finite_range(104, 168, 8, "pixdim");
    finite_range(352, 496, 8, "qform/sform value");
  } else {
    throw Error(path + ": not a NIfTI header");
  }
}

// Returns the number of non-finite float voxels in the file: the NIfTI library replaces them
// by 0 while reading (nifti_read_buffer), so they are counted here, on the file's own bytes.
uint64_t check_nifti_complete(const std::string& path, uint64_t data_bytes, uint64_t file_bytes) {
  const bool gz = extension_of(path) == ".nii.gz";
  char hdr[544];
  const size_t got = read_nifti_header(path, hdr);
  const uint64_t offset = nifti_data_offset(hdr, got, path);
  const std::string what = path + ": NIfTI data size";
  const uint64_t need = checked_add(offset, data_bytes, what);
  uint32_t hsize;
  std::memcpy(&hsize, hdr, 4);
  const bool swap = hsize == bswap32(348) || hsize == bswap32(540);
  uint16_t datatype;
  std::memcpy(&datatype, hdr + ((swap ? bswap32(hsize) : hsize) == 348 ? 70 : 12), 2);
  if (swap) datatype = __builtin_bswap16(datatype);
  // float32, complex64 (float32 pairs), float64, complex128
  const int width = datatype == 16 || datatype == 32     ? 4
                    : datatype == 64 || datatype == 1792 ? 8
                                                         : 0;
  std::unique_ptr<detail::NonFiniteCounter> counter;
  if (width) counter = std::make_unique<detail::NonFiniteCounter>(offset, need, width, swap);
  if (!gz) {
    if (file_bytes < need)
      throw Error(path + ": file is truncated (" + std::to_string(file_bytes) +
                  " bytes, the header describes " + std::to_string(need) + ")");
    if (counter) detail::feed_file(path, 0, need, *counter);
  } else {
    check_inflated(path, path, 0, need, counter.get());
  }
  return counter ? counter->count() : 0;
}

// The text header of a NRRD or MetaImage file, read from at most its first MiB: (key, value)
// pairs and the offset of the first data byte when the data follows the header.
struct TextHeader {
  std::vector<std::pair<std::string, std::string>> fields;
  uint64_t end = 0;
  std::string get(const std::string& key) const {
    for (const auto& [k, v] : fields)
      if (lower(k) == key) return v;
    return "";
  }
};

TextHeader read_text_header(const std::string& path, bool nrrd, uint64_t file_bytes) {
  std::ifstream in(path, std::ios::binary);
  std::string text(size_t(std::min<uint64_t>(file_bytes, 1 << 20)), '\0');
  in.read(text.data(), std::streamsize(text.size()));
  text.resize(size_t(in.gcount()));
  auto trim = [](std::string t) {
    t.erase(0, t.find_first_not_of(" \t\r"));
    t.erase(t.find_last_not_of(" \t\r") + 1);
    return t;
  };
  TextHeader h;
  size_t pos = 0;
  bool first = true;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) {
      if (text.size() < file_bytes) break;  // a header line longer than the MiB read
      nl = text.size();
    }
    const std::string line = text.substr(pos, nl - pos);
    pos = std::min(nl + 1, text.size());
    if (nrrd) {
      if (first) {
        first = false;
        continue;  // NRRD000X magic
      }
      if (trim(line).empty()) {  // the blank line ending an attached header
        h.end = pos;
        return h;
      }
      if (line[0] == '#' || line.find(":=") != std::string::npos) continue;
      const auto c = line.find(':');
      if (c != std::string::npos)
        h.fields.emplace_back(trim(line.substr(0, c)), trim(line.substr(c + 1)));
    } else {
      const auto eq = line.find('=');
      if (eq == std::string::npos) continue;
      h.fields.emplace_back(trim(line.substr(0, eq)), trim(line.substr(eq + 1)));
      if (trim(line.substr(0, eq)) == "ElementDataFile") {
        h.end = pos;
        return h;
      }
    }
  }
  if (nrrd && pos >= file_bytes) {  // a detached header: all of it is header
    h.end = file_bytes;
    return h;
  }
  throw Error(path + ": header does not end within its first MiB (corrupt file?)");
}

// A detached data file named by a header, resolved next to the header.
std::string data_file_of(const std::string& header, const std::string& name) {
  fs::path p(name);
  if (p.is_relative()) p = fs::path(header).parent_path() / p;
  return p.string();
}

void check_available(const std::string& path, const std::string& data_file, uint64_t available,
                     uint64_t need) {
  if (available < need)
    throw Error(path + ": file is truncated (" + std::to_string(available) + " data bytes" +
                (data_file == path ? "" : " in " + data_file) + ", the header describes " +
                std::to_string(need) + ")");
}

// What MetaIO (ITK's MetaImage reader) cannot be trusted with, refused before it reads the header:
// a field name of 255 bytes or more (copied with strcpy into a 255-byte name: the process
// aborts), an NDims outside 1..8 (MetaIO reads NDims values for each array field into a fixed
// table, and loops billions of times on a huge one), and an ElementDataFile that is a LIST or a
// '%' pattern (MetaIO passes the pattern to sprintf as the format, and divides by values from
// it; the files either names are not checked). Field names run up to '=', ':' or the line's end.
void check_metaimage_header(const std::string& path, uint64_t file_bytes) {
  std::ifstream in(path, std::ios::binary);
  std::string text(size_t(std::min<uint64_t>(file_bytes, 1 << 20)), '\0');
  in.read(text.data(), std::streamsize(text.size()));
  text.resize(size_t(in.gcount()));
  size_t pos = 0, line_no = 0;
  while (pos < text.size()) {
    ++line_no;
    const size_t nl = std::min(text.find_first_of("\r\n", pos), text.size());
    const std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    const size_t start = line.find_first_not_of(" \t\v\f");
    if (start == std::string::npos) continue;
    const size_t sep = std::min(line.find_first_of("=:", start), line.size());
    std::string key = line.substr(start, sep - start);
    key.erase(key.find_last_not_of(" \t\v\f") + 1);
    if (key.size() >= 255)
      throw Error(path + ": MetaImage header line " + std::to_string(line_no) + " has a " +
                  std::to_string(key.size()) + "-byte field name (corrupt file)");
    std::string value = sep < line.size() ? line.substr(sep + 1) : "";
    value.erase(0, value.find_first_not_of(" \t=:"));
    value.erase(value.find_last_not_of(" \t\v\f") + 1);
    // (values are not echoed in errors: they may hold any bytes, NULs included)
    if (lower(key) == "ndims") {  // MetaIO reads it as a double
      char* end = nullptr;
      const double n = std::strtod(value.c_str(), &end);
      if (end == value.c_str() || !(n >= 1 && n < 9))
        throw Error(path + ": MetaImage header declares an NDims outside 1 to 8");
    }
    if (lower(key) == "elementdatafile") {
      if (value.rfind("LIST", 0) == 0 || value.find('%') != std::string::npos)
        throw Error(path +
                    ": MetaImage ElementDataFile is a LIST or a '%' pattern of slice "
                    "files (not supported)");
      if (key == "ElementDataFile") return;  // MetaIO stops reading the header here
    }
  }
  if (text.size() < file_bytes)
    throw Error(path + ": MetaImage header without ElementDataFile in its first MiB");
}

void check_metaimage_complete(const std::string& path, uint64_t data_bytes, uint64_t file_bytes) {
  const TextHeader h = read_text_header(path, false, file_bytes);
  const std::string data_file = h.get("elementdatafile");
  if (data_file.empty()) throw Error(path + ": MetaImage header without ElementDataFile");
  // LIST and '%' patterns were refused by check_metaimage_header; any other name is one file.
  const bool local = data_file == "LOCAL";
  const std::string df = local ? path : data_file_of(path, data_file);
  const uint64_t df_bytes = local ? file_bytes : detail::regular_file_size(df, path);
  const long long header_size = std::atoll(h.get("headersize").c_str());
  uint64_t offset = local ? h.end : header_size > 0 ? uint64_t(header_size) : 0;
  if (!local && header_size == -1 && df_bytes >= data_bytes) offset = df_bytes - data_bytes;
  if (offset > df_bytes) throw Error(path + ": data offset beyond the end of " + df);
  const uint64_t available = df_bytes - offset;
  if (lower(h.get("compresseddata")) != "true")
    return check_available(path, df, available, data_bytes);
  const std::string declared = h.get("compresseddatasize");
  if (!declared.empty() && std::strtoull(declared.c_str(), nullptr, 10) > available)
    throw Error(path + ": CompressedDataSize " + declared + " is more than the " +
                std::to_string(available) + " bytes the file holds (truncated or corrupt)");
  check_inflated(path, df, offset, data_bytes);
}

void check_nrrd_complete(const std::string& path, uint64_t data_bytes, uint64_t nvalues,
                         uint64_t file_bytes) {
  const TextHeader h = read_text_header(path, true, file_bytes);
  std::string name = h.get("data file");
  if (name.empty()) name = h.get("datafile");
  if (name == "LIST" || name.find(' ') != std::string::npos) return;  // several data files
  const bool attached = name.empty();
  const std::string df = attached ? path : data_file_of(path, name);
  const uint64_t df_bytes = attached ? file_bytes : detail::regular_file_size(df, path);
  const uint64_t start = attached ? h.end : 0;
  std::string skip_text = h.get("byte skip");
  if (skip_text.empty()) skip_text = h.get("byteskip");
  const long long skip = std::atoll(skip_text.c_str());
  const std::string enc = lower(h.get("encoding"));
  const std::string what = path + ": NRRD data size";
  if (enc == "raw") {
    if (skip == -1) return check_available(path, df, df_bytes, data_bytes);  // data at the end
    const uint64_t offset = checked_add(start, uint64_t(std::max(0LL, skip)), what);
    return check_available(path, df, df_bytes > offset ? df_bytes - offset : 0, data_bytes);
  }
  const uint64_t available = df_bytes > start ? df_bytes - start : 0;
  if (enc == "gzip" || enc == "gz")
    return check_inflated(path, df, start,
                          checked_add(data_bytes, uint64_t(std::max(0LL, skip)), what));
  // Text: at least one character per value; hex: two per byte. bzip2: the ceiling only.
  if (enc == "ascii" || enc == "text" || enc == "txt")
    return check_available(path, df, available, nvalues);
  if (enc == "hex") return check_available(path, df, available / 2, data_bytes);
}

Image read_itk(const std::string& path, size_t max_bytes) {
  register_itk_io();
  const uint64_t file_bytes = detail::regular_file_size(path, path);
  const std::string ext = extension_of(path);
  if (ext == ".dcm") {  // GDCM would allocate every value at its declared length: walk it first
    const detail::DicomGeometry g = detail::check_dicom_file(path);
    check_declared(path, {g.columns, g.rows, g.frames}, g.frames > 1 ? 3 : 2, g.samples, max_bytes);
  }
  if (ext == ".nii" || ext == ".nii.gz") check_nifti_header(path);
  if (ext == ".mha" || ext == ".mhd") check_metaimage_header(path, file_bytes);
  // The reader is chosen by the extension, whose checks ran above. ITK's factory would offer a
  // file its own reader refuses to every other one: GDCM then parsed a .mha, .nrrd or .nii
  // holding DICOM bytes without the DICOM walk (and aborted or allocated gigabytes on a bad one).
  itk::ImageIOBase::Pointer io;
  const char* kind = "";
  if (ext == ".nii" || ext == ".nii.gz") {
    io = itk::NiftiImageIO::New();
    kind = "NIfTI";
  } else if (ext == ".nrrd" || ext == ".nhdr") {
    io = itk::NrrdImageIO::New();
    kind = "NRRD";
  } else if (ext == ".mha" || ext == ".mhd") {
    io = itk::MetaImageIO::New();
    kind = "MetaImage";
  } else if (ext == ".dcm") {
    io = itk::GDCMImageIO::New();
    kind = "DICOM";
  } else {
    throw Error(path + ": unknown image format (extension '" + ext + "')");
  }
  if (!io->CanReadFile(path.c_str()))
    throw Error(path + ": not a readable " + std::string(kind) + " file (corrupt or unsupported)");
  try {
    io->SetFileName(path);
    io->ReadImageInformation();
    const unsigned io_dims = io->GetNumberOfDimensions();
    if (io_dims == 0) throw Error(path + ": header declares no dimensions");
    unsigned ndim = io_dims;
    // Trailing singleton dimensions (e.g. NIfTI 4D with one volume) are dropped.
    while (ndim > 2 && io->GetDimensions(ndim - 1) == 1) --ndim;
    if (ndim > 3)
      throw Error(path + ": " + std::to_string(ndim) +
                  "D images are not supported (2D or 3D only)");
    std::array<uint64_t, 3> dims{1, 1, 1};
    for (unsigned i = 0; i < ndim; ++i) dims[i] = uint64_t(io->GetDimensions(i));
    const uint64_t ncomp = io->GetNumberOfComponents();
    check_declared(path, dims, ndim <= 2 ? 2 : 3, ncomp, max_bytes);
    const uint64_t comp_size = io->GetComponentSize();
    if (comp_size != 1 && comp_size != 2 && comp_size != 4 && comp_size != 8)
      throw Error(path + ": unsupported pixel component type " +
                  itk::ImageIOBase::GetComponentTypeAsString(io->GetComponentType()));
    const std::string what = path + ": declared data size";
    const uint64_t nvalues =
        checked_mul(dims[0] * dims[1] * dims[2], ncomp, what);  // products checked above
    const uint64_t bytes = checked_mul(nvalues, comp_size, what);
    uint64_t zeroed = 0;  // non-finite voxels the reader library replaced by 0
    if (ext == ".nii" || ext == ".nii.gz") zeroed = check_nifti_complete(path, bytes, file_bytes);
    if (ext == ".mha" || ext == ".mhd") check_metaimage_complete(path, bytes, file_bytes);
    if (ext == ".nrrd" || ext == ".nhdr") check_nrrd_complete(path, bytes, nvalues, file_bytes);

    Image im(ndim <= 2 ? 2 : 3, int(ncomp), {int64_t(dims[0]), int64_t(dims[1]), int64_t(dims[2])});
    im.pixel_type = pixel_type_of(io->GetComponentType());
    geometry_from_io(*io, ndim, im.geometry);
    itk::ImageIORegion region(io_dims);
    for (unsigned i = 0; i < io_dims; ++i) {
      region.SetIndex(i, 0);
      region.SetSize(i, io->GetDimensions(i));
    }
    io->SetIORegion(region);
    if (uint64_t(io->GetImageSizeInBytes()) != bytes)
      throw Error(path + ": ITK reports " + std::to_string(io->GetImageSizeInBytes()) +
                  " data bytes, the header declares " + std::to_string(bytes));
    std::unique_ptr<char[]> buf(new char[bytes]);  // filled by Read: no zeroing pass
    io->Read(buf.get());
    to_planar(io->GetComponentType(), buf.get(), int(ncomp), im.voxels(), im.data.data(), path);
    if (zeroed) im.meta[kZeroedByReader] = std::to_string(zeroed);
    return im;
  } catch (const itk::ExceptionObject& e) {
    throw Error(path + ": cannot read: " + std::string(e.GetDescription()));
  }
}

void write_itk(const Image& im, const std::string& path, const WriteOptions& opt) {
  register_itk_io();
  auto scratch = std::make_shared<ScratchFolder>(path);
  const std::string tmp = (scratch->path() / scratch->target().filename()).string();
  itk::ImageIOBase::Pointer io =
      itk::ImageIOFactory::CreateImageIO(tmp.c_str(), itk::IOFileModeEnum::WriteMode);
  if (!io) throw Error(path + ": no ITK writer for this extension");
  const unsigned ndim = im.dim == 2 ? 2 : 3;
  const PixelType t = opt.keep_pixel_type ? im.pixel_type : PixelType::F32;
  try {
    io->SetNumberOfDimensions(ndim);
    for (unsigned i = 0; i < ndim; ++i) {
      io->SetDimensions(i, itk::SizeValueType(im.size[i]));
      io->SetSpacing(i, im.geometry.spacing[i]);
      io->SetOrigin(i, im.geometry.origin[i]);
      std::vector<double> axis(ndim);
      for (unsigned r = 0; r < ndim; ++r) axis[r] = im.geometry.direction[r * 3 + i];
      io->SetDirection(i, axis);
    }
    io->SetComponentType(itk_component_of(t));
    io->SetNumberOfComponents(unsigned(im.channels));
    io->SetPixelType(im.channels == 1                           ? itk::IOPixelEnum::SCALAR
                     : (im.channels == 3 && t == PixelType::U8) ? itk::IOPixelEnum::RGB
                                                                : itk::IOPixelEnum::VECTOR);
    io->SetUseCompression(extension_of(path) == ".nii.gz");
    io->SetFileName(tmp);
    itk::ImageIORegion region(ndim);
    for (unsigned i = 0; i < ndim; ++i) {
      region.SetIndex(i, 0);
      region.SetSize(i, itk::SizeValueType(im.size[i]));
    }
    io->SetIORegion(region);
    std::unique_ptr<char[]> buf(  // filled below: no zeroing pass
        new char[size_t(im.voxels()) * size_t(im.channels) * pixel_size(t)]);
    dispatch(t, [&](auto tag) {
      planar_to_interleaved<decltype(tag)>(im.data.data(), im.channels, im.voxels(), buf.get());
    });
    io->Write(buf.get());
  } catch (const itk::ExceptionObject& e) {
    throw Error(path + ": cannot write: " + std::string(e.GetDescription()));
  }
  publish_output(scratch, opt.publisher);
}

// ---------------------------------------------------------------------------------------------
// DICOM series

using DicomSlices = std::vector<std::string>;

// The files of the folder's one series in slice order, from what check_dicom_file read: by
// position along the slice normal, else InstanceNumber, else file name (GDCM's order). GDCM's
// own folder scan is not used: it stops at the first entry it cannot stat (a symlink loop) and
// silently drops the slices after it.
DicomSlices dicom_series_files(
    const std::string& dir,
    const std::vector<std::pair<std::string, detail::DicomGeometry>>& files) {
  std::map<std::string, std::vector<size_t>> series;
  for (size_t i = 0; i < files.size(); ++i) series[files[i].second.series_uid].push_back(i);
  if (series.empty()) throw Error(dir + ": no DICOM series found in this folder");
  if (series.size() > 1) {
    std::string list;
    for (const auto& [uid, members] : series)
      list += "\n  " + (uid.empty() ? std::string("(no SeriesInstanceUID)") : uid) + " (" +
              std::to_string(members.size()) + " files)";
    throw Error(dir + ": the folder holds " + std::to_string(series.size()) +
                " DICOM series; put each series in its own folder:" + list);
  }
  auto numbers = [](const std::string& text, size_t want) {
    std::vector<double> v;
    std::stringstream ss(text);
    std::string item;
    while (std::getline(ss, item, '\\')) {
      char* end = nullptr;
      const double x = std::strtod(item.c_str(), &end);
      if (end == item.c_str() || !std::isfinite(x)) return std::vector<double>{};
      v.push_back(x);
    }
    return v.size() == want ? v : std::vector<double>{};
  };
  struct Slice {
    std::string file;
    double position = 0;
    long long instance = 0;
  };
  std::vector<Slice> slices;
  bool by_position = true, by_instance = true;
  for (size_t i : series.begin()->second) {
    const auto& [file, g] = files[i];
    Slice s{file};
    const auto ipp = numbers(g.position, 3), iop = numbers(g.orientation, 6);
    if (ipp.empty() || iop.empty()) {
      by_position = false;
    } else {
      const double n[3] = {iop[1] * iop[5] - iop[2] * iop[4], iop[2] * iop[3] - iop[0] * iop[5],
                           iop[0] * iop[4] - iop[1] * iop[3]};
      s.position = n[0] * ipp[0] + n[1] * ipp[1] + n[2] * ipp[2];
    }
    char* end = nullptr;
    s.instance = std::strtoll(g.instance.c_str(), &end, 10);
    if (end == g.instance.c_str()) by_instance = false;
    slices.push_back(std::move(s));
  }
  std::stable_sort(slices.begin(), slices.end(), [&](const Slice& a, const Slice& b) {
    if (by_position && a.position != b.position) return a.position < b.position;
    if (by_instance && a.instance != b.instance) return a.instance < b.instance;
    return a.file < b.file;
  });
  DicomSlices out;
  for (auto& s : slices) out.push_back(std::move(s.file));
  return out;
}

double meta_number(const Image& im, const char* key, double fallback) {
  auto it = im.meta.find(key);
  if (it == im.meta.end()) return fallback;
  try {
    return std::stod(it->second);
  } catch (const std::exception&) {
    return fallback;
  }
}

Image read_dicom_series(const std::string& dir, const DicomDirInfo& info, size_t max_bytes) {
  // Every file is walked before GDCM reads any (GDCM allocates values at their declared length
  // and pads short pixel data with zeros): one truncated slice refuses the series, by name.
  uint64_t voxels = 0, rows = 0, columns = 0;
  std::vector<std::pair<std::string, detail::DicomGeometry>> checked;
  for (const auto& f : info.dicom_files) {
    checked.emplace_back(f, detail::check_dicom_file(f));
    const detail::DicomGeometry& g = checked.back().second;
    if (g.samples != 1) throw Error(f + ": colour DICOM series are not supported");
    const std::string what = dir + ": DICOM series size";
    voxels = checked_add(voxels, checked_mul(g.rows * g.columns, g.frames, what), what);
    rows = std::max(rows, g.rows);
    columns = std::max(columns, g.columns);
  }
  if (rows && columns)
    check_declared(dir, {columns, rows, (voxels + rows * columns - 1) / (rows * columns)}, 3, 1,
                   max_bytes);
  register_itk_io();
  DicomSlices files = dicom_series_files(dir, checked);
  using Volume = itk::Image<float, 3>;
  auto io = itk::GDCMImageIO::New();
  auto reader = itk::ImageSeriesReader<Volume>::New();
  reader->SetImageIO(io);
  reader->SetFileNames(files);
  try {
    reader->Update();
  } catch (const itk::ExceptionObject& e) {
    throw Error(dir + ": cannot read DICOM series: " + std::string(e.GetDescription()));
  }
  Volume* v = reader->GetOutput();
  auto sz = v->GetLargestPossibleRegion().GetSize();
  Image im(3, 1, {int64_t(sz[0]), int64_t(sz[1]), int64_t(sz[2])});
  std::memcpy(im.data.data(), v->GetBufferPointer(), im.data.size() * sizeof(float));
  for (unsigned i = 0; i < 3; ++i) {
    im.geometry.spacing[i] = v->GetSpacing()[i];
    im.geometry.origin[i] = v->GetOrigin()[i];
    for (unsigned j = 0; j < 3; ++j) im.geometry.direction[i * 3 + j] = v->GetDirection()[i][j];
  }
  if (io->GetNumberOfComponents() != 1)
    throw Error(dir + ": colour DICOM series are not supported");
  // Tags of the first slice: those shared by the series (per-slice ones are rewritten on output).
  const auto* dicts = reader->GetMetaDataDictionaryArray();
  const itk::MetaDataDictionary& d =
      (dicts && !dicts->empty()) ? *dicts->front() : io->GetMetaDataDictionary();
  for (const auto& key : d.GetKeys()) {
    std::string value;
    if (itk::ExposeMetaData<std::string>(d, key, value)) im.meta[key] = value;
  }
  // The type after the modality rescale (slope/intercept), as GDCM reports it.
  im.pixel_type = pixel_type_of(io->GetComponentType());
  // GDCM reports any non-integer rescale as double; 16-bit stored values fit float32 exactly.
  if (im.pixel_type == PixelType::F64 && meta_number(im, "0028|0100", 32) <= 16)
    im.pixel_type = PixelType::F32;
  return im;
}

// A DICOM UID under the UUID-derived root 2.25 (ISO/IEC 9834-8): unique without a registered
// organisation root. Uniqueness matters here, not reproducibility, hence random_device.
std::string new_dicom_uid() {
  static std::mutex m;
  static std::random_device rd;
  std::lock_guard<std::mutex> lock(m);
  unsigned __int128 v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 32) | rd();
  v &= ~(unsigned __int128)0 >> 1;  // < 2^127 keeps the UID within 64 characters
  std::string digits;
  do {
    digits.insert(digits.begin(), char('0' + int(v % 10)));
    v /= 10;
  } while (v != 0);
  return "2.25." + digits;
}

std::string ds(double v) {
  std::ostringstream s;
  s.precision(10);
  s << (std::abs(v) < 1e-12 ? 0.0 : v);
  return s.str();
}

bool is_tag_key(const std::string& k) {
  return k.size() == 9 && k[4] == '|' &&
         std::all_of(k.begin(), k.end(), [](char c) { return c == '|' || std::isxdigit(c); });
}

// Tags describing pixel storage and per-slice position are recomputed on output, not copied.
bool tag_recomputed(const std::string& k, bool pixels_changed) {
  std::string g = lower(k.substr(0, 4));
  std::string key = lower(k);
  if (g == "0002" || g == "7fe0") return true;  // file meta, pixel data
  // Storage, spacing, rescale and display windows are rewritten; photometric interpretation stays.
  if (g == "0028") return key != "0028|0004";
  if (key == "0020|0032" || key == "0020|0037" || key == "0020|0013" || key == "0008|0018" ||
      key == "0020|1041")
    return true;
  if (pixels_changed && (key == "0020|000e" || key == "0008|0008")) return true;
  return false;
}

// How pixel values are stored: directly as a <= 16-bit integer type, or (rescaled) as integers
// of `bits` bits with value = stored * slope + intercept.
struct DicomStorage {
  PixelType direct = PixelType::I16;
  bool rescaled = false;
  double slope = 1, intercept = 0;
  int bits = 16;
  bool is_signed = false;
};

template <class T>
void write_dicom_typed(const Image& im, const fs::path& dir, const WriteOptions& opt,
                       const DicomStorage& st) {
  using Volume = itk::Image<T, 3>;
  using Slice = itk::Image<T, 2>;
  auto vol = Volume::New();
  typename Volume::SizeType size;
  for (unsigned i = 0; i < 3; ++i) size[i] = itk::SizeValueType(im.size[i]);
  vol->SetRegions(typename Volume::RegionType(size));
  typename Volume::SpacingType sp;
  typename Volume::PointType org;
  typename Volume::DirectionType dir3;
  for (unsigned i = 0; i < 3; ++i) {
    sp[i] = im.geometry.spacing[i];
    org[i] = im.geometry.origin[i];
    for (unsigned j = 0; j < 3; ++j) dir3[i][j] = im.geometry.direction[i * 3 + j];
  }
  vol->SetSpacing(sp);
  vol->SetOrigin(org);
  vol->SetDirection(dir3);
  vol->Allocate();
  T* dst = vol->GetBufferPointer();
  const float* src = im.channel(0);
  if (st.rescaled) {
    // GDCM rounds (v - intercept) / slope without clamping: clamp here to the stored range.
    const double smax =
        st.is_signed ? std::ldexp(1.0, st.bits - 1) - 1 : std::ldexp(1.0, st.bits) - 1;
    const double smin = st.is_signed ? -std::ldexp(1.0, st.bits - 1) : 0;
    const double lo = smin * st.slope + st.intercept, hi = smax * st.slope + st.intercept;
    for (int64_t i = 0; i < im.voxels(); ++i)
      dst[i] = T(std::isnan(src[i]) ? lo : std::clamp(double(src[i]), lo, hi));
  } else {
    for (int64_t i = 0; i < im.voxels(); ++i) dst[i] = cast_value<T>(src[i]);
  }

  itk::MetaDataDictionary base;
  for (const auto& [k, v] : im.meta)
    if (is_tag_key(k) && !tag_recomputed(k, opt.new_uids))
      itk::EncapsulateMetaData<std::string>(base, k, v);
  const std::string series_uid =
      opt.new_uids || !im.meta.count("0020|000e") ? new_dicom_uid() : im.meta.at("0020|000e");
  itk::EncapsulateMetaData<std::string>(base, "0020|000e", series_uid);
  if (!im.meta.count("0020|000d"))
    itk::EncapsulateMetaData<std::string>(base, "0020|000d", new_dicom_uid());
  if (!im.meta.count("0008|0060")) itk::EncapsulateMetaData<std::string>(base, "0008|0060", "OT");
  if (opt.new_uids) {
    itk::EncapsulateMetaData<std::string>(base, "0008|0008", "DERIVED\\SECONDARY");
    itk::EncapsulateMetaData<std::string>(base, "0008|2111", "harmonized by Concord");
  }
  if (st.rescaled) {
    // GDCM stores a float buffer as integers through the modality rescale
    // (stored = round((value - intercept) / slope)), given the stored layout and the rescale.
    itk::EncapsulateMetaData<std::string>(base, "0028|1052", ds(st.intercept));
    itk::EncapsulateMetaData<std::string>(base, "0028|1053", ds(st.slope));
    itk::EncapsulateMetaData<std::string>(base, "0028|0100", std::to_string(st.bits));
    itk::EncapsulateMetaData<std::string>(base, "0028|0101", std::to_string(st.bits));
    itk::EncapsulateMetaData<std::string>(base, "0028|0102", std::to_string(st.bits - 1));
    itk::EncapsulateMetaData<std::string>(base, "0028|0103", st.is_signed ? "1" : "0");
  }
  if (!im.meta.count("0028|0004"))
    itk::EncapsulateMetaData<std::string>(base, "0028|0004", "MONOCHROME2");
  const auto& D = im.geometry.direction;
  const std::string iop = ds(D[0]) + "\\" + ds(D[3]) + "\\" + ds(D[6]) + "\\" + ds(D[1]) + "\\" +
                          ds(D[4]) + "\\" + ds(D[7]);
  itk::EncapsulateMetaData<std::string>(base, "0020|0037", iop);
  itk::EncapsulateMetaData<std::string>(base, "0018|0050", ds(im.geometry.spacing[2]));
  itk::EncapsulateMetaData<std::string>(base, "0018|0088", ds(im.geometry.spacing[2]));

  std::vector<itk::MetaDataDictionary> dicts(size_t(im.size[2]), base);
  std::vector<itk::MetaDataDictionary*> dict_ptrs;
  std::vector<std::string> names;
  for (int64_t z = 0; z < im.size[2]; ++z) {
    auto& d = dicts[size_t(z)];
    typename Volume::IndexType idx{{0, 0, z}};
    typename Volume::PointType p;
    vol->TransformIndexToPhysicalPoint(idx, p);
    itk::EncapsulateMetaData<std::string>(d, "0020|0032",
                                          ds(p[0]) + "\\" + ds(p[1]) + "\\" + ds(p[2]));
    itk::EncapsulateMetaData<std::string>(d, "0020|0013", std::to_string(z + 1));
    itk::EncapsulateMetaData<std::string>(d, "0008|0018", new_dicom_uid());
    dict_ptrs.push_back(&d);
    char name[32];
    std::snprintf(name, sizeof name, "IM%05lld.dcm", static_cast<long long>(z + 1));
    names.push_back((dir / name).string());
  }
  auto io = itk::GDCMImageIO::New();
  io->KeepOriginalUIDOn();  // UIDs are managed above: new series/instance UIDs, study kept
  auto writer = itk::ImageSeriesWriter<Volume, Slice>::New();
  writer->SetInput(vol);
  writer->SetImageIO(io);
  writer->SetFileNames(names);
  writer->SetMetaDataDictionaryArray(&dict_ptrs);
  writer->Update();
}

// Keep: the original stored layout and rescale when the values still fit it exactly, else the
// original <= 16-bit type, else 16-bit integers when the values are integers in range.
// Otherwise (and for the float32 policy) 16-bit unsigned with a rescale spanning the range.
DicomStorage choose_dicom_storage(const Image& im, bool keep) {
  const float* v = im.channel(0);
  const int64_t n = im.voxels();
  float lo = std::numeric_limits<float>::max(), hi = std::numeric_limits<float>::lowest();
  bool integral = true;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(v[i])) continue;
    lo = std::min(lo, v[i]);
    hi = std::max(hi, v[i]);
    if (integral && v[i] != std::nearbyint(v[i])) integral = false;
  }
  if (lo > hi) lo = hi = 0;
  DicomStorage st;
  if (keep) {
    const double m = meta_number(im, "0028|1053", 1), b = meta_number(im, "0028|1052", 0);
    const int bits = int(meta_number(im, "0028|0100", 0));
    const bool sgn = meta_number(im, "0028|0103", 0) == 1;
    if ((m != 1 || b != 0) && m != 0 && (bits == 8 || bits == 16)) {
      const double smax = sgn ? std::ldexp(1.0, bits - 1) - 1 : std::ldexp(1.0, bits) - 1;
      const double smin = sgn ? -std::ldexp(1.0, bits - 1) : 0;
      bool fits = true;
      for (int64_t i = 0; i < n && fits; ++i) {
        const double s = (double(v[i]) - b) / m;
        fits = std::abs(s - std::nearbyint(s)) < 1e-3 && s >= smin - 0.5 && s <= smax + 0.5;
      }
      if (fits) {
        st.rescaled = true;
        st.slope = m;
        st.intercept = b;
        st.bits = bits;
        st.is_signed = sgn;
        return st;
      }
    }
    switch (im.pixel_type) {
      case PixelType::U8:
      case PixelType::I8:
      case PixelType::U16:
      case PixelType::I16:
        st.direct = im.pixel_type;
        return st;
      default:
        break;
    }
    if (integral && lo >= -32768 && hi <= 32767) return st;  // I16
    if (integral && lo >= 0 && hi <= 65535) {
      st.direct = PixelType::U16;
      return st;
    }
  }
  st.rescaled = true;
  st.bits = 16;
  st.is_signed = false;
  // Rounded to what the DS text of the tags holds, so that reading back agrees.
  st.intercept = std::stod(ds(lo));
  st.slope = hi > lo ? std::stod(ds((double(hi) - st.intercept) / 65535.0 * (1 + 1e-9))) : 1.0;
  return st;
}

void write_dicom_series(const Image& im, const std::string& path, const WriteOptions& opt) {
  register_itk_io();
  if (im.channels != 1)
    throw Error(path + ": DICOM output supports one channel, the image has " +
                std::to_string(im.channels));
  auto scratch = std::make_shared<ScratchFolder>(path);
  fs::path out = scratch->path() / "series";
  fs::create_directory(out);
  const DicomStorage st = choose_dicom_storage(im, opt.keep_pixel_type);
  try {
    auto write = [&](auto tag) { write_dicom_typed<decltype(tag)>(im, out, opt, st); };
    if (st.rescaled) {
      write(float{});
    } else {
      switch (st.direct) {
        case PixelType::U8:
          write(uint8_t{});
          break;
        case PixelType::I8:
          write(int8_t{});
          break;
        case PixelType::U16:
          write(uint16_t{});
          break;
        default:
          write(int16_t{});
          break;
      }
    }
  } catch (const itk::ExceptionObject& e) {
    throw Error(path + ": cannot write DICOM series: " + std::string(e.GetDescription()));
  }
  // The series replaces an existing one as a whole.
  publish_output(scratch, opt.publisher,
                 [](const ScratchFolder& s) { s.publish_folder("series"); });
}

}  // namespace

// ---------------------------------------------------------------------------------------------

bool is_image_file(const std::string& path) {
  Format f = format_of(path);
  return f == Format::OpenCV || f == Format::ITK;
}

size_t default_max_image_bytes() {
  const char* env = std::getenv("CONCORD_MAX_IMAGE_MB");
  if (!env || !*env) return size_t(2048) << 20;
  char* end = nullptr;
  errno = 0;
  const unsigned long long mb = std::strtoull(env, &end, 10);
  if (errno || *end || mb == 0 || mb > (uint64_t(1) << 40) || env[0] == '-')
    throw Error(std::string("CONCORD_MAX_IMAGE_MB='") + env +
                "': expected a positive whole number of MiB (the largest decoded image)");
  return size_t(mb) << 20;
}

DicomDirInfo scan_dicom_dir(const std::string& path) {
  DicomDirInfo info;
  std::error_code ec;
  fs::directory_iterator it(path, ec);
  if (ec) throw Error(path + ": cannot list folder: " + ec.message());
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    if (ec) {  // the listing itself broke off: report it, keep what was seen
      info.skipped.push_back(path + ": listing stopped: " + ec.message());
      break;
    }
    const std::string p = it->path().string();
    const std::string name = it->path().filename().string();
    std::error_code sec;
    const fs::file_status st = it->status(sec);  // follows symlinks: a loop fails here
    if (sec) {
      info.skipped.push_back(p + ": " + sec.message());
      continue;
    }
    if (!fs::is_regular_file(st) || name.empty() || name[0] == '.') continue;
    if (lower(name) == "dicomdir") continue;  // the media index, not an image
    if (extension_of(p) != ".dcm" && is_image_file(p)) {
      info.image_files.push_back(p);
      continue;
    }
    if (extension_of(p) != ".dcm" && ::access(p.c_str(), R_OK) != 0) {
      info.skipped.push_back(p + ": cannot open: " + std::strerror(errno));
      continue;
    }
    if (is_dicom_file(p)) info.dicom_files.push_back(p);
  }
  std::sort(info.dicom_files.begin(), info.dicom_files.end());
  std::sort(info.image_files.begin(), info.image_files.end());
  return info;
}

bool is_dicom_file(const std::string& path) {
  if (extension_of(path) == ".dcm") return true;
  // DICOM Part 10 files carry "DICM" after a 128-byte preamble, whatever their name.
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in && in.seekg(128) && in.read(magic, 4) && std::memcmp(magic, "DICM", 4) == 0;
}

bool is_dicom_dir(const std::string& path) {
  std::error_code ec;
  if (!fs::is_directory(path, ec)) return false;
  try {
    return scan_dicom_dir(path).has_dicom();
  } catch (const Error&) {
    return false;
  }
}

void apply_channel_policy(Image& im, ChannelPolicy policy, const std::string& what) {
  if (policy == ChannelPolicy::Keep || im.channels < 3) return;
  const size_t n = size_t(im.voxels());
  if (im.channels == 4) {
    // Alpha is recognised in 8/16-bit images (PNG, TIFF): fully opaque = the type's maximum.
    const float opaque = im.pixel_type == PixelType::U8    ? 255.f
                         : im.pixel_type == PixelType::U16 ? 65535.f
                                                           : -1.f;
    const float* a = im.channel(3);
    if (policy == ChannelPolicy::Grey ||
        (opaque > 0 && std::all_of(a, a + n, [&](float v) { return v == opaque; }))) {
      im.data.resize(3 * n);
      im.channels = 3;
    }
  }
  if (im.channels != 3) {
    if (policy == ChannelPolicy::Grey)
      throw Error(what + ": cannot convert " + std::to_string(im.channels) + " channels to grey");
    return;
  }
  const float *r = im.channel(0), *g = im.channel(1), *b = im.channel(2);
  bool same = true;
  for (size_t i = 0; i < n && same; ++i) same = r[i] == g[i] && g[i] == b[i];
  if (!same && policy == ChannelPolicy::Auto) return;
  if (!same) {
    float* out = im.channel(0);  // written in place: each voxel reads its own r, g, b first
    for (size_t i = 0; i < n; ++i) out[i] = 0.299f * r[i] + 0.587f * g[i] + 0.114f * b[i];
  }
  im.data.resize(n);
  im.channels = 1;
}

namespace {

// Checks every read image has to pass whatever its format, then the caller's policies.
void finish_image(Image& im, const std::string& path, const ReadOptions& opt) {
  const Geometry& g = im.geometry;
  for (int i = 0; i < 3; ++i)
    if (!std::isfinite(g.spacing[size_t(i)]) || g.spacing[size_t(i)] <= 0 ||
        !std::isfinite(g.origin[size_t(i)]))
      throw Error(path + ": header declares unusable geometry (spacing " +
                  std::to_string(g.spacing[0]) + " " + std::to_string(g.spacing[1]) + " " +
                  std::to_string(g.spacing[2]) + ", origin " + std::to_string(g.origin[0]) + " " +
                  std::to_string(g.origin[1]) + " " + std::to_string(g.origin[2]) + ")");
  for (double d : g.direction)
    if (!std::isfinite(d)) throw Error(path + ": header declares a non-finite direction matrix");
  size_t bad = 0;
  if (auto it = im.meta.find(kZeroedByReader); it != im.meta.end()) {
    bad = std::stoull(it->second);
    im.meta.erase(it);
  }
  if (bad || im.pixel_type == PixelType::F32 || im.pixel_type == PixelType::F64) {
    // Integer voxels are always finite; float ones (and doubles beyond float range) may not be.
    for (float v : im.data) bad += !std::isfinite(v);
    if (bad && opt.non_finite == NonFinite::Error)
      throw Error(path + ": " + std::to_string(bad) + " of " + std::to_string(im.data.size()) +
                  " voxels are not finite (NaN or Inf); refused (a policy can replace them by 0)");
    size_t replaced = 0;
    if (bad && opt.non_finite == NonFinite::Zero) {
      for (float& v : im.data)
        if (!std::isfinite(v)) v = 0.f;
      replaced = bad;
    } else if (bad && opt.non_finite == NonFinite::Keep) {
      replaced = bad - size_t(std::count_if(im.data.begin(), im.data.end(),
                                            [](float v) { return !std::isfinite(v); }));
    }
    if (replaced) {  // with Keep: those the format's library replaced anyway (NIfTI)
      spdlog::warn("{}: {} non-finite voxels replaced by 0", path, replaced);
      im.meta["concord.non_finite_replaced"] = std::to_string(replaced);
    }
  }
  apply_channel_policy(im, opt.channels, path);
}

Image read_any(const std::string& path, const ReadOptions& opt) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) throw Error(path + ": no such file or folder");
  const size_t max_bytes = max_bytes_of(opt);
  if (fs::is_directory(st)) {
    const DicomDirInfo info = scan_dicom_dir(path);
    if (!info.has_dicom()) throw Error(path + ": folder holds no DICOM files");
    return read_dicom_series(path, info, max_bytes);
  }
  if (!fs::is_regular_file(st)) throw Error(path + ": not a regular file");
  switch (format_of(path)) {
    case Format::OpenCV:
      return read_opencv(path, max_bytes);
    case Format::ITK:
    case Format::Dicom:
      return read_itk(path, max_bytes);
    case Format::Unknown:
      break;
  }
  throw Error(path + ": unknown image format (extension '" + extension_of(path) + "')");
}

}  // namespace

Image read_image(const std::string& path, const ReadOptions& options) {
  Image im = read_any(path, options);
  finish_image(im, path, options);
  return im;
}

Image read_image(const std::string& path) {
  return read_image(path, ReadOptions{});
}

void write_image(const Image& image, const std::string& path, const WriteOptions& options) {
  if (image.data.size() != size_t(image.channels * image.voxels()))
    throw Error(path + ": image buffer size does not match its size and channels");
  std::string ext = extension_of(path);
  switch (format_of(path)) {
    case Format::OpenCV:
      return write_opencv(image, path, options);
    case Format::ITK:
      return write_itk(image, path, options);
    case Format::Dicom:
      throw Error(path + ": single-file DICOM output is not supported; write a series folder");
    case Format::Unknown:
      break;
  }
  // No known extension: a folder output means a DICOM series.
  if (ext.empty()) return write_dicom_series(image, path, options);
  throw Error(path + ": unknown image format (extension '" + ext + "')");
}

void write_image(const Image& image, const std::string& path, bool keep_pixel_type) {
  WriteOptions o;
  o.keep_pixel_type = keep_pixel_type;
  write_image(image, path, o);
}

}  // namespace concord
