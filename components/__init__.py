"""Kubeflow Pipelines components: one folder per stage, each a thin typed wrapper around ``topr.steps``.

Every component runs in the same image (``TOPR_IMAGE``), which has ``topr`` and ``kfp``
installed; locally, ``kfp.local`` runs them in subprocesses of the current interpreter.
"""

import os

TOPR_IMAGE = os.environ.get("TOPR_IMAGE", "ghcr.io/topr-project/topr:0.1.0")
