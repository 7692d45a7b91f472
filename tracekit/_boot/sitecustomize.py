"""Loaded by Python at start-up when `tracekit record` put this directory on PYTHONPATH."""

try:
    from tracekit.capture.launch import _boot

    _boot(__file__)
except Exception as _e:  # noqa: BLE001 - never break the job's interpreter start-up
    import sys

    print(f"tracekit: recording disabled ({type(_e).__name__}: {_e})", file=sys.stderr)
