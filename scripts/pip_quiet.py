"""``python scripts/pip_quiet.py ARGS...``: ``pip install --quiet ARGS`` without the noise (used by ``make install``).

pip's ``--quiet`` still prints two kinds of messages that nobody installing fedsim can act on:

* ``WARNING: Location '<url>' is ignored: it is neither a file nor a directory.``: one per package
  when the machine's pip configuration (``pip config list``) names an index directory that does
  not exist; dropped, with no summary line either (the machine's configuration is not fedsim's
  to fix);
* warnings of the build backend (setuptools' ``...Warning:`` blocks framed by ``!!`` lines, about
  packaging metadata or editable installs): dropped.

Every other line is passed through as it arrives. When pip fails, its whole output is printed
unfiltered and the exit status is pip's.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence

_LOCATION = re.compile(r"^WARNING: Location '[^']*' is ignored: it is neither a file nor a directory\.\s*$")
_BACKEND_WARNING = re.compile(r"^\s*\S+\.py:\d+: \w*Warning: ")
_FRAME = re.compile(r"^\s*!!\s*$")


def filter_lines(lines: Iterable[str], counts: dict[str, int]) -> Iterator[str]:
    """The lines worth showing; ``counts["locations"]`` counts the dropped location warnings."""
    it = iter(lines)
    for line in it:
        if _LOCATION.match(line):
            counts["locations"] = counts.get("locations", 0) + 1
            continue
        if _BACKEND_WARNING.match(line):
            frames = 0
            for rest in it:  # the "!!" framed block, then the source line that warned
                if _FRAME.match(rest):
                    frames += 1
                    continue
                if frames >= 2:
                    break
            continue
        yield line


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pip install --quiet --disable-pip-version-check ARGS``; print what matters."""
    args = list(sys.argv[1:] if argv is None else argv)
    return run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args])


def run(cmd: Sequence[str]) -> int:
    """Run ``cmd`` (a pip command), printing its output through :func:`filter_lines`; on failure
    its whole output, unfiltered, on stderr. Returns its exit status."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    seen: list[str] = []
    counts: dict[str, int] = {}

    def lines() -> Iterator[str]:
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append(line)
            yield line

    for line in filter_lines(lines(), counts):
        print(line, end="", flush=True)
    code = proc.wait()
    if code != 0:
        print(f"{' '.join(cmd[2:])} failed (exit {code}); its full output:", file=sys.stderr)
        print("".join(seen), end="", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
