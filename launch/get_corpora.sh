#!/usr/bin/env bash
# Fetches bigger real corpora than the built-in ones from Debian packages and
# converts them into flaxalign data under data/corpora/ (not committed):
#
#   gcide/{a..z}.txt         dictionary entries of GCIDE (Webster's 1913 +
#                            WordNet), one blank-line-separated entry each:
#                            a `text` corpus (GPL-2+).
#   python_docs/**/*.txt     the Python HTML documentation as plain text, one
#                            file per page: a `text` corpus (PSF license).
#   wordnet_define.jsonl     `sft` pairs "Define the noun "apple"." -> the
#                            gloss of its most frequent WordNet sense
#                            (WordNet 3.0 license).
#
# Neither the demo nor the tests use them.  Needs apt-get and dpkg (no root:
# packages are downloaded and unpacked with `dpkg -x`, never installed) and a
# Python 3.  Usage:
#
#   launch/get_corpora.sh [--dry-run] [--out DIR]
#
# --dry-run prints the commands instead of running them.  Env: PYTHON (default
# the repo's .venv/bin/python, else python3), PY_DOC_PACKAGE (default
# python3.11-doc).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${REPO_ROOT}/data/corpora"
DRY_RUN=0
PY_DOC_PACKAGE="${PY_DOC_PACKAGE:-python3.11-doc}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then PYTHON="${REPO_ROOT}/.venv/bin/python"; else PYTHON=python3; fi
fi

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "get_corpora.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done

# Runs a command, or prints it under --dry-run.
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

