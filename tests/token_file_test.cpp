// Binary token files (data/token_file.h), the batch loader (data/loader.h) and `prepare`
// (data/prepare.h): round trips, the exact header bytes, one test per kind of damaged file,
// hand-computed batches, shuffling properties, and the corpus split.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "data/loader.h"
#include "data/prepare.h"
#include "data/token_file.h"
#include "data/tokenizer.h"
#include "util/error.h"
#include "test_util.h"

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using namespace pipenag;
using namespace pipenag::testutil;

namespace {

void put32(std::string& b, size_t at, uint32_t v) { std::memcpy(&b[at], &v, 4); }
void put64(std::string& b, size_t at, uint64_t v) { std::memcpy(&b[at], &v, 8); }

// A header built by hand from the documented layout, followed by `payload`.
std::string hand_file(uint32_t vocab, uint32_t dtype, uint64_t count, const std::string& payload) {
  std::string b(64, '\0');
  std::memcpy(&b[0], "PNAGTOK\0", 8);
  put32(b, 8, 1);
  put32(b, 12, vocab);
  put32(b, 16, dtype);
  put32(b, 20, 64);
  put64(b, 24, count);
  put64(b, 32, xxhash64(payload.data(), payload.size()));
  return b + payload;
}

std::string u16_payload(const std::vector<uint16_t>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 2);
}


// ------------------------------------------------------------------------------- checksum

TEST(XXHash64, MatchesTheReferenceVectors) {
  EXPECT_EQ(xxhash64("", 0), 0xEF46DB3751D8E999ULL);
  EXPECT_EQ(xxhash64("a", 1), 0xD24EC4F1A98C6E5BULL);
  EXPECT_EQ(xxhash64("abc", 3), 0x44BC2CF5AD770999ULL);
  EXPECT_EQ(xxhash64("asdf", 4), 0x415872F599CEA71EULL);
  EXPECT_EQ(xxhash64("Call me Ishmael.", 16), 0x6D04390FC9D61A90ULL);
  const char* text = "Nobody inspects the spammish repetition";  // 39 bytes: the 32-byte stripes
  EXPECT_EQ(xxhash64(text, std::strlen(text)), 0xFBCEA83C8A378BF1ULL);
  EXPECT_EQ(xxhash64("", 0, 1), 0xD5AFBA1336A3BE4BULL);  // the seed matters
}

// ------------------------------------------------------------------------------- round trips

using TokenFileTest = TempDirTest;

TEST_F(TokenFileTest, RoundTripUint16) {
  const std::vector<int32_t> tokens = {0, 1, 50256, 257, 65535 % 50257, 42, 50000};
  write_token_file(path("a.bin"), tokens, 50257);
  EXPECT_EQ(fs::file_size(path("a.bin")), 64u + tokens.size() * 2);
  const TokenFile f = TokenFile::open(path("a.bin"));
  EXPECT_EQ(f.vocab_size(), 50257);
  EXPECT_EQ(f.dtype_bytes(), 2u);
  ASSERT_EQ(f.size(), tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) EXPECT_EQ(f[i], tokens[i]) << i;
  std::vector<int32_t> out(4, -1);
  f.copy(2, 4, out.data());
  EXPECT_EQ(out, std::vector<int32_t>(tokens.begin() + 2, tokens.begin() + 6));
  EXPECT_EQ(f.path(), path("a.bin"));
}

TEST_F(TokenFileTest, RoundTripUint32) {
  const std::vector<int32_t> tokens = {0, 65535, 65536, 99999, 7, 70000};
  write_token_file(path("b.bin"), tokens, 100000);
  EXPECT_EQ(fs::file_size(path("b.bin")), 64u + tokens.size() * 4);
  const TokenFile f = TokenFile::open(path("b.bin"));
  EXPECT_EQ(f.vocab_size(), 100000);
  EXPECT_EQ(f.dtype_bytes(), 4u);
  ASSERT_EQ(f.size(), tokens.size());
  std::vector<int32_t> out(tokens.size());
  f.copy(0, tokens.size(), out.data());
  EXPECT_EQ(out, tokens);
  for (size_t i = 0; i < tokens.size(); ++i) EXPECT_EQ(f[i], tokens[i]) << i;
}

TEST_F(TokenFileTest, DtypeBoundaryIs65536) {
  EXPECT_EQ(token_dtype_for_vocab(256), 2u);
  EXPECT_EQ(token_dtype_for_vocab(65536), 2u);
  EXPECT_EQ(token_dtype_for_vocab(65537), 4u);
  write_token_file(path("c.bin"), {65535, 0}, 65536);
  const TokenFile f = TokenFile::open(path("c.bin"));
  EXPECT_EQ(f.dtype_bytes(), 2u);
  EXPECT_EQ(f[0], 65535);
}

TEST_F(TokenFileTest, EmptyTokenListRoundTrips) {
  write_token_file(path("e.bin"), {}, 256);
  EXPECT_EQ(fs::file_size(path("e.bin")), 64u);
  const TokenFile f = TokenFile::open(path("e.bin"));
  EXPECT_EQ(f.size(), 0u);
  EXPECT_EQ(f.checksum(), 0xEF46DB3751D8E999ULL);  // XXH64 of nothing
}

