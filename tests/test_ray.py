"""Ray replay shards on a real local Ray cluster started by this module (docs/scale.md).

The cluster is two node processes on this box: a head with 2 CPUs and a worker node with 1 CPU
(`ray start`), so four 1-CPU shards run three at a time over both nodes. Each node is started in
its own session and torn down by killing exactly those process groups (never `ray stop`, which
stops every Ray process of the user on the machine). The trace is the two-weight-version
recording of test_replay.py; the reference is a local unsharded replay of it, and rows must
agree within the recording engine's own noise (tests/engine_noise.py), not a tuned constant.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from proc import free_port
from test_replay import CPU_ARGS, _sampling
from test_replay_support import two_version_recording

from tracekit.store.reader import Trace

pytestmark = pytest.mark.engine

RAY = str(Path(sys.executable).with_name("ray"))
TRACEKIT = [sys.executable, "-m", "tracekit.cli"]
# Forwarded to every shard (TRACEKIT_ prefix): finds this module's processes, and only them.
TOKEN_VAR = "TRACEKIT_TEST_RAY_TOKEN"



def _ours(token: str) -> list[Any]:
    """Live processes whose environment carries ``token`` (Ray workers, replay workers, engines)."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(TOKEN_VAR) == token and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def _kill_groups(pgids: list[int]) -> None:
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for g in pgids:
            try:
                os.killpg(g, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_group_alive(g) for g in pgids):
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    """Head (2 CPUs) + worker node (1 CPU); this process connects as a driver."""
    import ray

    if ray.is_initialized():  # pragma: no cover - another module left a driver behind
        ray.shutdown()
    token = uuid.uuid4().hex
    # Ray's token auth, explicitly off for this short-lived local cluster: with RAY_AUTH_MODE unset
    # a head started by `ray start` turns it on when ~/.ray/auth_token exists (a local ray.init
    # writes one) while a joining node does not, so the worker node cannot connect; and this
    # process read its auth mode when vLLM imported ray, so it cannot switch to a token now.
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", TOKEN_VAR)}
    os.environ.update({"RAY_AUTH_MODE": "disabled", TOKEN_VAR: token})
    tmp = tempfile.mkdtemp(prefix="tkray-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    port = free_port()
    addr = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    pgids: list[int] = []

    def start(*args: str) -> None:
        p = subprocess.Popen([RAY, "start", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
        pgids.append(p.pid)  # the node's daemons stay in this process group after `ray start` exits
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out[-2000:]

    try:
        start("--head", "--num-cpus", "2", "--port", str(port), "--temp-dir", tmp, "--disable-usage-stats",
              "--include-dashboard", "false")
        start("--address", addr, "--num-cpus", "1", "--disable-usage-stats")
        ray.init(address=addr, log_to_driver=False, logging_level="WARNING")
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.cluster_resources().get("CPU") == 3, ray.cluster_resources()
        yield {"address": addr, "token": token, "env": env}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _kill_groups(pgids)
        for p in _ours(token):  # a straggler in its own session (a replay worker): ours by its token
            p.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def recorded(tiny_model: Path, engine_pool: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """test_replay's trace (two weight versions, 12 requests each, mixed sampling), its engine's
    noise, and a local unsharded score replay of it: the reference every Ray replay must equal."""
    from tracekit.replay import replay

    root = tmp_path_factory.mktemp("ray") / "trace"
    rec = two_version_recording(root, engine_pool(tiny_model), tiny_model, _sampling, CPU_ARGS)
    rows, noise = rec["rows"], rec["noise"]
    local = replay(root, "local", progress=False)
    assert local.requests_ok == 24
    n_tok = sum(len(r["output_token_ids"]) for r in rows.values())
    return {"root": root, "rows": rows, "noise": noise, "tokens": n_tok}


def _rows(root: Path, name: str) -> list[tuple[Any, ...]]:
    return Trace(root).query(
        "SELECT request_id, pos, token_id, logprob, processed_logprob, weight_version FROM replay_tokens "
        "WHERE replay = ? ORDER BY request_id, pos", [name])


def assert_equals_local(rec: dict[str, Any], name: str) -> None:
    """Row for row the local replay: same (request_id, pos) set once each, same tokens and weight
    versions, logprobs within the engine's measured noise; every request once in the ledger."""
    root = rec["root"]
    got, want = _rows(root, name), _rows(root, "local")
    assert len(got) == len(want) == rec["tokens"]
    assert [r[:3] + r[5:] for r in got] == [r[:3] + r[5:] for r in want]
    tol = rec["noise"].tol
    for col in (3, 4):
        a = np.array([r[col] for r in got], dtype=np.float64)
        b = np.array([r[col] for r in want], dtype=np.float64)
        assert np.array_equal(np.isnan(a), np.isnan(b))
        worst = float(np.nanmax(np.abs(a - b)))
        assert worst <= tol, f"{name} vs local: max |Δ| of column {col} is {worst} > {tol} ({rec['noise']})"
    n, distinct = Trace(root).query(
        "SELECT count(*), count(DISTINCT request_id) FROM replay_requests WHERE replay = ?", [name])[0]
    assert n == distinct == 24


def test_four_ray_shards_equal_a_local_replay(cluster: dict[str, Any], recorded: dict[str, Any]) -> None:
    from tracekit.replay.cluster import replay_on_ray

    root = recorded["root"]
    res = replay_on_ray(root, "ray4", shards=4, progress=False)
    assert (res.requests_ok, res.requests_error, res.requests_skipped, res.tokens) == (24, 0, 0, recorded["tokens"])
    assert res.target_vllm and Path(res.path).resolve() == (root / "replays" / "ray4").resolve()
    shards = dict(Trace(root).query("SELECT shard, count(*) FROM replay_requests WHERE replay='ray4' GROUP BY 1"))
    assert sorted(shards) == ["0/4", "1/4", "2/4", "3/4"] and sum(shards.values()) == 24
    assert_equals_local(recorded, "ray4")


def test_killed_shard_worker_is_retried_without_duplicated_or_lost_rows(
        cluster: dict[str, Any], recorded: dict[str, Any]) -> None:
    """SIGKILL a shard's Ray worker once its first batch is committed: Ray runs the task again, the
    retry resumes the shard, and the rows equal the local replay. The killed attempt's replay
    worker and engine go down with it."""
    import psutil
    import ray

    from tracekit.replay.cluster import NAMESPACE, replay_on_ray

    root = recorded["root"]
    out: dict[str, Any] = {}

    def drive() -> None:
        try:
            out["res"] = replay_on_ray(root, "retry", shards=2, chunk_requests=1, progress=False)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            out["err"] = e

    th = threading.Thread(target=drive, daemon=True)
    th.start()
    actor_name = f"replay:{Trace(root).manifest['trace_id']}:retry"
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline and th.is_alive():
        try:
            actor = ray.get_actor(actor_name, namespace=NAMESPACE)
            done = ray.get(actor.shards.remote())
        except ValueError:  # not created yet
            time.sleep(0.1)
            continue
        started = [i for i, (n, _) in done.items() if n >= 1]
        if started:
            shard = started[0]
            pid = ray.get(actor.workers.remote())[shard][-1][0]
            below = psutil.Process(pid).children(recursive=True)
            os.kill(pid, signal.SIGKILL)
            victim = (shard, pid, below, done[shard][0])
        else:
            time.sleep(0.02)
    assert victim is not None, f"no shard committed a batch to kill it after: {out}"
    shard, pid, below, n_done = victim
    assert below, "the shard's replay worker was not found below its Ray worker"
    _, alive = psutil.wait_procs(below, timeout=60)
    assert not alive, f"the killed shard left processes behind: {alive}"
    th.join(timeout=600)
    assert not th.is_alive()
    if "err" in out:
        raise out["err"]
    res = out["res"]
    assert n_done < 12, f"shard {shard} had finished ({n_done} done) when it was killed"
    assert any(f"shard {shard}/2 ran 2 times" in n for n in res.notes), res.notes
    assert (res.requests_ok, res.tokens) == (24, recorded["tokens"])
    assert_equals_local(recorded, "retry")


def test_cli_driver_killed_then_resumed(cluster: dict[str, Any], recorded: dict[str, Any]) -> None:
    """`tracekit replay --ray ADDR` end to end: SIGKILL the driver mid-run (Ray ends its job and
    its shards, with their engines), a re-run without --resume is refused, with --resume it
    finishes with one progress line and the rows equal the local replay."""
    import ray

    from tracekit.replay.cluster import NAMESPACE

    root = recorded["root"]
    token = cluster["token"]
    args = ["replay", str(root), "--name", "cli", "--ray", cluster["address"], "--shards", "2"]
    drv = subprocess.Popen([*TRACEKIT, *args, "--chunk-requests", "1"], env=os.environ.copy(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    ledger = root / "replays" / "cli" / "requests"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and drv.poll() is None and not any(ledger.glob("*.parquet")):
        time.sleep(0.05)
    assert drv.poll() is None, f"driver ended before it could be killed: {drv.communicate()[1][-2000:]!r}"
    shards_before = {p.pid for p in _ours(token) if "tracekit.replay.worker" in " ".join(p.cmdline())}
    assert shards_before, "no replay worker of the Ray shards is running"
    os.killpg(drv.pid, signal.SIGKILL)
    drv.communicate()
    # Ray ends the dead driver's job: its shard tasks, their replay workers and engines, and its
    # progress actor (the guard a second driver checks) all go.
    deadline = time.monotonic() + 120
    left: list[Any] = []
    while time.monotonic() < deadline:
        left = [p for p in _ours(token) if p.pid in shards_before]
        try:
            ray.get_actor(f"replay:{Trace(root).manifest['trace_id']}:cli", namespace=NAMESPACE)
            gone = False
        except ValueError:
            gone = True
        if not left and gone:
            break
        time.sleep(0.5)
    assert not left, f"shard processes survived their dead driver: {left}"
    done = Trace(root).query("SELECT count(*) FROM replay_requests WHERE replay='cli'")[0][0]
    assert 0 < done < 24, done

    r = subprocess.run([*TRACEKIT, *args, "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--resume" in r.stderr, r.stderr
    assert r.stderr.strip().startswith("tracekit: error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([*TRACEKIT, *args, "--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    bars = [ln for ln in r.stdout.splitlines() if "requests ·" in ln]
    assert len(bars) == 1 and f"{24 - done}/{24 - done}" in bars[0], r.stdout
    assert f"{done} already done" in r.stdout, r.stdout
    assert_equals_local(recorded, "cli")


def test_ray_shard_errors_are_one_line_and_not_retried(cluster: dict[str, Any], recorded: dict[str, Any]) -> None:
    """A bad engine arg fails every shard with the local replay's one-line error (exit 2), not a
    Ray traceback, and leaves no replay behind."""
    root = recorded["root"]
    t0 = time.monotonic()
    r = subprocess.run([*TRACEKIT, "replay", str(root), "--name", "bad", "--ray", cluster["address"], "--shards", "2",
                        "--engine-arg", "no_such_knob=1", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("tracekit:")]
    assert len(errs) == 1 and "has no engine arg 'no_such_knob'" in errs[0], r.stderr
    assert "Traceback" not in r.stderr and "retries remaining" not in r.stderr, r.stderr
    assert not (root / "replays" / "bad").exists()
    assert time.monotonic() - t0 < 120


def test_ray_flag_errors_exit_2_one_line(tmp_path: Path) -> None:
    """--ray with --shard, and --ray without Ray installed: one line, exit 2 (no cluster needed)."""
    r = subprocess.run([*TRACEKIT, "replay", str(tmp_path), "--name", "x", "--ray", "--shard", "0/2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--shard and --ray" in r.stderr, r.stderr
    code = ("import sys; sys.modules['ray'] = None\n"  # `import ray` now raises ImportError
            "from tracekit.cli import main; main(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", code, "replay", str(tmp_path), "--name", "x", "--ray"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "tracekit: error: --ray needs Ray: pip install 'tracekit[ray]'", r.stderr


def test_ray_shards_read_and_write_a_trace_on_s3(cluster: dict[str, Any], recorded: dict[str, Any]) -> None:
    """The trace in a bucket (a real S3-protocol server): every shard reads its weight blobs from
    it and writes its parts into it, with credentials forwarded from the driver's AWS_* env; the
    rows equal the local replay (uploaded with the trace)."""
    from s3_server import aws_env, keys, make_bucket, s3_server

    from tracekit.replay.cluster import replay_on_ray
    from tracekit.store.location import as_root, copy_path

    with s3_server() as env, aws_env(env):
        make_bucket("tk-ray")
        uri = "s3://tk-ray/runs/trace"
        copy_path(recorded["root"], as_root(uri))
        res = replay_on_ray(uri, "ray-s3", shards=2, progress=False)
        assert (res.requests_ok, res.tokens) == (24, recorded["tokens"])
        assert str(res.path) == f"{uri}/replays/ray-s3"
        assert keys("tk-ray", "runs/trace/replays/ray-s3/tokens/")
        assert_equals_local({**recorded, "root": uri}, "ray-s3")
