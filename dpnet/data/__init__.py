"""CIFAR-10 for dpnet, one job per module; the public API is ``dpnet.data_utils``, which re-exports it.

- ``layout``: the official folder layout (file names, image shape, classes), the environment variables, the cache root
- ``locate``: where the data is looked for, and ``locate_CIFAR10``, which has it downloaded when missing
- ``unpickle``: the restricted unpickler, and the loading and checking of batch files
- ``lock``: an inter-process lock on a folder (the image cache, the download's destination)
- ``cache``: the per-user cache of the uint8 images, memory-mapped
- ``images``: ``ImageArray``, uint8 images converted to floating point as rows are taken
- ``cifar10``: ``load_CIFAR10_raw``, ``load_CIFAR10`` and ``get_CIFAR10_data``, the assignment's splits
- ``download``: fetch the archive, check its MD5, extract it safely; imported only when a download happens

Nothing is imported here: ``download`` (and the HTTP, URL and tar modules it needs) comes in only when used.
"""
