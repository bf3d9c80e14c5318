"""The example record and what is done to examples before training.

    records  the record generate and curate pass on, and its JSONL files
    pii      PII scrubbing with checksummed matches
    augment  deterministic typing noise for extra training copies
    embeddings  the data stages' sentence encoder (data.embedder)
    confusable  which intent pairs are close, for hard negatives nobody named
"""
