// The pipeline engine as a library: schedule generators and their validator, the timeline
// simulator, truncation, the sequential and threaded engines over real stage workers (bitwise
// agreement, gradient-accumulation equivalence, delays and weight stashing, memory accounting,
// early stop, failures), and the default partition.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "model/config.h"
#include "pipeline/engine.h"
#include "pipeline/partition.h"
#include "pipeline/schedule.h"
#include "pipeline/stage_worker.h"
#include "pipeline_util.h"
#include "test_util.h"
#include "train/trainer.h"
#include "util/error.h"
#include "util/hash.h"

namespace {

using namespace pipenag;
using ::testing::HasSubstr;
using testutil::error_of;
using testutil::Pipeline;
using testutil::synthetic_batch;
using testutil::tiny_pipeline_config;

constexpr Op F = Op::Forward;
constexpr Op B = Op::Backward;
constexpr Op S = Op::Step;

const ScheduleKind kAllKinds[] = {ScheduleKind::GPipe, ScheduleKind::OneFOneB, ScheduleKind::Async1F1B};

std::string list_str(const std::vector<Action>& l) {
  std::string s;
  for (const Action& a : l)
    s += std::string(a.op == F ? "F" : a.op == B ? "B" : "S") + std::to_string(a.mb) + " ";
  return s;
}

// ---------------------------------------------------------------------------------------------
// 1. Generators

TEST(Schedules, GPipeTwoStagesTwoMicrobatchesByHand) {
  const Schedule s = make_gpipe(2, 2, 1);
  EXPECT_EQ(s.kind, ScheduleKind::GPipe);
  EXPECT_EQ(s.stages, 2);
  EXPECT_EQ(s.microbatches, 2);
  EXPECT_EQ(s.updates, 1);
  const std::vector<Action> want = {{F, 0}, {F, 1}, {B, 0}, {B, 1}, {S, 1}};
  ASSERT_EQ(s.actions.size(), 2u);
  EXPECT_EQ(s.actions[0], want) << list_str(s.actions[0]);
  EXPECT_EQ(s.actions[1], want) << list_str(s.actions[1]);
}

TEST(Schedules, GPipeTwoUpdatesByHand) {
  const Schedule s = make_gpipe(1, 2, 2);
  const std::vector<Action> want = {{F, 0}, {F, 1}, {B, 0}, {B, 1}, {S, 1},
                                    {F, 2}, {F, 3}, {B, 2}, {B, 3}, {S, 3}};
  ASSERT_EQ(s.actions.size(), 1u);
  EXPECT_EQ(s.actions[0], want) << list_str(s.actions[0]);
  EXPECT_EQ(s.num_microbatches(), 4);
  EXPECT_FALSE(s.asynchronous());
}

TEST(Schedules, OneFOneBThreeStagesThreeMicrobatchesByHand) {
  const Schedule s = make_1f1b(3, 3, 1);
  EXPECT_EQ(s.kind, ScheduleKind::OneFOneB);
  ASSERT_EQ(s.actions.size(), 3u);
  const std::vector<std::vector<Action>> want = {
      {{F, 0}, {F, 1}, {F, 2}, {B, 0}, {B, 1}, {B, 2}, {S, 2}},
      {{F, 0}, {F, 1}, {B, 0}, {F, 2}, {B, 1}, {B, 2}, {S, 2}},
      {{F, 0}, {B, 0}, {F, 1}, {B, 1}, {F, 2}, {B, 2}, {S, 2}},
  };
  for (size_t k = 0; k < 3; ++k) EXPECT_EQ(s.actions[k], want[k]) << "stage " << k << ": " << list_str(s.actions[k]);
}

TEST(Schedules, OneFOneBFewerMicrobatchesThanStagesByHand) {
  // Stage 0 of 4 would warm up with 3 forwards, but an update has only 2.
  const Schedule s = make_1f1b(4, 2, 2);
  const std::vector<Action> stage0 = {{F, 0}, {F, 1}, {B, 0}, {B, 1}, {S, 1},
                                      {F, 2}, {F, 3}, {B, 2}, {B, 3}, {S, 3}};
  const std::vector<Action> stage3 = {{F, 0}, {B, 0}, {F, 1}, {B, 1}, {S, 1},
                                      {F, 2}, {B, 2}, {F, 3}, {B, 3}, {S, 3}};
  EXPECT_EQ(s.actions[0], stage0) << list_str(s.actions[0]);
  EXPECT_EQ(s.actions[3], stage3) << list_str(s.actions[3]);
}

TEST(Schedules, AsyncOneFOneBThreeStagesFourUpdatesByHand) {
  const Schedule s = make_async_1f1b(3, 4);
  EXPECT_EQ(s.kind, ScheduleKind::Async1F1B);
  EXPECT_TRUE(s.asynchronous());
  EXPECT_EQ(s.microbatches, 1);
  EXPECT_EQ(s.updates, 4);
  ASSERT_EQ(s.actions.size(), 3u);
  const std::vector<std::vector<Action>> want = {
      {{F, 0}, {F, 1}, {F, 2}, {B, 0}, {S, 0}, {F, 3}, {B, 1}, {S, 1}, {B, 2}, {S, 2}, {B, 3}, {S, 3}},
      {{F, 0}, {F, 1}, {B, 0}, {S, 0}, {F, 2}, {B, 1}, {S, 1}, {F, 3}, {B, 2}, {S, 2}, {B, 3}, {S, 3}},
      {{F, 0}, {B, 0}, {S, 0}, {F, 1}, {B, 1}, {S, 1}, {F, 2}, {B, 2}, {S, 2}, {F, 3}, {B, 3}, {S, 3}},
  };
  for (size_t k = 0; k < 3; ++k) EXPECT_EQ(s.actions[k], want[k]) << "stage " << k << ": " << list_str(s.actions[k]);
}

TEST(Schedules, AsyncWithFewerUpdatesThanWarmup) {
  const Schedule s = make_async_1f1b(4, 2);
  const std::vector<Action> stage0 = {{F, 0}, {F, 1}, {B, 0}, {S, 0}, {B, 1}, {S, 1}};
  EXPECT_EQ(s.actions[0], stage0) << list_str(s.actions[0]);
  EXPECT_NO_THROW(validate_schedule(s));
}

TEST(Schedules, MakeScheduleDispatchesAndNamesRoundTrip) {
  EXPECT_EQ(make_schedule(ScheduleKind::GPipe, 3, 2, 2).actions, make_gpipe(3, 2, 2).actions);
  EXPECT_EQ(make_schedule(ScheduleKind::OneFOneB, 3, 2, 2).actions, make_1f1b(3, 2, 2).actions);
  // async-1f1b ignores M: one micro-batch per update.
  const Schedule a = make_schedule(ScheduleKind::Async1F1B, 3, 4, 5);
  EXPECT_EQ(a.actions, make_async_1f1b(3, 5).actions);
  EXPECT_EQ(a.microbatches, 1);
  for (auto k : kAllKinds) EXPECT_EQ(parse_schedule_kind(schedule_name(k)), k);
  EXPECT_EQ(schedule_name(ScheduleKind::GPipe), "gpipe");
  EXPECT_EQ(schedule_name(ScheduleKind::OneFOneB), "1f1b");
  EXPECT_EQ(schedule_name(ScheduleKind::Async1F1B), "async-1f1b");
  EXPECT_THAT(error_of([] { parse_schedule_kind("zigzag"); }), HasSubstr("zigzag"));
  EXPECT_THAT(error_of([] { make_gpipe(0, 1, 1); }), HasSubstr("pipeline.stages"));
  EXPECT_THAT(error_of([] { make_1f1b(2, 0, 1); }), HasSubstr("pipeline.microbatches"));
}

TEST(Schedules, EveryGeneratedScheduleValidatesAndHasTheExpectedSlots) {
  for (int P = 1; P <= 5; ++P)
    for (int M = 1; M <= 4; ++M)
      for (int64_t U = 1; U <= 6; ++U) {
        const Schedule g = make_gpipe(P, M, U), o = make_1f1b(P, M, U);
        SCOPED_TRACE("P=" + std::to_string(P) + " M=" + std::to_string(M) + " U=" + std::to_string(U));
        EXPECT_NO_THROW(validate_schedule(g));
        EXPECT_NO_THROW(validate_schedule(o));
        const auto fg = max_in_flight(g), fo = max_in_flight(o);
        ASSERT_EQ(fg.size(), static_cast<size_t>(P));
        ASSERT_EQ(fo.size(), static_cast<size_t>(P));
        for (int k = 0; k < P; ++k) {
          EXPECT_EQ(fg[static_cast<size_t>(k)], M) << "gpipe stage " << k;
          EXPECT_EQ(fo[static_cast<size_t>(k)], std::min(M, P - k)) << "1f1b stage " << k;
        }
        if (M == 1) {
          const Schedule a = make_async_1f1b(P, U);
          EXPECT_NO_THROW(validate_schedule(a));
          const auto fa = max_in_flight(a);
          ASSERT_EQ(fa.size(), static_cast<size_t>(P));
          for (int k = 0; k < P; ++k)
            EXPECT_EQ(fa[static_cast<size_t>(k)], std::min<int64_t>(P - k, U)) << "async stage " << k;
        }
      }
}

TEST(Schedules, StageDelays) {
  for (int P = 1; P <= 6; ++P)
    for (int k = 0; k < P; ++k) {
      EXPECT_EQ(stage_delay(ScheduleKind::Async1F1B, P, k), P - 1 - k);
      EXPECT_EQ(stage_delay(ScheduleKind::GPipe, P, k), 0);
      EXPECT_EQ(stage_delay(ScheduleKind::OneFOneB, P, k), 0);
    }
}

TEST(Schedules, AsyncVersionsAreDelayedByTauOnTheForwardAndCurrentOnTheBackward) {
  for (int P = 1; P <= 5; ++P)
    for (int64_t N : {1, 3, 9}) {
      const Versions v = schedule_versions(make_async_1f1b(P, N));
      ASSERT_EQ(v.forward.size(), static_cast<size_t>(P));
      ASSERT_EQ(v.backward.size(), static_cast<size_t>(P));
      for (int k = 0; k < P; ++k) {
        const auto ks = static_cast<size_t>(k);
        ASSERT_EQ(v.forward[ks].size(), static_cast<size_t>(N));
        for (int64_t j = 0; j < N; ++j) {
          const auto js = static_cast<size_t>(j);
          EXPECT_EQ(v.forward[ks][js], std::max<int64_t>(0, j - (P - 1 - k)))
              << "P=" << P << " k=" << k << " mb=" << j;
          EXPECT_EQ(v.backward[ks][js], j) << "P=" << P << " k=" << k << " mb=" << j;
        }
      }
    }
}

TEST(Schedules, SyncVersionsAreTheUpdateIndexForBothPasses) {
  for (auto kind : {ScheduleKind::GPipe, ScheduleKind::OneFOneB}) {
    const int P = 3, M = 2;
    const Versions v = schedule_versions(make_schedule(kind, P, M, 3));
    for (int k = 0; k < P; ++k)
      for (int64_t j = 0; j < 6; ++j) {
        EXPECT_EQ(v.forward[static_cast<size_t>(k)][static_cast<size_t>(j)], j / M);
        EXPECT_EQ(v.backward[static_cast<size_t>(k)][static_cast<size_t>(j)], j / M);
      }
  }
}

TEST(Schedules, AsyncWithoutStepsIsOneFOneBWithOneUpdate) {
  // Dropping the steps of async-1f1b(P, N) leaves the forward/backward order of one 1f1b update
  // with N micro-batches (the reason their timelines agree when a step costs nothing).
  for (int P = 1; P <= 5; ++P)
    for (int N : {1, 2, 5, 8}) {
      const Schedule a = make_async_1f1b(P, N), o = make_1f1b(P, N, 1);
      for (int k = 0; k < P; ++k) {
        std::vector<Action> fa, fo;
        for (const Action& x : a.actions[static_cast<size_t>(k)])
          if (x.op != S) fa.push_back(x);
        for (const Action& x : o.actions[static_cast<size_t>(k)])
          if (x.op != S) fo.push_back(x);
        EXPECT_EQ(fa, fo) << "P=" << P << " N=" << N << " k=" << k;
      }
    }
}

TEST(Schedules, DescribeNamesDelaysAndUtilisation) {
  const std::string d = describe_schedule(make_async_1f1b(3, 6));
  EXPECT_THAT(d, HasSubstr("async-1f1b"));
  EXPECT_THAT(d, HasSubstr("stage 0: tau=2"));
  EXPECT_THAT(d, HasSubstr("stage 1: tau=1"));
  EXPECT_THAT(d, HasSubstr("stage 2: tau=0"));
  const std::string g = describe_schedule(make_gpipe(3, 2, 1));
  EXPECT_THAT(g, HasSubstr("stage 0: tau=0"));
  EXPECT_THAT(g, HasSubstr("utilisation 50.0%"));  // M/(M+P-1) = 2/4
}

// ---------------------------------------------------------------------------------------------
// 2. Validator

Schedule with_stage(Schedule s, int k, std::vector<Action> list) {
  s.actions[static_cast<size_t>(k)] = std::move(list);
  return s;
}

TEST(Validator, RejectsBackwardBeforeForward) {
  const Schedule s = with_stage(make_gpipe(2, 1, 1), 0, {{B, 0}, {F, 0}, {S, 0}});
  const std::string e = error_of([&] { validate_schedule(s); });
  EXPECT_THAT(e, HasSubstr("stage 0"));
  EXPECT_THAT(e, HasSubstr("Backward(0) comes before its forward"));
}

TEST(Validator, RejectsAMicrobatchNeverForwardedOnOneStage) {
  const Schedule s = with_stage(make_async_1f1b(2, 2), 1, {{F, 0}, {B, 0}, {S, 0}});
  const std::string e = error_of([&] { validate_schedule(s); });
  EXPECT_THAT(e, HasSubstr("stage 1"));
  EXPECT_THAT(e, HasSubstr("micro-batch 1 is never forwarded"));
}

TEST(Validator, RejectsAMicrobatchNeverBackwarded) {
  // Forwarded but never backwarded (and the schedule ends early).
  const Schedule s = with_stage(make_async_1f1b(1, 2), 0, {{F, 0}, {F, 1}, {B, 0}, {S, 0}});
  const std::string e = error_of([&] { validate_schedule(s); });
  EXPECT_THAT(e, HasSubstr("stage 0"));
  EXPECT_THAT(e, HasSubstr("micro-batch 1 is never backwarded"));
}

TEST(Validator, RejectsADuplicateForward) {
  const Schedule s = with_stage(make_gpipe(2, 2, 1), 1, {{F, 0}, {F, 1}, {F, 1}, {B, 0}, {B, 1}, {S, 1}});
  const std::string e = error_of([&] { validate_schedule(s); });
  EXPECT_THAT(e, HasSubstr("stage 1"));
  EXPECT_THAT(e, HasSubstr("Forward(1) appears twice"));
}

TEST(Validator, RejectsADuplicateBackward) {
  const Schedule s = with_stage(make_gpipe(1, 2, 1), 0, {{F, 0}, {F, 1}, {B, 0}, {B, 0}, {B, 1}, {S, 1}});
  EXPECT_THAT(error_of([&] { validate_schedule(s); }), HasSubstr("Backward(0) appears twice"));
}

TEST(Validator, RejectsBackwardsOutOfOrder) {
  const Schedule s = with_stage(make_gpipe(2, 2, 1), 0, {{F, 0}, {F, 1}, {B, 1}, {B, 0}, {S, 1}});
  const std::string e = error_of([&] { validate_schedule(s); });
  EXPECT_THAT(e, HasSubstr("stage 0"));
  EXPECT_THAT(e, HasSubstr("Backward(1) is out of order"));
}

TEST(Validator, RejectsAStepInTheWrongPlace) {
  // Before the last backward of its update.
  const Schedule s = with_stage(make_gpipe(1, 2, 1), 0, {{F, 0}, {F, 1}, {B, 0}, {S, 1}, {B, 1}});
  EXPECT_THAT(error_of([&] { validate_schedule(s); }), HasSubstr("Step(1) does not follow exactly the backwards"));
  // Naming a micro-batch that does not end an update.
  const Schedule t = with_stage(make_gpipe(1, 2, 1), 0, {{F, 0}, {F, 1}, {B, 0}, {B, 1}, {S, 0}});
  EXPECT_THAT(error_of([&] { validate_schedule(t); }), HasSubstr("Step(0)"));
  // A missing step: fewer updates than the schedule claims.
  const Schedule u = with_stage(make_gpipe(1, 2, 1), 0, {{F, 0}, {F, 1}, {B, 0}, {B, 1}});
  EXPECT_THAT(error_of([&] { validate_schedule(u); }), HasSubstr("0 updates, expected 1"));
}

TEST(Validator, RejectsASynchronousForwardBeforeThePreviousStep) {
  const Schedule s = with_stage(make_gpipe(1, 2, 2), 0,
                                {{F, 0}, {F, 1}, {B, 0}, {B, 1}, {F, 2}, {S, 1}, {F, 3}, {B, 2}, {B, 3}, {S, 3}});
  const std::string e = error_of([&] { validate_schedule(s); });
  EXPECT_THAT(e, HasSubstr("Forward(2) runs after 0 updates in a synchronous schedule"));
  // The same order is fine for async-1f1b (forwards run ahead of steps there).
  EXPECT_NO_THROW(validate_schedule(make_async_1f1b(3, 3)));
}

TEST(Validator, RejectsTheWrongNumberOfStageLists) {
  Schedule s = make_gpipe(3, 1, 1);
  s.actions.pop_back();
  EXPECT_THAT(error_of([&] { validate_schedule(s); }), HasSubstr("one action list per stage"));
  Schedule t = make_gpipe(2, 1, 1);
  t.actions.push_back(t.actions[0]);
  EXPECT_THAT(error_of([&] { validate_schedule(t); }), HasSubstr("one action list per stage"));
}

TEST(Validator, RejectsIdsOutOfRange) {
  const Schedule s = with_stage(make_gpipe(1, 1, 1), 0, {{F, 0}, {F, 5}, {B, 0}, {S, 0}});
  EXPECT_THAT(error_of([&] { validate_schedule(s); }), HasSubstr("Forward(5) is outside micro-batches 0..0"));
  const Schedule t = with_stage(make_gpipe(1, 1, 1), 0, {{F, -1}, {F, 0}, {B, 0}, {S, 0}});
  EXPECT_THAT(error_of([&] { validate_schedule(t); }), HasSubstr("outside"));
}

TEST(Validator, RejectsADeadlockBetweenTwoStages) {
  // Each list is fine on its own; together stage 0 waits for Backward(0) from stage 1, which
  // first needs Forward(1) from stage 0, which comes after stage 0's Backward(0).
  Schedule s = make_gpipe(2, 2, 1);
  s.actions[0] = {{F, 0}, {B, 0}, {F, 1}, {B, 1}, {S, 1}};
  s.actions[1] = {{F, 0}, {F, 1}, {B, 0}, {B, 1}, {S, 1}};
  const std::string e = error_of([&] { validate_schedule(s); });
  EXPECT_THAT(e, HasSubstr("deadlock"));
  EXPECT_THAT(e, HasSubstr("stage 0"));
  EXPECT_THAT(error_of([&] { simulate(s, 1.0, 2.0, 0.0); }), HasSubstr("deadlock"));
}

TEST(Validator, RejectsAnAsyncScheduleWithoutWarmup) {
  // Stage 0 waits for the gradient of micro-batch 0 before forwarding micro-batch 1, which stage
  // 1 needs before it backwards micro-batch 0.
  Schedule s = make_async_1f1b(2, 2);
  s.actions[0] = {{F, 0}, {B, 0}, {S, 0}, {F, 1}, {B, 1}, {S, 1}};
  s.actions[1] = {{F, 0}, {F, 1}, {B, 0}, {S, 0}, {B, 1}, {S, 1}};
  EXPECT_THAT(error_of([&] { validate_schedule(s); }), HasSubstr("deadlock"));
}

TEST(Validator, RejectsAStageRunningMoreUpdatesThanTheSchedule) {
  Schedule s = make_async_1f1b(2, 3);
  s.updates = 2;  // now micro-batch 2 is out of range
  EXPECT_THAT(error_of([&] { validate_schedule(s); }), HasSubstr("outside"));
}

// ---------------------------------------------------------------------------------------------
// 3. Simulator

TEST(Simulate, SyncUtilisationIsMOverMPlusPMinusOne) {
  for (auto kind : {ScheduleKind::GPipe, ScheduleKind::OneFOneB})
    for (int P = 1; P <= 5; ++P)
      for (int M : {1, 2, 3, 4, 8})
        for (int64_t U : {1, 3}) {
          const Timeline t = simulate(make_schedule(kind, P, M, U), 1.0, 2.0, 0.0);
          const double want = static_cast<double>(M) / (M + P - 1);
          SCOPED_TRACE(std::string(schedule_name(kind)) + " P=" + std::to_string(P) + " M=" +
                       std::to_string(M) + " U=" + std::to_string(U));
          EXPECT_NEAR(t.utilization(), want, 1e-12);
          // A flush per update: each update takes (M + P - 1) forward and backward slots.
          EXPECT_DOUBLE_EQ(t.makespan, static_cast<double>(U) * 3.0 * (M + P - 1));
          ASSERT_EQ(t.busy.size(), static_cast<size_t>(P));
          for (double b : t.busy) EXPECT_DOUBLE_EQ(b, static_cast<double>(U) * M * 3.0);
        }
}

TEST(Simulate, AsyncUtilisationTendsToOne) {
  // With free steps async-1f1b(P, N) runs the forwards and backwards of one 1f1b update of N
  // micro-batches, so its utilisation is N / (N + P - 1).
  for (int P = 1; P <= 5; ++P)
    for (int64_t N : {1, 4, 20, 200}) {
      const Timeline t = simulate(make_async_1f1b(P, N), 1.0, 2.0, 0.0);
      EXPECT_NEAR(t.utilization(), static_cast<double>(N) / static_cast<double>(N + P - 1), 1e-12)
          << "P=" << P << " N=" << N;
    }
  EXPECT_GT(simulate(make_async_1f1b(4, 200), 1.0, 2.0, 0.0).utilization(), 0.95);
  // Much better than the synchronous schedules for the same micro-batches per update.
  EXPECT_LT(simulate(make_gpipe(4, 1, 200), 1.0, 2.0, 0.0).utilization(), 0.26);
}

TEST(Simulate, RespectsDependenciesAndStageOrder) {
  const Schedule s = make_1f1b(3, 4, 2);
  const Timeline t = simulate(s, 1.0, 2.0, 0.5);
  size_t n = 0;
  for (const auto& l : s.actions) n += l.size();
  ASSERT_EQ(t.actions.size(), n);
  // Forward of mb on stage k starts after its forward on k-1 ended; backward after k+1's.
  auto find = [&](int k, Op op, int64_t mb) -> const TimedAction& {
    for (const auto& a : t.actions)
      if (a.stage == k && a.action.op == op && a.action.mb == mb) return a;
    ADD_FAILURE() << "missing action";
    return t.actions.front();
  };
  for (int k = 0; k < 3; ++k)
    for (int64_t mb = 0; mb < 8; ++mb) {
      if (k > 0) {
        EXPECT_GE(find(k, F, mb).start, find(k - 1, F, mb).end);
      }
      if (k < 2) {
        EXPECT_GE(find(k, B, mb).start, find(k + 1, B, mb).end);
      }
      EXPECT_DOUBLE_EQ(find(k, F, mb).end - find(k, F, mb).start, 1.0);
      EXPECT_DOUBLE_EQ(find(k, B, mb).end - find(k, B, mb).start, 2.0);
    }
  // Busy per stage: 8 forwards, 8 backwards, 2 steps.
  for (double b : t.busy) EXPECT_DOUBLE_EQ(b, 8 * 1.0 + 8 * 2.0 + 2 * 0.5);
  // Per-stage costs: a slow stage 1 stretches the makespan.
  const Timeline slow = simulate(s, {1.0, 3.0, 1.0}, {2.0, 6.0, 2.0}, {0.0, 0.0, 0.0});
  EXPECT_GT(slow.makespan, simulate(s, 1.0, 2.0, 0.0).makespan);
}

// ---------------------------------------------------------------------------------------------
// 4. Truncation

TEST(Truncate, AsyncTruncatedIsAsyncWithFewerUpdates) {
  for (int P = 1; P <= 5; ++P)
    for (int64_t N : {1, 3, 7, 12})
      for (int64_t n = 0; n <= N; ++n) {
        const Schedule t = truncate_schedule(make_async_1f1b(P, N), n);
        const Schedule want = make_async_1f1b(P, n);
        EXPECT_EQ(t.updates, n);
        EXPECT_EQ(t.actions, want.actions) << "P=" << P << " N=" << N << " n=" << n;
        if (n > 0) {
          EXPECT_NO_THROW(validate_schedule(t));
        }
      }
}

TEST(Truncate, SyncAtUpdateBoundariesIsFewerUpdates) {
  for (auto kind : {ScheduleKind::GPipe, ScheduleKind::OneFOneB})
    for (int P = 1; P <= 4; ++P)
      for (int M = 1; M <= 3; ++M)
        for (int64_t u = 0; u <= 4; ++u) {
          const Schedule t = truncate_schedule(make_schedule(kind, P, M, 4), u * M);
          EXPECT_EQ(t.updates, u);
          EXPECT_EQ(t.actions, make_schedule(kind, P, M, u).actions)
              << schedule_name(kind) << " P=" << P << " M=" << M << " u=" << u;
        }
}

TEST(Truncate, RejectsCutsOffAnUpdateBoundary) {
  const Schedule g = make_gpipe(2, 2, 3);
  EXPECT_THAT(error_of([&] { truncate_schedule(g, 3); }), HasSubstr("not an update boundary"));
  EXPECT_THAT(error_of([&] { truncate_schedule(g, 8); }), HasSubstr("not an update boundary"));
  EXPECT_THAT(error_of([&] { truncate_schedule(g, -2); }), HasSubstr("not an update boundary"));
  EXPECT_NO_THROW(truncate_schedule(g, 6));
}

// ---------------------------------------------------------------------------------------------
// Engines over real stage workers

Config tiny_config(int P, ScheduleKind kind, int M, bool stash, bool recompute, double clip = 1.0) {
  return tiny_pipeline_config(P, std::string(schedule_name(kind)), M, stash, recompute, clip, 2, 50);
}



struct Outcome {
  std::vector<std::vector<float>> params;
  std::vector<double> losses;  // last stage, per update
  RunStats stats;
};

Outcome run(Pipeline& pl, const Schedule& s, EngineKind kind, std::function<bool()> stop = {},
            std::function<void(int, StageWorker&)> on_step = {}) {
  EngineOptions eo;
  eo.kind = kind;
  eo.blas_threads = 1;
  EngineHooks hooks;
  Outcome o;
  const int P = s.stages;
  hooks.on_step = [&](int k, StageWorker& w, const RunMonitor&) {
    if (k == P - 1) o.losses.push_back(w.last_update_loss());
    if (on_step) on_step(k, w);
  };
  hooks.stop_requested = std::move(stop);
  o.stats = run_schedule(s, pl.ws, eo, hooks);
  o.params = pl.params();
  return o;
}

Outcome run_fresh(const Config& c, int64_t updates, EngineKind kind) {
  Pipeline pl(c);
  const Schedule s = pl.schedule(updates);
  validate_schedule(s);
  return run(pl, s, kind);
}

bool bitwise_equal(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].size() != b[i].size()) return false;
    if (!a[i].empty() && std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(float)) != 0) return false;
  }
  return true;
}

