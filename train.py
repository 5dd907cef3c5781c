"""Train a diffusion model: python train.py [schedule=cosine timesteps=512 data=cifar10 ...]"""

import hydra
from omegaconf import DictConfig

from difflab.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from difflab.cli import run
    from difflab.train import train

    metrics = run(lambda: train(cfg))
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
