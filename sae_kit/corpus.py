"""Real text with zero download, cut into fixed-length token windows.

The default corpus is the Python standard library's own documentation: every topic of
``pydoc_data.topics`` (the text behind ``help()``) plus the module, class and function docstrings
of the standard library's source files, read with ``ast`` (nothing is imported or executed).
That is several hundred thousand tokens of English prose and code on any Python install. A text
file, a folder of ``.txt``/``.md`` files, or (online) a Hugging Face ``datasets`` name also work.

The standard library's text differs between Python versions (3.12 removed modules and their
docstrings), so two machines with different Pythons harvest different stores. To run the very same
text elsewhere, export it once and point the other machine at the folder::

    python -m sae_kit.corpus --export corpus/     # one numbered .txt file per document
    SAE_KIT_CORPUS=corpus/ python -m sae_kit.report --scale paper

``SAE_KIT_CORPUS`` (a file or folder) replaces the default corpus wherever no corpus is named.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import sysconfig
import weakref
from pathlib import Path

import numpy as np
import torch

from .fsutil import replace_dir, temp_sibling

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo", "ensurepip"}


def stdlib_docs(min_chars: int = 200) -> list[str]:
    """The standard library's documentation text, one document per help topic or module."""
    return list(_stdlib_docs(min_chars))


@functools.lru_cache(maxsize=2)
def _stdlib_docs(min_chars: int) -> tuple[str, ...]:  # parsed once per process (a few seconds)
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    parts.append(doc)
        if parts:
            docs.append("\n\n".join(dict.fromkeys(parts)))  # ast.walk revisits the module node
    return tuple(docs)


def load_texts(source: str | Path | None = None, split: str = "train", text_field: str = "text",
               max_docs: int | None = None, allow_network: bool | None = None) -> list[str]:
    """Documents from a source.

    Args:
        source: None for the standard library's documentation; a ``.txt``/``.md`` file; a folder
            (every ``*.txt`` and ``*.md`` below it, sorted); otherwise a Hugging Face dataset id
            (``name`` or ``owner/name``; needs the ``datasets`` package, a reachable hub and
            `allow_network`).
        split, text_field, max_docs: for dataset names only.
        allow_network: allow reading a dataset id from the hub; None reads ``SAE_KIT_ALLOW_NETWORK=1``.
            Off by default, so a mistyped file name says "no such file or folder" instead of
            waiting for a network that may not be there.

    Returns:
        Non-empty documents, in a fixed order.
    """
    if source is not None and not isinstance(source, (str, Path)):
        raise TypeError(f"corpus must be None, a file or folder path, or a dataset name; got "
                        f"{type(source).__name__}")
    if source is None and os.environ.get("SAE_KIT_CORPUS"):
        source = os.environ["SAE_KIT_CORPUS"]
        if not Path(source).exists():
            raise FileNotFoundError(f"SAE_KIT_CORPUS={source!r}: no such file or folder; unset it for the "
                                    f"standard library's documentation")
    if source is None or source == "stdlib":
        docs = stdlib_docs()
    elif Path(source).is_file():
        docs = [_read_text(Path(source))]
    elif Path(source).is_dir():
        files = sorted(p for p in Path(source).rglob("*") if p.suffix in {".txt", ".md"} and p.is_file())
        docs = [_read_text(p) for p in files]
    else:
        text = str(source)
        # e.g. a mistyped file name: say so rather than ask a model hub
        if not _DATASET_ID.fullmatch(text) or Path(text).suffix.lower() in _FILE_SUFFIXES:
            raise FileNotFoundError(f"corpus {text!r}: no such file or folder")
        if allow_network is None:
            allow_network = os.environ.get("SAE_KIT_ALLOW_NETWORK", "").lower() in ("1", "true", "yes")
        if not allow_network:
            raise FileNotFoundError(
                f"corpus {text!r}: no such file or folder. If you meant the Hugging Face dataset {text!r}, "
                f"allow network use: load_texts(..., allow_network=True) / harvest(..., allow_network=True) "
                f"or SAE_KIT_ALLOW_NETWORK=1")
        try:
            import datasets
        except ImportError as e:
            raise FileNotFoundError(
                f"corpus {source!r} is not a file or folder, and the 'datasets' package is not "
                f"installed to read it as a Hugging Face dataset (pip install datasets)") from e
        ds = datasets.load_dataset(str(source), split=split, streaming=True)
        docs = [row[text_field] for row, _ in zip(ds, range(max_docs or 10_000))]
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise ValueError(f"corpus {source!r} is empty: no non-blank text found; give a file or folder "
                         f"with text, or None for the standard library's documentation")
    return docs


_DATASET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
_FILE_SUFFIXES = {".txt", ".md", ".json", ".jsonl", ".csv", ".tsv", ".parquet", ".gz", ".zip", ".html"}
_MAX_BAD_SHARE = 0.01  # more undecodable characters than this: not a text file


