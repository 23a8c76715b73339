"""Example models for ``--model``: small, written here, no downloads.

- ``bpmem.models.gpt:make_gpt`` with ``bpmem.models.gpt:make_batch``: a GPT-style decoder
  (tied token embedding, causal self-attention, MLP, LayerNorm); blocks at ``blocks``.
- ``bpmem.models.resnet:make_resnet`` with ``bpmem.models.resnet:make_batch``: a small ResNet
  (Conv, BatchNorm, residual adds); an ``nn.Sequential``, so its children are its blocks.
"""
