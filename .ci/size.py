"""The reading budget of gateway.py (issue: the teaching edition), printed by `make size`.

Counts non-blank lines. Commentary = comment lines + docstring lines + code lines
that end in a comment; code = non-blank lines that are neither comment-only nor
docstring. Exits 1 when a budget is missed, so `make size` can gate a change.
"""
import ast
import io
import re
import sys
import tokenize

BUDGET = {"code": 2400, "commentary": 0.35, "lines": 3700, "function": 50, "section": 500}


def measure(src):
    lines = src.splitlines()
    tree = ast.parse(src)
    doc, undocumented = set(), []
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = n.body[0] if n.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                doc.update(range(first.lineno, first.end_lineno + 1))
            elif not isinstance(n, ast.Module):
                undocumented.append(f"{n.name} (line {n.lineno})")
    comment, only = set(), set()
    for t in tokenize.generate_tokens(io.StringIO(src).readline):
        if t.type == tokenize.COMMENT:
            comment.add(t.start[0])
            if not lines[t.start[0] - 1][:t.start[1]].strip():
                only.add(t.start[0])
    nonblank = {i for i, line in enumerate(lines, 1) if line.strip()}
    code = nonblank - doc - only
    long_functions = [f"{n.name} ({n.end_lineno - n.lineno + 1})" for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.end_lineno - n.lineno + 1 > BUDGET["function"]]
    banners = [i for i, line in enumerate(lines, 1) if re.match(r"# §\d+[a-z]? ", line)]
    sections = [(lines[a - 1][2:].strip(), b - a, len(code & set(range(a, b))),
                 len((doc | comment) & nonblank & set(range(a, b)))
                 / max(1, len(nonblank & set(range(a, b)))))
                for a, b in zip(banners, banners[1:] + [len(lines) + 1])]
    return {"lines": len(lines), "code": len(code),
            "commentary": len((doc | comment) & nonblank) / max(1, len(nonblank)),
            "long_functions": long_functions, "undocumented": undocumented,
            "sections": sections}


def main(path="gateway.py"):
    m = measure(open(path, encoding="utf-8").read())
    rows = [("lines in the file", m["lines"], f"<= {BUDGET['lines']}",
             m["lines"] <= BUDGET["lines"]),
            ("code lines", m["code"], f"<= {BUDGET['code']}", m["code"] <= BUDGET["code"]),
            ("commentary", f"{m['commentary']:.1%}", f">= {BUDGET['commentary']:.0%}",
             m["commentary"] >= BUDGET["commentary"]),
            ("functions over 50 lines", len(m["long_functions"]), "0",
             not m["long_functions"]),
            ("functions and classes without a docstring", len(m["undocumented"]), "0",
             not m["undocumented"])]
    for name, value, budget, ok in rows:
        print(f"{name:<46} {value:>7}  {budget:<8} {'ok' if ok else 'OVER'}")
    print(f"{'sections':<46} {'lines':>7}  {'code':>5} {'commentary':>11}")
    for name, size, code, share in m["sections"]:
        ok = size <= BUDGET["section"]
        rows.append((name, size, "", ok))
        print(f"  {name[:44]:<44} {size:>7}  {code:>5} {share:>10.0%}  {'ok' if ok else 'OVER'}")
    for name in m["long_functions"] + m["undocumented"]:
        print("   ", name)
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