TEST_F(TokenFileTest, HeaderLayoutIsExactlyAsDocumented) {
  write_token_file(path("h.bin"), {1, 2, 3}, 256);
  const std::string bytes = slurp(path("h.bin"));
  const unsigned char payload[] = {1, 0, 2, 0, 3, 0};
  const uint64_t sum = xxhash64(payload, sizeof payload);
  std::vector<unsigned char> want = {
      'P', 'N', 'A', 'G', 'T', 'O', 'K', 0,  // magic
      1,   0,   0,   0,                      // version 1
      0,   1,   0,   0,                      // vocab 256
      2,   0,   0,   0,                      // dtype uint16
      64,  0,   0,   0,                      // header size
      3,   0,   0,   0,   0,   0,   0,   0   // count
  };
  for (int i = 0; i < 8; ++i) want.push_back(static_cast<unsigned char>(sum >> (8 * i)));
  want.resize(64, 0);  // reserved
  want.insert(want.end(), payload, payload + sizeof payload);
  ASSERT_EQ(bytes.size(), want.size());
  EXPECT_EQ(std::vector<unsigned char>(bytes.begin(), bytes.end()), want);
  EXPECT_EQ(hand_file(256, 2, 3, u16_payload({1, 2, 3})), bytes);

  // uint32: vocabulary 70000 = 0x11170, dtype 4, little-endian tokens.
  write_token_file(path("w.bin"), {0x10203}, 70000);
  const std::string w = slurp(path("w.bin"));
  ASSERT_EQ(w.size(), 68u);
  EXPECT_EQ(w.substr(12, 8), std::string("\x70\x11\x01\x00\x04\x00\x00\x00", 8));
  EXPECT_EQ(w.substr(64), std::string("\x03\x02\x01\x00", 4));
}

TEST_F(TokenFileTest, MoveTransfersTheMapping) {
  write_token_file(path("m.bin"), {5, 6, 7}, 10);
  TokenFile a = TokenFile::open(path("m.bin"));
  TokenFile b(std::move(a));
  EXPECT_EQ(a.size(), 0u);  // NOLINT(bugprone-use-after-move): moved-from is empty
  ASSERT_EQ(b.size(), 3u);
  EXPECT_EQ(b[2], 7);
  write_token_file(path("n.bin"), {1}, 10);
  TokenFile c = TokenFile::open(path("n.bin"));
  c = std::move(b);
  ASSERT_EQ(c.size(), 3u);
  EXPECT_EQ(c[0], 5);
  EXPECT_EQ(c.path(), path("m.bin"));
}

TEST_F(TokenFileTest, CopyOutOfRangeIsAnError) {
  write_token_file(path("r.bin"), {1, 2, 3}, 10);
  const TokenFile f = TokenFile::open(path("r.bin"));
  int32_t out[4];
  EXPECT_THAT(error_of([&] { f.copy(1, 3, out); }),
              AllOf(HasSubstr(path("r.bin")), HasSubstr("outside the file (3 tokens)")));
}

// ------------------------------------------------------------------------------- damaged files

using BadTokenFileTest = TempDirTest;

TEST_F(BadTokenFileTest, MissingFile) {
  EXPECT_THAT(error_of([&] { TokenFile::open(path("nope.bin")); }),
              AllOf(HasSubstr(path("nope.bin")), HasSubstr("cannot open")));
}

TEST_F(BadTokenFileTest, EmptyFile) {
  spit(path("empty.bin"), "");
  EXPECT_THAT(error_of([&] { TokenFile::open(path("empty.bin")); }),
              AllOf(HasSubstr(path("empty.bin")), HasSubstr("shorter than the 64-byte header")));
}

TEST_F(BadTokenFileTest, ShorterThanTheHeader) {
  spit(path("short.bin"), hand_file(256, 2, 0, "").substr(0, 40));
  EXPECT_THAT(error_of([&] { TokenFile::open(path("short.bin")); }),
              AllOf(HasSubstr(path("short.bin")), HasSubstr("40 bytes, shorter than")));
}

TEST_F(BadTokenFileTest, WrongMagic) {
  std::string b = hand_file(256, 2, 1, u16_payload({1}));
  b[0] = 'X';
  spit(path("magic.bin"), b);
  EXPECT_THAT(error_of([&] { TokenFile::open(path("magic.bin")); }),
              AllOf(HasSubstr(path("magic.bin")), HasSubstr("wrong magic")));
}

TEST_F(BadTokenFileTest, UnsupportedVersion) {
  std::string b = hand_file(256, 2, 1, u16_payload({1}));
  put32(b, 8, 2);
  spit(path("ver.bin"), b);
  EXPECT_THAT(error_of([&] { TokenFile::open(path("ver.bin")); }),
              AllOf(HasSubstr(path("ver.bin")), HasSubstr("unsupported token file version 2")));
}

TEST_F(BadTokenFileTest, UnsupportedDtype) {
  spit(path("dt.bin"), hand_file(256, 3, 1, "abc"));
  EXPECT_THAT(error_of([&] { TokenFile::open(path("dt.bin")); }),
              AllOf(HasSubstr(path("dt.bin")), HasSubstr("unsupported token dtype 3")));
}

