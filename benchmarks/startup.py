"""Question 7: what the start-up hook (moe_compress.pth, see moe_compress/autoload.py) adds to every Python start.

Two site folders that differ only by the hook: each holds a link to every entry of this environment's site-packages,
one without moe_compress.pth and moe_compress.start. A fresh `python -S` adds one of them with `site.addsitedir`
(which processes its .pth files, as a normal start does) and runs the statement; the two are timed in turns, so that a
noisy machine slows both alike. `import transformers` is what the issue asks about; loading a model also imports
transformers' AutoConfig and quantizers, which is when the hook registers our two modules.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from benchmarks.common import table

HOOK = ("moe_compress.pth", "moe_compress.start")
STATEMENTS = {
    "python -c pass": "pass",
    "import transformers": "import transformers",
    "from transformers import AutoConfig; import transformers.quantizers":
        "from transformers import AutoConfig; import transformers.quantizers",
}


def site_folder(root: Path, with_hook: bool) -> Path:
    folder = root / ("with" if with_hook else "without")
    folder.mkdir()
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if with_hook or entry.name not in HOOK:
            (folder / entry.name).symlink_to(entry)
    return folder


def timed_start(site: Path, statement: str) -> float:
    code = f"import site; site.addsitedir({str(site)!r}); {statement}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-S", "-c", code], check=True)
    return time.perf_counter() - start


def run(quick: bool = False) -> dict:
    repeats = 1 if quick else 21
    statements = dict(list(STATEMENTS.items())[:2]) if quick else STATEMENTS  # quick: no transformers model code
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        sites = {hook: site_folder(Path(scratch), hook) for hook in (False, True)}
        for name, statement in statements.items():
            times: dict[bool, list[float]] = {False: [], True: []}
            timed_start(sites[True], statement)  # warm the file cache
            for _ in range(repeats):
                for hook, site in sites.items():
                    times[hook].append(timed_start(site, statement))
            without, with_hook = (statistics.median(times[h]) for h in (False, True))
            rows[name] = {"without_s": without, "with_s": with_hook, "added_ms": 1000 * (with_hook - without)}
    return {"repeats": repeats, "rows": rows}


def markdown(result: dict) -> str:
    rows = [[f"`{name}`", f"{r['without_s'] * 1000:.0f}", f"{r['with_s'] * 1000:.0f}", f"{r['added_ms']:+.0f}"]
            for name, r in result["rows"].items()]
    added = result["rows"]["import transformers"]["added_ms"]
    return (
        "Wall time of a fresh Python process, without and with the start-up hook, median of "
        f"{result['repeats']} interleaved runs each (module docstring of `benchmarks/startup.py` says how the two "
        "environments are made):\n\n"
        + table(["statement", "without hook, ms", "with hook, ms", "added, ms"], rows)
        + f"\n\nThe hook adds **{added:+.0f} ms** to `python -c \"import transformers\"` (goal: under 50 ms). It "
        "imports neither torch nor transformers at start-up; the registration itself runs only once a process "
        "imports transformers' AutoConfig or quantizers (last row), which every model load does anyway."
    )


if __name__ == "__main__":
    print(markdown(run()))
