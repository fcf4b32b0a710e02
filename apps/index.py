"""Served by `python -m cortexlab.apps` at `/`: links to every dashboard."""
import panel as pn

from cortexlab.apps.index import index_page

pn.extension()
index_page().servable()
