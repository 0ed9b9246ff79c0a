"""Checkpoint I/O: read safetensors / sharded directories / weights-only torch files, write
self-describing safetensors atomically.

The writer is our own (the safetensors format is a length-prefixed JSON header followed by raw
little-endian tensor bytes): the library's ``save_file`` serialises ``__metadata__`` from a hash
map, so the key order — and therefore the file's bytes — changes from run to run. We need
byte-identical output for the same input and options, and a writer that never holds a second copy
of the data. Files are read back with the safetensors library itself, which validates them.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import shutil
import struct
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from infercomp.errors import CheckpointError, InfercompError, OutputKept
from infercomp.formats import format_version

# The newest format this version reads. Files are written with the oldest version that describes
# them (``formats.format_version``), so older readers keep reading what they understand: 2 adds
# column scales of int8/int4 weights, which a version-1 reader would silently ignore; 3 adds the
# pack-quantized format (compressed-tensors' int32 packing, written in Hugging Face directories).
FORMAT_VERSION = 3
TORCH_SUFFIXES = (".pt", ".pth", ".bin")

# torch dtype <-> safetensors dtype code.
_DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.bool: "BOOL",
}


@dataclass
class Checkpoint:
    """Tensors as stored plus the metadata that says how they were made.

    Attributes:
        tensors: stored tensors by name; encoded (quantized / sparse) tensors appear in their
            stored form, described by ``encodings``.
        model: the model reference ``{"ref": str, "config": dict}`` that builds a module for
            these tensors, or None when unknown.
        history: one entry per transform that produced this file, oldest first.
        encodings: logical tensor name -> description of how it is stored.
        plan: optional extra structure a transform recorded (e.g. a pruning plan).
        path: where it was read from (None for an in-memory checkpoint).
    """

    tensors: dict[str, torch.Tensor]
    model: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    encodings: dict[str, dict[str, Any]] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    path: Path | None = None

    @property
    def size_bytes(self) -> int | None:
        """Bytes on disk of the file(s) this checkpoint was read from."""
        return None if self.path is None else disk_size(self.path)

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<memory>"

    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` map that describes this checkpoint."""
        info: dict[str, Any] = {
            "format_version": format_version(self.encodings, self.name),
            "model": self.model,
            "history": self.history,
            "encodings": self.encodings,
        }
        if self.plan is not None:
            info["plan"] = self.plan
        return {"format": "pt", "infercomp": json.dumps(info, sort_keys=True, separators=(",", ":"))}


# ---------------------------------------------------------------------------------------- reading


def load(path: str | os.PathLike[str], *, lazy: bool = False) -> Checkpoint:
    """Read a checkpoint: ``.safetensors``, a directory of safetensors shards (HF layout), or a
    ``.pt/.pth/.bin`` state dict (``torch.load(weights_only=True)`` only — never pickle).

    With ``lazy``, safetensors tensors are read from disk one at a time when asked for and not
    kept (``LazyTensors``): memory stays bounded by the largest tensor, whatever the file size."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir():
        return _load_dir(p, lazy)
    kind = _sniff(p)
    if kind == "safetensors":
        tensors, meta = _read_safetensors(p, lazy)
    elif kind == "torch":
        tensors, meta = _read_torch(p), {}
    else:
        raise CheckpointError(
            f"{p}: not a checkpoint (expected a .safetensors file, a .pt/.pth/.bin state dict, or a directory of *.safetensors)"
        )
    return _from_parts(tensors, meta, p)


def is_safetensors(p: Path) -> bool:
    """Whether the file ``p`` looks like safetensors (by its first bytes, else its suffix)."""
    return _sniff(p) == "safetensors"


def _sniff(p: Path) -> str | None:
    with open(p, "rb") as f:
        head = f.read(9)
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"  # zip (torch.save) or legacy pickle stream, read weights-only
    if p.suffix == ".safetensors":
        return "safetensors"  # let the reader report what is wrong with it
    return None


def _read_safetensors(p: Path, lazy: bool = False) -> tuple[Mapping[str, torch.Tensor], dict[str, str]]:
    if lazy:  # the header alone: safe_open would map the whole file (its size in address space)
        entries, meta = _header(p)
        return LazyTensors(entries), meta
    try:
        with safe_open(str(p), framework="pt") as f:  # validates the header and the offsets
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: not a valid safetensors file (truncated or corrupt?): {detail}") from e
    return tensors, meta


@dataclass(frozen=True)
class _Stored:
    """Where one tensor lies in a safetensors file."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


