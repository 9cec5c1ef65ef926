"""reStructuredText directive for the Snakemake report's front page (report/workflow.rst).

``.. modaltune-image:: path`` embeds the PNG as a base64 data URI, so the front page's Kaplan-Meier plot
and heatmap travel inside the self-contained report HTML. (Snakemake's own ``embeddedimage`` directive
replaces the URI only after docutils has built the image node, so its images stay links to files next
to the report; checked with snakemake 9.27.)
"""

from __future__ import annotations

import base64
import mimetypes
from pathlib import Path

DIRECTIVE = "modaltune-image"


def data_uri(path) -> str:
    mime = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def register_directives() -> None:
    """Register ``modaltune-image`` with docutils (idempotent); called when the workflow is parsed."""
    from docutils.parsers.rst import directives
    from docutils.parsers.rst.directives.images import Image

    class EmbeddedImage(Image):
        def run(self):
            self.arguments[0] = data_uri(self.arguments[0].strip())
            return super().run()

    directives.register_directive(DIRECTIVE, EmbeddedImage)


__all__ = ["DIRECTIVE", "data_uri", "register_directives"]
