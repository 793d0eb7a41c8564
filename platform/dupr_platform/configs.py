"""Hydra configs (configs/) composed into plain dicts, with one-line errors.

Hydra's compose API is used instead of `@hydra.main` so a pipeline can report a bad override as
one line before anything starts, and so no output folder or working-directory change happens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dupr.config import ConfigError


def compose(config_dir: str | Path, config_name: str, overrides: list[str]) -> dict[str, Any]:
    """The resolved config `config_name` with Hydra-syntax `overrides`, as plain containers."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config_dir = Path(config_dir).resolve()
    for override in overrides:
        group, sep, value = override.partition("=")
        if sep and group in ("preset", "method"):
            options = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
            if value not in options:
                raise ConfigError(f"{group}={value!r}: unknown (valid: {', '.join(options)})")
    try:
        with initialize_config_dir(str(config_dir), version_base="1.3", job_name=config_name):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
        values = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ConfigError(" ".join(lines[:2]) or type(exc).__name__) from None
    values.pop("preset", None)
    values.pop("method", None)
    return values
