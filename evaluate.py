"""Score samples of a checkpoint: python evaluate.py ckpt=<file|run dir|last> sampler=ddim steps=25 n=5000 [guidance=2]
Sweep: python evaluate.py -m ckpt=... sampler=ddpm,ddim,dpmpp steps=10,25,50,100"""

import sys

import hydra
from omegaconf import DictConfig

from difflab.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from difflab.checkpoint import CheckpointError
    from difflab.metrics.classifier import ClassifierError
    from difflab.metrics.evaluate import evaluate
    from difflab.metrics.features import InceptionUnavailable

    try:
        row = evaluate(cfg)
    except (CheckpointError, ClassifierError, InceptionUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return row.get("fd")


if __name__ == "__main__":
    main()
