"""Import rollout dumps written by other RL stacks (PipelineRL, slime, TRL, verl) into traces.

``import_run(stack, src, out, model=..., config=...)`` streams the dump into a new trace at
``out`` (written in a hidden temp directory, renamed into place only when complete) whose
trace.json ``import`` block records the source format and version, the sha256 of every input
file and why each field the source cannot hold is null. Importing never executes code from
the input (docs/import.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..errors import TracekitError
from .base import ImportResult

STACKS = ("pipelinerl", "slime", "trl", "verl")


def _importer(stack: str) -> Callable[..., ImportResult]:
    if stack == "pipelinerl":
        from .pipelinerl import import_pipelinerl

        return import_pipelinerl
    if stack == "slime":
        from .slime import import_slime

        return import_slime
    if stack == "trl":
        from .trl import import_trl

        return import_trl
    if stack == "verl":
        from .verl import import_verl

        return import_verl
    raise TracekitError(f"unknown stack {stack!r}; known: {', '.join(STACKS)}")


def import_run(stack: str, src: str | os.PathLike[str], out: str | os.PathLike[str], *,
               model: str | None = None, config: str | os.PathLike[str] | None = None, **kw: Any) -> ImportResult:
    """Import ``src`` (written by ``stack``) into a new trace at ``out``."""
    return _importer(stack)(src, out, model=model, config=config, **kw)


def null_reason(manifest: dict[str, Any], field: str) -> str | None:
    """Why ``field`` ('table.column' or 'table') is null in an imported trace, from its trace.json
    ``import`` block; None for a recorded trace or a field the import filled. Cause modules use it
    to say "inconclusive: <reason>" instead of reading a null as a default."""
    block = manifest.get("import")
    if not isinstance(block, dict):
        return None
    nulls = block.get("null_fields") or {}
    return nulls.get(field) or nulls.get(field.split(".", 1)[0])


__all__ = ["STACKS", "ImportResult", "import_run", "null_reason"]
