"""osdg."""
