"""Models the platform serves or trains, and the code that turns pretrained weights into servable files.

Submodules import their heavy dependencies (torch, onnx) inside functions, so importing this package
is cheap and safe in serving images that have no torch.
"""
