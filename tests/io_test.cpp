// Atomic file output and the safetensors reader/writer: round trips, the exact byte layout the
// Hugging Face format requires, and one test per kind of damaged file.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <string>
#include <vector>

#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "util/error.h"
#include "test_util.h"

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using namespace pipenag;
using namespace pipenag::testutil;

namespace {


// ============================================================================ atomic files

using AtomicFileTest = TempDirTest;

TEST_F(AtomicFileTest, WriteThenReadBinary) {
  const std::string bytes("a\0b\xff\n", 5);
  write_file_atomic(path("f.bin"), bytes);
  EXPECT_EQ(read_file(path("f.bin")), bytes);
  EXPECT_THAT(listing(), ElementsAre("f.bin"));
}

TEST_F(AtomicFileTest, EmptyFile) {
  write_file_atomic(path("empty"), "");
  EXPECT_EQ(read_file(path("empty")), "");
  EXPECT_EQ(fs::file_size(path("empty")), 0u);
}

TEST_F(AtomicFileTest, ReplacesExistingFileWhole) {
  write_file_atomic(path("f"), std::string(10000, 'x'));
  write_file_atomic(path("f"), "short");
  EXPECT_EQ(read_file(path("f")), "short");
  EXPECT_THAT(listing(), ElementsAre("f"));
}

TEST_F(AtomicFileTest, MissingDirectoryLeavesNothing) {
  const std::string target = path("no/such/dir/f");
  const std::string msg = error_of([&] { write_file_atomic(target, "data"); });
  EXPECT_THAT(msg, AllOf(HasSubstr(target), HasSubstr("No such file or directory")));
  EXPECT_TRUE(listing().empty());
}

TEST_F(AtomicFileTest, RenameFailureLeavesNoTempFile) {
  // A non-empty directory cannot be replaced by a file, so rename() fails after the data is
  // written: the temporary must still be cleaned up.
  fs::create_directories(path("target/inner"));
  const std::string msg = error_of([&] { write_file_atomic(path("target"), "data"); });
  EXPECT_THAT(msg, AllOf(HasSubstr(path("target")), HasSubstr("cannot replace")));
  EXPECT_THAT(listing(), ElementsAre("target"));
  EXPECT_TRUE(fs::is_directory(path("target/inner")));
}

TEST_F(AtomicFileTest, WriteErrorRemovesTempFile) {
  // RLIMIT_FSIZE makes write() fail with EFBIG (with SIGXFSZ ignored): a stand-in for a full disk.
  write_file_atomic(path("f"), "old");
  rlimit old_limit{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  const auto old_handler = ::signal(SIGXFSZ, SIG_IGN);
  rlimit small = old_limit;
  small.rlim_cur = 4096;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  std::string msg;
  {
    AtomicFile f(path("f"));
    msg = error_of([&] { f.write(std::string(1 << 20, 'x')); });
    EXPECT_FALSE(f.is_open());
  }
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &old_limit), 0);
  ::signal(SIGXFSZ, old_handler);
  EXPECT_THAT(msg, AllOf(HasSubstr(path("f")), HasSubstr("write failed"),
                         HasSubstr(std::strerror(EFBIG))));
  EXPECT_THAT(listing(), ElementsAre("f"));
  EXPECT_EQ(read_file(path("f")), "old");
}

TEST_F(AtomicFileTest, StreamingWritesAndCommit) {
  AtomicFile f(path("out"));
  EXPECT_TRUE(f.is_open());
  EXPECT_EQ(f.temp_path(), path("out") + ".tmp." + std::to_string(::getpid()));
  f.write("hello ");
  const int n = 42;
  f.write(&n, sizeof n);
  f.write(std::string_view("!"));
  EXPECT_THAT(listing(), ElementsAre("out.tmp." + std::to_string(::getpid())));
  f.commit();
  EXPECT_FALSE(f.is_open());
  std::string expected = "hello ";
  expected.append(reinterpret_cast<const char*>(&n), sizeof n);
  expected += "!";
  EXPECT_EQ(read_file(path("out")), expected);
  EXPECT_THAT(listing(), ElementsAre("out"));
}

