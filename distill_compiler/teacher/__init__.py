"""The teacher: where training data comes from.

    client   litellm's async API behind a cache, a concurrency bound, retries and a budget
    labels   a teacher's answer read as a label, and label distributions from logprobs or votes
    cache    the per-request sqlite cache, so no request is paid for twice
    estimate what a stage's requests will cost, counted before any is sent (`distill plan`)
    logs     replay of recorded teacher traffic (`teacher.logs`)
    prompts  the Jinja2 prompt templates (templates/) rendered into chat messages
"""
