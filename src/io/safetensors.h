// The Hugging Face safetensors format (https://github.com/huggingface/safetensors), byte for byte:
//   8 bytes   little-endian u64 N
//   N bytes   JSON object {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [..],
//             "data_offsets": [begin, end]}, ...}, padded with spaces to a multiple of 8
//   rest      tensor data, offsets relative to its start, tensors contiguous with no gaps.
// Files written here load with safetensors.torch.load_file; files read here are validated as
// strictly as the reference implementation, so a damaged checkpoint fails with a clear message
// instead of producing garbage weights.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace pipenag {

enum class Dtype { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

std::size_t dtype_size(Dtype dt);
std::string_view dtype_name(Dtype dt);             // "F32", ...
std::optional<Dtype> parse_dtype(std::string_view name);

// "[2,3]"; "[]" for a scalar.
std::string shape_to_string(const std::vector<int64_t>& shape);

struct TensorInfo {
  Dtype dtype = Dtype::F32;
  std::vector<int64_t> shape;  // empty: a scalar (one element)
  int64_t numel = 1;
  std::size_t offset = 0;      // from the start of the data section
  std::size_t byte_size = 0;
};

class SafetensorsWriter {
 public:
  // Does not copy: `data` (byte_size = numel * dtype_size bytes) must stay valid until write() or
  // to_bytes(), so a checkpoint streams straight from the parameters without a second copy.
  // Layout (= header order): by element size, widest first, then in the order added, so each
  // tensor is aligned to its element size; tensors of one dtype keep the order they were added.
  void add(const std::string& name, Dtype dtype, const std::vector<int64_t>& shape,
           const void* data);
  void set_metadata(const std::string& key, const std::string& value);

  // A checksum of every tensor's bytes, in file order (see SafetensorsFile::data_checksum); store
  // it with set_metadata after the last add().
  std::string data_checksum() const;

  void write(const std::string& path) const;  // atomic (see io/atomic_file.h)
  std::string to_bytes() const;               // the exact file content
  std::size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    std::string name;
    TensorInfo info;
    const void* data;
  };
  std::vector<Entry> layout() const;  // entries in file order, offsets filled in
  std::string header(const std::vector<Entry>& entries) const;  // length-prefixed, padded

  std::vector<Entry> entries_;
  std::unordered_map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

class SafetensorsFile {
 public:
  // Reads and validates the whole file; Error naming the file on any inconsistency.
  static SafetensorsFile open(const std::string& path);
  // Same validation over bytes already in memory; `source` names them in error messages.
  static SafetensorsFile from_bytes(std::string bytes, const std::string& source);

  const std::string& path() const { return path_; }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;  // Error if missing
  // Points into the file buffer; the data section starts 8-byte aligned, so a tensor is aligned
  // for its dtype when its offset is (always so for files SafetensorsWriter wrote; other
  // writers need not align: check info().offset or memcpy).
  const void* data(const std::string& name) const;
  std::vector<std::string> names() const { return order_; }  // in data-offset order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // 16 hex digits: XXH64 over the XXH64 of each tensor's bytes (little-endian u64s, file order).
  std::string data_checksum() const;

 private:
  SafetensorsFile() = default;

  std::string path_;
  std::string bytes_;
  std::size_t data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::vector<std::string> order_;
  std::map<std::string, std::string> metadata_;
};

// Copies an F32 tensor of exactly `expected_shape` into dst (numel floats). Errors:
// "<file>: missing tensor 'x'", "<file>: tensor 'x' has dtype F64, expected F32",
// "<file>: tensor 'x' has shape [a,b], expected [c,d]".
void copy_f32(const SafetensorsFile& file, const std::string& name,
              const std::vector<int64_t>& expected_shape, float* dst);

}  // namespace pipenag
