// `pipenag delaylab`: the delayed-gradient convex testbed. Deterministic gradients with a fixed
// delay tau on an ill-conditioned quadratic and on an L2-regularised logistic regression, for
// four methods (docs: PAPER.md section 2):
//   delayed GD          w+ = w - eta g(w_{t-tau})
//   delayed heavy ball  w+ = w + gamma (w - w_{t-1}) - eta g(w_{t-tau})
//   delayed NAG         d = gamma (w - w_{t-1});  w+ = w + d - eta g(w_{t-tau} + d_{t-tau})   (Eq. 8, stale)
//   Eq. 10              as delayed NAG with the gradient scaled by (1 - gamma)
// The gradient at update t is taken at the point of update max(t - tau, 0): before tau updates
// have happened the initial point stands in for the missing history. Everything is double
// precision and single-threaded per run, so every number is reproducible bit for bit.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace pipenag::lab {

enum class Method { GD, HeavyBall, NagNoDiscount, Eq10 };

inline constexpr Method kAllMethods[] = {Method::GD, Method::HeavyBall, Method::NagNoDiscount,
                                         Method::Eq10};

// Short key (CSV, plot data): "gd", "heavy-ball", "nag", "eq10".
std::string method_key(Method m);
// Human name (table, plot titles).
std::string method_name(Method m);

// A smooth convex objective: value and gradient of f at a point of `w0.size()` coordinates.
struct Problem {
  std::string name;         // "quadratic", "logistic"
  std::string description;  // one line: dimensions, L, mu, f(w0), f*
  std::vector<double> w0;   // the starting point
  double L = 0;             // smoothness constant: an upper bound on the Hessian's eigenvalues
  double mu = 0;            // strong convexity constant (a lower bound), for the description
  double f_star = 0;        // min f (exact for the quadratic, Newton's method for logistic)
  std::function<double(const double* w)> value;
  std::function<void(const double* w, double* grad)> gradient;
};

// f(w) = 0.5 w^T A w, A = diag(lambda_i), lambda_i log-spaced from L/cond to L (i = 0..dim-1);
// f* = 0; w0 = c * ones with c chosen so that f(w0) = 1 (then the absolute target 1e-3 is also a
// relative one). dim >= 1, L > 0, cond >= 1.
Problem make_quadratic(int dim = 50, double cond = 1e3, double L = 1.0);

// f(w) = (1/n) sum_i log(1 + exp(-y_i x_i.w)) + (lambda/2) |w|^2 on a synthetic dataset from
// `seed`: x_ij = s_j * N(0,1) with column scales s_j log-spaced from 1 down to 1/col_spread,
// y_i = sign(x_i.w_true) with 5% of the labels flipped (overlapping classes, so f* is finite
// even without the L2 term). L = 0.25 * lambda_max(X^T X / n) + lambda (lambda_max by power
// iteration), mu = lambda; w0 = 0; f* by damped Newton to machine precision.
Problem make_logistic(int n = 400, int dim = 20, double lambda = 1e-2, double col_spread = 10.0,
                      uint64_t seed = 1);

struct RunSettings {
  Method method = Method::Eq10;
  int tau = 0;                 // gradient delay, >= 0
  double eta = 1.0;            // step size
  double gamma = 0.99;         // momentum (heavy ball, NAG, Eq. 10); unused by GD
  bool gamma_theory = false;   // gamma_t = max(0, (t-2)/t) instead of the constant (t = 1, 2, ...)
  int64_t iters = 20000;       // budget of updates
  double target = 1e-3;        // f(w) - f* to reach
  double diverge_factor = 1e6; // diverged: f - f* not finite or > diverge_factor * (f(w0) - f*)
  double floor = 1e-10;        // stop early once f - f* < floor (nothing left to plot)
  int64_t dense = 100;         // curve: every iteration up to here, then about 2% apart, and the last
};

enum class Outcome { Reached, Diverged, NotReached };

struct RunResult {
  Outcome outcome = Outcome::NotReached;
  int64_t reached_at = -1;    // first t (updates done) with f(w_t) - f* <= target, else -1
  int64_t diverged_at = -1;   // t at which divergence was detected, else -1
  int64_t last_iter = 0;      // last t evaluated (budget, divergence, or floor)
  double final_subopt = 0;    // f(w_last) - f*
  std::vector<double> w;      // w at last_iter
  std::vector<std::pair<int64_t, double>> curve;  // (t, f(w_t) - f*), subsampled
};

// One run. Error on invalid settings (negative tau, eta <= 0, gamma outside [0, 1), ...).
RunResult run_delayed(const Problem& p, const RunSettings& s);

// The gamma used at update t by the settings (the constant, or max(0, (t-2)/t)).
double gamma_at(const RunSettings& s, int64_t t);

// "1234", "diverged" or "not reached".
std::string outcome_cell(const RunResult& r);

struct DelayLabOptions {
  std::string problem = "both";       // quadratic | logistic | both
  std::vector<int> taus = {0, 1, 2, 4, 8};
  int64_t iters = 20000;
  double eta_scale = 0.1;             // eta = eta_scale / L
  double gamma = 0.99;
  bool gamma_theory = false;
  double target = 1e-3;
  std::string out_dir = "out/delaylab";
  bool plot = true;                   // run gnuplot for the PNG
  std::string gnuplot = "gnuplot";    // program to run (looked up in PATH)
};

// Parses "0,1,2,4,8" (Error naming --taus on anything but distinct non-negative integers).
std::vector<int> parse_taus(const std::string& s);

// Error unless the options make sense (one line naming the option).
void validate(const DelayLabOptions& o);

struct ProblemResults {
  Problem problem;
  double eta = 0;
  std::vector<Method> methods;
  std::vector<int> taus;
  std::vector<std::vector<RunResult>> runs;  // [method][tau index]
};

struct DelayLabReport {
  std::vector<ProblemResults> problems;
  std::string table;                  // markdown, as written to table.md
  std::vector<std::string> files;     // paths written
  std::vector<std::string> warnings;  // one line each (e.g. no gnuplot)
};

// All runs of the options, without writing anything.
std::vector<ProblemResults> run_experiments(const DelayLabOptions& o);

// The markdown table (settings, then per problem one row per method, one column per tau).
std::string format_table(const DelayLabOptions& o, const std::vector<ProblemResults>& rs);
// CSV: problem,method,tau,iteration,suboptimality (one row per curve point).
std::string format_csv(const std::vector<ProblemResults>& rs);
// gnuplot script reading curves.csv (relative to its folder), one row of panels per problem, one
// panel per method, one line per tau; output file `outfile` (gnuplot variable, default
// delaylab.png).
std::string format_gnuplot(const DelayLabOptions& o, const std::vector<ProblemResults>& rs);

// validate + run_experiments + writes <out>/curves.csv, table.md, delaylab.gp (atomically) and,
// when o.plot, delaylab.png by running gnuplot (a warning, not an error, if that fails).
DelayLabReport run_delaylab(const DelayLabOptions& o);

}  // namespace pipenag::lab