bool bitwise_equal(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
}

// Runs f on another thread; a hang longer than `limit` ends the test process with a message
// instead of blocking the suite forever.
void within(std::chrono::seconds limit, const std::function<void()>& f) {
  std::promise<void> done;
  auto fut = done.get_future();
  std::thread t([&] {
    try {
      f();
      done.set_value();
    } catch (...) {
      done.set_exception(std::current_exception());
    }
  });
  if (fut.wait_for(limit) != std::future_status::ready) {
    std::fprintf(stderr, "FATAL: the engine hung for more than %lld s\n", static_cast<long long>(limit.count()));
    std::fflush(stderr);
    std::_Exit(3);
  }
  t.join();
  fut.get();
}

// 5. Sequential and threads engines, recompute on and off: the same bits.
struct EngineCase {
  int P;
  ScheduleKind kind;
  bool stash;
};

std::string case_name(const EngineCase& c) {
  std::string n = "P" + std::to_string(c.P) + "_";
  n += c.kind == ScheduleKind::GPipe ? "gpipe" : c.kind == ScheduleKind::OneFOneB ? "1f1b" : "async";
  return n + (c.stash ? "_stash" : "_nostash");
}
void PrintTo(const EngineCase& c, std::ostream* os) { *os << case_name(c); }

class EnginesAgree : public ::testing::TestWithParam<EngineCase> {};

