"""Edit existing sprites: python edit.py edit=inpaint|vary|interpolate image=<png|data:i> ... (conf/edit.yaml)"""

import hydra
from omegaconf import DictConfig

from difflab.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="edit")
def main(cfg: DictConfig) -> None:
    from difflab.cli import run
    from difflab.edit import edit

    run(lambda: edit(cfg))


if __name__ == "__main__":
    main()
