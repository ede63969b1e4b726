"""Tests for vlprompt.methods."""
