#include "io/safetensors.h"

#include "data/token_file.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <tuple>
#include <utility>

#include "data/token_file.h"
#include "io/atomic_file.h"
#include "util/error.h"

namespace pipenag {
namespace {

// The reference implementation refuses larger headers; a bigger length field means garbage.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DtypeRow {
  Dtype dtype;
  std::string_view name;
  std::size_t size;
};
constexpr std::array<DtypeRow, 15> kDtypes{{
    {Dtype::BOOL, "BOOL", 1},   {Dtype::U8, "U8", 1},     {Dtype::I8, "I8", 1},
    {Dtype::F8_E5M2, "F8_E5M2", 1}, {Dtype::F8_E4M3, "F8_E4M3", 1},
    {Dtype::I16, "I16", 2},     {Dtype::U16, "U16", 2},   {Dtype::F16, "F16", 2},
    {Dtype::BF16, "BF16", 2},   {Dtype::I32, "I32", 4},   {Dtype::U32, "U32", 4},
    {Dtype::F32, "F32", 4},     {Dtype::F64, "F64", 8},   {Dtype::I64, "I64", 8},
    {Dtype::U64, "U64", 8},
}};

const DtypeRow& row_of(Dtype dt) {
  for (const auto& r : kDtypes)
    if (r.dtype == dt) return r;
  throw Error("invalid Dtype value " + std::to_string(static_cast<int>(dt)));
}

// Tensor names come from the file and may hold escaped newlines; the message must stay one line.
[[noreturn]] void fail(const std::string& source, const std::string& msg) {
  std::string text = source + ": " + msg;
  for (char& ch : text)
    if (static_cast<unsigned char>(ch) < 0x20) ch = ' ';
  throw Error(text);
}

// numel * dtype size, or nullopt on overflow (a hostile header must not wrap around into a
// "valid" small size).
std::optional<uint64_t> checked_bytes(const std::vector<int64_t>& shape, std::size_t elem,
                                      int64_t* numel_out) {
  uint64_t numel = 1;
  for (int64_t d : shape) {
    if (d < 0) return std::nullopt;
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel)) return std::nullopt;
  }
  if (numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(numel, static_cast<uint64_t>(elem), &bytes)) return std::nullopt;
  if (numel_out) *numel_out = static_cast<int64_t>(numel);
  return bytes;
}

std::string offsets_text(uint64_t begin, uint64_t end) {
  // Appended piecewise: "[" + std::string trips GCC 12's -Wrestrict false positive.
  std::string s(1, '[');
  s += std::to_string(begin);
  s += ", ";
  s += std::to_string(end);
  s += ']';
  return s;
}

// nlohmann prefixes "[json.exception.parse_error.101] "; the user needs only the reason.
std::string json_reason(const char* what) {
  std::string s = what;
  if (!s.empty() && s[0] == '[') {
    const auto close = s.find("] ");
    if (close != std::string::npos) s.erase(0, close + 2);
  }
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

}  // namespace

std::size_t dtype_size(Dtype dt) { return row_of(dt).size; }
std::string_view dtype_name(Dtype dt) { return row_of(dt).name; }

std::optional<Dtype> parse_dtype(std::string_view name) {
  for (const auto& r : kDtypes)
    if (r.name == name) return r.dtype;
  return std::nullopt;
}

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// ----------------------------------------------------------------------------- writer

void SafetensorsWriter::add(const std::string& name, Dtype dtype,
                            const std::vector<int64_t>& shape, const void* data) {
  const std::string who = "safetensors writer: tensor '" + name + "'";
  if (name.empty()) throw Error("safetensors writer: tensor name must not be empty");
  if (name == "__metadata__") throw Error(who + ": the name is reserved by the format");
  if (index_.count(name)) throw Error(who + " added twice");
  for (int64_t d : shape)
    if (d < 0) throw Error(who + " has a negative dimension in shape " + shape_to_string(shape));
  TensorInfo info;
  info.dtype = dtype;
  info.shape = shape;
  const auto bytes = checked_bytes(shape, dtype_size(dtype), &info.numel);
  if (!bytes || *bytes > std::numeric_limits<std::size_t>::max())
    throw Error(who + ": shape " + shape_to_string(shape) + " is too large");
  info.byte_size = static_cast<std::size_t>(*bytes);
  if (info.byte_size > 0 && data == nullptr) throw Error(who + " has no data");
  index_.emplace(name, entries_.size());
  entries_.push_back({name, std::move(info), data});
}

std::vector<SafetensorsWriter::Entry> SafetensorsWriter::layout() const {
  // Wider element types first (stable, so same-type tensors keep their order): every offset is
  // then a multiple of its element size, and with the 8-byte-padded header every tensor is
  // naturally aligned in the file. The reference writer does the same; loaders that view the
  // bytes in place (torch's view(dtype), mmap) need it.
  std::vector<Entry> out = entries_;
  std::stable_sort(out.begin(), out.end(), [](const Entry& a, const Entry& x) {
    return dtype_size(a.info.dtype) > dtype_size(x.info.dtype);
  });
  std::size_t offset = 0;
  for (auto& e : out) {
    e.info.offset = offset;
    offset += e.info.byte_size;
  }
  return out;
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) {
  metadata_[key] = value;
}

