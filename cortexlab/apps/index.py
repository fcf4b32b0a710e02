"""The index page: one card per dashboard, with what it shows and a link."""
from __future__ import annotations

import panel as pn

from . import APPS, common

__all__ = ["index_page"]

INTRO = ("Interactive views of **cortexlab**: a Gated DeltaNet memory sidecar on a frozen SmolLM2, and the "
         "neuroscience mechanisms of NeuroLlama. Every view runs the bundled model and the checkpoints committed in "
         "`results/`; nothing needs training. The notebooks in `notebooks/` explain each mechanism step by step.")


def index_page():
    """The served index: links to every app in `APPS`."""
    cards = [pn.Card(pn.pane.Markdown(f"{text}\n\n[Open {title} →](./{name})"), title=title, collapsible=False,
                     width=420, margin=10)
             for name, (title, text) in APPS.items()]
    return common.page("dashboards", INTRO, pn.FlexBox(*cards))
