"""NeuroLlama: a Llama-3 backbone with seven toggleable neuroscience mechanisms (one module each)."""
