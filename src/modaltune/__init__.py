"""ModalTune workflow: whole-slide images + RNA-seq + clinical data through a slide foundation model.

Importing the package must stay cheap (no torch): CPU-only workflow rules import it too.
"""

__version__ = "0.1.0"
