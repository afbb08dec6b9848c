"""The recording pipeline behind `ckpt_tools.Recorder`.

- `budget`: the host-memory budget and the block layout it allows;
- `select`: which tensors (include/exclude patterns);
- `gather`: the training thread's copies into shared memory (CPU and CUDA);
- `pipeline`: shared-memory blocks, writer processes, commits.

The writer processes themselves run `ckpt_tools.store.row_writer`.
"""
