"""Structural pruning: proposal groups found from the spec, channel surgery with weight transfer, variants."""
