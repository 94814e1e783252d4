// Memory-mapped record file plus a pool of native threads that gather records into
// caller-provided buffers without the GIL.
//
// Usage from Python (record_reader.py does this): submit(indices, out, labels_out) queues a
// gather job and returns a ticket at once; wait(ticket) blocks (GIL released) until
// that job is done. Jobs run in submission order, each split across the threads, so a
// few submitted jobs are the prefetch queue.
#pragma once

#include <sys/types.h>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "record_format.h"

namespace repa_records {

namespace py = pybind11;

// Hidden visibility like the rest of the module: it holds pybind11 objects.
class __attribute__((visibility("hidden"))) RecordStore {
 public:
  RecordStore(const std::string& path, int num_threads);
  ~RecordStore();
  RecordStore(const RecordStore&) = delete;
  RecordStore& operator=(const RecordStore&) = delete;

  const Header& header() const { return header_; }
  const std::string& path() const { return path_; }
  int num_threads() const { return static_cast<int>(workers_.size()); }
  bool closed() const { return base_ == nullptr; }

  // Validates everything (indices in range, buffer sizes, writability, contiguity)
  // before anything is queued; throws IndexError / TypeError / ValueError.
  int64_t submit(const py::array_t<int64_t, py::array::c_style>& indices, const py::buffer& out,
                 const py::object& labels_out);
  void wait(int64_t ticket);
  size_t pending() const;
  // Waits for every queued job, stops the threads and unmaps the file.
  void close();

 private:
  struct Job {
    std::vector<int64_t> indices;
    unsigned char* out = nullptr;
    int64_t* labels = nullptr;
    size_t tasks_left = 0;  // guarded by mu_
    bool done = false;      // guarded by mu_
  };
  struct Task {
    std::shared_ptr<Job> job;
    size_t begin, end;
  };

  void worker_loop();
  void run_task(const Task& t) const;
  void check_open() const;
  void stop_workers();
  std::string where() const { return "record file '" + path_ + "': "; }

  std::string path_;
  Header header_;
  int fd_ = -1;
  pid_t owner_pid_ = 0;  // threads do not survive fork(): a child must not use them
  const unsigned char* base_ = nullptr;
  size_t map_size_ = 0;

  // On the heap so that a forked child can leak them: glibc's condition-variable
  // destructor waits for the parent's (absent) waiting threads and would hang.
  struct Sync {
    std::mutex mu;
    std::condition_variable work;
    std::condition_variable done;
  };
  std::unique_ptr<Sync> sync_ = std::make_unique<Sync>();
  std::deque<Task> tasks_;
  bool stop_ = false;
  std::vector<std::thread> workers_;

  int64_t next_ticket_ = 0;
  std::map<int64_t, std::shared_ptr<Job>> jobs_;
  // Python objects owning the output buffers, kept alive until wait() collects the
  // job. Touched only with the GIL held (never by worker threads).
  std::map<int64_t, std::pair<py::object, py::object>> keep_alive_;
};

}  // namespace repa_records
