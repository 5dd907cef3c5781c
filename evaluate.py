"""Score samples of a checkpoint: python evaluate.py ckpt=<file|run dir|last> sampler=ddim steps=25 n=5000 [guidance=2]
Sweep: python evaluate.py -m ckpt=... sampler=ddpm,ddim,dpmpp steps=10,25,50,100"""

import hydra
from omegaconf import DictConfig

from difflab.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from difflab.cli import run
    from difflab.evaluate import evaluate

    return run(lambda: evaluate(cfg)).get("fd")


if __name__ == "__main__":
    main()
