"""What a sequence's tokens become: text (detokenizer, stop strings), log-probabilities, grammar constraints,
tool calls and grounding boxes."""
