"""Clipping methods: one strategy object per method, one interface (see :mod:`.base`)."""
