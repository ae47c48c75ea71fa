"""Names of the evaluation metrics that the CLI needs before it imports the library (and torch):
its `--gate` choices, comparison order and directions."""

# The metrics of `evaluate_lm` that `toroidal eval --streaming` reports, as `streaming_<name>`.
STREAMING_METRICS = (
    "loss",
    "perplexity",
    "bits_per_token",
    "bits_per_byte",
    "passkey_accuracy",
    "seconds",
    "tokens_per_s",
)
