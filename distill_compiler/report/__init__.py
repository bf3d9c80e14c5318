"""What a build reports: the model card, report.html, `distill diff`, and their number formats."""
