"""Repetition in generated text, shared by the samples report and the instruction evaluation."""

from __future__ import annotations


def repeated_ngram_rate(tokens: list[int], n: int = 4) -> tuple[int, int]:
    """(repeats, total): n-grams that already occurred earlier in the same sample, out of all n-grams."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)
