"""Served by `python -m cortexlab.apps` at `/memory_state` (see cortexlab.apps.memory_state)."""
import panel as pn

from cortexlab.apps.memory_state import MemoryStateApp

pn.extension("plotly")
MemoryStateApp().page().servable()
