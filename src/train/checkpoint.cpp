#include "train/checkpoint.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "data/token_file.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "comm/mpi.h"
#include "pipeline/partition.h"
#include "train/config_file.h"
#include "util/error.h"

namespace pipenag {
namespace fs = std::filesystem;

namespace {

// 2: every safetensors file records its step and a checksum of its tensor data ("data_xxh64"),
// and state.json repeats both; version 1 files (no checksums) are still read.
constexpr int kFormatVersion = 2;

void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

// XXH64 of state.json's content without its "checksum" field, as 16 hex digits.
std::string state_checksum(nlohmann::json j) {
  j.erase("checksum");
  const std::string text = j.dump();
  return hex64(xxhash64(text.data(), text.size()));
}

// The correction whose state the checkpoint carries beside the optimizer's.
std::string weight_correction(const Config& cfg) {
  return cfg.optim.pipemare ? "pipemare" : cfg.optim.spectrain ? "spectrain" : "none";
}

}  // namespace

std::string model_config_difference(const ModelConfig& there, const ModelConfig& here) {
  auto diff = [](const char* key, auto a, auto b) -> std::string {
    if (a == b) return "";
    return std::string("model.") + key + " is " + std::to_string(a) + " there, " +
           std::to_string(b) + " here";
  };
  for (const std::string& d :
       {diff("n_layer", there.n_layer, here.n_layer), diff("n_embd", there.n_embd, here.n_embd),
        diff("n_head", there.n_head, here.n_head),
        diff("block_size", there.block_size, here.block_size),
        diff("vocab_size", there.vocab_size, here.vocab_size),
        diff("tie_embeddings", int(there.tie_embeddings), int(here.tie_embeddings))})
    if (!d.empty()) return d;
  if (there.activation != here.activation) return "model.activation differs";
  return "";
}

std::vector<std::string> resume_config_changes(const Config& there, const Config& here) {
  const nlohmann::json a = config_to_json(there), b = config_to_json(here);
  static const std::vector<std::string> refused = {
      "train.batch_size", "train.seed",       "data.input",        "data.dir",
      "data.tokenizer",   "data.order",       "data.val_fraction", "data.split_seed",
      "pipeline.schedule", "pipeline.stash",  "pipeline.recompute", "pipeline.microbatches"};
  static const std::vector<std::string> free_keys = {"out.dir", "train.threads", "pipeline.engine",
                                                     "pipeline.partition", "model.seed"};
  std::vector<std::string> notes;
  for (const auto& [section, keys] : b.items()) {
    if (!keys.is_object()) continue;
    for (const auto& [key, value] : keys.items()) {
      const std::string name = section + "." + key;
      const nlohmann::json old = a.contains(section) && a[section].contains(key) ? a[section][key] : nlohmann::json();
      if (old == value || section == "model" ||
          std::find(free_keys.begin(), free_keys.end(), name) != free_keys.end())
        continue;
      if (name == "pipeline.microbatches" && here.pipeline.schedule == "async-1f1b") continue;
      if (std::find(refused.begin(), refused.end(), name) != refused.end())
        throw Error("cannot resume with " + name + " = " + value.dump() + ": the checkpoint was trained with " +
                    old.dump() + " (resume with the same value, or start a new run in another out.dir)");
      notes.push_back("resuming with " + name + " changed: " + old.dump() + " -> " + value.dump());
    }
  }
  return notes;
}

void require_finite_weights(const std::string& dir, const Stage& stage) {
  for (const auto& p : stage.param_table()) {
    const float* w = stage.params() + p.offset;
    for (size_t i = 0; i < p.numel; ++i)
      if (!std::isfinite(w[i]))
        throw Error(dir + ": tensor " + p.name + " holds a non-finite value (" + std::to_string(w[i]) +
                    " at index " + std::to_string(i) + "); the run diverged before this checkpoint");
  }
}

namespace {

std::string slot_prefix(size_t k, int slot) {
  return "stage" + std::to_string(k) + ".slot" + std::to_string(slot) + ".";
}
std::string message_name(const Flow::Message& m) {
  return std::string("message.") + (m.forward ? "forward" : "backward") + std::to_string(m.boundary) + ".mb" +
         std::to_string(m.mb);
}

// Copies tensor `name` of exactly `numel` elements of `dtype` into dst.
void copy_exact(const SafetensorsFile& f, const std::string& name, Dtype dtype, size_t numel, void* dst) {
  const TensorInfo& t = f.info(name);
  if (t.dtype != dtype || static_cast<size_t>(t.numel) != numel)
    throw Error(f.path() + ": tensor '" + name + "' has " + std::to_string(t.numel) + " " +
                std::string(dtype_name(t.dtype)) + " elements, expected " + std::to_string(numel) + " " +
                std::string(dtype_name(dtype)));
  if (t.byte_size) std::memcpy(dst, f.data(name), t.byte_size);
}

}  // namespace

namespace {

// Stage k's in-flight micro-batches (slot contents, tokens, targets), the stashed versions they
// need and its loss accumulators: tensors into w, the record for state.json "flow" "stages".
nlohmann::json add_flow_stage(SafetensorsWriter& fw, StageWorker* w, size_t k, bool* any) {
  if (!w) throw Error("save_checkpoint: a flow without its stage workers");
  nlohmann::json in = nlohmann::json::array(), stash = nlohmann::json::array();
  for (const auto& r : w->in_flight()) {
    *any = true;
    nlohmann::json rec = {{"slot", r.slot}, {"mb", r.mb}, {"version", r.version}};
    if (r.loss_count > 0) {
      rec["loss_sum"] = r.loss_sum;
      rec["loss_count"] = r.loss_count;
    }
    in.push_back(rec);
    for (const auto& [name, buf] : w->stage().slot_state(r.slot))
      fw.add(slot_prefix(k, r.slot) + name, Dtype::F32, {static_cast<int64_t>(buf->size())}, buf->data());
    for (const auto& [which, v] : {std::pair{"tokens", &w->slot_tokens(r.slot)},
                                   std::pair{"targets", &w->slot_targets(r.slot)}})
      fw.add(slot_prefix(k, r.slot) + which, Dtype::I32, {static_cast<int64_t>(v->size())}, v->data());
  }
  for (const auto& [version, buf] : w->stashed_versions()) {
    stash.push_back(version);
    fw.add("stage" + std::to_string(k) + ".stash.v" + std::to_string(version), Dtype::F32,
           {static_cast<int64_t>(buf->size())}, buf->data());
  }
  return {{"in_flight", in}, {"stash", stash}, {"loss_sum", w->loss_sum()}, {"loss_count", w->loss_count()}};
}

nlohmann::json add_messages(SafetensorsWriter& fw, const std::vector<Flow::Message>& messages) {
  nlohmann::json msgs = nlohmann::json::array();
  for (const auto& m : messages) {
    msgs.push_back({{"forward", m.forward}, {"boundary", m.boundary}, {"mb", m.mb}});
    fw.add(message_name(m), Dtype::F32, {static_cast<int64_t>(m.data.size())}, m.data.data());
  }
  return msgs;
}

// Optimizer and correction state of one stage under "<state>.<name>"; its scalars.
nlohmann::json add_optimizer(SafetensorsWriter& o, const StagePart& part) {
  if (!part.opt) throw Error("save_checkpoint: a stage without its optimizer");
  auto buffers = part.opt->state_tensors();
  buffers.insert(buffers.end(), part.extra.begin(), part.extra.end());
  for (const auto& [state, buf] : buffers)
    for (const auto& p : part.stage->param_table())
      o.add(state + "." + p.name, Dtype::F32, p.shape, buf->data() + p.offset);
  nlohmann::json sc = nlohmann::json::object();
  for (const auto& [name, v] : part.opt->state_scalars()) sc[name] = *v;
  return sc;
}

// Seals a tensor file (its checksum into its metadata) and writes it into tmp; its record.
nlohmann::json seal(SafetensorsWriter& w, const std::string& tmp, const std::string& name, int64_t step) {
  const std::string sum = w.data_checksum();
  w.set_metadata("data_xxh64", sum);
  w.write(tmp + "/" + name);
  return {{"step", step}, {"data_xxh64", sum}};
}

// The manifest: state.json (listing every file with its checksum) and config.toml, written last
// into tmp; then tmp is swapped in for dir with one atomic rename.
void finish_checkpoint(const std::string& dir, const std::string& tmp, const Config& cfg, const TrainState& st,
                       const Optimizer* opt, int64_t optimizer_step, const nlohmann::json& files,
                       const nlohmann::json& scalars, const nlohmann::json& flow_json) {
  nlohmann::json state;
  state["format"] = "pipenag-checkpoint";
  state["format_version"] = kFormatVersion;
  state["step"] = st.step;
  state["data_position"] = st.data_position;
  state["tokens"] = st.tokens;
  state["files"] = files;
  if (!flow_json.is_null()) state["flow"] = flow_json;
  state["optimizer_step"] = optimizer_step;
  if (opt) {
    state["optimizer"] = opt->name();
    state["optimizer_scalars"] = scalars;  // per stage
  }
  state["weight_correction"] = weight_correction(cfg);
  state["pipeline"] = {{"stages", cfg.pipeline.stages},
                       {"blocks_per_stage", blocks_per_stage(cfg.model, cfg.pipeline)},
                       {"schedule", cfg.pipeline.schedule}};
  state["config"] = config_to_json(cfg);
  state["config_toml"] = config_to_toml(cfg);
  state["checksum"] = state_checksum(state);
  write_file_atomic(tmp + "/state.json", state.dump(2) + "\n");
  write_file_atomic(tmp + "/config.toml", config_to_toml(cfg));
  fsync_dir(tmp);

  // Swap the new folder in with one atomic rename; the old one (now at tmp) is removed after.
  std::error_code ec;
  if (fs::exists(dir)) {
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) != 0)
      throw Error(dir + ": cannot replace checkpoint: " + std::strerror(errno));
    fs::remove_all(tmp, ec);
  } else {
    if (std::rename(tmp.c_str(), dir.c_str()) != 0)
      throw Error(dir + ": cannot create checkpoint: " + std::strerror(errno));
  }
  const fs::path final_dir(dir);
  const fs::path parent = final_dir.has_parent_path() ? final_dir.parent_path() : fs::path(".");
  fsync_dir(parent.string());
}

}  // namespace

