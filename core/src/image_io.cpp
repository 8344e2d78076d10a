// Image reading and writing: OpenCV for PNG/JPEG/BMP/TIFF, ITK for NIfTI/NRRD/MetaImage and
// DICOM series. ITK formats go through itk::ImageIOBase directly so that any dimension (2 or 3),
// component type and channel count is read without templating on them.
#include <concord/error.h>
#include <concord/image_io.h>
#include <concord/message.h>

#include <itkGDCMImageIO.h>
#include <itkGDCMImageIOFactory.h>
#include <itkGDCMSeriesFileNames.h>
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

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

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
// Atomic output helpers

std::string temp_suffix() {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t salt = std::random_device{}();
  return std::to_string(getpid()) + "-" + std::to_string((salt + counter++) % 100000000);
}

void fsync_path(const fs::path& p) {
  int fd = ::open(p.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

// A hidden scratch folder next to `target`, removed (with its contents) unless released.
class ScratchDir {
 public:
  explicit ScratchDir(const fs::path& target) {
    fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
    fs::create_directories(parent);
    path_ = parent / ("." + target.filename().string() + ".concord-tmp-" + temp_suffix());
    fs::create_directory(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// Moves every file written into `scratch` next to `target`; `target` itself goes last, so a
// header (.mhd, .nhdr) appears only once its data file is complete.
void publish_files(const fs::path& scratch, const fs::path& target) {
  fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(scratch)) files.push_back(e.path());
  std::stable_partition(files.begin(), files.end(),
                        [&](const fs::path& f) { return f.filename() != target.filename(); });
  for (const auto& f : files) {
    fsync_path(f);
    std::error_code ec;
    fs::rename(f, parent / f.filename(), ec);
    if (ec)
      throw Error("cannot move " + f.string() + " to " + (parent / f.filename()).string() + ": " +
                  ec.message());
  }
}

// Runs `publish` (fsync + rename out of `scratch`) now, or on the options' publisher thread; the
// scratch folder lives until then. Without `publish`: publish_files(scratch, target).
void finish_output(std::shared_ptr<ScratchDir> scratch, const fs::path& target,
                   const WriteOptions& opt, std::function<void()> publish = {}) {
  if (!publish) publish = [dir = scratch->path(), target] { publish_files(dir, target); };
  if (!opt.publisher) return publish();
  opt.publisher->submit(
      target.string(), [scratch = std::move(scratch), publish = std::move(publish)] { publish(); });
}

// Writes bytes to a new file without flushing it (publish_files flushes before the rename).
void write_bytes(const fs::path& file, const void* data, size_t size) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  if (!out) throw Error("cannot create " + file.string() + ": " + std::strerror(errno));
  out.write(static_cast<const char*>(data), std::streamsize(size));
  out.close();
  if (!out) throw Error("cannot write " + file.string() + ": " + std::strerror(errno));
}

// ---------------------------------------------------------------------------------------------
// OpenCV formats

Image read_opencv(const std::string& path) {
  cv::Mat m = cv::imread(path, cv::IMREAD_UNCHANGED);
  if (m.empty()) throw Error(path + ": cannot decode image (corrupt or unsupported file)");
  if (m.dims != 2) throw Error(path + ": unsupported image layout");
  const int ch = m.channels();
  if (ch == 3) cv::cvtColor(m, m, cv::COLOR_BGR2RGB);
  if (ch == 4) cv::cvtColor(m, m, cv::COLOR_BGRA2RGBA);
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
  cv::Mat f;
  m.convertTo(f, CV_MAKETYPE(CV_32F, ch));
  std::vector<cv::Mat> planes;
  cv::split(f, planes);
  const int64_t n = im.voxels();
  for (int c = 0; c < ch; ++c) {
    cv::Mat p = planes[c].isContinuous() ? planes[c] : planes[c].clone();
    std::memcpy(im.channel(c), p.ptr<float>(), size_t(n) * sizeof(float));
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
  const fs::path target(path);
  auto scratch = std::make_shared<ScratchDir>(target);
  write_bytes(scratch->path() / target.filename(), bytes.data(), bytes.size());
  finish_output(scratch, target, opt);
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
    return size_t(std::max(352.f, off));
  }
  if (size == 540 && n >= 176) {  // NIfTI-2: int64 vox_offset at byte 168
    uint64_t off;
    std::memcpy(&off, hdr + 168, 8);
    if (swap) off = __builtin_bswap64(off);
    return size_t(std::max<uint64_t>(544, off));
  }
  throw Error(path + ": not a NIfTI header");
}

void check_nifti_complete(const std::string& path, size_t data_bytes) {
  const bool gz = extension_of(path) == ".nii.gz";
  if (!gz) {
    std::ifstream in(path, std::ios::binary);
    char hdr[544] = {};
    in.read(hdr, sizeof hdr);
    const size_t need = nifti_data_offset(hdr, size_t(in.gcount()), path) + data_bytes;
    if (fs::file_size(path) < need)
      throw Error(path + ": file is truncated (" + std::to_string(fs::file_size(path)) +
                  " bytes, the header describes " + std::to_string(need) + ")");
    return;
  }
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) throw Error(path + ": cannot open");
  std::vector<char> buf(1 << 18);
  int got = gzread(f, buf.data(), 544);
  if (got < 348) {
    gzclose(f);
    throw Error(path + ": truncated or corrupt compressed header");
  }
  const uint64_t need = nifti_data_offset(buf.data(), size_t(got), path) + data_bytes;
  // Fast path: the gzip trailer records the uncompressed length (mod 2^32).
  std::ifstream raw(path, std::ios::binary | std::ios::ate);
  uint32_t isize = 0;
  if (raw.tellg() >= 4) {
    raw.seekg(-4, std::ios::end);
    raw.read(reinterpret_cast<char*>(&isize), 4);
  }
  if (isize == uint32_t(need & 0xffffffffu)) {
    gzclose(f);
    return;
  }
  uint64_t total = uint64_t(got);
  int n;
  while ((n = gzread(f, buf.data(), unsigned(buf.size()))) > 0) total += uint64_t(n);
  int err = 0;
  const char* msg = gzerror(f, &err);
  std::string reason = n < 0 || (err != Z_OK && err != Z_BUF_ERROR) ? std::string(msg) : "";
  gzclose(f);
  if (!reason.empty()) throw Error(path + ": corrupt compressed data (" + reason + ")");
  if (total < need)
    throw Error(path + ": file is truncated (" + std::to_string(total) +
                " uncompressed bytes, the header describes " + std::to_string(need) + ")");
}

void check_metaimage_complete(const std::string& path, size_t data_bytes) {
  std::ifstream in(path, std::ios::binary);
  std::string line, data_file;
  bool compressed = false;
  int64_t header_size = 0;
  while (std::getline(in, line)) {
    auto eq = line.find('=');
    if (eq == std::string::npos) continue;
    std::string key = line.substr(0, eq), value = line.substr(eq + 1);
    auto trim = [](std::string& t) {
      t.erase(0, t.find_first_not_of(" \t\r"));
      t.erase(t.find_last_not_of(" \t\r") + 1);
    };
    trim(key);
    trim(value);
    if (key == "CompressedData") compressed = lower(value) == "true";
    if (key == "HeaderSize") header_size = std::atoll(value.c_str());
    if (key == "ElementDataFile") {
      data_file = value;
      break;
    }
  }
  if (compressed || data_file.empty()) return;  // compressed streams report their own errors
  uint64_t available;
  if (data_file == "LOCAL") {
    available = fs::file_size(path) - uint64_t(in.tellg());
  } else {
    if (data_file == "LIST" || data_file.find('%') != std::string::npos) return;
    fs::path df = fs::path(path).parent_path() / data_file;
    if (!fs::exists(df)) throw Error(path + ": data file " + df.string() + " is missing");
    available = fs::file_size(df);
    if (header_size > 0) available -= std::min<uint64_t>(available, uint64_t(header_size));
  }
  if (available < data_bytes)
    throw Error(path + ": file is truncated (" + std::to_string(available) +
                " data bytes, the header describes " + std::to_string(data_bytes) + ")");
}

void check_not_truncated(const std::string& path, size_t data_bytes) {
  const std::string ext = extension_of(path);
  if (ext == ".nii" || ext == ".nii.gz") check_nifti_complete(path, data_bytes);
  if (ext == ".mha" || ext == ".mhd") check_metaimage_complete(path, data_bytes);
}

Image read_itk(const std::string& path) {
  register_itk_io();
  itk::ImageIOBase::Pointer io =
      itk::ImageIOFactory::CreateImageIO(path.c_str(), itk::IOFileModeEnum::ReadMode);
  if (!io) throw Error(path + ": no ITK reader recognises this file (corrupt or unsupported)");
  try {
    io->SetFileName(path);
    io->ReadImageInformation();
    unsigned ndim = io->GetNumberOfDimensions();
    // Trailing singleton dimensions (e.g. NIfTI 4D with one volume) are dropped.
    while (ndim > 2 && io->GetDimensions(ndim - 1) == 1) --ndim;
    if (ndim > 3)
      throw Error(path + ": " + std::to_string(ndim) +
                  "D images are not supported (2D or 3D only)");
    const int ncomp = int(io->GetNumberOfComponents());
    std::array<int64_t, 3> size{1, 1, 1};
    for (unsigned i = 0; i < ndim; ++i) size[i] = int64_t(io->GetDimensions(i));
    Image im(ndim <= 2 ? 2 : 3, ncomp, size);
    im.pixel_type = pixel_type_of(io->GetComponentType());
    geometry_from_io(*io, ndim, im.geometry);

    const unsigned io_dims = io->GetNumberOfDimensions();
    itk::ImageIORegion region(io_dims);
    for (unsigned i = 0; i < io_dims; ++i) {
      region.SetIndex(i, 0);
      region.SetSize(i, io->GetDimensions(i));
    }
    io->SetIORegion(region);
    const size_t bytes = io->GetImageSizeInBytes();
    check_not_truncated(path, bytes);
    std::unique_ptr<char[]> buf(new char[bytes]);  // filled by Read: no zeroing pass
    io->Read(buf.get());
    to_planar(io->GetComponentType(), buf.get(), ncomp, im.voxels(), im.data.data(), path);
    return im;
  } catch (const itk::ExceptionObject& e) {
    throw Error(path + ": cannot read: " + std::string(e.GetDescription()));
  }
}

void write_itk(const Image& im, const std::string& path, const WriteOptions& opt) {
  register_itk_io();
  const fs::path target(path);
  auto scratch = std::make_shared<ScratchDir>(target);
  const std::string tmp = (scratch->path() / target.filename()).string();
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
  finish_output(scratch, target, opt);
}

// ---------------------------------------------------------------------------------------------
// DICOM series

using DicomSlices = std::vector<std::string>;

DicomSlices dicom_series_files(const std::string& dir) {
  register_itk_io();
  auto names = itk::GDCMSeriesFileNames::New();
  names->SetUseSeriesDetails(false);
  names->SetRecursive(false);
  names->SetDirectory(dir);
  const auto& uids = names->GetSeriesUIDs();
  if (uids.empty()) throw Error(dir + ": no DICOM series found in this folder");
  if (uids.size() > 1) {
    std::string list;
    for (const auto& u : uids) list += "\n  " + u;
    throw Error(dir + ": the folder holds " + std::to_string(uids.size()) +
                " DICOM series; put each series in its own folder:" + list);
  }
  return names->GetFileNames(uids.front());
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

Image read_dicom_series(const std::string& dir) {
  DicomSlices files = dicom_series_files(dir);
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
  fs::path target(path);
  while (!target.empty() && target.filename().empty()) target = target.parent_path();
  auto scratch = std::make_shared<ScratchDir>(target);
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
  finish_output(scratch, target, opt, [out, old = scratch->path() / "previous", target] {
    for (const auto& e : fs::directory_iterator(out)) fsync_path(e.path());
    // Replace the folder as a whole: old content moves aside first, then is deleted.
    std::error_code ec;
    if (fs::exists(target)) {
      fs::rename(target, old, ec);
      if (ec) throw Error("cannot replace " + target.string() + ": " + ec.message());
    }
    fs::rename(out, target, ec);
    if (ec) throw Error("cannot move DICOM series to " + target.string() + ": " + ec.message());
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------

bool is_image_file(const std::string& path) {
  Format f = format_of(path);
  return f == Format::OpenCV || f == Format::ITK;
}

bool is_dicom_dir(const std::string& path) {
  std::error_code ec;
  if (!fs::is_directory(path, ec)) return false;
  int looked = 0;
  for (const auto& e : fs::directory_iterator(path, ec)) {
    if (!e.is_regular_file(ec)) continue;
    if (extension_of(e.path().string()) == ".dcm") return true;
    // DICOM Part 10 files carry "DICM" after a 128-byte preamble, whatever their name.
    std::ifstream in(e.path(), std::ios::binary);
    char magic[4] = {};
    if (in.seekg(128) && in.read(magic, 4) && std::memcmp(magic, "DICM", 4) == 0) return true;
    if (++looked >= 8) break;
  }
  return false;
}

Image read_image(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw Error(path + ": no such file or folder");
  if (fs::is_directory(path, ec)) {
    if (!is_dicom_dir(path)) throw Error(path + ": folder holds no DICOM files");
    return read_dicom_series(path);
  }
  switch (format_of(path)) {
    case Format::OpenCV:
      return read_opencv(path);
    case Format::ITK:
    case Format::Dicom:
      return read_itk(path);
    case Format::Unknown:
      break;
  }
  throw Error(path + ": unknown image format (extension '" + extension_of(path) + "')");
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

// ---------------------------------------------------------------------------------------------
// OutputPublisher

struct OutputPublisher::State {
  Done done;
  size_t max_pending;
  std::mutex mutex;
  std::condition_variable changed;
  std::deque<std::pair<std::string, std::function<void()>>> queue;
  size_t in_flight = 0;  // queued + being published
  bool closing = false;
  std::thread thread;

  void run() {
    for (;;) {
      std::pair<std::string, std::function<void()>> job;
      {
        std::unique_lock<std::mutex> lock(mutex);
        changed.wait(lock, [&] { return closing || !queue.empty(); });
        if (queue.empty()) return;  // closing and drained
        job = std::move(queue.front());
        queue.pop_front();
      }
      std::string error;
      try {
        job.second();
      } catch (const std::exception& e) {
        error = e.what();
      }
      job.second = nullptr;  // releases the scratch folder before reporting
      if (done) {
        try {
          done(job.first, error);
        } catch (const std::exception& e) {
          spdlog::error("output publisher: callback for {} failed: {}", job.first, e.what());
        }
      } else if (!error.empty()) {
        spdlog::error("{}", error);
      }
      {
        std::lock_guard<std::mutex> lock(mutex);
        --in_flight;
      }
      changed.notify_all();
    }
  }
};

OutputPublisher::OutputPublisher(Done done, size_t max_pending) : state_(new State) {
  state_->done = std::move(done);
  state_->max_pending = std::max<size_t>(1, max_pending);
  state_->thread = std::thread([s = state_.get()] { s->run(); });
}

OutputPublisher::~OutputPublisher() {
  finish();
}

void OutputPublisher::finish() {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (state_->closing) return;
    state_->closing = true;
  }
  state_->changed.notify_all();
  if (state_->thread.joinable()) state_->thread.join();
}

void OutputPublisher::submit(const std::string& path, std::function<void()> publish) {
  State& s = *state_;
  {
    std::unique_lock<std::mutex> lock(s.mutex);
    s.changed.wait(lock, [&] { return s.closing || s.in_flight < s.max_pending; });
    if (s.closing) throw Error(path + ": output publisher already finished");
    s.queue.emplace_back(path, std::move(publish));
    ++s.in_flight;
  }
  s.changed.notify_all();
}

}  // namespace concord
