// One gRPC stream of Frames, either side (a gRPC callback reactor): a write queue that sends
// control frames (heartbeat, error, welcome, shutdown) before the next payload chunk, payloads
// cut into chunks without copying them, and decoding of every received frame. Internal to
// core/net.
#pragma once

#include <concord/error.h>
#include <concord/net/wire.h>

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

namespace concord::net::detail {

inline int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The payload's bytes as a gRPC slice without a copy: the slice keeps the Buffer alive.
inline grpc::Slice payload_slice(const Bytes& payload, size_t offset, size_t size) {
  auto* keep = new Bytes(payload);
  return grpc::Slice(
      const_cast<uint8_t*>(payload->data()) + offset, size,
      [](void* p) { delete static_cast<Bytes*>(p); }, keep);
}

template <class Base>
class FramedStream : public Base {
 public:
  explicit FramedStream(size_t chunk_bytes) : chunk_bytes_(chunk_bytes) {
    last_recv_ms_ = now_ms();
  }

  // Queues a control frame (no payload); sent before any further payload chunk.
  void send_control(FrameHeader h) {
    Action a;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) return;
      control_.push_back(std::move(h));
      a = next_locked();
    }
    perform(a);
  }
  // Queues a payload (REQUEST or REPLY of `call_id`), sent in chunks. False if the stream is
  // closed.
  bool send_payload(FrameKind kind, uint64_t call_id, Bytes payload) {
    Action a;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) return false;
      Outgoing o;
      o.kind = kind;
      o.call_id = call_id;
      o.count = chunk_count_for(payload->size(), chunk_bytes_);
      o.payload = std::move(payload);
      payloads_.push_back(std::move(o));
      a = next_locked();
    }
    perform(a);
    return true;
  }
  // Drops a queued payload that has not been sent completely (a call that timed out).
  void cancel_payload(uint64_t call_id) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < payloads_.size(); ++i)
      if (payloads_[i].call_id == call_id && !(i == 0 && payloads_[i].next > 0)) {
        payloads_.erase(payloads_.begin() + long(i));
        return;
      }
  }
  int64_t last_received_ms() const { return last_recv_ms_; }
  bool closed() const {
    std::lock_guard<std::mutex> lock(mu_);
    return closed_;
  }

 protected:
  // What to do once the lock is released: gRPC may run callbacks inside these calls, so they are
  // never made while holding mu_.
  enum class Action { None, Write, Finish, WritesDone };

  // One decoded frame (the chunk points into the received message).
  virtual void on_frame(const Frame& frame) = 0;
  // A frame that could not be decoded: answered with an ERROR frame by default.
  virtual void on_bad_frame(const std::string& why) {
    FrameHeader e;
    e.kind = FrameKind::Error;
    e.text = "malformed frame: " + why;
    send_control(std::move(e));
  }
  // The peer closed the stream or it broke: no more reads.
  virtual void on_read_end() = 0;
  // All queued frames are written (under the lock): Finish / WritesDone to close after a drain.
  virtual Action on_drained_locked() { return Action::None; }
  virtual void do_finish() {}
  virtual void do_writes_done() {}
  // False once the stream is being closed: no further read is started.
  virtual bool keep_reading() { return true; }

  void pump() {
    Action a;
    {
      std::lock_guard<std::mutex> lock(mu_);
      a = next_locked();
    }
    perform(a);
  }
  void perform(Action a) {
    switch (a) {
      case Action::Write:
        this->StartWrite(&out_);
        break;
      case Action::Finish:
        do_finish();
        break;
      case Action::WritesDone:
        do_writes_done();
        break;
      case Action::None:
        break;
    }
  }

  void start_reading() { this->StartRead(&in_); }

  void OnReadDone(bool ok) override {
    if (!ok) {
      on_read_end();
      return;
    }
    last_recv_ms_ = now_ms();
    std::vector<grpc::Slice> slices;
    std::vector<Span> spans;
    bool decoded = false;
    Frame frame;
    if (in_.Dump(&slices).ok()) {
      for (const auto& s : slices) spans.push_back({s.begin(), s.size()});
      try {
        frame = decode_frame(spans);
        decoded = true;
      } catch (const Error& e) {
        on_bad_frame(e.what());
      }
    } else {
      on_bad_frame("unreadable message");
    }
    if (decoded) on_frame(frame);
    in_.Clear();
    if (keep_reading()) this->StartRead(&in_);
  }

  void OnWriteDone(bool ok) override {
    Action a;
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (!ok) {
        // The stream is broken (the read side reports it): nothing more is written.
        control_.clear();
        payloads_.clear();
      }
      a = next_locked();
    }
    perform(a);
  }

  // The next write when none is in flight (out_ filled, writing_ set), or what to do when the
  // queue is empty.
  Action next_locked() {
    if (writing_) return Action::None;
    if (closed_) return Action::None;
    std::vector<grpc::Slice> slices;
    if (!control_.empty()) {
      std::string f = encode_frame_prefix(control_.front(), 0);
      control_.pop_front();
      slices.emplace_back(f);
    } else if (!payloads_.empty()) {
      Outgoing& o = payloads_.front();
      const size_t total = o.payload->size();
      const size_t offset = size_t(o.next) * chunk_bytes_;
      const size_t size = std::min(chunk_bytes_, total - offset);
      FrameHeader h;
      h.kind = o.kind;
      h.call_id = o.call_id;
      h.total_size = total;
      h.offset = offset;
      h.chunk_index = o.next;
      h.chunk_count = o.count;
      slices.emplace_back(encode_frame_prefix(h, size));
      if (size) slices.push_back(payload_slice(o.payload, offset, size));
      if (++o.next == o.count) payloads_.pop_front();
    } else {
      return on_drained_locked();
    }
    out_ = grpc::ByteBuffer(slices.data(), slices.size());
    writing_ = true;
    return Action::Write;
  }

  struct Outgoing {
    FrameKind kind;
    uint64_t call_id;
    Bytes payload;
    uint32_t next = 0, count = 1;
  };

  mutable std::mutex mu_;
  size_t chunk_bytes_;
  std::deque<FrameHeader> control_;
  std::deque<Outgoing> payloads_;
  bool writing_ = false;
  bool closed_ = false;  // no more writes may start
  grpc::ByteBuffer out_, in_;
  std::atomic<int64_t> last_recv_ms_{0};
};

}  // namespace concord::net::detail