int64_t updates_for(ScheduleKind kind) { return kind == ScheduleKind::Async1F1B ? 8 : 3; }

TEST_P(EnginesAgree, SequentialAndThreadsGiveTheSameBits) {
  const EngineCase c = GetParam();
  const int M = 2;
  const int64_t U = updates_for(c.kind);
  const Pipeline init(tiny_config(c.P, c.kind, M, c.stash, false));
  const auto initial = init.params();
  for (bool recompute : {false, true}) {
    SCOPED_TRACE(recompute ? "recompute on" : "recompute off");
    const Config cfg = tiny_config(c.P, c.kind, M, c.stash, recompute);
    const Outcome seq = run_fresh(cfg, U, EngineKind::Sequential);
    ASSERT_EQ(seq.losses.size(), static_cast<size_t>(U));
    EXPECT_EQ(seq.stats.updates, U);
    EXPECT_EQ(seq.stats.microbatches, U * (c.kind == ScheduleKind::Async1F1B ? 1 : M));
    for (double l : seq.losses) {
      EXPECT_TRUE(std::isfinite(l));
      EXPECT_GT(l, 0.0);
    }
    // Training moved every stage's weights.
    for (size_t k = 0; k < initial.size(); ++k)
      EXPECT_NE(std::memcmp(initial[k].data(), seq.params[k].data(), initial[k].size() * sizeof(float)), 0)
          << "stage " << k << " did not change";

    const Outcome thr = run_fresh(cfg, U, EngineKind::Threads);
    EXPECT_EQ(thr.stats.updates, U);
    EXPECT_TRUE(bitwise_equal(thr.params, seq.params)) << "threads weights differ from sequential";
    EXPECT_TRUE(bitwise_equal(thr.losses, seq.losses)) << "threads losses differ from sequential";
    for (const Outcome* o : {&seq, &thr}) {
      ASSERT_EQ(o->stats.busy.size(), static_cast<size_t>(c.P));
      ASSERT_EQ(o->stats.wait.size(), static_cast<size_t>(c.P));
      EXPECT_GT(o->stats.utilization, 0.0);
      EXPECT_LE(o->stats.utilization, 1.0 + 1e-9);
    }
  }
}