def _read_text(path: Path) -> str:
    """A UTF-8 text file's content; a binary file (NUL bytes, many invalid UTF-8 bytes) is refused."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") + text.count("\x00")
    if text and bad / len(text) > _MAX_BAD_SHARE:
        raise ValueError(f"corpus file {path} does not look like UTF-8 text: {100 * bad / len(text):.0f}% of its "
                         f"characters are NUL bytes or invalid UTF-8. Give a text file (a binary file would feed "
                         f"the model garbage), or convert it to UTF-8 first")
    return text


def fingerprint(docs: list[str]) -> str:
    """Short hash of a corpus, so activation stores know which text they came from."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", "replace"))
        h.update(b"\0")
    return h.hexdigest()[:12]


_JOINED = weakref.WeakKeyDictionary()  # tokenizer -> {(corpus fingerprint, vocabulary size, separator): ids}


def _joined_ids(tokenizer, docs: list[str], sep: tuple) -> np.ndarray:
    """The documents' token ids joined by `sep`, read-only. Tokenising the default corpus takes ~0.7 s
    on one core, as long as a small harvest's model work, so it is kept per tokenizer for the
    process, keyed by the corpus's fingerprint (its full text), the vocabulary size and the separator."""
    key = (fingerprint(docs), len(tokenizer), sep)
    try:
        memo = _JOINED.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be referenced weakly: tokenise every time
        memo = {}
    flat = memo.get(key)
    if flat is None:
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        flat = np.fromiter((t for doc in ids for t in (*doc, *sep)), dtype=np.int64)
        flat.flags.writeable = False
        while len(memo) >= 2:  # a corpus or two per tokenizer: a few MB each
            memo.pop(next(iter(memo)))
        memo[key] = flat
    return flat


def token_windows(tokenizer, docs: list[str], ctx_len: int, n_windows: int | None = None,
                  seed: int = 0, sep_token_id: int | None = None, separator: str | None = None) -> torch.Tensor:
    """Tokenise documents, join them with a separator, cut into windows, shuffle them by seed.

    Args:
        tokenizer: a Hugging Face tokenizer (``model.tokenizer``).
        docs: documents from `load_texts`.
        ctx_len: tokens per window.
        n_windows: how many windows to return; None returns all.
        seed: shuffle seed; the same seed gives the same windows.
        sep_token_id: placed between documents; default the tokenizer's ``<|endoftext|>``/EOS.
        separator: text placed between documents instead (its tokens), e.g. ``"\\n\\n"``. The
            activation stores use it: an ``<|endoftext|>`` in mid-window is a massive activation
            (a norm ~100× the median at SmolLM2's layer 12) that would dominate every variance-based
            metric.

    Returns:
        Long tensor [n_windows, ctx_len].
    """
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be at least 2, got {ctx_len}")
    if separator is not None:
        sep = tuple(tokenizer(separator, add_special_tokens=False)["input_ids"])
    elif sep_token_id is None:
        sep_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if sep_token_id is None or sep_token_id == tokenizer.unk_token_id and tokenizer.unk_token != "<|endoftext|>":
            sep_token_id = tokenizer.eos_token_id
    if separator is None:
        sep = (sep_token_id,)
    flat = _joined_ids(tokenizer, docs, sep)
    n_avail = len(flat) // ctx_len
    if n_avail == 0:
        raise ValueError(f"corpus has {len(flat)} tokens, fewer than one window of {ctx_len}; give a larger "
                         f"corpus or a shorter ctx_len")
    if n_windows is not None and n_windows > n_avail:
        raise ValueError(f"asked for {n_windows} windows of {ctx_len} tokens but the corpus has only "
                         f"{n_avail} ({len(flat):,} tokens); ask for fewer tokens or give a larger corpus")
    windows = flat[: n_avail * ctx_len].reshape(n_avail, ctx_len)
    order = np.random.default_rng(seed).permutation(n_avail)[: n_windows or n_avail]
    return torch.from_numpy(windows[order].copy())


def export(folder: str | Path, docs: list[str] | None = None) -> Path:
    """Write a corpus (default: this Python's standard-library documentation) as one numbered
    ``.txt`` file per document, so that `load_texts(folder)` gives the same documents in the same
    order, and a store harvested from it the same windows, on any machine."""
    docs = stdlib_docs() if docs is None else docs
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is not an empty folder; export into a new or empty folder")
    tmp = temp_sibling(out)  # the kit's own temporary folder: a killed export leaves no half corpus
    width = len(str(len(docs)))
    for i, doc in enumerate(docs):
        (tmp / f"{i:0{width}d}.txt").write_text(doc, encoding="utf-8")
    replace_dir(tmp, out)  # `out` is new or empty: nothing of the user's is replaced
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Export the default corpus as text files (see this module's docstring).")
    ap.add_argument("--export", required=True, metavar="FOLDER", help="a new or empty folder")
    a = ap.parse_args()
    docs = stdlib_docs()
    path = export(a.export, docs)
    print(f"wrote {len(docs)} documents (fingerprint {fingerprint(docs)}) to {path}")
