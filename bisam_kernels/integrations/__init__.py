"""BiSAM/SAM inside training frameworks; each module imports its framework, the package imports none.

- :mod:`bisam_kernels.integrations.lightning`: ``BiSAMModule``, a ``LightningModule`` base class
  (``pip install bisam_kernels[lightning]``).
- :mod:`bisam_kernels.integrations.huggingface`: ``BiSAMTrainer``, a ``transformers.Trainer``
  (``pip install bisam_kernels[huggingface]``).
"""
