"""modlabel: label the modality of medical images and explain each label with a CRM.

The runtime package (this one) never imports TensorFlow; only ``train`` and
``export`` do.
"""

__version__ = "0.1.0"
