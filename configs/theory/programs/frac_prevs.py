# The fraction of the tokens up to each position that are "x" (a numerical output: a mean
# computed by one attention head over the positions at or before it).
#   anyformer convert --from tracr configs/theory/programs/frac_prevs.py runs/frac_prevs
from tracr.rasp import rasp

vocab = {"x", "y", "z"}
max_seq_len = 8
is_x = rasp.numerical(rasp.Map(lambda t: 1 if t == "x" else 0, rasp.tokens)).named("is_x")
prevs = rasp.Select(rasp.indices, rasp.indices, rasp.Comparison.LEQ).named("prevs")
program = rasp.numerical(rasp.Aggregate(prevs, is_x, default=0)).named("frac_prevs")