_HEADER_MAX = 100_000_000  # the safetensors library's own limit on the header's size


def _header(p: Path) -> tuple[dict[str, _Stored], dict[str, str]]:
    """Byte ranges (in file order) and metadata of a safetensors file, read from its header and
    checked as the safetensors library checks them (a JSON object; known dtypes; each tensor's
    bytes matching its shape; the data laid end to end, no gap or overlap, up to the file's end)
    without mapping the file, so a lazy read takes no address space for the data."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{p}: not a valid safetensors file (truncated or corrupt?): {why}")

    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(_HEADER_MAX, size - 8):
                raise bad(f"header length {n} does not fit in the file ({size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise bad(str(e)) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("__metadata__ is not a map of strings")
    entries: list[tuple[int, str, _Stored]] = []
    for k, e in header.items():
        ok = isinstance(e, dict) and isinstance(e.get("shape"), list) and isinstance(e.get("data_offsets"), list)
        ok = ok and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e["shape"] + e["data_offsets"])
        if not ok or len(e["data_offsets"]) != 2:
            raise bad(f"tensor {k!r} has no valid dtype / shape / data_offsets entry")
        if e.get("dtype") not in _CODE_DTYPES:
            raise CheckpointError(f"{p}: tensor {k!r} has dtype {e.get('dtype')}, which infercomp does not read")
        dtype = _CODE_DTYPES[e["dtype"]]
        start, end = e["data_offsets"]
        if end - start != math.prod(e["shape"]) * dtype.itemsize:
            raise bad(f"tensor {k!r} takes {end - start} bytes, its shape {e['shape']} needs {math.prod(e['shape']) * dtype.itemsize}")
        entries.append((start, k, _Stored(p, 8 + n + start, end - start, dtype, tuple(e["shape"]))))
    entries.sort(key=lambda x: (x[0], x[2].nbytes))
    at = 0
    for start, k, e in entries:
        if start != at:
            raise bad(f"tensor {k!r} starts at {start}, not where the data before it ends ({at})")
        at += e.nbytes
    if 8 + n + at != size:
        raise bad(f"the tensors end at byte {8 + n + at}, the file at {size}")
    return {k: e for _, k, e in entries}, meta


class LazyTensors(Mapping[str, torch.Tensor]):
    """The tensors of safetensors file(s), each read from disk when asked for and not kept.

    Each tensor is a private (copy-on-write) memory map of its own bytes: no copy is made, the
    page cache's pages are used as they are, and a write changes only this process's copy. Its
    pages count in the process's resident memory while the tensor lives and are unmapped when it
    is freed, so walking a file tensor by tensor stays bounded by the tensors held at once (a map
    of the whole file would show the whole file resident). A tensor whose bytes are not aligned
    for its dtype is read into a fresh tensor instead."""

    def __init__(self, entries: dict[str, _Stored]):
        self._entries = entries

    def __getitem__(self, key: str) -> torch.Tensor:
        e = self._entries[key]
        if e.nbytes == 0 or e.offset % e.dtype.itemsize:
            return self._read(key, e)
        with open(e.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < e.offset + e.nbytes:  # mapped bytes past the end would crash on access
                raise CheckpointError(f"{e.path}: truncated while reading tensor {key!r}")
            start = e.offset - e.offset % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(f.fileno(), e.offset + e.nbytes - start, offset=start, access=mmap.ACCESS_COPY)
        data = np.frombuffer(mapped, dtype=np.uint8, count=e.nbytes, offset=e.offset - start)  # holds the map
        return torch.from_numpy(data).view(e.dtype).reshape(e.shape)

    @staticmethod
    def _read(key: str, e: _Stored) -> torch.Tensor:
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        with open(e.path, "rb") as f:
            f.seek(e.offset)
            done = 0
            while done < e.nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{e.path}: truncated while reading tensor {key!r}")
                done += got
        return buf.view(e.dtype).reshape(e.shape)

    def __contains__(self, key: object) -> bool:
        return key in self._entries  # without reading it

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def meta(self) -> dict[str, torch.Tensor]:
        """Shape-and-dtype stand-ins (``device="meta"``) of every tensor: nothing is read."""
        return {k: torch.empty(e.shape, dtype=e.dtype, device="meta") for k, e in self._entries.items()}


def lazy_ranges(path: Path, ranges: Mapping[str, tuple[int, int, torch.dtype, list[int] | tuple[int, ...]]]) -> LazyTensors:
    """``LazyTensors`` over raw tensors in ``path``: name -> (byte offset, bytes, dtype, shape)."""
    return LazyTensors({n: _Stored(path, off, nb, dtype, tuple(shape)) for n, (off, nb, dtype, shape) in ranges.items()})


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Tensors to read shapes, dtypes and sizes from without reading data (meta stand-ins for a
    ``LazyTensors``)."""
    return tensors.meta() if isinstance(tensors, LazyTensors) else tensors


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _read_torch(p: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # its warnings about legacy files would come before our one-line error
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # untrusted bytes: whatever torch's reader trips on, it is not a state dict we can read
        text = _ANSI.sub("", str(e)).strip()  # torch's message carries terminal bold codes, even into a pipe
        first = text.splitlines()[0].split(" In PyTorch 2.6,")[0] if text else type(e).__name__  # not its advice to load unsafely
        raise CheckpointError(
            f"{p}: cannot be read as a weights-only torch state dict ({first}); "
            "only plain tensors are loaded, never pickled code — convert it to .safetensors"
        ) from e
    # Common wrappers: {"state_dict": {...}} / {"model": {...}}.
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict) and all(isinstance(v, torch.Tensor) for v in obj[key].values()):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{p}: holds {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{p}: entry {bad[0]!r} is not a tensor; expected a flat state dict of tensors")
    return {str(k): v.contiguous() for k, v in obj.items()}


def _load_dir(d: Path, lazy: bool = False) -> Checkpoint:
    index = sorted(d.glob("*.safetensors.index.json"))
    tensors: dict[str, Any] = {}
    meta: dict[str, str] = {}
    if index:
        try:
            weight_map = json.loads(index[0].read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index[0]}: not a valid safetensors index (needs a 'weight_map')") from e
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(x.name for x in d.glob("*.safetensors"))
    if shards:
        for shard in shards:
            sp = d / shard
            if not sp.exists():
                raise CheckpointError(f"{sp}: shard named in the index is missing")
            part, m = _read_safetensors(sp, lazy)
            tensors.update(part._entries if isinstance(part, LazyTensors) else part)
            meta = meta or m
        if lazy:
            tensors = LazyTensors(tensors)  # type: ignore[assignment]
    else:
        bins = sorted(x for x in d.iterdir() if x.suffix in TORCH_SUFFIXES)
        if not bins:
            raise CheckpointError(f"{d}: directory holds no *.safetensors or .pt/.pth/.bin checkpoint")
        for b in bins:
            tensors.update(_read_torch(b))
    ckpt = _from_parts(tensors, meta, d)
    cfg = d / "config.json"
    if ckpt.model is None and cfg.exists():
        try:
            ckpt.model = {"ref": "hf-auto", "config": json.loads(cfg.read_text())}  # see infercomp.hf
        except ValueError as e:
            raise CheckpointError(f"{cfg}: not valid JSON") from e
    return ckpt


def _from_parts(tensors: Mapping[str, torch.Tensor], meta: dict[str, str], p: Path) -> Checkpoint:
    raw = meta.get("infercomp")
    if raw is None:
        return Checkpoint(tensors=tensors, path=p)
    try:
        info = json.loads(raw)
    except RecursionError as e:
        raise CheckpointError(f"{p}: the 'infercomp' metadata is nested too deeply to read") from e
    except ValueError as e:
        raise CheckpointError(f"{p}: the 'infercomp' metadata is not valid JSON") from e
    version = info.get("format_version", 0) if isinstance(info, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{p}: the 'infercomp' metadata is malformed (expected an object with an integer format_version)")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{p}: written by a newer infercomp (format {version}, this one reads {FORMAT_VERSION}); upgrade infercomp")
    problem = _metadata_problem(info, tensors)
    if problem:
        raise CheckpointError(f"{p}: the 'infercomp' metadata is malformed: {problem}")
    return Checkpoint(
        tensors=tensors,  # type: ignore[arg-type]
        model=info.get("model"),
        history=list(info.get("history") or []),
        encodings=dict(info.get("encodings") or {}),
        plan=info.get("plan"),
        path=p,
    )


# Bounds on what a checkpoint's metadata may describe: anything beyond is not a file we wrote.
MAX_DEPTH = 32
MAX_ELEMENTS = 1 << 40  # elements of one logical tensor (a 4 TiB float32 tensor)


def _depth(v: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a JSON value, stopping once past ``limit``."""
    if limit < 0 or not isinstance(v, (dict, list)):
        return 0
    children = v.values() if isinstance(v, dict) else v
    return 1 + max((_depth(c, limit - 1) for c in children), default=0)


def _metadata_problem(info: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> str | None:
    """What is wrong with the ``infercomp`` metadata (types, required keys, nesting, shapes), or
    None. Checked before anything uses it, so a crafted file is one clear error, not a crash."""
    if _depth(info) > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels"
    model = info.get("model")
    if model is not None and not (
        isinstance(model, dict) and isinstance(model.get("ref"), str) and isinstance(model.get("config", {}), dict)
    ):
        return '\'model\' must be null or {"ref": string, "config": object}'
    history = info.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        return "'history' must be a list of objects"
    plan = info.get("plan")
    if plan is not None and not isinstance(plan, dict):
        return "'plan' must be an object"
    encodings = info.get("encodings", {})
    if not isinstance(encodings, dict):
        return "'encodings' must be an object"
    for name, spec in encodings.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("codec"), str):
            return f"encoding of {name!r} must be an object with a 'codec' string"
        shape = spec.get("shape")
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            return f"encoding of {name!r}: 'shape' must be a list of non-negative integers"
        if math.prod(shape) > MAX_ELEMENTS:
            return f"encoding of {name!r}: shape {shape} is absurdly large"
        dtype = spec.get("dtype", "float32")
        if not (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)):
            return f"encoding of {name!r}: 'dtype' {spec.get('dtype')!r} is not a torch dtype"
        if name in tensors and spec["codec"] not in ("int8", "int8-dynamic", "fp8"):
            return f"tensor {name!r} is stored plain and described as encoded"
    return None


# ---------------------------------------------------------------------------------------- writing


def save(ckpt: Checkpoint, path: str | os.PathLike[str], *, force: bool = False, source: Path | None = None) -> Path:
    """Write ``ckpt`` to ``path`` as safetensors, atomically (see ``write_atomic``). Refuses to
    overwrite ``source`` (the input) and, without ``force``, any existing file. The same tensors
    and metadata always give the same bytes."""
    out = Path(path)
    check_output(out, force=force, source=source)
    write_safetensors(out, ckpt.tensors, ckpt.metadata(), exclusive=not force)
    ckpt.path = out
    return out


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, what: str = "the checkpoint", exclusive: bool = False
) -> None:
    """Write ``tensors`` and ``metadata`` as one safetensors file, atomically, with a
    deterministic byte layout (tensors sorted by name, metadata keys sorted)."""
    header, blobs = _serialise(tensors, metadata)

    def write(f: IO[bytes]) -> None:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for blob in blobs:
            f.write(blob)

    write_atomic(path, write, what=what, exclusive=exclusive)


def write_atomic(path: Path, write: Callable[[IO[bytes]], None], *, what: str = "the output", exclusive: bool = False) -> None:
    """The one atomic writer: ``write`` fills a temp file in the same folder, which is fsynced and
    renamed over ``path``; a reader never sees half a file, and an error or Ctrl-C leaves no temp
    file behind. An OSError (read-only folder, full disk, no permission) becomes a one-line
    CheckpointError naming ``path``."""
    check_regular(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:  # without --force: a file another run wrote meanwhile is not replaced
            _link_new(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        if isinstance(e, FileExistsError) and exclusive and _blocker(path) is None:
            raise CheckpointError(
                f"{path}: already exists (written by another run meanwhile); pass --force (force=True in Python) to overwrite it"
            ) from e
        raise CheckpointError(f"{path}: cannot write {what} ({_why(path, e)})") from e
    except BaseException:  # Ctrl-C included: never leave a partial file behind
        _remove_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def stamp(p: Path) -> tuple[tuple[str, int, int], ...]:
    """Size and modification time of ``p`` (of every file under it, for a directory): taken
    before an input is read and compared before the output is written (``check_unchanged``)."""
    try:
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        return tuple((str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in files)
    except OSError:  # missing or unreadable: reading it says so, naming the problem
        return ()


def check_unchanged(p: Path, before: tuple[tuple[str, int, int], ...]) -> None:
    """A CheckpointError when ``p`` changed since ``stamp`` took ``before``: an input rewritten
    during the run would give an output of mixed provenance."""
    if stamp(p) != before:
        raise CheckpointError(f"{p}: changed while this run read it; nothing was written (rerun once it stays the same)")


def _blocker(path: Path) -> Path | None:
    """The first parent of ``path`` that exists as something other than a folder."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def _why(path: Path, e: OSError) -> str:
    """Why writing ``path`` failed, in words: a parent that is a file, else the system's reason."""
    blocker = _blocker(path)
    return f"{blocker} is a file, not a folder" if blocker is not None else str(e.strerror or e)


def _link_new(tmp: Path, path: Path) -> None:
    """``tmp`` renamed to ``path`` only if ``path`` does not exist, atomically (a hard link, which
    fails on an existing name, then the temp name dropped); FileExistsError otherwise. On a
    filesystem without hard links: a check, then a rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if path.exists():
            raise FileExistsError(str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def check_regular(path: Path) -> None:
    """Refuse an output path that exists and is not a regular file (a device such as /dev/null, a
    FIFO, a socket, a directory): renaming over it would replace it, even with --force."""
    if path.exists() or path.is_symlink():
        if path.is_dir():
            raise CheckpointError(f"{path}: is a directory; give a file path")
        if path.is_symlink() and not path.exists():
            raise CheckpointError(f"{path}: is a broken symbolic link (to {os.readlink(path)}); remove it or choose another path")
        if not path.is_file():
            raise CheckpointError(f"{path}: exists and is not a regular file (a device, FIFO or socket); choose another path")


@contextmanager
def after_write(out: Path, on_kept: Callable[[Path], None] | None = None) -> Iterator[None]:
    """Around the work done once ``out`` is written (reading it back, measuring it). Bad input
    found there (an ``InfercompError``, exit 2) removes the output, so that such an exit leaves
    none; an interrupt keeps the finished output and says so (``OutputKept``), after
    ``on_kept(out)`` (distill drops its resumable training state: the output is complete)."""
    try:
        yield
    except InfercompError as e:
        if out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        else:
            out.unlink(missing_ok=True)
        e.args = (f"{e} (the output {out} was removed)",)
        raise
    except KeyboardInterrupt as e:
        if on_kept is not None:
            on_kept(out)
        if isinstance(e, OutputKept):
            raise
        raise OutputKept(out) from e


def remove_stale_temps(path: Path) -> None:
    """Remove ``.NAME.PID.tmp`` files next to ``path`` left by a run that was killed (SIGKILL
    cannot be caught): those whose process no longer exists."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -len(".tmp")]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove_quietly(tmp)
        except OSError:
            pass  # the process exists (another user's): leave its file alone


def _remove_quietly(p: Path) -> None:
    try:
        p.unlink(missing_ok=True)
    except OSError:
        pass


WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
# The same weights exported for other runtimes (a Hub repo's onnx/, openvino/, TF, Flax, Rust...):
# copied beside the compressed ones they would be the stale, uncompressed original.
OTHER_WEIGHT_SUFFIXES = (".onnx", ".onnx_data", ".h5", ".msgpack", ".ot", ".gguf", ".tflite", ".mlmodel")
OTHER_WEIGHT_FOLDERS = ("onnx", "openvino", "coreml")


def other_weights(source: Path) -> list[str]:
    """Files of the ``source`` directory that hold its weights in another runtime's format; a
    Hugging Face directory written from it leaves them out."""
    return sorted(
        rel.as_posix()
        for rel in (f.relative_to(source) for f in source.rglob("*") if f.is_file())
        if rel.parts[0] in OTHER_WEIGHT_FOLDERS or rel.name.endswith(OTHER_WEIGHT_SUFFIXES)
    )


def other_weights_notes(source: Path) -> list[str]:
    """What ``save_dir`` leaves out of a directory written from ``source``, said in one note."""
    left = other_weights(source)
    if not left:
        return []
    return [f"left out {len(left)} file(s) of the input's export for other runtimes (e.g. {left[0]}): uncompressed, they would be stale"]


def save_dir(
    ckpt: Checkpoint | None,
    out: Path,
    *,
    source: Path,
    config: dict[str, Any] | None,
    force: bool = False,
    max_shard_size: int = 5 * 10**9,
    weights: Callable[[Path], None] | None = None,
) -> Path:
    """Write a Hugging Face directory: every file of the ``source`` directory that is not a weight
    file (tokenizer, sentence-transformers modules, README...; nor the weights in another runtime's
    format, ``other_weights``) copied, ``config.json`` replaced by
    ``config`` (when given), and the tensors as safetensors shards of at most ``max_shard_size``
    bytes (one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``, as ``shard_plan`` splits them), each carrying the infercomp
    metadata. ``weights(folder)``, given instead of ``ckpt``, writes the shards into ``folder``
    itself (a streamed run, from its spool). Written as a whole: into a temp directory beside
    ``out``, then renamed; an error or Ctrl-C leaves nothing."""
    check_output(out, force=force, source=source, directory=True)
    stale = set(other_weights(source))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for f in sorted(source.rglob("*")):
            rel = f.relative_to(source)
            if (
                f.is_dir()
                or f.name.endswith(WEIGHT_SUFFIXES)
                or f.name.endswith(".safetensors.index.json")
                or rel.as_posix() in ("config.json", *stale)
            ):
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, tmp / rel)
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if weights is not None:
            weights(tmp)
        elif ckpt is not None:
            _write_shards(tmp, ckpt, max_shard_size)
        if out.exists():
            if not force:  # another run wrote it meanwhile
                raise FileExistsError(str(out))
            os.replace(out, old)  # --force: the old directory goes only once the new one is complete
        os.replace(tmp, out)
    except FileExistsError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{out}: already exists (written by another run meanwhile); pass --force (force=True in Python) to overwrite it"
        ) from e
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{out}: cannot write the directory ({_why(out, e)})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)
    if ckpt is not None:
        ckpt.path = out
    return out


