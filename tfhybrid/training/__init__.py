"""Training under compression: the compression model, its set-up and its callbacks."""
