"""Training-state checkpoints of ``relufy train``: what the output folder holds, and why.

``OUTPUT_DIR/run.json``
    The run's identity: ``{"format": "relufy-run", "version": 1, "run_id": ..., "name": ...}``,
    written when a run starts. Every checkpoint records the same ``run_id``; ``--resume`` takes
    no checkpoint of another run, and a fresh run (no ``--resume``) into a folder that already
    holds one (``metrics.jsonl``, ``checkpoints/``, ``final/`` or ``summary.json``) is refused.
    While a run trains, ``.NAME.relufy-lock`` beside the output folder is locked (``flock``,
    released by the kernel even on SIGKILL): a second run into the same folder stops at once.

``OUTPUT_DIR/checkpoints/step-NNNNNNNN/`` (the newest ``checkpoint.keep_last`` are kept)
    ``model.safetensors``
        The weights (Accelerate's ``save_state``; safetensors holds tensors only, no code).
        FSDP2 writes sharded folders instead of this file and ``optimizer.bin``:
        ``pytorch_model_fsdp_0/`` and ``optimizer_0/`` (``torch.distributed.checkpoint``: one
        ``__R_0.distcp`` per process ``R`` with its shards, tensors loaded with
        ``weights_only=True``, and a pickled ``.metadata``, see below). Every process writes its
        own files into the one folder, so with several machines ``output_dir`` must be on a
        filesystem they share; the manifest lists them all.
    ``optimizer.bin``
        AdamW's state (``torch.save``); Accelerate loads it with ``torch.load(weights_only=True)``,
        which builds tensors and plain containers only.
    ``random_states_R.pkl``
        The RNG states of process ``R`` (Python, NumPy, torch, CUDA), written by Accelerate.
        relufy reads each one itself with ``weights_only=True`` before resuming and sets the
        states itself: Accelerate's own loader ignores any failure, so a damaged file would
        resume silently with other random numbers.
    ``relufy_state.json``
        relufy's own state, as JSON: the step, the learning-rate scheduler, the data mixture's
        position (draw counts and each streaming dataset's position). It is not handed to
        Accelerate's custom-state mechanism, which stores pickles and unpickles them with
        ``weights_only=False`` (a planted file would run code on ``--resume``).
    ``manifest.json``
        Written last: the run id, the step and every other file of the folder with its size and
        SHA-256 (all files are hashed, large ones included: verifying reads the checkpoint once
        more, about a second per GB). ``--resume`` takes the newest checkpoint whose manifest
        verifies (every file present with its size and hash, no file the manifest does not
        list, this run's id) and whose RNG files load; each one it skips is named on one line
        and moved aside to ``checkpoints/rejected-step-N`` (kept for inspection, never loaded).
        With no intact checkpoint, ``--resume`` starts again from step 0 and says so.

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed to ``step-N`` once its
manifest is on disk (files and folder fsynced), so a kill leaves at most a ``.tmp-step-N``,
which the next start removes. A checkpoint is written only when the step's loss, its gradient
norm, every parameter and the optimizer state are finite on every process, and older
checkpoints are removed only after a new one is whole: the checkpoint a divergence message
names as the last good one is good.

The main process hashes while the others wait in a collective, so ``relufy train`` raises the
process group's timeout to two hours: a checkpoint of hundreds of GB does not time out.

Checkpoints of earlier relufy versions (``custom_checkpoint_*.pkl``, no manifest) are refused:
they are never unpickled. FSDP2's sharded folders hold a pickled ``.metadata`` that PyTorch's
loader unpickles; relufy reads each one first with an unpickler that admits only the checkpoint
metadata classes, and treats anything else as damage. A resumed FSDP2 run continues exactly
(tested with 2 processes killed by SIGKILL), provided it has as many processes as the one that
saved: with another count it goes on, with a notice, but not as the original would have.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RelufyError

RUN_FILE = "run.json"
STATE_FILE = "relufy_state.json"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
RUN_MARKERS = ("metrics.jsonl", "checkpoints", "final", "summary.json")
_STEP = re.compile(r"^step-(\d{8,})$")


# --- JSON written by relufy ----------------------------------------------------------------


def finite_json(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    """Standard JSON only: non-finite floats become null."""
    return json.dumps(finite_json(value), allow_nan=False, **kwargs)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fresh(tmp: Path):
    """``tmp`` opened for writing as a new file: a leftover under its name (or a link planted
    there) is removed first, and the open never follows a link (``x``: O_CREAT | O_EXCL)."""
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    return open(tmp, "x")


def write_json(path: Path, value) -> None:
    """``path`` replaced atomically (temporary file, fsync, rename) by ``value`` as JSON."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.relufy-tmp")
    with _fresh(tmp) as f:
        f.write(dumps(value, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.relufy-tmp")
    with _fresh(tmp) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json_object(path: Path) -> dict | None:
    if not Path(path).is_file():  # a FIFO or device planted under a JSON name would block or never end
        return None
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# --- the run -------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl``; a line that is not a whole JSON object with a ``step``
    (a run killed while appending leaves a partial last line) is dropped."""
    rows = []
    if not Path(path).is_file():
        return rows
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row.get("step"), bool):
            rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (what the resumed checkpoint had logged), drop the rest."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_file():
        raise RelufyError(f"{path} is not a plain file; move it away")
    kept = [row for row in read_metrics(path) if row["step"] <= step]
    if kept:
        write_text(path, "".join(dumps(row) + "\n" for row in kept))
    else:
        path.unlink()


def run_markers(out: Path) -> list[str]:
    """What in ``out`` shows that a run already wrote there."""
    return [name for name in RUN_MARKERS if (out / name).exists() or (out / name).is_symlink()]


def read_run_id(out: Path) -> str | None:
    """The run id of ``out/run.json``; None when there is none; refused when it is damaged."""
    path = out / RUN_FILE
    if not path.exists():
        return None
    run = _read_json_object(path)
    if not run or run.get("format") != "relufy-run" or not isinstance(run.get("run_id"), str) or not run["run_id"]:
        raise RelufyError(f"{path} is damaged (not a relufy run file); move the run folder away or repair the file")
    return run["run_id"]


def write_run(out: Path, run_id: str, name: str) -> None:
    write_json(out / RUN_FILE, {"format": "relufy-run", "version": FORMAT_VERSION, "run_id": run_id, "name": name})


def new_run_id() -> str:
    return uuid.uuid4().hex


# --- writing a checkpoint ------------------------------------------------------------------


def step_of(path: Path) -> int | None:
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoint_dirs(out: Path) -> list[Path]:
    """``checkpoints/step-N`` folders, oldest first (by step number)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=step_of)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def remove_leftovers(out: Path) -> list[Path]:
    """``.tmp-step-*`` folders of checkpoints whose writing was killed."""
    root = Path(out) / "checkpoints"
    removed = []
    if root.is_dir():
        for tmp in sorted(root.glob(".tmp-step-*")):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _files(folder: Path) -> list[str]:
    """Every entry under ``folder`` but the manifest, as relative POSIX paths (links and other
    non-files included, so that verification sees them)."""
    names = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_dir() and not path.is_symlink():
                continue
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST:
                names.append(rel)
    return sorted(names)


def _hash(path: Path, sync: bool = False) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return size, digest.hexdigest()


def write_state(tmp: Path, state: dict) -> None:
    """``relufy_state.json`` into the checkpoint being written."""
    (Path(tmp) / STATE_FILE).write_text(dumps(state, indent=1) + "\n")


def finish(tmp: Path, final: Path, run_id: str, step: int) -> None:
    """Hash (and fsync) every file of ``tmp``, write the manifest last, rename ``tmp`` to ``final``."""
    tmp, final = Path(tmp), Path(final)
    files = {}
    for rel in _files(tmp):
        path = tmp / rel
        if path.is_symlink() or not path.is_file():
            raise RelufyError(f"{path}: a checkpoint holds only files (found a link or special file)")
        size, sha = _hash(path, sync=True)
        files[rel] = {"size": size, "sha256": sha}
    manifest = {"format": "relufy-checkpoint", "version": FORMAT_VERSION, "run_id": run_id, "step": step, "files": files}
    with open(tmp / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    for dirpath, _, _ in os.walk(tmp):
        _fsync_dir(Path(dirpath))
    if final.exists() or final.is_symlink():
        raise RelufyError(f"{final} appeared while relufy was writing it (another writer?); stopped")
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def rotate(out: Path, keep_last: int, run_id: str, current: int) -> None:
    """Remove this run's checkpoints older than the newest ``keep_last`` (call after a good save)."""
    ours = []
    for path in checkpoint_dirs(out):
        if step_of(path) > current:
            continue  # never expected (resume moves later ones aside); never removed either
        manifest = _read_json_object(path / MANIFEST)
        if manifest and manifest.get("run_id") == run_id:
            ours.append(path)
    for old in ours[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# --- verifying ---------------------------------------------------------------------------------


class OldFormat(RelufyError):
    pass


@dataclass
class Verdict:
    path: Path
    reason: str | None = None  # None: intact
    state: dict = field(default_factory=dict)


def _rng_ok(path: Path) -> str | None:
    try:
        load_rng(path)
    except pickle.UnpicklingError:
        return f"{path.name} cannot be read as RNG states (it holds pickled objects other than tensors; not run)"
    except Exception as e:  # noqa: BLE001 - any failure means the file cannot be used
        return f"{path.name} cannot be read as RNG states ({_first_line(e)})"
    return None


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def verify(path: Path, run_id: str | None) -> Verdict:
    """Whether the checkpoint folder ``path`` can be resumed from: its reason is None if so."""
    try:
        return _verify(Path(path), run_id)
    except OSError as e:
        return Verdict(Path(path), f"cannot be read ({e.strerror or e})")


def _verify(path: Path, run_id: str | None) -> Verdict:
    step = step_of(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        if list(path.glob("custom_checkpoint_*.pkl")) and not (path / STATE_FILE).exists():
            raise OldFormat(
                f"{path} was written by an earlier relufy (pickled custom_checkpoint_*.pkl, no {MANIFEST}); relufy no "
                "longer loads pickled training state: train into another output_dir (or move the checkpoints away)"
            )
        return Verdict(path, f"no {MANIFEST} (incomplete or damaged)")
    manifest = _read_json_object(manifest_path)
    if not manifest or manifest.get("format") != "relufy-checkpoint" or not isinstance(manifest.get("files"), dict):
        return Verdict(path, f"{MANIFEST} is damaged")
    if manifest.get("version") != FORMAT_VERSION:
        return Verdict(path, f"{MANIFEST} has version {manifest.get('version')!r}, this relufy reads {FORMAT_VERSION}")
    if run_id is None or manifest.get("run_id") != run_id:
        return Verdict(path, f"it belongs to another run (run id {manifest.get('run_id')!r}, this run's is {run_id!r})")
    if manifest.get("step") != step:
        return Verdict(path, f"its manifest is for step {manifest.get('step')!r}")
    listed = manifest["files"]
    present = _files(path)
    extra = [name for name in present if name not in listed]
    if extra:
        return Verdict(path, f"it holds files its manifest does not list ({', '.join(extra[:3])})")
    missing = [name for name in listed if name not in present]  # also names that point out of the folder
    if missing:
        return Verdict(path, f"{', '.join(sorted(missing)[:3])} missing")
    for name, entry in sorted(listed.items()):
        file = path / name
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
            return Verdict(path, f"{MANIFEST} is damaged (entry {name!r})")
        if file.is_symlink() or not file.is_file():
            return Verdict(path, f"{name} is not a plain file")
        size = file.stat().st_size
        if size != entry["size"]:
            return Verdict(path, f"{name} has {size:,} bytes, the manifest says {entry['size']:,} (truncated or damaged)")
        if _hash(file)[1] != entry["sha256"]:
            return Verdict(path, f"{name} does not match its SHA-256 in the manifest (damaged)")
    state = _read_json_object(path / STATE_FILE)
    if not state or state.get("format") != "relufy-train-state" or state.get("step") != step:
        return Verdict(path, f"{STATE_FILE} is damaged")
    if not isinstance(state.get("scheduler"), dict) or not isinstance(state.get("mixture"), dict):
        return Verdict(path, f"{STATE_FILE} lacks the scheduler or data state")
    if problem := scheduler_problem(state["scheduler"], scheduler_reference(), step, lengths=False):
        return Verdict(path, f"{STATE_FILE}: the scheduler state is damaged ({problem})")
    rng = sorted(n for n in listed if re.fullmatch(r"random_states_\d+\.pkl", n))
    if not rng:
        return Verdict(path, "it holds no RNG states (random_states_*.pkl)")
    for name in rng:
        if reason := _rng_ok(path / name):
            return Verdict(path, reason)
    for name in listed:
        if Path(name).name == ".metadata":
            if reason := _dcp_metadata_ok(path / name):
                return Verdict(path, reason)
    if any(Path(n).name.startswith("custom_checkpoint_") for n in listed):
        return Verdict(path, "it holds Accelerate custom-state pickles (custom_checkpoint_*.pkl), which relufy never loads")
    return Verdict(path, None, state)


def scheduler_reference() -> dict:
    """The state of the scheduler relufy trains with (``LambdaLR``), fresh: its keys and their types."""
    import torch

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0).state_dict()


def _finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def scheduler_problem(saved: dict, reference: dict, step: int, lengths: bool = True) -> str | None:
    """Why a checkpoint's scheduler state ``saved`` cannot be loaded where ``reference`` is the
    scheduler's own state (``LambdaLR.load_state_dict`` copies every key into the scheduler, so a
    key or type that differs would break the run at its next step); None if it can. ``lengths``:
    lists must also have the reference's lengths (one entry per parameter group)."""
    if set(saved) != set(reference):
        odd = sorted(str(k) for k in set(saved) ^ set(reference))
        return f"its keys differ from the scheduler's: {', '.join(odd[:3])}"
    for key, ref in reference.items():
        value = saved[key]
        if isinstance(ref, bool):
            ok = isinstance(value, bool)
        elif isinstance(ref, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif isinstance(ref, float):
            ok = _finite_number(value)
        elif ref is None:
            ok = value is None
        elif isinstance(ref, list | tuple):
            ok = isinstance(value, list) and (not lengths or len(value) == len(ref)) and bool(value)
            kinds = {type(r) for r in ref}
            if ok and kinds <= {type(None)}:
                ok = all(v is None for v in value)
            elif ok:
                ok = all(_finite_number(v) for v in value)
        else:
            ok = value == ref
        if not ok:
            return f"{key} is {_short(value)}"
    if saved.get("last_epoch") != step:
        return f"last_epoch is {_short(saved.get('last_epoch'))}, the checkpoint's step {step}"
    return None


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def choose(out: Path, run_id: str | None) -> tuple[Verdict | None, list[Verdict]]:
    """``(newest intact checkpoint or None, the newer ones rejected)``; an old-format checkpoint
    stops the search with a refusal."""
    rejected = []
    for path in reversed(checkpoint_dirs(out)):
        verdict = verify(path, run_id)
        if verdict.reason is None:
            return verdict, rejected
        rejected.append(verdict)
    return None, rejected


def set_aside(verdict: Verdict) -> Path:
    """Move a rejected checkpoint to ``checkpoints/rejected-step-N`` (never loaded, never rotated)."""
    target = verdict.path.with_name(f"rejected-{verdict.path.name}")
    if target.exists() or target.is_symlink():
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() and not target.is_symlink() else target.unlink()
    verdict.path.rename(target)
    return target


# --- RNG states ----------------------------------------------------------------------------


def load_rng(path: Path) -> dict:
    """A ``random_states_R.pkl`` read with ``weights_only=True`` (tensors, NumPy arrays and plain
    containers; never arbitrary objects), checked for the states relufy sets."""
    from accelerate.utils import load

    states = load(path, map_location="cpu", weights_only=True)
    import numpy as np
    import torch

    if not isinstance(states, dict):
        raise ValueError("not a dict of states")
    py = states.get("random_state")
    if not (isinstance(py, tuple) and len(py) == 3 and isinstance(py[1], tuple) and len(py[1]) == 625):
        raise ValueError("no Python random state")
    npy = states.get("numpy_random_seed")
    if not (isinstance(npy, tuple) and len(npy) == 5 and isinstance(npy[1], np.ndarray) and npy[1].shape == (624,)):
        raise ValueError("no NumPy random state")
    t = states.get("torch_manual_seed")
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1):
        raise ValueError("no torch random state")
    cuda = states.get("torch_cuda_manual_seed")
    if cuda is not None and not (
        isinstance(cuda, list) and all(isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in cuda)
    ):
        raise ValueError("a damaged CUDA random state")
    return states


def restore_rng(path: Path) -> None:
    """Set this process's RNG states from ``path`` (errors propagate: no silent fallback)."""
    import numpy as np
    import torch

    states = load_rng(path)
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    cuda = states.get("torch_cuda_manual_seed")
    if cuda and torch.cuda.is_available():  # the devices both machines have
        for index, device_state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


# --- FSDP's pickled checkpoint metadata --------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """Admits the classes of ``torch.distributed.checkpoint`` metadata and nothing else."""

    def find_class(self, module, name):
        import pathlib

        import torch

        obj = None
        if module == "torch.distributed.checkpoint.metadata":
            import torch.distributed.checkpoint.metadata as meta

            obj = getattr(meta, name, None)
            obj = obj if isinstance(obj, type) else None
        elif (module, name) == ("torch.distributed.checkpoint.filesystem", "_StorageInfo"):
            from torch.distributed.checkpoint.filesystem import _StorageInfo as obj
        elif module == "torch" and name == "Size":
            obj = torch.Size
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            obj = torch.serialization._get_layout
        elif module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"):
            obj = getattr(pathlib, name)
        elif (module, name) in (("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")):
            import collections

            obj = collections.OrderedDict if name == "OrderedDict" else {"set": set, "frozenset": frozenset}[name]
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return obj


def _dcp_metadata_ok(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except Exception as e:  # noqa: BLE001
        return f"{path.name} is not plain checkpoint metadata ({_first_line(e)})"
    return None
