"""Recovery after compression: block-wise (BEAM) or end-to-end (finetune) training that keeps
sparsity masks and quantization grids."""
