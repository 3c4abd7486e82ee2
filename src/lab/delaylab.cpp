#include "lab/delaylab.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <numbers>
#include <sstream>

#include "io/atomic_file.h"
#include "util/gnuplot.h"
#include "util/error.h"
#include "util/hash.h"

extern char** environ;

namespace pipenag::lab {

namespace {

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// log(1 + exp(z)) without overflow.
double softplus(double z) { return z > 0 ? z + std::log1p(std::exp(-z)) : std::log1p(std::exp(z)); }
// 1 / (1 + exp(-z)) without overflow.
double sigmoid(double z) {
  if (z >= 0) return 1.0 / (1.0 + std::exp(-z));
  const double e = std::exp(z);
  return e / (1.0 + e);
}

// Standard normal deviates from splitmix64 (Box-Muller on our own uniform numbers, so that the
// dataset does not depend on the standard library's distribution implementation).
struct Normal {
  uint64_t state;
  bool have = false;
  double spare = 0;
  double uniform() {  // in (0, 1)
    state = splitmix64(state);
    return (static_cast<double>(state >> 11) + 0.5) * 0x1.0p-53;
  }
  double operator()() {
    if (have) {
      have = false;
      return spare;
    }
    const double r = std::sqrt(-2.0 * std::log(uniform())), th = 2.0 * std::numbers::pi * uniform();
    spare = r * std::sin(th);
    have = true;
    return r * std::cos(th);
  }
};

struct LogisticData {
  int n = 0, d = 0;
  double lambda = 0;
  std::vector<double> x;  // n x d, row-major
  std::vector<double> y;  // +-1
  double value(const double* w) const {
    double s = 0;
    for (int i = 0; i < n; ++i) {
      const double* xi = &x[static_cast<size_t>(i) * d];
      double z = 0;
      for (int j = 0; j < d; ++j) z += xi[j] * w[j];
      s += softplus(-y[i] * z);
    }
    double r = 0;
    for (int j = 0; j < d; ++j) r += w[j] * w[j];
    return s / n + 0.5 * lambda * r;
  }
  void gradient(const double* w, double* g) const {
    for (int j = 0; j < d; ++j) g[j] = lambda * w[j];
    for (int i = 0; i < n; ++i) {
      const double* xi = &x[static_cast<size_t>(i) * d];
      double z = 0;
      for (int j = 0; j < d; ++j) z += xi[j] * w[j];
      const double c = -y[i] * sigmoid(-y[i] * z) / n;
      for (int j = 0; j < d; ++j) g[j] += c * xi[j];
    }
  }
};

// Solves H x = b for a symmetric positive definite H (d x d, overwritten) by Cholesky.
void cholesky_solve(std::vector<double>& h, std::vector<double>& b, int d) {
  for (int j = 0; j < d; ++j) {
    double s = h[j * d + j];
    for (int k = 0; k < j; ++k) s -= h[j * d + k] * h[j * d + k];
    if (!(s > 0)) throw Error("delaylab: Newton's method met a Hessian that is not positive definite");
    const double ljj = std::sqrt(s);
    h[j * d + j] = ljj;
    for (int i = j + 1; i < d; ++i) {
      double t = h[i * d + j];
      for (int k = 0; k < j; ++k) t -= h[i * d + k] * h[j * d + k];
      h[i * d + j] = t / ljj;
    }
  }
  for (int i = 0; i < d; ++i) {  // L z = b
    double t = b[i];
    for (int k = 0; k < i; ++k) t -= h[i * d + k] * b[k];
    b[i] = t / h[i * d + i];
  }
  for (int i = d - 1; i >= 0; --i) {  // L^T x = z
    double t = b[i];
    for (int k = i + 1; k < d; ++k) t -= h[k * d + i] * b[k];
    b[i] = t / h[i * d + i];
  }
}

// min f by damped Newton from w = 0, to machine precision.
double logistic_minimum(const LogisticData& D) {
  const int d = D.d;
  std::vector<double> w(d, 0.0), g(d), h(static_cast<size_t>(d) * d), step(d), trial(d);
  double f = D.value(w.data());
  for (int it = 0; it < 200; ++it) {
    D.gradient(w.data(), g.data());
    std::fill(h.begin(), h.end(), 0.0);
    for (int i = 0; i < D.n; ++i) {
      const double* xi = &D.x[static_cast<size_t>(i) * d];
      double z = 0;
      for (int j = 0; j < d; ++j) z += xi[j] * w[j];
      const double s = sigmoid(z), c = s * (1 - s) / D.n;
      for (int a = 0; a < d; ++a)
        for (int b = 0; b <= a; ++b) h[a * d + b] += c * xi[a] * xi[b];
    }
    for (int a = 0; a < d; ++a) {
      h[a * d + a] += D.lambda;
      for (int b = 0; b < a; ++b) h[b * d + a] = h[a * d + b];
    }
    step = g;
    cholesky_solve(h, step, d);
    double decrement = 0;  // g^T H^-1 g
    for (int j = 0; j < d; ++j) decrement += g[j] * step[j];
    if (!(decrement > 1e-30)) break;
    double s = 1.0, ft = 0;
    for (int ls = 0; ls < 60; ++ls, s *= 0.5) {
      for (int j = 0; j < d; ++j) trial[j] = w[j] - s * step[j];
      ft = D.value(trial.data());
      if (ft <= f - 0.25 * s * decrement) break;
    }
    if (!(ft < f)) break;  // no progress left in floating point
    w = trial;
    f = ft;
  }
  return f;
}

void check_settings(const Problem& p, const RunSettings& s) {
  if (p.w0.empty() || !p.value || !p.gradient) throw Error("delaylab: empty problem");
  if (s.tau < 0) throw Error("delaylab: tau must be >= 0, got " + std::to_string(s.tau));
  if (!(s.eta > 0) || !std::isfinite(s.eta)) throw Error("delaylab: eta must be a positive number");
  if (!(s.gamma >= 0 && s.gamma < 1)) throw Error("delaylab: gamma must be in [0, 1), got " + fmt("%g", s.gamma));
  if (s.iters < 0) throw Error("delaylab: iterations must be >= 0");
  if (!(s.target > 0) || !std::isfinite(s.target)) throw Error("delaylab: target must be a positive number");
  if (!(s.diverge_factor > 1)) throw Error("delaylab: divergence factor must be > 1");
}


}  // namespace

std::string method_key(Method m) {
  switch (m) {
    case Method::GD: return "gd";
    case Method::HeavyBall: return "heavy-ball";
    case Method::NagNoDiscount: return "nag";
    case Method::Eq10: return "eq10";
  }
  return "?";
}

std::string method_name(Method m) {
  switch (m) {
    case Method::GD: return "delayed GD";
    case Method::HeavyBall: return "delayed heavy ball";
    case Method::NagNoDiscount: return "delayed NAG, no discount (Eq. 8)";
    case Method::Eq10: return "Eq. 10 (NAG, (1-gamma) discount)";
  }
  return "?";
}

Problem make_quadratic(int dim, double cond, double L) {
  if (dim < 1) throw Error("delaylab: quadratic dimension must be >= 1");
  if (!(cond >= 1) || !std::isfinite(cond)) throw Error("delaylab: condition number must be >= 1");
  if (!(L > 0) || !std::isfinite(L)) throw Error("delaylab: L must be positive");
  auto lam = std::make_shared<std::vector<double>>(dim);
  const double mu = L / cond;
  for (int i = 0; i < dim; ++i)
    (*lam)[i] = dim == 1 ? L : mu * std::pow(cond, static_cast<double>(i) / (dim - 1));
  (*lam)[dim - 1] = L;  // exactly, whatever pow rounds to
  double half_sum = 0;
  for (double l : *lam) half_sum += 0.5 * l;
  Problem p;
  p.name = "quadratic";
  p.w0.assign(dim, 1.0 / std::sqrt(half_sum));
  p.L = L;
  p.mu = dim == 1 ? L : mu;
  p.f_star = 0;
  p.value = [lam](const double* w) {
    double s = 0;
    for (size_t i = 0; i < lam->size(); ++i) s += (*lam)[i] * w[i] * w[i];
    return 0.5 * s;
  };
  p.gradient = [lam](const double* w, double* g) {
    for (size_t i = 0; i < lam->size(); ++i) g[i] = (*lam)[i] * w[i];
  };
  p.description = "f(w) = 0.5 w^T A w, A diagonal, d = " + std::to_string(dim) +
                  ", eigenvalues log-spaced in [" + fmt("%g", p.mu) + ", " + fmt("%g", L) +
                  "] (condition number " + fmt("%g", L / p.mu) + "); w0 = c*ones with f(w0) = " +
                  fmt("%.6g", p.value(p.w0.data())) + "; f* = 0";
  return p;
}

Problem make_logistic(int n, int dim, double lambda, double col_spread, uint64_t seed) {
  if (n < 1 || dim < 1) throw Error("delaylab: logistic regression needs n >= 1 and d >= 1");
  if (!(lambda > 0) || !std::isfinite(lambda)) throw Error("delaylab: lambda must be positive");
  if (!(col_spread >= 1) || !std::isfinite(col_spread)) throw Error("delaylab: column spread must be >= 1");
  auto D = std::make_shared<LogisticData>();
  D->n = n;
  D->d = dim;
  D->lambda = lambda;
  D->x.resize(static_cast<size_t>(n) * dim);
  D->y.resize(n);
  Normal rng{splitmix64(seed ^ 0x6c6f676973746963ULL)};  // "logistic"
  std::vector<double> scale(dim), w_true(dim);
  for (int j = 0; j < dim; ++j)
    scale[j] = dim == 1 ? 1.0 : std::pow(col_spread, -static_cast<double>(j) / (dim - 1));
  for (int j = 0; j < dim; ++j) w_true[j] = rng();
  for (int i = 0; i < n; ++i) {
    double z = 0;
    for (int j = 0; j < dim; ++j) {
      const double v = scale[j] * rng();
      D->x[static_cast<size_t>(i) * dim + j] = v;
      z += v * w_true[j];
    }
    double label = z >= 0 ? 1.0 : -1.0;
    if (rng.uniform() < 0.05) label = -label;
    D->y[i] = label;
  }
  // lambda_max(X^T X / n) by power iteration.
  std::vector<double> v(dim, 1.0 / std::sqrt(static_cast<double>(dim))), u(dim), xv(n);
  double top = 0;
  for (int it = 0; it < 100000; ++it) {
    for (int i = 0; i < n; ++i) {
      double s = 0;
      for (int j = 0; j < dim; ++j) s += D->x[static_cast<size_t>(i) * dim + j] * v[j];
      xv[i] = s;
    }
    std::fill(u.begin(), u.end(), 0.0);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < dim; ++j) u[j] += D->x[static_cast<size_t>(i) * dim + j] * xv[i] / n;
    double norm = 0;
    for (double a : u) norm += a * a;
    norm = std::sqrt(norm);
    if (!(norm > 0)) break;
    for (int j = 0; j < dim; ++j) v[j] = u[j] / norm;
    const bool done = std::abs(norm - top) <= 1e-15 * norm;
    top = norm;
    if (done) break;
  }
  Problem p;
  p.name = "logistic";
  p.w0.assign(dim, 0.0);
  p.L = 0.25 * top + lambda;
  p.mu = lambda;
  p.f_star = logistic_minimum(*D);
  p.value = [D](const double* w) { return D->value(w); };
  p.gradient = [D](const double* w, double* g) { D->gradient(w, g); };
  p.description = "L2-regularised logistic regression, n = " + std::to_string(n) + ", d = " +
                  std::to_string(dim) + ", lambda = " + fmt("%g", lambda) +
                  ", Gaussian features with column scales log-spaced in [" + fmt("%g", 1.0 / col_spread) +
                  ", 1], 5% labels flipped, seed " + std::to_string(seed) + "; L = 0.25 lambda_max(X^T X/n) + lambda = " +
                  fmt("%.4g", p.L) + ", mu = lambda; w0 = 0, f(w0) = " + fmt("%.6g", p.value(p.w0.data())) +
                  ", f* = " + fmt("%.10g", p.f_star) + " (Newton)";
  return p;
}