void save_checkpoint(const std::string& dir, const Config& cfg, const std::vector<StagePart>& parts,
                     const TrainState& st, const FlowState* flow) {
  if (parts.empty()) throw Error("save_checkpoint: no stages");
  const Optimizer* opt = parts[0].opt;
  const std::string tmp = dir + ".tmp." + std::to_string(::getpid());
  std::error_code ec;
  fs::remove_all(tmp, ec);
  make_dirs(tmp);
  try {
    SafetensorsWriter model;
    model.set_metadata("format", "pipenag");
    model.set_metadata("step", std::to_string(st.step));
    for (const auto& part : parts)
      for (const auto& p : part.stage->param_table())
        model.add(p.name, Dtype::F32, p.shape, part.stage->params() + p.offset);
    nlohmann::json files = nlohmann::json::object();
    files["model.safetensors"] = seal(model, tmp, "model.safetensors", st.step);

    nlohmann::json scalars = nlohmann::json::array();
    if (opt) {
      SafetensorsWriter o;
      o.set_metadata("optimizer", opt->name());
      o.set_metadata("step", std::to_string(st.step));
      o.set_metadata("optimizer_step", std::to_string(opt->step_count()));
      for (const auto& part : parts) scalars.push_back(add_optimizer(o, part));
      files["optimizer.safetensors"] = seal(o, tmp, "optimizer.safetensors", st.step);
    }

    // A flow paused with micro-batches in flight or messages in transit.
    nlohmann::json flow_json;
    if (flow) {
      SafetensorsWriter fw;
      fw.set_metadata("format", "pipenag-flow");
      fw.set_metadata("step", std::to_string(st.step));
      nlohmann::json stages = nlohmann::json::array();
      bool any = !flow->messages.empty();
      for (size_t k = 0; k < parts.size(); ++k) stages.push_back(add_flow_stage(fw, parts[k].worker, k, &any));
      const nlohmann::json msgs = add_messages(fw, flow->messages);
      flow_json = {{"base_step", flow->base_step}, {"base_position", flow->base_position},
                   {"schedule_updates", flow->schedule_updates}, {"stages", stages}, {"messages", msgs}};
      if (any) files["flow.safetensors"] = seal(fw, tmp, "flow.safetensors", st.step);
    }
    finish_checkpoint(dir, tmp, cfg, st, opt, opt ? opt->step_count() : 0, files, scalars, flow_json);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}

void save_checkpoint_sharded(const std::string& dir, const Config& cfg, const StagePart& part, const TrainState& st,
                             const FlowState& flow, double timeout_s) {
  const int k = mpi::rank(), P = mpi::size();
  const std::string tmp = dir + ".tmp." + mpi::broadcast(std::to_string(::getpid()), 0, timeout_s, "checkpoint");
  std::error_code ec;
  try {
  mpi::agree([&] {
    if (k != 0) return;
    fs::remove_all(tmp, ec);
    make_dirs(tmp);
  }, timeout_s, "checkpoint: creating " + tmp);
  nlohmann::json mine;
  mpi::agree([&] {
    if (!part.opt || !part.worker) throw Error("save_checkpoint: a stage without its optimizer or worker");
    SafetensorsWriter w;
    w.set_metadata("format", "pipenag-stage");
    w.set_metadata("step", std::to_string(st.step));
    w.set_metadata("stage", std::to_string(k));
    for (const auto& p : part.stage->param_table()) w.add(p.name, Dtype::F32, p.shape, part.stage->params() + p.offset);
    mine["scalars"] = add_optimizer(w, part);
    bool any = false;
    mine["flow_stage"] = add_flow_stage(w, part.worker, static_cast<size_t>(k), &any);
    mine["messages"] = add_messages(w, flow.messages);
    mine["optimizer_step"] = part.opt->step_count();
    const std::string name = "stage" + std::to_string(k) + ".safetensors";
    mine["file"] = name;
    mine["record"] = seal(w, tmp, name, st.step);
  }, timeout_s, "checkpoint: writing the stage files");
  const std::vector<std::string> all = mpi::allgather(mine.dump(), timeout_s, "checkpoint: gathering the stage records");
  mpi::agree([&] {
    if (k != 0) return;
    nlohmann::json files = nlohmann::json::object(), scalars = nlohmann::json::array(),
                   stages = nlohmann::json::array(), msgs = nlohmann::json::array();
    for (int r = 0; r < P; ++r) {
      const nlohmann::json one = nlohmann::json::parse(all[static_cast<size_t>(r)]);
      files[one.at("file").get<std::string>()] = one.at("record");
      scalars.push_back(one.at("scalars"));
      stages.push_back(one.at("flow_stage"));
      for (const auto& m : one.at("messages")) msgs.push_back(m);
    }
    const nlohmann::json flow_json = {{"base_step", flow.base_step}, {"base_position", flow.base_position},
                                      {"schedule_updates", flow.schedule_updates}, {"stages", stages},
                                      {"messages", msgs}};
    finish_checkpoint(dir, tmp, cfg, st, part.opt, mine.at("optimizer_step").get<int64_t>(), files, scalars,
                      flow_json);
  }, timeout_s, "checkpoint: writing the manifest");
  } catch (const mpi::AgreedError&) {
    // Every rank knows; the half-written folder goes (the previous checkpoint is untouched).
    if (k == 0) fs::remove_all(tmp, ec);
    throw;
  }
}

namespace {

nlohmann::json read_state(const std::string& dir) {
  const std::string path = dir + "/state.json";
  if (!fs::is_directory(dir)) throw Error(dir + ": no checkpoint folder");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": not valid JSON (" + std::string(e.what()) + ")");
  }
  if (!j.is_object() || j.value("format", "") != "pipenag-checkpoint")
    throw Error(path + ": not a pipenag checkpoint state file");
  const int version = j.value("format_version", -1);
  if (version != 1 && version != kFormatVersion)
    throw Error(path + ": unsupported checkpoint format version " +
                j.value("format_version", nlohmann::json(-1)).dump());
  for (const char* k : {"step", "data_position", "tokens", "config_toml"})
    if (!j.contains(k)) throw Error(path + ": missing field '" + std::string(k) + "'");
  if (version >= 2) {
    // Every field counts (step, data position, the flow's in-flight records, ...): an edit is
    // refused instead of resuming a different run.
    const std::string recorded = j.contains("checksum") && j["checksum"].is_string() ? j["checksum"].get<std::string>() : "";
    const std::string actual = state_checksum(j);
    if (recorded != actual)
      throw Error(path + ": damaged or edited (checksum " + actual + ", recorded " +
                  (recorded.empty() ? std::string("none") : recorded) + ")");
    if (!j["step"].is_number_integer() || !j["data_position"].is_number_integer())
      throw Error(path + ": step and data_position must be integers");
  }
  return j;
}