TEST_F(AtomicFileTest, DestroyWithoutCommitLeavesNothing) {
  {
    AtomicFile f(path("new"));
    f.write("partial");
  }
  EXPECT_TRUE(listing().empty());
}

TEST_F(AtomicFileTest, DestroyWithoutCommitKeepsOldFile) {
  write_file_atomic(path("ckpt"), "good checkpoint");
  {
    AtomicFile f(path("ckpt"));
    f.write("half a checkp");
  }
  EXPECT_EQ(read_file(path("ckpt")), "good checkpoint");
  EXPECT_THAT(listing(), ElementsAre("ckpt"));
}

TEST_F(AtomicFileTest, MoveTransfersOwnership) {
  AtomicFile a(path("m"));
  a.write("moved");
  AtomicFile b(std::move(a));
  EXPECT_FALSE(a.is_open());  // NOLINT(bugprone-use-after-move): checking the moved-from state
  AtomicFile c;
  c = std::move(b);
  c.commit();
  EXPECT_EQ(read_file(path("m")), "moved");
  EXPECT_THAT(listing(), ElementsAre("m"));
}

TEST_F(AtomicFileTest, UseAfterCommitIsAnError) {
  AtomicFile f(path("x"));
  f.commit();
  EXPECT_THAT(error_of([&] { f.write("more"); }), HasSubstr("not open"));
  EXPECT_THAT(error_of([&] { f.commit(); }), HasSubstr("not open"));
  EXPECT_EQ(read_file(path("x")), "");
}

TEST_F(AtomicFileTest, ReadMissingFileNamesPath) {
  const std::string p = path("missing.txt");
  EXPECT_THAT(error_of([&] { read_file(p); }),
              AllOf(HasSubstr(p), HasSubstr("cannot open"), HasSubstr("No such file")));
}

TEST_F(AtomicFileTest, ReadDirectoryIsAnError) {
  EXPECT_THAT(error_of([&] { read_file(dir_.string()); }),
              AllOf(HasSubstr(dir_.string()), HasSubstr("is a directory")));
}

TEST_F(AtomicFileTest, MakeDirsNestedAndIdempotent) {
  make_dirs(path("a/b/c"));
  EXPECT_TRUE(fs::is_directory(path("a/b/c")));
  make_dirs(path("a/b/c"));
  make_dirs("");
  EXPECT_TRUE(fs::is_directory(path("a/b/c")));
}

TEST_F(AtomicFileTest, MakeDirsOverFileIsAnError) {
  write_file_atomic(path("file"), "x");
  EXPECT_THAT(error_of([&] { make_dirs(path("file")); }),
              AllOf(HasSubstr(path("file")), HasSubstr("not a directory")));
  EXPECT_THAT(error_of([&] { make_dirs(path("file/sub")); }),
              AllOf(HasSubstr(path("file/sub")), HasSubstr("cannot create directory")));
}

// ============================================================================ safetensors

