# The input sorted ascending (ties kept in input order): each value's target position is the
# number of smaller keys, the key made unique by adding a fraction of its position.
#   anyformer convert --from tracr configs/theory/programs/sort.py runs/sort
from tracr.rasp import rasp

vocab = {1, 2, 3, 4, 5}
max_seq_len = 6
key = rasp.categorical(rasp.SequenceMap(lambda x, i: x + i / max_seq_len, rasp.tokens, rasp.indices)).named("key")
smaller = rasp.Select(key, key, rasp.Comparison.LT).named("smaller")
target = rasp.SelectorWidth(smaller).named("target")
program = rasp.Aggregate(rasp.Select(target, rasp.indices, rasp.Comparison.EQ), rasp.tokens).named("sort")
