import panel as pn

from cortexlab.apps.habituation import HabituationApp

pn.extension("plotly")
HabituationApp().page().servable()
