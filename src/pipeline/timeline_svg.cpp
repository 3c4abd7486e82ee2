#include "pipeline/timeline_svg.h"

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "io/atomic_file.h"
#include "util/error.h"

namespace pipenag {
namespace {

const char* color_of(char kind) {
  switch (kind) {
    case 'F': return "#4c78a8";
    case 'B': return "#54a24b";
    case 'S': return "#f58518";
    default: return "#d9d9d9";
  }
}

std::string xml_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<') o += "&lt;";
    else if (c == '>') o += "&gt;";
    else if (c == '&') o += "&amp;";
    else o += c;
  }
  return o;
}

}  // namespace

std::string timeline_svg(const std::vector<TraceEvent>& events, int stages, const std::string& title,
                         double t0, double t1, const std::string& unit) {
  const double W = 1000, left = 70, right = 20, top = 40, row = 34, bar = 24;
  const double H = top + row * stages + 50;
  const double span = t1 > t0 ? t1 - t0 : 1.0;
  const double sx = (W - left - right) / span;
  std::string o;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
                "font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
                W, H);
  o += buf;
  std::snprintf(buf, sizeof buf, "<text x=\"%.0f\" y=\"20\" font-size=\"14\">%s</text>\n", left,
                xml_escape(title).c_str());
  o += buf;
  for (int k = 0; k < stages; ++k) {
    std::snprintf(buf, sizeof buf, "<text x=\"8\" y=\"%.1f\">stage %d</text>\n",
                  top + row * k + bar * 0.7, k);
    o += buf;
  }
  for (const auto& e : events) {
    if (e.end < t0 || e.start > t1 || e.stage < 0 || e.stage >= stages) continue;
    const double a = std::max(e.start, t0), b = std::min(e.end, t1);
    const double x = left + (a - t0) * sx, w = std::max(0.5, (b - a) * sx);
    const double y = top + row * e.stage;
    std::snprintf(buf, sizeof buf,
                  "<rect x=\"%.2f\" y=\"%.1f\" width=\"%.2f\" height=\"%.0f\" fill=\"%s\" stroke=\"white\" "
                  "stroke-width=\"0.5\"><title>%c mb %lld v%lld %.6g-%.6g</title></rect>\n",
                  x, y, w, bar, color_of(e.kind), e.kind, static_cast<long long>(e.mb),
                  static_cast<long long>(e.version), e.start, e.end);
    o += buf;
    if ((e.kind == 'F' || e.kind == 'B') && w > 16) {
      std::snprintf(buf, sizeof buf,
                    "<text x=\"%.2f\" y=\"%.1f\" fill=\"white\" text-anchor=\"middle\">%lld</text>\n",
                    x + w / 2, y + bar * 0.7, static_cast<long long>(e.mb));
      o += buf;
    }
  }
  // Axis and legend.
  const double ay = top + row * stages + 8;
  std::snprintf(buf, sizeof buf, "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"black\"/>\n",
                left, ay, W - right, ay);
  o += buf;
  for (int i = 0; i <= 4; ++i) {
    const double t = t0 + span * i / 4;
    std::snprintf(buf, sizeof buf, "<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%.3g %s</text>\n",
                  left + (t - t0) * sx, ay + 14, t, unit.c_str());
    o += buf;
  }
  double lx = left;
  for (const auto& [k, name] : std::vector<std::pair<char, const char*>>{
           {'F', "forward"}, {'B', "backward"}, {'S', "step"}, {'W', "waiting"}}) {
    std::snprintf(buf, sizeof buf,
                  "<rect x=\"%.0f\" y=\"%.0f\" width=\"12\" height=\"12\" fill=\"%s\"/><text x=\"%.0f\" "
                  "y=\"%.0f\">%s</text>\n",
                  lx, ay + 24, color_of(k), lx + 16, ay + 34, name);
    o += buf;
    lx += 100;
  }
  return o + "</svg>\n";
}

std::string schedule_svg(const Schedule& s) {
  const Timeline t = simulate(s, 1.0, 2.0, 0.0);
  std::vector<TraceEvent> ev;
  const Versions v = schedule_versions(s);
  for (const auto& a : t.actions) {
    if (a.action.op == Op::Step) continue;
    const auto& ver = a.action.op == Op::Forward ? v.forward : v.backward;
    ev.push_back({a.stage, a.action.op == Op::Forward ? 'F' : 'B', a.action.mb,
                  ver[static_cast<size_t>(a.stage)][static_cast<size_t>(a.action.mb)], a.start, a.end});
  }
  char title[200];
  std::snprintf(title, sizeof title, "%s, %d stages, %d micro-batch(es) per update, %lld updates: utilisation %.1f%%",
                std::string(schedule_name(s.kind)).c_str(), s.stages, s.microbatches,
                static_cast<long long>(s.updates), 100.0 * t.utilization());
  return timeline_svg(ev, s.stages, title, 0.0, t.makespan, "units");
}

