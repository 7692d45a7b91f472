"""Errors that mean "bad input": the CLI prints them as one line and exits 2."""

from __future__ import annotations


class TracekitError(Exception):
    """Base class: a problem with the user's input, not a tracekit bug."""

    exit_code = 2


class TraceFormatError(TracekitError):
    """The directory is not a readable trace (manifest, version, part schema)."""


class TraceIntegrityError(TracekitError):
    """The trace is readable but inconsistent (dangling references, bad hashes)."""


class WeightsError(TracekitError):
    """A weight snapshot is missing, not safetensors, or fails its sha256 check."""


class QueryError(TracekitError):
    """SQL that is invalid or not allowed on a read-only trace."""


class EngineError(TracekitError):
    """The engine refused a configuration (e.g. an --engine-arg vLLM rejects)."""


class SourceError(TracekitError):
    """An import source (another stack's rollout dump) is corrupt, truncated, inconsistent, not the
    format it claims, or needs code execution to read (a pickle that is not plain tensors)."""