TEST_F(BadTokenFileTest, DtypeInconsistentWithVocabulary) {
  spit(path("small.bin"), hand_file(70000, 2, 1, u16_payload({1})));
  EXPECT_THAT(error_of([&] { TokenFile::open(path("small.bin")); }),
              AllOf(HasSubstr(path("small.bin")),
                    HasSubstr("dtype 2 is inconsistent with vocabulary size 70000")));
  spit(path("wide.bin"), hand_file(256, 4, 1, std::string("\1\0\0\0", 4)));
  EXPECT_THAT(error_of([&] { TokenFile::open(path("wide.bin")); }),
              AllOf(HasSubstr(path("wide.bin")),
                    HasSubstr("dtype 4 is inconsistent with vocabulary size 256")));
}

TEST_F(BadTokenFileTest, ZeroVocabulary) {
  spit(path("v0.bin"), hand_file(0, 2, 0, ""));
  EXPECT_THAT(error_of([&] { TokenFile::open(path("v0.bin")); }),
              AllOf(HasSubstr(path("v0.bin")), HasSubstr("invalid vocabulary size 0")));
}

TEST_F(BadTokenFileTest, ReservedBytesMustBeZero) {
  std::string b = hand_file(256, 2, 1, u16_payload({1}));
  b[50] = 1;
  spit(path("res.bin"), b);
  EXPECT_THAT(error_of([&] { TokenFile::open(path("res.bin")); }),
              AllOf(HasSubstr(path("res.bin")), HasSubstr("reserved header byte 50")));
}

TEST_F(BadTokenFileTest, TruncatedPayload) {
  write_token_file(path("t.bin"), {1, 2, 3, 4}, 256);
  fs::resize_file(path("t.bin"), 64 + 7);  // half a token short
  EXPECT_THAT(error_of([&] { TokenFile::open(path("t.bin")); }),
              AllOf(HasSubstr(path("t.bin")), HasSubstr("truncated"),
                    HasSubstr("4 tokens of 2 bytes (8 bytes) but the payload has 7 bytes")));
  // A count so large that count * dtype overflows is still "truncated", not a crash.
  std::string b = hand_file(256, 2, 0, u16_payload({1}));
  put64(b, 24, ~uint64_t{0});
  spit(path("huge.bin"), b);
  EXPECT_THAT(error_of([&] { TokenFile::open(path("huge.bin")); }),
              AllOf(HasSubstr(path("huge.bin")), HasSubstr("truncated")));
}

TEST_F(BadTokenFileTest, TrailingBytes) {
  write_token_file(path("x.bin"), {1, 2, 3}, 256);
  spit(path("x.bin"), slurp(path("x.bin")) + "zz");
  EXPECT_THAT(error_of([&] { TokenFile::open(path("x.bin")); }),
              AllOf(HasSubstr(path("x.bin")), HasSubstr("trailing bytes"),
                    HasSubstr("payload has 8 bytes")));
}

TEST_F(BadTokenFileTest, ChecksumMismatch) {
  write_token_file(path("c.bin"), {1, 2, 3}, 256);
  std::string b = slurp(path("c.bin"));
  b[66] = 9;  // token 1: 2 -> 9, still inside the vocabulary
  spit(path("c.bin"), b);
  EXPECT_THAT(error_of([&] { TokenFile::open(path("c.bin")); }),
              AllOf(HasSubstr(path("c.bin")), HasSubstr("checksum mismatch")));
  // Not verifying trusts the payload.
  const TokenFile f = TokenFile::open(path("c.bin"), /*verify_checksum=*/false);
  EXPECT_EQ(f[1], 9);
}

TEST_F(BadTokenFileTest, TokenOutsideTheVocabulary) {
  // A consistent checksum over a payload holding id 300 in a 256-token vocabulary.
  spit(path("oov.bin"), hand_file(256, 2, 4, u16_payload({1, 255, 300, 400})));
  EXPECT_THAT(error_of([&] { TokenFile::open(path("oov.bin")); }),
              AllOf(HasSubstr(path("oov.bin")),
                    HasSubstr("token 300 at index 2 is outside the vocabulary (size 256)")));
  // uint32 payload.
  const uint32_t wide[] = {5, 70000, 80000};
  spit(path("oov4.bin"),
       hand_file(70000, 4, 3, std::string(reinterpret_cast<const char*>(wide), sizeof wide)));
  EXPECT_THAT(error_of([&] { TokenFile::open(path("oov4.bin")); }),
              AllOf(HasSubstr(path("oov4.bin")), HasSubstr("token 70000 at index 1")));
}

// ------------------------------------------------------------------------------- writer

using TokenWriterTest = TempDirTest;

TEST_F(TokenWriterTest, RejectsTokensOutsideTheVocabularyAndLeavesNothing) {
  EXPECT_THAT(error_of([&] { write_token_file(path("w.bin"), {1, 2, 256, 3}, 256); }),
              AllOf(HasSubstr(path("w.bin")),
                    HasSubstr("token 256 at index 2 is outside the vocabulary (size 256)")));
  EXPECT_THAT(error_of([&] { write_token_file(path("w.bin"), {-1}, 256); }),
              AllOf(HasSubstr(path("w.bin")), HasSubstr("token -1 at index 0")));
  EXPECT_THAT(error_of([&] { write_token_file(path("w.bin"), {0}, 0); }),
              AllOf(HasSubstr(path("w.bin")), HasSubstr("vocabulary size 0")));
  EXPECT_TRUE(listing().empty()) << "a failed write left files behind";
}

