"""OneStep: distil multi-step diffusion teachers into one-step generators and serve them.

This top-level package stays light: importing it pulls neither torch nor onnxruntime, so
`serving/` can use the shared numpy pieces (seeded noise, provenance) without torch.
"""

__version__ = "0.1.0"
