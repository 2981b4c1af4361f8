"""The one place that states the gate layout and the constants shared by every backend and kernel
(a leaf module: it imports nothing of lstmkit).

Gate order is torch's: input, forget, cell (g), output. A (4H,) or (.., 4H) gate
vector holds the four gates as consecutive blocks of H.
"""

GATE_ORDER = ("i", "f", "g", "o")
NUM_GATES = len(GATE_ORDER)
# epsilon of every layer norm of the layer_norm variant (haste's LayerNormLSTM)
LN_EPS = 1e-5
