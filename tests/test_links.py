"""Docs that stay true: every file the user docs and the code comments point to exists.

* README.md and docs/**/*.md: every relative Markdown link (and its ``#anchor``) resolves inside
  the repository; every repository path written in code (inline or fenced) exists; every
  ``python -m deltadiff.…`` module exists; no ``../shared`` path (users do not have it).
* Comments and docstrings of the packaged folders and tools/: every Markdown file they name
  (``docs/corpus.md``, ``MODEL.md``, ``EXPORT-FINDINGS``, ``README "INT8"``, ``DESIGN "Tiling"``, …)
  exists in the repository, and a quoted section is a heading of that file.

Written by us (no maintained Markdown link checker covers backticked paths and code comments).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Paths in the docs are checked when they start with one of the repository's own top-level names;
# anything else (photos/, out/, models/pixel, DIR/...) is a user's path.
TOP_LEVEL = (
    ".ci", "benchmarks", "calibration", "deltadiff", "docs", "examples", "export", "model",
    "runtime", "tests", "tools", "weights", "pyproject.toml", "README.md",
)  # fmt: skip
CODE_DIRS = ("deltadiff", "model", "export", "runtime", "calibration", "benchmarks", "tools")
OUTPUT_FLAGS = {"-o", "--out", "--output"}  # the path after these is written, not read

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_PATH = re.compile(r"^[\w.-]+(?:/[\w.@-]+)*/?$")
_MODULE = re.compile(r"\bpython3? -m (deltadiff(?:\.\w+)+)")
_URL = re.compile(r"\w+://\S+")
# In comments: a file name ending in .md (not a placeholder such as <stem>.md, not x.md5) ...
_MD_NAME = re.compile(r"(?<![\w/.<>{}*-])((?:[\w.-]+/)*[\w-][\w.-]*\.md)(?![\w-])")
# ... a team-style document name (EXPORT-FINDINGS, DEPLOY-NOTES), or an ALL-CAPS name followed by a section:
# README "INT8", DESIGN "Tiling", STYLE §12.
_FINDINGS = re.compile(r"\b([A-Z][A-Z0-9]*(?:-[A-Z0-9]+)*-(?:FINDINGS|NOTES))\b(?!\.md)")
_MAY_NAME_A_DOC = re.compile(r"\.md\b|-FINDINGS|-NOTES|§|README|DESIGN|STYLE")
_NUMBERED_SECTION = re.compile(r"\b([A-Z][A-Z0-9]{3,}(?:-[A-Z0-9]+)*)(?:\.md)?\s*§")
_QUOTED_SECTION = re.compile(
    r"(?<![\w/.-])(README|DESIGN|STYLE|(?:[\w-]+/)*[\w-][\w.-]*\.md)\s+\"([^\"\n]+)\""
)


@dataclass(frozen=True)
class Problem:
    where: str  # file:line
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


# --------------------------------------------------------------------------- Markdown side


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(md: Path) -> list[str]:
    out, fenced = [], False
    for line in md.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            out.append(m.group(1))
    return out


def anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in headings(md):
        slug = github_slug(h)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def split_markdown(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(prose lines, code lines) with 1-based line numbers; inline code spans count as code."""
    prose, code, fenced = [], [], False
    for no, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            code.append((no, line))
            continue
        code.extend((no, m.group(2).strip()) for m in _INLINE.finditer(line))
        prose.append((no, _INLINE.sub(" ", line)))
    return prose, code


def check_link(md: Path, target: str, repo: Path = REPO) -> str | None:
    """Why a Markdown link target is broken, or None. URLs and mail links are not checked."""
    if _SCHEME.match(target) or target.startswith("//"):
        return None
    path_part, _, anchor = target.partition("#")
    dest = (md.parent / path_part).resolve() if path_part else md
    if not dest.is_relative_to(repo):
        return f"link {target!r} points outside the repository"
    if not dest.exists():
        return f"link {target!r}: no such file"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"link {target!r}: {dest.name} has no heading with anchor #{anchor}"
    return None


def path_tokens(code: str) -> list[str]:
    """Repository paths in a piece of code: tokens that start with a top-level name of the repo."""
    out, words = [], code.split()
    for i, word in enumerate(words):
        if i and words[i - 1] in OUTPUT_FLAGS:
            continue
        tok = word.strip("\"'(),;[]").split("::")[0]
        if "=" in tok:
            tok = tok.rsplit("=", 1)[1]
        if not _PATH.match(tok) or tok.strip("/").split("/")[0] not in TOP_LEVEL:
            continue
        out.append(tok)
    return out


def _package_dirs(repo: Path) -> dict[str, str]:
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))
    return pyproject["tool"]["setuptools"]["package-dir"]


