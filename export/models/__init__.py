"""PyTorch definitions of the DiffEIC networks, with the official state-dict key names."""
