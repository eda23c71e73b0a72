"""Regenerate the fixed prompt set for benchmarking language-model decoding (Jacobi / lookahead
decoding of SmolLM2-135M-Instruct): `src/ffsolve/resources/lm_prompts.json`.

Four kinds, 20 prompts each, in a fixed order:

- "code": the beginning of a function of the Python standard library (decorators, signature,
  docstring and the first statements), read from the stdlib's own source files on this machine
  and cut at the end of a complete statement, 200-800 characters, so the model continues the
  body;
- "chat": short hand-written instructions (below), stored as chat messages; the code that runs
  the benchmark applies the tokenizer's chat template (ChatML for SmolLM2);
- "prose": paragraph beginnings from the Python Language Reference as plain text
  (`pydoc_data.topics.topics`), one paragraph per topic, its line breaks joined, cut at a
  sentence end (else a clause end) after 200-600 characters;
- "list": structured text whose continuation is predictable structure (numbered lists,
  Markdown tables, JSON, CSV, YAML, enumerations), assembled from stdlib data (`keyword`,
  `string`, `http.HTTPStatus`, `calendar`, `unicodedata`, ...) or hand-written below.

Code and list prompts end at the end of a line, without its newline: SmolLM2's tokenizer
merges a newline with the next line's indentation into one token, so a trailing lone newline
would steer the model to column 0 (a new top-level statement) instead of the function body.

The code and prose texts depend on the Python version (recorded in the file); everything else
is literal data or derived from stable stdlib tables. Deterministic: the same Python gives the
same file byte for byte. It does not import ffsolve.

From the repository root:  .venv/bin/python benchmarks/make_lm_prompts.py [--out PATH]
"""

import argparse
import ast
import builtins
import calendar
import html.entities
import http
import json
import keyword
import re
import string
import sys
import sysconfig
import textwrap
import token
import unicodedata
from pathlib import Path
from pydoc_data.topics import topics

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "ffsolve" / "resources" / "lm_prompts.json"
PER_KIND = 20
PYVER = "{}.{}.{}".format(*sys.version_info[:3])

# --------------------------------------------------------------------------------------------
# code: (module, qualified name) candidates, in order; the first PER_KIND that fit are used
CODE_CANDIDATES = [
    ("functools", "update_wrapper"),
    ("functools", "cmp_to_key"),
    ("heapq", "heappop"),
    ("heapq", "nsmallest"),
    ("bisect", "insort_right"),
    ("bisect", "bisect_left"),
    ("textwrap", "dedent"),
    ("textwrap", "indent"),
    ("json.encoder", "py_encode_basestring_ascii"),
    ("json.encoder", "JSONEncoder.encode"),
    ("collections", "Counter.most_common"),
    ("collections", "OrderedDict.move_to_end"),
    ("statistics", "median"),
    ("statistics", "fmean"),
    ("shlex", "split"),
    ("shlex", "shlex.get_token"),
    ("fractions", "Fraction.from_float"),
    ("fnmatch", "filter"),
    ("base64", "b64encode"),
    ("copy", "deepcopy"),
    # spares, for Python versions where some of the above do not fit
    ("random", "Random.shuffle"),
    ("collections", "Counter.subtract"),
    ("statistics", "_ss"),
    ("textwrap", "shorten"),
    ("ipaddress", "ip_address"),
    ("shlex", "shlex.push_source"),
]
CODE_MIN, CODE_MAX, CODE_TARGET = 200, 800, 450