def module_exists(module: str, package_dirs: dict[str, str], repo: Path = REPO) -> bool:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):  # the longest mapped package prefix
        pkg = ".".join(parts[:n])
        if pkg in package_dirs:
            base = repo / package_dirs[pkg] / Path(*parts[n:])
            return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    return False


def markdown_problems(md: Path, repo: Path = REPO) -> list[Problem]:
    rel = md.relative_to(repo)
    text = md.read_text(encoding="utf-8")
    prose, code = split_markdown(text)
    problems: list[Problem] = []
    for no, line in prose:
        targets = [m.group(1) for m in _LINK.finditer(line)]
        if m := _REF_DEF.match(line):
            targets.append(m.group(1))
        for target in targets:
            if why := check_link(md, target, repo):
                problems.append(Problem(f"{rel}:{no}", why))
    package_dirs = _package_dirs(repo)
    for no, snippet in code:
        for tok in path_tokens(snippet):
            if not (repo / tok).exists():
                problems.append(Problem(f"{rel}:{no}", f"`{tok}`: no such file in the repository"))
        for module in _MODULE.findall(snippet):
            if not module_exists(module, package_dirs, repo):
                problems.append(Problem(f"{rel}:{no}", f"`python -m {module}`: no such module"))
    for no, line in enumerate(text.splitlines(), 1):
        if "../shared" in line:
            problems.append(Problem(f"{rel}:{no}", "names ../shared, which users do not have"))
    return problems


# --------------------------------------------------------------------------- code side


