"""Text corpora: the built-in stdlib corpus and plain-text files on disk.

The built-in corpus (`builtin:stdlib`) is English technical prose that every
Python installation already carries, so training works with no download:

* the values of `pydoc_data.topics.topics` (the language reference sections
  that `help("if")` shows), in sorted key order, and
* the docstrings of a fixed, sorted list of standard-library modules
  (`STDLIB_MODULES`): each module's docstring, then, in sorted name order,
  the docstrings of the public classes and functions it defines and of the
  public and dunder methods and properties those classes define.

Each text is dedented with `inspect.cleandoc` and stripped of trailing
spaces, texts shorter than `MIN_DOC_CHARS` are dropped and exact duplicates
are kept only once.  The result depends only on the Python build: the tests
check that other hash seeds, and importing jax and flax first, change nothing.
The text is under the Python Software Foundation License, like Python itself.
"""

import importlib
import inspect
import warnings

from flaxalign.data.paths import list_files
from flaxalign.errors import DataError

BUILTIN_STDLIB = "builtin:stdlib"

# Standard-library modules whose import has no side effects (nothing prints,
# opens windows or touches the terminal, so no readline, tkinter or this) and
# that are not deprecated for removal.  Sorted so the corpus order is fixed;
# modules that a build or platform lacks are skipped.
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio.base_events", "asyncio.events",
    "asyncio.futures", "asyncio.locks", "asyncio.protocols", "asyncio.queues",
    "asyncio.runners", "asyncio.selector_events", "asyncio.sslproto",
    "asyncio.staggered", "asyncio.streams", "asyncio.subprocess",
    "asyncio.tasks", "asyncio.timeouts", "asyncio.transports",
    "asyncio.unix_events", "base64", "bdb", "binascii", "bisect", "builtins",
    "bz2", "cProfile", "calendar", "cmath", "cmd", "code", "codecs", "codeop",
    "collections", "collections.abc", "compileall",
    "concurrent.futures.process", "concurrent.futures.thread", "configparser",
    "contextlib", "copy", "csv", "ctypes", "dataclasses", "datetime", "dbm",
    "dbm.dumb", "decimal", "difflib", "dis", "doctest", "email.base64mime",
    "email.charset", "email.encoders", "email.errors", "email.feedparser",
    "email.generator", "email.header", "email.headerregistry", "email.message",
    "email.mime.image", "email.mime.text", "email.parser", "email.policy",
    "email.quoprimime", "email.utils", "enum", "faulthandler", "fcntl",
    "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "gc", "genericpath", "getopt", "gettext", "glob", "graphlib", "grp",
    "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client",
    "http.cookiejar", "http.cookies", "http.server", "imaplib",
    "importlib.abc", "importlib.metadata", "importlib.resources.abc",
    "importlib.util", "inspect", "io", "ipaddress", "itertools", "json",
    "json.decoder", "json.encoder", "linecache", "locale", "logging",
    "logging.config", "logging.handlers", "lzma", "mailbox", "marshal", "math",
    "mimetypes", "mmap", "multiprocessing.connection",
    "multiprocessing.context", "multiprocessing.forkserver",
    "multiprocessing.managers", "multiprocessing.pool",
    "multiprocessing.reduction", "multiprocessing.shared_memory", "ntpath",
    "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pickletools", "pkgutil", "platform", "plistlib", "poplib", "posix",
    "posixpath", "pprint", "profile", "pstats", "pwd", "py_compile", "pyclbr",
    "pydoc", "queue", "random", "re", "reprlib", "runpy", "sched", "secrets",
    "select", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib",
    "socket", "socketserver", "sqlite3", "ssl", "statistics", "string",
    "struct", "subprocess", "symtable", "sysconfig", "tarfile", "tempfile",
    "termios", "textwrap", "threading", "time", "timeit", "tokenize", "trace",
    "traceback", "tracemalloc", "types", "typing", "unicodedata", "unittest",
    "unittest.case", "unittest.loader", "unittest.mock", "unittest.result",
    "unittest.util", "urllib.parse", "urllib.request", "urllib.robotparser",
    "uuid", "venv", "warnings", "wave", "weakref", "wsgiref.handlers",
    "wsgiref.headers", "wsgiref.util", "wsgiref.validate", "xml.dom.domreg",
    "xml.dom.expatbuilder", "xml.dom.minidom", "xml.etree.ElementTree",
    "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader",
    "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport", "zlib",
    "zoneinfo",
)

