"""The one entry point: `python run.py [task=train|prepare|evaluate|report] [group=option ...] [key=value ...]`."""
import functools
import sys

import hydra
from omegaconf import DictConfig

import marco_lightning.config  # noqa: F401  (registers the ${marco_root:} resolver)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    result = hydra.utils.get_method(cfg.task._target_)(cfg)
    # Hydra's Optuna sweeper optimises the float a job returns: hparams_search=optuna names it (after/ndcg@10).
    if cfg.get("optimized_metric"):
        return functools.reduce(lambda d, k: d[k], cfg.optimized_metric.split("/"), result)
    return result


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # lines reach SLURM logs and pipes at once, also from DDP ranks
    main()
