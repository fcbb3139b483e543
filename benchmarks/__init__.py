"""Hand-run benchmarks of the training and generation code against TRL and plain transformers.

One entry point per figure (see benchmarks/README.md):

    python -m benchmarks.train_throughput        # tokens/s, step time, peak memory: ours vs TRL DPOTrainer
    python -m benchmarks.loss_parity             # our dpo / rpo_mean losses == TRL sigmoid / [sigmoid, sft]
    python -m benchmarks.reference_reuse         # a sweep of 4 methods: reference forwards and wall time
    python -m benchmarks.generation_throughput   # batched HF sampler vs one-prompt-at-a-time generate

Each prints a small table and writes JSON (default under benchmarks/results/). `--smoke` runs any of
them in seconds on a tiny random model (the tests do that); the default pytest run never runs them.
"""
