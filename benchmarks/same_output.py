"""Same seed, same output: checksums of compressed folders of both bundled testbeds, in memory and streamed,
data-free and calibrated, so that a change that should not alter results can be shown not to.

    python -m benchmarks.same_output --write   # record benchmarks/results/same_output.json
    python -m benchmarks.same_output           # recompute and compare, one line per case

What is compared: the sha256 of every safetensors file, and of config.json with the report's wall-clock seconds
left out (they differ between any two runs) and the settings' record left out (its layout may change while the
result does not): the modules' specs and the stats that describe the result stay in. Results depend on the CPU's kernels, so the file records the CPU
capability they were made on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "same_output.json"
RESULT_STATS = ("params_before", "params_after", "kept_fraction", "rel_error", "coverage")
CALIBRATION = dict(source="testbed", num_sequences=16, seq_len=128)
# (name, CompressionConfig kwargs, calibrated): every form, both allocations, one and several cores
CASES = [
    ("delta-global-0.3", dict(target_ratio=0.3), False),
    ("mixed-global-0.3-calibrated", dict(target_ratio=0.3), True),
    ("basis-global-0.5-calibrated", dict(target_ratio=0.5), True),
    ("wrapped-uniform-rank4-2cores", dict(rank=4, method="als", num_cores=2), False),
]


def folder_digest(folder: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(folder.glob("*.safetensors")):
        digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    config = json.loads((folder / "config.json").read_text())
    quantization = config["quantization_config"]
    quantization.pop("compression")
    quantization["stats"] = {key: quantization["stats"][key] for key in RESULT_STATS}
    digests["config.json (no seconds)"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return digests


def run_case(testbed: str, kwargs: dict, calibrated: bool, streamed: bool, out: Path) -> dict[str, str]:
    import moe_compress as mc
    from moe_compress.data import DataConfig, calibration_sequences
    from moe_compress.testbed import TESTBEDS, load_testbed

    if streamed:
        calibration = {"calibration": CALIBRATION} if calibrated else {}
        mc.compress_checkpoint(TESTBEDS[testbed], out, mc.CompressionConfig(**kwargs, **calibration), progress=False)
    else:
        model, tokenizer = load_testbed(path=TESTBEDS[testbed])
        ids = None
        if calibrated:
            data = DataConfig(source="testbed", seq_len=CALIBRATION["seq_len"])
            ids = calibration_sequences(data, tokenizer, CALIBRATION["num_sequences"])
        report = mc.compress(model, mc.CompressionConfig(**kwargs), calibration=ids, progress=False)
        mc.save_compressed(model, out, tokenizer=tokenizer, report=report)
    return folder_digest(out)


def all_digests() -> dict[str, dict[str, str]]:
    torch.set_num_threads(1)
    found = {}
    with tempfile.TemporaryDirectory() as scratch:
        for testbed in ("testbed", "testbed_fine"):
            for name, kwargs, calibrated in CASES:
                for streamed in (False, True):
                    key = f"{testbed}/{name}/{'streamed' if streamed else 'in-memory'}"
                    found[key] = run_case(testbed, kwargs, calibrated, streamed, Path(scratch) / key)
                    print(key, flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="record the checksums instead of comparing")
    args = parser.parse_args()
    found = all_digests()
    capability = torch.backends.cpu.get_cpu_capability()
    if args.write:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps({"cpu_capability": capability, "torch": torch.__version__, "cases": found},
                                      indent=1) + "\n")
        return
    recorded = json.loads(RESULTS.read_text())
    if recorded["cpu_capability"] != capability:
        print(f"note: recorded on {recorded['cpu_capability']}, this CPU is {capability}")
    differ = [key for key in recorded["cases"] if recorded["cases"][key] != found.get(key)]
    for key in recorded["cases"]:
        print(f"{'DIFFERS' if key in differ else 'same   '} {key}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
