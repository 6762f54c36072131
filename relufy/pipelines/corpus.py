"""A text corpus that installs itself from Debian's documentation packages, and a tokenizer fitted to it.

    python -m relufy.pipelines.corpus build OUT          # train.jsonl, heldout.jsonl, ood.jsonl, manifest.json
    python -m relufy.pipelines.corpus tokenizer OUT/train.jsonl TOKENIZER --vocab 4096

The model organism (``make organism``) is pretrained on it, so that its pretraining token count is
known and a fraction of it costs minutes on a CPU. No dataset hub is needed: the text is real
documentation that ``apt-get install`` puts on any Debian machine (``PACKAGES``): in domain, the
Linux kernel's, Python's and Perl's documentation (reStructuredText and POD as shipped); out of
domain, a text of another kind, the 1913 Webster dictionary (GCIDE). None of the data libraries
reads Debian packages, so the readers below are written here; the tokenizer is HF ``tokenizers``.

The split is a fixed rule, so every machine with the same package versions gets the same bytes:
a document (one file; one dictionary entry) goes to ``heldout.jsonl`` when the first 8 hex digits
of sha256(``package/relative-path``) taken modulo 1000 fall below ``HELDOUT_PER_MILLE``, else to
``train.jsonl``; documents are written in path order. ``ood.jsonl`` holds every
``OOD_EVERY``-th dictionary entry by the same hash. ``manifest.json`` records each package's
version, the document and byte counts, each file's sha256 and one corpus hash over them; the
build prints the versions and the hash. Another package version gives another hash: compare
results only between equal hashes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import RelufyError
from ..io.atomic import atomic_dir, atomic_file
from ..progress import console
from . import run_command

HELDOUT_PER_MILLE = 20  # 2% of in-domain documents are held out
OOD_EVERY = 50  # one dictionary entry in 50 is out-of-domain held-out text
MAX_DOC_BYTES = 4 << 20  # a larger file is not documentation prose: skipped


@dataclass(frozen=True)
class Package:
    name: str
    root: str  # where its documents lie
    patterns: tuple[str, ...]  # globs under root
    exclude: tuple[str, ...] = ()  # relative-path prefixes left out
    kind: str = "files"  # files: one document each; gcide: one document per dictionary entry


PACKAGES: tuple[Package, ...] = (
    Package(
        "linux-doc-6.1",
        "/usr/share/doc/linux-doc-6.1/Documentation",
        ("**/*.rst.gz", "**/*.txt.gz", "**/*.rst", "**/*.txt"),
        exclude=("translations/",),  # English only
    ),
    Package("python3.11-doc", "/usr/share/doc/python3.11/html/_sources", ("**/*.rst.txt",)),
    Package("perl-doc", "/usr/share/perl", ("*/pod/*.pod",)),
)
OOD_PACKAGE = Package("dict-gcide", "/usr/share/dictd", ("gcide.dict.dz",), kind="gcide")
INSTALL = "apt-get install " + " ".join(p.name for p in (*PACKAGES, OOD_PACKAGE))


def log(line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def package_version(name: str) -> str | None:
    """The installed version (dpkg), or None when the package is not installed."""
    if shutil.which("dpkg-query") is None:
        raise RelufyError(f"dpkg-query not found: the corpus is read from Debian packages ({INSTALL})")
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Status}\t${Version}", name], capture_output=True, text=True, check=False)
    status, _, version = out.stdout.partition("\t")
    return version if out.returncode == 0 and status.endswith(" installed") else None


DOCUMENT_BYTES = 64 * 2**20  # one document, decompressed (the largest in the packages: about 5 MB)


def _read(path: Path) -> str:
    """A document's text: a regular file, decompressed (.gz; .dz is dictzip) within DOCUMENT_BYTES."""
    from ..io.read import open_regular, read_bytes

    if path.suffix in (".gz", ".dz"):
        with open_regular(path) as raw, gzip.GzipFile(fileobj=raw) as f:
            data = f.read(DOCUMENT_BYTES + 1)
    else:
        data = read_bytes(path, DOCUMENT_BYTES + 1, "document")
    if len(data) > DOCUMENT_BYTES:
        raise RelufyError(f"{path}: a document larger than {DOCUMENT_BYTES // 2**20} MiB; not a documentation file")
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n")


