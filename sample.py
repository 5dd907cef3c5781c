"""Sample from a trained model: python sample.py ckpt=<file|run dir|last> sampler=ddim steps=25 n=64 label=hero"""

import hydra
from omegaconf import DictConfig

from difflab.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from difflab.cli import run
    from difflab.sample import sample

    run(lambda: sample(cfg))


if __name__ == "__main__":
    main()
