"""Baseline models of the paper's tables; importing this package registers all of them.

Registered names: abmil, transmil, mlp, snn, gene_mixer, mcat, survpath, late_fusion,
slide_encoder_lp, slide_encoder_tuned (see docs/BASELINES.md).
"""

from modaltune.models.baselines import abmil, coattn, fusion, genomic, slide_encoder, transmil

BASELINE_NAMES = (
    "abmil", "transmil", "mlp", "snn", "gene_mixer", "mcat", "survpath", "late_fusion",
    "slide_encoder_lp", "slide_encoder_tuned",
)

__all__ = ["BASELINE_NAMES", "abmil", "coattn", "fusion", "genomic", "slide_encoder", "transmil"]