// A file from a hand-written header: the way to produce every kind of damage.
std::string st_bytes(std::string header, std::string_view data, bool pad = true) {
  if (pad) header.append((8 - header.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header + std::string(data);
}

using SafetensorsTest = TempDirTest;

TEST_F(SafetensorsTest, DtypeTable) {
  EXPECT_EQ(dtype_size(Dtype::F32), 4u);
  EXPECT_EQ(dtype_size(Dtype::F64), 8u);
  EXPECT_EQ(dtype_size(Dtype::BF16), 2u);
  EXPECT_EQ(dtype_size(Dtype::I64), 8u);
  EXPECT_EQ(dtype_size(Dtype::U8), 1u);
  EXPECT_EQ(dtype_size(Dtype::BOOL), 1u);
  for (const char* name : {"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
                           "I32", "U32", "F32", "F64", "I64", "U64"}) {
    const auto dt = parse_dtype(name);
    ASSERT_TRUE(dt.has_value()) << name;
    EXPECT_EQ(dtype_name(*dt), name);
  }
  EXPECT_FALSE(parse_dtype("f32").has_value());
  EXPECT_FALSE(parse_dtype("FLOAT").has_value());
}

TEST_F(SafetensorsTest, ExactByteLayoutSingleTensor) {
  const float v[2] = {1.0f, -2.0f};
  SafetensorsWriter w;
  w.add("a", Dtype::F32, {2}, v);
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  ASSERT_EQ(header.size(), 54u);
  std::string expected("\x38\0\0\0\0\0\0\0", 8);  // 56 = 54 padded to a multiple of 8
  expected += header + "  ";
  expected += std::string("\x00\x00\x80\x3f\x00\x00\x00\xc0", 8);  // 1.0f, -2.0f little-endian
  EXPECT_EQ(w.to_bytes(), expected);

  w.write(path("a.safetensors"));
  EXPECT_EQ(read_file(path("a.safetensors")), expected);
  EXPECT_THAT(listing(), ElementsAre("a.safetensors"));
}

TEST_F(SafetensorsTest, ExactByteLayoutMetadataAndOrder) {
  // Data follows insertion order (w before b), not name order; __metadata__ comes first.
  const float wv[4] = {1, 2, 3, 4};
  const uint8_t bv[3] = {7, 8, 9};
  SafetensorsWriter w;
  w.add("w", Dtype::F32, {2, 2}, wv);
  w.add("b", Dtype::U8, {3}, bv);
  w.set_metadata("format", "pt");
  const std::string bytes = w.to_bytes();
  const std::string header =
      R"({"__metadata__":{"format":"pt"},)"
      R"("w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
      R"("b":{"dtype":"U8","shape":[3],"data_offsets":[16,19]}})";
  ASSERT_EQ(header.size(), 142u);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);  // x86-64 is little-endian, as the format
  EXPECT_EQ(n, 144u);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes.substr(8, 144), header + "  ");
  ASSERT_EQ(bytes.size(), 8 + 144 + 19u);
  EXPECT_EQ(std::memcmp(bytes.data() + 152, wv, 16), 0);
  EXPECT_EQ(std::memcmp(bytes.data() + 168, bv, 3), 0);
}

TEST_F(SafetensorsTest, WiderDtypesFirstKeepsEveryTensorAligned) {
  // U8 added first would leave the F32/F64 data misaligned; the writer puts wider types first and
  // keeps the order of tensors that share a width.
  const uint8_t u[3] = {1, 2, 3};
  const float f[1] = {1.0f};
  const double d[1] = {2.0};
  const float g[2] = {3.0f, 4.0f};
  const uint16_t h[1] = {0x3f80};
  SafetensorsWriter w;
  w.add("u", Dtype::U8, {3}, u);
  w.add("f", Dtype::F32, {1}, f);
  w.add("h", Dtype::BF16, {1}, h);
  w.add("d", Dtype::F64, {1}, d);
  w.add("g", Dtype::F32, {2}, g);
  const std::string bytes = w.to_bytes();
  const std::string header =
      R"({"d":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},)"
      R"("f":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},)"
      R"("g":{"dtype":"F32","shape":[2],"data_offsets":[12,20]},)"
      R"("h":{"dtype":"BF16","shape":[1],"data_offsets":[20,22]},)"
      R"("u":{"dtype":"U8","shape":[3],"data_offsets":[22,25]}})";
  EXPECT_EQ(bytes.substr(8, header.size()), header);

  const auto file = SafetensorsFile::from_bytes(bytes, "mem");
  EXPECT_THAT(file.names(), ElementsAre("d", "f", "g", "h", "u"));
  for (const auto& name : file.names()) {
    const TensorInfo& ti = file.info(name);
    EXPECT_EQ(ti.offset % dtype_size(ti.dtype), 0u) << name;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(file.data(name)) % dtype_size(ti.dtype), 0u) << name;
  }
  EXPECT_EQ(*static_cast<const double*>(file.data("d")), 2.0);
  EXPECT_EQ(static_cast<const float*>(file.data("g"))[1], 4.0f);
}

