"""DiffEIC runtime: runs encode/decode from exported artifacts; imports no torch."""
