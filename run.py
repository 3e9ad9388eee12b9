"""The one entry point: `python run.py [task=train|prepare|evaluate|report] [group=option ...] [key=value ...]`."""
import hydra
from omegaconf import DictConfig

import marco_lightning.config  # noqa: F401  (registers the ${marco_root:} resolver)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    return hydra.utils.get_method(cfg.task._target_)(cfg)


if __name__ == "__main__":
    main()