TEST_F(SafetensorsTest, EmptyFileHasEightBytePaddedHeader) {
  SafetensorsWriter w;
  const std::string bytes = w.to_bytes();
  EXPECT_EQ(bytes, std::string("\x08\0\0\0\0\0\0\0{}      ", 16));
  const auto f = SafetensorsFile::from_bytes(bytes, "empty");
  EXPECT_TRUE(f.names().empty());
  EXPECT_TRUE(f.metadata().empty());
}

TEST_F(SafetensorsTest, RoundTripEveryDtype) {
  const std::vector<float> f32 = {1.5f, -2.25f, 3.0f, 0.0f, -0.0f, 1e-30f};
  const std::vector<double> f64 = {3.141592653589793};
  const std::vector<uint16_t> bf16 = {0x3f80, 0xc000, 0x7f80, 0x0001};
  const std::vector<int32_t> i32 = {-1, 2147483647, -2147483647 - 1};
  const std::vector<int64_t> i64 = {-5, 9007199254740993LL};
  const std::vector<uint8_t> u8 = {0, 1, 2, 255, 128};
  const std::vector<uint16_t> f16 = {0x3c00, 0xc000};
  const std::vector<int8_t> i8 = {-128, 127};
  const std::vector<int16_t> i16 = {-32768, 32767};
  const std::vector<uint16_t> u16 = {65535};
  const std::vector<uint32_t> u32 = {4294967295u};
  const std::vector<uint64_t> u64 = {18446744073709551615ull};
  const std::vector<uint8_t> boolean = {1, 0, 1};
  const std::vector<uint8_t> f8 = {0x7e, 0x01};

  struct Case {
    std::string name;
    Dtype dtype;
    std::vector<int64_t> shape;
    const void* data;
    std::size_t bytes;
  };
  const std::vector<Case> cases = {
      {"f32", Dtype::F32, {2, 3}, f32.data(), 24},
      {"f64_scalar", Dtype::F64, {}, f64.data(), 8},
      {"bf16", Dtype::BF16, {4}, bf16.data(), 8},
      {"i32", Dtype::I32, {3, 1}, i32.data(), 12},
      {"i64", Dtype::I64, {2}, i64.data(), 16},
      {"u8", Dtype::U8, {5}, u8.data(), 5},
      {"empty_f32", Dtype::F32, {0, 3}, nullptr, 0},
      {"f16", Dtype::F16, {1, 2}, f16.data(), 4},
      {"i8", Dtype::I8, {2}, i8.data(), 2},
      {"i16", Dtype::I16, {2}, i16.data(), 4},
      {"u16", Dtype::U16, {1}, u16.data(), 2},
      {"u32", Dtype::U32, {1}, u32.data(), 4},
      {"empty_i64", Dtype::I64, {0}, nullptr, 0},
      {"u64", Dtype::U64, {1, 1, 1}, u64.data(), 8},
      {"bool", Dtype::BOOL, {3}, boolean.data(), 3},
      {"f8_e4m3", Dtype::F8_E4M3, {2}, f8.data(), 2},
      {"f8_e5m2", Dtype::F8_E5M2, {2}, f8.data(), 2},
  };
  SafetensorsWriter w;
  for (const auto& c : cases) w.add(c.name, c.dtype, c.shape, c.data);
  w.set_metadata("step", "1200");
  w.set_metadata("note", "quotes \" and \\ and \xc3\xa9");
  EXPECT_EQ(w.size(), cases.size());
  w.write(path("all.safetensors"));

  const auto f = SafetensorsFile::open(path("all.safetensors"));
  EXPECT_EQ(f.path(), path("all.safetensors"));
  std::vector<std::string> expected_names;
  for (const auto& c : cases) expected_names.push_back(c.name);
  // Zero-size tensors share an offset with their neighbour, so compare as sets.
  auto names = f.names();
  std::sort(names.begin(), names.end());
  std::sort(expected_names.begin(), expected_names.end());
  EXPECT_EQ(names, expected_names);
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    ASSERT_TRUE(f.has(c.name));
    const TensorInfo& ti = f.info(c.name);
    EXPECT_EQ(ti.dtype, c.dtype);
    EXPECT_EQ(ti.shape, c.shape);
    EXPECT_EQ(ti.byte_size, c.bytes);
    int64_t numel = 1;
    for (auto d : c.shape) numel *= d;
    EXPECT_EQ(ti.numel, numel);
    if (c.bytes) {
      EXPECT_EQ(std::memcmp(f.data(c.name), c.data, c.bytes), 0);
    }
  }
  EXPECT_EQ(f.info("f64_scalar").numel, 1);
  EXPECT_EQ(f.info("empty_f32").numel, 0);
  EXPECT_FALSE(f.has("nope"));
  EXPECT_EQ(f.metadata().at("step"), "1200");
  EXPECT_EQ(f.metadata().at("note"), "quotes \" and \\ and \xc3\xa9");
  EXPECT_EQ(f.metadata().size(), 2u);
}

