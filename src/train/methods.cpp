#include "train/methods.h"

#include <algorithm>
#include <utility>

#include "util/error.h"

namespace pipenag {
namespace {

// Every preset sets every correction, so a preset alone fully describes the method.
#define PIPENAG_CORRECTIONS_OFF                                                              \
  "optim.lr_reschedule=false", "optim.pipemare=false", "optim.spectrain=false",              \
      "optim.stage_momentum=false", "optim.stage_lr_rho=0.0", "optim.gamma_theory=false",     \
      "optim.adaptive=false"

const std::vector<Method> kMethods = {
    {"gpipe", "synchronous GPipe: 4 micro-batches per update, flush, AdamW (beta1 0.9)",
     {"pipeline.schedule=\"gpipe\"", "pipeline.microbatches=4", "pipeline.stash=true", "pipeline.recompute=false",
      "optim.name=\"adamw\"", "optim.beta1=0.9", PIPENAG_CORRECTIONS_OFF}},
    {"pipedream", "asynchronous 1F1B with weight stashing, AdamW (beta1 0.9)",
     {"pipeline.schedule=\"async-1f1b\"", "pipeline.microbatches=1", "pipeline.stash=true", "pipeline.recompute=false",
      "optim.name=\"adamw\"", "optim.beta1=0.9", PIPENAG_CORRECTIONS_OFF}},
    {"pipedream-lr", "PipeDream plus PipeMare's learning-rate rescheduling eta/tau_k^(1-min(t/T,1))",
     {"pipeline.schedule=\"async-1f1b\"", "pipeline.microbatches=1", "pipeline.stash=true", "pipeline.recompute=false",
      "optim.name=\"adamw\"", "optim.beta1=0.9", PIPENAG_CORRECTIONS_OFF,
      "optim.lr_reschedule=true"}},
    {"pipemare",
     "no stashing; lr rescheduling plus discrepancy correction (forward recomputed and backward on w - tau_k delta)",
     {"pipeline.schedule=\"async-1f1b\"", "pipeline.microbatches=1", "pipeline.stash=false",
      "pipeline.recompute=true",
      "optim.name=\"adamw\"", "optim.beta1=0.9", PIPENAG_CORRECTIONS_OFF,
      "optim.lr_reschedule=true", "optim.pipemare=true"}},
    {"spectrain",
     "no stashing; forward on predicted weights w - tau_k lr (smoothed update), backward recomputed on the current weights, AdamW",
     {"pipeline.schedule=\"async-1f1b\"", "pipeline.microbatches=1", "pipeline.stash=false",
      "pipeline.recompute=true",
      "optim.name=\"adamw\"", "optim.beta1=0.9", PIPENAG_CORRECTIONS_OFF, "optim.spectrain=true"}},
    {"nesterov", "the paper's method: asynchronous 1F1B, weight stashing, NAdamW with beta1 0.99",
     {"pipeline.schedule=\"async-1f1b\"", "pipeline.microbatches=1", "pipeline.stash=true", "pipeline.recompute=false",
      "optim.name=\"nadamw\"", "optim.beta1=0.99", PIPENAG_CORRECTIONS_OFF}},
    {"nesterov-nows",
     "Ours-No-WS as the reference code runs it: no stashing (forward recomputed under the backward's "
     "weights), NAdamW with beta1_k = 0.9 + tau_k (0.99 - 0.9)/P, no eta/tau^rho",
     {"pipeline.schedule=\"async-1f1b\"", "pipeline.microbatches=1", "pipeline.stash=false",
      "pipeline.recompute=true", "optim.name=\"nadamw\"", "optim.beta1=0.9", PIPENAG_CORRECTIONS_OFF,
      "optim.stage_momentum=true"}},
    {"nesterov-nows-rho",
     "our variant of Ours-No-WS: nesterov-nows plus the paper text's eta_k = eta/tau_k^0.5 (not in the reference code)",
     {"pipeline.schedule=\"async-1f1b\"", "pipeline.microbatches=1", "pipeline.stash=false",
      "pipeline.recompute=true", "optim.name=\"nadamw\"", "optim.beta1=0.9", PIPENAG_CORRECTIONS_OFF,
      "optim.stage_momentum=true", "optim.stage_lr_rho=0.5"}},
    {"nesterov-eq10",
     "Eq. 10 written out: asynchronous 1F1B, stashing, nag-delay with constant gamma 0.99 and Adam scaling",
     {"pipeline.schedule=\"async-1f1b\"", "pipeline.microbatches=1", "pipeline.stash=true", "pipeline.recompute=false",
      "optim.name=\"nag-delay\"", "optim.gamma=0.99", PIPENAG_CORRECTIONS_OFF,
      "optim.adaptive=true"}},
};

#undef PIPENAG_CORRECTIONS_OFF

}  // namespace

const std::vector<Method>& methods() { return kMethods; }

const Method& find_method(std::string_view name) {
  for (const auto& m : kMethods)
    if (m.name == name) return m;
  std::string known;
  for (const auto& m : kMethods) known += (known.empty() ? "" : ", ") + std::string(m.name);
  throw Error("unknown method '" + std::string(name) + "' (known: " + known + ")");
}

std::string describe_methods() {
  std::string out;
  for (const auto& m : kMethods) {
    out += std::string(m.name) + ": " + std::string(m.description) + "\n   ";
    // Each key once, with the value it ends up with (later settings win).
    std::vector<std::pair<std::string_view, std::string_view>> kv;
    for (const auto& s : m.settings) {
      const auto eq = s.find('=');
      const auto key = s.substr(0, eq);
      auto it = std::find_if(kv.begin(), kv.end(), [&](const auto& p) { return p.first == key; });
      if (it == kv.end()) kv.emplace_back(key, s.substr(eq + 1));
      else it->second = s.substr(eq + 1);
    }
    for (const auto& [k, v] : kv) out += " " + std::string(k) + "=" + std::string(v);
    out += "\n";
  }
  out += R"(
Where these presets and the defaults differ from the paper's reference code
(PluralisResearch/AsyncPP @584658e, ../shared/PAPER.md section 6):
  gpipe: the M micro-batch gradients are averaged (the reference sums them: M times the mean).
    With Adam(W) this changes only what clipping sees; `train.clip` applies to the mean.
  clipping: each stage clips its own gradient norm at train.clip, as the reference does; the
    default (and configs/default.toml) is 1.0, the reference and configs/paper-134m.toml and
    configs/study-small.toml use 10.
  pipedream-lr, pipemare: the rescheduling horizon T (optim.lr_reschedule_steps) defaults to 14% of
    train.steps, the reference's 7k of 50k updates.
  nesterov-nows: beta1_k only, as the reference; the paper's text also divides the learning rate
    by tau_k^rho, which is our variant nesterov-nows-rho (rho = 0.5).
  no-stash presets (pipemare, spectrain, nesterov-nows, nesterov-nows-rho): the forward is
    recomputed in the backward (pipeline.recompute = true), as the reference runtime always does;
    with pipeline.recompute = false the backward uses the activations its forward saved under
    older weights.
  pipemare, spectrain: the reference parses their flags but has no code for them; ours follow
    their papers.
  nesterov: the reference drains the pipeline once per 1000-update epoch; pipenag never drains.
)";
  return out;
}

}  // namespace pipenag
