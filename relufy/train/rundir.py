"""The run folder (``output_dir``): what ``relufy train`` writes there, and what it will not touch.

relufy manages these entries of ``output_dir``: the folders ``checkpoints/``, ``final/`` and
``exports/``, the files ``run.json``, ``recipe.yaml``, ``metrics.jsonl``, ``summary.json``,
``curves.png`` and ``warmstart.json``, and with ``log.trackers`` the trackers' folders
(``<name>/`` for TensorBoard, ``wandb/``). Before a run, a resume, a dry run or an
``--export-step`` writes anything:

- **No links.** None of these entries may be a symbolic link, and each must be of its kind (a
  folder, a regular file): through a link relufy's writes, and its removal of leftovers and old
  checkpoints, would land wherever the link points. (Inside ``checkpoints/`` links are never
  followed: a linked ``step-N`` is not a checkpoint, a linked leftover is unlinked.)
- **Only its own files are replaced.** relufy rewrites ``recipe.yaml`` (the resolved recipe) and
  ``curves.png`` during a run, so each carries the run's id: ``recipe.yaml`` starts with the line
  ``# relufy train run <run_id>: ...``, ``curves.png`` holds ``relufy train run <run_id>`` in a PNG
  text chunk. A folder without ``run.json`` may hold neither of them, nor ``warmstart.json``; a
  folder with ``run.json`` may hold them only with its run id. So a recipe kept in the output folder
  under the name ``recipe.yaml`` (comments and all), or a ``curves.png`` of the user's, is refused
  on one line instead of being overwritten: keep it under another name. (A ``recipe.yaml`` written
  by an earlier relufy, a plain YAML dump of this very run's recipe without the header, counts as
  relufy's.)
- **Permissions never widen.** The run's files and folders get at most the permissions of its
  local inputs (model, tokenizer, teacher, data files): for the group and for others, a read or
  write permission that any input lacks is taken away from everything the run writes
  (``input_umask``, applied as the process umask while the run writes), so a model kept 0600
  trains into 0600 checkpoints and a 0600 ``final/``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from ..errors import RelufyError
from . import checkpoint as ckpt

FOLDERS = ("checkpoints", "final", "exports")
FILES = ("run.json", "recipe.yaml", "metrics.jsonl", "summary.json", "curves.png", "warmstart.json")
OWNED = ("recipe.yaml", "curves.png", "warmstart.json")  # replaced during a run: must be this run's own
RECIPE_FILE = "recipe.yaml"
CURVES_FILE = "curves.png"


def mark(run_id: str) -> str:
    """What identifies a file relufy wrote for run ``run_id``."""
    return f"relufy train run {run_id}"


def recipe_header(run_id: str) -> str:
    """The first line of ``recipe.yaml`` (a YAML comment)."""
    return f"# {mark(run_id)}: the resolved recipe (relufy rewrites this file; keep your own recipe elsewhere)\n"


def tracker_folders(recipe) -> list[str]:
    """The folders Accelerate's trackers write into inside ``output_dir``."""
    out = []
    if "tensorboard" in recipe.log.trackers:
        out.append(recipe.name)
    if "wandb" in recipe.log.trackers:
        out.append("wandb")
    return out


def check_entries(out: Path, recipe) -> None:
    """Refuse links, and entries of the wrong kind, among the entries relufy manages in ``out``."""
    trackers = tracker_folders(recipe)
    for name in trackers:
        if name in FOLDERS + FILES:
            raise RelufyError(
                f"name {name!r}: with log.trackers the trackers write into OUTPUT_DIR/{name}, which relufy keeps for "
                "its own files; choose another name"
            )
    if not out.is_dir():
        return
    for name in (*FOLDERS, *trackers, *FILES):
        path = out / name
        if path.is_symlink():
            raise RelufyError(
                f"{path} is a symbolic link: relufy writes and removes files there, and does not follow links out "
                "of a run folder; replace it with a real folder or file (or choose another output_dir)"
            )
        if not path.exists():
            continue
        folder = name not in FILES
        if folder and not path.is_dir():
            raise RelufyError(f"{path} is not a folder; relufy keeps its {name} there: move it away")
        if not folder and not stat.S_ISREG(path.stat().st_mode):
            raise RelufyError(f"{path} is not a regular file; relufy writes its {name} there: move it away")