TEST_F(TokenWriterTest, FailedWriteKeepsTheOldFile) {
  write_token_file(path("keep.bin"), {7, 8}, 256);
  const std::string before = slurp(path("keep.bin"));
  EXPECT_THAT(error_of([&] { write_token_file(path("keep.bin"), {7, 999}, 256); }),
              HasSubstr(path("keep.bin")));
  EXPECT_EQ(slurp(path("keep.bin")), before);
  EXPECT_EQ(listing(), std::vector<std::string>{"keep.bin"});
}

TEST_F(TokenWriterTest, MissingFolderIsAnErrorNamingTheFile) {
  const std::string p = path("no/such/dir/t.bin");
  EXPECT_THAT(error_of([&] { write_token_file(p, {1}, 256); }), HasSubstr(p));
  EXPECT_TRUE(listing().empty());
}

// ------------------------------------------------------------------------------- loader

class LoaderTest : public TempDirTest {
 protected:
  // A file whose token i is value(i), so a batch shows which positions it was cut from.
  TokenFile make(size_t n, int vocab, const std::function<int32_t(size_t)>& value,
                 const std::string& name = "split.bin") {
    std::vector<int32_t> t(n);
    for (size_t i = 0; i < n; ++i) t[i] = value(i);
    write_token_file(path(name), t, vocab);
    return TokenFile::open(path(name));
  }
  // The start offsets of the B sequences of batch i (inputs[b*T] is the start for identity files).
  static std::vector<int32_t> firsts(const TokenLoader& L, int64_t i) {
    std::vector<int32_t> in(static_cast<size_t>(L.B() * L.T())), tg(in.size());
    L.batch(i, in.data(), tg.data());
    std::vector<int32_t> out;
    for (int b = 0; b < L.B(); ++b) out.push_back(in[static_cast<size_t>(b * L.T())]);
    return out;
  }
};

TEST_F(LoaderTest, SequentialBatchesMatchAHandComputation) {
  // 23 tokens, T = 4: S = (23-1)/4 = 5 slots at 0, 4, 8, 12, 16; B = 2.
  const TokenFile f = make(23, 2000, [](size_t i) { return static_cast<int32_t>(1000 + i); });
  const TokenLoader L(f, 2, 4, Order::Sequential, 0, "train");
  EXPECT_EQ(L.sequences(), 5);
  EXPECT_EQ(L.batches_per_epoch(), 2);
  std::vector<int32_t> in(8), tg(8);
  L.batch(0, in.data(), tg.data());
  EXPECT_EQ(in, (std::vector<int32_t>{1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007}));
  EXPECT_EQ(tg, (std::vector<int32_t>{1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008}));
  L.batch(1, in.data(), tg.data());
  EXPECT_EQ(in, (std::vector<int32_t>{1008, 1009, 1010, 1011, 1012, 1013, 1014, 1015}));
  EXPECT_EQ(tg, (std::vector<int32_t>{1009, 1010, 1011, 1012, 1013, 1014, 1015, 1016}));
  // Batch 2: slot 4 (tokens 16..20) then slot 5 mod 5 = 0, wrapping to the beginning.
  L.batch(2, in.data(), tg.data());
  EXPECT_EQ(in, (std::vector<int32_t>{1016, 1017, 1018, 1019, 1000, 1001, 1002, 1003}));
  EXPECT_EQ(tg, (std::vector<int32_t>{1017, 1018, 1019, 1020, 1001, 1002, 1003, 1004}));
  // Batch 7 = sequences 14, 15 -> slots 4, 0 again.
  L.batch(7, in.data(), tg.data());
  EXPECT_EQ(in[0], 1016);
  EXPECT_EQ(in[4], 1000);
  EXPECT_THAT(error_of([&] { L.batch(-1, in.data(), tg.data()); }), HasSubstr(path("split.bin")));
}

TEST_F(LoaderTest, KeepsWorkingWhenTheFileIsMoved) {
  TokenFile f = make(50, 256, [](size_t i) { return static_cast<int32_t>(200 - i); });
  const TokenLoader L(f, 2, 4, Order::Shuffled, 3, "train");
  std::vector<int32_t> x0(8), y0(8), x1(8), y1(8);
  L.batch(3, x0.data(), y0.data());
  const TokenFile moved = std::move(f);  // the mapping moves with it, at the same address
  L.batch(3, x1.data(), y1.data());
  EXPECT_EQ(x0, x1);
  EXPECT_EQ(y0, y1);
  EXPECT_EQ(x1[0], moved[static_cast<size_t>(L.sequence_start(6))]);
}

TEST_F(LoaderTest, ExactlyOneSequenceFits) {
  const TokenFile f = make(5, 256, [](size_t i) { return static_cast<int32_t>(i * 3); });
  const TokenLoader L(f, 3, 4, Order::Shuffled, 9, "validation");
  EXPECT_EQ(L.sequences(), 1);
  EXPECT_EQ(L.batches_per_epoch(), 1);
  std::vector<int32_t> in(12), tg(12);
  L.batch(4, in.data(), tg.data());
  for (int b = 0; b < 3; ++b)
    for (int t = 0; t < 4; ++t) {
      EXPECT_EQ(in[static_cast<size_t>(b * 4 + t)], 3 * t);
      EXPECT_EQ(tg[static_cast<size_t>(b * 4 + t)], 3 * (t + 1));
    }
}