# Runs one of the Python converters below (passed on stdin), or names it.
convert() {
  local name="$1"; shift
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '+ %q -' "${PYTHON}"; printf ' %q' "$@"; printf " <<'PY'  # the %s converter below\n" "${name}"
    cat >/dev/null
  else
    "${PYTHON}" - "$@"
  fi
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/get_corpora.XXXXXX")"
trap 'rm -rf "${WORK}"' EXIT
PACKAGES=(wordnet-base dict-gcide "${PY_DOC_PACKAGE}")

# apt-get download writes into the current folder (as root it warns that the
# _apt user cannot write there and downloads unsandboxed; that is harmless).
run cd "${WORK}"
run apt-get download "${PACKAGES[@]}"
for package in "${PACKAGES[@]}"; do
  if [[ "${DRY_RUN}" == 1 ]]; then
    run dpkg -x "${package}_VERSION_all.deb" "${WORK}/root"
  else
    run dpkg -x "$(ls "${package}"_*.deb)" "${WORK}/root"
  fi
done
SHARE="${WORK}/root/usr/share"
run mkdir -p "${OUT}"

# GCIDE: the dictd index lists (headword, offset, length) in base64; each
# entry becomes a paragraph, without the "[1913 Webster]" source tags and
# with {braces} (cross references) removed.  A few stray cp1252 bytes are
# decoded as cp1252.
convert gcide "${SHARE}/dictd/gcide.dict.dz" "${SHARE}/dictd/gcide.index" "${OUT}/gcide" <<'PY'
import gzip, os, re, sys
dict_path, index_path, out = sys.argv[1:]
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
SOURCE_TAG = r"\n?[ \t]*\[(1913 Webster|WordNet 1\.5|PJC|Century Dict\.|Webster 1828|Chambers 1728)[^\]]*\]"
def b64(text):
    value = 0
    for char in text:
        value = value * 64 + ALPHABET.index(char)
    return value
data = gzip.open(dict_path).read()
spans = set()
for line in open(index_path, encoding="utf-8", errors="replace"):
    head, offset, length = line.rstrip("\n").split("\t")[:3]
    if not head.startswith("00-"):  # Database info and license, not entries.
        spans.add((b64(offset), b64(length)))
by_letter = {}
end = 0
for offset, length in sorted(spans):
    if offset < end:
        continue  # A span inside the previous entry (a sub-entry's headword).
    end = offset + length
    raw = data[offset:end]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    # Entries start at their headword line ("Apple \\Ap"ple\\, n."); the first
    # span also holds the end of the license text before it.
    headword = re.search(r"(?m)^\S[^\n]*? \\[^\\\n]+\\", text)
    text = text[headword.start():] if headword else text
    text = re.sub(SOURCE_TAG, "", text)
    text = text.replace("{", "").replace("}", "")
    lines = [line.rstrip() for line in text.strip("\n").split("\n")]
    entry = "\n".join(lines).strip()
    entry = re.sub(r"\n{3,}", "\n\n", entry)
    letter = entry[:1].lower()
    by_letter.setdefault(letter if "a" <= letter <= "z" else "other", []).append(entry)
os.makedirs(out, exist_ok=True)
for letter, entries in sorted(by_letter.items()):
    path = os.path.join(out, f"{letter}.txt")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write("\n\n\n".join(entries) + "\n")
    os.replace(path + ".tmp", path)
print(f"gcide: {sum(map(len, by_letter.values()))} entries in {len(by_letter)} files")
PY

# Python docs: the text inside <div role="main"> of each HTML page, without
# scripts, styles and the pilcrow links; block elements end lines.
convert python_docs "${SHARE}/doc/${PY_DOC_PACKAGE%-doc}/html" "${OUT}/python_docs" <<'PY'
import html.parser, os, re, sys
html_root, out = sys.argv[1:]
BLOCKS = {"p", "div", "section", "pre", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br", "table", "blockquote"}
class Text(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.depth, self.skip, self.pre = [], 0, 0, 0
    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth:
            self.depth += tag not in ("br", "img", "hr", "meta", "link", "input")
        elif tag == "div" and attrs.get("role") == "main":
            self.depth = 1
        if self.depth and (tag in ("script", "style") or "headerlink" in (attrs.get("class") or "")):
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if self.depth and tag in BLOCKS:
            self.parts.append("\n")
    def handle_endtag(self, tag):
        if not self.depth:
            return
        if self.skip and tag in ("script", "style", "a"):
            self.skip -= 1
        if tag == "pre":
            self.pre -= 1
        if tag in BLOCKS:
            self.parts.append("\n")
        self.depth -= 1
    def handle_data(self, data):
        if self.depth and not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))
pages = 0
for root, dirs, names in os.walk(html_root):
    dirs[:] = sorted(d for d in dirs if not d.startswith("_"))
    for name in sorted(names):
        if not name.endswith(".html") or name in ("genindex.html", "search.html", "py-modindex.html"):
            continue
        parser = Text()
        with open(os.path.join(root, name), encoding="utf-8") as handle:
            parser.feed(handle.read())
        lines = [line.strip() if not line.startswith(" ") else line.rstrip() for line in "".join(parser.parts).split("\n")]
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if len(text) < 200:
            continue
        path = os.path.join(out, os.path.relpath(os.path.join(root, name), html_root)[:-len(".html")] + ".txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        pages += 1
print(f"python_docs: {pages} pages")
PY

# WordNet: for each lemma of each part of speech, the gloss of its first
# (most frequent) sense, without the quoted examples, as an sft pair.
convert wordnet "${SHARE}/wordnet" "${OUT}/wordnet_define.jsonl" <<'PY'
import json, os, sys
wordnet, out = sys.argv[1:]
pairs = []
for pos, name in (("noun", "noun"), ("verb", "verb"), ("adj", "adjective"), ("adv", "adverb")):
    with open(os.path.join(wordnet, f"data.{pos}"), "rb") as handle:
        data = handle.read()
    for line in open(os.path.join(wordnet, f"index.{pos}"), encoding="utf-8"):
        if line.startswith(" "):
            continue  # License header.
        fields = line.split()
        lemma, synset_count = fields[0], int(fields[2])
        first_offset = int(fields[-synset_count])
        record = data[first_offset:data.index(b"\n", first_offset)].decode("utf-8")
        gloss = record.split(" | ", 1)[1].split('; "')[0].strip().rstrip(";").strip()
        if len(gloss) < 3:
            continue
        gloss = gloss[0].upper() + gloss[1:]
        if not gloss.endswith((".", "!", "?")):
            gloss += "."
        word = lemma.replace("_", " ")
        pairs.append({"prompt": f'Define the {name} "{word}".', "completion": gloss})
with open(out + ".tmp", "w", encoding="utf-8") as handle:
    for pair in pairs:
        handle.write(json.dumps(pair, ensure_ascii=False) + "\n")
os.replace(out + ".tmp", out)
print(f"wordnet: {len(pairs)} sft pairs")
PY

if [[ "${DRY_RUN}" == 0 ]]; then
  # Check the results with flaxalign's own readers, when they are importable.
  (cd "${REPO_ROOT}" && "${PYTHON}" - "${OUT}" <<'PY' || echo "(flaxalign not importable here: results not checked)"
import sys
from flaxalign.data.sources import read_records
out = sys.argv[1]
for spec, kind in ((f"{out}/gcide", "text"), (f"{out}/python_docs", "text"), (f"{out}/wordnet_define.jsonl", "sft")):
    records = read_records(spec, kind)
    chars = sum(len(value) for record in records for value in record.values())
    print(f"{spec}: {len(records)} {kind} records, {chars / 1e6:.1f}M characters")
PY
  )
  du -sh "${OUT}"/*
fi