std::string SafetensorsWriter::header(const std::vector<Entry>& entries) const {
  // ordered_json keeps the header in data order, so the file is deterministic and readable by eye.
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  if (!metadata_.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata_) meta[k] = v;
    j["__metadata__"] = std::move(meta);
  }
  for (const auto& e : entries) {
    nlohmann::ordered_json t = nlohmann::ordered_json::object();
    t["dtype"] = std::string(dtype_name(e.info.dtype));
    t["shape"] = e.info.shape;
    t["data_offsets"] = {static_cast<uint64_t>(e.info.offset),
                         static_cast<uint64_t>(e.info.offset + e.info.byte_size)};
    j[e.name] = std::move(t);
  }
  std::string text;
  try {
    text = j.dump();
  } catch (const nlohmann::json::exception& ex) {
    throw Error("safetensors writer: tensor name or metadata is not valid UTF-8 (" +
                json_reason(ex.what()) + ")");
  }
  // Padding keeps the data section 8-byte aligned for readers that map the file.
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + text;
}

namespace {

std::string combine_checksums(const std::vector<std::pair<const void*, std::size_t>>& spans) {
  std::string packed;
  for (const auto& [p, n] : spans) {
    const uint64_t h = xxhash64(p, n);
    for (int i = 0; i < 8; ++i) packed.push_back(static_cast<char>((h >> (8 * i)) & 0xff));
  }
  return hex64(xxhash64(packed.data(), packed.size()));
}

}  // namespace

std::string SafetensorsWriter::data_checksum() const {
  std::vector<std::pair<const void*, std::size_t>> spans;
  for (const auto& e : layout()) spans.emplace_back(e.data, e.info.byte_size);
  return combine_checksums(spans);
}

std::string SafetensorsFile::data_checksum() const {
  std::vector<std::pair<const void*, std::size_t>> spans;
  for (const auto& name : order_) {
    const TensorInfo& t = tensors_.at(name);
    spans.emplace_back(bytes_.data() + data_start_ + t.offset, t.byte_size);
  }
  return combine_checksums(spans);
}

std::string SafetensorsWriter::to_bytes() const {
  const std::vector<Entry> entries = layout();
  std::string out = header(entries);
  for (const auto& e : entries)
    if (e.info.byte_size) out.append(static_cast<const char*>(e.data), e.info.byte_size);
  return out;
}

void SafetensorsWriter::write(const std::string& path) const {
  const std::vector<Entry> entries = layout();
  const std::string head = [&] {
    try {
      return header(entries);
    } catch (const Error& ex) {
      throw Error(path + ": " + ex.what());
    }
  }();
  AtomicFile f(path);
  f.write(head);
  for (const auto& e : entries)
    if (e.info.byte_size) f.write(e.data, e.info.byte_size);
  f.commit();
}

// ----------------------------------------------------------------------------- reader

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  return from_bytes(read_file(path), path);
}