// Opens one tensor file of a checkpoint and, from format version 2 on, checks that it belongs to
// this checkpoint's step and that its tensor data is what was written (a flipped bit, a
// truncated or swapped file fail with one line).
SafetensorsFile open_checked(const std::string& dir, const std::string& name, const nlohmann::json& state) try {
  SafetensorsFile f = SafetensorsFile::open(dir + "/" + name);
  if (state.value("format_version", 1) < 2) return f;
  const std::string path = dir + "/" + name;
  const auto& meta = f.metadata();
  const int64_t step = state["step"].get<int64_t>();
  const auto it_step = meta.find("step");
  if (it_step == meta.end() || it_step->second != std::to_string(step))
    throw Error(path + ": belongs to step " + (it_step == meta.end() ? std::string("(none)") : it_step->second) +
                ", but state.json is at step " + std::to_string(step) + " (files from different checkpoints)");
  const auto it_sum = meta.find("data_xxh64");
  if (it_sum == meta.end()) throw Error(path + ": no data_xxh64 checksum in its metadata");
  const std::string actual = f.data_checksum();
  if (actual != it_sum->second)
    throw Error(path + ": tensor data is damaged (checksum " + actual + ", recorded " + it_sum->second + ")");
  const std::string recorded = state.contains("files") && state["files"].contains(name)
                                   ? state["files"][name].value("data_xxh64", std::string())
                                   : std::string();
  if (recorded != actual)
    throw Error(path + ": is not the file this checkpoint wrote (checksum " + actual + ", state.json records " +
                (recorded.empty() ? std::string("none") : recorded) + ")");
  return f;
} catch (const nlohmann::json::exception& e) {
  throw Error(dir + "/state.json: bad record of " + name + " (" + std::string(e.what()) + ")");
}