def _write_shards(folder: Path, ckpt: Checkpoint, max_shard_size: int) -> None:
    sizes = {name: ckpt.tensors[name].numel() * ckpt.tensors[name].element_size() for name in sorted(ckpt.tensors)}
    meta = ckpt.metadata()
    for file, names in shard_plan(folder, sizes, max_shard_size):
        write_safetensors(file, {k: ckpt.tensors[k] for k in names}, meta)


def shard_plan(folder: Path, sizes: dict[str, int], max_shard_size: int) -> list[tuple[Path, list[str]]]:
    """Split tensors (``sizes``: name -> stored bytes, sorted by name) into shards of at most
    ``max_shard_size`` bytes (a larger tensor gets a shard of its own): [(file, names)]. With more
    than one shard, writes ``model.safetensors.index.json`` into ``folder``."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in sizes.items():
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    if len(shards) == 1:
        return [(folder / "model.safetensors", shards[0])]
    files = [folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {k: f.name for f, part in zip(files, shards) for k in part}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(zip(files, shards))


def parse_size(text: str) -> int:
    """``--max-shard-size``: ``5GB``, ``500MB``, ``2GiB`` or a number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        value = int(float(num) * units[t[len(num) :]])
    except (ValueError, KeyError):
        value = 0
    if value <= 0:
        raise CheckpointError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return value


