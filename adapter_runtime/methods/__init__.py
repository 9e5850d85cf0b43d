"""Pure adapter math, one file per method family. No state, no I/O: tensors in, tensors out."""