TEST_F(LoaderTest, TargetsAreInputsShiftedByOne) {
  const TokenFile f = make(1000, 50257, [](size_t i) {
    return static_cast<int32_t>((i * 2654435761u) % 50257);
  });
  for (Order order : {Order::Sequential, Order::Shuffled}) {
    const TokenLoader L(f, 3, 16, order, 5, "train");
    std::vector<int32_t> in(48), tg(48);
    for (int64_t i : {0, 1, 20, 21, 100}) {
      L.batch(i, in.data(), tg.data());
      for (int b = 0; b < 3; ++b) {
        const size_t s = static_cast<size_t>(L.sequence_start(i * 3 + b));
        for (int t = 0; t < 16; ++t) {
          EXPECT_EQ(in[static_cast<size_t>(b * 16 + t)], f[s + static_cast<size_t>(t)]);
          EXPECT_EQ(tg[static_cast<size_t>(b * 16 + t)], f[s + static_cast<size_t>(t) + 1]);
        }
      }
    }
  }
}

TEST_F(LoaderTest, ShuffledIsAPermutationPerEpochThatDependsOnEpochAndSeed) {
  // Token i = i, T = 8, 64 slots; B = 5 does not divide 64, so epochs change mid-batch.
  const int T = 8, B = 5, S = 64;
  const TokenFile f = make(S * T + 3, 1 << 20, [](size_t i) { return static_cast<int32_t>(i); });
  const TokenLoader L(f, B, T, Order::Shuffled, 1234, "train");
  ASSERT_EQ(L.sequences(), S);
  // Sequence k's first input token, read from the batches themselves.
  std::vector<int32_t> starts;
  for (int64_t i = 0; static_cast<int64_t>(starts.size()) < 3 * S; ++i)
    for (int32_t s : firsts(L, i)) starts.push_back(s);
  std::vector<std::vector<int32_t>> epochs;
  for (int e = 0; e < 3; ++e) {
    std::vector<int32_t> ep(starts.begin() + e * S, starts.begin() + (e + 1) * S);
    std::vector<int32_t> sorted = ep;
    std::sort(sorted.begin(), sorted.end());
    for (int k = 0; k < S; ++k) ASSERT_EQ(sorted[static_cast<size_t>(k)], k * T) << "epoch " << e;
    epochs.push_back(ep);
  }
  std::vector<int32_t> identity(S);
  for (int k = 0; k < S; ++k) identity[static_cast<size_t>(k)] = k * T;
  EXPECT_NE(epochs[0], identity);
  EXPECT_NE(epochs[0], epochs[1]);
  EXPECT_NE(epochs[1], epochs[2]);

  // Another seed: another order. The same seed: the same order (a fresh loader, as on resume).
  const TokenLoader other(f, B, T, Order::Shuffled, 1235, "train");
  const TokenLoader same(f, B, T, Order::Shuffled, 1234, "train");
  std::vector<int32_t> other_starts, same_starts;
  for (int64_t i = 0; i < 13; ++i) {
    for (int32_t s : firsts(other, i)) other_starts.push_back(s);
    for (int32_t s : firsts(same, i)) same_starts.push_back(s);
  }
  EXPECT_NE(std::vector<int32_t>(other_starts.begin(), other_starts.begin() + S), epochs[0]);
  EXPECT_EQ(std::vector<int32_t>(same_starts.begin(), same_starts.begin() + S), epochs[0]);
  // Batch 29 out of order equals batch 29 in order.
  EXPECT_EQ(firsts(same, 29), std::vector<int32_t>(starts.begin() + 29 * B, starts.begin() + 30 * B));
}

TEST(ShuffleIndex, IsABijectionForEverySize) {
  for (uint64_t n = 1; n <= 300; ++n)
    for (uint64_t seed : {0ULL, 77ULL})
      for (uint64_t epoch : {0ULL, 3ULL}) {
        std::vector<char> seen(n, 0);
        for (uint64_t p = 0; p < n; ++p) {
          const uint64_t q = shuffle_index(p, n, seed, epoch);
          ASSERT_LT(q, n);
          ASSERT_FALSE(seen[q]) << "n=" << n << " maps two positions to " << q;
          seen[q] = 1;
        }
      }
  // Large n: no O(n) work or memory, still inside the range.
  const uint64_t big = (uint64_t{1} << 40) + 12345;
  EXPECT_LT(shuffle_index(big - 1, big, 1, 2), big);
}

TEST_F(LoaderTest, SequenceLongerThanTheSplitIsAnError) {
  const TokenFile f = make(200, 256, [](size_t i) { return static_cast<int32_t>(i % 256); },
                           "val.bin");
  EXPECT_THAT(error_of([&] { TokenLoader(f, 4, 256, Order::Sequential, 0, "validation"); }),
              AllOf(HasSubstr(path("val.bin")),
                    HasSubstr("sequence length 257 is longer than the validation split (200 tokens)")));
  // 200 tokens hold one sequence of T = 199 (200 tokens with the last target) but not T = 200.
  EXPECT_NO_THROW(TokenLoader(f, 1, 199, Order::Sequential, 0, "validation"));
  EXPECT_THAT(error_of([&] { TokenLoader(f, 1, 200, Order::Shuffled, 0, "train"); }),
              HasSubstr("sequence length 201 is longer than the train split (200 tokens)"));
  EXPECT_THAT(error_of([&] { TokenLoader(f, 0, 8, Order::Sequential, 0, "train"); }),
              HasSubstr(path("val.bin")));
}

