"""GPU kernels (Triton) for lrtool's hot paths, each beside the plain torch reference that is the CPU path.

    dispatch.py      kernel or reference: CUDA tensors, Triton importable and LRTOOL_KERNELS not "off" pick
                     the kernel; a kernel that fails falls back to its reference with one warning
    lora_apply.py    multi-adapter LoRA apply (eval, route): y += sum_k w_k B_k (A_k x), tokens sorted by
                     adapter, a shrink and an expand launch per layer
    dense_merge.py   fused dense merge (merge): linear, magnitude-prune, ties, dare-linear, dare-ties and the
                     --into-base add in one pass over a module's stacked updates
    lora_linear.py   fused LoRA linear for training (train): x W^T + scale (dropout(x) A^T) B^T and its
                     backward as an autograd Function, the dropout mask drawn in the kernels, never stored
    counter_rng.py   counter-based random bits (torch): the one definition DARE's drops and the fused
                     dropout use, identical on every device; _rng_triton.py is its Triton twin

Importing this package or counter_rng.py imports no Triton: the kernel modules import it (when installed)
and are imported only where a kernel may run. Triton is the optional `gpu` extra.
"""
