"""Python's help text laid out as the corpus packages lay out their files (tests/pipelines)."""

from __future__ import annotations

import gzip
from pathlib import Path

from relufy.pipelines import corpus


def package_roots(base: Path) -> dict[str, Path]:
    """Python's help topics as the packages' files: in-domain topics round-robin over the three
    documentation packages (as .rst, .rst.gz and .pod files), a dictionary file of entries."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    roots = {p.name: base / p.name for p in corpus.PACKAGES}
    layouts = {"linux-doc-6.1": "{}.rst.gz", "python3.11-doc": "lib/{}.rst.txt", "perl-doc": "5.36.0/pod/{}.pod"}
    for i, name in enumerate(names):
        package = corpus.PACKAGES[i % len(corpus.PACKAGES)].name
        path = roots[package] / layouts[package].format(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = topics[name].encode()
        path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    (roots["perl-doc"] / "5.36").symlink_to("5.36.0")  # a linked folder repeats files: read once
    (roots["linux-doc-6.1"] / "translations").mkdir()
    (roots["linux-doc-6.1"] / "translations" / "zh.rst").write_text("not read")
    entries = []
    for name in names:
        for k, para in enumerate(p for p in topics[name].split("\n\n") if len(p) > 200):
            head = f"{name.title()}{k} \\{name}\\ n."
            entries.append(head + "\n   " + para.strip().replace("\n", "\n   "))
    roots["dict-gcide"] = base / "dict"
    roots["dict-gcide"].mkdir()
    (roots["dict-gcide"] / "gcide.dict.dz").write_bytes(gzip.compress("\n\n".join(entries).encode()))
    return roots