MIN_DOC_CHARS = 40

# Files read by `read_text_documents` when given a folder.
TEXT_SUFFIXES = (".txt", ".md", ".rst", "")

# Files above SPLIT_FILE_BYTES become several documents of at most
# CHUNK_MAX_CHARS (filled greedily with whole blank-line blocks), so one huge
# file does not become one huge document.
SPLIT_FILE_BYTES = 64 * 1024
CHUNK_MAX_CHARS = 16 * 1024


def stdlib_corpus(max_chars: int | None = None) -> list[str]:
    """Returns the built-in corpus (see the module docstring) as documents.

    `max_chars` (None or 0 = everything) keeps the first documents up to that
    many characters in total, cutting the last one to fit.
    """
    documents = []
    seen = set()
    for text in _stdlib_texts():
        document = _clean_whitespace(text)
        if len(document) >= MIN_DOC_CHARS and document not in seen:
            seen.add(document)
            documents.append(document)
    return truncate_documents(documents, max_chars)


def _clean_whitespace(text):
    """Dedents a docstring and drops trailing spaces and blank edge lines."""
    lines = inspect.cleandoc(text).split("\n")
    return "\n".join(line.rstrip() for line in lines).strip()


def _stdlib_texts():
    """Yields the raw texts of the built-in corpus in their fixed order."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    for module_name in STDLIB_MODULES:
        module = _import_quietly(module_name)
        if module is not None:
            with warnings.catch_warnings():
                # Reading some attributes (typing.io) warns about deprecation.
                warnings.simplefilter("ignore")
                yield from _module_docstrings(module)


# Stdlib functions other packages replace on import (torch.package swaps in its own `inspect.getfile`): left out in
# every process, so the corpus never depends on what else the process imported.
PATCHED_ELSEWHERE = frozenset({"inspect.getfile"})


def _defined_in(member, module_name):
    """False for methods other packages patched onto a stdlib class (transformers adds some to logging.Logger),
    which would make the corpus depend on what else the process imported."""
    target = getattr(member, "__func__", None) or getattr(member, "fget", None) or member
    owner = getattr(target, "__module__", None)
    return owner is None or owner == module_name


def _import_quietly(module_name):
    """Imports a stdlib module, or returns None if this build lacks it."""
    try:
        with warnings.catch_warnings():
            # Some modules warn about deprecation on import; that is not news.
            warnings.simplefilter("ignore")
            return importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - any failure just means "skip it".
        return None


def _module_docstrings(module):
    """Yields the docstrings of a module and of the public names it defines.

    Private helpers are skipped because third-party packages sometimes patch
    them (typing_extensions replaces typing._collect_parameters), which would
    make the corpus depend on what else the process imported.
    """
    yield _doc_of(module)
    for name, value in sorted(vars(module).items()):
        if (name.startswith("_") or getattr(value, "__module__", None) != module.__name__
                or f"{module.__name__}.{name}" in PATCHED_ELSEWHERE):
            continue  # Private, re-exported from elsewhere and documented there, or replaced by other packages.
        if inspect.isclass(value):
            yield _doc_of(value)
            for member_name, member in sorted(vars(value).items()):
                if _is_public_or_dunder(member_name) and _defined_in(member, module.__name__):
                    yield _member_doc(member)
        elif callable(value):
            yield _doc_of(value)


def _is_public_or_dunder(name):
    """True for "read" and "__init__", False for "_helper"."""
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def _member_doc(member):
    """Returns the docstring of a class attribute, or "" if it has none."""
    if isinstance(member, (classmethod, staticmethod)):
        member = member.__func__
    if isinstance(member, property) or callable(member):
        return _doc_of(member)
    return ""  # Plain values (ints, strings) carry their type's docstring.


def _doc_of(obj):
    """Returns obj.__doc__ if it is a string (slots can make it a descriptor)."""
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else ""


def truncate_documents(documents: list[str], max_chars: int | None) -> list[str]:
    """Keeps documents in order up to `max_chars` characters in total.

    None or 0 means no limit.  The document that crosses the budget is cut, so
    the total is exactly `max_chars` when the corpus is at least that large.
    """
    if max_chars is not None and max_chars < 0:
        raise DataError(f"max_chars must be >= 0 (0 means no limit), got {max_chars}.")
    if not max_chars:
        return list(documents)
    kept = []
    budget = max_chars
    for document in documents:
        if budget <= 0:
            break
        kept.append(document[:budget])
        budget -= len(kept[-1])
    return kept


def read_text_documents(path: str) -> list[str]:
    """Reads UTF-8 text documents from a file, a folder or a glob pattern.

    A folder is read recursively (hidden entries skipped) and only files whose
    suffix is in `TEXT_SUFFIXES` are read; a file named directly or matched by
    a glob is always read.  Files are read in sorted path order.  Each file is
    one document, except files above 64 KiB, which are split on blank lines
    into chunks of at most 16 KiB characters (most close to it), in order.
    """
    files = list_files(path, suffixes=TEXT_SUFFIXES, label="corpus path")
    documents = []
    for file_path in files:
        text = _read_utf8(file_path)
        if text.strip():
            documents.extend(_split_large_text(text))
    if not documents:
        what = "the file has no" if len(files) == 1 else f"none of its {len(files)} text files has any"
        raise DataError(f"corpus '{path}' is empty: {what} non-blank text.")
    return documents


def _read_utf8(file_path):
    """Returns the text of a UTF-8 file, with Windows line ends made "\\n"."""
    with open(file_path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"file '{file_path}' is not valid UTF-8 (line {line}, byte offset "
            f"{error.start}); re-encode it as UTF-8."
        ) from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def _split_large_text(text):
    """Splits text over SPLIT_FILE_BYTES into chunks of blank-line blocks."""
    if len(text.encode("utf-8")) <= SPLIT_FILE_BYTES:
        return [text]
    chunks = []
    current = []
    current_chars = 0
    for block in _blocks_of_bounded_size(text):
        if current and current_chars + 2 + len(block) > CHUNK_MAX_CHARS:
            chunks.append("\n\n".join(current))
            current, current_chars = [], 0
        current.append(block)
        current_chars += len(block) + 2
    if current:
        chunks.append("\n\n".join(current))
    return [chunk for chunk in chunks if chunk.strip()]


def _blocks_of_bounded_size(text):
    """Yields the blank-line-separated blocks of text, none over CHUNK_MAX_CHARS.

    A longer block is cut at line ends, and a longer line at CHUNK_MAX_CHARS.
    """
    for block in text.split("\n\n"):
        if len(block) <= CHUNK_MAX_CHARS:
            yield block
            continue
        piece = ""
        for line in block.split("\n"):
            while len(line) > CHUNK_MAX_CHARS:
                if piece:
                    yield piece
                    piece = ""
                yield line[:CHUNK_MAX_CHARS]
                line = line[CHUNK_MAX_CHARS:]
            if piece and len(piece) + 1 + len(line) > CHUNK_MAX_CHARS:
                yield piece
                piece = line
            else:
                piece = f"{piece}\n{line}" if piece else line
        if piece:
            yield piece


def load_corpus(spec: str, max_chars: int | None = None) -> list[str]:
    """Returns the documents of a corpus spec: "builtin:stdlib" or a path/glob.

    `max_chars` (None or 0 = everything) keeps the first documents up to that
    many characters in total.
    """
    if spec == BUILTIN_STDLIB:
        return stdlib_corpus(max_chars)
    return truncate_documents(read_text_documents(spec), max_chars)