def check_output(out: Path, *, force: bool, source: Path | None, inputs: tuple[Path, ...] = (), directory: bool = False) -> None:
    """Raise CheckpointError when writing ``out`` would clobber the input, another file the run
    reads (``inputs``: a student, data files), or, without ``force``, an existing file."""
    if source is not None and source.exists() and out.exists() and _same(out, source):
        raise CheckpointError(f"{out}: output is the input file; choose another -o path (inputs are never overwritten)")
    for other in inputs:
        if other.exists() and out.exists() and _same(out, other):
            raise CheckpointError(f"{out}: output is also an input of this run ({other}); choose another -o path")
    if source is not None and source.is_dir() and out.resolve().is_relative_to(source.resolve()):
        raise CheckpointError(f"{out}: output lies inside the input directory {source}; choose another -o path")
    for read in (source, *inputs):  # replacing a directory replaces everything in it
        if read is not None and read.exists() and _holds(out, read):
            raise CheckpointError(f"{out}: output directory holds an input of this run ({read}); choose another -o path")
    if out.is_dir() and not directory:
        raise CheckpointError(f"{out}: is a directory; give a file path ending in .safetensors")
    if directory and out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; a Hugging Face model is written as a directory")
    if directory and _holds(out, Path.cwd()):
        raise CheckpointError(f"{out}: is the current directory or holds it; choose another -o path")
    if directory and out.is_dir() and any(out.iterdir()) and not _model_directory(out):
        raise CheckpointError(f"{out}: exists and holds no model (no config.json, model*.safetensors); choose another -o path")
    if not directory:
        check_regular(out)
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists; pass --force (force=True in Python) to overwrite it")