// ------------------------------------------------------------------------------- prepare

// Test doubles for the Tokenizer interface (data/tokenizer.h): one id per byte.
class BytesTok : public Tokenizer {
 public:
  using Tokenizer::decode;
  std::string name() const override { return "test-bytes"; }
  int vocab_size() const override { return 256; }
  std::vector<int32_t> encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    for (unsigned char c : text) ids.push_back(c);
    return ids;
  }
  std::string decode(const int32_t* ids, size_t n) const override {
    std::string s;
    for (size_t i = 0; i < n; ++i) s += static_cast<char>(ids[i]);
    return s;
  }
  std::optional<int32_t> eot() const override { return std::nullopt; }
};

// Bytes plus an end-of-text id 256.
class EotTok : public BytesTok {
 public:
  std::string name() const override { return "test-bytes-eot"; }
  int vocab_size() const override { return 257; }
  std::optional<int32_t> eot() const override { return 256; }
};

// Fails on documents containing "poison".
class BrokenTok : public BytesTok {
 public:
  std::vector<int32_t> encode(std::string_view text) const override {
    if (text.find("poison") != std::string_view::npos) throw Error("boom in the tokenizer");
    return BytesTok::encode(text);
  }
};

// Emits an id outside its own vocabulary.
class WildTok : public BytesTok {
 public:
  std::vector<int32_t> encode(std::string_view text) const override {
    std::vector<int32_t> ids = BytesTok::encode(text);
    ids.push_back(300);
    return ids;
  }
};

std::vector<int32_t> bytes_of(const std::string& s) { return BytesTok().encode(s); }

std::vector<int32_t> all_tokens(const std::string& file) {
  const TokenFile f = TokenFile::open(file);
  std::vector<int32_t> out(f.size());
  f.copy(0, f.size(), out.data());
  return out;
}

class PrepareTest : public TempDirTest {
 protected:
  // doc0.txt .. doc7.txt, distinct texts of different lengths, plus a file that is not .txt.
  std::string corpus() {
    const fs::path c = dir_ / "corpus";
    fs::create_directories(c);
    for (int d = 0; d < 8; ++d) spit(c / name(d), text(d));
    spit(c / "readme.md", "not a document");
    return c.string();
  }
  static std::string name(int d) { return "doc" + std::to_string(d) + ".txt"; }
  static std::string text(int d) {
    std::string t = "Document " + std::to_string(d) + ":";
    for (int i = 0; i <= d; ++i) t += " words" + std::to_string(i * d);
    return t + "\n";
  }
  std::vector<std::string> files_in(const std::string& d) const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(d)) names.push_back(e.path().filename());
    std::sort(names.begin(), names.end());
    return names;
  }
};

// With 8 documents named doc<i>.txt, val_fraction 0.25 and seed 7, the seeded-hash rule (the
// the document split rule) sends doc0 and doc5 to validation.
TEST_F(PrepareTest, FolderCorpusSplitsByDocument) {
  const std::string in = corpus(), out = path("out");
  const PrepareStats st = prepare_corpus(in, BytesTok(), out, 0.25, 7);
  EXPECT_EQ(st.documents, 8u);
  EXPECT_EQ(st.train_docs, 6u);
  EXPECT_EQ(st.val_docs, 2u);
  EXPECT_FALSE(st.tail_split);
  EXPECT_THAT(st.val_documents, ElementsAre("doc0.txt", "doc5.txt"));
  std::vector<int32_t> want_train, want_val;
  size_t total = 0;
  for (int d = 0; d < 8; ++d) {
    const std::vector<int32_t> b = bytes_of(text(d));
    total += b.size();
    auto& dst = (d == 0 || d == 5) ? want_val : want_train;
    dst.insert(dst.end(), b.begin(), b.end());  // byte tokenizer: nothing between documents
  }
  EXPECT_EQ(all_tokens(out + "/train.bin"), want_train);
  EXPECT_EQ(all_tokens(out + "/val.bin"), want_val);
  EXPECT_EQ(st.train_tokens + st.val_tokens, total);
  EXPECT_EQ(st.train_tokens, want_train.size());
  EXPECT_EQ(TokenFile::open(out + "/val.bin").vocab_size(), 256);
  EXPECT_EQ(files_in(out), (std::vector<std::string>{"meta.json", "train.bin", "val.bin"}));
  EXPECT_EQ(st.train_path, out + "/train.bin");
  // A loader over the prepared split works directly.
  const TokenFile val = TokenFile::open(st.val_path);
  const TokenLoader L(val, 1, 8, Order::Sequential, 0, "validation");
  std::vector<int32_t> x(8), y(8);
  L.batch(0, x.data(), y.data());
  EXPECT_EQ(x, std::vector<int32_t>(want_val.begin(), want_val.begin() + 8));
}

TEST_F(PrepareTest, RealByteTokenizerMatchesTheDouble) {
  const std::string in = corpus();
  const auto byte = load_tokenizer("byte");
  const PrepareStats st = prepare_corpus(in, *byte, path("real"), 0.25, 7);
  prepare_corpus(in, BytesTok(), path("double"), 0.25, 7);
  EXPECT_EQ(st.tokenizer, "byte");
  EXPECT_EQ(st.vocab_size, 256);
  EXPECT_EQ(slurp(path("real") + "/train.bin"), slurp(path("double") + "/train.bin"));
  EXPECT_EQ(slurp(path("real") + "/val.bin"), slurp(path("double") + "/val.bin"));
  EXPECT_EQ(nlohmann::json::parse(slurp(path("real") + "/meta.json")).at("tokenizer"), "byte");
}