double gamma_at(const RunSettings& s, int64_t t) {
  if (!s.gamma_theory) return s.gamma;
  return t <= 2 ? 0.0 : static_cast<double>(t - 2) / static_cast<double>(t);
}

RunResult run_delayed(const Problem& p, const RunSettings& s) {
  check_settings(p, s);
  const size_t n = p.w0.size();
  const size_t slots = static_cast<size_t>(s.tau) + 1;
  std::vector<double> w = p.w0, w_prev = p.w0, w_next(n), d(n, 0.0), g(n);
  std::vector<double> points(slots * n);  // look-ahead points of the last tau+1 updates
  const double sub0 = p.value(w.data()) - p.f_star;
  const double limit = s.diverge_factor * (sub0 > 0 ? sub0 : s.target);
  const bool nesterov = s.method == Method::NagNoDiscount || s.method == Method::Eq10;

  RunResult r;
  int64_t next_record = 0;
  for (int64_t t = 0;; ++t) {
    const double sub = p.value(w.data()) - p.f_star;
    const bool diverged = !std::isfinite(sub) || sub > limit;
    if (!diverged && r.reached_at < 0 && sub <= s.target) r.reached_at = t;
    const bool last = diverged || t >= s.iters || sub < s.floor;
    if ((t >= next_record || last) && std::isfinite(sub)) {
      r.curve.emplace_back(t, sub);
      next_record = t < s.dense ? t + 1 : std::max(t + 1, static_cast<int64_t>(std::ceil(t * 1.02)));
    }
    if (last) {
      r.last_iter = t;
      r.final_subopt = sub;
      if (diverged) r.diverged_at = t;
      break;
    }

    const double gam = s.method == Method::GD ? 0.0 : gamma_at(s, t);
    double* point = &points[(static_cast<size_t>(t) % slots) * n];
    for (size_t i = 0; i < n; ++i) {
      if (nesterov) {
        d[i] = gam * (w[i] - w_prev[i]);
        point[i] = w[i] + d[i];
      } else {
        point[i] = w[i];
      }
    }
    const int64_t src = std::max<int64_t>(t - s.tau, 0);
    p.gradient(&points[(static_cast<size_t>(src) % slots) * n], g.data());
    switch (s.method) {
      case Method::GD:
        for (size_t i = 0; i < n; ++i) w_next[i] = w[i] - s.eta * g[i];
        break;
      case Method::HeavyBall:
        for (size_t i = 0; i < n; ++i) w_next[i] = w[i] + gam * (w[i] - w_prev[i]) - s.eta * g[i];
        break;
      case Method::NagNoDiscount:
        for (size_t i = 0; i < n; ++i) w_next[i] = w[i] + d[i] - s.eta * g[i];
        break;
      case Method::Eq10: {
        const double step = s.eta * (1.0 - gam);
        for (size_t i = 0; i < n; ++i) w_next[i] = w[i] + d[i] - step * g[i];
        break;
      }
    }
    w_prev.swap(w);
    w.swap(w_next);
  }
  r.outcome = r.diverged_at >= 0 ? Outcome::Diverged : r.reached_at >= 0 ? Outcome::Reached : Outcome::NotReached;
  r.w = std::move(w);
  return r;
}

