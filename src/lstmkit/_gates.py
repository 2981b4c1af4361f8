"""The one place that states the gate layout shared by every backend.

Gate order is torch's: input, forget, cell (g), output. A (4H,) or (.., 4H) gate
vector holds the four gates as consecutive blocks of H.
"""

GATE_ORDER = ("i", "f", "g", "o")
NUM_GATES = len(GATE_ORDER)