TEST_F(PrepareTest, EndOfTextGoesBetweenDocuments) {
  const std::string in = corpus(), out = path("out");
  const PrepareStats st = prepare_corpus(in, EotTok(), out, 0.25, 7);
  std::vector<int32_t> want_val = bytes_of(text(0));
  want_val.push_back(256);
  const std::vector<int32_t> d5 = bytes_of(text(5));
  want_val.insert(want_val.end(), d5.begin(), d5.end());
  EXPECT_EQ(all_tokens(out + "/val.bin"), want_val);
  const std::vector<int32_t> train = all_tokens(out + "/train.bin");
  EXPECT_EQ(std::count(train.begin(), train.end(), 256), 5);  // 6 documents, 5 separators
  EXPECT_NE(train.back(), 256);
  size_t total = 0;
  for (int d = 0; d < 8; ++d) total += text(d).size();
  EXPECT_EQ(st.train_tokens + st.val_tokens, total + (6 - 1) + (2 - 1));
  EXPECT_EQ(TokenFile::open(out + "/train.bin").vocab_size(), 257);
}

TEST_F(PrepareTest, SplitIsDeterministicAndFollowsTheSeed) {
  const std::string in = corpus();
  prepare_corpus(in, EotTok(), path("a"), 0.25, 7);
  prepare_corpus(in, EotTok(), path("b"), 0.25, 7);
  for (const char* f : {"/train.bin", "/val.bin", "/meta.json"})
    EXPECT_EQ(slurp(path("a") + f), slurp(path("b") + f)) << f;
  const PrepareStats s8 = prepare_corpus(in, BytesTok(), path("c"), 0.25, 8);
  EXPECT_THAT(s8.val_documents, ElementsAre("doc0.txt", "doc3.txt", "doc5.txt", "doc6.txt"));
  const PrepareStats s42 = prepare_corpus(in, BytesTok(), path("d"), 0.25, 42);
  EXPECT_THAT(s42.val_documents, ElementsAre("doc3.txt", "doc7.txt"));
  // split_documents is the rule prepare uses.
  std::vector<Document> docs;
  for (int d = 0; d < 8; ++d) docs.push_back({name(d), text(d)});
  const std::vector<bool> v = split_documents(docs, 0.25, 42);
  EXPECT_EQ(v, (std::vector<bool>{false, false, false, true, false, false, false, true}));
  // Never an empty side with two or more documents, whatever the fraction.
  const std::vector<Document> two(docs.begin(), docs.begin() + 2);
  for (double f : {0.001, 0.999})
    for (uint64_t seed = 0; seed < 20; ++seed) {
      const std::vector<bool> s = split_documents(two, f, seed);
      EXPECT_NE(s[0], s[1]) << "fraction " << f << " seed " << seed;
    }
}

TEST_F(PrepareTest, MetaJsonDescribesTheSplits) {
  const std::string in = corpus(), out = path("out");
  const PrepareStats st = prepare_corpus(in, EotTok(), out, 0.25, 7);
  const auto meta = nlohmann::json::parse(slurp(out + "/meta.json"));
  EXPECT_EQ(meta.at("format"), "pipenag-tokens");
  EXPECT_EQ(meta.at("format_version"), 1);
  EXPECT_EQ(meta.at("tokenizer"), "test-bytes-eot");
  EXPECT_EQ(meta.at("vocab_size"), 257);
  EXPECT_EQ(meta.at("eot"), 256);
  EXPECT_EQ(meta.at("input"), in);
  EXPECT_DOUBLE_EQ(meta.at("val_fraction").get<double>(), 0.25);
  EXPECT_EQ(meta.at("split_seed").get<uint64_t>(), 7u);
  EXPECT_EQ(meta.at("split"), "documents");
  EXPECT_EQ(meta.at("documents"), 8);
  EXPECT_EQ(meta.at("train").at("file"), "train.bin");
  EXPECT_EQ(meta.at("train").at("documents"), 6);
  EXPECT_EQ(meta.at("train").at("tokens").get<size_t>(), st.train_tokens);
  EXPECT_EQ(meta.at("val").at("file"), "val.bin");
  EXPECT_EQ(meta.at("val").at("documents"), 2);
  EXPECT_EQ(meta.at("val").at("tokens").get<size_t>(), st.val_tokens);
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx",
                static_cast<unsigned long long>(TokenFile::open(out + "/val.bin").checksum()));
  EXPECT_EQ(meta.at("val").at("checksum"), hex);
  EXPECT_EQ(meta.at("val_documents"), nlohmann::json({"doc0.txt", "doc5.txt"}));
  // Without an end-of-text token, "eot" is null.
  prepare_corpus(in, BytesTok(), path("plain"), 0.25, 7);
  EXPECT_TRUE(nlohmann::json::parse(slurp(path("plain") + "/meta.json")).at("eot").is_null());
}