TEST_F(SafetensorsTest, ReadsUnpaddedHeaderAndAnyKeyOrder) {
  // Other writers need not pad or order the header; the format allows both.
  const std::string bytes = st_bytes(
      R"({"b":{"dtype":"U8","shape":[1],"data_offsets":[4,5]},)"
      R"("a":{"data_offsets":[0,4],"shape":[],"dtype":"F32"}})",
      std::string("\x00\x00\x80\x3f\x2a", 5), /*pad=*/false);
  const auto f = SafetensorsFile::from_bytes(bytes, "mem");
  EXPECT_THAT(f.names(), ElementsAre("a", "b"));
  float a = 0;
  copy_f32(f, "a", {}, &a);
  EXPECT_EQ(a, 1.0f);
  EXPECT_EQ(*static_cast<const uint8_t*>(f.data("b")), 0x2a);
}

TEST_F(SafetensorsTest, CopyF32) {
  const std::vector<float> v = {1, 2, 3, 4, 5, 6};
  const double d = 1.0;
  SafetensorsWriter w;
  w.add("w", Dtype::F32, {2, 3}, v.data());
  w.add("d", Dtype::F64, {1}, &d);
  w.write(path("m.safetensors"));
  const auto f = SafetensorsFile::open(path("m.safetensors"));
  std::vector<float> out(6, 0.0f);
  copy_f32(f, "w", {2, 3}, out.data());
  EXPECT_EQ(out, v);

  EXPECT_EQ(error_of([&] { copy_f32(f, "w", {3, 2}, out.data()); }),
            path("m.safetensors") + ": tensor 'w' has shape [2,3], expected [3,2]");
  EXPECT_EQ(error_of([&] { copy_f32(f, "w", {6}, out.data()); }),
            path("m.safetensors") + ": tensor 'w' has shape [2,3], expected [6]");
  EXPECT_EQ(error_of([&] { copy_f32(f, "x", {1}, out.data()); }),
            path("m.safetensors") + ": missing tensor 'x'");
  EXPECT_EQ(error_of([&] { copy_f32(f, "d", {1}, out.data()); }),
            path("m.safetensors") + ": tensor 'd' has dtype F64, expected F32");
  EXPECT_THAT(error_of([&] { f.info("x"); }), HasSubstr("missing tensor 'x'"));
  EXPECT_THAT(error_of([&] { f.data("x"); }), HasSubstr("missing tensor 'x'"));
}