// The tensors of a checkpoint by global name, whichever of its files holds them: model /
// optimizer / flow files (one process) or one file per stage (mpi). Files are opened and checked
// when a tensor in them is first needed, so reading the weights does not read optimizer files.
class Tensors {
 public:
  Tensors(const std::string& dir, const nlohmann::json& state) : dir_(dir), state_(state) {
    if (state.contains("files") && state["files"].is_object()) {
      for (const auto& [name, rec] : state["files"].items()) names_.push_back(name);
    } else {  // format version 1
      for (const char* n : {"model.safetensors", "optimizer.safetensors", "flow.safetensors"})
        if (fs::exists(dir + "/" + n)) names_.push_back(n);
    }
    // model.safetensors first: weights-only readers (eval, sample) open nothing else.
    std::stable_sort(names_.begin(), names_.end(), [](const std::string& a, const std::string& b) {
      return (a == "model.safetensors") > (b == "model.safetensors");
    });
    files_.resize(names_.size());
    headers_.resize(names_.size());
  }
  const SafetensorsFile& find(const std::string& tensor) {
    for (size_t i = 0; i < names_.size(); ++i) {
      if (!files_[i]) {
        // Only the header is read to see what a file holds; the whole file is read and its
        // checksum verified when a tensor is taken from it.
        if (headers_[i].empty()) headers_[i] = header_names(dir_ + "/" + names_[i], names_[i]);
        if (!headers_[i].count(tensor)) continue;
        files_[i] = std::make_unique<SafetensorsFile>(open_checked(dir_, names_[i], state_));
      }
      if (files_[i]->has(tensor)) return *files_[i];
    }
    throw Error(dir_ + ": no tensor '" + tensor + "' in " + std::to_string(names_.size()) + " checkpoint file" +
                (names_.size() == 1 ? "" : "s"));
  }

