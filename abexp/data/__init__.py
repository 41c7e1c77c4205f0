"""Datasets as abexp trains on them: in-memory images on the device with batched augmentation
(CIFAR-10, digits, synthetic, MNIST/Fashion-MNIST IDX files) and ImageNet's folder reader.
May import only the top-level modules (``config``, ``io``, ``tv_compat``); ``common`` is what
the readers share, ``load`` the one place that picks a reader for a run config."""
