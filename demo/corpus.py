"""The text the demo model learns from: Python's own documentation, read from the running
interpreter's standard library (no download). Docstrings of the stdlib modules, classes and
functions, plus the language reference topics `pydoc` ships (`pydoc_data.topics`). Both are
part of CPython, under the PSF licence, which allows redistributing derived works.

The corpus depends on the Python version; `corpus_digest` names the exact text a model saw.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from pathlib import Path

EOS_ID = 256  # the byte tokenizer's end-of-text id (adapter_runtime/tokenizer.py)
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo",
             "ensurepip", "pydoc_data"}
MIN_CHARS = 40


def stdlib_docstrings() -> list[str]:
    """Every module, class and function docstring of the standard library, once, in file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if SKIP_DIRS & set(parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= MIN_CHARS and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    return docs


def reference_topics() -> list[str]:
    """The language reference sections that `help('TOPIC')` prints."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)]


def documents() -> list[str]:
    return stdlib_docstrings() + reference_topics()


def corpus_digest(docs: list[str]) -> str:
    return hashlib.sha256("\x00".join(docs).encode()).hexdigest()


def split(docs: list[str], every: int = 20) -> tuple[list[str], list[str]]:
    """(train, validation): every `every`-th document is held out."""
    return [d for i, d in enumerate(docs) if i % every], [d for i, d in enumerate(docs) if not i % every]


def token_stream(docs: list[str]):
    """One int64 tensor: each document's UTF-8 bytes followed by EOS."""
    import torch

    ids: list[int] = []
    for doc in docs:
        ids.extend(doc.encode("utf-8"))
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)
