// n4: N4 bias-field correction (Tustison et al., IEEE TMI 29:1310, 2010) with ITK's
// N4BiasFieldCorrectionImageFilter. The log bias field is fitted on a shrunk copy of each
// channel inside a foreground mask, reconstructed at full resolution from its B-spline control
// lattice, and divided out of every voxel. Site-local: nothing to fit.
#include <concord/harmonizer.h>

#include "intensity.h"
#include "itk_bridge.h"

#include <itkBSplineControlPointImageFilter.h>
#include <itkN4BiasFieldCorrectionImageFilter.h>
#include <itkShrinkImageFilter.h>

#include <algorithm>
#include <cmath>

namespace concord {
namespace {

using namespace intensity;

class N4 : public SiteLocal {
 public:
  N4(const Args& args, const BuildContext& ctx)
      : rule_(foreground_rule(args)),
        shrink_(args.integer("shrink_factor")),
        convergence_(args.real("convergence")),
        order_(args.integer("spline_order")),
        control_points_(args.integer("control_points")),
        bins_(args.integer("histogram_bins")),
        fwhm_(args.real("bias_fwhm")),
        wiener_(args.real("wiener_noise")) {
    who_ = "harmonizer 'n4'" + (ctx.instance.empty() ? "" : " (" + ctx.instance + ")");
    for (double it : list_reals(args, "iterations")) {
      if (it < 1 || it != std::floor(it))
        throw Error(who_ + ": iterations must be positive integers, got " + std::to_string(it));
      iterations_.push_back(unsigned(it));
    }
    if (iterations_.empty()) throw Error(who_ + ": iterations needs at least one level");
    if (control_points_ <= order_) throw Error(who_ + ": control_points must exceed spline_order");
  }

  void apply(Image& image) const override {
    for (int c = 0; c < image.channels; ++c) {
      if (image.dim == 2)
        correct<2>(image, c);
      else if (image.dim == 3)
        correct<3>(image, c);
      else
        throw Error(who_ + ": unsupported image dimension " + std::to_string(image.dim));
    }
  }

 private:
  template <unsigned D>
  void correct(Image& image, int c) const {
    using Float = FloatImage<D>;
    using Mask = MaskImage<D>;
    using Correcter = itk::N4BiasFieldCorrectionImageFilter<Float, Mask, Float>;
    const std::string where = who_ + ": channel " + std::to_string(c);

    // N4 works on log intensities: voxels <= 0 cannot be in the mask.
    const float* v = image.channel(c);
    auto mask = foreground_mask(v, image.voxels(), rule_);
    int64_t inside = 0;
    for (int64_t i = 0; i < image.voxels(); ++i) inside += (mask[i] = mask[i] && v[i] > 0);
    if (inside == 0)
      throw Error(where + ": no positive foreground voxels to estimate the bias field from");

    auto input = channel_to_itk<D>(image, c);
    auto mask_img = mask_to_itk<D>(mask, image);
    typename itk::ShrinkImageFilter<Float, Float>::ShrinkFactorsType factors;
    for (unsigned d = 0; d < D; ++d)
      factors[d] = unsigned(std::max<int64_t>(1, std::min<int64_t>(shrink_, image.size[d] / 4)));
    auto shrink = itk::ShrinkImageFilter<Float, Float>::New();
    shrink->SetInput(input);
    shrink->SetShrinkFactors(factors);
    auto shrink_mask = itk::ShrinkImageFilter<Mask, Mask>::New();
    shrink_mask->SetInput(mask_img);
    shrink_mask->SetShrinkFactors(factors);

    auto n4 = Correcter::New();
    n4->SetInput(shrink->GetOutput());
    n4->SetMaskImage(shrink_mask->GetOutput());
    typename Correcter::VariableSizeArrayType iters(unsigned(iterations_.size()));
    for (size_t k = 0; k < iterations_.size(); ++k) iters[unsigned(k)] = iterations_[k];
    n4->SetMaximumNumberOfIterations(iters);
    n4->SetNumberOfFittingLevels(unsigned(iterations_.size()));
    n4->SetConvergenceThreshold(convergence_);
    n4->SetSplineOrder(unsigned(order_));
    typename Correcter::ArrayType cps;
    cps.Fill(unsigned(control_points_));
    n4->SetNumberOfControlPoints(cps);
    n4->SetNumberOfHistogramBins(unsigned(bins_));
    n4->SetBiasFieldFullWidthAtHalfMaximum(fwhm_);
    n4->SetWienerFilterNoise(wiener_);
    try {
      n4->Update();
    } catch (const itk::ExceptionObject& e) {
      throw Error(where + ": ITK N4 failed: " + e.GetDescription());
    }

    // Full-resolution log bias field from the fitted B-spline lattice.
    using FieldImage = typename Correcter::ScalarImageType;
    auto bspline =
        itk::BSplineControlPointImageFilter<typename Correcter::BiasFieldControlPointLatticeType,
                                            FieldImage>::New();
    bspline->SetInput(n4->GetLogBiasFieldControlPointLattice());
    bspline->SetSplineOrder(unsigned(order_));
    bspline->SetSize(input->GetLargestPossibleRegion().GetSize());
    bspline->SetOrigin(input->GetOrigin());
    bspline->SetSpacing(input->GetSpacing());
    bspline->SetDirection(input->GetDirection());
    bspline->Update();
    const auto* field = bspline->GetOutput()->GetBufferPointer();
    float* out = image.channel(c);
    for (int64_t i = 0; i < image.voxels(); ++i)
      out[i] = float(double(out[i]) / std::exp(double(field[i][0])));
  }

  ForegroundRule rule_;
  int64_t shrink_;
  std::vector<unsigned> iterations_;
  double convergence_;
  int64_t order_, control_points_, bins_;
  double fwhm_, wiener_;
  std::string who_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-harmonizer-n4", "0.1.0") {
  using namespace concord;
  std::vector<ArgSpec> args = {
      ArgSpec::integer("shrink_factor", 4,
                       "fit on an image shrunk by this factor per axis (capped at size/4)")
          .range(1, 16),
      ArgSpec::list("iterations", ArgType::Int, {"50", "50", "50", "50"},
                    "maximum iterations per fitting level; one entry per level")
          .range(1, 1000),
      ArgSpec::real("convergence", 0.001, "stop a level when the field's change falls below")
          .range(0, 1),
      ArgSpec::integer("spline_order", 3, "B-spline order of the bias field").range(1, 5),
      ArgSpec::integer("control_points", 4, "control points per axis at the first level")
          .range(2, 64),
      ArgSpec::integer("histogram_bins", 200, "bins of the log-intensity histogram")
          .range(16, 4096),
      ArgSpec::real("bias_fwhm", 0.15, "FWHM of the Gaussian modelling the bias (log scale)")
          .range(0.001, 10),
      ArgSpec::real("wiener_noise", 0.01, "Wiener filter noise for histogram sharpening")
          .range(0, 1)};
  for (auto& a : intensity::foreground_args("otsu")) args.push_back(a);
  registry.add({Kind::Harmonizer, "n4", "N4 bias-field correction with ITK (site-local)", args,
                factory_of<N4>()});
}
