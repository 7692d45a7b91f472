"""Fuzz the read side: random and mutated files under a good trace, then open, validate, info,
sql and weight loading. Anything but success or a TracekitError (the CLI's one line + exit 2)
is a crash. Mutations are seeded: a failure names its seed and reproduces."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bad_inputs import build_good_trace, tree_digest

from tracekit.errors import TracekitError
from tracekit.store import Trace
from tracekit.store.info import info
from tracekit.store.sql import run_query
from tracekit.store.validate import validate
from tracekit.store.weights import load_snapshot

N = int(os.environ.get("TRACEKIT_FUZZ_CASES", "150"))


def _targets(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def mutate(root: Path, rng: random.Random) -> str:
    """Apply 1-3 random mutations; returns a description for the failure message."""
    done = []
    for _ in range(rng.randint(1, 3)):
        files = _targets(root)
        p = rng.choice(files)
        data = bytearray(p.read_bytes())
        kind = rng.choice(["flip", "flip", "truncate", "zero", "insert", "garbage", "swap", "plant", "empty"])
        if kind == "flip" and data:
            for _ in range(rng.randint(1, 16)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            data = data[: rng.randrange(len(data) + 1)]
        elif kind == "zero" and data:
            i, n = rng.randrange(len(data)), rng.randint(1, 64)
            data[i : i + n] = bytes(len(data[i : i + n]))
        elif kind == "insert":
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.randbytes(rng.randint(1, 32))
        elif kind == "garbage":
            data = bytearray(rng.randbytes(rng.randint(0, 4096)))
        elif kind == "swap":  # a file of another table (or the manifest) in this place
            data = bytearray(rng.choice(files).read_bytes())
        elif kind == "plant":  # a new random "part" in a random table directory
            d = rng.choice([q for q in root.rglob("*") if q.is_dir()] + [root])
            p = d / f"part-{rng.randrange(10**6):020d}-fuzz-000001.parquet"
            data = bytearray(rng.randbytes(rng.randint(0, 2048)) if rng.random() < 0.5 else rng.choice(files).read_bytes())
        elif kind == "empty":
            data = bytearray()
        p.write_bytes(bytes(data))
        done.append(f"{kind}:{p.relative_to(root)}")
    return ", ".join(done)


def exercise(root: Path) -> None:
    """Everything a user can point at a trace; only TracekitError may come out."""
    for fn in (
        lambda: Trace(root).connect().close(),
        lambda: validate(root),
        lambda: validate(root, deep=False),
        lambda: info(root),
        lambda: run_query(Trace(root).connect(), "SELECT count(*), sum(logprob) FROM tokens"),
        lambda: run_query(Trace(root).connect(), "SELECT * FROM requests r JOIN tokens t USING (request_id)"),
        lambda: run_query(Trace(root).connect(), "SELECT * FROM replay_tokens, weights, engines, runs LIMIT 5"),
        lambda: load_snapshot(Trace(root), 1),
    ):
        try:
            fn()
        except TracekitError:
            pass


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_good_trace(tmp_path_factory.mktemp("fuzz") / "good")


def test_reader_survives_mutated_traces(good: Path, tmp_path: Path) -> None:
    failures = []
    for seed in range(N):
        root = tmp_path / f"m{seed}"
        shutil.copytree(good, root)
        what = mutate(root, random.Random(seed))
        before = tree_digest(root)
        try:
            exercise(root)
        except Exception as e:  # noqa: BLE001 - collect them all, report together
            failures.append(f"seed {seed} ({what}): {type(e).__name__}: {str(e)[:200]}")
        if tree_digest(root) != before:
            failures.append(f"seed {seed} ({what}): reading changed the trace")
        shutil.rmtree(root)
    print(f"FUZZ SUMMARY mutated traces tried: {N}, crashes: {len(failures)}")
    assert not failures, "\n".join(failures[:20])


def test_reader_survives_random_directories(tmp_path: Path) -> None:
    """Not a trace at all: random trees, with and without a plausible trace.json."""
    rng = random.Random(0)
    failures = []
    for k in range(40):
        root = tmp_path / f"r{k}"
        root.mkdir()
        for _ in range(rng.randint(0, 6)):
            d = root / rng.choice(["", "tokens", "requests", "weights/blobs/ab", "replays/x/tokens", "runs"])
            d.mkdir(parents=True, exist_ok=True)
            (d / rng.choice(["trace.json", "part-1.parquet", "x.parquet", "replay.json", "a"])).write_bytes(
                rng.randbytes(rng.randint(0, 512)))
        if rng.random() < 0.5:
            (root / "trace.json").write_text(rng.choice([
                '{"format": "tracekit-trace", "format_version": 1, "schema_hashes": {}}',
                '{"format": "tracekit-trace", "format_version": 1}',
                '{"format": "tracekit-trace", "format_version": 1.5, "schema_hashes": {}}',
                '{"format": "tracekit-trace", "format_version": 1, "schema_hashes": []}',
                'null', '"x"', '{}',
            ]))
        try:
            exercise(root)
        except Exception as e:  # noqa: BLE001
            failures.append(f"tree {k}: {type(e).__name__}: {str(e)[:200]}")
    assert not failures, "\n".join(failures[:20])


def test_cli_on_mutated_traces_exits_0_or_2_without_traceback(good: Path, tmp_path: Path) -> None:
    for seed in range(1000, 1008):
        root = tmp_path / f"c{seed}"
        shutil.copytree(good, root)
        what = mutate(root, random.Random(seed))
        for argv in (["validate", str(root)], ["info", str(root)], ["sql", str(root), "SELECT count(*) FROM tokens"]):
            r = subprocess.run([sys.executable, "-m", "tracekit.cli", *argv], capture_output=True, text=True,
                               timeout=300, stdin=subprocess.DEVNULL)
            assert r.returncode in (0, 2), (seed, what, argv, r.stderr[-1500:])
            assert "Traceback" not in r.stderr, (seed, what, argv, r.stderr[-1500:])
            if r.returncode == 2 and argv[0] != "validate":
                assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
