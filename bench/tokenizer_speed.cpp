// The C++ side of bench/tokenizer_speed.sh (built there with g++ against libpipenag_core.a).
//
//   tokenizer_speed <corpus dir> <reps> <tokenizer spec>...   encode speed, one thread
//   tokenizer_speed <corpus dir> --train <vocab> <out dir>    BPE training time, token counts
//
// Speed: every document (the folder's *.txt files, sorted by name) is encoded with one encode()
// call, on this thread. "<name>-cold": the first pass after loading (empty piece cache); "<name>":
// best of <reps> later passes. A pass in between checks decode(encode(doc)) == doc.
// One line per measurement, the format of tokenizer_speed.mjs:
//   RESULT <name> <bytes> <tokens> <fnv1a-32 of all ids> <best seconds> <MB/s>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "data/text_corpus.h"
#include "data/tokenizer.h"
#include "util/error.h"

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

uint32_t fnv(const std::vector<int32_t>& ids, uint32_t h) {
  for (int32_t id : ids) {
    const auto v = static_cast<uint32_t>(id);
    for (int k = 0; k < 32; k += 8) {
      h ^= (v >> k) & 0xFF;
      h *= 16777619u;
    }
  }
  return h;
}

struct Count {
  size_t bytes = 0, tokens = 0;
  uint32_t hash = 2166136261u;
};

Count encode_all(const pipenag::Tokenizer& tok, const std::vector<pipenag::Document>& docs,
                 bool check) {
  Count c;
  for (const auto& d : docs) {
    const std::vector<int32_t> ids = tok.encode(d.text);
    c.bytes += d.text.size();
    c.tokens += ids.size();
    c.hash = fnv(ids, c.hash);
    if (check && tok.decode(ids) != d.text)
      throw pipenag::Error(tok.name() + ": decode(encode(" + d.name + ")) differs from the text");
  }
  return c;
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 4) {
    std::fprintf(stderr,
                 "usage: tokenizer_speed <corpus dir> <reps> <spec>...\n"
                 "       tokenizer_speed <corpus dir> --train <vocab> <out dir>\n");
    return 2;
  }
  const auto docs = pipenag::read_documents(argv[1]);
  if (std::string(argv[2]) == "--train") {
    if (argc != 5) throw pipenag::Error("--train needs <vocab> <out dir>");
    std::vector<std::string> texts;
    for (const auto& d : docs) texts.push_back(d.text);
    const int vocab = std::atoi(argv[3]);
    const double t0 = now();
    pipenag::train_bpe(texts, vocab, argv[4]);
    const double t1 = now();
    std::printf("TRAIN %d %.3f\n", vocab, t1 - t0);
    for (const std::string& spec : {std::string("byte"), std::string("gpt2"), std::string(argv[4])}) {
      const auto tok = pipenag::load_tokenizer(spec);
      const Count c = encode_all(*tok, docs, true);
      std::printf("COUNT %s %d %zu %zu\n", spec == argv[4] ? ("bpe" + std::to_string(vocab)).c_str()
                                                            : spec.c_str(),
                  tok->vocab_size(), c.bytes, c.tokens);
    }
    return 0;
  }
  const int reps = std::atoi(argv[2]);
  for (int a = 3; a < argc; ++a) {
    const double l0 = now();
    const auto tok = pipenag::load_tokenizer(argv[a]);
    const double l1 = now();
    std::fprintf(stderr, "%s: loaded in %.3f s\n", tok->name().c_str(), l1 - l0);
    // First pass on a fresh tokenizer: its piece cache starts empty ("cold").
    const double c0 = now();
    const Count c = encode_all(*tok, docs, false);
    const double cold = now() - c0;
    if (tok->name() != "byte")  // (no cache to be cold)
      std::printf("RESULT pipenag-%s-cold %zu %zu %08x %.4f %.2f\n", tok->name().c_str(),
                  c.bytes, c.tokens, c.hash, cold, static_cast<double>(c.bytes) / cold / 1e6);
    encode_all(*tok, docs, true);
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
      const double t0 = now();
      size_t n = 0;
      for (const auto& d : docs) n += tok->encode(d.text).size();
      best = std::min(best, now() - t0);
      if (n != c.tokens) throw pipenag::Error("token count changed between passes");
    }
    std::printf("RESULT pipenag-%s %zu %zu %08x %.4f %.2f\n", tok->name().c_str(), c.bytes, c.tokens,
                c.hash, best, static_cast<double>(c.bytes) / best / 1e6);
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "tokenizer_speed: %s\n", e.what());
  return 1;
}
