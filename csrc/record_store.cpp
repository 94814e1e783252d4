// RecordStore: mmap + native gather thread pool; see record_store.h.
#include "record_store.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <sstream>

namespace repa_records {

namespace {

// Bytes of a C-contiguous buffer, or throws TypeError naming `what`.
size_t contiguous_nbytes(const py::buffer_info& info, const std::string& where,
                         const char* what) {
  py::ssize_t expected = info.itemsize;
  for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] != 1 && info.strides[d] != expected)
      throw py::type_error(where + what + " must be C-contiguous");
    expected *= info.shape[d];
  }
  return static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
}

}  // namespace

RecordStore::RecordStore(const std::string& path, int num_threads) : path_(path) {
  if (num_threads < 1 || num_threads > 1024)
    throw py::value_error(where() + "num_threads must be in [1, 1024], got " +
                          std::to_string(num_threads));
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) {
    const int err = errno;
    if (err == ENOENT) throw py::value_error(where() + "no such file");
    throw py::value_error(where() + "cannot open: " + std::strerror(err));
  }
  struct stat st;
  if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd_);
    throw py::value_error(where() + "not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  unsigned char block[kHeaderUsed] = {0};
  const ssize_t got = size >= kHeaderUsed ? ::pread(fd_, block, kHeaderUsed, 0) : 0;
  try {
    header_ = parse_header(block, got < 0 ? 0 : static_cast<size_t>(got), size, path_);
  } catch (...) {
    ::close(fd_);
    throw;
  }
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd_, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    ::close(fd_);
    throw py::value_error(where() + "mmap failed: " + std::strerror(err));
  }
  base_ = static_cast<const unsigned char*>(p);
  map_size_ = size;
  owner_pid_ = ::getpid();
  workers_.reserve(num_threads);
  for (int i = 0; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

void RecordStore::stop_workers() {
  if (::getpid() != owner_pid_) {
    // Forked child: the worker threads exist only in the parent. Joining them here is
    // undefined and destroying joinable std::thread objects aborts, so leak the handles.
    new std::vector<std::thread>(std::move(workers_));
    workers_.clear();
    sync_.release();  // leaked on purpose, see record_store.h
    return;
  }
  {
    std::lock_guard<std::mutex> lk(sync_->mu);
    stop_ = true;  // workers drain the queue first, then exit
  }
  sync_->work.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

RecordStore::~RecordStore() {
  // Called from Python's dealloc with the GIL held; the workers never take the GIL,
  // so joining them here cannot deadlock.
  if (base_ == nullptr) return;
  stop_workers();
  ::munmap(const_cast<unsigned char*>(base_), map_size_);
  ::close(fd_);
}

void RecordStore::close() {
  if (base_ == nullptr) return;
  if (::getpid() != owner_pid_) return;  // forked child: leave everything to the parent
  {
    py::gil_scoped_release release;
    stop_workers();
  }
  ::munmap(const_cast<unsigned char*>(base_), map_size_);
  ::close(fd_);
  base_ = nullptr;
  fd_ = -1;
  jobs_.clear();
  keep_alive_.clear();
}

void RecordStore::check_open() const {
  if (base_ == nullptr) throw py::value_error(where() + "store is closed");
  if (::getpid() != owner_pid_)
    throw std::runtime_error(where() +
                             "reader was opened in another process (fork); open it in the "
                             "process that reads, e.g. inside the DataLoader worker");
}

void RecordStore::worker_loop() {
  std::unique_lock<std::mutex> lk(sync_->mu);
  for (;;) {
    sync_->work.wait(lk, [this] { return stop_ || !tasks_.empty(); });
    if (tasks_.empty()) return;  // stop_ set and nothing left to do
    Task t = std::move(tasks_.front());
    tasks_.pop_front();
    lk.unlock();
    run_task(t);
    lk.lock();
    if (--t.job->tasks_left == 0) {
      t.job->done = true;
      sync_->done.notify_all();
    }
  }
}

void RecordStore::run_task(const Task& t) const {
  const Job& job = *t.job;
  const size_t rb = header_.record_bytes;
  const unsigned char* data = base_ + header_.data_offset;
  const unsigned char* labels = base_ + header_.labels_offset;
  for (size_t i = t.begin; i < t.end; ++i) {
    const size_t idx = static_cast<size_t>(job.indices[i]);
    std::memcpy(job.out + i * rb, data + idx * rb, rb);
    if (job.labels != nullptr) std::memcpy(job.labels + i, labels + idx * 8, 8);
  }
}

int64_t RecordStore::submit(const py::array_t<int64_t, py::array::c_style>& indices,
                            const py::buffer& out, const py::object& labels_out) {
  check_open();
  if (indices.ndim() != 1) throw py::value_error(where() + "indices must be 1-D");
  const size_t n = static_cast<size_t>(indices.shape(0));
  auto job = std::make_shared<Job>();
  job->indices.assign(indices.data(), indices.data() + n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t idx = job->indices[i];
    if (idx < 0 || static_cast<uint64_t>(idx) >= header_.count) {
      std::ostringstream os;
      os << where() << "index " << idx << " out of range [0, " << header_.count << ")";
      throw py::index_error(os.str());
    }
  }

  py::buffer_info info = out.request();
  if (info.readonly) throw py::type_error(where() + "output buffer is read-only");
  if (static_cast<size_t>(info.itemsize) != dtype_itemsize(header_.dtype))
    throw py::type_error(where() + "output element size " + std::to_string(info.itemsize) +
                         " does not match the record dtype");
  const size_t nbytes = contiguous_nbytes(info, where(), "output buffer");
  if (nbytes != n * header_.record_bytes) {
    std::ostringstream os;
    os << where() << "output buffer has " << nbytes << " bytes, expected " << n << " records x "
       << header_.record_bytes << " bytes = " << n * header_.record_bytes;
    throw py::value_error(os.str());
  }
  job->out = static_cast<unsigned char*>(info.ptr);

  if (!labels_out.is_none()) {
    if (!header_.has_labels()) throw py::value_error(where() + "file has no labels");
    py::buffer lb = py::reinterpret_borrow<py::buffer>(labels_out);
    py::buffer_info linfo = lb.request();
    const std::string& f = linfo.format;
    const bool int64_format = !f.empty() && (f.back() == 'q' || f.back() == 'l');
    if (linfo.readonly) throw py::type_error(where() + "labels buffer is read-only");
    if (linfo.itemsize != 8 || !int64_format)
      throw py::type_error(where() + "labels buffer must be int64");
    const size_t lbytes = contiguous_nbytes(linfo, where(), "labels buffer");
    if (lbytes != n * 8)
      throw py::value_error(where() + "labels buffer has " + std::to_string(lbytes / 8) +
                            " elements, expected " + std::to_string(n));
    job->labels = static_cast<int64_t*>(linfo.ptr);
  }

  // Split the batch into one contiguous chunk per thread.
  const size_t chunks = std::min(n, workers_.size());
  const int64_t ticket = next_ticket_++;
  {
    std::lock_guard<std::mutex> lk(sync_->mu);
    job->tasks_left = chunks;
    job->done = (chunks == 0);
    for (size_t c = 0; c < chunks; ++c)
      tasks_.push_back(Task{job, n * c / chunks, n * (c + 1) / chunks});
    jobs_[ticket] = job;
  }
  keep_alive_[ticket] = {out, labels_out};
  sync_->work.notify_all();
  return ticket;
}

void RecordStore::wait(int64_t ticket) {
  check_open();
  std::shared_ptr<Job> job;
  {
    std::lock_guard<std::mutex> lk(sync_->mu);
    auto it = jobs_.find(ticket);
    if (it == jobs_.end())
      throw py::value_error(where() + "unknown or already collected ticket " +
                            std::to_string(ticket));
    job = it->second;
  }
  {
    py::gil_scoped_release release;
    std::unique_lock<std::mutex> lk(sync_->mu);
    sync_->done.wait(lk, [&] { return job->done; });
    jobs_.erase(ticket);
  }
  keep_alive_.erase(ticket);  // GIL held again: safe to drop the buffer references
}

size_t RecordStore::pending() const {
  std::lock_guard<std::mutex> lk(sync_->mu);
  return jobs_.size();
}

}  // namespace repa_records
