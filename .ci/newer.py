"""Names each package whose version in a resolved set differs from constraints.txt (the lock).

    python .ci/newer.py RESOLVED [LOCK]

RESOLVED is `pip freeze` output or a `pip install --dry-run --report` JSON file. Prints one line per
package, `name resolved (locked X)`, or `none`; always exits 0 (it reports, it does not judge).
"""

from __future__ import annotations

import json
import re
import sys


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: str) -> dict[str, str]:
    text = open(path).read()
    if text.lstrip().startswith("{"):  # a pip report
        return {_key(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(text)["install"]}
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_key(name)] = version.split("+", 1)[0]  # local labels (2.13.0+cpu) are builds, not releases
    return pins


def main(resolved: str, lock: str = "constraints.txt") -> int:
    new, old = _pins(resolved), _pins(lock)
    moved = [f"  {n} {v} (locked {old.get(n, 'not in the lock')})" for n, v in sorted(new.items()) if old.get(n) != v]
    print("\n".join(moved) if moved else "  none")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
