"""Train the data set's classifier used by the metrics: python train_classifier.py [data=cifar10 trainer.max_epochs=30]"""

import hydra
from omegaconf import DictConfig

from difflab.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="classifier")
def main(cfg: DictConfig) -> float:
    from difflab.cli import run
    from difflab.train_classifier import train_classifier

    return run(lambda: train_classifier(cfg))["val_accuracy"]


if __name__ == "__main__":
    main()
