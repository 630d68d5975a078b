"""Entry point: ``python -m recipe.ta_opd.main [hydra overrides]``.

Composes the config, chooses the backend (``ta_opd.backend``: auto = verl when CUDA GPUs are
visible, else the CPU backend), prints which and why, and hands the config to that backend's
front door: ``cpu/run.py`` (its knobs: ``cpu/plan.py``) or ``verl_backend/entry.py`` (its checks:
``verl_backend/validate.py``). With no model paths the CPU backend uses the toy pair.
"""

from __future__ import annotations

import os
import sys
from dataclasses import fields

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from ta_opd.config import TAConfig
from ta_opd.errors import TAConfigError, TAInputError

from recipe.ta_opd.messages import composition_error, where_stopped
from recipe.ta_opd.naming import run_name

# ta_opd.* keys that belong to the recipe rather than to TAConfig
RECIPE_KEYS = {"backend", "teacher_model_path", "toy", "cpu", "teacher", "wandb_histogram", "vocab_mismatch_ok_ids", "dry_run",
               "token_export", "wandb_group"}
BACKENDS = ("auto", "cpu", "verl")


def ta_config(node) -> TAConfig:
    values = OmegaConf.to_container(node, resolve=True)
    known = {f.name for f in fields(TAConfig)} | RECIPE_KEYS
    unknown = sorted(set(values) - known)
    if unknown:
        raise TAConfigError(f"unknown key(s) ta_opd.{unknown[0]}{' ...' if len(unknown) > 1 else ''}; "
                            f"valid keys: {', '.join(sorted(known))}")
    return TAConfig.from_mapping({k: v for k, v in values.items() if k not in RECIPE_KEYS})


def choose_backend(requested: str) -> tuple[str, str]:
    if requested not in BACKENDS:
        raise TAConfigError(f"ta_opd.backend={requested!r} is not allowed; choose one of: {', '.join(BACKENDS)}")
    import torch

    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "auto":
        if n_gpu > 0:
            return "verl", f"auto: {n_gpu} CUDA GPU(s) visible"
        return "cpu", "auto: no CUDA GPU visible"
    return requested, "requested with ta_opd.backend"


def run(cfg: DictConfig) -> dict:
    ta = ta_config(cfg.ta_opd)
    if cfg.trainer.get("experiment_name") is None:
        with open_dict(cfg):
            cfg.trainer.experiment_name = run_name(cfg, ta)
    backend, why = choose_backend(str(cfg.ta_opd.backend))
    print(f"[ta-opd] backend: {backend} ({why})")
    if backend == "verl":
        from recipe.ta_opd.verl_backend.entry import run as run_backend
    else:
        from recipe.ta_opd.cpu.run import run as run_backend
    return run_backend(cfg, ta)


def guarded(cfg: DictConfig) -> int:
    """Run; a user mistake (bad value, missing or broken file, busy folder, full disk) prints
    ``[ta-opd] error: ...`` and returns 2; Ctrl-C prints where the run stopped and returns 130.
    Anything else propagates: a traceback is a bug."""
    from omegaconf.errors import OmegaConfBaseException

    from recipe.ta_opd.cpu.checkpoint import CheckpointError
    from recipe.ta_opd.runlock import release_all

    try:
        run(cfg)
        return 0
    except (TAConfigError, TAInputError, FileNotFoundError, CheckpointError) as e:
        print(f"[ta-opd] error: {e}", file=sys.stderr)
        return 2
    except OmegaConfBaseException as e:  # e.g. an interpolation to a missing key
        print(f"[ta-opd] error: configuration: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a checkpoint save in flight is discarded, the last one is intact
        print(f"[ta-opd] interrupted: {where_stopped(cfg)}", file=sys.stderr)
        return 130
    finally:
        release_all()


_composed: list[bool] = []  # main() appends once Hydra has composed the config


@hydra.main(config_path="config", config_name="ta_opd_trainer", version_base=None)
def main(cfg: DictConfig) -> None:
    _composed.append(True)
    status = guarded(cfg)
    if status:
        sys.exit(status)


def cli() -> None:
    """Hydra's CLI (--help, --cfg job ... work as usual), with a composition mistake (unknown
    experiment, misspelt key, unparsable override) as one ``[ta-opd] error:`` line and exit 2
    instead of Hydra's message and exit 1."""
    from hydra.errors import CompactHydraException

    if "HYDRA_FULL_ERROR" in os.environ:  # the user asked for Hydra's own full report
        return main()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises instead of printing and exiting 1
    try:
        main()
    except CompactHydraException as e:
        if _composed:  # raised inside main(): a bug, not a composition mistake
            raise
        print(f"[ta-opd] error: {composition_error(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
