"""Pure compilers from the model to kernel rule text, one module per backend."""