// Recomputation reruns the forward under the weights the backward uses. With stashing (or a
// synchronous schedule, or one stage) those are the forward's own weights, so the results are
// bitwise those of keeping the activations. Without stashing on P >= 2 the issue defines the
// recomputed forward to run under the *current* weights: a gradient at the current weights on a
// stale input, which differs from PipeDream's (old activations, new weights) -- the test checks
// that it does differ, so the flag cannot silently stop reaching the stage.
TEST_P(EnginesAgree, RecomputeGivesTheSameBitsAsKeepingActivations) {
  const EngineCase c = GetParam();
  const int M = 2;
  const int64_t U = updates_for(c.kind);
  const Outcome keep = run_fresh(tiny_config(c.P, c.kind, M, c.stash, false), U, EngineKind::Sequential);
  const Outcome rc = run_fresh(tiny_config(c.P, c.kind, M, c.stash, true), U, EngineKind::Sequential);
  if (c.kind == ScheduleKind::Async1F1B && !c.stash && c.P > 1) {
    EXPECT_FALSE(bitwise_equal(rc.params, keep.params))
        << "recompute without stashing should run the forward again under the current weights";
    return;
  }
  EXPECT_TRUE(bitwise_equal(rc.params, keep.params)) << "weights differ with recompute";
  EXPECT_TRUE(bitwise_equal(rc.losses, keep.losses)) << "losses differ with recompute";
}

