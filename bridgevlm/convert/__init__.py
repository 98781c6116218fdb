"""Conversion between bridgevlm and released model families, one file per family."""
