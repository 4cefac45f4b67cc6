"""training: offline contrastive (re)training of AFLoc models on image-report archives.

>>> from training.config import load_config            # doctest: +SKIP
>>> from training.trainer import Trainer                # doctest: +SKIP
>>> Trainer(load_config("configs/train/tiny-cpu.yaml"), "runs/tiny").fit()  # doctest: +SKIP

See ``training/README.md`` for the command line (``afloc train``), the config and the run folder.
"""

__all__: list[str] = []
