# The input reversed: position i reads position length - 1 - i.
#   anyformer convert --from tracr configs/theory/programs/reverse.py runs/reverse
from tracr.rasp import rasp

vocab = {"a", "b", "c", "d"}
max_seq_len = 8
length = rasp.SelectorWidth(rasp.Select(rasp.tokens, rasp.tokens, rasp.Comparison.TRUE)).named("length")
opposite = rasp.SequenceMap(lambda n, i: n - i - 1, length, rasp.indices).named("opposite")
flip = rasp.Select(rasp.indices, opposite, rasp.Comparison.EQ).named("flip")
program = rasp.Aggregate(flip, rasp.tokens).named("reverse")