TEST_F(SafetensorsTest, WriterRejectsBadTensors) {
  const float v[4] = {};
  SafetensorsWriter w;
  w.add("a", Dtype::F32, {4}, v);
  EXPECT_THAT(error_of([&] { w.add("a", Dtype::F32, {4}, v); }),
              AllOf(HasSubstr("'a'"), HasSubstr("added twice")));
  EXPECT_THAT(error_of([&] { w.add("neg", Dtype::F32, {2, -1}, v); }),
              AllOf(HasSubstr("'neg'"), HasSubstr("negative dimension"), HasSubstr("[2,-1]")));
  EXPECT_THAT(error_of([&] { w.add("__metadata__", Dtype::F32, {1}, v); }),
              HasSubstr("reserved"));
  EXPECT_THAT(error_of([&] { w.add("", Dtype::F32, {1}, v); }), HasSubstr("empty"));
  EXPECT_THAT(error_of([&] { w.add("null", Dtype::F32, {1}, nullptr); }), HasSubstr("no data"));
  EXPECT_THAT(error_of([&] {
                w.add("huge", Dtype::F64, {int64_t{1} << 40, int64_t{1} << 40}, v);
              }),
              HasSubstr("too large"));
  EXPECT_EQ(w.size(), 1u);  // the failed adds left nothing behind
}

TEST_F(SafetensorsTest, WriterRejectsInvalidUtf8Name) {
  const float v[1] = {};
  SafetensorsWriter w;
  w.add("bad\xff", Dtype::F32, {1}, v);
  EXPECT_THAT(error_of([&] { w.write(path("bad.safetensors")); }),
              AllOf(HasSubstr(path("bad.safetensors")), HasSubstr("UTF-8")));
  EXPECT_TRUE(listing().empty());
}

TEST_F(SafetensorsTest, FailedWriteLeavesNothing) {
  const float v[1] = {};
  SafetensorsWriter w;
  w.add("a", Dtype::F32, {1}, v);
  const std::string target = path("missing/dir/model.safetensors");
  EXPECT_THAT(error_of([&] { w.write(target); }), HasSubstr(target));
  EXPECT_TRUE(listing().empty());
}

// ----------------------------------------------------------------- damaged files, one each

class BadSafetensorsTest : public TempDirTest {
 protected:
  // Writes `bytes` to a file and returns the error message opening it produces; checks that
  // the message names the file.
  std::string open_error(const std::string& bytes) {
    const std::string p = path("bad.safetensors");
    write_file_atomic(p, bytes);
    const std::string msg = error_of([&] { SafetensorsFile::open(p); });
    EXPECT_THAT(msg, HasSubstr(p + ": "));
    return msg;
  }
  static std::string tensor(const std::string& name, const std::string& dtype,
                            const std::string& shape, const std::string& offsets) {
    return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
           ",\"data_offsets\":" + offsets + "}";
  }
};

TEST_F(BadSafetensorsTest, MissingFile) {
  const std::string p = path("nope.safetensors");
  EXPECT_THAT(error_of([&] { SafetensorsFile::open(p); }),
              AllOf(HasSubstr(p), HasSubstr("cannot open")));
}

TEST_F(BadSafetensorsTest, ShorterThanEightBytes) {
  EXPECT_THAT(open_error("abc"), AllOf(HasSubstr("3 bytes"), HasSubstr("shorter than the 8-byte")));
  EXPECT_THAT(open_error(""), HasSubstr("0 bytes"));
}

TEST_F(BadSafetensorsTest, HeaderLengthPastEndOfFile) {
  std::string bytes = st_bytes("{}", "");
  bytes[0] = static_cast<char>(0xb0);  // 1200 = 0x4b0
  bytes[1] = 0x04;
  EXPECT_THAT(open_error(bytes),
              HasSubstr("truncated: header length says 1200 bytes, file has 8 after the length"));
}