std::string outcome_cell(const RunResult& r) {
  // A run that passed the target and diverged later counts as diverged: it does not converge.
  switch (r.outcome) {
    case Outcome::Reached: return std::to_string(r.reached_at);
    case Outcome::Diverged: return "diverged";
    case Outcome::NotReached: return "not reached";
  }
  return "?";
}

std::vector<int> parse_taus(const std::string& s) {
  std::vector<int> out;
  size_t b = 0;
  while (true) {
    const size_t e = s.find(',', b);
    const std::string item = s.substr(b, e == std::string::npos ? std::string::npos : e - b);
    const bool digits = !item.empty() && item.size() <= 6 &&
                        std::all_of(item.begin(), item.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (!digits) throw Error("delaylab: --taus: '" + item + "' is not a delay (expected comma-separated integers 0..100000)");
    const int v = std::stoi(item);
    if (v > 100000) throw Error("delaylab: --taus: " + item + " is too large (at most 100000)");
    if (std::find(out.begin(), out.end(), v) != out.end())
      throw Error("delaylab: --taus: " + item + " appears twice");
    out.push_back(v);
    if (e == std::string::npos) break;
    b = e + 1;
  }
  return out;
}

void validate(const DelayLabOptions& o) {
  if (o.problem != "quadratic" && o.problem != "logistic" && o.problem != "both")
    throw Error("delaylab: --problem must be quadratic, logistic or both, got '" + o.problem + "'");
  if (o.taus.empty()) throw Error("delaylab: --taus is empty");
  for (size_t i = 0; i < o.taus.size(); ++i) {
    if (o.taus[i] < 0 || o.taus[i] > 100000)
      throw Error("delaylab: --taus: " + std::to_string(o.taus[i]) + " is not in 0..100000");
    if (std::find(o.taus.begin(), o.taus.begin() + i, o.taus[i]) != o.taus.begin() + i)
      throw Error("delaylab: --taus: " + std::to_string(o.taus[i]) + " appears twice");
  }
  if (o.iters < 1 || o.iters > 100000000)
    throw Error("delaylab: --iters must be in 1..100000000, got " + std::to_string(o.iters));
  if (!(o.eta_scale > 0) || !std::isfinite(o.eta_scale))
    throw Error("delaylab: --eta-scale must be a positive number, got " + fmt("%g", o.eta_scale));
  if (!(o.gamma >= 0 && o.gamma < 1))
    throw Error("delaylab: --gamma must be in [0, 1), got " + fmt("%g", o.gamma));
  if (!(o.target > 0) || !std::isfinite(o.target))
    throw Error("delaylab: the target must be a positive number, got " + fmt("%g", o.target));
  if (o.out_dir.empty()) throw Error("delaylab: --out must not be empty");
}

std::vector<ProblemResults> run_experiments(const DelayLabOptions& o) {
  validate(o);
  std::vector<ProblemResults> all;
  if (o.problem == "quadratic" || o.problem == "both") all.push_back({make_quadratic(), 0, {}, {}, {}});
  if (o.problem == "logistic" || o.problem == "both") all.push_back({make_logistic(), 0, {}, {}, {}});
  for (auto& pr : all) {
    pr.eta = o.eta_scale / pr.problem.L;
    pr.methods.assign(std::begin(kAllMethods), std::end(kAllMethods));
    pr.taus = o.taus;
    pr.runs.assign(pr.methods.size(), std::vector<RunResult>(pr.taus.size()));
    const int jobs = static_cast<int>(pr.methods.size() * pr.taus.size());
    // Runs are independent and each is sequential, so the results do not depend on threads.
#pragma omp parallel for schedule(dynamic)
    for (int k = 0; k < jobs; ++k) {
      const size_t mi = static_cast<size_t>(k) / pr.taus.size(), ti = static_cast<size_t>(k) % pr.taus.size();
      RunSettings s;
      s.method = pr.methods[mi];
      s.tau = pr.taus[ti];
      s.eta = pr.eta;
      s.gamma = o.gamma;
      s.gamma_theory = o.gamma_theory;
      s.iters = o.iters;
      s.target = o.target;
      pr.runs[mi][ti] = run_delayed(pr.problem, s);
    }
  }
  return all;
}

std::string format_table(const DelayLabOptions& o, const std::vector<ProblemResults>& rs) {
  std::ostringstream t;
  t << "# pipenag delaylab: fixed gradient delay tau, deterministic gradients\n\n";
  t << "Iterations until f(w) - f* <= " << fmt("%g", o.target) << "; \"diverged\": f - f* not finite or above "
    << "1e6 * (f(w0) - f*); \"not reached\": neither within " << o.iters << " iterations.\n";
  t << "Settings: eta = " << fmt("%g", o.eta_scale) << "/L, gamma = "
    << (o.gamma_theory ? std::string("(t-2)/t (clamped at 0)") : fmt("%g", o.gamma))
    << " (heavy ball, NAG, Eq. 10); the gradient at update t is taken at the point of update max(t - tau, 0).\n";
  for (const auto& pr : rs) {
    t << "\n## " << pr.problem.name << "\n\n" << pr.problem.description << "; eta = " << fmt("%.6g", pr.eta) << "\n\n";
    t << "| method |";
    for (int tau : pr.taus) t << " tau=" << tau << " |";
    t << "\n|:--|";
    for (size_t i = 0; i < pr.taus.size(); ++i) t << "--:|";
    t << "\n";
    for (size_t m = 0; m < pr.methods.size(); ++m) {
      t << "| " << method_name(pr.methods[m]) << " |";
      for (const auto& r : pr.runs[m]) t << " " << outcome_cell(r) << " |";
      t << "\n";
    }
  }
  return t.str();
}

std::string format_csv(const std::vector<ProblemResults>& rs) {
  std::string out = "problem,method,tau,iteration,suboptimality\n";
  char buf[160];
  for (const auto& pr : rs)
    for (size_t m = 0; m < pr.methods.size(); ++m)
      for (size_t ti = 0; ti < pr.taus.size(); ++ti)
        for (const auto& [t, v] : pr.runs[m][ti].curve) {
          std::snprintf(buf, sizeof buf, "%s,%s,%d,%lld,%.9g\n", pr.problem.name.c_str(),
                        method_key(pr.methods[m]).c_str(), pr.taus[ti], static_cast<long long>(t), v);
          out += buf;
        }
  return out;
}

std::string format_gnuplot(const DelayLabOptions& o, const std::vector<ProblemResults>& rs) {
  const size_t cols = std::size(kAllMethods);
  const size_t rows = std::max<size_t>(rs.size(), 1);
  std::string taus;
  for (size_t i = 0; i < o.taus.size(); ++i) taus += (i ? " " : "") + std::to_string(o.taus[i]);
  std::ostringstream g;
  g << "# pipenag delaylab: f(w) - f* against iterations, from curves.csv in this folder.\n"
    << "# Run in this folder: gnuplot delaylab.gp   (writes delaylab.png)\n"
    << "if (!exists(\"outfile\")) outfile = \"delaylab.png\"\n"
    << "if (strstrt(GPVAL_TERMINALS, \"pngcairo\") > 0) {\n"
    << "  set terminal pngcairo size " << 440 * cols << "," << 400 * rows << " font \"sans,10\" noenhanced\n"
    << "} else {\n"
    << "  set terminal png size " << 440 * cols << "," << 400 * rows << " noenhanced\n"
    << "}\n"
    << "set output outfile\n"
    << "set datafile separator \",\"\n"
    << "set logscale xy\n"
    << "set format y \"1e%T\"\n"
    << "set format x \"%g\"\n"
    << "set xrange [1:" << std::max<int64_t>(o.iters, 10) << "]\n"
    << "set yrange [1e-10:1e7]\n"
    << "set grid\n"
    << "set xlabel \"iteration\"\n"
    << "set ylabel \"f(w) - f*\"\n"
    << "set key bottom left box opaque\n"
    << "target = " << fmt("%g", o.target) << "\n"
    << "taus = " << quote_gp(taus) << "\n"
    << "set multiplot layout " << rows << "," << cols << " title "
    << quote_gp("pipenag delaylab: eta = " + fmt("%g", o.eta_scale) + "/L, gamma = " +
                (o.gamma_theory ? std::string("(t-2)/t") : fmt("%g", o.gamma)) +
                "; curves end at divergence (f - f* > 1e6 (f(w0) - f*)) or below 1e-10")
    << "\n";
  for (const auto& pr : rs)
    for (Method m : kAllMethods) {
      g << "set title " << quote_gp(pr.problem.name + ": " + method_name(m)) << "\n"
        << "plot for [tau in taus] \"curves.csv\" using 4:((strcol(1) eq " << quote_gp(pr.problem.name)
        << " && strcol(2) eq " << quote_gp(method_key(m))
        << " && strcol(3) eq tau) ? $5 : NaN) with lines lw 2 title \"tau=\".tau, \\\n"
        << "     target with lines dt 2 lc \"black\" title \"target\"\n";
    }
  g << "unset multiplot\n";
  return g.str();
}


DelayLabReport run_delaylab(const DelayLabOptions& o) {
  validate(o);
  DelayLabReport rep;
  rep.problems = run_experiments(o);
  rep.table = format_table(o, rep.problems);
  make_dirs(o.out_dir);
  namespace fs = std::filesystem;
  const fs::path dir(o.out_dir);
  const auto put = [&](const std::string& name, const std::string& bytes) {
    const std::string path = (dir / name).string();
    write_file_atomic(path, bytes);
    rep.files.push_back(path);
  };
  put("curves.csv", format_csv(rep.problems));
  put("table.md", rep.table);
  put("delaylab.gp", format_gnuplot(o, rep.problems));
  if (o.plot) {
    const std::string why = render_gnuplot(o.gnuplot, o.out_dir, "delaylab.gp", "delaylab.png");
    if (why.empty())
      rep.files.push_back((dir / "delaylab.png").string());
    else
      rep.warnings.push_back("no PNG: " + why + "; curves.csv, table.md and delaylab.gp are written");
  }
  return rep;
}

}  // namespace pipenag::lab
