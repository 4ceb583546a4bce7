"""The errors and warnings the package raises, read from its source, and the ones docs/troubleshooting.md lists.

Source side: every exception constructed in ``src/peft_gralora`` (``raise XError(...)``, ``return XError(...)`` in a
helper), every ``warnings.warn(...)`` and every ``logger.warning(...)``. Its message is rendered as a template
(f-string holes and computed parts become ``…``) and keyed by its first ``KEY_LEN`` characters, cut at a word. A
message passed in a variable is resolved when it is a call of a function of the same module that returns a string;
otherwise it is left out (the page may still list it: see ``source_templates``).

Page side: every table row of docs/troubleshooting.md whose first cell is a code span naming the class and whose
second cell starts with a code span holding the key::

    | `ValueError` | `gralora_k must be an integer >= 1, got …` | cause ... fix ... |

Run ``python -m tests.docs_errors`` to print the rows the page is missing (ready to paste) and the rows the code no
longer raises.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "peft_gralora"
PAGE = ROOT / "docs" / "troubleshooting.md"
KEY_LEN = 60
HOLE = "…"
LOG_WARNING = "logger.warning"


@dataclass(frozen=True)
class Message:
    kind: str  # exception class name, warning category, or "logger.warning"
    key: str  # the first KEY_LEN characters of the template, cut at a word
    where: str  # file:line of the first site


def template(node: ast.AST | None, helpers: dict[str, ast.AST] | None = None) -> str:
    """The literal text of a string expression, with ``…`` for every computed part."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(template(v, helpers) if isinstance(v, ast.Constant) else HOLE for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return template(node.left, helpers) + template(node.right, helpers)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):  # "..." % args (logging style)
        return template(node.left, helpers)
    if helpers and isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in helpers:
        return template(helpers[node.func.id])
    return HOLE


def key_of(text: str) -> str:
    """Whitespace normalised, holes merged, cut to at most KEY_LEN characters at a word boundary."""
    text = re.sub(r"%[-#0 +]*\d*(?:\.\d+)?[sdrfgeix]", HOLE, text)  # logging's %-placeholders are holes too
    text = re.sub(r"\s+", " ", text)
    text = re.sub(rf"(?:{HOLE}\s*)+{HOLE}", HOLE, text).strip()
    if len(text) > KEY_LEN:
        cut = text[:KEY_LEN]
        space = cut.rfind(" ")
        text = (cut[:space] if space > KEY_LEN // 2 else cut).rstrip()
    return text


def _has_literal(key: str) -> bool:
    return len(key.replace(HOLE, "").strip(" :.,;")) >= 3


def _class_name(func: ast.AST) -> str | None:
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name and name[:1].isupper() and name.endswith(("Error", "Exception", "Warning")):
        return name
    return None


def _string_helpers(tree: ast.Module) -> dict[str, ast.AST]:
    """Module-level functions that return a string expression (message builders)."""
    found: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Return) and _has_literal(key_of(template(sub.value))):
                    found[node.name] = sub.value
                    break
    return found


def source_messages() -> dict[tuple[str, str], Message]:
    """``(kind, key) -> Message`` for every error and warning message built in src/peft_gralora."""
    out: dict[tuple[str, str], Message] = {}
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        helpers = _string_helpers(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            kind = _class_name(node.func)
            if func == "warnings.warn":
                category = (
                    node.args[1]
                    if len(node.args) > 1
                    else next((k.value for k in node.keywords if k.arg == "category"), None)
                )
                kind = ast.unparse(category).split(".")[-1] if category is not None else "UserWarning"
            elif func.endswith("logger.warning"):
                kind = LOG_WARNING
            if kind is None or not node.args:
                continue
            key = key_of(template(node.args[0], helpers))
            if _has_literal(key):
                where = f"{path.relative_to(ROOT).as_posix()}:{node.lineno}"
                out.setdefault((kind, key), Message(kind, key, where))
    return out


def source_templates() -> set[str]:
    """The key of every string expression in src/peft_gralora (for messages built away from their raise)."""
    keys: set[str] = set()
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.JoinedStr | ast.Constant | ast.BinOp):
                key = key_of(template(node))
                if _has_literal(key):
                    keys.add(key)
    return keys


ROW = re.compile(r"^\|\s*`(?P<kind>[A-Za-z_.]+)`\s*\|\s*`(?P<key>(?:[^`\\]|\\.)+)`")


def page_entries(path: Path = PAGE) -> dict[tuple[str, str], int]:
    """``(kind, key) -> line`` for every error row of the troubleshooting page."""
    entries: dict[tuple[str, str], int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = ROW.match(line)
        if match:
            key = match["key"].replace("\\|", "|")
            entries[(match["kind"], re.sub(r"\s+", " ", key).strip())] = number
    return entries


def row(message: Message) -> str:
    """A page row for ``message``, cause and fix left to fill in."""
    key = message.key.replace("|", "\\|")
    return f"| `{message.kind}` | `{key}` | CAUSE. FIX. <!-- {message.where} --> |"


def differences() -> tuple[list[Message], list[tuple[str, str, int]]]:
    """(messages the page does not list, page rows whose message the code no longer has)."""
    code = source_messages()
    page = page_entries()
    missing = [m for k, m in sorted(code.items()) if k not in page]
    kinds = {kind for kind, _ in code}
    templates = source_templates()
    stale = [
        (kind, key, line)
        for (kind, key), line in sorted(page.items(), key=lambda item: item[1])
        if (kind, key) not in code and not (kind in kinds and key in templates)
    ]
    return missing, stale


if __name__ == "__main__":
    missing, stale = differences()
    print(f"{len(source_messages())} messages in src, {len(page_entries())} rows on {PAGE.relative_to(ROOT)}")
    if missing:
        print("\nMissing from the page (add to the section of the feature, fill in cause and fix):\n")
        print("\n".join(row(m) for m in missing))
    if stale:
        print("\nOn the page but no longer in the code (remove or update):\n")
        print("\n".join(f"line {line}: `{kind}` `{key}`" for kind, key, line in stale))
