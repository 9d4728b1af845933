"""The Triton scan core: first-order, selective (Mamba-1) and chunked SSD scans, each with a PyTorch reference."""
