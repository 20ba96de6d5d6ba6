//! Blockwise 4-bit quantization (NF4, FP4) and double quantization, bit-exact with bitsandbytes.
