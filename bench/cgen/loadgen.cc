// A load generator for bench/run.py in C++ (gRPC C++'s completion-queue API), for
// `make bench --client cpp`: the same scenarios, modes and report as bench/loadgen.py,
// at a fraction of the CPU per RPC, so that on a machine whose cores the generator
// shares with the server, less of the machine goes to measuring.
//
// One thread runs everything: it starts calls when they are due and handles replies as
// they arrive (CompletionQueue::AsyncNext with the next send time as its deadline).
// - closed loop (--rate 0): --concurrency callers back to back until --seconds pass;
// - open loop (--rate R): request i starts at start + i/R whatever the replies do, and
//   its latency counts from that scheduled start (no coordinated omission).
// A reserve_commit request is a Reserve, then a Commit of what was "used" (60-110 % of
// the estimate); it counts as two RPCs. An envoy_rls request is what an Envoy in front of
// the AI endpoint asks: one ShouldRateLimit charging the same subject the estimate. The report (JSON on stdout) has the same fields
// as loadgen.run's, latencies in seconds.
//
// Usage: loadgen --port P --scenario ceiling|reserve_commit|check|get_balance|envoy_rls
//                [--seconds 3] [--concurrency 128] [--rate 0] [--orgs 10000]
//                [--teams 2] [--seats 5] [--seed 1] [--channels 8]

#include <grpcpp/grpcpp.h>
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "health.grpc.pb.h"
#include "rls.grpc.pb.h"
#include "quotagate/v1/quota.grpc.pb.h"

namespace qv1 = quotagate::v1;
namespace hv1 = grpc::health::v1;
namespace rls = envoy::service::ratelimit::v3;

namespace {

const char* const kMeter = "message_tokens";

double Now() {
  return std::chrono::duration<double>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

double CpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec +
         u.ru_stime.tv_usec / 1e6;
}

struct Options {
  int port = 0;
  std::string scenario;
  double seconds = 3.0;
  int concurrency = 128;
  double rate = 0.0;
  int orgs = 10000, teams = 2, seats = 5, seed = 1, channels = 8;
};

Options Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    const char* v = argv[i + 1];
    if (k == "--port") o.port = std::atoi(v);
    else if (k == "--scenario") o.scenario = v;
    else if (k == "--seconds") o.seconds = std::atof(v);
    else if (k == "--concurrency") o.concurrency = std::atoi(v);
    else if (k == "--rate") o.rate = std::atof(v);
    else if (k == "--orgs") o.orgs = std::atoi(v);
    else if (k == "--teams") o.teams = std::atoi(v);
    else if (k == "--seats") o.seats = std::atoi(v);
    else if (k == "--seed") o.seed = std::atoi(v);
    else if (k == "--channels") o.channels = std::atoi(v);
    else { std::fprintf(stderr, "loadgen: unknown option %s\n", k.c_str()); std::exit(2); }
  }
  if (o.port <= 0 || (o.scenario != "ceiling" && o.scenario != "reserve_commit" &&
                      o.scenario != "check" && o.scenario != "get_balance" &&
                      o.scenario != "envoy_rls")) {
    std::fprintf(stderr, "loadgen: --port and --scenario "
                         "(ceiling|reserve_commit|check|get_balance) are required\n");
    std::exit(2);
  }
  return o;
}

// One request (for reserve_commit: the pair) and the RPC it has in flight.
struct Request {
  int channel = 0;
  double t_sched = 0, t_send = 0, t_rpc = 0;
  bool committing = false;
  int64_t estimate = 0;
  std::unique_ptr<grpc::ClientContext> ctx;
  grpc::Status status;
  hv1::HealthCheckResponse health;
  qv1::ReserveResponse reserve;
  qv1::CommitResponse commit;
  qv1::CheckResponse check;
  qv1::GetBalanceResponse balance;
  rls::RateLimitResponse limit;
  std::unique_ptr<grpc::ClientAsyncResponseReader<hv1::HealthCheckResponse>> health_rd;
  std::unique_ptr<grpc::ClientAsyncResponseReader<qv1::ReserveResponse>> reserve_rd;
  std::unique_ptr<grpc::ClientAsyncResponseReader<qv1::CommitResponse>> commit_rd;
  std::unique_ptr<grpc::ClientAsyncResponseReader<qv1::CheckResponse>> check_rd;
  std::unique_ptr<grpc::ClientAsyncResponseReader<qv1::GetBalanceResponse>> balance_rd;
  std::unique_ptr<grpc::ClientAsyncResponseReader<rls::RateLimitResponse>> limit_rd;
};

