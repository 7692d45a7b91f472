"""Read a ``torch.save`` file without running code from it.

Two locks. First, the pickle inside the zip archive is scanned opcode by opcode
(``pickletools.genops`` only decodes, it executes nothing) and every global it would import must
be on an allow-list of plain tensors and containers; anything else (a class, a function,
``os.system``, numpy objects) refuses the file with one line. Then torch's own restricted
unpickler (``weights_only=True``) reads it. A file that is not a torch zip
archive (a bare pickle, the pre-1.6 format) is refused before anything is unpickled.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from typing import Any

from ..errors import SourceError

_STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
ALLOWED_GLOBALS = frozenset(
    {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor", "collections.OrderedDict",
     "torch.storage.UntypedStorage", "torch.UntypedStorage"}
    | {f"torch.{s}Storage" for s in _STORAGES}
)
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def pickle_globals(data: bytes) -> list[str]:
    """Every ``module.name`` the pickle ``data`` would import, found without unpickling it."""
    out: list[str] = []
    memo: dict[int, Any] = {}
    strings: list[str] = []  # recent string pushes, for STACK_GLOBAL (protocol 4+)
    last: Any = None
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name == "GLOBAL":
            out.append(str(arg).replace(" ", "."))
        elif name == "STACK_GLOBAL":
            if len(strings) < 2:
                raise SourceError("pickle imports a global it builds at run time: refused")
            out.append(f"{strings[-2]}.{strings[-1]}")
        elif name in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"):
            out.append(f"<{name} {arg}>")  # never allowed: object construction outside the list
        if name in _STRING_OPS:
            last = str(arg)
            strings.append(last)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = last
        elif name == "MEMOIZE":
            memo[len(memo)] = last
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            v = memo.get(int(arg))
            if isinstance(v, str):
                strings.append(v)
            last = v
        elif name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            last = None
    return out


def load_torch_file(data: bytes, where: str) -> Any:
    """The object a ``torch.save`` wrote, read from its bytes with the two locks above."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        pkls = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise SourceError(f"{where}: not a torch.save archive (no data.pkl)")
        pkl = z.read(pkls[0])
    except zipfile.BadZipFile:
        raise SourceError(f"{where}: not a torch.save zip archive (a bare pickle or a truncated file): refused, "
                          "importing never unpickles") from None
    except (OSError, EOFError, ValueError, zipfile.LargeZipFile) as e:
        raise SourceError(f"{where}: corrupt torch.save archive ({str(e).splitlines()[0][:80]})") from None
    try:
        bad = [g for g in pickle_globals(pkl) if g not in ALLOWED_GLOBALS]
    except SourceError as e:
        raise SourceError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a pickle that does not even decode
        raise SourceError(f"{where}: corrupt pickle in the torch.save archive ({str(e).splitlines()[0][:80]})") from None
    if bad:
        raise SourceError(f"{where}: needs {bad[0]} to load, which is not a plain tensor or container: refused "
                          "(importing never runs code from the input)")
    try:
        import torch
    except ImportError:
        raise SourceError(f"{where}: reading torch.save files needs torch (pip install torch)") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's restricted unpickler refused or the data is corrupt
        raise SourceError(f"{where}: torch refused the file ({str(e).splitlines()[0][:120]})") from None
