"""Model families (where blocks and Linears live) and model loaders."""
