// Pictures of per-stage timelines: a Schedule laid out with unit costs, or a trace recorded by
// `pipenag train --trace`, drawn as an SVG (one row per stage: forward, backward, step, waiting).
#pragma once
#include <string>
#include <vector>

#include "pipeline/engine.h"
#include "pipeline/schedule.h"

namespace pipenag {

// Events in [t0, t1] (seconds, or time units) as an SVG document.
std::string timeline_svg(const std::vector<TraceEvent>& events, int stages, const std::string& title,
                         double t0, double t1, const std::string& unit);

// The schedule's timeline with forward = 1, backward = 2 time units (see simulate()).
std::string schedule_svg(const Schedule& s);

// Reads a trace written by `pipenag train --trace` (Error naming the file when it is not one).
std::vector<TraceEvent> read_trace(const std::string& path, int* stages);

struct TraceSummary {
  double from = 0, to = 0;         // the window, seconds
  double utilization = 0;          // sum of compute time / (stages * window)
  int64_t updates = 0;             // steps of the last stage that ended inside the window
  double updates_per_s = 0;
  std::vector<double> busy, wait;  // per stage, seconds in the window
  std::string text;                // a table of the above
};
// Utilisation in the window [from, to] (to < 0: the trace's end). With skip_updates = K > 0 the
// window is instead the steady state: from the end of the last stage's K-th update to the end
// of its K-th-from-last, whole update periods without the pipeline's fill and drain.
TraceSummary summarize_trace(const std::vector<TraceEvent>& events, int stages, double from,
                             double to, int skip_updates = 0);
// As summarize_trace on a trace file, and the SVG of the window written to `svg_path`.
TraceSummary render_trace(const std::string& trace_path, const std::string& svg_path, double from,
                          double to, int skip_updates = 0);

}  // namespace pipenag
