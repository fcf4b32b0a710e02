"""E1-E4 of cortexlab with their baselines, and a live tiny E1: `panel serve apps/inverse_scaling.py`."""
import panel as pn

from cortexlab.apps.inverse_scaling import InverseScalingApp

pn.extension("plotly")
InverseScalingApp().page().servable()
