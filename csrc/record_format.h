// On-disk layout of a repa_e_fast record file (format version 1).
//
// The byte-by-byte description lives in the docstring of repa_e_fast/data/record_format.py;
// this header mirrors it. Everything is little-endian.
//
//   [0, 4096)                        header (148 meaningful bytes, rest zero)
//   [4096, 4096 + count*rec_bytes)   records, contiguous, C order
//   [labels_offset, +8*count)        int64 labels (only when flags & 1), 64-byte aligned
//
// The Python writer produces the file; this native side only reads and validates it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace repa_records {

constexpr char kMagic[8] = {'R', 'E', 'P', 'A', 'R', 'E', 'C', '\0'};
constexpr uint32_t kVersion = 1;
constexpr uint64_t kHeaderSize = 4096;  // payload starts page-aligned for mmap
constexpr uint32_t kMaxDims = 8;
constexpr uint32_t kFlagLabels = 1u;
// Header fields [0, kHeaderCrcOffset) are covered by the header CRC32 stored at
// kHeaderCrcOffset.
constexpr size_t kHeaderCrcOffset = 144;
constexpr size_t kHeaderUsed = 148;

// Field offsets inside the header.
constexpr size_t kOffMagic = 0;
constexpr size_t kOffVersion = 8;
constexpr size_t kOffHeaderSize = 12;
constexpr size_t kOffDtype = 16;
constexpr size_t kOffNdim = 20;
constexpr size_t kOffShape = 24;  // uint64[8]
constexpr size_t kOffCount = 88;
constexpr size_t kOffRecordBytes = 96;
constexpr size_t kOffDataOffset = 104;
constexpr size_t kOffLabelsOffset = 112;
constexpr size_t kOffFileSize = 120;
constexpr size_t kOffFlags = 128;
constexpr size_t kOffPayloadCrc = 132;
// 136..143 reserved (zero)

// Element size for a dtype code, 0 when the code is unknown. Codes are defined in
// record_format.py (DTYPES) and must stay in sync.
size_t dtype_itemsize(uint32_t code);

struct Header {
  uint32_t version = 0;
  uint32_t dtype = 0;
  std::vector<uint64_t> shape;
  uint64_t count = 0;
  uint64_t record_bytes = 0;
  uint64_t data_offset = 0;
  uint64_t labels_offset = 0;
  uint64_t file_size = 0;
  uint32_t flags = 0;
  uint32_t payload_crc = 0;
  bool has_labels() const { return (flags & kFlagLabels) != 0; }
};

// Parses and checks a header block (at least kHeaderUsed bytes) against the real file
// size. Throws pybind11::value_error naming `path` and the problem.
Header parse_header(const unsigned char* block, size_t block_len, uint64_t actual_size,
                    const std::string& path);

// Standard CRC-32 (IEEE 802.3, reflected, poly 0xEDB88320), the same value as Python's
// zlib.crc32(data, crc).
uint32_t crc32_update(uint32_t crc, const unsigned char* data, size_t len);

}  // namespace repa_records