std::vector<EngineCase> engine_cases() {
  std::vector<EngineCase> v;
  for (int P = 1; P <= 4; ++P) {
    v.push_back({P, ScheduleKind::GPipe, true});
    v.push_back({P, ScheduleKind::OneFOneB, true});
    v.push_back({P, ScheduleKind::Async1F1B, true});
    v.push_back({P, ScheduleKind::Async1F1B, false});
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(All, EnginesAgree, ::testing::ValuesIn(engine_cases()),
                         [](const ::testing::TestParamInfo<EngineCase>& i) { return case_name(i.param); });

TEST(Engines, StashingChangesAsyncResultsOnlyWithSeveralStages) {
  // A check that the flag reaches the workers: with P >= 2 the backward of a stale micro-batch
  // runs on other weights without stashing; with P = 1 there is nothing stale.
  const int64_t U = 5;
  const Outcome on = run_fresh(tiny_config(3, ScheduleKind::Async1F1B, 1, true, false), U, EngineKind::Sequential);
  const Outcome off = run_fresh(tiny_config(3, ScheduleKind::Async1F1B, 1, false, false), U, EngineKind::Sequential);
  EXPECT_FALSE(bitwise_equal(on.params, off.params));
  // The first micro-batch is forwarded on the initial weights everywhere: same first loss.
  ASSERT_FALSE(on.losses.empty());
  EXPECT_EQ(on.losses[0], off.losses[0]);
  const Outcome on1 = run_fresh(tiny_config(1, ScheduleKind::Async1F1B, 1, true, false), U, EngineKind::Sequential);
  const Outcome off1 = run_fresh(tiny_config(1, ScheduleKind::Async1F1B, 1, false, false), U, EngineKind::Sequential);
  EXPECT_TRUE(bitwise_equal(on1.params, off1.params));
}

TEST(Engines, AsyncDiffersFromSynchronousWithSeveralStages) {
  // async-1f1b with P = 1 is plain SGD-style training, the same as gpipe with M = 1; with P = 3
  // the delays change the result.
  const int64_t U = 4;
  const auto a1 = run_fresh(tiny_config(1, ScheduleKind::Async1F1B, 1, true, false), U, EngineKind::Sequential);
  const auto g1 = run_fresh(tiny_config(1, ScheduleKind::GPipe, 1, true, false), U, EngineKind::Sequential);
  EXPECT_TRUE(bitwise_equal(a1.params, g1.params));
  EXPECT_TRUE(bitwise_equal(a1.losses, g1.losses));
  const auto a3 = run_fresh(tiny_config(3, ScheduleKind::Async1F1B, 1, true, false), U, EngineKind::Sequential);
  const auto g3 = run_fresh(tiny_config(3, ScheduleKind::GPipe, 1, true, false), U, EngineKind::Sequential);
  std::vector<float> fa, fg;
  for (const auto& p : a3.params) fa.insert(fa.end(), p.begin(), p.end());
  for (const auto& p : g3.params) fg.insert(fg.end(), p.begin(), p.end());
  ASSERT_EQ(fa.size(), fg.size());
  EXPECT_NE(std::memcmp(fa.data(), fg.data(), fa.size() * sizeof(float)), 0);
}

// 6. Synchronous schedules are gradient accumulation over the micro-batches of an update,
// whatever the cut. train.clip = 0 here: each stage clips by its own gradient norm (as the
// reference implementation does), which differs from clipping the whole model's gradient by the
// global norm, so with clipping on a P-stage run is deliberately not the single-stage run.
TEST(Engines, SyncSchedulesEqualSingleStageGradientAccumulation) {
  const int M = 3;
  const int64_t U = 3;
  Pipeline whole(tiny_config(1, ScheduleKind::GPipe, M, true, false, 0.0));
  const Outcome ref = run(whole, whole.schedule(U), EngineKind::Sequential);
  const std::vector<float> want = whole.flat_params();
  ASSERT_EQ(ref.losses.size(), static_cast<size_t>(U));
  for (auto kind : {ScheduleKind::GPipe, ScheduleKind::OneFOneB})
    for (int P = 1; P <= 4; ++P) {
      if (P == 1 && kind == ScheduleKind::GPipe) continue;
      SCOPED_TRACE(std::string(schedule_name(kind)) + " P=" + std::to_string(P));
      Pipeline pl(tiny_config(P, kind, M, true, false, 0.0));
      const Outcome o = run(pl, pl.schedule(U), P % 2 ? EngineKind::Sequential : EngineKind::Threads);
      const std::vector<float> got = pl.flat_params();
      ASSERT_EQ(got.size(), want.size());
      EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)), 0) << "weights differ";
      EXPECT_TRUE(bitwise_equal(o.losses, ref.losses)) << "losses differ";
    }
}

