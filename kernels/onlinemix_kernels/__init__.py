"""Triton kernels of onlinemix, each beside a plain-torch reference (import name: onlinemix_kernels).

`augment`: fused batched view augmentation (crop + resize, flip, colour jitter, grayscale, blur,
solarisation, normalisation); reference `onlinemix.views.torch_backend.augment_views`. NT-Xent still runs in
plain torch.
"""
