"""Stage 1, `tinygemma prepare`: stories (or instruct records) into token files; numpy + tiktoken, no torch."""
