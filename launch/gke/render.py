"""Fill a JobSet template under launch/gke/ with values: ``python launch/gke/render.py FILE KEY=VALUE ...``.

Each template lists its keys and defaults in its ``# defaults:`` header. ``${KEY}`` is replaced
(as ``envsubst`` would); an unknown key, a missing value or a non-positive count is an error (exit 2)
naming the key. ``HOSTS_PER_SLICE=auto`` is the slice's chip count (product of TPU_TOPOLOGY) divided
by CHIPS_PER_HOST. The rendered YAML goes to stdout, for ``| kubectl apply -f -``.
"""

from __future__ import annotations

import json
import math
import re
import string
import sys
from pathlib import Path

COUNTS = ("SLICES", "NODES", "GPUS_PER_NODE", "CHIPS_PER_HOST", "HOSTS_PER_SLICE", "MAX_RESTARTS", "GRACE_S", "PORT")


class RenderError(Exception):
    pass


def defaults(text: str) -> dict[str, str]:
    """The ``#   KEY=VALUE`` lines after ``# defaults:`` in the template's header."""
    out, inside = {}, False
    for line in text.splitlines():
        if line.startswith("# defaults:"):
            inside = True
        elif inside and (m := re.match(r"#\s+([A-Z_]+)=(.*)$", line)):
            out[m.group(1)] = m.group(2).strip()
        elif inside:
            break
    return out


def render(path: str | Path, values: dict[str, str]) -> str:
    """The template at ``path`` with ``values`` (over its defaults) substituted."""
    path = Path(path)
    if not path.is_file():
        raise RenderError(f"{path}: not found")
    text = path.read_text()
    known = defaults(text)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise RenderError(f"{path.name}: unknown key {unknown[0]}; keys: {', '.join(known)}")
    merged = {**known, **values}
    for key in COUNTS:
        if key in merged and merged[key] != "auto" and not re.fullmatch(r"[1-9][0-9]*", merged[key]):
            raise RenderError(f"{key}={merged[key]!r}: expected a positive integer")
    if merged.get("HOSTS_PER_SLICE") == "auto":
        topo = merged.get("TPU_TOPOLOGY", "")
        if not re.fullmatch(r"[1-9][0-9]*(x[1-9][0-9]*)+", topo):
            raise RenderError(f"TPU_TOPOLOGY={topo!r}: expected e.g. 2x4x4")
        chips = math.prod(int(x) for x in topo.split("x"))
        per_host = int(merged["CHIPS_PER_HOST"])
        if chips % per_host:
            raise RenderError(f"TPU_TOPOLOGY={topo} ({chips} chips) is not a whole number of "
                              f"CHIPS_PER_HOST={per_host} hosts")
        merged["HOSTS_PER_SLICE"] = str(max(1, chips // per_host))
    # The command sits inside a double-quoted YAML string: escape it as JSON (a subset of YAML).
    if "COMMAND" in merged:
        merged["COMMAND"] = json.dumps(merged["COMMAND"])[1:-1]
    return string.Template(text).substitute(merged)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        pairs = {}
        for item in argv[1:]:
            key, sep, value = item.partition("=")
            if not sep:
                raise RenderError(f"{item!r}: expected KEY=VALUE")
            pairs[key] = value
        sys.stdout.write(render(argv[0], pairs))
    except RenderError as e:
        print(f"render.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