// 7. Delays and weight stashing, from the versions the workers record.
TEST(Engines, AsyncDelaysAndStashedVersions) {
  const int P = 4;
  const int64_t N = 10, base = 3;
  for (bool stash : {true, false})
    for (EngineKind e : {EngineKind::Sequential, EngineKind::Threads}) {
      SCOPED_TRACE(std::string(stash ? "stash " : "no stash ") + std::string(engine_name(e)));
      Pipeline pl(tiny_config(P, ScheduleKind::Async1F1B, 1, stash, false), base);
      run(pl, pl.schedule(N), e);
      for (int k = 0; k < P; ++k) {
        const StageWorker& w = *pl.ws[static_cast<size_t>(k)];
        const int64_t tau = P - 1 - k;
        EXPECT_EQ(w.options().delay, tau);
        EXPECT_EQ(w.version(), base + N);
        const auto& rec = w.records();
        ASSERT_EQ(rec.size(), static_cast<size_t>(N)) << "stage " << k;
        for (int64_t j = 0; j < N; ++j) {
          const VersionRecord& r = rec[static_cast<size_t>(j)];
          ASSERT_EQ(r.mb, j) << "backwards run in micro-batch order";
          const int64_t update = base + j;  // the update micro-batch j's gradient enters
          EXPECT_EQ(update - r.forward_version, std::min(j, tau)) << "stage " << k << " mb " << j;
          const int64_t want_bv = stash ? r.forward_version : update;
          EXPECT_EQ(r.backward_version, want_bv) << "stage " << k << " mb " << j;
        }
        const size_t pbytes = w.stage().num_params() * sizeof(float);
        EXPECT_EQ(w.memory().weight_versions, stash ? static_cast<size_t>(tau) * pbytes : 0u) << "stage " << k;
      }
    }
}

TEST(Engines, SyncSchedulesStashNothingAndRecordCurrentVersions) {
  for (auto kind : {ScheduleKind::GPipe, ScheduleKind::OneFOneB}) {
    Pipeline pl(tiny_config(4, kind, 3, true, false));
    run(pl, pl.schedule(2), EngineKind::Threads);
    for (const StageWorker* w : pl.ws) {
      EXPECT_EQ(w->memory().weight_versions, 0u);
      EXPECT_EQ(w->options().delay, 0);
      ASSERT_EQ(w->records().size(), 6u);
      for (const auto& r : w->records()) {
        EXPECT_EQ(r.forward_version, r.mb / 3);
        EXPECT_EQ(r.backward_version, r.mb / 3);
      }
    }
  }
}

// 8. Memory accounting, counted independently from the model's shapes.
struct MemCase {
  int P;
  ScheduleKind kind;
  bool recompute;
};

TEST(Memory, MatchesAnAnalyticCount) {
  const int M = 3;
  std::vector<MemCase> cases;
  for (int P = 1; P <= 4; ++P)
    for (auto kind : kAllKinds)
      for (bool rc : {false, true}) cases.push_back({P, kind, rc});
  for (const MemCase& c : cases) {
    SCOPED_TRACE("P=" + std::to_string(c.P) + " " + std::string(schedule_name(c.kind)) +
                 (c.recompute ? " recompute" : ""));
    const Config cfg = tiny_config(c.P, c.kind, M, true, c.recompute);
    const auto workers = make_workers(cfg);
    ASSERT_EQ(workers.size(), static_cast<size_t>(c.P));
    const size_t C = static_cast<size_t>(cfg.model.n_embd), T = static_cast<size_t>(cfg.model.block_size);
    const size_t V = static_cast<size_t>(cfg.model.vocab_size), H = static_cast<size_t>(cfg.model.n_head);
    const size_t Bsz = static_cast<size_t>(cfg.train.batch_size);
    const size_t BT = Bsz * T, MC = BT * C;
    // Parameters: embedding wte + wpe; block: 2 LayerNorms, qkv (no bias), attention projection,
    // MLP C -> 4C -> C; head: final LayerNorm and lm_head with bias.
    const size_t p_emb = V * C + T * C;
    const size_t p_block = 2 * C + 3 * C * C + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C);
    const size_t p_head = 2 * C + V * C + V;
    const size_t block_act = MC * 15 + 4 * BT + Bsz * H * T * T;
    // Blocks per stage: the default partition of 4 blocks.
    const std::vector<std::vector<int>> parts = {{4}, {2, 2}, {1, 2, 1}, {1, 1, 1, 1}};
    const auto& blocks = parts[static_cast<size_t>(c.P - 1)];
    for (int k = 0; k < c.P; ++k) {
      const StageWorker& w = *workers[static_cast<size_t>(k)];
      const bool first = k == 0, last = k == c.P - 1;
      const size_t nb = static_cast<size_t>(blocks[static_cast<size_t>(k)]);
      const size_t params = (first ? p_emb : 0) + nb * p_block + (last ? p_head : 0);
      const int slots = c.kind == ScheduleKind::GPipe      ? M
                        : c.kind == ScheduleKind::OneFOneB ? std::min(M, c.P - k)
                                                           : c.P - k;
      EXPECT_EQ(w.options().slots, slots) << "stage " << k;
      // Per slot without recompute: the stage input (not on the first stage), every unit's
      // output except the head's (the embedding's too), the blocks' saved activations, and the
      // head's saved input gradient.
      const size_t input = first ? 0 : MC;
      const size_t body = (first ? MC : 0) + nb * (block_act + MC);
      const size_t head = last ? MC : 0;
      size_t act_floats;
      if (!c.recompute) act_floats = static_cast<size_t>(slots) * (input + body + head);
      else act_floats = static_cast<size_t>(slots) * (input + head) + body;  // one shared body
      const StageMemory m = w.memory();
      EXPECT_EQ(w.stage().num_params(), params) << "stage " << k;
      EXPECT_EQ(m.weights, 4 * params) << "stage " << k;
      EXPECT_EQ(m.gradients, 4 * params) << "stage " << k;
      EXPECT_EQ(m.optimizer, 2 * 4 * params) << "stage " << k;
      EXPECT_EQ(m.weight_versions, 0u) << "stage " << k << " before any step";
      EXPECT_EQ(m.activations, 4 * act_floats) << "stage " << k;
      EXPECT_EQ(m.total(), m.weights + m.gradients + m.optimizer + m.activations);
    }
  }
}

// 9. Early stop at a drain point.
TEST(Engines, StopRequestedEndsAtAnUpdateBoundaryLikeATruncatedSchedule) {
  const int P = 3, M = 2;
  for (auto kind : kAllKinds)
    for (EngineKind e : {EngineKind::Sequential, EngineKind::Threads})
      for (int stop_poll : {1, 4}) {
        const int64_t U = 6;
        const int mpu = kind == ScheduleKind::Async1F1B ? 1 : M;
        // stop_requested is polled before each forward that begins an update on stage 0, so the
        // n-th poll happens before micro-batch (n - 1) * mpu.
        const int64_t cut = (stop_poll - 1) * mpu;
        SCOPED_TRACE(std::string(schedule_name(kind)) + " " + std::string(engine_name(e)) + " stop at poll " +
                     std::to_string(stop_poll));
        Pipeline pl(tiny_config(P, kind, M, true, false));
        const Schedule s = pl.schedule(U);
        std::atomic<int> polls{0};
        Outcome o;
        within(std::chrono::seconds(60), [&] {
          o = run(pl, s, e, [&] { return ++polls >= stop_poll; });
        });
        EXPECT_EQ(polls.load(), stop_poll) << "no polls after the stop";
        EXPECT_EQ(o.stats.updates, cut / mpu);
        EXPECT_EQ(o.stats.microbatches, cut);
        EXPECT_LT(o.stats.updates, U);
        EXPECT_EQ(o.losses.size(), static_cast<size_t>(cut / mpu));
        for (const StageWorker* w : pl.ws) EXPECT_EQ(w->version(), cut / mpu);
        if (cut == 0) {
          EXPECT_TRUE(bitwise_equal(o.params, Pipeline(pl.cfg).params())) << "weights moved without an update";
        }

        Pipeline ref(tiny_config(P, kind, M, true, false));
        const Outcome r = run(ref, truncate_schedule(s, cut), EngineKind::Sequential);
        EXPECT_TRUE(bitwise_equal(o.params, r.params)) << "weights differ from the truncated run";
        EXPECT_TRUE(bitwise_equal(o.losses, r.losses));
      }
}

