"""The README's concrete claims that tests/test_readme.py (the configuration table) does
not check: the `make` targets, `quotagate` commands and flags and repository paths it
names, the built-in catalog and the demo org of `make run` as it describes them, the
event names, and that every worker of `serve --workers N` answers the health services
it names. The "## Performance" section is left out: its figures are measured, not checked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quotagate import catalog
from quotagate.app import App
from quotagate.events.model import EVENT_TYPES
from quotagate.ledger.model import MeterKind
from quotagate.settings import Settings
from quotagate.v1 import common_pb2, quota_pb2, quota_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
#: what the tests check: the README up to its Performance section
MANUAL = README.split("\n## Performance", 1)[0]
#: top-level entries of the repository a path named in the README may start with
REPO_DIRS = {"bench", "deploy", "examples", "proto", "src", "tests", "third_party"}
#: paths the README names that the operator creates (`cp … deploy/api-keys.toml`)
CREATED_BY_THE_OPERATOR = {"deploy/api-keys.toml"}
CLUSTER = os.environ.get("QUOTAGATE_TEST_REDIS", "") == "cluster"


def _code_spans(text: str) -> list[str]:
    """Inline code and the lines of the fenced shell blocks."""
    fenced = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [line for block in fenced for line in block.splitlines()] + inline


def _paragraph(starting: str) -> str:
    """The README paragraph that starts with `starting`."""
    i = MANUAL.index(starting)
    j = MANUAL.find("\n\n", i)
    return MANUAL[i:j if j >= 0 else None]


def _help(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "quotagate", *args, "--help"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


# -- make -------------------------------------------------------------------------------

def _make_help() -> set[str]:
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make here")
    out = subprocess.run([make, "--no-print-directory", "help"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"^\s*make (\S+)", out.stdout, flags=re.M))


def test_every_make_target_the_readme_names_is_in_make_help() -> None:
    listed = _make_help()
    named = set(re.findall(r"`make\s+([a-z][a-z-]*)", MANUAL))
    named |= set(re.findall(r"^make ([a-z][a-z-]*)", MANUAL, flags=re.M))  # fenced blocks
    dev = _paragraph("`make help` lists the targets:")
    dev = dev[:dev.index("Tests start")]
    in_dev = {t for t in re.findall(r"`([a-z][a-z-]*)`", dev)}
    assert {"run", "test"} <= named, named
    assert not (named | in_dev) - listed, f"README names targets make help lacks: " \
        f"{sorted((named | in_dev) - listed)}"
    # "make help lists the targets: …" is the whole list
    assert not listed - in_dev - {"help"}, \
        f"make help lists targets the README's Development list lacks: " \
        f"{sorted(listed - in_dev - {'help'})}"


def test_make_run_takes_another_port_and_serves_the_demo_catalog() -> None:
    """README: `make run LISTEN=127.0.0.1:50052` serves on another port, with the demo
    org of examples/catalog.toml (a dry run: nothing is installed or started)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make here")
    assert "`make run LISTEN=127.0.0.1:50052`" in MANUAL
    out = subprocess.run([make, "-n", "--no-print-directory", "run",
                          "LISTEN=127.0.0.1:50052"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    [serve] = [line for line in out.stdout.splitlines() if "quotagate serve" in line]
    assert "QUOTAGATE_LISTEN=127.0.0.1:50052" in serve
    assert "QUOTAGATE_CATALOG=examples/catalog.toml" in serve


# -- the CLI ----------------------------------------------------------------------------

def _subcommands() -> set[str]:
    usage = _help()
    m = re.search(r"\{([a-z,-]+)\}", usage)
    assert m, usage
    return set(m.group(1).split(","))


def test_every_quotagate_command_and_flag_the_readme_names_exists() -> None:
    commands = _subcommands()
    named: set[str] = set()
    for span in _code_spans(MANUAL):
        named |= set(re.findall(r"(?:^|[\s(])quotagate ([a-z][a-z-]*)", span))
    assert {"serve", "admin", "health", "restore"} <= named, named
    assert not named - commands, f"README names commands quotagate lacks: " \
        f"{sorted(named - commands)}"
    flags: set[str] = set()
    for command in commands:
        flags |= set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", _help(command)))
    in_readme = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", MANUAL))
    assert not in_readme - flags, f"README names flags no command takes: " \
        f"{sorted(in_readme - flags)}"


def test_the_serve_flags_the_readme_lists_are_exactly_serve_s_flags() -> None:
    sentence = _paragraph("`quotagate serve` (also `python -m quotagate serve`) reads")
    sentence = sentence[:sentence.index("override them")]
    in_readme = set(re.findall(r"`(--[a-z-]+)`", sentence))
    serve = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", _help("serve"))) - {"--help"}
    assert in_readme == serve, (sorted(in_readme - serve), sorted(serve - in_readme))


# -- paths ------------------------------------------------------------------------------

def test_every_repository_path_the_readme_names_exists() -> None:
    paths: set[str] = set()
    for span in _code_spans(MANUAL):
        for word in span.split():
            word = word.strip("()[],;:'\"")
            if "://" in word or word.split("/")[0] not in REPO_DIRS or "/" not in word:
                continue
            paths.add(word)
    paths |= {w for w in re.findall(r"`([A-Z][A-Za-z]+)`", MANUAL)
              if w in ("Dockerfile", "Makefile")}
    assert {"examples/quickstart.py", "deploy/kubernetes/sidecar.yaml",
            "Dockerfile"} <= paths, sorted(paths)
    missing = sorted(p for p in paths - CREATED_BY_THE_OPERATOR
                     if not (list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists()))
    assert not missing, f"README names paths that do not exist: {missing}"


# -- the built-in catalog ---------------------------------------------------------------

def _number(text: str) -> int:
    return int(text.replace(",", ""))


def test_the_builtin_catalog_is_what_the_readme_lists() -> None:
    """README's **Catalog.** paragraph: the meters and their kinds, which do not
    deactivate assistants, every plan with its allowance and every action with its
    price; and nothing of the built-in catalog goes unmentioned."""
    cat = catalog.load(None).catalog
    text = " ".join(_paragraph("**Catalog.**").split())
    meters = re.search(r"has the meters (.*?) \(counters\) and `(\w+)` \(gauge\)", text)
    assert meters, text
    counters = set(re.findall(r"`(\w+)`", meters.group(1)))
    assert {m for m, k in cat.meters.items() if k is MeterKind.COUNTER} == counters
    assert {m for m, k in cat.meters.items() if k is MeterKind.GAUGE} == {meters.group(2)}
    quiet = re.search(r"sets it false for (.*?), so", text)
    assert quiet, text
    assert set(re.findall(r"`(\w+)`", quiet.group(1))) == set(cat.quiet_meters) - {
        m for m, k in cat.meters.items() if k is MeterKind.GAUGE}
    plans_text = text[text.index("the plans"):text.index("the actions")]
    plans = {name: (_number(n), kind.strip()) for name, n, kind in
             re.findall(r"`(\w+)` \(([\d,]+)( a seat| tokens once)?", plans_text)}
    assert set(plans) == set(cat.plans), (sorted(plans), sorted(cat.plans))
    for name, (amount, kind) in plans.items():
        [a] = cat.plans[name]
        assert a.meter == cat.default_meter
        got = {"a seat": a.per_seat, "tokens once": a.one_time}.get(kind, a.monthly)
        assert got == amount, f"plan {name}: README {amount} {kind}, catalog {a}"
    actions_text = text[text.index("the actions"):]
    actions = {name: _number(n) for name, n in re.findall(r"`(\w+)` \(([\d,]+)",
                                                          actions_text)}
    actions |= {name: actions["icebreaker"]
                for name in re.findall(r"also as `(\w+)`", actions_text)}
    assert set(actions) == set(cat.actions), (sorted(actions), sorted(cat.actions))
    for name, price in actions.items():
        assert [(c.meter, c.amount) for c in cat.actions[name]] == \
            [(cat.default_meter, price)], name


def test_the_events_the_readme_lists_are_the_event_types() -> None:
    text = _paragraph("**Events** are written by the same script")
    named = set(re.findall(r"`([a-z_]+\.[a-z_]+)`", text))
    assert named == set(EVENT_TYPES), (sorted(named - set(EVENT_TYPES)),
                                       sorted(set(EVENT_TYPES) - named))


# -- the demo org of `make run` ---------------------------------------------------------

@pytest.fixture
async def demo(redis_server: Any, redis: Any, tmp_path: Path) -> AsyncIterator[Any]:
    """The real server with `make run`'s catalog (examples/catalog.toml and its seed)."""
    settings = Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                        catalog=str(ROOT / "examples" / "catalog.toml"),
                        sweep_interval_ms=600_000, grace_seconds=0, data_dir=tmp_path,
                        metrics_listen="127.0.0.1:0", sync_in_process=False,
                        notify_in_process=False)
    app = await App(settings).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield quota_pb2_grpc.QuotaServiceStub(channel)
    await channel.close()
    await app.stop()


async def test_the_demo_org_is_what_the_quick_start_says(demo: Any) -> None:
    """README: `demo` on `pro` (2,000,000 message tokens and 36,000 call seconds a month),
    a 1,000,000-token welcome top-up, team `support`, seat `alice` capped at 200,000 a
    month, assistant `helpdesk-bot`."""
    quick = " ".join(_paragraph("`make run` needs only Python 3.11").split())
    for said in ("`demo`", "`pro` plan (2,000,000 message tokens and 36,000 call seconds",
                 "1,000,000-token welcome top-up", "team `support`",
                 "`alice` capped at 200,000", "assistant `helpdesk-bot`"):
        assert said in quick, said
    org = common_pb2.Subject(org_id="demo")
    got = await demo.GetBalance(quota_pb2.GetBalanceRequest(
        subject=org, meters=["message_tokens", "call_seconds"]))
    tokens, seconds = got.balances
    assert (tokens.monthly_granted, tokens.topup_remaining, tokens.total, tokens.used) == \
        (2_000_000, 1_000_000, 3_000_000, 0)
    assert seconds.monthly_granted == 36_000
    alice = common_pb2.Subject(org_id="demo", team_id="support", seat_id="alice",
                               assistant_id="helpdesk-bot")
    [seat] = (await demo.GetBalance(quota_pb2.GetBalanceRequest(
        subject=alice, meters=["message_tokens"]))).balances
    assert seat.remaining == 200_000  # the seat cap, not the org's 3,000,000
    check = await demo.Check(quota_pb2.CheckRequest(subject=alice, meter="message_tokens"))
    assert check.active and not check.silent
    # the cap holds: one token past it is denied, not charged from the org
    over = await demo.Reserve(quota_pb2.ReserveRequest(
        subject=alice, idempotency_key="readme-over",
        charges=[common_pb2.Charge(meter="message_tokens", amount=200_001)]))
    assert over.decision == common_pb2.DECISION_DENIED
    assert over.reason == common_pb2.DENY_REASON_SEAT_LIMIT_REACHED


# -- health on every worker -------------------------------------------------------------

def _health(channel: grpc.Channel, service: str) -> str:
    try:
        r = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
    except grpc.RpcError as e:
        return str(e.code().name)


@pytest.mark.skipif(CLUSTER, reason="runs `serve` on its embedded Redis")
def test_every_worker_answers_the_health_services_the_readme_names(tmp_path: Path) -> None:
    """README: the gRPC health service `quotagate.v1.Sync` reports the copy to SQL, and
    `quotagate health --service …` is the probe; `make run` serves with one worker per
    core. Each of 16 connections (each dealt to a worker at random) must get an answer
    for the server, QuotaService and Sync."""
    from test_serve import close_and_stop, own_channels, start_serve

    assert "`quotagate.v1.Sync`" in MANUAL
    proc, port = start_serve(tmp_path, QUOTAGATE_WORKERS="2",
                             QUOTAGATE_METRICS_LISTEN="127.0.0.1:0")
    channels = own_channels(port, 16)
    try:
        # Sync is set by the health loop once the syncer runs: wait (without a clock
        # assertion) until some connection sees it
        for _ in range(200):
            if any(_health(ch, "quotagate.v1.Sync") == "SERVING" for ch in channels):
                break
            time.sleep(0.1)
        answers = {(i, svc): _health(ch, svc) for i, ch in enumerate(channels)
                   for svc in ("", "quotagate.v1.QuotaService", "quotagate.v1.Sync")}
        wrong = {k: v for k, v in answers.items() if v != "SERVING"}
        assert not wrong, wrong
    finally:
        close_and_stop(channels, proc)