class Generator {
 public:
  explicit Generator(const Options& o) : o_(o), rng_(o.seed * 1000003ULL) {
    const std::string target = "127.0.0.1:" + std::to_string(o.port);
    for (int i = 0; i < std::max(1, o.channels); ++i) {
      grpc::ChannelArguments args;
      args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // each channel its own connection
      auto ch = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
      health_.push_back(hv1::Health::NewStub(ch));
      quota_.push_back(qv1::QuotaService::NewStub(ch));
      rls_.push_back(rls::RateLimitService::NewStub(ch));
    }
    tag_ = std::to_string(o.seed) + "-" +
           std::to_string(std::chrono::system_clock::now().time_since_epoch().count());
  }

  void Run() {
    Warm();
    const double cpu0 = CpuSeconds();
    const double start = Now();
    const double stop = start + o_.seconds;
    long i = 0;
    const bool open = o_.rate > 0;
    const double interval = open ? 1.0 / o_.rate : 0;
    if (!open) {
      for (int k = 0; k < o_.concurrency; ++k) Start(k % health_.size(), Now());
    }
    for (;;) {
      double now = Now();
      if (open) {
        while (start + i * interval < stop && start + i * interval <= now) {
          Start(i % health_.size(), start + i * interval);
          ++i;
        }
        if (start + i * interval >= stop && (inflight_ == 0 || now > stop + 30)) break;
      } else if (now >= stop && inflight_ == 0) {
        break;
      }
      double wake = open && start + i * interval < stop ? start + i * interval : now + 0.1;
      void* got = nullptr;
      bool ok = false;
      auto deadline = std::chrono::system_clock::now() +
                      std::chrono::duration_cast<std::chrono::system_clock::duration>(
                          std::chrono::duration<double>(std::max(0.0, wake - now)));
      auto st = cq_.AsyncNext(&got, &ok, deadline);
      if (st == grpc::CompletionQueue::GOT_EVENT) Handle(static_cast<Request*>(got), stop, open);
      else if (st == grpc::CompletionQueue::SHUTDOWN) break;
    }
    elapsed_ = Now() - start;
    cpu_ = CpuSeconds() - cpu0;
  }

  void Report() const {
    std::string out;
    out.reserve(64 * (latencies_.size() + rpc_latencies_.size()) + 256);
    char buf[128];
    std::snprintf(buf, sizeof buf,
                  "{\"rpcs\": %ld, \"requests\": %zu, \"errors\": %ld, \"elapsed\": %.6f, "
                  "\"cpu\": %.6f",
                  rpcs_, latencies_.size(), errors_, elapsed_, cpu_);
    out += buf;
    auto list = [&](const char* name, const std::vector<double>& xs) {
      out += ", \"";
      out += name;
      out += "\": [";
      for (size_t k = 0; k < xs.size(); ++k) {
        std::snprintf(buf, sizeof buf, k ? ", %.7f" : "%.7f", xs[k]);
        out += buf;
      }
      out += "]";
    };
    const bool open = o_.rate > 0;
    list("latencies", latencies_);
    list("rpc_latencies", rpc_latencies_);
    list("sent_latencies", open ? sent_ : std::vector<double>{});
    list("lateness", open ? late_ : std::vector<double>{});
    out += "}\n";
    std::fwrite(out.data(), 1, out.size(), stdout);
  }

 private:
  qv1::Subject* Subject(qv1::Subject* s) {
    const std::string org = "org-" + std::to_string(Pick(o_.orgs));
    const std::string team = org + "-t" + std::to_string(Pick(o_.teams));
    s->set_org_id(org);
    s->set_team_id(team);
    s->set_seat_id(team + "-s" + std::to_string(Pick(o_.seats)));
    return s;
  }