 private:
  std::string dir_;
  const nlohmann::json& state_;
  std::vector<std::string> names_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::vector<std::set<std::string>> headers_;

  // The tensor names in a safetensors file's header (a damaged header: the full open says why).
  std::set<std::string> header_names(const std::string& path, const std::string& name) const {
    if (!fs::exists(path))
      throw Error(dir_ + "/state.json names " + name + ", which is missing (an incomplete checkpoint)");
    std::set<std::string> out;
    try {
      std::ifstream in(path, std::ios::binary);
      unsigned char len[8] = {};
      in.read(reinterpret_cast<char*>(len), 8);
      uint64_t n = 0;
      for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(len[i]) << (8 * i);
      if (in && n > 0 && n < (uint64_t{1} << 30)) {
        std::string header(n, '\0');
        in.read(header.data(), static_cast<std::streamsize>(n));
        if (in) {
          const nlohmann::json j = nlohmann::json::parse(header);  // (kept alive through the loop)
          for (const auto& [key, value] : j.items())
            if (key != "__metadata__") out.insert(key);
        }
      }
    } catch (const std::exception&) {
    }
    if (out.empty()) SafetensorsFile::open(path);  // names the damage
    if (out.empty()) out.insert("");  // an empty file: looked at once
    return out;
  }
};