def package_documents(package: Package, root: Path | None = None) -> Iterator[tuple[str, str]]:
    """``(relative path, text)`` for every document of ``package``, in path order."""
    base = Path(root or package.root)
    if package.kind == "gcide":
        yield from gcide_entries(base / package.patterns[0])
        return
    found: dict[Path, str] = {}  # real file -> its first relative path (a linked folder repeats files)
    for pattern in package.patterns:
        for path in base.glob(pattern):
            rel = path.relative_to(base).as_posix()
            if any(rel.startswith(x) for x in package.exclude) or path.is_symlink() or not path.is_file():
                continue
            if path.stat().st_size > MAX_DOC_BYTES:
                continue
            real = path.resolve()
            if real not in found or rel < found[real]:
                found[real] = rel
    for rel in sorted(found.values()):
        text = _read(base / rel).strip()
        if text:
            yield rel, text


def gcide_entries(path: Path) -> Iterator[tuple[str, str]]:
    """The dictionary's entries (a headword line at column 0 up to the next one), numbered."""
    text = _read(path)
    entry: list[str] = []
    n = 0
    for line in text.split("\n"):
        if line and not line[0].isspace() and entry and not entry[-1].strip():
            body = "\n".join(entry).strip()
            if body:
                n += 1
                yield f"entry-{n:06d}", body
            entry = []
        entry.append(line)
    body = "\n".join(entry).strip()
    if body:
        yield f"entry-{n + 1:06d}", body