  int Pick(int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng_); }

  // One blocking call per channel before the clock starts: connects and warms.
  void Warm() {
    for (size_t c = 0; c < health_.size(); ++c) {
      grpc::ClientContext ctx;
      hv1::HealthCheckResponse resp;
      if (!health_[c]->Check(&ctx, hv1::HealthCheckRequest(), &resp).ok()) ++errors_;
    }
  }

  void Start(size_t channel, double t_sched) {
    auto* r = new Request;
    r->channel = static_cast<int>(channel);
    r->t_sched = t_sched;
    r->t_send = Now();
    ++inflight_;
    Send(r);
  }

  void Send(Request* r) {
    r->ctx = std::make_unique<grpc::ClientContext>();
    r->t_rpc = Now();
    auto& q = *quota_[r->channel];
    const std::string& s = o_.scenario;
    if (s == "ceiling") {
      r->health_rd = health_[r->channel]->AsyncCheck(r->ctx.get(), hv1::HealthCheckRequest(), &cq_);
      r->health_rd->Finish(&r->health, &r->status, r);
    } else if (s == "check") {
      qv1::CheckRequest req;
      Subject(req.mutable_subject());
      req.set_meter(kMeter);
      r->check_rd = q.AsyncCheck(r->ctx.get(), req, &cq_);
      r->check_rd->Finish(&r->check, &r->status, r);
    } else if (s == "get_balance") {
      qv1::GetBalanceRequest req;
      Subject(req.mutable_subject());
      req.add_meters(kMeter);
      r->balance_rd = q.AsyncGetBalance(r->ctx.get(), req, &cq_);
      r->balance_rd->Finish(&r->balance, &r->status, r);
    } else if (s == "envoy_rls") {
      qv1::Subject who;
      Subject(&who);
      rls::RateLimitRequest req;
      req.set_domain("ai");
      req.set_hits_addend(std::uniform_int_distribution<uint32_t>(500, 4000)(rng_));
      auto* d = req.add_descriptors();
      for (const auto& [k, v] : {std::pair{"org_id", who.org_id()},
                                 std::pair{"team_id", who.team_id()},
                                 std::pair{"seat_id", who.seat_id()}}) {
        auto* e = d->add_entries();
        e->set_key(k);
        e->set_value(v);
      }
      r->limit_rd = rls_[r->channel]->AsyncShouldRateLimit(r->ctx.get(), req, &cq_);
      r->limit_rd->Finish(&r->limit, &r->status, r);
    } else if (!r->committing) {
      r->estimate = std::uniform_int_distribution<int64_t>(500, 4000)(rng_);
      qv1::ReserveRequest req;
      Subject(req.mutable_subject());
      req.set_idempotency_key(tag_ + "-" + std::to_string(counter_++));
      auto* c = req.add_charges();
      c->set_meter(kMeter);
      c->set_amount(r->estimate);
      r->reserve_rd = q.AsyncReserve(r->ctx.get(), req, &cq_);
      r->reserve_rd->Finish(&r->reserve, &r->status, r);
    } else {
      const double used = r->estimate * std::uniform_real_distribution<double>(0.6, 1.1)(rng_);
      qv1::CommitRequest req;
      req.set_reservation_id(r->reserve.reservation_id());
      auto* c = req.add_actual();
      c->set_meter(kMeter);
      c->set_amount(std::max<int64_t>(1, static_cast<int64_t>(used)));
      r->commit_rd = q.AsyncCommit(r->ctx.get(), req, &cq_);
      r->commit_rd->Finish(&r->commit, &r->status, r);
    }
  }

  void Handle(Request* r, double stop, bool open) {
    const double t = Now();
    if (!r->status.ok()) {
      ++errors_;
    } else if (o_.scenario != "reserve_commit") {
      rpcs_ += 1;
    } else {
      rpc_latencies_.push_back(t - r->t_rpc);
      if (!r->committing && !r->reserve.reservation_id().empty()) {
        r->committing = true;  // the same request goes on: its Commit
        Send(r);
        return;
      }
      rpcs_ += r->committing ? 2 : 1;
    }
    latencies_.push_back(t - r->t_sched);
    sent_.push_back(t - r->t_send);
    late_.push_back(r->t_send - r->t_sched);
    const int channel = r->channel;
    delete r;
    --inflight_;
    if (!open && t < stop) Start(channel, Now());
  }

  Options o_;
  std::mt19937_64 rng_;
  grpc::CompletionQueue cq_;
  std::vector<std::unique_ptr<hv1::Health::Stub>> health_;
  std::vector<std::unique_ptr<qv1::QuotaService::Stub>> quota_;
  std::vector<std::unique_ptr<rls::RateLimitService::Stub>> rls_;
  std::string tag_;
  uint64_t counter_ = 0;
  long inflight_ = 0, rpcs_ = 0, errors_ = 0;
  double elapsed_ = 0, cpu_ = 0;
  std::vector<double> latencies_, rpc_latencies_, sent_, late_;
};

}  // namespace

int main(int argc, char** argv) {
  const Options o = Parse(argc, argv);
  Generator g(o);
  g.Run();
  g.Report();
  return 0;
}