// The stage a part is (its worker's index; else its position).
int part_index(const std::vector<StagePart>& parts, size_t i) {
  return parts[i].worker ? parts[i].worker->options().index : static_cast<int>(i);
}

// Restores the in-flight state of a checkpoint taken mid-flow into the parts' workers.
void load_flow(const std::string& dir, const nlohmann::json& state, const std::vector<StagePart>& parts,
               FlowState* flow, Tensors& f) {
  *flow = FlowState{};
  if (!state.contains("flow")) return;
  const std::string where = dir + "/state.json: flow";
  try {
    const nlohmann::json& fj = state["flow"];
    flow->base_step = fj.at("base_step").get<int64_t>();
    flow->base_position = fj.at("base_position").get<int64_t>();
    flow->schedule_updates = fj.at("schedule_updates").get<int64_t>();
    const nlohmann::json& stages = fj.at("stages");
    bool any = !fj.at("messages").empty();
    for (const auto& sj : stages) any |= !sj.at("in_flight").empty();
    std::vector<char> here;
    for (size_t i = 0; i < parts.size(); ++i) {
      StageWorker* w = parts[i].worker;
      if (!w) throw Error("load_checkpoint: a flow without its stage workers");
      const size_t k = static_cast<size_t>(part_index(parts, i));
      if (k >= stages.size())
        throw Error(where + " has " + std::to_string(stages.size()) + " stages, this pipeline more");
      w->set_loss(stages[k].at("loss_sum").get<double>(), stages[k].at("loss_count").get<int64_t>());
      here.resize(std::max(here.size(), k + 1), 0);
      here[k] = 1;
    }
    const auto is_here = [&](int k) { return k >= 0 && static_cast<size_t>(k) < here.size() && here[static_cast<size_t>(k)]; };
    if (!any) return;
    for (size_t i = 0; i < parts.size(); ++i) {
      StageWorker* w = parts[i].worker;
      const size_t k = static_cast<size_t>(part_index(parts, i));
      for (const auto& v : stages[k].at("stash")) {
        const int64_t version = v.get<int64_t>();
        std::vector<float>& buf = w->restore_stash(version);
        const std::string name = "stage" + std::to_string(k) + ".stash.v" + std::to_string(version);
        copy_exact(f.find(name), name, Dtype::F32, buf.size(), buf.data());
      }
      for (const auto& r : stages[k].at("in_flight")) {
        const int slot = r.at("slot").get<int>();
        w->restore_in_flight(slot, r.at("mb").get<int64_t>(), r.at("version").get<int64_t>(), r.value("loss_sum", 0.0),
                             r.value("loss_count", int64_t{0}));
        for (const auto& [name, buf] : w->stage().slot_state(slot))
          copy_exact(f.find(slot_prefix(k, slot) + name), slot_prefix(k, slot) + name, Dtype::F32, buf->size(),
                     buf->data());
        for (const char* which : {"tokens", "targets"}) {
          std::vector<int32_t>& v = which[0] == 't' && which[1] == 'o' ? w->slot_tokens(slot) : w->slot_targets(slot);
          copy_exact(f.find(slot_prefix(k, slot) + which), slot_prefix(k, slot) + which, Dtype::I32, v.size(), v.data());
        }
      }
    }
    for (const auto& mj : fj.at("messages")) {
      Flow::Message m;
      m.forward = mj.at("forward").get<bool>();
      m.boundary = mj.at("boundary").get<int>();
      m.mb = mj.at("mb").get<int64_t>();
      if (m.boundary < 0 || m.boundary + 1 >= static_cast<int>(stages.size()))
        throw Error(where + ": a message across boundary " + std::to_string(m.boundary));
      m.data.resize(parts[0].stage->boundary_floats());
      if (!is_here(m.forward ? m.boundary + 1 : m.boundary)) continue;  // another rank receives it
      copy_exact(f.find(message_name(m)), message_name(m), Dtype::F32, m.data.size(), m.data.data());
      flow->messages.push_back(std::move(m));
    }
    flow->mid_flow = true;
  } catch (const nlohmann::json::exception& e) {
    throw Error(where + " is damaged (" + std::string(e.what()) + ")");
  }
}

}  // namespace