def _stdlib_file(module):
    """The module's source file under the stdlib folder, read as text and never imported (so
    functions that C accelerators replace at import, like heapq's, and frozen modules, like
    posixpath, still have their source)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    base = stdlib.joinpath(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    return path, stdlib


def _find_def(tree, qualname):
    node = tree
    for part in qualname.split("."):
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        found = [n for n in node.body if isinstance(n, kinds) and n.name == part]
        if not found:
            return None
        node = found[0]  # the first definition (platform variants come later)
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def code_prompt(module, qualname):
    """(text, file) of the function's beginning cut after a complete statement, or None when
    the function is missing, has no docstring, or no cut gives 200-800 characters with at least
    one statement after the docstring that is not the function's last."""
    path, stdlib = _stdlib_file(module)
    source = path.read_text(encoding="utf-8")
    fn = _find_def(ast.parse(source), qualname)
    if fn is None or ast.get_docstring(fn) is None:
        return None
    lines = source.splitlines(keepends=True)
    first = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
    doc_end = fn.body[0].end_lineno
    # natural cut points: the ends of statements inside the function after the docstring, but
    # not the function's end and not inside a statement that continues on the same line
    ends = sorted(
        {
            n.end_lineno
            for n in ast.walk(fn)
            if isinstance(n, ast.stmt) and n is not fn and n.end_lineno > doc_end
        }
    )
    ends = [e for e in ends if e < fn.end_lineno]
    best = None
    for end in ends:
        # no newline at the end: the tokenizer merges a newline with the next line's
        # indentation ("\n    " is one token), so a prompt ending in a lone "\n" would tell the
        # model that the next line starts at column 0
        text = textwrap.dedent("".join(lines[first - 1 : end])).rstrip("\n")
        if not CODE_MIN <= len(text) <= CODE_MAX:
            continue
        if best is None or abs(len(text) - CODE_TARGET) < abs(len(best) - CODE_TARGET):
            best = text
    if best is None:
        return None
    return best, path.relative_to(stdlib).as_posix()


def code_prompts():
    out = []
    for module, qualname in CODE_CANDIDATES:
        got = code_prompt(module, qualname)
        if got is None:
            continue
        text, file = got
        out.append(
            {
                "kind": "code",
                "text": text,
                "source": f"{module}:{qualname}",
                "file": file,
                "python_version": PYVER,
            }
        )
        if len(out) == PER_KIND:
            break
    return out


# --------------------------------------------------------------------------------------------
# prose: topic keys of pydoc_data.topics, in order; the first PER_KIND that give a cut are used
PROSE_TOPICS = [
    "assignment",
    "attribute-access",
    "binary",
    "booleans",
    "callable-types",
    "calls",
    "class",
    "comparisons",
    "context-managers",
    "conversions",
    "customization",
    "exceptions",
    "execmodel",
    "floating",
    "for",
    "formatstrings",
    "function",
    "global",
    "import",
    "lambda",
    "naming",
    "numeric-types",
    "objects",
    "raise",
    "sequence-types",
    "strings",
    "truth",
    "try",
    "typesmapping",
    "with",
    "yield",
]
PROSE_MIN, PROSE_MAX, PROSE_TARGET = 200, 600, 400
# a sentence ends at ". ", "? " or "! " before a capital letter or an opening quote, not after
# an abbreviation; a clause at "; " or ": " or ", "
SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)(?<!\bvs)[.?!]\"?(?= [A-Z\"(])")
CLAUSE_END = re.compile(r"[;:,](?= )")


