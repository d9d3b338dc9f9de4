"""Small trained experts: LoRA adapters of the loaded model, trained on one side of the steering pairs.

`settings` (what to train, light enough for the CLI's parser), `training` (one adapter, with its
loss curve and held-out loss), `adapters` (where adapters live, saved and loaded with their
metadata, and the plain Hugging Face copy of the model that carries them), `command` (the
`destein-lens experts train` command). The decoding-time methods that use them (DExperts, DAPT,
GeDi) are `baselines/`.
"""