Config read_checkpoint_config(const std::string& dir) {
  const nlohmann::json j = read_state(dir);
  if (!j["config_toml"].is_string()) throw Error(dir + "/state.json: config_toml is not a string");
  return parse_config(j["config_toml"].get<std::string>(), dir + "/state.json", {});
}

std::vector<int> checkpoint_blocks_per_stage(const std::string& dir) {
  const nlohmann::json j = read_state(dir);
  if (!j.contains("pipeline")) return {read_checkpoint_config(dir).model.n_layer};
  try {
    const std::vector<int> blocks = j["pipeline"].at("blocks_per_stage").get<std::vector<int>>();
    if (blocks.empty() || j["pipeline"].at("stages").get<int>() != static_cast<int>(blocks.size()))
      throw Error(dir + "/state.json: pipeline.blocks_per_stage does not match pipeline.stages");
    return blocks;
  } catch (const nlohmann::json::exception& e) {
    throw Error(dir + "/state.json: bad pipeline field (" + std::string(e.what()) + ")");
  }
}

void load_checkpoint(const std::string& dir, const Config& cfg, const std::vector<StagePart>& parts,
                     TrainState* st, FlowState* flow) {
  const nlohmann::json j = read_state(dir);
  const Config there = read_checkpoint_config(dir);
  const std::string d = model_config_difference(there.model, cfg.model);
  if (!d.empty())
    throw Error(dir + ": checkpoint is for a different architecture: " + d);
  // Tensors go by global name, so any stage layout reads any checkpoint. Resuming under another
  // layout (resharding) moves weights, optimizer and correction state by name; per-stage
  // scalars come from the old stage that held the new stage's first block; in-flight
  // micro-batches are dropped (the new pipeline refills from the checkpoint's data position).
  const std::vector<int> there_blocks = checkpoint_blocks_per_stage(dir);
  const std::vector<int> here_blocks = blocks_per_stage(cfg.model, cfg.pipeline);
  const bool reshard = st && (there_blocks != here_blocks ||
                              there.pipeline.extra_inflight != cfg.pipeline.extra_inflight);
  if (st) {
    // The correction's state (PipeMare's delta, SpecTrain's smoothed update) is in the files only
    // when the run had it; switching on resume would start it from nothing or drop it.
    const std::string there_corr = j.value("weight_correction", std::string("none"));
    if (there_corr != weight_correction(cfg))
      throw Error(dir + ": checkpoint was trained with weight correction " + there_corr +
                  ", this run uses " + weight_correction(cfg) + " (optim.pipemare, optim.spectrain)");
  }
  Tensors files(dir, j);
  for (const auto& part : parts)
    for (const auto& p : part.stage->param_table()) copy_f32(files.find(p.name), p.name, p.shape, part.stage->params() + p.offset);
  // Units: 0 the embedding, 1..n_layer the blocks, then the head. The old stage holding unit u.
  const auto old_stage_of_unit = [&](int u) {
    int end = 1;
    for (size_t k = 0; k < there_blocks.size(); ++k) {
      end += there_blocks[k];
      if (u < end) return static_cast<int>(k);
    }
    return static_cast<int>(there_blocks.size()) - 1;
  };
  bool checked_opt = false;
  for (size_t i = 0; i < parts.size(); ++i) {
    const StagePart& part = parts[i];
    if (!part.opt) continue;
    if (!checked_opt) {
      const std::string there_opt = j.value("optimizer", std::string("adamw"));
      if (there_opt != part.opt->name())
        throw Error(dir + ": checkpoint was trained with optimizer " + there_opt + ", this run uses " +
                    part.opt->name() + " (optim.name)");
      checked_opt = true;
    }
    auto buffers = part.opt->state_tensors();
    buffers.insert(buffers.end(), part.extra.begin(), part.extra.end());
    for (const auto& [state, buf] : buffers)
      for (const auto& p : part.stage->param_table())
        copy_f32(files.find(state + "." + p.name), state + "." + p.name, p.shape, buf->data() + p.offset);
    part.opt->set_step_count(j.value("optimizer_step", int64_t{0}));
    const auto scalars = part.opt->state_scalars();
    if (!scalars.empty()) {
      const int k = part_index(parts, i);
      int first_unit = k == 0 ? 0 : 1;
      for (int b = 0; b < k; ++b) first_unit += here_blocks[static_cast<size_t>(b)];
      const size_t old = static_cast<size_t>(reshard ? old_stage_of_unit(first_unit) : k);
      try {
        const auto& sc = j.at("optimizer_scalars").at(old);
        for (const auto& [name, v] : scalars) *v = sc.at(name).get<double>();
      } catch (const nlohmann::json::exception& e) {
        throw Error(dir + "/state.json: missing or bad optimizer_scalars (" + std::string(e.what()) + ")");
      }
    }
  }
  if (flow) {
    if (reshard) {
      *flow = FlowState{};
      const auto list = [](const std::vector<int>& v) {
        std::string s = "[";
        for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
        return s + "]";
      };
      flow->reshard = std::to_string(there_blocks.size()) + " stages with blocks " + list(there_blocks) + " -> " +
                      std::to_string(here_blocks.size()) + " with " + list(here_blocks);
      if (there.pipeline.extra_inflight != cfg.pipeline.extra_inflight)
        flow->reshard += ", extra_inflight " + std::to_string(there.pipeline.extra_inflight) + " -> " +
                         std::to_string(cfg.pipeline.extra_inflight);
      if (j.contains("flow")) {
        bool in_flight = !j["flow"].value("messages", nlohmann::json::array()).empty();
        for (const auto& sj : j["flow"].value("stages", nlohmann::json::array()))
          in_flight |= !sj.value("in_flight", nlohmann::json::array()).empty();
        if (in_flight) flow->reshard += "; the checkpoint's in-flight micro-batches are recomputed by the new pipeline";
      }
    } else {
      load_flow(dir, j, parts, flow, files);
    }
  }
  if (st) {
    try {
      st->step = j["step"].get<int64_t>();
      st->data_position = j["data_position"].get<int64_t>();
      st->tokens = j["tokens"].get<int64_t>();
    } catch (const nlohmann::json::exception& e) {
      throw Error(dir + "/state.json: bad field (" + std::string(e.what()) + ")");
    }
    if (st->step < 0 || st->data_position < 0)
      throw Error(dir + "/state.json: negative step or data position");
  }
}

}  // namespace pipenag
