# How many times each position's token occurs in the input.
#   anyformer convert --from tracr configs/theory/programs/histogram.py runs/histogram
from tracr.rasp import rasp

vocab = {"a", "b", "c", "d"}
max_seq_len = 8
program = rasp.SelectorWidth(rasp.Select(rasp.tokens, rasp.tokens, rasp.Comparison.EQ)).named("histogram")
