"""The fault zoo: `attribute` on jobs written the way RL stacks write them (tests/zoo.py), on real
vLLM CPU engines. Every run plants known causes; attribution must name exactly those, with the
right fix, and nothing for the clean runs. Engines are pooled per engine config for the module
(5 offline engines for 13 offline runs); the AsyncLLM and zero-code runs start their own.

The table of results (run, planted, found, gap, shares, measured noise, seconds) is printed at
the end and written to $TRACEKIT_ZOO_TABLE when set.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zoo

from tracekit.attribute import Attribution, attribute
from tracekit.testing.faults import DEFAULT_LOGIT_OFFSET, Faults, prepare_model

pytestmark = pytest.mark.engine

# What the fix must name for each cause (vLLM's own argument names); weight_sync's depends on how
# the push went wrong.
FIX_NAMES = {
    "logprob_mode": "processed_logprobs",
    "runtime_defaults": 'generation_config="vllm"',
    "weight_sync": "reload_weights",
    "lm_head_precision": '"head_dtype": "float32"',
}
WEIGHT_SYNC_FIX = {"no_reset": "reset_prefix_cache", "async": "weight_versions"}
RESULTS: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def zoo_dirs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Version checkpoints v0..v2 of one model (realistic logit scale), per model-file sampling
    defaults (none, T 0.5 / top-k 20, top-k 3)."""
    root = tmp_path_factory.mktemp("zoo-models")
    base = prepare_model(Faults(), tiny_model, work_dir=root, logit_offset=DEFAULT_LOGIT_OFFSET)
    return {fd: zoo.make_versions(base, root / (fd or "plain"), 3, file_defaults=fd) for fd in zoo.FILE_DEFAULTS}


@pytest.fixture(scope="module")
def zoo_engine(zoo_dirs: dict[str, list[Path]]):
    """``get(run)`` → an in-process vllm.LLM for the run's engine config, shared by the module."""
    from vllm import LLM

    engines: dict[tuple, Any] = {}

    def get(run: zoo.Run) -> Any:
        key = run.engine_key()
        if key not in engines:
            engines[key] = LLM(model=str(zoo_dirs[run.file_defaults][0]), **run.engine_args())
        return engines[key]

    yield get
    for llm in engines.values():
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass


@pytest.fixture(scope="module", autouse=True)
def zoo_table():
    yield
    if not RESULTS:
        return
    cols = ["run", "planted", "found", "gap", "share alone", "noise", "tolerance", "floor", "replays", "seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in RESULTS:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    text = "\n".join(lines)
    print("\n" + text)
    if os.environ.get("TRACEKIT_ZOO_TABLE"):
        Path(os.environ["TRACEKIT_ZOO_TABLE"]).write_text(text + "\n")


def _record(run: zoo.Run, out: Path, dirs: list[Path], engine: Any) -> None:
    import tracekit

    trainer = zoo.Trainer(dirs)
    if run.surface == "zero_code":
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "tracekit.cli", "record", "--out", str(out), "--flush-interval", "0.5", "--",
               sys.executable, zoo.__file__, zoo.run_json(run), json.dumps([str(d) for d in dirs])]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return
    if run.surface == "async":
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        async def go() -> None:
            eng = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(dirs[0]), **run.engine_args()))
            try:
                rec = tracekit.Recorder(out, flush_interval=0.5)
                rec.wrap(eng)
                await zoo.run_async(eng, rec, run, dirs, trainer)
                rec.close()
            finally:
                eng.shutdown()

        asyncio.run(go())
        return
    rec = tracekit.Recorder(out, flush_interval=0.5)
    llm = rec.wrap(engine)
    try:
        zoo.run_sync(llm, rec, run, dirs, trainer)
    finally:
        rec.close()
        zoo.restore(engine, dirs)
    assert rec.errors == 0, rec.error_messages


@pytest.mark.parametrize("run", zoo.ZOO, ids=[r.name for r in zoo.ZOO])
def test_zoo_names_exactly_the_planted_causes(run: zoo.Run, zoo_dirs, zoo_engine, tmp_path: Path) -> None:
    dirs = zoo_dirs[run.file_defaults]
    engine = zoo_engine(run) if run.surface not in ("async", "zero_code") else None
    out = tmp_path / run.name
    _record(run, out, dirs, engine)
    t0 = time.time()
    res: Attribution = attribute(out)
    seconds = time.time() - t0
    found = sorted(res.found())
    cal = res.calibration
    RESULTS.append({
        "run": run.name, "planted": "+".join(run.planted) or "-", "found": "+".join(found) or "-",
        "gap": f"{res.gap.mean_abs_delta:.4f}" if res.gap and res.gap.mean_abs_delta is not None else "-",
        "share alone": ", ".join(f"{c.id.split('_')[0]} {100 * c.rung.share_alone:.0f}%" for c in res.causes
                                 if c.id in found and c.rung and c.rung.share_alone is not None) or "-",
        "noise": "-" if cal.noise is None else f"{cal.noise:.2g}", "tolerance": f"{cal.tol:.2g}",
        "floor": f"{cal.floor_used:.4f}", "replays": len(res.replays_used), "seconds": f"{seconds:.0f}",
    })
    detail = json.dumps({c.id: [c.verdict, c.reason] for c in res.causes}, indent=1)
    assert found == sorted(run.planted), detail
    for c in res.causes:
        if c.id in run.planted:
            want = WEIGHT_SYNC_FIX.get(run.push if run.surface != "async" else "async", FIX_NAMES[c.id]) \
                if c.id == "weight_sync" else FIX_NAMES[c.id]
            assert want in c.fix, (c.id, c.fix)
    # Every token's version is known or honestly null; none is tagged with a version the job never had.
    from tracekit.store.reader import Trace

    with Trace(out).connect(read_only=True) as con:
        bad = con.execute("SELECT count(*) FROM tokens WHERE weight_version NOT IN (0, 1, 2)").fetchone()[0]
    assert bad == 0
