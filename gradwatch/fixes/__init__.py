"""Fixes for gradient-flow problems (filled in by the fixes issue)."""
