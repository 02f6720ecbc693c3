"""Stage 3, measuring: whole-split loss, the samples report, instruction following, the LLM judge, the results page."""
