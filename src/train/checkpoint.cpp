#include "train/checkpoint.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>

#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "pipeline/partition.h"
#include "train/config_file.h"
#include "util/error.h"

namespace pipenag {
namespace fs = std::filesystem;

namespace {

constexpr int kFormatVersion = 1;

void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
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

void save_checkpoint(const std::string& dir, const Config& cfg, const std::vector<StagePart>& parts,
                     const TrainState& st) {
  if (parts.empty()) throw Error("save_checkpoint: no stages");
  const Optimizer* opt = parts[0].opt;
  const fs::path final_dir(dir);
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
    model.write(tmp + "/model.safetensors");

    nlohmann::json scalars = nlohmann::json::array();
    if (opt) {
      SafetensorsWriter o;
      o.set_metadata("optimizer", opt->name());
      o.set_metadata("step", std::to_string(opt->step_count()));
      for (const auto& part : parts) {
        if (!part.opt) throw Error("save_checkpoint: a stage without its optimizer");
        auto buffers = part.opt->state_tensors();
        buffers.insert(buffers.end(), part.extra.begin(), part.extra.end());
        for (const auto& [state, buf] : buffers)
          for (const auto& p : part.stage->param_table())
            o.add(state + "." + p.name, Dtype::F32, p.shape, buf->data() + p.offset);
        nlohmann::json sc = nlohmann::json::object();
        for (const auto& [name, v] : part.opt->state_scalars()) sc[name] = *v;
        scalars.push_back(sc);
      }
      o.write(tmp + "/optimizer.safetensors");
    }

    nlohmann::json state;
    state["format"] = "pipenag-checkpoint";
    state["format_version"] = kFormatVersion;
    state["step"] = st.step;
    state["data_position"] = st.data_position;
    state["tokens"] = st.tokens;
    state["optimizer_step"] = opt ? opt->step_count() : 0;
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
    write_file_atomic(tmp + "/state.json", state.dump(2) + "\n");
    write_file_atomic(tmp + "/config.toml", config_to_toml(cfg));
    fsync_dir(tmp);

    // Swap the new folder in with one atomic rename; the old one (now at tmp) is removed after.
    if (fs::exists(final_dir)) {
      if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) != 0)
        throw Error(dir + ": cannot replace checkpoint: " + std::strerror(errno));
      fs::remove_all(tmp, ec);
    } else {
      if (std::rename(tmp.c_str(), dir.c_str()) != 0)
        throw Error(dir + ": cannot create checkpoint: " + std::strerror(errno));
    }
    const fs::path parent = final_dir.has_parent_path() ? final_dir.parent_path() : fs::path(".");
    fsync_dir(parent.string());
  } catch (...) {
    fs::remove_all(tmp, ec);
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
  if (j.value("format_version", -1) != kFormatVersion)
    throw Error(path + ": unsupported checkpoint format version " +
                j.value("format_version", nlohmann::json(-1)).dump());
  for (const char* k : {"step", "data_position", "tokens", "config_toml"})
    if (!j.contains(k)) throw Error(path + ": missing field '" + std::string(k) + "'");
  return j;
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
                     TrainState* st) {
  const nlohmann::json j = read_state(dir);
  const Config there = read_checkpoint_config(dir);
  const std::string d = model_config_difference(there.model, cfg.model);
  if (!d.empty())
    throw Error(dir + ": checkpoint is for a different architecture: " + d);
  if (st) {
    // The correction's state (PipeMare's delta, SpecTrain's smoothed update) is in the files only
    // when the run had it; switching on resume would start it from nothing or drop it.
    const std::string there_corr = j.value("weight_correction", std::string("none"));
    if (there_corr != weight_correction(cfg))
      throw Error(dir + ": checkpoint was trained with weight correction " + there_corr +
                  ", this run uses " + weight_correction(cfg) + " (optim.pipemare, optim.spectrain)");
    // Resuming needs the same cut: optimizer state, delays and stashes are per stage.
    const std::vector<int> there_blocks = checkpoint_blocks_per_stage(dir);
    const int there_stages = static_cast<int>(there_blocks.size());
    const std::vector<int> here_blocks = blocks_per_stage(cfg.model, cfg.pipeline);
    if (there_stages != cfg.pipeline.stages || there_blocks != here_blocks) {
      const auto list = [](const std::vector<int>& v) {
        std::string s = "[";
        for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
        return s + "]";
      };
      throw Error(dir + ": checkpoint has a different stage layout: " + std::to_string(there_stages) +
                  " stages with blocks " + list(there_blocks) + " there, " +
                  std::to_string(cfg.pipeline.stages) + " with " + list(here_blocks) +
                  " here (resume with the same pipeline.stages and pipeline.partition)");
    }
  }
  const SafetensorsFile model = SafetensorsFile::open(dir + "/model.safetensors");
  for (const auto& part : parts)
    for (const auto& p : part.stage->param_table())
      copy_f32(model, p.name, p.shape, part.stage->params() + p.offset);
  std::unique_ptr<SafetensorsFile> o;
  for (size_t k = 0; k < parts.size(); ++k) {
    const StagePart& part = parts[k];
    if (!part.opt) continue;
    if (!o) {
      const std::string there_opt = j.value("optimizer", std::string("adamw"));
      if (there_opt != part.opt->name())
        throw Error(dir + ": checkpoint was trained with optimizer " + there_opt + ", this run uses " +
                    part.opt->name() + " (optim.name)");
      o = std::make_unique<SafetensorsFile>(SafetensorsFile::open(dir + "/optimizer.safetensors"));
    }
    auto buffers = part.opt->state_tensors();
    buffers.insert(buffers.end(), part.extra.begin(), part.extra.end());
    for (const auto& [state, buf] : buffers)
      for (const auto& p : part.stage->param_table())
        copy_f32(*o, state + "." + p.name, p.shape, buf->data() + p.offset);
    part.opt->set_step_count(j.value("optimizer_step", int64_t{0}));
    const auto scalars = part.opt->state_scalars();
    if (!scalars.empty()) {
      try {
        const auto& sc = j.at("optimizer_scalars").at(k);
        for (const auto& [name, v] : scalars) *v = sc.at(name).get<double>();
      } catch (const nlohmann::json::exception& e) {
        throw Error(dir + "/state.json: missing or bad optimizer_scalars (" + std::string(e.what()) + ")");
      }
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
