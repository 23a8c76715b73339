"""Models: the seam every model passes through, the MLP, the user's own models, and the zoo.

- ``workload``: what a strategy and a probe need from a model, whoever wrote it;
- ``mlp``: the textbook MLP that ``--depth`` and ``--width`` describe;
- ``user_model``: ``--model module:factory`` loaded and given data; ``user_code``: whose code
  raised, the user's or bpmem's;
- ``backprop``: the seed's forward and backward pass written out by hand, as a check;
- the zoo below: example models for ``--model``, small, written here, no downloads.

- ``bpmem.models.gpt:make_gpt`` with ``bpmem.models.gpt:make_batch``: a GPT-style decoder
  (tied token embedding, causal self-attention, MLP, LayerNorm); blocks at ``blocks``.
- ``bpmem.models.resnet:make_resnet`` with ``bpmem.models.resnet:make_batch``: a small ResNet
  (Conv, BatchNorm, residual adds); an ``nn.Sequential``, so its children are its blocks.
- ``bpmem.models.llama:make_llama`` with ``bpmem.models.llama:make_batch``: a Llama-style
  decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU); blocks at ``layers``.
  ``make_llama_1b`` is Llama 3.2 1B's shape.
"""

# the zoo's modules: an exception raised in them is reported as a user model's would be
ZOO_MODULES: tuple[str, ...] = ("gpt", "llama", "resnet")
