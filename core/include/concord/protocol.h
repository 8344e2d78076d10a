// The site protocol: every message a coordinator and a site exchange, as typed builders and
// readers, with the names of its message types and fields. Nothing else in Concord spells a
// message type or key; ARCHITECTURE.md ("The site protocol") lists every message.
//
// A builder stamps the protocol version (text field kVersionKey) on the message; every reader
// refuses a message of another version, naming both. The wire format has its own version (the
// magic bytes in message.cpp): the protocol version changes when a message type, a field or its
// meaning changes, the wire version when the byte layout does.
//
// Readers of what a site sends (the coordinator's side) return Checked<T>: the value, checked,
// or why it is unusable (the caller names the site). Readers of what a coordinator sends (the
// site's side) throw Error.
#pragma once

#include <concord/harmonizer.h>
#include <concord/message.h>
#include <concord/secagg.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace concord {
namespace protocol {

// 2: state export/restore for checkpoints through the Channel; FedProx's mu no longer sent.
// 3: differential privacy settings in train requests, the accountant in checkpoints, secure
//    aggregation's messages.
constexpr int kVersion = 3;

// Message types. Coordinator to site:
inline constexpr const char* kTrain = "train";                     // train one round locally
inline constexpr const char* kBroadcast = "broadcast";             // the new global state
inline constexpr const char* kEvaluate = "evaluate";               // evaluate on the test split
inline constexpr const char* kFit = "fit";                         // a harmonizer's site statistics
inline constexpr const char* kSetStatistics = "harmonizer-stats";  // global statistics to apply
inline constexpr const char* kPersonalize = "personalize";         // the adapter's personalisation
inline constexpr const char* kExportState = "export-state";        // the site's state, to keep
inline constexpr const char* kRestoreState = "restore-state";      // a kept state, to resume
// Secure aggregation (secure_round.cpp, secagg.h), one round in four exchanges:
inline constexpr const char* kSecAggSetup = "secagg-setup";  // the round's settings, site number
inline constexpr const char* kSecAggShareKeys = "secagg-share-keys";  // neighbours' public keys
inline constexpr const char* kSecAggTrain = "secagg-train";    // train; shares addressed to it
inline constexpr const char* kSecAggUnmask = "secagg-unmask";  // who survived, who dropped
// Site to coordinator:
inline constexpr const char* kUpdate = "update";               // reply to train
inline constexpr const char* kMetrics = "metrics";             // reply to evaluate
inline constexpr const char* kStats = "stats";                 // reply to fit
inline constexpr const char* kSiteState = "site-state";        // reply to export-state
inline constexpr const char* kSecAggAdvert = "secagg-advert";  // reply to secagg-setup
inline constexpr const char* kSecAggShares = "secagg-shares";  // reply to secagg-share-keys
inline constexpr const char* kSecAggMasked = "secagg-masked";  // reply to secagg-train
inline constexpr const char* kSecAggReveal = "secagg-reveal";  // reply to secagg-unmask
// reply to broadcast, harmonizer-stats, personalize, restore-state:
inline constexpr const char* kAck = "ack";
// Files the coordinator writes in the same form:
inline constexpr const char* kCheckpoint = "checkpoint";     // checkpoints/round-NNNN.ckpt
inline constexpr const char* kGlobalState = "global-state";  // <run>/global.state

// Field names. Text:
inline constexpr const char* kVersionKey = "__protocol";  // every message: kVersion in decimal
inline constexpr const char* kPhase = "phase";            // evaluate, metrics
inline constexpr const char* kPipeline = "pipeline";      // checkpoint: the resolved pipeline
inline constexpr const char* kFailures = "failures";      // checkpoint: JSON list of failures
inline constexpr const char* kMethod = "method";          // statistics file: the harmonizer type
// Scalars:
inline constexpr const char* kHarmonizer = "__harmonizer";   // fit, harmonizer-stats: the index
inline constexpr const char* kWeight = "__weight";           // stats, harmonizer-stats
inline constexpr const char* kNumSamples = "num_samples";    // update
inline constexpr const char* kTrainLoss = "train_loss";      // update
inline constexpr const char* kSteps = "steps";               // update
inline constexpr const char* kNumTest = "num_test";          // metrics
inline constexpr const char* kLocalEpochs = "local_epochs";  // train
inline constexpr const char* kTrained = "trained";           // site-state, restore-state
inline constexpr const char* kDpClip = "dp_clip";            // train: clip the delta to this
inline constexpr const char* kDpNoiseStd = "dp_noise_std";   // train: local noise std per value
// Values of kPhase:
inline constexpr const char* kPhaseGlobal = "global";
inline constexpr const char* kPhasePersonalized = "personalized";

// The most samples one upload may claim: weights beyond it would let one site outvote the rest.
constexpr double kMaxUploadSamples = 1e9;

// A reader's answer: the checked value, or (problem non-empty) why the message is unusable.
template <typename T>
struct Checked {
  std::optional<T> value;
  std::string problem;
  bool ok() const { return problem.empty(); }
  static Checked fail(std::string why) { return Checked{std::nullopt, std::move(why)}; }
  static Checked of(T v) { return Checked{std::move(v), ""}; }
};

// "" when `m` speaks this build's protocol version, else why not (naming both versions).
std::string version_problem(const Message& m);

// ---- coordinator to site -------------------------------------------------------------------

// What a site is asked to do. request_kind() checks the version and the type and throws Error
// for another version or an unknown type.
enum class Request {
  Train,
  Broadcast,
  Evaluate,
  Fit,
  SetStatistics,
  Personalize,
  ExportState,
  RestoreState,
  SecAggSetup,
  SecAggShareKeys,
  SecAggTrain,
  SecAggUnmask,
  // The learned-harmonizer stage (below).
  LearnBegin,
  Learn,
  LearnResult,
  LearnExport,
  LearnRestore
};
Request request_kind(const Message& m);

// train: the round's settings (local_epochs).
Message train_request(int64_t round, const std::map<std::string, double>& settings);
struct TrainSettings {
  int local_epochs = 1;  // a whole number in [1, 100000]
  // Client-level DP (privacy.h): clip the delta to L2 norm dp_clip (finite > 0; 0 = no DP), add
  // N(0, dp_noise_std^2) per value (finite >= 0; only with dp_clip).
  double dp_clip = 0;
  double dp_noise_std = 0;
  std::map<std::string, double> all;  // every setting, as sent
};
TrainSettings read_train_request(const Message& m);

Message broadcast(int64_t round, NamedArrays global);

Message evaluate_request(int64_t round, const std::string& phase);
// The phase (kPhaseGlobal or kPhasePersonalized).
std::string read_evaluate_request(const Message& m);

Message fit_request(size_t harmonizer);
// The harmonizer index of a fit or harmonizer-stats request: a whole number in [0, count).
size_t read_harmonizer(const Message& m, size_t count);

Message set_statistics(size_t harmonizer, Stats global);
struct SetStatistics {
  size_t harmonizer = 0;
  Stats stats;
};
SetStatistics read_set_statistics(Message&& m, size_t count);

Message personalize_request(int64_t round);

// A site's own state, kept by the coordinator in checkpoints (export-state, restore-state): the
// model entries its adapter keeps local, the adapter's store, whether it has trained.
struct SiteState {
  NamedArrays local, store;
  bool trained = false;
};
Message export_state_request(int64_t round);
Message restore_state_request(int64_t round, SiteState state);
// The state a restore-state request carries (local/ and store/ entries, the trained flag).
SiteState read_restore_state(Message&& m);

// ---- site to coordinator -------------------------------------------------------------------

Message ack(const std::string& site, int64_t round);
// "" for an ack of this version, else why not.
std::string ack_problem(const Message& reply);

// update: the shared state after local training. num_samples 0: nothing trained (no state).
Message update(const std::string& site, int64_t round, NamedArrays state, double num_samples,
               double train_loss, int64_t steps);
Message empty_update(const std::string& site, int64_t round);
struct Upload {
  NamedArrays state;
  double num_samples = 0;  // 0: the site had nothing to train on (nothing else is checked)
  double train_loss = 0;
  std::map<std::string, double> scalars;  // every scalar the site sent
};
// Checks: type update; num_samples a whole number in [0, kMaxUploadSamples]; when > 0,
// train_loss present, every scalar finite, the state as `global` has it (names, dtypes, shapes)
// with finite values.
Checked<Upload> read_update(Message&& reply, const NamedArrays& global);

// stats: a harmonizer's statistics at one site (Stats::site is not sent).
Message statistics(const std::string& site, Stats stats);
// Checks: type stats; finite scalars and values; a weight that is there, finite and >= 0.
Checked<Stats> read_statistics(Message&& reply);
// "" when `stats` has the entries (names, dtypes, shapes) and scalars of `reference` (what most
// sites send), else the difference.
std::string statistics_mismatch(const Stats& stats, const Stats& reference);

// metrics: the metric values at one site (NaN: undefined, e.g. AUC with one class).
Message metrics(const std::string& site, int64_t round, const std::string& phase, int64_t num_test,
                const std::map<std::string, double>& values);
struct Metrics {
  std::string phase;
  double num_test = 0;
  std::map<std::string, double> values;  // without num_test
};
// Checks: type metrics; no infinite value.
Checked<Metrics> read_metrics(Message&& reply);

// site-state: the reply to export-state.
Message site_state(const std::string& site, int64_t round, SiteState state);
// Checks: type site-state; every entry under local/ or store/; finite floating-point values.
Checked<SiteState> read_site_state(Message&& reply);

// ---- secure aggregation ---------------------------------------------------------------------
// The coordinator relays keys and encrypted shares and receives masked inputs only (secagg.h).
// Site numbers are the places of the round's selected sites, in selection order.

// secagg-setup: the round's secagg::Config and the site's number.
Message secagg_setup(int64_t round, const secagg::Config& config, uint32_t index);
struct SecAggSetup {
  secagg::Config config;
  uint32_t index = 0;
};
// Checks every field (secagg::Config::check()) and index < sites; throws Error.
SecAggSetup read_secagg_setup(const Message& m);

// secagg-advert: the site's two public keys.
Message secagg_advert(const std::string& site, int64_t round, const secagg::KeyAdvert& advert);
// Checks: type; 32-byte keys; the site number `index` it was given.
Checked<secagg::KeyAdvert> read_secagg_advert(Message&& reply, uint32_t index);

// secagg-share-keys: the adverts to relay to one site.
Message secagg_share_keys(int64_t round, const std::vector<secagg::KeyAdvert>& keys);
std::vector<secagg::KeyAdvert> read_secagg_share_keys(const Message& m, uint32_t sites);

// secagg-shares: one encrypted box per neighbour.
Message secagg_shares(const std::string& site, int64_t round, const secagg::ShareKeys& shares);
// Checks: type; recipients distinct, below `sites`, not the sender; boxes of at most 4 KiB.
Checked<secagg::ShareKeys> read_secagg_shares(Message&& reply, uint32_t index, uint32_t sites);

// secagg-train: the train request's settings and the shares addressed to the site.
Message secagg_train(int64_t round, const std::map<std::string, double>& settings,
                     const secagg::ShareDelivery& delivery);
struct SecAggTrain {
  TrainSettings settings;
  secagg::ShareDelivery delivery;
};
SecAggTrain read_secagg_train(const Message& m, uint32_t index, uint32_t sites);

// secagg-masked: the masked weighted delta and weight (L + 1 words), the train loss and steps.
// No sample count: the weight travels inside the masked vector.
Message secagg_masked(const std::string& site, int64_t round, const secagg::MaskedInput& input,
                      double train_loss, int64_t steps);
struct SecAggMasked {
  secagg::MaskedInput input;
  double train_loss = 0;
};
// Checks: type; `length` + 1 words, each below 2^modulus_bits; a finite train loss.
Checked<SecAggMasked> read_secagg_masked(Message&& reply, uint32_t index,
                                         const secagg::Config& config);

// secagg-unmask: survivors and dropped sites.
Message secagg_unmask(int64_t round, const secagg::UnmaskRequest& request);
secagg::UnmaskRequest read_secagg_unmask(const Message& m, uint32_t sites);

// secagg-reveal: the site's shares of its neighbours' secrets.
Message secagg_reveal(const std::string& site, int64_t round, const secagg::UnmaskReply& reply);
Checked<secagg::UnmaskReply> read_secagg_reveal(Message&& reply, uint32_t index, uint32_t sites);

// ---- files -----------------------------------------------------------------------------------

struct Checkpoint {
  int64_t round = 0;
  NamedArrays global, aggregator;
  NamedArrays privacy;  // the privacy accountant's history (entries `privacy/*`)
  std::map<std::string, SiteState> sites;
  std::string pipeline;               // the resolved pipeline it was written for
  std::vector<std::string> failures;  // failures so far (a resumed run's summary keeps them)
};
Message checkpoint(const Checkpoint& c);
// Splits a checkpoint message into its parts; `sites` are the run's site names (an entry naming
// another site is an error). Arrays are copied (they do not pin the file's buffer). Throws Error.
Checkpoint read_checkpoint(Message&& m, const std::vector<std::string>& sites);

Message global_state(int64_t round, NamedArrays global);

// ---- the learned-harmonizer stage (core/src/learned_stage.h) ------------------------------
// Coordinator to site: learn-begin (the plan), learn (one round of a phase), learn-result (the
// site's statistics after the last phase), learn-export / learn-restore (checkpoints). Replies:
// ack, update (the same reply and reader as the task stage's train), stats, learn-state.
inline constexpr const char* kLearnBegin = "learn-begin";
inline constexpr const char* kLearn = "learn";
inline constexpr const char* kLearnResult = "learn-result";
inline constexpr const char* kLearnExport = "learn-export";
inline constexpr const char* kLearnRestore = "learn-restore";
inline constexpr const char* kLearnState = "learn-state";                // reply to learn-export
inline constexpr const char* kLearnedCheckpoint = "learned-checkpoint";  // file
inline constexpr const char* kPhaseIndex = "__phase";                    // learn: phase index
inline constexpr const char* kRounds = "__rounds";                       // learn: rounds of phase

// learn-begin: harmonizer index, the plan's shared Stats.
Message learn_begin(size_t harmonizer, Stats plan);
// learn: arrays "global/<entry>" (the phase's global state) and "final/<k>/<entry>" (the final
// state of earlier phase k).
struct LearnRequest {
  size_t harmonizer = 0;
  size_t phase = 0;
  int round = 1, rounds = 1, local_epochs = 1;
  NamedArrays global;
  std::vector<NamedArrays> finals;
};
Message learn_request(const LearnRequest& r);
// Checks the harmonizer index against `count`, phase, rounds and local_epochs ranges, that every
// array is under global/ or final/<k>/ with k < phase. Throws Error.
LearnRequest read_learn_request(Message&& m, size_t count);
// learn-result: the last phase's final global state.
Message learn_result_request(size_t harmonizer, NamedArrays final_global);
// learn-export / learn-state / learn-restore: a learned harmonizer's site state.
Message learn_export_request(size_t harmonizer, int64_t round);
Message learn_state(const std::string& site, int64_t round, NamedArrays state);
// Checks: type learn-state; finite floating-point values.
Checked<NamedArrays> read_learn_state(Message&& reply);
Message learn_restore_request(size_t harmonizer, int64_t round, NamedArrays state);

// learned-checkpoint (checkpoints/learned.ckpt): the stage of harmonizer `harmonizer` after
// round `round` of phase `phase`.
struct LearnedCheckpoint {
  size_t harmonizer = 0;
  size_t phase = 0;
  int64_t round = 0;
  NamedArrays global, aggregator;
  std::vector<NamedArrays> finals;
  std::map<std::string, NamedArrays> sites;
  std::string pipeline;
  std::vector<std::string> failures;
};
Message learned_checkpoint(const LearnedCheckpoint& c);
// Throws Error (unknown site, malformed entry, another version).
LearnedCheckpoint read_learned_checkpoint(Message&& m, const std::vector<std::string>& sites);

// ---- checks on named arrays ----------------------------------------------------------------

// "" when `state` has exactly the entries of `reference`, each with the same dtype and shape.
std::string state_mismatch(const NamedArrays& reference, const NamedArrays& state);
// The first floating-point entry holding a NaN or an infinity ("" when none does).
std::string non_finite_entry(const NamedArrays& state);

}  // namespace protocol
}  // namespace concord
