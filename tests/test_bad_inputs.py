"""Every bad input in the corpus (tests/bad_inputs.py): one clear line on stderr, exit code 2,
no traceback, and the trace byte-identical afterwards. Each case runs the real CLI in a fresh
process, so anything printed by interpreter shutdown or atexit hooks counts too."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from bad_inputs import CASES, Case, argv_for, build_good_trace, materialise, tree_digest


def run_cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRACEKIT_DEBUG"}
    env["COLUMNS"] = "200"
    return subprocess.run([sys.executable, "-m", "tracekit.cli", *argv], capture_output=True, text=True,
                          cwd=cwd, env=env, stdin=subprocess.DEVNULL, timeout=300)


@pytest.fixture(scope="module")
def good_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_good_trace(tmp_path_factory.mktemp("corpus") / "good")


@pytest.fixture(scope="module")
def outcomes(good_trace: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Run every case once, a few CLI processes at a time (start-up dominates each run)."""
    base = tmp_path_factory.mktemp("cases")

    def one(case: Case) -> tuple:
        trace, work = materialise(case, good_trace, base)
        before = tree_digest(trace)
        r = run_cli(argv_for(case, trace, work), work)
        return r, before, tree_digest(trace), trace, work

    with ThreadPoolExecutor(max_workers=4) as ex:
        return dict(zip([c.name for c in CASES], ex.map(one, CASES)))


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


def test_good_trace_is_accepted(good_trace: Path, tmp_path: Path) -> None:
    """The control: the unmutated trace passes every command the corpus uses."""
    before = tree_digest(good_trace)
    for argv in (["validate", str(good_trace)], ["info", str(good_trace)], ["weights", "verify", str(good_trace)],
                 ["sql", str(good_trace), "SELECT count(*) FROM tokens", "--format", "csv"],
                 ["weights", "export", str(good_trace), "1", "--out", str(tmp_path / "out")]):
        r = run_cli(argv, tmp_path)
        assert r.returncode == 0, (argv, r.stderr)
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert tree_digest(good_trace) == before


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.name, marks=[pytest.mark.xfail(reason=c.known_bug, strict=True)] if c.known_bug else [])
    for c in CASES
])
def test_bad_input_gives_one_line_and_exit_2(case: Case, outcomes: dict[str, tuple]) -> None:
    r, before, after, trace, work = outcomes[case.name]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert len(lines) == 1, f"want one line on stderr, got {len(lines)}:\n{r.stderr}"
    assert case.expect.lower() in lines[0].lower(), lines[0]
    assert after == before, "the command changed the trace"
    assert not (work / "UNPICKLED").exists(), "a pickle payload was unpickled"
    # a refused command leaves nothing where it pointed (no export dir, no COPY/EXPORT/ATTACH file)
    assert not any(p.name.startswith(("out", "exp", "evil", "o.")) for p in work.iterdir()), list(work.iterdir())


# ---------------------------------------------------------------------------- weights: never pickle
def test_pickle_blob_is_refused_and_never_unpickled(good_trace: Path, tmp_path: Path) -> None:
    """A pickle stored under its own (matching) sha256 passes the hash check, so only the
    safetensors check stands between it and the loader: it must refuse without unpickling."""
    import shutil

    from bad_inputs import _plant_blob, pickle_payload

    from tracekit.errors import WeightsError
    from tracekit.store import Trace
    from tracekit.store.weights import export_snapshot, load_snapshot, verify

    root = tmp_path / "t"
    shutil.copytree(good_trace, root)
    marker = tmp_path / "UNPICKLED"
    _plant_blob(lambda work: pickle_payload(marker), 9)(root, tmp_path)
    with pytest.raises(WeightsError, match="not a tracekit safetensors blob"):
        load_snapshot(Trace(root), 9)
    with pytest.raises(WeightsError):
        export_snapshot(Trace(root), 9, tmp_path / "out")
    assert any("not a tracekit safetensors blob" in p for p in verify(Trace(root)))
    assert not marker.exists() and not (tmp_path / "out").exists()
    import pickle

    pickle.loads(pickle_payload(marker))  # the control: this payload really would have run
    assert marker.exists()


_UNSAFE = ("torch.load(", "pickle.load(", "pickle.loads(", "cPickle", "dill.", "joblib.load", "cloudpickle",
           "allow_pickle=True", "weights_only=False", "pd.read_pickle", "shelve.open")


# The replay worker frames messages on a private pipe between tracekit's own parent and worker
# processes (never data read from a trace): a reviewed exception.
# slime's torch.save dumps: torch's restricted unpickler (weights_only=True), only after every global
# the pickle names was checked against an allow-list of plain tensors and containers
# (tracekit/importers/safe_torch.py; tests/test_import.py plants payloads and checks none runs).
_ALLOWED = {("tracekit/replay/worker.py", "yield pickle.loads(data)"),
            ("tracekit/importers/safe_torch.py",
             'return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)')}


def test_no_code_path_can_unpickle() -> None:
    """Weights are read with safetensors only: no pickle-capable loader anywhere in tracekit."""
    pkg = Path(__file__).resolve().parents[1] / "tracekit"
    hits = []
    for p in sorted(pkg.rglob("*.py")):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if (str(p.relative_to(pkg.parent)), code.strip()) in _ALLOWED:
                continue
            if any(u in code for u in _UNSAFE):
                hits.append(f"{p.relative_to(pkg.parent)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
