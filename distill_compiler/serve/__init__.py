"""`distill serve`: a bundle behind an OpenAI-compatible HTTP API, and its escalation log."""
