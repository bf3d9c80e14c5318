"""`distill serve`: a bundle behind an OpenAI-compatible HTTP API, its escalation and shadow
logs, telemetry, and `distill run --batch` offline scoring."""
