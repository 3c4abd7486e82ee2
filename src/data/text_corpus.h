// A corpus of documents: one file = one document (see data/prepare.h for the split and the
// token files made from it).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace pipenag {

struct Document {
  std::string name;
  std::string text;
};

// A single text file, or every *.txt file of a folder (sorted by name). Errors name the path.
std::vector<Document> read_documents(const std::string& path);

}  // namespace pipenag
