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

// The files of a corpus: `path` itself when it is a regular file, or every *.txt regular file of
// the folder `path`, sorted by name. Errors name the path: missing, neither a regular file nor a
// folder (a device or a pipe could be read forever), a .txt entry that cannot be followed (a
// symlink loop, a dangling link), an unlistable folder.
std::vector<std::string> corpus_files(const std::string& path);

// The documents of corpus_files(path), each named by its file name. Errors name the path.
std::vector<Document> read_documents(const std::string& path);

}  // namespace pipenag
