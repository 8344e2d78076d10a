// Throughput of the amplitude harmonizer (mode normalize, one thread) against the floor: the
// bare FFTW r2c + c2r round trip of the same image with the same planner effort. Prints one
// "key value" line per figure; bench/amplitude/run.sh adds the numpy baseline and the ratios.
//
// Usage: bench_amplitude [seconds-per-measurement (0.5)] [beta (1)] [which: all|2d|3d (all)]
#include <concord/harmonizer.h>
#include <concord/registry.h>

#include <fftw3.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>

using namespace concord;
using Clock = std::chrono::steady_clock;

namespace {

Image make_image(int dim, int64_t n, uint64_t seed, float gain, float offset) {
  Image im(dim, 1, {n, n, dim == 3 ? n : 1});
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < im.data.size(); ++i) {
    const int64_t x = int64_t(i) % n, y = (int64_t(i) / n) % n;
    im.data[i] = float(offset + gain * (std::sin(0.05 * x) + std::cos(0.07 * y) +
                                        double(rng() >> 11) * 0x1.0p-53));
  }
  return im;
}

// Best rate (items per second) over `repeats` blocks of about `seconds` each.
template <class F>
double best_rate(F&& once, double seconds, int repeats) {
  once();  // warm-up: plans, caches, pages
  const auto t0 = Clock::now();
  once();
  const double one = std::chrono::duration<double>(Clock::now() - t0).count();
  const int per_block = std::max(1, int(seconds / std::max(one, 1e-9)));
  double best = 0;
  for (int r = 0; r < repeats; ++r) {
    const auto s = Clock::now();
    for (int i = 0; i < per_block; ++i) once();
    const double dt = std::chrono::duration<double>(Clock::now() - s).count();
    best = std::max(best, per_block / dt);
  }
  return best;
}

void run(const Registry& reg, const std::string& label, int dim, int64_t n, double seconds,
         double beta, const std::string& planner) {
  const auto& desc = reg.get(Kind::Harmonizer, "amplitude");
  auto h = reg.create<Harmonizer>(
      Kind::Harmonizer, "amplitude",
      make_args("amplitude", desc.args,
                {{"beta", make_value(beta)}, {"fftw_planner", make_value(planner)}}),
      {1, "bench"});
  // Two sites of different style; only their spectra are combined.
  std::vector<Stats> parts;
  for (int s = 0; s < 2; ++s) {
    std::vector<Image> images;
    for (int i = 0; i < 2; ++i) images.push_back(make_image(dim, n, 10 * s + i, 20 + 30 * s, 100));
    Stats st = h->fit_site([&](const ImageVisitor& v) {
      for (const Image& im : images) v(im);
    });
    st.site = "site-" + std::to_string(s);
    parts.push_back(std::move(st));
  }
  h->set_statistics(h->combine(parts), "site-0");

  Image image = make_image(dim, n, 99, 20, 100);
  const double amp = best_rate([&] { h->apply(image); }, seconds, 5);

  // The floor: same transform sizes and planner effort, aligned arrays, nothing else.
  const int64_t voxels = int64_t(image.data.size());
  const int64_t half = (dim == 3 ? n * n : n) * (n / 2 + 1);
  float* in = fftwf_alloc_real(size_t(voxels));
  float* out = fftwf_alloc_real(size_t(voxels));
  fftwf_complex* spec = fftwf_alloc_complex(size_t(half));
  const int dims[3] = {int(n), int(n), int(n)};
  const unsigned flags = planner == "patient" ? FFTW_PATIENT : FFTW_MEASURE;
  fftwf_plan r2c = fftwf_plan_dft_r2c(dim, dims, in, spec, flags);
  fftwf_plan c2r = fftwf_plan_dft_c2r(dim, dims, spec, out, flags);
  std::copy(image.data.begin(), image.data.end(), in);
  const double floor = best_rate(
      [&] {
        fftwf_execute(r2c);
        fftwf_execute(c2r);
      },
      seconds, 5);
  fftwf_destroy_plan(r2c);
  fftwf_destroy_plan(c2r);
  fftwf_free(in);
  fftwf_free(out);
  fftwf_free(spec);
  std::printf("%s_amplitude %.3f\n%s_fftw_floor %.3f\n", label.c_str(), amp, label.c_str(), floor);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  const double seconds = argc > 1 ? std::atof(argv[1]) : 0.5;
  const double beta = argc > 2 ? std::atof(argv[2]) : 1.0;
  const std::string which = argc > 3 ? argv[3] : "all";
  const std::string planner = argc > 4 ? argv[4] : "measure";  // measure | patient
  try {
    // The plugin built next to this executable: <build>/bin/.. /lib/concord/plugins.
    const auto exe = std::filesystem::canonical("/proc/self/exe");
    const auto lib = exe.parent_path().parent_path() / "lib" / "concord" / "plugins" /
                     "libconcord-harmonizer-amplitude.so";
    Registry reg;
    PluginLoader(reg).load_file(lib.string());
    if (which != "3d") run(reg, "2d_256", 2, 256, seconds, beta, planner);
    if (which != "2d") run(reg, "3d_128", 3, 128, seconds * 4, beta, planner);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_amplitude: %s\n", e.what());
    return 1;
  }
  return 0;
}
