"""craft-adapter: CraFT fine-tuning of black-box vision-language models."""

import os

# Idle OpenMP workers otherwise spin between torch calls; on a container's CPU quota that spinning steals
# the time of the thread doing the work (measured here: the reference fit ran 2.5x slower). Only takes
# effect when craft_adapter is imported before torch; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
