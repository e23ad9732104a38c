"""Side-by-side benchmarks: mmllm vs transformers' Llava and stock diffusers (see benchmarks/README.md)."""
