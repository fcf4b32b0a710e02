"""Plotly figure builders shared by notebooks and apps."""