TEST_F(PrepareTest, SingleFileHoldsOutItsTail) {
  std::string t;
  for (int i = 0; i < 1000; ++i) t += static_cast<char>('a' + (i * 7) % 26);
  spit(path("one.txt"), t);
  const PrepareStats st = prepare_corpus(path("one.txt"), EotTok(), path("out"), 0.1, 3);
  EXPECT_TRUE(st.tail_split);
  EXPECT_EQ(st.documents, 1u);
  EXPECT_EQ(st.train_tokens, 900u);
  EXPECT_EQ(st.val_tokens, 100u);
  EXPECT_TRUE(st.val_documents.empty());
  const std::vector<int32_t> all = bytes_of(t);
  EXPECT_EQ(all_tokens(path("out") + "/train.bin"), std::vector<int32_t>(all.begin(), all.begin() + 900));
  EXPECT_EQ(all_tokens(path("out") + "/val.bin"), std::vector<int32_t>(all.begin() + 900, all.end()));
  const auto meta = nlohmann::json::parse(slurp(path("out") + "/meta.json"));
  EXPECT_EQ(meta.at("split"), "tail");
  EXPECT_EQ(meta.at("val").at("tokens"), 100);
  EXPECT_TRUE(meta.at("val_documents").empty());
  // A folder holding one .txt file is the same corpus.
  fs::create_directories(dir_ / "single");
  spit(dir_ / "single" / "one.txt", t);
  prepare_corpus((dir_ / "single").string(), EotTok(), path("out2"), 0.1, 3);
  EXPECT_EQ(slurp(path("out2") + "/val.bin"), slurp(path("out") + "/val.bin"));
}

TEST_F(PrepareTest, EmptyOrMissingCorpusIsAnError) {
  fs::create_directories(dir_ / "none");
  EXPECT_THAT(error_of([&] { prepare_corpus(path("none"), BytesTok(), path("out"), 0.1, 1); }),
              AllOf(HasSubstr(path("none")), HasSubstr("no .txt files")));
  fs::create_directories(dir_ / "blank");
  spit(dir_ / "blank" / "a.txt", "");
  spit(dir_ / "blank" / "b.txt", "");
  EXPECT_THAT(error_of([&] { prepare_corpus(path("blank"), BytesTok(), path("out"), 0.1, 1); }),
              AllOf(HasSubstr(path("blank")), HasSubstr("empty")));
  EXPECT_THAT(error_of([&] { prepare_corpus(path("missing"), BytesTok(), path("out"), 0.1, 1); }),
              HasSubstr(path("missing")));
  EXPECT_FALSE(fs::exists(path("out")));
}

TEST_F(PrepareTest, ValFractionMustBeInsideZeroOne) {
  const std::string in = corpus();
  for (double f : {0.0, 1.0, -0.5, 1.5, std::nan("")})
    EXPECT_THAT(error_of([&] { prepare_corpus(in, BytesTok(), path("out"), f, 1); }),
                AllOf(HasSubstr(in), HasSubstr("val_fraction"), HasSubstr("outside (0, 1)")))
        << f;
  EXPECT_FALSE(fs::exists(path("out")));
}

TEST_F(PrepareTest, EmptySplitIsAnError) {
  // A single document too short to hold out anything.
  spit(path("tiny.txt"), "abc");
  EXPECT_THAT(error_of([&] { prepare_corpus(path("tiny.txt"), BytesTok(), path("out"), 0.1, 1); }),
              AllOf(HasSubstr(path("tiny.txt")), HasSubstr("empty validation split")));
  // Validation documents (doc0, doc5 for seed 7) that are empty files.
  const std::string in = corpus();
  spit(fs::path(in) / "doc0.txt", "");
  spit(fs::path(in) / "doc5.txt", "");
  EXPECT_THAT(error_of([&] { prepare_corpus(in, EotTok(), path("out"), 0.25, 7); }),
              AllOf(HasSubstr(in), HasSubstr("validation split (2 documents) has no tokens")));
  EXPECT_FALSE(fs::exists(path("out")));
}

TEST_F(PrepareTest, TokenizerFailuresNameTheDocument) {
  const std::string in = corpus();
  spit(fs::path(in) / "doc3.txt", "some poison here");
  EXPECT_THAT(error_of([&] { prepare_corpus(in, BrokenTok(), path("out"), 0.25, 7); }),
              AllOf(HasSubstr(in + "/doc3.txt"), HasSubstr("boom in the tokenizer")));
  EXPECT_THAT(error_of([&] { prepare_corpus(in, WildTok(), path("out"), 0.25, 7); }),
              AllOf(HasSubstr(in + "/doc0.txt"), HasSubstr("produced id 300"),
                    HasSubstr("vocabulary (size 256)")));
  EXPECT_FALSE(fs::exists(path("out")));
}

TEST_F(PrepareTest, RerunReplacesTheOutputsWhole) {
  const std::string in = corpus(), out = path("out");
  prepare_corpus(in, BytesTok(), out, 0.25, 7);
  const PrepareStats st = prepare_corpus(in, BytesTok(), out, 0.25, 42);
  EXPECT_EQ(files_in(out), (std::vector<std::string>{"meta.json", "train.bin", "val.bin"}));
  EXPECT_EQ(TokenFile::open(out + "/val.bin").size(), st.val_tokens);
  EXPECT_EQ(nlohmann::json::parse(slurp(out + "/meta.json")).at("split_seed"), 42);
}

}  // namespace
