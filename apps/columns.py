import panel as pn

from cortexlab.apps.columns import ColumnsApp

pn.extension("plotly")
ColumnsApp().page().servable()
