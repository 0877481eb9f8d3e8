"""Stage 1: translate Sentinel-1 SAR (VV, VH) into Sentinel-2 optical bands (B2, B3, B4, B8)."""
