"""Rewrite the line ranges of README.md's reading guide from gateway.py's banners.

Each row "| §N ... | A-B |" covers from section N's banner (line 1 for §1) to
the line before the banner of the next row's section (or of §12 for the last).
Run it after a change moves the banners: `python3 .ci/readme_ranges.py`.
"""
import re

lines = open("gateway.py", encoding="utf-8").read().splitlines()
banners = {int(m.group(1)): number for number, line in enumerate(lines, 1)
           if (m := re.match(r"# §(\d+)  ", line))}
text = open("README.md", encoding="utf-8").read()
rows = [int(n) for n in re.findall(r"^\| §(\d+)[^|]*\| \d+-\d+ \|", text, re.M)]
ends = rows[1:] + [rows[-1] + 1]
ranges = iter([(1 if n == 1 else banners[n], banners[after] - 1)
               for n, after in zip(rows, ends)])


def new_range(match):
    first, last = next(ranges)
    return f"{match.group(1)}| {first}-{last} |"


text = re.sub(r"^(\| §\d+[^|]*)\| \d+-\d+ \|", new_range, text, flags=re.M)
open("README.md", "w", encoding="utf-8").write(text)
