"""Tests for vlprompt.prompts."""