SafetensorsFile SafetensorsFile::from_bytes(std::string bytes, const std::string& source) {
  SafetensorsFile f;
  f.path_ = source;
  f.bytes_ = std::move(bytes);
  const std::string& b = f.bytes_;
  const std::string& src = f.path_;

  if (b.size() < 8)
    fail(src, "not a safetensors file: " + std::to_string(b.size()) +
                  " bytes, shorter than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(b[i])) << (8 * i);
  if (n > kMaxHeaderBytes)
    fail(src, "header length " + std::to_string(n) + " is absurd (limit " +
                  std::to_string(kMaxHeaderBytes) + " bytes); not a safetensors file?");
  if (n > b.size() - 8)
    fail(src, "truncated: header length says " + std::to_string(n) + " bytes, file has " +
                  std::to_string(b.size() - 8) + " after the length field");

  // Duplicate names would silently overwrite each other in the parsed object.
  std::string duplicate;
  std::vector<std::string> seen;
  const auto on_event = [&](int depth, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
    if (depth == 1 && ev == nlohmann::json::parse_event_t::key && duplicate.empty()) {
      const auto& k = parsed.get_ref<const std::string&>();
      if (std::find(seen.begin(), seen.end(), k) != seen.end()) duplicate = k;
      seen.push_back(k);
    }
    return true;
  };
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(b.begin() + 8, b.begin() + 8 + static_cast<std::ptrdiff_t>(n),
                              on_event);
  } catch (const nlohmann::json::exception& ex) {
    fail(src, "header is not valid JSON: " + json_reason(ex.what()));
  }
  if (!j.is_object()) fail(src, "header is not a JSON object");
  if (!duplicate.empty()) fail(src, "header names '" + duplicate + "' twice");

  f.data_start_ = 8 + static_cast<std::size_t>(n);
  const uint64_t data_len = b.size() - f.data_start_;

  struct Range {
    uint64_t begin, end;
    std::string name;
  };
  std::vector<Range> ranges;
  for (const auto& [name, entry] : j.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) fail(src, "__metadata__ is not a JSON object of strings");
      for (const auto& [k, v] : entry.items()) {
        if (!v.is_string()) fail(src, "__metadata__ value for '" + k + "' is not a string");
        f.metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string who = "tensor '" + name + "'";
    if (!entry.is_object()) fail(src, who + ": header entry is not a JSON object");

    const auto dt_it = entry.find("dtype");
    if (dt_it == entry.end()) fail(src, who + " has no dtype");
    if (!dt_it->is_string()) fail(src, who + ": dtype is not a string");
    const auto dtype = parse_dtype(dt_it->get_ref<const std::string&>());
    if (!dtype) fail(src, who + " has unknown dtype '" + dt_it->get<std::string>() + "'");

    const auto shape_it = entry.find("shape");
    if (shape_it == entry.end()) fail(src, who + " has no shape");
    if (!shape_it->is_array()) fail(src, who + ": shape is not a list");
    TensorInfo info;
    info.dtype = *dtype;
    for (const auto& d : *shape_it) {
      // nlohmann stores non-negative JSON integers as unsigned; anything else is invalid here.
      if (!d.is_number_unsigned() ||
          d.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail(src, who + ": shape " + shape_it->dump() + " must be a list of non-negative integers");
      info.shape.push_back(static_cast<int64_t>(d.get<uint64_t>()));
    }

    const auto off_it = entry.find("data_offsets");
    if (off_it == entry.end()) fail(src, who + " has no data_offsets");
    if (!off_it->is_array() || off_it->size() != 2 || !(*off_it)[0].is_number_unsigned() ||
        !(*off_it)[1].is_number_unsigned())
      fail(src, who + ": data_offsets " + off_it->dump() +
                    " must be [begin, end] with non-negative integers");
    const uint64_t begin = (*off_it)[0].get<uint64_t>();
    const uint64_t end = (*off_it)[1].get<uint64_t>();
    if (end < begin)
      fail(src, who + " has data_offsets " + offsets_text(begin, end) + ": end is before begin");

    const auto need = checked_bytes(info.shape, dtype_size(info.dtype), &info.numel);
    if (!need) fail(src, who + ": shape " + shape_to_string(info.shape) + " is too large");
    if (end - begin != *need)
      fail(src, who + " has " + std::to_string(end - begin) + " bytes (data_offsets " +
                    offsets_text(begin, end) + ") but shape " + shape_to_string(info.shape) +
                    " of " + std::string(dtype_name(info.dtype)) + " needs " +
                    std::to_string(*need));
    ranges.push_back({begin, end, name});
    // Both fit in size_t: the range check below rejects anything past the in-memory buffer.
    info.offset = static_cast<std::size_t>(begin);
    info.byte_size = static_cast<std::size_t>(*need);
    f.tensors_.emplace(name, std::move(info));
  }

  // Out-of-range offsets are checked before layout so a cut-off file says "truncated" rather than
  // reporting a confusing gap.
  const auto last = std::max_element(ranges.begin(), ranges.end(),
                                     [](const Range& a, const Range& x) { return a.end < x.end; });
  if (last != ranges.end() && last->end > data_len)
    fail(src, "truncated: header says " + std::to_string(last->end) +
                  " bytes of tensor data, file has " + std::to_string(data_len) + " (tensor '" +
                  last->name + "' has data_offsets " + offsets_text(last->begin, last->end) + ")");

  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& x) {
    return std::tie(a.begin, a.end, a.name) < std::tie(x.begin, x.end, x.name);
  });
  uint64_t pos = 0;
  const Range* prev = nullptr;
  for (const auto& r : ranges) {
    if (r.begin < pos)
      fail(src, "tensors '" + prev->name + "' " + offsets_text(prev->begin, prev->end) + " and '" +
                    r.name + "' " + offsets_text(r.begin, r.end) + " overlap");
    if (r.begin > pos)
      fail(src, "tensor data is not contiguous: bytes " + offsets_text(pos, r.begin) +
                    " before tensor '" + r.name + "' belong to no tensor");
    pos = r.end;
    prev = &r;
    f.order_.push_back(r.name);
  }
  if (pos != data_len)
    fail(src, "trailing data: the data section has " + std::to_string(data_len) +
                  " bytes but the tensors cover " + std::to_string(pos));
  return f;
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) fail(path_, "missing tensor '" + name + "'");
  return it->second;
}

const void* SafetensorsFile::data(const std::string& name) const {
  return bytes_.data() + data_start_ + info(name).offset;
}

void copy_f32(const SafetensorsFile& file, const std::string& name,
              const std::vector<int64_t>& expected_shape, float* dst) {
  const TensorInfo& ti = file.info(name);
  const std::string who = "tensor '" + name + "'";
  if (ti.dtype != Dtype::F32)
    fail(file.path(), who + " has dtype " + std::string(dtype_name(ti.dtype)) + ", expected F32");
  if (ti.shape != expected_shape)
    fail(file.path(), who + " has shape " + shape_to_string(ti.shape) + ", expected " +
                          shape_to_string(expected_shape));
  if (ti.byte_size) std::memcpy(dst, file.data(name), ti.byte_size);
}

}  // namespace pipenag
