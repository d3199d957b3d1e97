"""Text generation: logit processors, greedy/sampled decoding, beam search, streaming, and a
rolling (sink + window) cache for generating past the context length. Models are driven
through the protocol of anyformer.protocol only.

    from anyformer.generation import GenerationConfig, generate, stream
    ids = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=20, stop_tokens=[eos])
    for tok in stream(model, [1, 2, 3], GenerationConfig(do_sample=True, top_p=0.9, seed=0)):
        ...
"""

from .beam import beam_search
from .config import GenerationConfig
from .decode import generate, stream, stream_text
from .logits import pick_tokens, process_logits
from .runner import Runner, as_batch

__all__ = [
    "GenerationConfig", "generate", "stream", "stream_text", "beam_search", "process_logits", "pick_tokens",
    "Runner", "as_batch",
]