def comments_and_docstrings(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and every module / class / function docstring."""
    out = []
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    out.extend((t.start[0], t.string) for t in tokens if t.type == tokenize.COMMENT)
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                out.append((node.body[0].lineno, doc))
    return out


@dataclass(frozen=True)
class DocRef:
    name: str  # e.g. "docs/corpus.md", "MODEL.md"
    section: str | None  # a quoted section title, if any
    offset: int  # where in the comment / docstring


def _is_doc_name(name: str) -> bool:
    """A Markdown name that refers to a document of ours, not to a file a program writes:
    a repository path (docs/corpus.md) or an ALL-CAPS name (README.md, MODEL.md), not
    ``load-serve.md`` or ``OUT/bench.md``."""
    *dirs, base = name.split("/")
    if dirs:
        return dirs[0] in TOP_LEVEL
    return re.fullmatch(r"[A-Z][A-Z0-9_-]*\.md", base) is not None


def doc_refs(text: str) -> list[DocRef]:
    """Markdown documents a comment names (each name once per comment)."""
    text = _URL.sub(lambda m: " " * len(m.group()), text)
    refs: dict[tuple[str, str | None], DocRef] = {}
    for m in _MD_NAME.finditer(text):
        if _is_doc_name(m.group(1)):
            refs.setdefault((m.group(1), None), DocRef(m.group(1), None, m.start()))
    for pattern in (_FINDINGS, _NUMBERED_SECTION):
        for m in pattern.finditer(text):
            name = m.group(1) + ".md"
            refs.setdefault((name, None), DocRef(name, None, m.start()))
    for m in _QUOTED_SECTION.finditer(text):
        name = m.group(1) if m.group(1).endswith(".md") else m.group(1) + ".md"
        refs.pop((name, None), None)
        refs[(name, m.group(2))] = DocRef(name, m.group(2), m.start())
    return list(refs.values())


def resolve_doc(name: str, py_file: Path, repo: Path = REPO) -> Path | None:
    for base in (repo, py_file.parent, repo / "docs"):
        if (base / name).is_file():
            return base / name
    return None


def has_section(md: Path, title: str) -> bool:
    return any(title.lower() in h.lower() for h in headings(md))


def code_problems(py_file: Path, repo: Path = REPO) -> list[Problem]:
    rel = py_file.relative_to(repo)
    problems: list[Problem] = []
    source = py_file.read_text(encoding="utf-8")
    if not _MAY_NAME_A_DOC.search(source):  # most files: nothing to parse
        return problems
    for line, text in comments_and_docstrings(source):
        for ref in doc_refs(text):
            where = f"{rel}:{line + text.count(chr(10), 0, ref.offset)}"
            found = resolve_doc(ref.name, py_file, repo)
            if found is None:
                problems.append(Problem(where, f"names {ref.name}, which is not in the repository"))
            elif ref.section and not has_section(found, ref.section):
                problems.append(Problem(where, f'{ref.name} has no section "{ref.section}"'))
    return problems


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def code_files() -> list[Path]:
    files = []
    for folder in CODE_DIRS:
        files.extend(
            p for p in sorted((REPO / folder).rglob("*.py")) if "__pycache__" not in p.parts
        )
    return files


def _report(problems: list[Problem], scanned: int, kind: str) -> str:
    return f"{len(problems)} broken reference(s) in {scanned} {kind}:\n" + "\n".join(
        map(str, problems)
    )


# --------------------------------------------------------------------------- the checks


def test_docs_links_and_paths_resolve() -> None:
    files = doc_files()
    assert len(files) > 1, "docs/ is missing"
    problems = [p for md in files for p in markdown_problems(md)]
    assert not problems, _report(problems, len(files), "Markdown files")


def test_code_comments_name_existing_docs() -> None:
    files = code_files()
    problems = [p for py in files for p in code_problems(py)]
    assert not problems, _report(problems, len(files), "Python files")


def test_readme_stays_short() -> None:
    """The README is for users (what, set-up, CLI, API, headline numbers); details live in docs/."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines (at most 250): move details into docs/"


# --------------------------------------------------------------------------- the checker itself


def _mini_repo(root: Path) -> Path:
    """A tiny repository: pyproject's package-dir, a README with one section, a few files."""
    files = {
        "pyproject.toml": (
            "[tool.setuptools]\n"
            'package-dir = { "deltadiff" = "deltadiff", "deltadiff.runtime" = "runtime" }\n'
        ),
        "README.md": "# Project\n\n## Documentation\n",
        "docs/design.md": "# Design\n",
        "deltadiff/manifest.py": "",
        "deltadiff/cli/run.py": "",
        "runtime/__init__.py": "",
        "examples/astronaut_lr.png": "",
        "tests/test_links.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_markdown_checker_flags_what_is_broken_and_only_that(tmp_path: Path) -> None:
    repo = _mini_repo(tmp_path / "repo")
    md = repo / "docs" / "probe.md"
    md.write_text(
        "# Title\n\n## A section\n\n"
        "[ok](design.md) [ok anchor](#a-section) [up](../README.md#documentation)\n"
        "[web](https://example.com/x.md) [mail](mailto:a@b) `[not a link](nowhere.md)`\n"
        "[bad](nowhere.md) [bad anchor](#no-such) [outside](../../shared/x.md)\n"
        "`deltadiff/manifest.py` `tests/test_links.py::test_x` `photos/` `DIR/int8-report.<target>.md`\n"
        "`benchmarks/results/*.json` `runtime/nope.py` `x.md5` `--graph=deltadiff/cli/run.py`\n"
        "```bash\ndd-run upscale examples/astronaut_lr.png -o runtime/new_out.png\n"
        "python -m deltadiff.cli.run\npython -m deltadiff.runtime.nope\n```\n",
        encoding="utf-8",
    )
    found = sorted(p.what for p in markdown_problems(md, repo))
    assert found == sorted(
        [
            "link 'nowhere.md': no such file",
            "link '#no-such': probe.md has no heading with anchor #no-such",
            "link '../../shared/x.md' points outside the repository",
            "names ../shared, which users do not have",
            "`runtime/nope.py`: no such file in the repository",
            "`python -m deltadiff.runtime.nope`: no such module",
        ]
    )


def test_comment_checker_flags_what_is_broken_and_only_that(tmp_path: Path) -> None:
    repo = _mini_repo(tmp_path / "repo")
    py = repo / "runtime" / "probe.py"
    py.write_text(
        '"""Module doc: see docs/design.md and README "Documentation"; MODEL.md §4.2."""\n'
        '# EXPORT-FINDINGS finding 2; DESIGN "Tiling"; README "No such section"; STYLE §12; DEPLOY-NOTES P6\n'
        "# fine: https://example.org/NOTES.md, x.md5, <stem>.md, summary-<name>.md, REPO/README.md,\n"
        '# HTTP "Content-Length", (+ .md), README.md, writes ``load-serve.md`` and out/x.md\n'
        "def f():\n"
        '    """Writes ``<stem>.json`` and ``<stem>.md``; see docs/nope.md."""\n'
        '    return "MODEL.md in a plain string is not a comment"\n',
        encoding="utf-8",
    )
    found = sorted(p.what for p in code_problems(py, repo))
    assert found == sorted(
        [
            "names MODEL.md, which is not in the repository",
            "names EXPORT-FINDINGS.md, which is not in the repository",
            "names DEPLOY-NOTES.md, which is not in the repository",
            "names DESIGN.md, which is not in the repository",
            "names STYLE.md, which is not in the repository",
            'README.md has no section "No such section"',
            "names docs/nope.md, which is not in the repository",
        ]
    )


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("The default precision, per machine", "the-default-precision-per-machine"),
        ("The calibration gate (being replaced)", "the-calibration-gate-being-replaced"),
        ("Running `dd-run bench`", "running-dd-run-bench"),
        ("Tiling and GroupNorm statistics", "tiling-and-groupnorm-statistics"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug
