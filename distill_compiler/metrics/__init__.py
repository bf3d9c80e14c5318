"""Figures of a student against its teacher (numpy and the standard library only).

    classify     agreement, accuracy, per-label F1, per cohort
    structured   tool calls and JSON extractions: exact match, argument/field F1, validity
    calibration  temperature scaling, ECE, reliability bins
    cascade      the confidence threshold, what it buys on test, and the teacher's cost
"""
