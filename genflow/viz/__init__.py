"""Plots for genflow's methods (matplotlib, Agg backend; nothing here is imported by training)."""