def _png_texts(path: Path) -> list[str]:
    """The text chunks (``keyword\\0text``) of a PNG file, read up to its image data."""
    texts = []
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return []
            for _ in range(64):
                head = f.read(8)
                if len(head) < 8:
                    break
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                    break
                data = f.read(length)
                f.read(4)  # CRC
                if kind == b"tEXt":
                    texts.append(data.replace(b"\0", b" ", 1).decode("latin-1"))
    except OSError:
        return []
    return texts


def _earlier_dump(path: Path, recipe) -> bool:
    """An earlier relufy's ``recipe.yaml``: exactly the plain YAML dump of a recipe of this name
    and output folder (no comments, relufy's layout)."""
    import yaml

    from . import recipe_yaml

    try:
        text = path.read_text(encoding="utf-8")
        raw = recipe_yaml.load(text, str(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RelufyError):
        return False
    if not isinstance(raw, dict) or raw.get("name") != recipe.name or raw.get("output_dir") != recipe.output_dir:
        return False
    return yaml.safe_dump(raw, sort_keys=False) == text


def _owned_by(path: Path, run_id: str | None, recipe) -> bool:
    """Whether ``path`` (one of ``OWNED``) was written by relufy for run ``run_id``."""
    if run_id is None:
        return False
    if path.name == RECIPE_FILE:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                first = f.readline(4096)
        except OSError:
            return False
        return first == recipe_header(run_id) or _earlier_dump(path, recipe)
    if path.name == CURVES_FILE:
        return any(text.endswith(mark(run_id)) for text in _png_texts(path))
    return True  # warmstart.json: relufy's when the folder holds a run


def check_owned(out: Path, run_id: str | None, recipe) -> None:
    """Refuse ``out`` when it holds one of ``OWNED`` that relufy did not write for run ``run_id``
    (the id in ``out/run.json``; None without one)."""
    for name in OWNED:
        path = out / name
        if path.is_file() and not _owned_by(path, run_id, recipe):
            raise RelufyError(
                f"{path} was not written by relufy for this run (your own file?); relufy writes its {name} there and "
                "replaces nothing it did not write: move it away or rename it, or choose another output_dir"
            )


def check(out: Path, recipe, resume: bool) -> list[str]:
    """Everything about ``out`` a run refuses before it writes (reads only): a fresh run into a
    folder holding a run, links and entries of the wrong kind, files relufy did not write.
    Returns the run markers found (``checkpoint.run_markers``)."""
    if not out.is_dir():
        check_entries(out, recipe)  # the tracker name
        return []
    markers = ckpt.run_markers(out)
    if not resume and markers:
        raise RelufyError(
            f"{out} already holds a run ({', '.join(markers)}); continue it with --resume, or choose another output_dir"
        )
    check_entries(out, recipe)
    check_owned(out, ckpt.read_run_id(out), recipe)
    return markers


# --- permissions ---------------------------------------------------------------------------


def _entries(path: Path) -> list[Path]:
    """``path``, and for a folder the entries directly in it (links followed when reading modes)."""
    out = [path]
    if path.is_dir():
        with contextlib.suppress(OSError):
            out += list(path.iterdir())
    return out


def input_umask(paths) -> int:
    """The umask bits that keep outputs within the permissions of the input ``paths`` (files and
    folders): for the group and for others, no read (and then no access at all) where an input
    cannot be read by them, and no write where an input cannot be written by them."""
    extra = 0
    for path in paths:
        for entry in _entries(Path(path)):
            try:
                st = entry.stat()
            except OSError:
                continue
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                continue
            for shift in (3, 0):  # group, others
                readable = st.st_mode & (0o4 << shift)
                if stat.S_ISDIR(st.st_mode):
                    readable = readable and st.st_mode & (0o1 << shift)
                if not readable:
                    extra |= 0o7 << shift
                elif stat.S_ISREG(st.st_mode) and not st.st_mode & (0o2 << shift):
                    extra |= 0o2 << shift
    return extra


def recipe_inputs(recipe) -> list[Path]:
    """The recipe's local inputs: model, tokenizer, teacher, training and eval data."""
    from ..io.source import local_inputs

    distill = recipe.sparsity.distill
    specs = [recipe.model.path, recipe.model.tokenizer, distill.teacher if distill else None]
    specs += [s.data for s in recipe.data.sources] + [s.data for s in recipe.data.eval_sources]
    return local_inputs(*specs)


@contextlib.contextmanager
def narrowed_umask(extra: int):
    """The process umask with ``extra`` bits added while the block runs (files and folders created
    then get no more than the inputs allow), the old one restored afterwards."""
    old = os.umask(0)
    os.umask(old | (extra & 0o077))
    try:
        yield
    finally:
        os.umask(old)
