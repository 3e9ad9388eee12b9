"""The one entry point: `python run.py [task=train|prepare|evaluate|report] [group=option ...] [key=value ...]`.

A refusal (a `marco_lightning.errors.UserError`: a setting or a file that cannot work, also one raised while a
config value resolves, e.g. data=beir's data.root) prints its one sentence and exits with status 2;
HYDRA_FULL_ERROR=1 shows its stack instead. Any other exception is a bug and keeps Hydra's
traceback (status 1). In a multirun a refused job fails like any other (the sweep goes on and Hydra ends it with the
first failure), and the sweep ends with the sentence alone and status 2.
"""
import functools
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

import marco_lightning.config  # noqa: F401  (registers the ${marco_root:} resolver)
from marco_lightning.errors import UserError

REFUSED = 2  # the exit status of a refusal


class Refused(CompactHydraException):
    """A multirun job's refusal: an Exception, so Hydra (and submitit) record the job as failed and run the others,
    and a CompactHydraException, so Hydra prints it without a stack."""


def refusal(error: BaseException) -> UserError | None:
    """The UserError an exception is: itself, or the one it wraps: a constructor's inside Hydra's instantiate (an
    InstantiationException raised from it, nested once per node), a config resolver's inside OmegaConf's errors
    (marco_lightning.config.beir_root); None for a bug."""
    while isinstance(error, (InstantiationException, OmegaConfBaseException)):
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    return error if isinstance(error, UserError) else None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    try:
        result = hydra.utils.get_method(cfg.task._target_)(cfg)
    except Exception as caught:
        error = refusal(caught)
        if error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":  # a bug; or the stack, as Hydra reads it
            raise
        print(f"Error: {error}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # each refused job says why; the sweep goes on
            raise Refused(f"Error: {error}") from None
        sys.exit(REFUSED)
    # Hydra's Optuna sweeper optimises the float a job returns: hparams_search=optuna names it (after/ndcg@10).
    if cfg.get("optimized_metric"):
        return functools.reduce(lambda d, k: d[k], cfg.optimized_metric.split("/"), result)
    return result


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # lines reach SLURM logs and pipes at once, also from DDP ranks
    try:
        main()
    except SystemExit as stop:  # Hydra ends a sweep whose first failed job was refused with status 1, in its handler
        if stop.code == 1 and isinstance(stop.__context__, Refused):
            sys.exit(REFUSED)
        raise
