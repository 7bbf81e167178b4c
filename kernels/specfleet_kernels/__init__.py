"""Tree-attention masks, KV-cache compaction and acceptance kernels: a torch reference and a GPU (Triton) path."""
