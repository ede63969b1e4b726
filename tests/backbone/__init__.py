"""Tests for vlprompt.backbone."""