TEST_F(BadSafetensorsTest, AbsurdHeaderLength) {
  std::string bytes = st_bytes("{}", "");
  bytes[7] = 0x01;  // 2^56
  EXPECT_THAT(open_error(bytes), AllOf(HasSubstr("header length 72057594037927944"),
                                       HasSubstr("absurd")));
}

TEST_F(BadSafetensorsTest, HeaderNotJson) {
  EXPECT_THAT(open_error(st_bytes("{\"a\": ", "")), HasSubstr("header is not valid JSON"));
  EXPECT_THAT(open_error(st_bytes("garbage!", "")), HasSubstr("header is not valid JSON"));
}

TEST_F(BadSafetensorsTest, HeaderNotObject) {
  EXPECT_THAT(open_error(st_bytes("[1,2]", "")), HasSubstr("header is not a JSON object"));
}

TEST_F(BadSafetensorsTest, EntryNotObject) {
  EXPECT_THAT(open_error(st_bytes(R"({"a":3})", "")),
              HasSubstr("tensor 'a': header entry is not a JSON object"));
}

TEST_F(BadSafetensorsTest, MissingDtype) {
  EXPECT_THAT(open_error(st_bytes(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", "abcd")),
              HasSubstr("tensor 'a' has no dtype"));
}

TEST_F(BadSafetensorsTest, MissingShape) {
  EXPECT_THAT(open_error(st_bytes(R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", "abcd")),
              HasSubstr("tensor 'a' has no shape"));
}

TEST_F(BadSafetensorsTest, MissingDataOffsets) {
  EXPECT_THAT(open_error(st_bytes(R"({"a":{"dtype":"F32","shape":[1]}})", "abcd")),
              HasSubstr("tensor 'a' has no data_offsets"));
}

TEST_F(BadSafetensorsTest, UnknownDtype) {
  EXPECT_THAT(open_error(st_bytes("{" + tensor("a", "F17", "[1]", "[0,4]") + "}", "abcd")),
              HasSubstr("tensor 'a' has unknown dtype 'F17'"));
}

TEST_F(BadSafetensorsTest, DtypeNotString) {
  EXPECT_THAT(
      open_error(st_bytes(R"({"a":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", "abcd")),
      HasSubstr("tensor 'a': dtype is not a string"));
}

TEST_F(BadSafetensorsTest, NegativeOrFractionalShape) {
  EXPECT_THAT(open_error(st_bytes("{" + tensor("a", "F32", "[-1]", "[0,4]") + "}", "abcd")),
              HasSubstr("non-negative integers"));
  EXPECT_THAT(open_error(st_bytes("{" + tensor("a", "F32", "[1.0]", "[0,4]") + "}", "abcd")),
              HasSubstr("non-negative integers"));
  EXPECT_THAT(open_error(st_bytes("{" + tensor("a", "F32", "4", "[0,4]") + "}", "abcd")),
              HasSubstr("shape is not a list"));
}

TEST_F(BadSafetensorsTest, MalformedDataOffsets) {
  EXPECT_THAT(open_error(st_bytes("{" + tensor("a", "F32", "[1]", "[0,4,8]") + "}", "abcd")),
              HasSubstr("must be [begin, end]"));
  EXPECT_THAT(open_error(st_bytes("{" + tensor("a", "F32", "[1]", "[-4,0]") + "}", "abcd")),
              HasSubstr("must be [begin, end]"));
}

TEST_F(BadSafetensorsTest, OffsetsOutsideDataSection) {
  EXPECT_THAT(open_error(st_bytes("{" + tensor("a", "F32", "[4]", "[0,16]") + "}", "12345678")),
              AllOf(HasSubstr("truncated: header says 16 bytes of tensor data, file has 8"),
                    HasSubstr("tensor 'a'")));
}

TEST_F(BadSafetensorsTest, TruncatedDataSection) {
  const std::vector<float> v(300, 1.0f);
  SafetensorsWriter w;
  w.add("w", Dtype::F32, {300}, v.data());
  std::string bytes = w.to_bytes();
  bytes.resize(bytes.size() - 400);
  EXPECT_THAT(open_error(bytes),
              HasSubstr("truncated: header says 1200 bytes of tensor data, file has 800"));
}

TEST_F(BadSafetensorsTest, EndBeforeBegin) {
  EXPECT_THAT(open_error(st_bytes("{" + tensor("a", "F32", "[0]", "[4,0]") + "}", "abcd")),
              HasSubstr("tensor 'a' has data_offsets [4, 0]: end is before begin"));
}

TEST_F(BadSafetensorsTest, ByteLengthDoesNotMatchShape) {
  EXPECT_THAT(open_error(st_bytes("{" + tensor("a", "F32", "[3]", "[0,8]") + "}", "12345678")),
              HasSubstr("tensor 'a' has 8 bytes (data_offsets [0, 8]) but shape [3] of F32 needs 12"));
}

TEST_F(BadSafetensorsTest, HugeShapeOverflows) {
  EXPECT_THAT(
      open_error(st_bytes(
          "{" + tensor("a", "F32", "[4294967296,4294967296]", "[0,4]") + "}", "abcd")),
      HasSubstr("too large"));
}

TEST_F(BadSafetensorsTest, OverlappingRanges) {
  EXPECT_THAT(open_error(st_bytes("{" + tensor("a", "F32", "[2]", "[0,8]") + "," +
                                      tensor("b", "F32", "[2]", "[4,12]") + "}",
                                  "123456789012")),
              AllOf(HasSubstr("tensors 'a' [0, 8] and 'b' [4, 12] overlap")));
}

TEST_F(BadSafetensorsTest, GapBetweenTensors) {
  EXPECT_THAT(open_error(st_bytes("{" + tensor("a", "F32", "[1]", "[0,4]") + "," +
                                      tensor("b", "F32", "[1]", "[8,12]") + "}",
                                  "123456789012")),
              HasSubstr("not contiguous: bytes [4, 8] before tensor 'b' belong to no tensor"));
}

TEST_F(BadSafetensorsTest, DataNotStartingAtZero) {
  EXPECT_THAT(open_error(st_bytes("{" + tensor("a", "F32", "[1]", "[4,8]") + "}", "12345678")),
              HasSubstr("not contiguous: bytes [0, 4] before tensor 'a'"));
}

TEST_F(BadSafetensorsTest, TrailingDataBeyondTensors) {
  EXPECT_THAT(open_error(st_bytes("{" + tensor("a", "F32", "[1]", "[0,4]") + "}", "12345678")),
              HasSubstr("trailing data: the data section has 8 bytes but the tensors cover 4"));
  EXPECT_THAT(open_error(st_bytes("{}", "x")), HasSubstr("trailing data"));
}

TEST_F(BadSafetensorsTest, MetadataMustMapStringsToStrings) {
  EXPECT_THAT(open_error(st_bytes(R"({"__metadata__":{"k":1}})", "")),
              HasSubstr("__metadata__ value for 'k' is not a string"));
  EXPECT_THAT(open_error(st_bytes(R"({"__metadata__":[]})", "")),
              HasSubstr("__metadata__ is not a JSON object"));
}

TEST_F(BadSafetensorsTest, DuplicateTensorName) {
  EXPECT_THAT(open_error(st_bytes("{" + tensor("a", "F32", "[1]", "[0,4]") + "," +
                                      tensor("a", "F32", "[1]", "[4,8]") + "}",
                                  "12345678")),
              HasSubstr("header names 'a' twice"));
}

TEST_F(BadSafetensorsTest, MessageStaysOneLineWithNewlineInName) {
  const std::string msg =
      open_error(st_bytes("{" + tensor("a\\nb", "F99", "[1]", "[0,4]") + "}", "abcd"));
  EXPECT_THAT(msg, AllOf(HasSubstr("tensor 'a b'"), HasSubstr("unknown dtype")));
}

}  // namespace