def bucket(package: str, rel: str) -> int:
    """The document's fixed place in 0..999 (the split rule)."""
    return int(hashlib.sha256(f"{package}/{rel}".encode()).hexdigest()[:8], 16) % 1000


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build(out: Path, packages=PACKAGES, ood=OOD_PACKAGE, roots: dict[str, Path] | None = None, force: bool = False) -> dict:
    """Write the corpus folder ``out`` (atomically) and return its manifest.

    ``roots`` maps a package name to another folder holding its documents (tests, or a copy of
    the package's files); such a package is recorded with version ``"local"``."""
    roots = roots or {}
    versions = {}
    missing = []
    for p in (*packages, ood):
        versions[p.name] = "local" if p.name in roots else package_version(p.name)
        if versions[p.name] is None:
            missing.append(p.name)
    if missing:
        raise RelufyError(f"the corpus needs {', '.join(missing)}: install with `{INSTALL}` (as root)")
    counts: dict[str, dict] = {}
    with atomic_dir(out, force=force) as tmp:
        files = {name: open(tmp / f"{name}.jsonl", "w", encoding="utf-8") for name in ("train", "heldout", "ood")}
        try:
            for p in packages:
                c = counts.setdefault(p.name, {"train": [0, 0], "heldout": [0, 0]})
                for rel, text in package_documents(p, roots.get(p.name)):
                    split = "heldout" if bucket(p.name, rel) < HELDOUT_PER_MILLE else "train"
                    files[split].write(json.dumps({"text": text, "source": f"{p.name}/{rel}"}, ensure_ascii=False) + "\n")
                    c[split][0] += 1
                    c[split][1] += len(text.encode())
                log(f"corpus: {p.name} {versions[p.name]}: {c['train'][0]:,} + {c['heldout'][0]:,} documents")
            c = counts.setdefault(ood.name, {"ood": [0, 0]})
            for rel, text in package_documents(ood, roots.get(ood.name)):
                if bucket(ood.name, rel) % OOD_EVERY == 0:
                    files["ood"].write(json.dumps({"text": text, "source": f"{ood.name}/{rel}"}, ensure_ascii=False) + "\n")
                    c["ood"][0] += 1
                    c["ood"][1] += len(text.encode())
            log(f"corpus: {ood.name} {versions[ood.name]}: {c['ood'][0]:,} entries out of domain")
        finally:
            for f in files.values():
                f.close()
        hashes = {f"{name}.jsonl": _sha256(tmp / f"{name}.jsonl") for name in files}
        if not any(c.get("train", [0])[0] for c in counts.values()):
            raise RelufyError("the corpus packages hold no documents")
        digest = hashlib.sha256(json.dumps({"files": hashes, "versions": versions}, sort_keys=True).encode()).hexdigest()
        manifest = {
            "corpus": digest,
            "versions": versions,
            "split": {"heldout_per_mille": HELDOUT_PER_MILLE, "ood_every": OOD_EVERY, "rule": "sha256(package/path)[:8] % 1000"},
            "documents": {name: {k: {"documents": v[0], "bytes": v[1]} for k, v in c.items()} for name, c in counts.items()},
            "sha256": hashes,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"corpus {digest[:16]}: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return manifest


def jsonl_texts(path: Path) -> Iterator[str]:
    from ..io.read import lines, loads_json

    for number, line in lines(path):
        if line.strip():
            yield loads_json(line, f"{path}:{number}")["text"]


EOS = "<|endoftext|>"


def fit_tokenizer(train: Path, out: Path, vocab: int = 4096, force: bool = False) -> Path:
    """A byte-level BPE of ``vocab`` tokens fitted to ``train`` (.jsonl), saved as a standard
    tokenizer folder (tokenizer.json; ``AutoTokenizer.from_pretrained`` loads it). Its one special
    token, ``<|endoftext|>`` (id 0), is BOS, EOS and padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab < 300:
        raise RelufyError(f"--vocab {vocab}: a byte-level BPE needs at least 300 tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(jsonl_texts(train), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)
    fast.model_max_length = 1 << 20
    with atomic_dir(out, force=force) as tmp:
        fast.save_pretrained(tmp)
    log(f"tokenizer: {vocab} tokens fitted to {train} -> {out}")
    return out


def count_tokens(path: Path, tokenizer_dir: Path) -> int:
    from ..modeling.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    n, batch = 0, []
    for text in jsonl_texts(path):
        batch.append(text)
        if len(batch) == 256:
            n += sum(len(x) + 1 for x in tok(batch, add_special_tokens=False)["input_ids"])
            batch = []
    if batch:
        n += sum(len(x) + 1 for x in tok(batch, add_special_tokens=False)["input_ids"])
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relufy.pipelines.corpus", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write train/heldout/ood .jsonl and manifest.json from the Debian packages")
    b.add_argument("out", type=Path)
    b.add_argument("--force", action="store_true", help="replace an existing OUT")
    t = sub.add_parser("tokenizer", help="fit a byte-level BPE to a .jsonl corpus")
    t.add_argument("train", type=Path)
    t.add_argument("out", type=Path)
    t.add_argument("--vocab", type=int, default=4096)
    t.add_argument("--force", action="store_true")
    c = sub.add_parser("count", help="tokens of each .jsonl of a corpus folder under a tokenizer; into its tokens.json")
    c.add_argument("corpus", type=Path)
    c.add_argument("tokenizer", type=Path)
    args = parser.parse_args(argv)
    return run_command(lambda: _command(args))


def _command(args) -> None:
    if args.cmd == "build":
        build(args.out, force=args.force)
    elif args.cmd == "tokenizer":
        if not args.train.is_file():
            raise RelufyError(f"{args.train}: not a file")
        fit_tokenizer(args.train, args.out, args.vocab, force=args.force)
    else:
        counts = {p.stem: count_tokens(p, args.tokenizer) for p in sorted(args.corpus.glob("*.jsonl"))}
        with atomic_file(args.corpus / "tokens.json") as tmp:
            tmp.write_text(json.dumps(counts, indent=2) + "\n")
        log("tokens: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))


if __name__ == "__main__":
    sys.exit(main())
