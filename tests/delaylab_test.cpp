// pipenag delaylab: the delayed-gradient methods against hand-written recurrences and known
// stability limits, the expected outcome at the default settings (Eq. 10 converges where NAG
// without the (1-gamma) discount diverges), option errors, and the files the report writes.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <cstdlib>
#include <string>
#include <vector>

#include "lab/delaylab.h"
#include "test_util.h"

namespace {

using namespace pipenag;
using namespace pipenag::lab;
using testutil::error_of;
using testutil::run_command;
using testutil::slurp;
using testutil::spit;
using testutil::TempDirTest;
namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::StartsWith;

RunSettings defaults_for(const Problem& p, Method m, int tau) {
  const DelayLabOptions o;  // the documented defaults of `pipenag delaylab`
  RunSettings s;
  s.method = m;
  s.tau = tau;
  s.eta = o.eta_scale / p.L;
  s.gamma = o.gamma;
  s.iters = o.iters;
  s.target = o.target;
  return s;
}

// The claim at two settings: quadratic with tau = 4 and logistic regression with tau = 8,
// both at the default step eta = 0.1/L and gamma = 0.99.
void expect_paper_behaviour(const Problem& p, int tau) {
  const RunResult eq10 = run_delayed(p, defaults_for(p, Method::Eq10, tau));
  EXPECT_EQ(eq10.outcome, Outcome::Reached) << p.name << " tau=" << tau;
  EXPECT_GT(eq10.reached_at, 0);
  EXPECT_LT(eq10.final_subopt, 1e-3);
  EXPECT_EQ(eq10.diverged_at, -1);

  const RunResult nag = run_delayed(p, defaults_for(p, Method::NagNoDiscount, tau));
  EXPECT_EQ(nag.outcome, Outcome::Diverged) << p.name << " tau=" << tau;
  EXPECT_EQ(outcome_cell(nag), "diverged");
  const double sub0 = p.value(p.w0.data()) - p.f_star;
  EXPECT_TRUE(!std::isfinite(nag.final_subopt) || nag.final_subopt > 1e6 * sub0);

  const RunResult gd0 = run_delayed(p, defaults_for(p, Method::GD, 0));
  EXPECT_EQ(gd0.outcome, Outcome::Reached) << p.name;
  // Without a delay, NAG with the same step converges too: the delay is what breaks it.
  EXPECT_EQ(run_delayed(p, defaults_for(p, Method::NagNoDiscount, 0)).outcome, Outcome::Reached);
}

TEST(DelayLab, QuadraticTau4Eq10ConvergesNagWithoutDiscountDiverges) {
  expect_paper_behaviour(make_quadratic(), 4);
}

TEST(DelayLab, LogisticTau8Eq10ConvergesNagWithoutDiscountDiverges) {
  expect_paper_behaviour(make_logistic(), 8);
}

// x+ = x - a x_{t-1} on f = x^2/2 has characteristic polynomial z^2 - z + a: stable iff a < 1.
// Without delay, x+ = (1 - a) x: stable iff a < 2.
TEST(DelayLab, DelayedGdMatchesTheScalarStabilityLimits) {
  const auto outcome = [](int tau, double a) {
    const Problem p = make_quadratic(1, 1, 1.0);
    RunSettings s;
    s.method = Method::GD;
    s.tau = tau;
    s.eta = a;
    s.iters = 5000;
    return run_delayed(p, s).outcome;
  };
  EXPECT_EQ(outcome(1, 0.9), Outcome::Reached);
  EXPECT_EQ(outcome(1, 1.1), Outcome::Diverged);
  EXPECT_EQ(outcome(0, 1.9), Outcome::Reached);
  EXPECT_EQ(outcome(0, 2.1), Outcome::Diverged);
}

// Before tau updates have happened, every gradient is taken at w0.
TEST(DelayLab, MissingHistoryIsTheInitialPoint) {
  const Problem p = make_quadratic(5, 10.0, 2.0);
  std::vector<double> g0(p.w0.size());
  p.gradient(p.w0.data(), g0.data());
  RunSettings s;
  s.method = Method::GD;
  s.tau = 100;
  s.eta = 0.01;
  s.iters = 7;
  const RunResult r = run_delayed(p, s);
  ASSERT_EQ(r.last_iter, 7);
  for (size_t i = 0; i < p.w0.size(); ++i) EXPECT_NEAR(r.w[i], p.w0[i] - 7 * 0.01 * g0[i], 1e-12);
}

// With gamma = 0, heavy ball, NAG and Eq. 10 are delayed GD.
TEST(DelayLab, ZeroMomentumIsGd) {
  const Problem p = make_quadratic(8, 100.0);
  RunSettings s;
  s.tau = 3;
  s.eta = 0.2;
  s.gamma = 0;
  s.iters = 300;
  s.method = Method::GD;
  const RunResult gd = run_delayed(p, s);
  for (Method m : {Method::HeavyBall, Method::NagNoDiscount, Method::Eq10}) {
    s.method = m;
    const RunResult r = run_delayed(p, s);
    ASSERT_EQ(r.curve.size(), gd.curve.size()) << method_key(m);
    for (size_t i = 0; i < r.curve.size(); ++i) {
      EXPECT_EQ(r.curve[i].first, gd.curve[i].first);
      EXPECT_NEAR(r.curve[i].second, gd.curve[i].second, 1e-12 * gd.curve[i].second) << method_key(m);
    }
  }
}

// The four methods against the equations of PAPER.md written out with the whole history kept.
TEST(DelayLab, MethodsMatchHandWrittenRecurrences) {
  const Problem p = make_logistic(60, 4, 0.05, 3.0, 7);
  const int T = 40;
  for (int tau : {0, 1, 3}) {
    for (Method m : kAllMethods) {
      const double eta = 0.5 / p.L, gamma = 0.9;
      const size_t n = p.w0.size();
      std::vector<std::vector<double>> W{p.w0}, Y;  // W[t]; Y[t] = the gradient point of update t
      std::vector<double> g(n);
      for (int t = 0; t < T; ++t) {
        const std::vector<double>& w = W[t];
        const std::vector<double>& wp = t > 0 ? W[t - 1] : W[0];
        std::vector<double> y(n), next(n);
        for (size_t i = 0; i < n; ++i)
          y[i] = (m == Method::NagNoDiscount || m == Method::Eq10) ? w[i] + gamma * (w[i] - wp[i]) : w[i];
        Y.push_back(y);
        p.gradient(Y[std::max(t - tau, 0)].data(), g.data());
        for (size_t i = 0; i < n; ++i) {
          switch (m) {
            case Method::GD: next[i] = w[i] - eta * g[i]; break;
            case Method::HeavyBall: next[i] = w[i] + gamma * (w[i] - wp[i]) - eta * g[i]; break;
            case Method::NagNoDiscount: next[i] = w[i] + gamma * (w[i] - wp[i]) - eta * g[i]; break;
            case Method::Eq10: next[i] = w[i] + gamma * (w[i] - wp[i]) - eta * (1 - gamma) * g[i]; break;
          }
        }
        W.push_back(next);
      }
      RunSettings s;
      s.method = m;
      s.tau = tau;
      s.eta = eta;
      s.gamma = gamma;
      s.iters = T;
      s.floor = 0;
      const RunResult r = run_delayed(p, s);
      ASSERT_EQ(r.last_iter, T) << method_key(m) << " tau=" << tau;
      for (size_t i = 0; i < n; ++i)
        EXPECT_NEAR(r.w[i], W[T][i], 1e-12 * (1 + std::abs(W[T][i]))) << method_key(m) << " tau=" << tau;
    }
  }
}

TEST(DelayLab, GammaTheorySchedule) {
  RunSettings s;
  s.gamma = 0.5;
  EXPECT_EQ(gamma_at(s, 10), 0.5);
  s.gamma_theory = true;
  EXPECT_EQ(gamma_at(s, 0), 0.0);
  EXPECT_EQ(gamma_at(s, 1), 0.0);
  EXPECT_EQ(gamma_at(s, 2), 0.0);
  EXPECT_DOUBLE_EQ(gamma_at(s, 3), 1.0 / 3);
  EXPECT_DOUBLE_EQ(gamma_at(s, 10), 0.8);
  // With the schedule, Eq. 10 converges on the quadratic at the default step and tau = 4.
  const Problem p = make_quadratic();
  RunSettings e = defaults_for(p, Method::Eq10, 4);
  e.gamma_theory = true;
  EXPECT_EQ(run_delayed(p, e).outcome, Outcome::Reached);
}

TEST(DelayLab, LogisticGradientAndMinimum) {
  const Problem p = make_logistic();
  EXPECT_GT(p.L, p.mu);
  EXPECT_LT(p.f_star, p.value(p.w0.data()));
  // Central differences at an arbitrary point.
  std::vector<double> w(p.w0.size()), g(w.size());
  for (size_t i = 0; i < w.size(); ++i) w[i] = std::sin(1.0 + 3.0 * i);
  p.gradient(w.data(), g.data());
  for (size_t i = 0; i < w.size(); ++i) {
    std::vector<double> a = w, b = w;
    a[i] += 1e-6;
    b[i] -= 1e-6;
    EXPECT_NEAR(g[i], (p.value(a.data()) - p.value(b.data())) / 2e-6, 1e-7) << i;
  }
  // f* is the minimum: long plain GD gets to it and not below it.
  RunSettings s;
  s.method = Method::GD;
  s.eta = 1.0 / p.L;
  s.iters = 20000;
  const RunResult r = run_delayed(p, s);
  EXPECT_LT(r.final_subopt, 1e-10);
  EXPECT_GT(r.final_subopt, -1e-13);
}

TEST(DelayLab, BudgetEndsAsNotReached) {
  const Problem p = make_quadratic();
  RunSettings s = defaults_for(p, Method::GD, 2);
  s.iters = 10;
  const RunResult r = run_delayed(p, s);
  EXPECT_EQ(r.outcome, Outcome::NotReached);
  EXPECT_EQ(outcome_cell(r), "not reached");
  EXPECT_EQ(r.last_iter, 10);
  EXPECT_EQ(r.curve.back().first, 10);
}

TEST(DelayLab, BadSettingsAndOptionsAreErrors) {
  const Problem p = make_quadratic(3);
  RunSettings s;
  s.tau = -1;
  EXPECT_THAT(error_of([&] { run_delayed(p, s); }), HasSubstr("tau"));
  s = RunSettings{};
  s.eta = 0;
  EXPECT_THAT(error_of([&] { run_delayed(p, s); }), HasSubstr("eta"));
  s = RunSettings{};
  s.gamma = 1.0;
  EXPECT_THAT(error_of([&] { run_delayed(p, s); }), HasSubstr("gamma"));

  EXPECT_EQ(parse_taus("0,1,2,4,8"), (std::vector<int>{0, 1, 2, 4, 8}));
  EXPECT_EQ(parse_taus("3"), (std::vector<int>{3}));
  for (const char* bad : {"", "1,", ",1", "1,x", "-1", "1.5", "2,2", "1 ,2", "9999999"})
    EXPECT_THAT(error_of([&] { parse_taus(bad); }), HasSubstr("--taus")) << bad;

  const auto bad_option = [](auto change, const std::string& needle) {
    DelayLabOptions o;
    change(o);
    EXPECT_THAT(error_of([&] { validate(o); }), HasSubstr(needle));
  };
  bad_option([](DelayLabOptions& o) { o.problem = "cubic"; }, "--problem");
  bad_option([](DelayLabOptions& o) { o.taus.clear(); }, "--taus");
  bad_option([](DelayLabOptions& o) { o.taus = {1, 1}; }, "--taus");
  bad_option([](DelayLabOptions& o) { o.iters = 0; }, "--iters");
  bad_option([](DelayLabOptions& o) { o.eta_scale = 0; }, "--eta-scale");
  bad_option([](DelayLabOptions& o) { o.eta_scale = NAN; }, "--eta-scale");
  bad_option([](DelayLabOptions& o) { o.gamma = 1; }, "--gamma");
  bad_option([](DelayLabOptions& o) { o.gamma = -0.1; }, "--gamma");
  bad_option([](DelayLabOptions& o) { o.out_dir = ""; }, "--out");
}

using DelayLabFiles = TempDirTest;

DelayLabOptions small_options(const std::string& out) {
  DelayLabOptions o;
  o.problem = "quadratic";
  o.taus = {0, 4};
  o.iters = 400;
  o.out_dir = out;
  return o;
}

bool have_gnuplot() { return std::system("command -v gnuplot >/dev/null 2>&1") == 0; }

TEST_F(DelayLabFiles, WritesCsvTableScriptAndPng) {
  const DelayLabOptions o = small_options(path("out"));
  const DelayLabReport rep = run_delaylab(o);
  ASSERT_EQ(rep.problems.size(), 1u);
  const std::string csv = slurp(dir_ / "out" / "curves.csv");
  EXPECT_THAT(csv, StartsWith("problem,method,tau,iteration,suboptimality\n"));
  for (const char* key : {"quadratic,gd,0,0,1\n", "quadratic,eq10,4,", "quadratic,nag,4,", "quadratic,heavy-ball,0,"})
    EXPECT_THAT(csv, HasSubstr(key));
  const std::string table = slurp(dir_ / "out" / "table.md");
  EXPECT_EQ(table, rep.table);
  EXPECT_THAT(table, HasSubstr("| method | tau=0 | tau=4 |"));
  EXPECT_THAT(table, HasSubstr("| delayed NAG, no discount (Eq. 8) |"));
  EXPECT_THAT(table, HasSubstr("diverged"));
  EXPECT_THAT(table, HasSubstr("eta = 0.1/L, gamma = 0.99"));
  EXPECT_THAT(slurp(dir_ / "out" / "delaylab.gp"), HasSubstr("\"curves.csv\""));
  const std::string png = slurp(dir_ / "out" / "delaylab.png");
  if (have_gnuplot()) {
    EXPECT_TRUE(rep.warnings.empty()) << rep.warnings.front();
    EXPECT_THAT(png, StartsWith("\x89PNG"));
  } else {
    EXPECT_EQ(rep.warnings.size(), 1u);
  }
  for (const auto& e : fs::directory_iterator(dir_ / "out"))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
}

TEST_F(DelayLabFiles, MissingGnuplotIsAWarning) {
  DelayLabOptions o = small_options(path("out"));
  o.gnuplot = path("no-such-gnuplot");
  const DelayLabReport rep = run_delaylab(o);
  ASSERT_EQ(rep.warnings.size(), 1u);
  EXPECT_THAT(rep.warnings[0], HasSubstr("not found"));
  EXPECT_EQ(rep.warnings[0].find('\n'), std::string::npos);
  EXPECT_TRUE(fs::exists(dir_ / "out" / "curves.csv"));
  EXPECT_TRUE(fs::exists(dir_ / "out" / "table.md"));
  EXPECT_FALSE(fs::exists(dir_ / "out" / "delaylab.png"));
  for (const auto& e : fs::directory_iterator(dir_ / "out"))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();

  o.gnuplot = "false";  // found, but fails
  const DelayLabReport failed = run_delaylab(o);
  ASSERT_EQ(failed.warnings.size(), 1u);
  EXPECT_THAT(failed.warnings[0], HasSubstr("false failed"));
  EXPECT_FALSE(fs::exists(dir_ / "out" / "delaylab.png"));
}

TEST_F(DelayLabFiles, OutputFolderThatIsAFileIsAnError) {
  spit(dir_ / "file", "x");
  const DelayLabOptions o = small_options(path("file"));
  EXPECT_FALSE(error_of([&] { run_delaylab(o); }).empty());
}

TEST_F(DelayLabFiles, ResultsDoNotDependOnThreads) {
  DelayLabOptions o = small_options(path("out"));
  o.problem = "both";
  o.taus = {0, 8};
  o.iters = 200;
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto a = run_experiments(o);
  omp_set_num_threads(3);
  const auto b = run_experiments(o);
  omp_set_num_threads(threads);
  EXPECT_EQ(format_csv(a), format_csv(b));
  EXPECT_EQ(format_table(o, a), format_table(o, b));
}

TEST_F(DelayLabFiles, CommandLine) {
  const auto run = [&](const std::string& args) {
    return run_command(std::string(PIPENAG_BINARY) + " delaylab " + args, dir_);
  };
  const testutil::RunResult ok = run("--problem quadratic --taus 0,4 --iters 300 --out " + path("cli"));
  ASSERT_EQ(ok.code, 0) << ok.err;
  EXPECT_THAT(ok.out, HasSubstr("| method | tau=0 | tau=4 |"));
  EXPECT_THAT(ok.out, HasSubstr("wrote " + path("cli") + "/table.md"));
  EXPECT_TRUE(fs::exists(dir_ / "cli" / "curves.csv"));

  for (const auto& [args, needle] : std::vector<std::pair<std::string, std::string>>{
           {"--problem cubic", "--problem"},
           {"--taus 1,x", "--taus"},
           {"--gamma 1", "--gamma"},
           {"--eta-scale -1", "--eta-scale"},
           {"--iters 0", "--iters"}}) {
    const testutil::RunResult r = run(args + " --out " + path("bad"));
    EXPECT_NE(r.code, 0) << args;
    EXPECT_LT(r.code, 128) << "crashed: " << args;
    EXPECT_THAT(r.err, StartsWith("pipenag: ")) << args;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_THAT(r.err, HasSubstr(needle)) << args;
  }
  EXPECT_FALSE(fs::exists(dir_ / "bad"));
}

}  // namespace
