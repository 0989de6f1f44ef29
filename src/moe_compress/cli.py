"""The `moe-compress` command: `moe-compress <stage> [hydra overrides]`. It parses, loads a config, calls the
library; all logic lives in the library."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moe_compress.checkpoint import check_output_dir, load_model, save_compressed
from moe_compress.compress import CompressionConfig, compress


def _schema(dataclass_type: type) -> DictConfig:
    """A typed Hydra node from a frozen config dataclass, writable so that defaults and overrides can merge."""
    node = OmegaConf.structured(dataclass_type)
    OmegaConf.set_readonly(node, False)
    return node


ConfigStore.instance().store(group="compression", name="schema", node=_schema(CompressionConfig))


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input ends the command with one line that names the cause and the fix, not a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as error:
        sys.exit(f"moe-compress: error: {error}")


def compression_config(cfg: DictConfig) -> CompressionConfig:
    return CompressionConfig(**OmegaConf.to_container(cfg.compression, resolve=True))


def run_compress(cfg: DictConfig) -> None:
    with user_errors():
        config = compression_config(cfg)
        model = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        check_output_dir(cfg.output_dir, model.config, config.to_dict(), cfg.overwrite)
        report = compress(model, config)
        print(report)
        folder = save_compressed(model, cfg.output_dir, overwrite=cfg.overwrite, report=report)
        print(f"compressed model written to {folder}")


STAGES: dict[str, tuple[Callable[[DictConfig], None], str]] = {
    "compress": (run_compress, "fit shared cores and wrappers to a model's experts; save the compressed model"),
}


def usage() -> str:
    lines = ["usage: moe-compress <stage> [key=value ...] [hydra options: --cfg job, -m, --help]", "", "stages:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in STAGES.items()]
    lines += ["", "example: moe-compress compress model=Qwen/Qwen3-30B-A3B compression.rank=64 output_dir=out/sc64"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    stage, overrides = argv[0], argv[1:]
    if stage not in STAGES:
        sys.exit(f"moe-compress: error: unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    sys.argv = [f"moe-compress {stage}", *overrides]
    run = hydra.main(config_path=str(Path(__file__).parent / "conf"), config_name=stage, version_base=None)
    run(STAGES[stage][0])()
