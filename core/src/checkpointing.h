// Checkpoint files of a run folder: checkpoints/round-NNNN.ckpt (a protocol::Checkpoint message)
// and checkpoints/latest naming the newest. What goes into a checkpoint is the coordinator's
// business (engine.cpp asks the sites for their state through the Channel); this unit only
// writes, keeps and finds the files. Torch-free.
#pragma once

#include <concord/protocol.h>

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace concord {

// Writes `c` as round-NNNN.ckpt, then points `latest` at it (both atomically), and keeps the
// two newest checkpoint files.
void write_checkpoint(const std::filesystem::path& dir, const protocol::Checkpoint& c);

// Tries the run's checkpoints newest first (the one `latest` names, then the others by round):
// each is read (protocol::read_checkpoint against `sites`) and handed to `install`, which throws
// to refuse it. Returns the round of the first one installed; 0 when the run has none yet
// (killed before its first checkpoint). An unusable checkpoint is named in a warning and the
// previous one is tried; when none can be used, the Error lists every file and its problem.
int64_t resume_from_checkpoints(const std::filesystem::path& dir,
                                const std::vector<std::string>& sites,
                                const std::function<void(protocol::Checkpoint&&)>& install);

}  // namespace concord