def _paragraphs(text):
    """Prose paragraphs of a topic, each joined into one line: no headings, no indented blocks
    (grammar, code, notes), no bullet or numbered items, no doctest."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        raw = block.split("\n")
        if not raw[0] or raw[0][0].isspace() or len(raw) < 2:
            continue
        if re.match(r"^([*+=~^-])\1+$", raw[1]) or re.match(r"^(\*|-|\d+\.|\[\d+\]) ", raw[0]):
            continue
        if any(line[:1].isspace() for line in raw) or ">>>" in block:
            continue
        if not re.match(r"[A-Z\"*]", raw[0]) or len(raw[0].split()) < 6:
            continue  # not a sentence: a signature list, a table row...
        par = " ".join(line.strip() for line in raw)
        par = re.sub(r"(?<=[a-z]-) (?=[a-z])", "", par)  # words the wrapping broke at a hyphen
        out.append(" ".join(par.split()))
    return out


def _prose_cut(par):
    """The paragraph cut at the sentence end nearest PROSE_TARGET characters inside
    [PROSE_MIN, PROSE_MAX] that leaves 40 or more characters after it; else a clause end."""
    for pattern in (SENTENCE_END, CLAUSE_END):
        cuts = [m.end() for m in pattern.finditer(par)]
        cuts = [c for c in cuts if PROSE_MIN <= c <= PROSE_MAX and len(par) - c >= 40]
        if cuts:
            return par[: min(cuts, key=lambda c: abs(c - PROSE_TARGET))]
    return None


def prose_prompts():
    out = []
    for key in PROSE_TOPICS:
        if key not in topics:
            continue
        for par in _paragraphs(topics[key]):
            cut = _prose_cut(par)
            if cut is not None:
                out.append(
                    {
                        "kind": "prose",
                        "text": cut,
                        "source": f"pydoc_data.topics:{key}",
                        "topic": key,
                        "python_version": PYVER,
                    }
                )
                break
        if len(out) == PER_KIND:
            break
    return out


# --------------------------------------------------------------------------------------------
# chat: hand-written instructions (original text)
CHAT = [
    "Write a Python function that returns the n-th Fibonacci number using iteration, "
    "with a short docstring.",
    "Explain in two or three sentences what a hash table is and why lookups are fast.",
    "Summarise the following in one sentence: The city council met on Tuesday to discuss the "
    "new bike lanes. Most residents who spoke supported the plan, but shop owners worried "
    "about losing parking spaces. The council will vote next month.",
    "Translate into French: 'The library opens at nine in the morning and closes at six.'",
    "Give me five steps to repot a houseplant.",
    "Write a SQL query that returns the ten customers with the highest total order value from "
    "tables customers(id, name) and orders(id, customer_id, amount).",
    "What is the difference between a list and a tuple in Python? Answer briefly.",
    "Write a haiku about the first snow of winter.",
    "List three advantages and three disadvantages of working from home.",
    "Explain photosynthesis to a ten-year-old in a short paragraph.",
    "Write a bash command that counts the lines of all .py files in the current folder and "
    "its subfolders.",
    "Convert 72 degrees Fahrenheit to Celsius and show the calculation.",
    "Suggest a name for a bakery that specialises in sourdough bread, and explain your choice "
    "in one sentence.",
    "Write a short, polite email asking a colleague to move our Thursday meeting to Friday.",
    "Explain what the Big-O notation O(n log n) means, with one example of an algorithm.",
    "Write a JavaScript function that checks whether a string is a palindrome, ignoring case "
    "and spaces.",
    "Give three tips for getting better sleep.",
    "Translate into Spanish: 'Where is the nearest train station?'",
    "Describe the water cycle in four short steps.",
    "Write a Python class Stack with push, pop and is_empty methods.",
]


def chat_prompts():
    return [
        {
            "kind": "chat",
            "messages": [{"role": "user", "content": text}],
            "template": "chatml",
            "source": "handwritten",
        }
        for text in CHAT
    ]


# --------------------------------------------------------------------------------------------
# list: structured text, from stdlib tables or hand-written
def _rows(rows, n):
    return "".join(rows[:n])


def list_prompts():
    items = []

    def add(text, source):
        # cut after a complete item, without its newline (see code_prompt)
        items.append({"kind": "list", "text": text.rstrip("\n"), "source": source})

    # 1. Python keywords, numbered
    kw = keyword.kwlist
    add(
        "The keywords of the Python language, in alphabetical order:\n\n"
        + _rows([f"{i}. {k}\n" for i, k in enumerate(kw, 1)], 9),
        "keyword.kwlist",
    )
    # 2. months, numbered (the C locale's English names: calendar follows LC_TIME, unset here)
    months = list(calendar.month_name)[1:]
    assert months[0] == "January", "calendar month names follow a non-English locale"
    rows = [f"{i}. {m}\n" for i, m in enumerate(months, 1)]
    add("The months of the year:\n" + _rows(rows, 5), "calendar.month_name")
    # 3. days of the month as JSON (a common year)
    days = [calendar.monthrange(2023, m)[1] for m in range(1, 13)]
    add(
        "Days in each month of 2023 (JSON):\n{\n"
        + _rows([f'  "{m}": {d},\n' for m, d in zip(months, days, strict=True)], 5),
        "calendar.monthrange",
    )
    # 4. weekdays as YAML
    week = list(calendar.day_name)
    rows = [f"  - name: {d}\n    abbr: {d[:3]}\n    index: {i}\n" for i, d in enumerate(week)]
    add(
        "# calendar.yaml\nlocale: en\nfirst_weekday: Monday\nweekdays:\n" + _rows(rows, 3),
        "calendar.day_name",
    )
    # 5. HTTP status codes as a Markdown table
    statuses = sorted(http.HTTPStatus, key=int)
    ok = [s for s in statuses if 200 <= s < 300]
    add(
        "| Code | Reason phrase | Description |\n|------|---------------|-------------|\n"
        + _rows([f"| {int(s)} | {s.phrase} | {s.description} |\n" for s in ok], 4),
        "http.HTTPStatus (2xx)",
    )
    # 6. HTTP client errors as CSV
    client = [s for s in statuses if 400 <= s < 500]
    add(
        "code,name,phrase\n" + _rows([f"{int(s)},{s.name},{s.phrase}\n" for s in client], 6),
        "http.HTTPStatus (4xx)",
    )
    # 7. ASCII letters as a Markdown table
    rows = [f"| {c} | {ord(c)} | 0x{ord(c):02X} | {ord(c):08b} |\n" for c in string.ascii_uppercase]
    add(
        "ASCII codes of the uppercase letters:\n\n| Char | Dec | Hex | Bin |\n|---|---|---|---|\n"
        + _rows(rows, 6),
        "string.ascii_uppercase",
    )
    # 8. punctuation with its Unicode names
    add(
        "ASCII punctuation characters and their Unicode names:\n"
        + _rows([f"{c}  U+{ord(c):04X}  {unicodedata.name(c)}\n" for c in string.punctuation], 8),
        "string.punctuation + unicodedata.name",
    )
    # 9. Greek small letters with their Unicode names
    greek = [chr(c) for c in range(0x3B1, 0x3CA) if c != 0x3C2]
    add(
        "Unicode code points of the Greek lowercase letters:\n"
        + _rows([f"U+{ord(c):04X} {unicodedata.name(c)}\n" for c in greek], 6),
        "unicodedata.name (Greek)",
    )
    # 10. token numbers
    names = [token.tok_name[i] for i in sorted(token.tok_name) if i < token.N_TOKENS]
    add(
        "Token types of Python's tokenizer (token.tok_name):\n"
        + _rows([f"{i}: {n}\n" for i, n in enumerate(names)], 8),
        "token.tok_name",
    )
    # 11. built-in exceptions, bulleted
    exc = sorted(
        n
        for n, v in vars(builtins).items()
        if isinstance(v, type) and issubclass(v, BaseException) and not n.startswith("_")
    )
    add(
        "Built-in exception classes of Python, in alphabetical order:\n"
        + _rows([f"- {n}\n" for n in exc], 8),
        "builtins (exceptions)",
    )
    # 12. built-in functions, as a Python list
    funcs = sorted(
        n
        for n, v in vars(builtins).items()
        if callable(v) and not isinstance(v, type) and n.islower() and not n.startswith("_")
    )
    add(
        "BUILTIN_FUNCTIONS = [\n" + _rows([f'    "{n}",\n' for n in funcs], 10),
        "builtins (functions)",
    )
    # 13. HTML entities as a JSON object
    ents = sorted(html.entities.name2codepoint.items(), key=lambda kv: (kv[1], kv[0]))
    ents = [(n, c) for n, c in ents if c > 160]
    add(
        '{\n  "entities": {\n' + _rows([f'    "{n}": {c},\n' for n, c in ents], 7),
        "html.entities.name2codepoint",
    )
    # 14. numbers in three bases, a plain-text table
    add(
        "Decimal  Hex  Binary\n" + _rows([f"{i:>7}  {i:>3X}  {i:>06b}\n" for i in range(32)], 10),
        "generated (number bases)",
    )
    # 15. multiplication table
    add(
        "Multiplication table of 7:\n" + _rows([f"7 x {i} = {7 * i}\n" for i in range(1, 13)], 5),
        "generated (multiplication)",
    )
    # 16. powers of two as CSV
    rows = [f"{n},{2**n},0x{2**n:X}\n" for n in range(40)]
    add("n,2^n,hex\n" + _rows(rows, 11), "generated (powers of two)")
    # 17-20. hand-written
    add(
        "# config.yaml for the web service\nserver:\n  host: 0.0.0.0\n  port: 8080\n"
        "  workers: 4\n  timeout_seconds: 30\ndatabase:\n  driver: postgresql\n"
        "  host: db.internal\n  port: 5432\n  name: orders\n  user: app\n  pool_size: 10\n"
        "logging:\n  level: INFO\n",
        "handwritten (YAML)",
    )
    add(
        "| Planet | Order from the Sun | Moons | Type |\n|---|---|---|---|\n"
        "| Mercury | 1 | 0 | rocky |\n| Venus | 2 | 0 | rocky |\n| Earth | 3 | 1 | rocky |\n",
        "handwritten (Markdown table)",
    )
    add(
        "[\n"
        '  {"id": 1, "name": "Alice", "email": "alice@example.com", "active": true},\n'
        '  {"id": 2, "name": "Bob", "email": "bob@example.com", "active": false},\n'
        '  {"id": 3, "name": "Carol", "email": "carol@example.com", "active": true},\n',
        "handwritten (JSON array)",
    )
    add(
        "date,city,min_temp_c,max_temp_c,rain_mm\n2024-03-01,Oslo,-4,3,0.0\n"
        "2024-03-01,Berlin,1,9,2.5\n2024-03-01,Madrid,6,17,0.0\n2024-03-02,Oslo,-6,1,0.4\n"
        "2024-03-02,Berlin,2,10,0.0\n",
        "handwritten (CSV)",
    )
    return items


# --------------------------------------------------------------------------------------------
def build():
    kinds = {
        "code": code_prompts(),
        "chat": chat_prompts(),
        "prose": prose_prompts(),
        "list": list_prompts(),
    }
    prompts = []
    for kind, items in kinds.items():
        assert len(items) >= 16, f"only {len(items)} {kind} prompts"
        for i, item in enumerate(items, 1):
            prompts.append({"id": f"{kind}-{i:02d}", **item})
    for p in prompts:  # clean text: printable characters, newlines only
        for t in [p.get("text", "")] + [m["content"] for m in p.get("messages", [])]:
            assert t == t.strip(" ") and all(c == "\n" or c.isprintable() for c in t), p["id"]
    return {
        "description": "Fixed prompts for benchmarking language-model decoding (Jacobi / "
        "lookahead decoding of SmolLM2-135M-Instruct): four kinds, code (stdlib function "
        "beginnings), chat (user messages; apply the tokenizer's chat template), prose "
        "(Python Language Reference paragraph beginnings) and list (structured text).",
        "generated_by": "benchmarks/make_lm_prompts.py",
        "python_version": PYVER,
        "license_note": "The code prompts are excerpts of the Python standard library's source "
        "and the prose prompts excerpts of the Python documentation (pydoc_data.topics), both "
        "Copyright Python Software Foundation, under the PSF License Agreement (Python "
        "Software Foundation License Version 2). The chat prompts and hand-written list "
        "prompts are original to this project (its MIT licence); the other list prompts are "
        "assembled from stdlib data tables.",
        "counts": {kind: len(items) for kind, items in kinds.items()},
        "prompts": prompts,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    data = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(data['prompts'])} prompts: {data['counts']})")


if __name__ == "__main__":
    main()
