"""Outputs for people and scripts: pandas frames and CSV, comparisons of variants, plots of runs."""