def _model_directory(d: Path) -> bool:
    """A directory --force may replace: a model's (ours or another's: config.json, or weights
    named model*.safetensors), not an arbitrary folder of the user's (data .safetensors included)."""
    return (d / "config.json").is_file() or any(d.glob("model*.safetensors"))


def _holds(folder: Path, p: Path) -> bool:
    """Whether ``p`` lies inside ``folder`` or is it, resolved or as written (a symlink inside
    the folder to a file elsewhere would be gone with the folder too)."""
    return any(
        Path(x).is_relative_to(Path(f)) for f in (folder.resolve(), os.path.abspath(folder)) for x in (p.resolve(), os.path.abspath(p))
    )


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _serialise(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[bytes]]:
    layout: list[tuple[str, torch.dtype, list[int], int]] = []
    blobs: list[bytes] = []
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.dtype not in _DTYPE_CODES:
            raise CheckpointError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        blob = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        layout.append((name, t.dtype, list(t.shape), len(blob)))
        blobs.append(blob)
    return header_bytes(layout, metadata), blobs


def header_bytes(layout: list[tuple[str, torch.dtype, list[int], int]], metadata: dict[str, str]) -> bytes:
    """The JSON header of a safetensors file whose tensors ``(name, dtype, shape, bytes)`` follow
    it in this order (sorted by name, for our deterministic layout), padded to 8 bytes."""
    entries: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name, dtype, shape, n in layout:
        if dtype not in _DTYPE_CODES:
            raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        entries[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header = json.dumps(entries, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)  # the format pads the header to 8 bytes with spaces


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------- helpers


def check_finite(ckpt: Checkpoint) -> None:
    """Raise CheckpointError naming the first stored float tensor (weights, scales) that holds
    NaN or infinity: compressing or measuring such a model gives numbers that mean nothing."""
    for name in sorted(ckpt.tensors):
        t = ckpt.tensors[name]
        if not t.is_floating_point():
            continue
        x = t.float() if t.element_size() == 1 else t  # fp8: checked as float32
        # Any NaN or infinity makes the sum non-finite, so a finite sum clears the tensor in one
        # cheap pass (isfinite().all() makes a bool tensor and reads it again); a sum that merely
        # overflowed falls through to the exact count below.
        if bool(torch.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))):
            continue
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise CheckpointError(
                f"{ckpt.name}: tensor {name!r} holds {bad} NaN or infinite value(s); pass --allow-nonfinite to go on anyway"
            )


def disk_size(path: Path) -> int:
    """Bytes on disk: the file, or the checkpoint files of a directory."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and (f.suffix in (".safetensors", *TORCH_SUFFIXES)))
    return path.stat().st_size


def sha256(path: Path) -> str:
    """SHA-256 of a file, or of a directory's checkpoint files (names and contents, sorted)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
    buf = bytearray(8 << 20)  # read into one buffer: a fresh bytes object a chunk took a third longer
    view = memoryview(buf)
    for f in files:
        if path.is_dir():
            h.update(f.name.encode() + b"\0")
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
    return h.hexdigest()
