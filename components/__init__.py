"""Kubeflow Pipelines components: one folder per stage, each a thin typed wrapper around ``topr.steps``.

Every component runs in the same image (``TOPR_IMAGE``), which has ``topr`` and ``kfp``
installed; locally, ``kfp.local`` runs them in subprocesses of the current interpreter.
"""

from topr.cluster import default_image

TOPR_IMAGE = default_image()
