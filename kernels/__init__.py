"""Triton kernels of onlinemix, each beside a plain-torch reference (import name: onlinemix_kernels).

Empty for now: batch augmentation and NT-Xent run through torchvision and plain torch.
"""