TEST(Engines, StopRequestedByTheLastStageProgressStillEndsAtABoundary) {
  // Stop decided from another thread's progress (as a signal would arrive): wherever the cut
  // falls, the weights are those of the truncated schedule.
  for (auto kind : {ScheduleKind::Async1F1B, ScheduleKind::OneFOneB}) {
    const int P = 3, M = 2;
    Pipeline pl(tiny_config(P, kind, M, true, false));
    const Schedule s = pl.schedule(8);
    std::atomic<int> steps{0};
    Outcome o;
    within(std::chrono::seconds(60), [&] {
      o = run(pl, s, EngineKind::Threads, [&] { return steps.load() >= 2; },
              [&](int k, StageWorker&) {
                if (k == P - 1) ++steps;
              });
    });
    EXPECT_GE(o.stats.updates, 2);
    EXPECT_LT(o.stats.updates, 8);
    EXPECT_EQ(o.stats.microbatches, o.stats.updates * s.microbatches);
    Pipeline ref(tiny_config(P, kind, M, true, false));
    const Outcome r = run(ref, truncate_schedule(s, o.stats.microbatches), EngineKind::Sequential);
    EXPECT_TRUE(bitwise_equal(o.params, r.params)) << schedule_name(kind);
  }
}

// 10. Failures inside a stage.
TEST(Engines, ExceptionInAStagePropagatesWithoutHanging) {
  const int P = 3;
  for (auto kind : {ScheduleKind::Async1F1B, ScheduleKind::GPipe})
    for (int where : {0, P - 1})
      for (EngineKind e : {EngineKind::Threads, EngineKind::Sequential}) {
        SCOPED_TRACE(std::string(schedule_name(kind)) + " stage " + std::to_string(where) + " " +
                     std::string(engine_name(e)));
        Pipeline pl(tiny_config(P, kind, 2, true, false));
        const ModelConfig m = pl.cfg.model;
        const int Bsz = pl.cfg.train.batch_size;
        pl.ws[static_cast<size_t>(where)]->set_batch_source([m, Bsz](int64_t mb, int32_t* x, int32_t* y) {
          if (mb == 5) throw Error("synthetic data failure at micro-batch 5");
          synthetic_batch(m, Bsz, mb, x, y);
        });
        const Schedule s = pl.schedule(8);
        std::string msg;
        within(std::chrono::seconds(60), [&] { msg = error_of([&] { run(pl, s, e); }); });
        EXPECT_EQ(msg, "synthetic data failure at micro-batch 5");
      }
}

TEST(Engines, ExceptionFromAHookOnAMiddleStagePropagates) {
  const int P = 3;
  Pipeline pl(tiny_config(P, ScheduleKind::Async1F1B, 1, true, false));
  const Schedule s = pl.schedule(10);
  std::string msg;
  within(std::chrono::seconds(60), [&] {
    msg = error_of([&] {
      run(pl, s, EngineKind::Threads, {}, [](int k, StageWorker& w) {
        if (k == 1 && w.version() == 3) throw Error("hook failed on stage 1");
      });
    });
  });
  EXPECT_EQ(msg, "hook failed on stage 1");
}

TEST(Engines, WrongNumberOfWorkersIsAnError) {
  Pipeline pl(tiny_config(2, ScheduleKind::GPipe, 1, true, false));
  const Schedule s = make_gpipe(3, 1, 1);
  EXPECT_THAT(error_of([&] { run(pl, s, EngineKind::Sequential); }), HasSubstr("2 stage workers for a 3-stage schedule"));
}

TEST(Engines, TraceRecordsEveryActionOnItsStage) {
  const int P = 3;
  const int64_t N = 4;
  Pipeline pl(tiny_config(P, ScheduleKind::Async1F1B, 1, true, false));
  EngineOptions eo;
  eo.kind = EngineKind::Threads;
  eo.trace = true;
  const RunStats rs = run_schedule(pl.schedule(N), pl.ws, eo, {});
  for (int k = 0; k < P; ++k) {
    int f = 0, b = 0, st = 0;
    for (const auto& ev : rs.events) {
      if (ev.stage != k) continue;
      EXPECT_LE(ev.start, ev.end);
      f += ev.kind == 'F';
      b += ev.kind == 'B';
      st += ev.kind == 'S';
    }
    EXPECT_EQ(f, N) << "stage " << k;
    EXPECT_EQ(b, N) << "stage " << k;
    EXPECT_EQ(st, N) << "stage " << k;
  }
  const std::string j = trace_json(rs.events, P);
  EXPECT_THAT(j, HasSubstr("\"traceEvents\""));
  EXPECT_THAT(j, HasSubstr("\"cat\":\"forward\""));
}

TEST(Engines, EngineNames) {
  EXPECT_EQ(parse_engine_kind("sequential"), EngineKind::Sequential);
  EXPECT_EQ(parse_engine_kind("threads"), EngineKind::Threads);
  EXPECT_EQ(engine_name(EngineKind::Threads), "threads");
  EXPECT_EQ(parse_engine_kind("mpi"), EngineKind::Mpi);
  EXPECT_EQ(engine_name(EngineKind::Mpi), "mpi");
  EXPECT_THAT(error_of([] { parse_engine_kind("foo"); }), HasSubstr("foo"));
}

// ---------------------------------------------------------------------------------------------
// 11. Partition

TEST(Partition, DefaultSplitPutsTheRemainderInTheMiddle) {
  EXPECT_EQ(default_partition(6, 4), (std::vector<int>{1, 2, 2, 1}));
  EXPECT_EQ(default_partition(8, 8), std::vector<int>(8, 1));
  EXPECT_EQ(default_partition(6, 2), (std::vector<int>{3, 3}));
  EXPECT_EQ(default_partition(4, 3), (std::vector<int>{1, 2, 1}));
  EXPECT_EQ(default_partition(5, 2), (std::vector<int>{2, 3}));
  EXPECT_EQ(default_partition(7, 3), (std::vector<int>{2, 3, 2}));
  EXPECT_EQ(default_partition(11, 4), (std::vector<int>{2, 3, 3, 3}));
  EXPECT_EQ(default_partition(12, 5), (std::vector<int>{2, 3, 3, 2, 2}));
  EXPECT_EQ(default_partition(5, 1), (std::vector<int>{5}));
  EXPECT_EQ(default_partition(1, 1), (std::vector<int>{1}));
  for (int L = 1; L <= 12; ++L)
    for (int P = 1; P <= L; ++P) {
      const auto p = default_partition(L, P);
      ASSERT_EQ(p.size(), static_cast<size_t>(P));
      int sum = 0;
      for (int b : p) {
        EXPECT_GE(b, L / P);
        EXPECT_LE(b, L / P + 1);
        sum += b;
      }
      EXPECT_EQ(sum, L) << "L=" << L << " P=" << P;
    }
  EXPECT_THAT(error_of([] { default_partition(3, 4); }), HasSubstr("pipeline.stages"));
  EXPECT_THAT(error_of([] { default_partition(3, 0); }), HasSubstr("pipeline.stages"));
}

