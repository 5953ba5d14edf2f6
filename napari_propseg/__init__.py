"""napari-propseg: reference-slice segmentation and STCN propagation for CT volumes.

The core (I/O, preprocessing, networks, propagation, training, metrics) imports only
numpy/torch/SimpleITK/scipy/skimage; the napari widget and the CLI are thin layers.
"""
__version__ = "0.1.0"