std::vector<TraceEvent> read_trace(const std::string& path, int* stages) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": not valid JSON (" + std::string(e.what()) + ")");
  }
  if (!j.is_object() || !j.contains("traceEvents") || !j["traceEvents"].is_array())
    throw Error(path + ": not a trace written by `pipenag train --trace` (no traceEvents array)");
  std::vector<TraceEvent> out;
  int P = 0;
  try {
    for (const auto& e : j["traceEvents"]) {
      if (e.value("ph", "") != "X") continue;
      TraceEvent t;
      t.stage = e.at("tid").get<int>();
      const std::string cat = e.value("cat", "");
      t.kind = cat == "forward" ? 'F' : cat == "backward" ? 'B' : cat == "step" ? 'S' : 'W';
      t.mb = e.at("args").value("mb", int64_t{-1});
      t.version = e.at("args").value("version", int64_t{0});
      t.start = e.at("ts").get<double>() * 1e-6;
      t.end = t.start + e.at("dur").get<double>() * 1e-6;
      if (t.stage < 0 || t.stage > 100000) throw Error(path + ": stage id out of range");
      P = std::max(P, t.stage + 1);
      out.push_back(t);
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": malformed trace event (" + std::string(e.what()) + ")");
  }
  if (out.empty()) throw Error(path + ": the trace has no events");
  if (stages) *stages = P;
  return out;
}

TraceSummary summarize_trace(const std::vector<TraceEvent>& events, int stages, double from,
                             double to, int skip_updates) {
  TraceSummary s;
  double lo = 1e300, hi = -1e300;
  std::vector<double> step_ends;  // of the last stage
  for (const auto& e : events) {
    lo = std::min(lo, e.start);
    hi = std::max(hi, e.end);
    if (e.kind == 'S' && e.stage == stages - 1) step_ends.push_back(e.end);
  }
  std::sort(step_ends.begin(), step_ends.end());
  double a = std::max(from, lo), b = to < 0 ? hi : std::min(to, hi);
  if (skip_updates > 0) {
    const auto k = static_cast<size_t>(skip_updates);
    if (step_ends.size() < 2 * k + 2)
      throw Error("trace: --skip-updates " + std::to_string(skip_updates) + " leaves no window (" +
                  std::to_string(step_ends.size()) + " updates in the trace)");
    a = step_ends[k - 1];
    b = step_ends[step_ends.size() - k];
  }
  if (b <= a) throw Error("trace: the window [" + std::to_string(from) + ", " + std::to_string(to) +
                          "] holds no events");
  s.from = a;
  s.to = b;
  s.busy.assign(static_cast<size_t>(stages), 0.0);
  s.wait.assign(static_cast<size_t>(stages), 0.0);
  for (const auto& e : events) {
    const double d = std::max(0.0, std::min(e.end, b) - std::max(e.start, a));
    (e.kind == 'W' ? s.wait : s.busy)[static_cast<size_t>(e.stage)] += d;
  }
  for (double t : step_ends) s.updates += t > a && t <= b;
  s.updates_per_s = static_cast<double>(s.updates) / (b - a);
  double busy = 0;
  for (double x : s.busy) busy += x;
  s.utilization = busy / (static_cast<double>(stages) * (b - a));
  char buf[240];
  std::snprintf(buf, sizeof buf,
                "window %.3f-%.3f s: %lld updates (%.3f/s), utilisation %.1f%%, bubble %.1f%%\n", a, b,
                static_cast<long long>(s.updates), s.updates_per_s, 100.0 * s.utilization,
                100.0 * (1.0 - s.utilization));
  s.text = buf;
  s.text += "| stage | busy s | waiting s | idle s | utilisation |\n|---:|---:|---:|---:|---:|\n";
  for (int k = 0; k < stages; ++k) {
    const auto ks = static_cast<size_t>(k);
    std::snprintf(buf, sizeof buf, "| %d | %.3f | %.3f | %.3f | %.1f%% |\n", k, s.busy[ks], s.wait[ks],
                  std::max(0.0, (b - a) - s.busy[ks]), 100.0 * s.busy[ks] / (b - a));
    s.text += buf;
  }
  return s;
}

TraceSummary render_trace(const std::string& trace_path, const std::string& svg_path, double from,
                          double to, int skip_updates) {
  int P = 0;
  const auto ev = read_trace(trace_path, &P);
  TraceSummary s = summarize_trace(ev, P, from, to, skip_updates);
  char title[200];
  std::snprintf(title, sizeof title, "%s: %d stages, utilisation %.1f%% in %.2f-%.2f s",
                trace_path.c_str(), P, 100.0 * s.utilization, s.from, s.to);
  write_file_atomic(svg_path, timeline_svg(ev, P, title, s.from, s.to, "s"));
  return s;
}

}  // namespace pipenag