TEST(Partition, UnitBoundaries) {
  ModelConfig m;
  m.n_layer = 6;
  PipelineConfig p;
  p.stages = 4;
  EXPECT_EQ(blocks_per_stage(m, p), (std::vector<int>{1, 2, 2, 1}));
  // Units: embedding 0, blocks 1..6, head 7.
  EXPECT_EQ(unit_boundaries(m, p), (std::vector<int>{0, 2, 4, 6, 8}));
  p.stages = 2;
  p.partition = {1, 5};
  EXPECT_EQ(blocks_per_stage(m, p), (std::vector<int>{1, 5}));
  EXPECT_EQ(unit_boundaries(m, p), (std::vector<int>{0, 2, 8}));
  p.stages = 1;
  p.partition = {};
  EXPECT_EQ(unit_boundaries(m, p), (std::vector<int>{0, 8}));
  p.stages = 2;
  p.partition = {2, 2};
  EXPECT_THAT(error_of([&] { blocks_per_stage(m, p); }), HasSubstr("pipeline.partition"));
  p.partition = {6};
  EXPECT_THAT(error_of([&] { unit_boundaries(m, p); }), HasSubstr("pipeline.partition"));
}

// The exhaustive optimum over every cut with at least one block per stage.
double brute_force_worst(const std::vector<double>& units, int stages) {
  const int L = static_cast<int>(units.size()) - 2;
  double best = 1e300;
  std::vector<int> blocks(static_cast<size_t>(stages), 1);
  std::function<void(int, int)> go = [&](int k, int left) {
    if (k == stages - 1) {
      if (left < 1) return;
      blocks[static_cast<size_t>(k)] = left;
      const auto c = stage_costs(units, blocks);
      best = std::min(best, *std::max_element(c.begin(), c.end()));
      return;
    }
    for (int b = 1; b <= left - (stages - 1 - k); ++b) {
      blocks[static_cast<size_t>(k)] = b;
      go(k + 1, left - b);
    }
  };
  go(0, L);
  return best;
}

TEST(Partition, BalancedCutsMinimiseTheSlowestStage) {
  // The main job's shape: a head worth 1.3 blocks goes with fewer blocks.
  EXPECT_EQ(balanced_partition({0.01, 1, 1, 1, 1, 1.3}, 2), (std::vector<int>{3, 1}));
  EXPECT_EQ(balanced_partition({0.01, 1, 1, 1, 1, 1, 1.3}, 2), (std::vector<int>{3, 2}));
  // A heavy embedding does the opposite; a negligible head and embedding split evenly.
  EXPECT_EQ(balanced_partition({2.5, 1, 1, 1, 1, 1, 1, 0.5}, 3), (std::vector<int>{1, 3, 2}));
  EXPECT_EQ(balanced_partition({0, 1, 1, 1, 1, 1, 1, 0}, 3), (std::vector<int>{2, 2, 2}));
  // One stage takes everything; as many stages as blocks take one each.
  EXPECT_EQ(balanced_partition({0.5, 1, 1, 1, 0.5}, 1), (std::vector<int>{3}));
  EXPECT_EQ(balanced_partition({9, 1, 1, 1, 9}, 3), (std::vector<int>{1, 1, 1}));
  // Against every possible cut, on random costs.
  std::mt19937 g(5);
  std::uniform_real_distribution<double> u(0.1, 3.0);
  for (int trial = 0; trial < 200; ++trial) {
    const int L = 1 + trial % 8, P = 1 + trial % L;
    std::vector<double> units(static_cast<size_t>(L) + 2);
    for (double& c : units) c = u(g);
    const std::vector<int> blocks = balanced_partition(units, P);
    ASSERT_EQ(static_cast<int>(blocks.size()), P);
    int sum = 0;
    for (int b : blocks) {
      EXPECT_GE(b, 1);
      sum += b;
    }
    EXPECT_EQ(sum, L);
    const auto c = stage_costs(units, blocks);
    EXPECT_DOUBLE_EQ(*std::max_element(c.begin(), c.end()), brute_force_worst(units, P))
        << "trial " << trial;
  }
  EXPECT_THAT(error_of([] { balanced_partition({0, 1, 1, 0}, 3); }),
              HasSubstr("pipeline.stages (3) is more than model.n_layer (2)"));
}

TEST(Partition, UnitCostsAreMeasuredForEveryUnit) {
  ModelConfig m;
  m.n_layer = 3;
  m.n_embd = 32;
  m.n_head = 2;
  m.block_size = 16;
  m.vocab_size = 300;
  const std::vector<double> c = measure_unit_costs(m, 2, false, false, 1, 2);
  ASSERT_EQ(c.size(), 5u);
  for (double x : c) EXPECT_GT(x, 0.0);
  EXPECT_EQ(c[1], c[2]);  // blocks share one shape and one measurement
  EXPECT_EQ(c[1], c[3]);
  // A resolved "auto" must not reach the layout functions unresolved.
  PipelineConfig p;
  p.stages = 2;
  p.partition = Partition::make_auto();
  EXPECT_THAT(error_of([&] { blocks_per_stage(m, p); }), HasSubstr("not resolved"));
}

TEST(Partition, WorkersFollowTheBoundaries) {
  Config c = tiny_config(3, ScheduleKind::OneFOneB, 2, true, false);
  c.pipeline.partition = {2, 1, 1};
  const auto ws = make_workers(c);
  ASSERT_EQ(ws.size(), 3u);
  EXPECT_EQ(ws[0]->options().first_unit, 0);
  EXPECT_EQ(ws[0]->options().last_unit, 3);
  EXPECT_EQ(ws[1]->options().first_unit, 3);
  EXPECT_EQ(ws[1]->options().last_unit, 4);
  EXPECT_EQ(ws[2]->options().first_unit, 4);
  EXPECT_EQ(ws[2]->options().last_unit, 6);
  EXPECT_TRUE(ws[0]->is_first());
  EXPECT_FALSE(ws[0]->is_last());
  EXPECT_TRUE(ws[2]->is_last());
  EXPECT_FALSE(ws[1]->is_first() || ws[1]->is_last());
}

}  // namespace

// Links in the prediction: latency and serialised transfers delay a message's arrival, never the
// sender; with none the timeline is the plain one.
TEST(Simulate, LinksDelayArrivalsByLatencyAndSerialisedTransfers) {
  for (ScheduleKind kind : {ScheduleKind::GPipe, ScheduleKind::OneFOneB, ScheduleKind::Async1F1B}) {
    const Schedule s = make_schedule(kind, 3, kind == ScheduleKind::Async1F1B ? 1 : 2, 6);
    const std::vector<double> f(3, 1.0), b(3, 2.0), st(3, 0.0);
    EXPECT_EQ(simulate(s, f, b, st, Links{}).makespan, simulate(s, f, b, st).makespan);
    const double plain = simulate(s, f, b, st).makespan;
    Links slow;
    slow.latency_s = {0.5};
    EXPECT_GT(simulate(s, f, b, st, slow).makespan, plain);
    Links narrow;
    narrow.bandwidth_bytes_s = {10.0};
    narrow.message_bytes = 5.0;  // half a time unit a crossing
    EXPECT_GT(simulate(s, f, b, st, narrow).makespan, plain);
  }
  // gpipe, 2 stages, 1 micro-batch: each update crosses once forward and once backward.
  const Schedule g = make_gpipe(2, 1, 4);
  Links l;
  l.latency_s = {0.25};
  EXPECT_DOUBLE_EQ(simulate(g, {1, 1}, {2, 2}, {0, 0}, l).makespan, 4 * (6.0 + 0.5));
  l.latency_s = {0.25, 0.5};
  EXPECT_THAT(error_of([&] { simulate(g, {1, 1}, {2, 2}, {0, 0}, l); }), HasSubstr("2 values for 1 stage boundaries"));
}
