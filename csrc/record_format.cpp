// Header parsing and validation for record files; see record_format.h.
#include "record_format.h"

#include <pybind11/pybind11.h>

#include <array>
#include <cstring>
#include <sstream>

namespace py = pybind11;

namespace repa_records {

namespace {

template <typename T>
T load_le(const unsigned char* p) {
  // The project only targets little-endian hosts (x86-64, aarch64), so a memcpy is
  // the little-endian decode.
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (0xEDB88320u ^ (c >> 1)) : (c >> 1);
    t[i] = c;
  }
  return t;
}

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw py::value_error("record file '" + path + "': " + what);
}

}  // namespace

size_t dtype_itemsize(uint32_t code) {
  switch (code) {
    case 1:  // uint8
    case 2:  // int8
      return 1;
    case 3:  // int16
    case 4:  // uint16
    case 7:  // float16
    case 8:  // bfloat16 (raw 2 bytes)
      return 2;
    case 5:  // int32
    case 9:  // float32
      return 4;
    case 6:   // int64
    case 10:  // float64
      return 8;
    default:
      return 0;
  }
}

uint32_t crc32_update(uint32_t crc, const unsigned char* data, size_t len) {
  // Only used for the 144-byte header, so the byte-wise table version is plenty.
  static const std::array<uint32_t, 256> table = make_crc_table();
  uint32_t c = crc ^ 0xFFFFFFFFu;
  for (size_t i = 0; i < len; ++i) c = table[(c ^ data[i]) & 0xFFu] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

Header parse_header(const unsigned char* block, size_t block_len, uint64_t actual_size,
                    const std::string& path) {
  if (actual_size < kHeaderSize || block_len < kHeaderUsed) {
    std::ostringstream os;
    os << "truncated: file is " << actual_size << " bytes, smaller than the " << kHeaderSize
       << "-byte header";
    fail(path, os.str());
  }
  if (std::memcmp(block + kOffMagic, kMagic, sizeof(kMagic)) != 0)
    fail(path, "bad magic (not a repa_e_fast record file)");
  Header h;
  h.version = load_le<uint32_t>(block + kOffVersion);
  if (h.version != kVersion) {
    std::ostringstream os;
    os << "unsupported format version " << h.version << " (this build reads version "
       << kVersion << ")";
    fail(path, os.str());
  }
  const uint32_t stored_crc = load_le<uint32_t>(block + kHeaderCrcOffset);
  if (crc32_update(0, block, kHeaderCrcOffset) != stored_crc)
    fail(path, "header checksum mismatch (corrupted header)");

  const uint32_t header_size = load_le<uint32_t>(block + kOffHeaderSize);
  h.dtype = load_le<uint32_t>(block + kOffDtype);
  const uint32_t ndim = load_le<uint32_t>(block + kOffNdim);
  h.count = load_le<uint64_t>(block + kOffCount);
  h.record_bytes = load_le<uint64_t>(block + kOffRecordBytes);
  h.data_offset = load_le<uint64_t>(block + kOffDataOffset);
  h.labels_offset = load_le<uint64_t>(block + kOffLabelsOffset);
  h.file_size = load_le<uint64_t>(block + kOffFileSize);
  h.flags = load_le<uint32_t>(block + kOffFlags);
  h.payload_crc = load_le<uint32_t>(block + kOffPayloadCrc);

  if (header_size != kHeaderSize || h.data_offset != kHeaderSize)
    fail(path, "header size / data offset is not 4096");
  const size_t itemsize = dtype_itemsize(h.dtype);
  if (itemsize == 0) fail(path, "unknown dtype code " + std::to_string(h.dtype));
  if (ndim > kMaxDims) fail(path, "record ndim " + std::to_string(ndim) + " > 8");
  if ((h.flags & ~kFlagLabels) != 0) fail(path, "unknown flag bits");

  // Record size = itemsize * prod(shape), computed with overflow checks.
  unsigned __int128 nbytes = itemsize;
  for (uint32_t d = 0; d < ndim; ++d) {
    const uint64_t dim = load_le<uint64_t>(block + kOffShape + 8 * d);
    if (dim == 0) fail(path, "record shape has a zero dimension");
    h.shape.push_back(dim);
    nbytes *= dim;
    if (nbytes > (static_cast<unsigned __int128>(1) << 48)) fail(path, "record size is absurd");
  }
  if (static_cast<uint64_t>(nbytes) != h.record_bytes)
    fail(path, "record byte size disagrees with dtype and shape");

  // Expected layout from count; the file must be exactly this long.
  const unsigned __int128 data_end =
      static_cast<unsigned __int128>(h.data_offset) +
      static_cast<unsigned __int128>(h.count) * h.record_bytes;
  unsigned __int128 expected = data_end;
  if (h.has_labels()) {
    const unsigned __int128 aligned = (data_end + 63) / 64 * 64;
    if (h.labels_offset != static_cast<uint64_t>(aligned))
      fail(path, "labels offset disagrees with the record count");
    expected = aligned + static_cast<unsigned __int128>(h.count) * 8;
  } else if (h.labels_offset != 0) {
    fail(path, "labels offset set but the labels flag is not");
  }
  if (expected != h.file_size) fail(path, "header file size disagrees with the record count");
  if (h.file_size != actual_size) {
    std::ostringstream os;
    os << "header says the file is " << h.file_size << " bytes but it is " << actual_size
       << " bytes (" << (actual_size < h.file_size ? "truncated" : "trailing bytes") << ")";
    fail(path, os.str());
  }
  return h;
}

}  // namespace repa_records
