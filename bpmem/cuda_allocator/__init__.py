"""A model of PyTorch's CUDA caching allocator, in pure Python (no torch, no GPU).

``config``: the allocator's constants and ``PYTORCH_CUDA_ALLOC_CONF``; ``model``: the
allocator itself (pools, best fit, splitting and merging, segments, the retry on a failed
``cudaMalloc``, expandable segments); ``replay``: a recorded snapshot's events replayed
through it. The rules follow ``c10/cuda/CUDACachingAllocator.cpp`` as read from PyTorch's main
branch in 2026, and reproduce a torch 2.11 (CUDA 13) snapshot; other versions are unchecked.
"""
