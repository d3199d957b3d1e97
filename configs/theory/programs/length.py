# The length of the input at every position: how many positions a select-all selector keeps.
#   anyformer convert --from tracr configs/theory/programs/length.py runs/length
from tracr.rasp import rasp

vocab = {"a", "b", "c"}
max_seq_len = 8
program = rasp.SelectorWidth(rasp.Select(rasp.tokens, rasp.tokens, rasp.Comparison.TRUE)).named("length")
