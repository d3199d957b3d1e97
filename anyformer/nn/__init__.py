"""Building blocks: attention, positional encodings, norms, feed-forwards, blocks, caches."""
